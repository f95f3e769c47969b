//! The latest sessions with their durations (the dashboard's table): a short list in memory,
//! bounded, updated on each start and stop. With several replicas each knows its own.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Sessions kept.
pub const RECENT: usize = 20;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RecentSession {
    pub session_id: String,
    /// When it started (`None`: started before this process, or on another replica).
    pub started: Option<String>,
    /// When it was last stopped or saved.
    pub stopped: Option<String>,
    pub duration_seconds: Option<f64>,
}

#[derive(Debug, Default)]
pub struct RecentSessions(Mutex<VecDeque<RecentSession>>);

impl RecentSessions {
    pub fn started(&self, id: &str, at: String) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.push_front(RecentSession {
            session_id: id.to_string(),
            started: Some(at),
            stopped: None,
            duration_seconds: None,
        });
        list.truncate(RECENT);
    }

    pub fn stopped(&self, id: &str, at: String, duration_seconds: Option<f64>) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match list.iter_mut().find(|s| s.session_id == id) {
            Some(session) => {
                session.stopped = Some(at);
                session.duration_seconds = duration_seconds;
            }
            None => {
                list.push_front(RecentSession {
                    session_id: id.to_string(),
                    started: None,
                    stopped: Some(at),
                    duration_seconds,
                });
                list.truncate(RECENT);
            }
        }
    }

    /// Newest first.
    pub fn list(&self) -> Vec<RecentSession> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_twenty_newest_first() {
        let r = RecentSessions::default();
        for i in 0..25 {
            r.started(&format!("s{i}"), format!("t{i}"));
        }
        r.stopped("s24", "later".into(), Some(1.5));
        r.stopped("unknown", "later".into(), None);
        let list = r.list();
        assert_eq!(list.len(), RECENT);
        assert_eq!(list[0].session_id, "unknown");
        assert_eq!(list[1].session_id, "s24");
        assert_eq!(list[1].duration_seconds, Some(1.5));
        assert!(list.iter().all(|s| s.session_id != "s4"));
    }
}

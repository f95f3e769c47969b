//! Chat sessions (contract §7): unique ids, per-session start times, durable start/stop lines.
//!
//! Start times live in memory, bounded in count and age, so a client that never stops its
//! sessions (a closed browser tab) cannot grow memory. At start-up the starts still in that window
//! are read back from the log files once; after that a stop for a session not in memory never
//! reads a file (2026-11 amendment): its start comes from its id, else it is unknown.

mod recent;
mod store;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Local, NaiveDateTime, TimeZone};
use serde_json::{Map, Value};

use crate::clock::{Clock, timestamp};
use crate::domain::UserIdentity;
use crate::services::session_log::{LowDisk, SessionLog, entries};

pub use recent::{RecentSession, RecentSessions};
pub use store::{MemorySessionStore, SessionStore};

pub const SESSION_ID_REQUIRED: &str = "session_id is required";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A stop without an id when no session was started.
    #[error("{SESSION_ID_REQUIRED}")]
    IdRequired,
    /// The log folder's disk is nearly full (`LOG_MIN_FREE_MB`): nothing was written.
    #[error("The session log's disk is nearly full ({low}); session start and stop are refused until room is made (log folder {}).", dir.display())]
    LowDisk { dir: PathBuf, low: LowDisk },
    /// The start or stop line could not be made durable.
    #[error("Could not write the session log: {source} (log folder {})", dir.display())]
    Log {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub struct Sessions {
    store: Arc<dyn SessionStore>,
    log: SessionLog,
    clock: Arc<dyn Clock>,
    /// The latest sessions this process started or stopped (the dashboard).
    recent: RecentSessions,
}

pub struct Started {
    pub session_id: String,
    pub timestamp: String,
}

pub struct Stopped {
    pub timestamp: String,
    pub duration_seconds: Option<f64>,
}

impl Sessions {
    pub fn new(store: Arc<dyn SessionStore>, log: SessionLog, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            log,
            clock,
            recent: RecentSessions::default(),
        }
    }

    fn room(&self) -> Result<(), SessionError> {
        self.log
            .reserve_room()
            .map_err(|low| SessionError::LowDisk {
                dir: self.log.dir().to_path_buf(),
                low,
            })
    }

    fn log_error(&self, source: io::Error) -> SessionError {
        SessionError::Log {
            dir: self.log.dir().to_path_buf(),
            source,
        }
    }

    /// Starts a session: answers only once its `session_start` line is on disk. If the line
    /// cannot be written the session is forgotten again (never half-started). `verified`: who
    /// started it, when the site's token says (written in the line).
    pub async fn start(&self, verified: Option<&UserIdentity>) -> Result<Started, SessionError> {
        self.room()?;
        let now = self.clock.now();
        let id = self.store.reserve(now).await;
        match self
            .log
            .append_durable(entries::session_start(&id, verified, &now))
            .await
        {
            Ok(()) => {
                self.store.started(&id).await;
                let at = timestamp(&now);
                self.recent.started(&id, at.clone());
                Ok(Started {
                    session_id: id,
                    timestamp: at,
                })
            }
            Err(e) => {
                self.store.release(&id).await;
                Err(self.log_error(e))
            }
        }
    }

    /// Stops (or saves) a session; it may be stopped again later, each time from its start.
    pub async fn stop(
        &self,
        session_id: Option<String>,
        metrics: Map<String, Value>,
    ) -> Result<Stopped, SessionError> {
        self.room()?;
        let id = match session_id {
            Some(id) => id,
            None => self.store.latest().await.ok_or(SessionError::IdRequired)?,
        };
        // Not remembered (forgotten, or never issued): the id's own time, to the second. No
        // log file is read per request (2026-11 amendment).
        let start = self.store.start_of(&id).await.or_else(|| id_time(&id));
        let now = self.clock.now();
        let duration = start
            .and_then(|s| (now - s).num_microseconds())
            .map(|us| us as f64 / 1e6);
        self.log
            .append_durable(entries::session_stop(&id, &now, duration, &metrics))
            .await
            .map_err(|e| self.log_error(e))?;
        self.store.stopped(&id).await;
        let at = timestamp(&now);
        self.recent.stopped(&id, at.clone(), duration);
        Ok(Stopped {
            timestamp: at,
            duration_seconds: duration,
        })
    }

    /// The latest sessions started or stopped here, newest first.
    pub fn recent(&self) -> Vec<RecentSession> {
        self.recent.list()
    }

    /// Sessions remembered (bounded by `SESSION_MAX_TRACKED` and `SESSION_MAX_AGE_HOURS`).
    pub async fn tracked(&self) -> usize {
        self.store.tracked().await
    }

    /// The id given, else the current session: the most recently started one that has not been
    /// stopped and is still within the age bound (a tab closed two days ago is nobody's session).
    pub async fn resolve(&self, session_id: Option<String>) -> Option<String> {
        match session_id {
            Some(id) => Some(id),
            None => self.store.current(self.clock.now()).await,
        }
    }
}

/// The local time in an id of the form `session_YYYYMMDD_HHMMSS[_N]`.
fn id_time(id: &str) -> Option<DateTime<Local>> {
    parse_id_time(id).and_then(|naive| Local.from_local_datetime(&naive).earliest())
}

/// `session_YYYYMMDD_HHMMSS` (optionally `_N`) → its local time.
fn parse_id_time(id: &str) -> Option<NaiveDateTime> {
    let rest = id.strip_prefix("session_")?;
    let stamp = rest.get(..15)?;
    if rest.len() > 15 && !rest[15..].starts_with('_') {
        return None;
    }
    NaiveDateTime::parse_from_str(stamp, "%Y%m%d_%H%M%S").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_back_to_their_time() {
        let t = parse_id_time("session_20261123_140509_3").unwrap();
        assert_eq!(
            t.format("%Y-%m-%d %H:%M:%S").to_string(),
            "2026-11-23 14:05:09"
        );
        assert!(parse_id_time("session_20261123_140509").is_some());
        assert!(parse_id_time("session_20261123_14050x").is_none());
        assert!(parse_id_time("session_20261123_140509x").is_none());
        assert!(parse_id_time("abc").is_none());
    }
}

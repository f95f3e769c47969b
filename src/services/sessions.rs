//! Chat sessions (contract §7): unique ids, per-session start times, durable start/stop lines.
//!
//! Start times live in memory, bounded in count and age, so a client that never stops its
//! sessions cannot grow memory. A stop for a session this process does not remember (a restart
//! in between, or one forgotten) finds its start in the log file, else in its id.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Local, NaiveDateTime, TimeZone};
use serde_json::{Map, Value};

use crate::clock::{Clock, timestamp};
use crate::error::ApiError;
use crate::services::log_entries;
use crate::services::session_log::SessionLog;

pub const SESSION_ID_REQUIRED: &str = "session_id is required";

#[derive(Default)]
struct Registry {
    started: HashMap<String, DateTime<Local>>,
    /// Ids in the order they were issued, for evicting the oldest.
    order: VecDeque<String>,
    latest: Option<String>,
    /// The last id base (`session_YYYYMMDD_HHMMSS`) issued and its highest suffix.
    last_base: Option<(String, u32)>,
}

pub struct Sessions {
    registry: Mutex<Registry>,
    log: SessionLog,
    clock: Arc<dyn Clock>,
    max_tracked: usize,
    max_age: chrono::Duration,
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
    pub fn new(
        log: SessionLog,
        clock: Arc<dyn Clock>,
        max_tracked: usize,
        max_age: Duration,
    ) -> Self {
        Self {
            registry: Mutex::default(),
            log,
            clock,
            max_tracked,
            max_age: chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session: answers only once its `session_start` line is on disk. If the line
    /// cannot be written the session is forgotten again (never half-started).
    pub async fn start(&self) -> Result<Started, ApiError> {
        let now = self.clock.now();
        let id = self.reserve_id(now);
        match self
            .log
            .append_durable(log_entries::session_start(&id, &now))
            .await
        {
            Ok(()) => {
                self.registry().latest = Some(id.clone());
                Ok(Started {
                    session_id: id,
                    timestamp: timestamp(&now),
                })
            }
            Err(e) => {
                self.registry().started.remove(&id);
                Err(ApiError::SessionLog(format!(
                    "{e} (log folder {})",
                    self.log.dir().display()
                )))
            }
        }
    }

    /// Stops (or saves) a session; it may be stopped again later, each time from its start.
    pub async fn stop(
        &self,
        session_id: Option<String>,
        metrics: Map<String, Value>,
    ) -> Result<Stopped, ApiError> {
        let id = session_id
            .or_else(|| self.registry().latest.clone())
            .ok_or_else(|| ApiError::BadRequest(SESSION_ID_REQUIRED.into()))?;
        let remembered = self.registry().started.get(&id).copied();
        let start = match remembered {
            Some(start) => Some(start),
            None => self.recover_start(&id).await,
        };
        let now = self.clock.now();
        let duration = start
            .and_then(|s| (now - s).num_microseconds())
            .map(|us| us as f64 / 1e6);
        self.log
            .append_durable(log_entries::session_stop(&id, &now, duration, &metrics))
            .await
            .map_err(|e| {
                ApiError::SessionLog(format!("{e} (log folder {})", self.log.dir().display()))
            })?;
        Ok(Stopped {
            timestamp: timestamp(&now),
            duration_seconds: duration,
        })
    }

    /// Sessions remembered in memory (bounded by `SESSION_MAX_TRACKED` and `SESSION_MAX_AGE_HOURS`).
    pub fn tracked(&self) -> usize {
        self.registry().started.len()
    }

    /// The id given, else the most recently started session.
    pub fn resolve(&self, session_id: Option<String>) -> Option<String> {
        session_id.or_else(|| self.registry().latest.clone())
    }

    /// A fresh id from the local time, with `_2`, `_3`, ... when that second's id is taken.
    fn reserve_id(&self, now: DateTime<Local>) -> String {
        let base = now.format("session_%Y%m%d_%H%M%S").to_string();
        let mut reg = self.registry();
        self.evict(&mut reg, now);
        let mut n = match &reg.last_base {
            Some((last, n)) if *last == base => n + 1,
            _ => 1,
        };
        // The clock can step back (NTP, DST): check what is still remembered, too.
        let id = loop {
            let candidate = if n == 1 {
                base.clone()
            } else {
                format!("{base}_{n}")
            };
            if !reg.started.contains_key(&candidate) {
                break candidate;
            }
            n += 1;
        };
        reg.last_base = Some((base, n));
        reg.started.insert(id.clone(), now);
        reg.order.push_back(id.clone());
        id
    }

    fn evict(&self, reg: &mut Registry, now: DateTime<Local>) {
        while let Some(oldest) = reg.order.front() {
            let too_many = reg.order.len() >= self.max_tracked;
            let too_old = reg
                .started
                .get(oldest)
                .is_none_or(|start| now - *start > self.max_age);
            if !(too_many || too_old) {
                break;
            }
            let oldest = reg.order.pop_front().expect("front exists");
            reg.started.remove(&oldest);
            if reg.latest.as_deref() == Some(oldest.as_str()) {
                reg.latest = None;
            }
        }
    }

    /// The start of a session this process does not remember: its `session_start` line in the
    /// log file of the id's date, else the time in the id itself.
    async fn recover_start(&self, id: &str) -> Option<DateTime<Local>> {
        let from_id = parse_id_time(id);
        let date = match from_id {
            Some(t) => t.format("%Y-%m-%d").to_string(),
            None => self.clock.now().format("%Y-%m-%d").to_string(),
        };
        let (dir, id_owned): (PathBuf, String) = (self.log.dir().to_path_buf(), id.to_string());
        let logged = tokio::task::spawn_blocking(move || {
            SessionLog::find_start_timestamp(&dir, &date, &id_owned)
        })
        .await
        .ok()
        .flatten()
        .and_then(|ts| NaiveDateTime::parse_from_str(&ts, "%Y-%m-%dT%H:%M:%S%.f").ok());
        logged
            .or(from_id)
            .and_then(|naive| Local.from_local_datetime(&naive).earliest())
    }
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

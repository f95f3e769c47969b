//! Chat sessions (contract §7): unique ids, per-session start times, durable start/stop lines.
//!
//! Start times live in memory, bounded in count and age, so a client that never stops its
//! sessions (a closed browser tab) cannot grow memory. At start-up the starts still in that window
//! are read back from the log files once; after that a stop for a session not in memory never
//! reads a file (2026-11 amendment): its start comes from its id, else it is unknown.

use std::collections::{HashMap, VecDeque};
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
    /// The most recently started session: what a stop without an id stops.
    latest: Option<String>,
    /// The most recently started session that has not been stopped: the session of a chat that
    /// names none (2026-11 amendment; Flask cleared its current session on every stop).
    current: Option<String>,
    /// The last id base (`session_YYYYMMDD_HHMMSS`) issued and its highest suffix.
    last_base: Option<(String, u32)>,
}

impl Registry {
    fn remember(&mut self, id: String, at: DateTime<Local>) {
        if self.started.insert(id.clone(), at).is_none() {
            self.order.push_back(id);
        }
    }
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
    /// `logged_starts`: `(session_id, start)` from the log files, oldest first (a restart in
    /// between); they are remembered within the same bounds, but none becomes the current one.
    pub fn new(
        log: SessionLog,
        clock: Arc<dyn Clock>,
        max_tracked: usize,
        max_age: Duration,
        logged_starts: Vec<(String, DateTime<Local>)>,
    ) -> Self {
        let sessions = Self {
            registry: Mutex::default(),
            log,
            clock,
            max_tracked,
            max_age: chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX),
        };
        {
            let now = sessions.clock.now();
            let mut reg = sessions.registry();
            for (id, at) in logged_starts {
                if now - at <= sessions.max_age {
                    sessions.evict(&mut reg, now);
                    reg.remember(id, at);
                }
            }
        }
        sessions
    }

    /// The window in which sessions are remembered (`SESSION_MAX_AGE_HOURS`).
    pub fn max_age(&self) -> chrono::Duration {
        self.max_age
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
                let mut reg = self.registry();
                reg.latest = Some(id.clone());
                reg.current = Some(id.clone());
                drop(reg);
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
        // Not in memory (forgotten, or never issued): the id's own time, to the second.
        let start = remembered.or_else(|| id_time(&id));
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
        let mut reg = self.registry();
        if reg.current.as_deref() == Some(id.as_str()) {
            reg.current = None;
        }
        drop(reg);
        Ok(Stopped {
            timestamp: timestamp(&now),
            duration_seconds: duration,
        })
    }

    /// Sessions remembered in memory (bounded by `SESSION_MAX_TRACKED` and `SESSION_MAX_AGE_HOURS`).
    pub fn tracked(&self) -> usize {
        self.registry().started.len()
    }

    /// The id given, else the current session: the most recently started one that has not been
    /// stopped and is still within the age bound (a tab closed two days ago is nobody's session).
    pub fn resolve(&self, session_id: Option<String>) -> Option<String> {
        if session_id.is_some() {
            return session_id;
        }
        let now = self.clock.now();
        let mut reg = self.registry();
        let id = reg.current.clone()?;
        let fresh = reg
            .started
            .get(&id)
            .is_some_and(|start| now - *start <= self.max_age);
        if fresh {
            Some(id)
        } else {
            reg.current = None;
            None
        }
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
        reg.remember(id.clone(), now);
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
            if reg.current.as_deref() == Some(oldest.as_str()) {
                reg.current = None;
            }
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

//! Where sessions are kept: their ids, start times and the current-session fallback. One trait,
//! so that a shared store (Redis, for several replicas) can replace the in-process one without
//! the session service knowing which runs. Methods return boxed futures so the trait can be used
//! as `dyn SessionStore`; the in-process store answers them at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Local};
use futures_util::future::{BoxFuture, FutureExt, ready};

pub trait SessionStore: Send + Sync {
    /// A fresh unique id for a session starting at `now` (`session_YYYYMMDD_HHMMSS`, then `_2`,
    /// `_3`, ... in the same second); its start is remembered.
    fn reserve(&self, now: DateTime<Local>) -> BoxFuture<'_, String>;
    /// Forgets a reservation whose start line could not be written (never half-started).
    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// The session's start line is durable: it is now the latest and the current session.
    fn started<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// The session was stopped: it is no longer the current session.
    fn stopped<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// When the session started, if it is remembered.
    fn start_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<DateTime<Local>>>;
    /// The most recently started session (what a stop without an id stops).
    fn latest(&self) -> BoxFuture<'_, Option<String>>;
    /// The most recently started session that has not been stopped and is younger than the age
    /// bound at `now` (2026-11 amendment).
    fn current(&self, now: DateTime<Local>) -> BoxFuture<'_, Option<String>>;
    /// Sessions remembered (bounded by count and age).
    fn tracked(&self) -> BoxFuture<'_, usize>;
}

#[derive(Default)]
struct Registry {
    started: HashMap<String, DateTime<Local>>,
    /// Ids in the order they were issued, for evicting the oldest.
    order: VecDeque<String>,
    latest: Option<String>,
    current: Option<String>,
    /// The last id base (`session_YYYYMMDD_HHMMSS`) issued and its highest suffix.
    last_base: Option<(String, u32)>,
}

/// The in-process store: a map bounded in count and age, so a client that never stops its
/// sessions (a closed browser tab) cannot grow memory.
pub struct MemorySessionStore {
    registry: Mutex<Registry>,
    max_tracked: usize,
    max_age: chrono::Duration,
    /// Added to the `_N` suffix (and then always written): a replica's fallback while the shared
    /// store is down issues ids no other replica issues in the same second. 0: plain ids.
    id_offset: u32,
}

impl MemorySessionStore {
    /// `logged_starts`: `(id, start)` read back from the log files, oldest first (a restart in
    /// between); remembered within the same bounds, none becomes the current session.
    pub fn new(
        max_tracked: usize,
        max_age: chrono::Duration,
        now: DateTime<Local>,
        logged_starts: Vec<(String, DateTime<Local>)>,
    ) -> Self {
        let store = Self {
            registry: Mutex::default(),
            max_tracked,
            max_age,
            id_offset: 0,
        };
        {
            let mut reg = store.registry();
            for (id, at) in logged_starts {
                if now - at <= max_age {
                    store.evict(&mut reg, now);
                    remember(&mut reg, id, at);
                }
            }
        }
        store
    }

    /// Ids get the suffix `_{offset + N}` (see `id_offset`).
    pub fn with_id_offset(mut self, offset: u32) -> Self {
        self.id_offset = offset;
        self
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
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

    fn reserve_now(&self, now: DateTime<Local>) -> String {
        let base = now.format("session_%Y%m%d_%H%M%S").to_string();
        let mut reg = self.registry();
        self.evict(&mut reg, now);
        let mut n = match &reg.last_base {
            Some((last, n)) if *last == base => n + 1,
            _ => 1,
        };
        // The clock can step back (NTP, DST): check what is still remembered, too.
        let id = loop {
            let candidate = match (n, self.id_offset) {
                (1, 0) => base.clone(),
                (n, offset) => format!("{base}_{}", n + offset),
            };
            if !reg.started.contains_key(&candidate) {
                break candidate;
            }
            n += 1;
        };
        reg.last_base = Some((base, n));
        remember(&mut reg, id.clone(), now);
        id
    }

    fn current_now(&self, now: DateTime<Local>) -> Option<String> {
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
}

fn remember(reg: &mut Registry, id: String, at: DateTime<Local>) {
    if reg.started.insert(id.clone(), at).is_none() {
        reg.order.push_back(id);
    }
}

impl SessionStore for MemorySessionStore {
    fn reserve(&self, now: DateTime<Local>) -> BoxFuture<'_, String> {
        ready(self.reserve_now(now)).boxed()
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        self.registry().started.remove(id);
        ready(()).boxed()
    }

    fn started<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        let mut reg = self.registry();
        reg.latest = Some(id.to_string());
        reg.current = Some(id.to_string());
        ready(()).boxed()
    }

    fn stopped<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        let mut reg = self.registry();
        if reg.current.as_deref() == Some(id) {
            reg.current = None;
        }
        ready(()).boxed()
    }

    fn start_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<DateTime<Local>>> {
        ready(self.registry().started.get(id).copied()).boxed()
    }

    fn latest(&self) -> BoxFuture<'_, Option<String>> {
        ready(self.registry().latest.clone()).boxed()
    }

    fn current(&self, now: DateTime<Local>) -> BoxFuture<'_, Option<String>> {
        ready(self.current_now(now)).boxed()
    }

    fn tracked(&self) -> BoxFuture<'_, usize> {
        ready(self.registry().started.len()).boxed()
    }
}

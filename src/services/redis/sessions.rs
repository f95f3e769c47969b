//! Sessions on Redis: ids unique across replicas, start times any replica can read, and one
//! current-session fallback for all.
//!
//! Keys (under `STATE_PREFIX`): `session:{id}` holds the start (microseconds since the epoch)
//! and expires after `SESSION_MAX_AGE_HOURS`, which is the age bound; `session-seq:{base}`
//! counts the ids issued in one second (`session_YYYYMMDD_HHMMSS`, then `_2`, `_3`, ...);
//! `latest` and `current` name the last started session and the current one.
//!
//! While Redis is down (or one call fails), the replica's in-process store answers. Its ids carry
//! a suffix from a range picked at random per replica (`session_20261125_140000_4821001`), so
//! replicas do not issue the same id while they cannot coordinate (two of 9,000 ranges may
//! coincide). A stop on another replica then takes the start from the id (to the second), as a
//! stop after a restart always has.

use std::sync::Arc;

use chrono::{DateTime, Local, TimeZone};
use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;

use super::Redis;
use crate::services::sessions::{MemorySessionStore, SessionStore};

/// Issues the first free id of the second: `INCR` on the second's counter, then `SET NX` on the
/// session key (an id still remembered after the clock stepped back is skipped, not reused).
const RESERVE: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
while true do
  local id = ARGV[2]
  if n > 1 then id = id .. '_' .. n end
  if redis.call('SET', ARGV[1] .. id, ARGV[3], 'NX', 'EX', ARGV[4]) then return id end
  n = redis.call('INCR', KEYS[1])
end
";

/// The session's start line is durable: it is the latest and the current session.
const STARTED: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
";

/// Stopped: no longer the current session (if it was).
const STOPPED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// The current session, if it is still within the age bound (its key has not expired).
const CURRENT: &str = r"
local id = redis.call('GET', KEYS[1])
if not id then return false end
if redis.call('EXISTS', ARGV[1] .. id) == 1 then return id end
redis.call('DEL', KEYS[1])
return false
";

pub struct RedisSessionStore {
    state: Arc<Redis>,
    /// Answers while Redis is down.
    local: MemorySessionStore,
    max_age_secs: u64,
    reserve: Script,
    started: Script,
    stopped: Script,
    current: Script,
}

impl RedisSessionStore {
    pub fn new(state: Arc<Redis>, local: MemorySessionStore, max_age: chrono::Duration) -> Self {
        Self {
            state,
            local: local.with_id_offset(replica_offset()),
            max_age_secs: max_age.num_seconds().max(1) as u64,
            reserve: Script::new(RESERVE),
            started: Script::new(STARTED),
            stopped: Script::new(STOPPED),
            current: Script::new(CURRENT),
        }
    }

    fn session_key(&self, id: &str) -> String {
        self.state.key(&format!("session:{id}"))
    }
}

/// 1,000 × a random number in 1..=9,000, per process: the fallback's suffix range.
fn replica_offset() -> u32 {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    1000 * (1 + (random % 9000) as u32)
}

fn from_micros(micros: i64) -> Option<DateTime<Local>> {
    Local.timestamp_micros(micros).single()
}

impl SessionStore for RedisSessionStore {
    fn reserve(&self, now: DateTime<Local>) -> BoxFuture<'_, String> {
        async move {
            let base = now.format("session_%Y%m%d_%H%M%S").to_string();
            let seq = self.state.key(&format!("session-seq:{base}"));
            let prefix = self.state.key("session:");
            let id = self
                .state
                .call("session reserve", |mut conn| async move {
                    self.reserve
                        .key(seq)
                        .arg(prefix)
                        .arg(&base)
                        .arg(now.timestamp_micros())
                        .arg(self.max_age_secs)
                        .invoke_async::<String>(&mut conn)
                        .await
                })
                .await;
            match id {
                Ok(id) => id,
                Err(_) => self.local.reserve(now).await,
            }
        }
        .boxed()
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let key = self.session_key(id);
            let _ = self
                .state
                .call("session release", |mut conn| async move {
                    redis::cmd("DEL")
                        .arg(key)
                        .query_async::<i64>(&mut conn)
                        .await
                })
                .await;
            self.local.release(id).await;
        }
        .boxed()
    }

    fn started<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let (latest, current) = (self.state.key("latest"), self.state.key("current"));
            let shared = self
                .state
                .call("session started", |mut conn| async move {
                    self.started
                        .key(latest)
                        .key(current)
                        .arg(id)
                        .arg(self.max_age_secs)
                        .invoke_async::<i64>(&mut conn)
                        .await
                })
                .await;
            if shared.is_err() {
                self.local.started(id).await;
            }
        }
        .boxed()
    }

    fn stopped<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let current = self.state.key("current");
            let _ = self
                .state
                .call("session stopped", |mut conn| async move {
                    self.stopped
                        .key(current)
                        .arg(id)
                        .invoke_async::<i64>(&mut conn)
                        .await
                })
                .await;
            // A session started locally while Redis was down is stopped locally too.
            self.local.stopped(id).await;
        }
        .boxed()
    }

    fn start_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<DateTime<Local>>> {
        async move {
            let key = self.session_key(id);
            let shared = self.state.get::<i64>("session start_of", key).await;
            match shared {
                Ok(Some(micros)) => from_micros(micros),
                _ => self.local.start_of(id).await,
            }
        }
        .boxed()
    }

    fn latest(&self) -> BoxFuture<'_, Option<String>> {
        async move {
            let key = self.state.key("latest");
            let shared = self.state.get::<String>("session latest", key).await;
            match shared {
                Ok(Some(id)) => Some(id),
                _ => self.local.latest().await,
            }
        }
        .boxed()
    }

    fn current(&self, now: DateTime<Local>) -> BoxFuture<'_, Option<String>> {
        async move {
            let key = self.state.key("current");
            let prefix = self.state.key("session:");
            let shared = self
                .state
                .call("session current", |mut conn| async move {
                    self.current
                        .key(key)
                        .arg(prefix)
                        .invoke_async::<Option<String>>(&mut conn)
                        .await
                })
                .await;
            match shared {
                Ok(id) => id,
                Err(_) => self.local.current(now).await,
            }
        }
        .boxed()
    }

    /// The sessions this replica holds locally (Redis bounds its own by expiry).
    fn tracked(&self) -> BoxFuture<'_, usize> {
        self.local.tracked()
    }
}

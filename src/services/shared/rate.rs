//! Rate-limit counters on Redis, so N replicas allow the limit once, not N times.
//!
//! A window per client: the first request starts a one-minute window (`INCR`, then `PEXPIRE ..
//! NX` sets its end), and at most the limit pass within it; a refused request is told the
//! window's remaining time (`PTTL`) as `Retry-After`. An allowed request within an open window
//! costs one `INCR`, with no Lua: a script per chat cost Redis about 20 µs of CPU (measured
//! with `INFO commandstats`), a plain command about 1 µs, and this check runs on every chat.
//! It is coarser than the in-process limiter (GCRA, smooth refill): a client may spend its
//! allowance at the end of one window and again at the start of the next. Keys are
//! `rate:{chat|test}:{address}` and expire with their window. Needs Redis 7 (or Valkey) for
//! `PEXPIRE .. NX`.
//!
//! While Redis is down: `STATE_UNAVAILABLE=local` uses this replica's own limiter (so the limit
//! holds per replica), `refuse` refuses.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};

use super::SharedState;
use crate::config::WhenStateUnavailable;
use crate::services::guardrails::{Limited, MemoryRateLimits, RateLimitStore, RateRefusal};

/// The window: one minute from the client's first request in it.
const WINDOW_MS: u64 = 60_000;

pub struct RedisRateLimits {
    state: Arc<SharedState>,
    local: MemoryRateLimits,
    chat: Option<NonZeroU32>,
    test: Option<NonZeroU32>,
}

impl RedisRateLimits {
    pub fn new(
        state: Arc<SharedState>,
        chat_per_min: Option<NonZeroU32>,
        test_per_min: Option<NonZeroU32>,
    ) -> Self {
        Self {
            state,
            local: MemoryRateLimits::new(chat_per_min, test_per_min),
            chat: chat_per_min,
            test: test_per_min,
        }
    }
}

impl RateLimitStore for RedisRateLimits {
    fn check(&self, what: Limited, client: IpAddr) -> BoxFuture<'_, Result<(), RateRefusal>> {
        async move {
            let (limit, name) = match what {
                Limited::Chat => (self.chat, "chat"),
                Limited::Test => (self.test, "test"),
            };
            let Some(limit) = limit else { return Ok(()) };
            let key = self.state.key(&format!("rate:{name}:{client}"));
            // The common case is one `INCR`. The window's end is set by whoever opens it, and
            // is read only to refuse; a key left without one (a replica died between the two
            // calls) gets it then, so no client is locked out for good.
            let count = self
                .state
                .call("rate check", |mut conn| {
                    let key = key.clone();
                    async move {
                        redis::cmd("INCR")
                            .arg(key)
                            .query_async::<u64>(&mut conn)
                            .await
                    }
                })
                .await;
            let count = match count {
                Ok(count) => count,
                Err(_) => {
                    return match self.state.when_unavailable {
                        WhenStateUnavailable::Local => self.local.check(what, client).await,
                        WhenStateUnavailable::Refuse => Err(RateRefusal::Unavailable),
                    };
                }
            };
            let within = count <= u64::from(limit.get());
            if count > 1 && within {
                return Ok(());
            }
            let end = self
                .state
                .call("rate window", |mut conn| async move {
                    redis::pipe()
                        .cmd("PEXPIRE")
                        .arg(&key)
                        .arg(WINDOW_MS)
                        .arg("NX")
                        .ignore()
                        .pttl(&key)
                        .query_async::<(i64,)>(&mut conn)
                        .await
                })
                .await;
            if within {
                return Ok(());
            }
            let left_ms = end.map_or(WINDOW_MS as i64, |(ms,)| ms);
            Err(RateRefusal::Wait(Duration::from_millis(
                left_ms.clamp(1, WINDOW_MS as i64) as u64,
            )))
        }
        .boxed()
    }
}

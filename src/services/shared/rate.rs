//! Rate-limit counters on Redis, so N replicas allow the limit once, not N times. The same
//! algorithm as the in-process limiter (GCRA, as governor uses): each client key holds its
//! "theoretical arrival time"; a request is allowed while that stays within one minute's
//! allowance of now. One Lua script per check, on Redis's clock (replicas' clocks may differ).
//! Keys are `rate:{chat|test}:{address}` and expire when the allowance is full again.
//!
//! While Redis is down: `STATE_UNAVAILABLE=local` uses this replica's own limiter (so the limit
//! holds per replica), `refuse` refuses.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;

use super::SharedState;
use crate::config::WhenStateUnavailable;
use crate::services::guardrails::{Limited, MemoryRateLimits, RateLimitStore, RateRefusal};

/// KEYS[1]: the client's key. ARGV: emission interval (µs), burst. Returns 0 when allowed, else
/// the wait in µs.
const CHECK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - interval * tonumber(ARGV[2])
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
";

pub struct RedisRateLimits {
    state: Arc<SharedState>,
    local: MemoryRateLimits,
    chat: Option<NonZeroU32>,
    test: Option<NonZeroU32>,
    check: Script,
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
            check: Script::new(CHECK),
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
            let interval_us = 60_000_000 / u64::from(limit.get());
            let shared = self
                .state
                .call("rate check", |mut conn| async move {
                    self.check
                        .key(key)
                        .arg(interval_us.max(1))
                        .arg(limit.get())
                        .invoke_async::<u64>(&mut conn)
                        .await
                })
                .await;
            match shared {
                Ok(0) => Ok(()),
                Ok(wait_us) => Err(RateRefusal::Wait(Duration::from_micros(wait_us))),
                Err(_) => match self.state.when_unavailable {
                    WhenStateUnavailable::Local => self.local.check(what, client).await,
                    WhenStateUnavailable::Refuse => Err(RateRefusal::Unavailable),
                },
            }
        }
        .boxed()
    }
}

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
//! Limits of 200 a minute and more are leased in blocks (a hundredth of the limit, at most 100):
//! a replica takes a block with one `INCRBY` and spends it locally until its window ends. Tokens
//! a replica leased and did not use are used by nobody, so with several replicas a client may be
//! refused a little before the limit, never after it.
//!
//! While Redis is down: `STATE_UNAVAILABLE=local` uses this replica's own limiter (so the limit
//! holds per replica), `refuse` refuses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};

use super::Redis;
use crate::config::{RateLimits, WhenStateUnavailable};
use crate::services::guardrails::{Limited, MemoryRateLimits, RateLimitStore, RateRefusal};

/// The window: one minute from the client's first request in it.
const WINDOW_MS: u64 = 60_000;

pub struct RedisRateLimits {
    state: Arc<Redis>,
    local: MemoryRateLimits,
    limits: RateLimits,
    leases: Mutex<HashMap<(Limited, IpAddr), Lease>>,
    /// One block fetched at a time: requests that find no lease while one is being fetched wait
    /// for it rather than each leasing a block (which would strand tokens).
    fetching: tokio::sync::Mutex<()>,
}

impl RedisRateLimits {
    pub fn new(state: Arc<Redis>, limits: &RateLimits) -> Self {
        Self {
            state,
            local: MemoryRateLimits::new(limits),
            limits: *limits,
            leases: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }
}

/// Tokens one Redis call takes for a client at most: a hundredth of the limit, at most 100.
/// Limits under 200 a minute take one at a time (exact, one `INCR` per request); higher ones
/// lease a block, so a busy client costs Redis one round trip per block, not one per request.
fn lease_size(limit: u32) -> u64 {
    (u64::from(limit) / 100).clamp(1, 100)
}

/// Leases held at most; past it the expired ones are forgotten, then all if need be.
const MAX_LEASES: usize = 10_000;

/// Tokens taken from Redis in a block and not used yet, until the window they came from ends.
struct Lease {
    tokens: u64,
    until: Instant,
}

impl RedisRateLimits {
    /// One token from this replica's lease for `client`, if it holds one.
    fn take_leased(&self, what: Limited, client: IpAddr) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        match leases.get_mut(&(what, client)) {
            Some(lease) if lease.tokens > 0 && lease.until > Instant::now() => {
                lease.tokens -= 1;
                true
            }
            _ => false,
        }
    }

    fn keep_lease(&self, what: Limited, client: IpAddr, tokens: u64, window_left: Duration) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.len() >= MAX_LEASES {
            let now = Instant::now();
            leases.retain(|_, l| l.until > now && l.tokens > 0);
            if leases.len() >= MAX_LEASES {
                leases.clear();
            }
        }
        leases.insert(
            (what, client),
            Lease {
                tokens,
                until: Instant::now() + window_left,
            },
        );
    }

    fn unavailable<'a>(
        &'a self,
        what: Limited,
        client: IpAddr,
    ) -> BoxFuture<'a, Result<(), RateRefusal>> {
        match self.state.when_unavailable {
            WhenStateUnavailable::Local => self.local.check(what, client),
            WhenStateUnavailable::Refuse => {
                futures_util::future::ready(Err(RateRefusal::Unavailable)).boxed()
            }
        }
    }
}

/// Appends to `pipe`: start the window if this request opened it (`PEXPIRE .. NX`, its answer
/// ignored), then what is left of it in ms (`PTTL`).
fn window_end<'a>(pipe: &'a mut redis::Pipeline, key: &str) -> &'a mut redis::Pipeline {
    pipe.cmd("PEXPIRE")
        .arg(key)
        .arg(WINDOW_MS)
        .arg("NX")
        .ignore()
        .pttl(key)
}

fn wait(left_ms: i64) -> RateRefusal {
    RateRefusal::Wait(Duration::from_millis(
        left_ms.clamp(1, WINDOW_MS as i64) as u64
    ))
}

impl RateLimitStore for RedisRateLimits {
    fn check(&self, what: Limited, client: IpAddr) -> BoxFuture<'_, Result<(), RateRefusal>> {
        async move {
            let Some(limit) = what.per_min(&self.limits) else {
                return Ok(());
            };
            let name = what.name();
            if self.take_leased(what, client) {
                return Ok(());
            }
            let key = self.state.key(&format!("rate:{name}:{client}"));
            let block = lease_size(limit.get());
            if block > 1 {
                let _one_at_a_time = self.fetching.lock().await;
                if self.take_leased(what, client) {
                    return Ok(());
                }
                // A block: `INCRBY`, the window's end (set if this opened it) and what is left
                // of it, in one round trip. Tokens past the limit are not granted; a lease
                // unused here is never given to another replica, so the limit can only be
                // stricter than exact, never looser.
                let answer = self
                    .state
                    .call("rate lease", |mut conn| async move {
                        let mut pipe = redis::pipe();
                        pipe.incr(&key, block);
                        window_end(&mut pipe, &key)
                            .query_async::<(u64, i64)>(&mut conn)
                            .await
                    })
                    .await;
                let Ok((count, left_ms)) = answer else {
                    return self.unavailable(what, client).await;
                };
                let before = count.saturating_sub(block);
                let granted = u64::from(limit.get()).saturating_sub(before).min(block);
                if granted == 0 {
                    return Err(wait(left_ms));
                }
                let left = Duration::from_millis(left_ms.clamp(1, WINDOW_MS as i64) as u64);
                self.keep_lease(what, client, granted - 1, left);
                return Ok(());
            }
            // One at a time: the common case is one `INCR`. The window's end is set by whoever
            // opens it, and is read only to refuse; a key left without one (a replica died
            // between the two calls) gets it then, so no client is locked out for good.
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
            let Ok(count) = count else {
                return self.unavailable(what, client).await;
            };
            let within = count <= u64::from(limit.get());
            if count > 1 && within {
                return Ok(());
            }
            let end = self
                .state
                .call("rate window", |mut conn| async move {
                    window_end(&mut redis::pipe(), &key)
                        .query_async::<(i64,)>(&mut conn)
                        .await
                })
                .await;
            if within {
                return Ok(());
            }
            Err(wait(end.map_or(WINDOW_MS as i64, |(ms,)| ms)))
        }
        .boxed()
    }
}

//! Requests per minute per client (`RATE_LIMIT_CHAT_PER_MIN`, `RATE_LIMIT_TEST_PER_MIN`), with
//! governor's GCRA. Behind a trait so a shared store (Redis) can hold the counters for several
//! replicas without the guardrails knowing which runs.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, ready};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// What is limited: each has its own budget per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limited {
    Chat,
    Test,
}

/// Why a rate-limit store said no.
#[derive(Debug, Clone, Copy)]
pub enum RateRefusal {
    /// Over the limit: how long until one more is allowed.
    Wait(Duration),
    /// The shared store is down and `STATE_UNAVAILABLE=refuse`.
    Unavailable,
}

pub trait RateLimitStore: Send + Sync {
    /// `Ok` if `client` may make one more `what` now.
    fn check(&self, what: Limited, client: IpAddr) -> BoxFuture<'_, Result<(), RateRefusal>>;
}

/// Keys held at most; past it the limiter forgets clients that are back to a full allowance.
const MAX_KEYS: usize = 100_000;

/// The in-process store: one keyed governor per limit.
pub struct MemoryRateLimits {
    chat: Option<DefaultKeyedRateLimiter<IpAddr>>,
    test: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

impl MemoryRateLimits {
    pub fn new(chat_per_min: Option<NonZeroU32>, test_per_min: Option<NonZeroU32>) -> Self {
        let limiter =
            |per_min: NonZeroU32| DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_min));
        Self {
            chat: chat_per_min.map(limiter),
            test: test_per_min.map(limiter),
            clock: DefaultClock::default(),
        }
    }

    fn check_now(&self, what: Limited, client: IpAddr) -> Result<(), Duration> {
        let limiter = match what {
            Limited::Chat => &self.chat,
            Limited::Test => &self.test,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        // Bounded memory: clients whose allowance is full again are forgotten.
        if limiter.len() >= MAX_KEYS {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

impl RateLimitStore for MemoryRateLimits {
    fn check(&self, what: Limited, client: IpAddr) -> BoxFuture<'_, Result<(), RateRefusal>> {
        ready(self.check_now(what, client).map_err(RateRefusal::Wait)).boxed()
    }
}

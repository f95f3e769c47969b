//! Requests per minute per client (`RATE_LIMIT_CHAT_PER_MIN`, `RATE_LIMIT_TEST_PER_MIN`,
//! `RATE_LIMIT_SESSION_PER_MIN`). Behind a trait so a shared store (Redis) can hold the counters
//! for several replicas without the guardrails knowing which runs.
//!
//! The in-process store is GCRA (the algorithm governor implements, with the same answers: a
//! limit of n a minute lets n through at once, then one every 60/n s) over a map that is bounded
//! without ever scanning it. Keys live in two generations: a key is looked up in the current one,
//! then in the previous one (and moved up); when the current one is full, the previous one is
//! dropped whole and the current one takes its place. Every request is O(1) whatever the number
//! of clients (dropping a map of plain integers is one deallocation), memory is at most two
//! generations, and only a client unseen for a whole generation is forgotten, which gives it
//! back the full allowance it would have regained anyway unless a flood of other clients, more
//! than a generation of them, came in between.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, ready};

use crate::config::RateLimits;

/// What is limited: each has its own allowance per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limited {
    Chat,
    Test,
    /// Session start and stop together.
    Session,
}

impl Limited {
    /// The setting that sets this limit (named in refusals).
    pub fn setting(self) -> &'static str {
        match self {
            Self::Chat => "RATE_LIMIT_CHAT_PER_MIN",
            Self::Test => "RATE_LIMIT_TEST_PER_MIN",
            Self::Session => "RATE_LIMIT_SESSION_PER_MIN",
        }
    }

    /// Its name in shared-state keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Test => "test",
            Self::Session => "session",
        }
    }

    pub fn per_min(self, limits: &RateLimits) -> Option<NonZeroU32> {
        match self {
            Self::Chat => limits.chat,
            Self::Test => limits.test,
            Self::Session => limits.session,
        }
    }
}

/// Why a rate-limit store said no.
#[derive(Debug, Clone, Copy)]
pub enum RateRefusal {
    /// Over the limit: how long until one more is allowed.
    Wait(Duration),
    /// The shared store is down and `STATE_UNAVAILABLE=refuse`.
    Unavailable,
}

/// `client` is already the rate key: an IPv4 address, or an IPv6 network (see `guards.rs`).
pub trait RateLimitStore: Send + Sync {
    /// `Ok` if `client` may make one more `what` now.
    fn check(&self, what: Limited, client: IpAddr) -> BoxFuture<'_, Result<(), RateRefusal>>;
}

/// Keys per generation: at most twice this many clients are remembered per limit (about 40 bytes
/// each: 8 MB per limit at worst).
const GENERATION: usize = 100_000;

/// One limit's GCRA state: each key's theoretical arrival time, in nanoseconds since `epoch`.
struct Gcra {
    /// 60 s / limit: the time one request "costs".
    interval: u64,
    /// limit × interval: how far ahead of now a key's arrival time may run (the burst).
    burst: u64,
    generations: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    current: HashMap<IpAddr, u64>,
    previous: HashMap<IpAddr, u64>,
}

impl Gcra {
    fn new(per_min: NonZeroU32) -> Self {
        let interval = 60_000_000_000 / u64::from(per_min.get());
        Self {
            interval,
            burst: interval * u64::from(per_min.get()),
            generations: Mutex::default(),
        }
    }

    /// One more request from `key` at `now`: `Ok`, or how long until one is allowed.
    fn check(&self, key: IpAddr, now: u64) -> Result<(), Duration> {
        let mut g = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let tat = match g.current.get(&key) {
            Some(tat) => *tat,
            None => g.previous.remove(&key).unwrap_or(0),
        };
        let next = tat.max(now) + self.interval;
        if next - now > self.burst {
            // Refused: the state is unchanged, but the key is kept current (it is active).
            if !g.current.contains_key(&key) {
                Self::insert(&mut g, key, tat);
            }
            return Err(Duration::from_nanos(next - now - self.burst));
        }
        match g.current.get_mut(&key) {
            Some(slot) => *slot = next,
            None => Self::insert(&mut g, key, next),
        }
        Ok(())
    }

    fn insert(g: &mut Generations, key: IpAddr, tat: u64) {
        if g.current.len() >= GENERATION {
            g.previous = std::mem::take(&mut g.current);
        }
        g.current.insert(key, tat);
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        let g = self.generations.lock().unwrap();
        g.current.len() + g.previous.len()
    }
}

/// The in-process store: one GCRA per limit that is set.
pub struct MemoryRateLimits {
    chat: Option<Gcra>,
    test: Option<Gcra>,
    session: Option<Gcra>,
    epoch: Instant,
}

impl MemoryRateLimits {
    pub fn new(limits: &RateLimits) -> Self {
        Self {
            chat: limits.chat.map(Gcra::new),
            test: limits.test.map(Gcra::new),
            session: limits.session.map(Gcra::new),
            epoch: Instant::now(),
        }
    }

    fn gcra(&self, what: Limited) -> Option<&Gcra> {
        match what {
            Limited::Chat => self.chat.as_ref(),
            Limited::Test => self.test.as_ref(),
            Limited::Session => self.session.as_ref(),
        }
    }

    fn check_now(&self, what: Limited, client: IpAddr) -> Result<(), Duration> {
        match self.gcra(what) {
            // Nanoseconds since start-up: u64 lasts 584 years.
            Some(gcra) => gcra.check(client, self.epoch.elapsed().as_nanos() as u64),
            None => Ok(()),
        }
    }
}

impl RateLimitStore for MemoryRateLimits {
    fn check(&self, what: Limited, client: IpAddr) -> BoxFuture<'_, Result<(), RateRefusal>> {
        ready(self.check_now(what, client).map_err(RateRefusal::Wait)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn a_limit_of_n_lets_n_through_then_one_every_sixtieth_of_n() {
        let gcra = Gcra::new(NonZeroU32::new(6).unwrap());
        for _ in 0..6 {
            assert!(gcra.check(ip(1), 100 * SECOND).is_ok());
        }
        assert_eq!(
            gcra.check(ip(1), 100 * SECOND),
            Err(Duration::from_secs(10))
        );
        assert_eq!(gcra.check(ip(1), 104 * SECOND), Err(Duration::from_secs(6)));
        assert!(gcra.check(ip(1), 110 * SECOND).is_ok());
        assert!(gcra.check(ip(1), 110 * SECOND).is_err());
        // Another client has its own allowance.
        assert!(gcra.check(ip(2), 110 * SECOND).is_ok());
    }

    #[test]
    fn a_million_clients_stay_within_two_generations_and_an_active_one_keeps_its_state() {
        let gcra = Gcra::new(NonZeroU32::new(1).unwrap());
        let now = 1000 * SECOND;
        assert!(gcra.check(ip(0), now).is_ok());
        for n in 1..=1_000_000u32 {
            assert!(gcra.check(ip(n), now).is_ok());
            if n % 50_000 == 0 {
                // The limited client keeps coming back: it is never forgotten, so never reset.
                assert!(gcra.check(ip(0), now).is_err(), "after {n} other clients");
            }
        }
        assert!(gcra.remembered() <= 2 * GENERATION, "{}", gcra.remembered());
    }
}

//! A circuit breaker per upstream, used only when fallbacks are configured (one upstream is
//! always tried, as before). `UPSTREAM_BREAKER_FAILURES` failures in a row open it: chats skip
//! that upstream with no wait for `UPSTREAM_BREAKER_COOLDOWN_SECS`. Then one chat probes it
//! (half-open): success closes it, failure opens it again. A probe whose chat vanished (its
//! client left) never reports: after another cooldown the next chat probes instead. Time is
//! tokio's clock, so tests move it instead of waiting.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerSettings;

pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One chat is probing; another may probe after `until`.
    Probing {
        until: Instant,
    },
}

/// For `/metrics` (`alchat_upstream_state`: 0 closed, 1 half-open, 2 open) and `/api/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a chat use this upstream now? Past an open breaker's cooldown, one chat may (the
    /// probe).
    pub fn admit(&self) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } | State::Probing { until } if now >= until => {
                *state = State::Probing {
                    until: now + self.settings.cooldown,
                };
                true
            }
            State::Open { .. } | State::Probing { .. } => false,
        }
    }

    /// The upstream answered (or refused the request itself, which is no fault of its own).
    pub fn succeeded(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// The upstream failed in a way another upstream might not.
    pub fn failed(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.settings.failures => State::Closed {
                failures: failures + 1,
            },
            _ => {
                tracing::warn!(
                    cooldown_secs = self.settings.cooldown.as_secs_f64(),
                    "upstream circuit breaker open: chats skip this upstream"
                );
                State::Open {
                    until: now + self.settings.cooldown,
                }
            }
        };
    }

    /// How long until a chat may probe again (zero when closed).
    pub fn retry_after(&self) -> Duration {
        match *self.lock() {
            State::Closed { .. } => Duration::ZERO,
            State::Open { until } | State::Probing { until } => {
                until.saturating_duration_since(Instant::now())
            }
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Probing { .. } => BreakerState::HalfOpen,
            State::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
        }
    }
}

//! Guardrails for a public chat endpoint (contract §12): which models, how often per client, how
//! much per day and per session. Every one is off or permissive by default, so the website works
//! unchanged. Counters live behind store traits (`RateLimitStore`, `BudgetStore`), so a shared
//! store can enforce them across replicas.

pub mod budget;
pub mod models;
pub mod rate;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

pub use budget::{
    BudgetDenied, BudgetRefusal, BudgetSpent, BudgetStore, Budgets, Charge, MemoryBudgetStore,
    Reservation,
};
pub use models::ModelPolicy;
pub use rate::{Limited, MemoryRateLimits, RateLimitStore, RateRefusal};

use crate::config::RateLimits;
use std::net::IpAddr;
use std::num::NonZeroU32;

/// The key a client's rate limits count against: an IPv4 address as it is (an IPv4-mapped IPv6
/// address is the IPv4 one), an IPv6 address as its network of `v6_prefix` bits.
pub fn rate_key(client: IpAddr, v6_prefix: u8) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6_prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
        v4 => v4,
    }
}

/// Why a guardrail refused a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuardrailError {
    #[error("Model '{model}' is not allowed. Allowed: {allowed}")]
    ModelNotAllowed { model: String, allowed: String },
    #[error(
        "Too many requests from this client: at most {limit} per minute ({setting}). Try again in {} s.",
        retry_secs(.retry_after)
    )]
    RateLimited {
        limit: u32,
        setting: &'static str,
        retry_after: Duration,
    },
    #[error(transparent)]
    Budget(#[from] BudgetSpent),
    /// Budgets or rate limits are set, the shared state (Redis) is unreachable and
    /// `STATE_UNAVAILABLE=refuse`.
    #[error(
        "Usage limits cannot be checked right now: the shared state (STATE_URL) is unreachable. Try again in a few seconds."
    )]
    StateUnavailable,
}

impl GuardrailError {
    /// For `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ModelNotAllowed { .. } => None,
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            Self::Budget(b) => Some(b.retry_after),
            Self::StateUnavailable => Some(Duration::from_secs(2)),
        }
    }
}

/// Whole seconds, rounded up, at least one.
pub fn retry_secs(wait: &Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Refusals since start-up, by guardrail.
#[derive(Debug, Default)]
pub struct Refusals {
    pub model: AtomicU64,
    pub rate_limit: AtomicU64,
    pub budget: AtomicU64,
    pub input_too_large: AtomicU64,
    pub admin_token: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefusalCounts {
    pub model: u64,
    pub rate_limit: u64,
    pub budget: u64,
    pub input_too_large: u64,
    pub admin_token: u64,
}

impl Refusals {
    pub fn snapshot(&self) -> RefusalCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RefusalCounts {
            model: get(&self.model),
            rate_limit: get(&self.rate_limit),
            budget: get(&self.budget),
            input_too_large: get(&self.input_too_large),
            admin_token: get(&self.admin_token),
        }
    }
}

pub struct Guardrails {
    models: ModelPolicy,
    rate: Arc<dyn RateLimitStore>,
    rate_limits: RateLimits,
    pub budgets: Arc<Budgets>,
    pub refusals: Refusals,
}

impl Guardrails {
    pub fn new(
        models: ModelPolicy,
        rate: Arc<dyn RateLimitStore>,
        rate_limits: RateLimits,
        budgets: Arc<Budgets>,
    ) -> Self {
        Self {
            models,
            rate,
            rate_limits,
            budgets,
            refusals: Refusals::default(),
        }
    }

    /// The model allow-list (the playground's model picker).
    pub fn models(&self) -> &ModelPolicy {
        &self.models
    }

    /// Before anything reaches OpenAI: is this model allowed?
    pub fn check_model(&self, model: &str) -> Result<(), GuardrailError> {
        if self.models.allows(model) {
            return Ok(());
        }
        self.refusals.model.fetch_add(1, Ordering::Relaxed);
        Err(GuardrailError::ModelNotAllowed {
            model: model.to_string(),
            allowed: self.models.describe(),
        })
    }

    /// One more `what` from `client`, if its per-minute allowance has room. IPv6 clients are
    /// counted per network (`RATE_LIMIT_IPV6_PREFIX`): one customer's /64 holds 2^64 addresses.
    pub async fn check_rate(
        &self,
        what: Limited,
        client: std::net::IpAddr,
    ) -> Result<(), GuardrailError> {
        let setting = what.setting();
        let Some(limit) = what.per_min(&self.rate_limits).map(NonZeroU32::get) else {
            return Ok(());
        };
        self.rate
            .check(what, rate_key(client, self.rate_limits.ipv6_prefix))
            .await
            .map_err(|refusal| match refusal {
                RateRefusal::Wait(retry_after) => {
                    self.refusals.rate_limit.fetch_add(1, Ordering::Relaxed);
                    GuardrailError::RateLimited {
                        limit,
                        setting,
                        retry_after,
                    }
                }
                RateRefusal::Unavailable => GuardrailError::StateUnavailable,
            })
    }

    /// Reserves a call's estimated spend (see `budget.rs`).
    pub async fn reserve(
        &self,
        session: Option<&str>,
        model: &str,
        input_chars: usize,
    ) -> Result<Reservation, GuardrailError> {
        self.budgets
            .reserve(session, model, input_chars)
            .await
            .map_err(|denied| match denied {
                BudgetDenied::Spent(spent) => {
                    self.refusals.budget.fetch_add(1, Ordering::Relaxed);
                    spent.into()
                }
                BudgetDenied::Unavailable => GuardrailError::StateUnavailable,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::rate_key;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_keyed_by_network_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            rate_key(ip("2001:db8:1:2:aaaa::1"), 64),
            rate_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 64)
        );
        assert_eq!(
            rate_key(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_ne!(
            rate_key(ip("2001:db8:1:2::1"), 64),
            rate_key(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(rate_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(rate_key(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(rate_key(ip("::ffff:203.0.113.9"), 64), ip("203.0.113.9"));
        assert_eq!(rate_key(ip("203.0.113.9"), 64), ip("203.0.113.9"));
    }
}

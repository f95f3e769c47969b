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
    BudgetDenied, BudgetLimits, BudgetRefusal, BudgetSpent, BudgetStore, Budgets, Charge,
    MemoryBudgetStore, Reservation,
};
pub use models::ModelPolicy;
pub use rate::{Limited, MemoryRateLimits, RateLimitStore, RateRefusal};

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
    chat_per_min: Option<u32>,
    test_per_min: Option<u32>,
    pub budgets: Arc<Budgets>,
    pub refusals: Refusals,
}

impl Guardrails {
    pub fn new(
        models: ModelPolicy,
        rate: Arc<dyn RateLimitStore>,
        per_min: (Option<u32>, Option<u32>),
        budgets: Arc<Budgets>,
    ) -> Self {
        Self {
            models,
            rate,
            chat_per_min: per_min.0,
            test_per_min: per_min.1,
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

    /// One more `what` from `client`, if its per-minute allowance has room.
    pub async fn check_rate(
        &self,
        what: Limited,
        client: std::net::IpAddr,
    ) -> Result<(), GuardrailError> {
        let (limit, setting) = match what {
            Limited::Chat => (self.chat_per_min, "RATE_LIMIT_CHAT_PER_MIN"),
            Limited::Test => (self.test_per_min, "RATE_LIMIT_TEST_PER_MIN"),
        };
        let Some(limit) = limit else { return Ok(()) };
        self.rate
            .check(what, client)
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

//! Spend budgets (`BUDGET_DAILY_USD`, `BUDGET_DAILY_TOKENS`, `BUDGET_SESSION_TOKENS`) that hold
//! under concurrency: a chat reserves its estimated spend before it reaches OpenAI, all or
//! nothing, and settles to what it really used afterwards. So fifty parallel chats against a
//! budget that fits ten let ten through, not fifty (the overshoot gateways report when every
//! request passes the check before any spend is recorded). Budgets reset at local midnight: the
//! counters are keyed by the local date.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Local, NaiveTime, TimeZone};
use futures_util::future::{BoxFuture, FutureExt, ready};
use indexmap::IndexMap;

use crate::clock::{Clock, timestamp};
use crate::config::BudgetLimits;
use crate::domain::TokenUsage;
use crate::domain::pricing::PriceTable;

/// One counter to charge, and the most it may reach.
#[derive(Debug, Clone)]
pub struct Charge {
    pub key: String,
    pub amount: f64,
    pub cap: f64,
}

/// Why a budget store did not reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// The charge at this index does not fit its cap.
    Over(usize),
    /// The shared store is down and `STATE_UNAVAILABLE=refuse`.
    Unavailable,
}

pub trait BudgetStore: Send + Sync {
    /// Adds every charge if each counter stays within its cap, atomically; else changes
    /// nothing and says why (the first charge that does not fit).
    fn reserve<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Result<(), BudgetRefusal>>;
    /// Adds each amount (negative to give back).
    fn adjust<'a>(&'a self, changes: &'a [(String, f64)]) -> BoxFuture<'a, ()>;
    /// A counter's value.
    fn spent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, f64>;
}

/// The in-process store: counters in one map, oldest forgotten past `max_keys` (yesterday's
/// first, since keys are created day by day).
pub struct MemoryBudgetStore {
    counters: Mutex<IndexMap<String, f64>>,
    max_keys: usize,
}

impl MemoryBudgetStore {
    pub fn new(max_keys: usize) -> Self {
        Self {
            counters: Mutex::default(),
            max_keys,
        }
    }
}

impl BudgetStore for MemoryBudgetStore {
    fn reserve<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Result<(), BudgetRefusal>> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let over = charges.iter().position(|c| {
            counters.get(&c.key).copied().unwrap_or(0.0) + c.amount > c.cap + f64::EPSILON
        });
        if let Some(i) = over {
            return ready(Err(BudgetRefusal::Over(i))).boxed();
        }
        for c in charges {
            *counters.entry(c.key.clone()).or_insert(0.0) += c.amount;
        }
        while counters.len() > self.max_keys {
            counters.shift_remove_index(0);
        }
        ready(Ok(())).boxed()
    }

    fn adjust<'a>(&'a self, changes: &'a [(String, f64)]) -> BoxFuture<'a, ()> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        for (key, delta) in changes {
            let value = counters.entry(key.clone()).or_insert(0.0);
            *value = (*value + delta).max(0.0);
        }
        ready(()).boxed()
    }

    fn spent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, f64> {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        ready(counters.get(key).copied().unwrap_or(0.0)).boxed()
    }
}

/// Why a chat's spend was not reserved.
#[derive(Debug, Clone)]
pub enum BudgetDenied {
    Spent(BudgetSpent),
    /// The shared store is down and `STATE_UNAVAILABLE=refuse`.
    Unavailable,
}

/// A budget that does not fit this chat.
#[derive(Debug, Clone, thiserror::Error)]
#[error("The {which} is spent; it resets at {resets_at}. Try again then.")]
pub struct BudgetSpent {
    pub which: String,
    pub resets_at: String,
    pub retry_after: Duration,
}

pub struct Budgets {
    store: Arc<dyn BudgetStore>,
    limits: BudgetLimits,
    pricing: PriceTable,
    clock: Arc<dyn Clock>,
}

/// Spend held for one call until its real usage is known. Settle it, or release it.
#[derive(Debug, Default)]
pub struct Reservation {
    changes: Vec<(String, f64, Unit)>,
    model: String,
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Usd,
    Tokens,
}

/// Rough size of a token in characters, for estimates before OpenAI counts.
pub const CHARS_PER_TOKEN: u64 = 4;

impl Reservation {
    /// Holds nothing (no budget is set): there is nothing to settle.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

impl Budgets {
    pub fn new(
        store: Arc<dyn BudgetStore>,
        limits: BudgetLimits,
        pricing: PriceTable,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            limits,
            pricing,
            clock,
        }
    }

    /// Reserves a call's estimated spend: `input_chars` of prompt, plus the output estimate.
    pub async fn reserve(
        &self,
        session: Option<&str>,
        model: &str,
        input_chars: usize,
    ) -> Result<Reservation, BudgetDenied> {
        if !self.limits.any() {
            // No budget: nothing to price or count, per chat.
            return Ok(Reservation::default());
        }
        let prompt = (input_chars as u64).div_ceil(CHARS_PER_TOKEN);
        let estimate = TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: self.limits.estimate_output_tokens,
            total_tokens: prompt + self.limits.estimate_output_tokens,
            cached_tokens: 0,
        };
        let reservation = self.charges_for(session, model, &estimate);
        if reservation.changes.is_empty() {
            return Ok(reservation);
        }
        let charges: Vec<Charge> = reservation
            .changes
            .iter()
            .map(|(key, amount, unit)| Charge {
                key: key.clone(),
                amount: *amount,
                cap: self.cap_of(key, *unit),
            })
            .collect();
        match self.store.reserve(&charges).await {
            Ok(()) => Ok(reservation),
            Err(BudgetRefusal::Over(i)) => {
                Err(BudgetDenied::Spent(self.spent_error(&charges[i].key)))
            }
            Err(BudgetRefusal::Unavailable) => Err(BudgetDenied::Unavailable),
        }
    }

    /// Replaces the reservation with what the call really used.
    pub async fn settle(&self, reservation: Reservation, actual: &TokenUsage) {
        if reservation.changes.is_empty() {
            return;
        }
        let used = self.amounts(&reservation.model, actual);
        let changes: Vec<(String, f64)> = reservation
            .changes
            .into_iter()
            .map(|(key, reserved, unit)| {
                let real = match unit {
                    Unit::Usd => used.0,
                    Unit::Tokens => used.1,
                };
                (key, real - reserved)
            })
            .collect();
        self.store.adjust(&changes).await;
    }

    /// `budget` for `/api/openai/usage`, when any budget is set.
    pub async fn report(&self) -> Option<BudgetReport> {
        if !self.limits.any() {
            return None;
        }
        let day = self.day();
        let usd = self.store.spent(&format!("{day}|usd")).await;
        let tokens = self.store.spent(&format!("{day}|tokens")).await;
        let remaining = |cap: Option<f64>, spent: f64| cap.map(|c| (c - spent).max(0.0));
        Some(BudgetReport {
            limits: BudgetFigures {
                daily_usd: self.limits.daily_usd,
                daily_tokens: self.limits.daily_tokens,
                session_tokens: self.limits.session_tokens,
            },
            spent: SpentToday {
                daily_usd: round4(usd),
                daily_tokens: tokens.round() as u64,
            },
            remaining: BudgetRemaining {
                daily_usd: remaining(self.limits.daily_usd, usd).map(round4),
                daily_tokens: remaining(self.limits.daily_tokens.map(|t| t as f64), tokens)
                    .map(|t| t.round() as u64),
            },
            resets_at: timestamp(&self.next_midnight()),
            note: "Spend includes reservations of chats in progress; each settles to its real usage.",
        })
    }

    fn charges_for(&self, session: Option<&str>, model: &str, usage: &TokenUsage) -> Reservation {
        let day = self.day();
        let (usd, tokens) = self.amounts(model, usage);
        let mut changes = Vec::new();
        if self.limits.daily_usd.is_some() {
            changes.push((format!("{day}|usd"), usd, Unit::Usd));
        }
        if self.limits.daily_tokens.is_some() {
            changes.push((format!("{day}|tokens"), tokens, Unit::Tokens));
        }
        if let (Some(_), Some(id)) = (self.limits.session_tokens, session) {
            changes.push((format!("{day}|session|{id}"), tokens, Unit::Tokens));
        }
        Reservation {
            changes,
            model: model.to_string(),
        }
    }

    fn amounts(&self, model: &str, usage: &TokenUsage) -> (f64, f64) {
        let cost = self.pricing.cost(
            model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        );
        (
            cost.prompt + cost.completion,
            (usage.prompt_tokens + usage.completion_tokens) as f64,
        )
    }

    fn cap_of(&self, key: &str, unit: Unit) -> f64 {
        match unit {
            Unit::Usd => self.limits.daily_usd.unwrap_or(f64::INFINITY),
            Unit::Tokens if key.contains("|session|") => self
                .limits
                .session_tokens
                .map_or(f64::INFINITY, |t| t as f64),
            Unit::Tokens => self.limits.daily_tokens.map_or(f64::INFINITY, |t| t as f64),
        }
    }

    fn spent_error(&self, key: &str) -> BudgetSpent {
        let which = if key.ends_with("|usd") {
            format!(
                "daily budget of ${:.2} (BUDGET_DAILY_USD)",
                self.limits.daily_usd.unwrap_or_default()
            )
        } else if key.contains("|session|") {
            format!(
                "session's budget of {} tokens (BUDGET_SESSION_TOKENS)",
                self.limits.session_tokens.unwrap_or_default()
            )
        } else {
            format!(
                "daily budget of {} tokens (BUDGET_DAILY_TOKENS)",
                self.limits.daily_tokens.unwrap_or_default()
            )
        };
        let midnight = self.next_midnight();
        let wait = (midnight - self.clock.now())
            .to_std()
            .unwrap_or(Duration::from_secs(1));
        BudgetSpent {
            which,
            resets_at: timestamp(&midnight),
            retry_after: wait,
        }
    }

    fn day(&self) -> String {
        self.clock.now().format("%Y-%m-%d").to_string()
    }

    fn next_midnight(&self) -> DateTime<Local> {
        let now = self.clock.now();
        let tomorrow = now.date_naive().succ_opt().unwrap_or(now.date_naive());
        Local
            .from_local_datetime(&tomorrow.and_time(NaiveTime::MIN))
            .earliest()
            .unwrap_or(now + chrono::Duration::days(1))
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// `budget` in `/api/openai/usage`: the caps, today's spend and what is left.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BudgetReport {
    pub limits: BudgetFigures,
    pub spent: SpentToday,
    pub remaining: BudgetRemaining,
    /// The next local midnight.
    pub resets_at: String,
    pub note: &'static str,
}

/// The caps; `null`: not set.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BudgetFigures {
    pub daily_usd: Option<f64>,
    pub daily_tokens: Option<u64>,
    pub session_tokens: Option<u64>,
}

/// What is left under the daily caps; `null`: no such cap.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BudgetRemaining {
    pub daily_usd: Option<f64>,
    pub daily_tokens: Option<u64>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SpentToday {
    pub daily_usd: f64,
    pub daily_tokens: u64,
}

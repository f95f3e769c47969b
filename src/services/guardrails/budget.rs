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

/// One counter to charge: `fixed` (the prompt) plus `per_output` for each answer token granted,
/// and the most it may reach.
#[derive(Debug, Clone)]
pub struct Charge {
    pub key: Arc<str>,
    pub fixed: f64,
    pub per_output: f64,
    pub cap: f64,
}

/// Why a budget store did not reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// The charge at this index does not fit its cap, even with the least answer.
    Over(usize),
    /// The shared store is down and `STATE_UNAVAILABLE=refuse`.
    Unavailable,
}

/// Where a reservation was taken, so it is settled there (never on the other store: a
/// reservation taken locally while Redis was down and settled on Redis would undercount it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Place {
    #[default]
    Local,
    Shared,
}

/// What a store granted: the answer tokens every charge has room for (at most the most asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub output: u64,
    pub place: Place,
}

pub trait BudgetStore: Send + Sync {
    /// Finds the most answer tokens `n` in `min_output..=max_output` for which every counter
    /// stays within its cap after adding `fixed + per_output * n`, and adds that, atomically.
    /// Else changes nothing and says which charge cannot fit even `min_output`.
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge],
        min_output: u64,
        max_output: u64,
    ) -> BoxFuture<'a, Result<Granted, BudgetRefusal>>;
    /// Adds each amount (negative to give back) where the reservation was taken.
    fn adjust<'a>(&'a self, changes: &'a [(Arc<str>, f64)], place: Place) -> BoxFuture<'a, ()>;
    /// A counter's value.
    fn spent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, f64>;
}

/// Whether a counter is a session's (bounded on its own) or a day's (never evicted).
pub fn is_session_key(key: &str) -> bool {
    key.contains("|session|")
}

/// Answer tokens that fit: the largest `n <= max_output` with `spent + fixed + per_output * n <=
/// cap` for every charge; `Err(i)` when charge `i` cannot take `min_output`.
pub fn fit(
    charges: &[Charge],
    spent: impl Fn(&str) -> f64,
    min_output: u64,
    max_output: u64,
) -> Result<u64, usize> {
    let mut n = max_output;
    for (i, c) in charges.iter().enumerate() {
        let room = c.cap - spent(&c.key) - c.fixed;
        let fits = |k: u64| room + TOLERANCE >= c.per_output * k as f64;
        if !fits(min_output) {
            return Err(i);
        }
        if c.per_output > 0.0 && !fits(n) {
            n = ((room + TOLERANCE) / c.per_output).floor().max(0.0) as u64;
            n = n.clamp(min_output, max_output);
        }
    }
    Ok(n)
}

/// Float slack for USD sums (token counters are whole numbers, exact in an `f64`).
const TOLERANCE: f64 = 1e-9;

/// Days' counters kept (two a day at most: `usd` and `tokens`); yesterday's go first.
const DAILY_KEYS: usize = 8;

/// The in-process store. Day counters and session counters are kept apart: sessions are bounded
/// (oldest forgotten past `max_sessions`), and nothing a client sends can push out a day's
/// counter.
pub struct MemoryBudgetStore {
    counters: Mutex<Counters>,
    max_sessions: usize,
}

#[derive(Default)]
struct Counters {
    daily: IndexMap<String, f64>,
    sessions: IndexMap<String, f64>,
}

impl Counters {
    fn get(&self, key: &str) -> f64 {
        let map = if is_session_key(key) {
            &self.sessions
        } else {
            &self.daily
        };
        map.get(key).copied().unwrap_or(0.0)
    }

    fn add(&mut self, key: &str, amount: f64, max_sessions: usize) {
        let (map, max) = if is_session_key(key) {
            (&mut self.sessions, max_sessions)
        } else {
            (&mut self.daily, DAILY_KEYS)
        };
        match map.get_mut(key) {
            Some(value) => *value = (*value + amount).max(0.0),
            None => {
                map.insert(key.to_string(), amount.max(0.0));
                while map.len() > max {
                    map.shift_remove_index(0);
                }
            }
        }
    }
}

impl MemoryBudgetStore {
    pub fn new(max_sessions: usize) -> Self {
        Self {
            counters: Mutex::default(),
            max_sessions: max_sessions.max(1),
        }
    }

    /// `reserve`, at once.
    pub fn reserve_now(
        &self,
        charges: &[Charge],
        min_output: u64,
        max_output: u64,
    ) -> Result<Granted, BudgetRefusal> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let output = fit(charges, |k| counters.get(k), min_output, max_output)
            .map_err(BudgetRefusal::Over)?;
        for c in charges {
            counters.add(
                &c.key,
                c.fixed + c.per_output * output as f64,
                self.max_sessions,
            );
        }
        Ok(Granted {
            output,
            place: Place::Local,
        })
    }

    pub fn adjust_now(&self, changes: &[(Arc<str>, f64)]) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        for (key, delta) in changes {
            counters.add(key, *delta, self.max_sessions);
        }
    }

    pub fn spent_now(&self, key: &str) -> f64 {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
    }
}

impl BudgetStore for MemoryBudgetStore {
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge],
        min_output: u64,
        max_output: u64,
    ) -> BoxFuture<'a, Result<Granted, BudgetRefusal>> {
        ready(self.reserve_now(charges, min_output, max_output)).boxed()
    }

    fn adjust<'a>(&'a self, changes: &'a [(Arc<str>, f64)], _place: Place) -> BoxFuture<'a, ()> {
        self.adjust_now(changes);
        ready(()).boxed()
    }

    fn spent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, f64> {
        ready(self.spent_now(key)).boxed()
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

/// One day's counter keys (`{date}|usd`, `{date}|tokens`; a session's is `{date}|session|{id}`).
#[derive(Clone)]
struct DayKeys {
    date: chrono::NaiveDate,
    day: Arc<str>,
    usd: Arc<str>,
    tokens: Arc<str>,
}

pub struct Budgets {
    day_keys: Mutex<Option<DayKeys>>,
    store: Arc<dyn BudgetStore>,
    limits: BudgetLimits,
    pricing: PriceTable,
    clock: Arc<dyn Clock>,
}

/// Spend held for one call until its real usage is known: the exact prompt plus the answer
/// tokens granted, a true upper bound of what the call can cost (the upstream stops at the cap
/// sent). Settle it with the real usage, release it, or keep it whole.
#[derive(Debug, Default)]
pub struct Reservation {
    changes: Vec<(Arc<str>, f64, Unit)>,
    model: String,
    place: Place,
    /// The answer tokens reserved: the cap to send for this call.
    pub output: u64,
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Usd,
    Tokens,
}

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
            day_keys: Mutex::default(),
            store,
            limits,
            pricing,
            clock,
        }
    }

    pub fn any(&self) -> bool {
        self.limits.any()
    }

    /// Reserves `prompt_tokens` plus the most answer tokens up to `max_output` that every budget
    /// has room for; refused only when not even `min_output` fits.
    pub async fn reserve(
        &self,
        session: Option<&str>,
        model: &str,
        prompt_tokens: u64,
        min_output: u64,
        max_output: u64,
    ) -> Result<Reservation, BudgetDenied> {
        let keys = self.keys();
        let tokens = prompt_tokens as f64;
        let mut charges = Vec::with_capacity(3);
        let mut units = Vec::with_capacity(3);
        if let Some(cap) = self.limits.daily_usd {
            let (prompt_usd, output_usd) = self.rates(model);
            charges.push(Charge {
                key: keys.usd.clone(),
                fixed: tokens * prompt_usd,
                per_output: output_usd,
                cap,
            });
            units.push(Unit::Usd);
        }
        if let Some(cap) = self.limits.daily_tokens {
            charges.push(Charge {
                key: keys.tokens.clone(),
                fixed: tokens,
                per_output: 1.0,
                cap: cap as f64,
            });
            units.push(Unit::Tokens);
        }
        if let (Some(cap), Some(id)) = (self.limits.session_tokens, session) {
            charges.push(Charge {
                key: format!("{}|session|{id}", keys.day).into(),
                fixed: tokens,
                per_output: 1.0,
                cap: cap as f64,
            });
            units.push(Unit::Tokens);
        }
        if charges.is_empty() {
            return Ok(Reservation {
                output: max_output,
                ..Reservation::default()
            });
        }
        let min_output = min_output.min(max_output);
        match self.store.reserve(&charges, min_output, max_output).await {
            Ok(granted) => Ok(Reservation {
                changes: charges
                    .into_iter()
                    .zip(units)
                    .map(|(c, unit)| (c.key, c.fixed + c.per_output * granted.output as f64, unit))
                    .collect(),
                model: model.to_string(),
                place: granted.place,
                output: granted.output,
            }),
            Err(BudgetRefusal::Over(i)) => {
                Err(BudgetDenied::Spent(self.spent_error(&charges[i].key)))
            }
            Err(BudgetRefusal::Unavailable) => Err(BudgetDenied::Unavailable),
        }
    }

    /// USD per prompt token and per answer token. Prompt tokens are priced at the full input
    /// rate: the cache's discount is known only afterwards.
    fn rates(&self, model: &str) -> (f64, f64) {
        let price = self.pricing.quote(model).price;
        (price.input / 1_000_000.0, price.output / 1_000_000.0)
    }

    /// Replaces the reservation with what the call really used (never more than reserved: the
    /// upstream stops at the cap, and an estimate is capped likewise).
    pub async fn settle(&self, reservation: Reservation, actual: &TokenUsage) {
        if reservation.changes.is_empty() {
            return;
        }
        let priced = reservation
            .changes
            .iter()
            .any(|(_, _, unit)| matches!(unit, Unit::Usd));
        let used = self.amounts(&reservation.model, actual, priced);
        let changes: Vec<(Arc<str>, f64)> = reservation
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
        self.store.adjust(&changes, reservation.place).await;
    }

    /// `budget` for `/api/openai/usage`, when any budget is set.
    pub async fn report(&self) -> Option<BudgetReport> {
        if !self.limits.any() {
            return None;
        }
        let keys = self.keys();
        let usd = self.store.spent(&keys.usd).await;
        let tokens = self.store.spent(&keys.tokens).await;
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

    /// (USD, tokens) of `usage`; USD only when `priced` (a USD budget is set).
    fn amounts(&self, model: &str, usage: &TokenUsage, priced: bool) -> (f64, f64) {
        let tokens = (usage.prompt_tokens + usage.completion_tokens) as f64;
        if !priced {
            return (0.0, tokens);
        }
        let cost = self.pricing.cost(
            model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        );
        (cost.prompt + cost.completion, tokens)
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

    /// Today's counter keys, made once a day: formatting the date per chat cost more than the
    /// rest of a reservation.
    fn keys(&self) -> DayKeys {
        let date = self.clock.now().date_naive();
        let mut cached = self.day_keys.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some(keys) if keys.date == date => keys.clone(),
            _ => {
                let day = date.format("%Y-%m-%d").to_string();
                let keys = DayKeys {
                    date,
                    usd: format!("{day}|usd").into(),
                    tokens: format!("{day}|tokens").into(),
                    day: day.into(),
                };
                *cached = Some(keys.clone());
                keys
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(key: &str, fixed: f64, cap: f64) -> Charge {
        Charge {
            key: key.into(),
            fixed,
            per_output: 1.0,
            cap,
        }
    }

    /// 20,000 distinct sessions through a store that keeps 100: the day's counter stays, so the
    /// day's cap holds.
    #[test]
    fn twenty_thousand_sessions_cannot_evict_the_day() {
        let store = MemoryBudgetStore::new(100);
        let mut granted = 0;
        for i in 0..20_000 {
            let charges = [
                tokens("2026-12-07|tokens", 8.0, 3_000.0),
                tokens(&format!("2026-12-07|session|s{i}"), 8.0, 2_000.0),
            ];
            if let Ok(g) = store.reserve_now(&charges, 1, 4) {
                granted += 1;
                // Settle to 10 real tokens of the 12 reserved.
                let back = 10.0 - (8.0 + g.output as f64);
                store.adjust_now(&[
                    (charges[0].key.clone(), back),
                    (charges[1].key.clone(), back),
                ]);
            }
        }
        assert_eq!(store.spent_now("2026-12-07|tokens"), 3_000.0);
        assert_eq!(granted, 300);
        assert!(store.counters.lock().unwrap().sessions.len() <= 100);
    }

    #[test]
    fn the_answer_gets_the_room_left_and_at_least_the_minimum() {
        let c = [tokens("d", 100.0, 1_000.0)];
        assert_eq!(fit(&c, |_| 0.0, 64, 500), Ok(500));
        assert_eq!(fit(&c, |_| 600.0, 64, 500), Ok(300));
        assert_eq!(fit(&c, |_| 836.0, 64, 500), Ok(64));
        assert_eq!(fit(&c, |_| 837.0, 64, 500), Err(0));
        // The tightest of several caps wins.
        let two = [tokens("d", 100.0, 1_000.0), tokens("s", 100.0, 300.0)];
        assert_eq!(fit(&two, |_| 0.0, 64, 500), Ok(200));
    }
}

//! Spend budgets (`BUDGET_DAILY_USD`, `BUDGET_DAILY_TOKENS`, `BUDGET_SESSION_TOKENS`) that hold
//! under concurrency: a chat reserves its estimated spend before it reaches OpenAI, all or
//! nothing, and settles to what it really used afterwards. So fifty parallel chats against a
//! budget that fits ten let ten through, not fifty (the overshoot gateways report when every
//! request passes the check before any spend is recorded). Budgets reset at local midnight: the
//! counters are keyed by the local date. Quotas (`QUOTA_*_DAILY_TOKENS`) are counters of the same
//! kind, keyed by user, guest address or address, reserved in the same step as the budgets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Local, NaiveTime, TimeZone};
use futures_util::future::{BoxFuture, FutureExt, ready};
use indexmap::IndexMap;

use crate::clock::{Clock, timestamp};
use crate::config::BudgetLimits;
use crate::domain::pricing::PriceTable;
use crate::domain::{Consumer, TokenUsage, UserIdentity};
use std::net::IpAddr;

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
    /// Several counters' values, in one look (one round trip on Redis).
    fn spent_all<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Vec<f64>>;
}

/// What a counter belongs to, by the word after its date (`{date}|{word}|…`): the day's own
/// (never evicted), a session's, or one user's or address's quota (each bounded on its own, so
/// nothing a client sends pushes out a day's counter or another kind's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyClass {
    Day,
    Session,
    Consumer,
}

pub fn key_class(key: &str) -> KeyClass {
    match key.split('|').nth(1) {
        Some("session") => KeyClass::Session,
        Some("user" | "guest" | "client") => KeyClass::Consumer,
        _ => KeyClass::Day,
    }
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

/// The in-process store. Day counters, session counters and quota counters are kept apart:
/// sessions are bounded (oldest forgotten past `max_sessions`), quotas likewise
/// (`QUOTA_MAX_TRACKED`), and nothing a client sends can push out a day's counter or a counter
/// of another kind.
pub struct MemoryBudgetStore {
    counters: Mutex<Counters>,
    max_sessions: usize,
    max_consumers: usize,
}

#[derive(Default)]
struct Counters {
    daily: IndexMap<String, f64>,
    sessions: IndexMap<String, f64>,
    consumers: IndexMap<String, f64>,
}

impl Counters {
    fn map(&self, key: &str) -> &IndexMap<String, f64> {
        match key_class(key) {
            KeyClass::Day => &self.daily,
            KeyClass::Session => &self.sessions,
            KeyClass::Consumer => &self.consumers,
        }
    }

    fn get(&self, key: &str) -> f64 {
        self.map(key).get(key).copied().unwrap_or(0.0)
    }

    fn add(&mut self, key: &str, amount: f64, bounds: (usize, usize)) {
        let (map, max) = match key_class(key) {
            KeyClass::Day => (&mut self.daily, DAILY_KEYS),
            KeyClass::Session => (&mut self.sessions, bounds.0),
            KeyClass::Consumer => (&mut self.consumers, bounds.1),
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
    pub fn new(max_sessions: usize, max_consumers: usize) -> Self {
        Self {
            counters: Mutex::default(),
            max_sessions: max_sessions.max(1),
            max_consumers: max_consumers.max(1),
        }
    }

    fn bounds(&self) -> (usize, usize) {
        (self.max_sessions, self.max_consumers)
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
                self.bounds(),
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
            counters.add(key, *delta, self.bounds());
        }
    }

    pub fn spent_all_now(&self, keys: &[String]) -> Vec<f64> {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter().map(|k| counters.get(k)).collect()
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

    fn spent_all<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Vec<f64>> {
        ready(self.spent_all_now(keys)).boxed()
    }
}

/// Why a chat's spend was not reserved.
#[derive(Debug, Clone)]
pub enum BudgetDenied {
    Spent(BudgetSpent),
    /// A user's, guest's or address's daily quota.
    Quota(QuotaSpent),
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

/// A daily quota that does not fit this chat: the sentence the chat window shows.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "You have used today's allowance of {limit} tokens ({whose}); it resets at {resets_at}. Try again then."
)]
pub struct QuotaSpent {
    pub limit: u64,
    pub whose: &'static str,
    pub resets_at: String,
    pub retry_after: Duration,
}

/// Whom a call is charged to besides the whole service.
#[derive(Debug, Clone, Copy, Default)]
pub struct Payer<'a> {
    pub session: Option<&'a str>,
    /// Who is chatting (verified, or as the body claims).
    pub user: Option<&'a UserIdentity>,
    /// The client's address as rate limits key it (an IPv6 client by its network).
    pub client: Option<IpAddr>,
}

/// A call's token counters besides the day's, each with the limit it counts against, made once
/// per call (and kept for a failover's second reservation): only those whose limit is set.
#[derive(Debug, Clone, Default)]
pub struct Accounts(Vec<(Arc<str>, Unit)>);

/// One day's counter keys (`{date}|usd`, `{date}|tokens`; a session's is `{date}|session|{id}`,
/// a quota's `{date}|user|{name}`, `{date}|guest|{address}`, `{date}|client|{address}`).
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

/// What a counter counts, and which limit it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Usd,
    Tokens,
    SessionTokens,
    UserTokens,
    GuestTokens,
    ClientTokens,
}

impl Unit {
    fn is_usd(self) -> bool {
        self == Self::Usd
    }
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

    /// The counters `payer` is charged to today, for the limits that are set: its session's, its
    /// user's or guest's (the key of its `Consumer`, which the consumers' table shares), its
    /// address's.
    pub fn accounts(&self, payer: Payer<'_>) -> Accounts {
        let limits = &self.limits;
        if limits.session_tokens.is_none() && !limits.quota.any() {
            return Accounts::default();
        }
        let day = self.keys().day;
        let mut accounts = Vec::with_capacity(3);
        let mut charge = |rest: &dyn std::fmt::Display, unit: Unit| {
            if self.limit(unit).is_some() {
                accounts.push((format!("{day}|{rest}").into(), unit));
            }
        };
        if let Some(id) = payer.session {
            charge(&format_args!("session|{id}"), Unit::SessionTokens);
        }
        if let Some(user) = payer.user {
            let consumer = Consumer::of(user, payer.client);
            let unit = match consumer.is_guest() {
                true => Unit::GuestTokens,
                false => Unit::UserTokens,
            };
            charge(&consumer.key(), unit);
        }
        if let Some(ip) = payer.client {
            charge(&format_args!("client|{ip}"), Unit::ClientTokens);
        }
        Accounts(accounts)
    }

    /// The limit a token counter of `unit` counts against (`None`: not set; USD has none here).
    fn limit(&self, unit: Unit) -> Option<u64> {
        let limits = &self.limits;
        match unit {
            Unit::Usd => None,
            Unit::Tokens => limits.daily_tokens,
            Unit::SessionTokens => limits.session_tokens,
            Unit::UserTokens => limits.quota.user,
            Unit::GuestTokens => limits.quota.guest,
            Unit::ClientTokens => limits.quota.client,
        }
    }

    /// Reserves `prompt_tokens` plus the most answer tokens up to `max_output` that every budget
    /// and quota has room for; refused only when not even `min_output` fits.
    pub async fn reserve(
        &self,
        accounts: &Accounts,
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
        let day_tokens = (keys.tokens.clone(), Unit::Tokens);
        for (key, unit) in std::iter::once(&day_tokens).chain(&accounts.0) {
            if let Some(cap) = self.limit(*unit) {
                charges.push(Charge {
                    key: key.clone(),
                    fixed: tokens,
                    per_output: 1.0,
                    cap: cap as f64,
                });
                units.push(*unit);
            }
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
            Err(BudgetRefusal::Over(i)) => Err(self.refusal(units[i])),
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
        let priced = reservation.changes.iter().any(|(_, _, unit)| unit.is_usd());
        let used = self.amounts(&reservation.model, actual, priced);
        let changes: Vec<(Arc<str>, f64)> = reservation
            .changes
            .into_iter()
            .map(|(key, reserved, unit)| {
                let real = if unit.is_usd() { used.0 } else { used.1 };
                (key, real - reserved)
            })
            .collect();
        self.store.adjust(&changes, reservation.place).await;
    }

    /// `budget` for `/api/openai/usage`, when any budget is set.
    pub async fn report(&self) -> Option<BudgetReport> {
        if !self.limits.any_budget() {
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

    /// The refusal for the limit `unit` that had no room: a budget's, or a quota's sentence.
    fn refusal(&self, unit: Unit) -> BudgetDenied {
        let limits = &self.limits;
        let midnight = self.next_midnight();
        let retry_after = (midnight - self.clock.now())
            .to_std()
            .unwrap_or(Duration::from_secs(1));
        let resets_at = timestamp(&midnight);
        let limit = self.limit(unit).unwrap_or_default();
        let quota = |whose| {
            BudgetDenied::Quota(QuotaSpent {
                limit,
                whose,
                resets_at: resets_at.clone(),
                retry_after,
            })
        };
        let which = match unit {
            Unit::UserTokens => return quota("per user"),
            Unit::GuestTokens => return quota("per guest"),
            Unit::ClientTokens => return quota("per address"),
            Unit::Usd => format!(
                "daily budget of ${:.2} (BUDGET_DAILY_USD)",
                limits.daily_usd.unwrap_or_default()
            ),
            Unit::SessionTokens => {
                format!("session's budget of {limit} tokens (BUDGET_SESSION_TOKENS)")
            }
            Unit::Tokens => format!("daily budget of {limit} tokens (BUDGET_DAILY_TOKENS)"),
        };
        BudgetDenied::Spent(BudgetSpent {
            which,
            resets_at,
            retry_after,
        })
    }

    /// Tokens left today of each `(consumer, limit)` quota (`Consumer::key`: the counter's key
    /// without its date), read in one look. Chats in progress hold their reservation.
    pub async fn quotas_left(&self, quotas: &[(&str, u64)]) -> Vec<u64> {
        let day = self.keys().day;
        let keys: Vec<String> = quotas
            .iter()
            .map(|(consumer, _)| format!("{day}|{consumer}"))
            .collect();
        let spent = self.store.spent_all(&keys).await;
        quotas
            .iter()
            .zip(spent)
            .map(|((_, limit), spent)| (*limit as f64 - spent).max(0.0).round() as u64)
            .collect()
    }

    /// Today's local date as the counters carry it (`2026-12-07`), made once a day.
    pub fn today(&self) -> Arc<str> {
        self.keys().day
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
        let store = MemoryBudgetStore::new(100, 100);
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

    /// 20,000 invented usernames through a store that keeps 100 quota counters: neither the
    /// day's counter nor a session's is pushed out, and the quota counters stay bounded.
    #[test]
    fn twenty_thousand_usernames_evict_only_the_oldest_quota_counters() {
        let store = MemoryBudgetStore::new(100, 100);
        store.adjust_now(&[("2026-12-07|session|s1".into(), 5.0)]);
        for i in 0..20_000 {
            let charges = [
                tokens("2026-12-07|tokens", 1.0, 1e12),
                tokens(&format!("2026-12-07|user|u{i}"), 1.0, 1_000.0),
            ];
            store.reserve_now(&charges, 0, 0).unwrap();
        }
        assert_eq!(store.spent_now("2026-12-07|tokens"), 20_000.0);
        assert_eq!(store.spent_now("2026-12-07|session|s1"), 5.0);
        let counters = store.counters.lock().unwrap();
        assert_eq!(counters.consumers.len(), 100);
        assert!(counters.consumers.contains_key("2026-12-07|user|u19999"));
        assert!(!counters.consumers.contains_key("2026-12-07|user|u0"));
    }

    #[test]
    fn counters_are_classed_by_the_word_after_the_date() {
        assert_eq!(key_class("2026-12-07|tokens"), KeyClass::Day);
        assert_eq!(key_class("2026-12-07|usd"), KeyClass::Day);
        assert_eq!(key_class("2026-12-07|session|a|user|b"), KeyClass::Session);
        assert_eq!(key_class("2026-12-07|user|x|session|y"), KeyClass::Consumer);
        assert_eq!(
            key_class("2026-12-07|guest|203.0.113.9"),
            KeyClass::Consumer
        );
        assert_eq!(key_class("2026-12-07|client|::1"), KeyClass::Consumer);
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

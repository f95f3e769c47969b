//! Who uses what today: tokens, requests and cost per user and per guest address, for the
//! dashboard's top consumers and `GET /api/openai/usage?username=…`. Kept per local day, in a
//! `ConsumerStore`: this process's (bounded by `QUOTA_MAX_TRACKED`, the oldest forgotten first)
//! or, with `STATE_URL`, Redis (exact across replicas).

use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, ready};
use indexmap::IndexMap;
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::QuotaLimits;
use crate::domain::pricing::Cost;
use crate::domain::{Consumer, TokenUsage};
use crate::services::guardrails::Budgets;

/// Rows in the dashboard's table.
pub const TOP: usize = 20;

/// One consumer's day.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ConsumerTally {
    pub tokens: u64,
    pub requests: u64,
    pub cost_usd: f64,
}

pub trait ConsumerStore: Send + Sync {
    /// Adds one call to `key`'s figures of `day`.
    fn record<'a>(&'a self, day: &'a str, key: &'a str, tally: ConsumerTally) -> BoxFuture<'a, ()>;
    /// The `n` largest by tokens, largest first.
    fn top<'a>(&'a self, day: &'a str, n: usize) -> BoxFuture<'a, Vec<(String, ConsumerTally)>>;
    /// One consumer's figures.
    fn one<'a>(&'a self, day: &'a str, key: &'a str) -> BoxFuture<'a, ConsumerTally>;
}

/// The in-process store: today's consumers only, at most `max`.
pub struct MemoryConsumerStore {
    day: Mutex<(String, IndexMap<String, ConsumerTally>)>,
    max: usize,
}

impl MemoryConsumerStore {
    pub fn new(max: usize) -> Self {
        Self {
            day: Mutex::default(),
            max: max.max(1),
        }
    }

    pub fn record_now(&self, day: &str, key: &str, tally: ConsumerTally) {
        let mut guard = self.day.lock().unwrap_or_else(|e| e.into_inner());
        let (today, map) = &mut *guard;
        if today != day {
            // A new day: the table shows today only, so yesterday's rows go (on Redis, rows of
            // yesterday not yet handed over at midnight are among them; quotas are unaffected).
            *today = day.to_string();
            map.clear();
        }
        if let Some(row) = map.get_mut(key) {
            row.tokens += tally.tokens;
            row.requests += tally.requests;
            row.cost_usd += tally.cost_usd;
            return;
        }
        if map.len() >= self.max {
            // A sixteenth at a time: one shift of the map per many newcomers, not per one.
            let drop = (self.max / 16).max(1).min(map.len());
            map.drain(..drop);
        }
        map.insert(key.to_string(), tally);
    }

    pub fn top_now(&self, day: &str, n: usize) -> Vec<(String, ConsumerTally)> {
        let guard = self.day.lock().unwrap_or_else(|e| e.into_inner());
        if guard.0 != day {
            return Vec::new();
        }
        let mut rows: Vec<(&String, &ConsumerTally)> = guard.1.iter().collect();
        let by_tokens = |a: &(&String, &ConsumerTally), b: &(&String, &ConsumerTally)| {
            b.1.tokens.cmp(&a.1.tokens).then_with(|| a.0.cmp(b.0))
        };
        if rows.len() > n && n > 0 {
            rows.select_nth_unstable_by(n - 1, by_tokens);
        }
        rows.truncate(n);
        rows.sort_by(by_tokens);
        rows.into_iter().map(|(k, t)| (k.clone(), *t)).collect()
    }

    /// Everything held, and the day it is of, leaving the store empty (a batch for Redis).
    pub fn take(&self) -> (String, Vec<(String, ConsumerTally)>) {
        let mut guard = self.day.lock().unwrap_or_else(|e| e.into_inner());
        let rows = std::mem::take(&mut guard.1).into_iter().collect();
        (guard.0.clone(), rows)
    }

    pub fn one_now(&self, day: &str, key: &str) -> ConsumerTally {
        let guard = self.day.lock().unwrap_or_else(|e| e.into_inner());
        match guard.0 == day {
            true => guard.1.get(key).copied().unwrap_or_default(),
            false => ConsumerTally::default(),
        }
    }
}

impl ConsumerStore for MemoryConsumerStore {
    fn record<'a>(&'a self, day: &'a str, key: &'a str, tally: ConsumerTally) -> BoxFuture<'a, ()> {
        self.record_now(day, key, tally);
        ready(()).boxed()
    }

    fn top<'a>(&'a self, day: &'a str, n: usize) -> BoxFuture<'a, Vec<(String, ConsumerTally)>> {
        ready(self.top_now(day, n)).boxed()
    }

    fn one<'a>(&'a self, day: &'a str, key: &'a str) -> BoxFuture<'a, ConsumerTally> {
        ready(self.one_now(day, key)).boxed()
    }
}

/// One row of the consumers' table.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerUsage {
    /// `user` or `guest`.
    pub kind: &'static str,
    /// The username, or a guest's address with its host part hidden (`203.0.113.*`).
    pub name: String,
    pub tokens: u64,
    pub requests: u64,
    pub cost_usd: f64,
    /// Tokens left of today's quota (`QUOTA_USER_DAILY_TOKENS` or `QUOTA_GUEST_DAILY_TOKENS`;
    /// `null`: none set). Chats in progress hold their reservation.
    pub quota_left: Option<u64>,
}

/// The consumers' figures, keyed by the same local day as the quota counters (`Budgets::today`),
/// so the table and the quota left always speak of one day.
pub struct Consumers {
    store: Arc<dyn ConsumerStore>,
    budgets: Arc<Budgets>,
    quota: QuotaLimits,
}

impl Consumers {
    pub fn new(store: Arc<dyn ConsumerStore>, budgets: Arc<Budgets>, quota: QuotaLimits) -> Self {
        Self {
            store,
            budgets,
            quota,
        }
    }

    fn today(&self) -> Arc<str> {
        self.budgets.today()
    }

    /// Counts one call of `consumer`'s, priced by the usage statistics (`UsageStats::record`).
    pub async fn record(&self, consumer: &Consumer, usage: &TokenUsage, cost: &Cost) {
        let tally = ConsumerTally {
            tokens: usage.prompt_tokens + usage.completion_tokens,
            requests: 1,
            cost_usd: cost.prompt + cost.completion,
        };
        let day = self.today();
        self.store.record(&day, consumer.key(), tally).await;
    }

    /// Today's `TOP` consumers by tokens.
    pub async fn top(&self) -> Vec<ConsumerUsage> {
        let day = self.today();
        let rows = self.store.top(&day, TOP).await;
        self.rows(rows).await
    }

    /// One signed-in user's figures today (always a row: zeros for a user not seen today).
    pub async fn user(&self, username: &str) -> Option<ConsumerUsage> {
        let consumer = Consumer::user(username);
        let tally = self.store.one(&self.today(), consumer.key()).await;
        self.rows(vec![(consumer.key().to_string(), tally)])
            .await
            .pop()
    }

    /// The answer's rows, with the quota each has left (read in one look).
    async fn rows(&self, rows: Vec<(String, ConsumerTally)>) -> Vec<ConsumerUsage> {
        let limit = |kind: &str| match kind {
            "user" => self.quota.user,
            _ => self.quota.guest,
        };
        let labelled: Vec<_> = rows
            .iter()
            .map(|(key, tally)| (key, Consumer::label(key), tally))
            .collect();
        let quotas: Vec<(&str, u64)> = labelled
            .iter()
            .filter_map(|(key, (kind, _), _)| Some((key.as_str(), limit(kind)?)))
            .collect();
        let mut left = self.budgets.quotas_left(&quotas).await.into_iter();
        labelled
            .into_iter()
            .map(|(_, (kind, name), tally)| ConsumerUsage {
                kind,
                name,
                tokens: tally.tokens,
                requests: tally.requests,
                cost_usd: (tally.cost_usd * 10_000.0).round() / 10_000.0,
                quota_left: limit(kind).and_then(|_| left.next()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(tokens: u64) -> ConsumerTally {
        ConsumerTally {
            tokens,
            requests: 1,
            cost_usd: 0.0,
        }
    }

    #[test]
    fn the_top_is_by_tokens_and_the_store_is_bounded() {
        let store = MemoryConsumerStore::new(64);
        for i in 0..1_000u64 {
            store.record_now("d", &format!("user|u{i}"), t(i));
        }
        let top = store.top_now("d", 3);
        let names: Vec<&str> = top.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["user|u999", "user|u998", "user|u997"]);
        assert!(store.day.lock().unwrap().1.len() <= 64);
        // A new day starts empty.
        assert!(store.top_now("e", 3).is_empty());
        store.record_now("e", "user|a", t(5));
        store.record_now("e", "user|a", t(5));
        assert_eq!(store.one_now("e", "user|a").tokens, 10);
        assert_eq!(store.one_now("e", "user|a").requests, 2);
    }
}

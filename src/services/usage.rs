//! Usage statistics since start-up (contract §8): totals, per model, per session, with costs.
//!
//! One `std::sync::Mutex` guards a few counters; it is held for a handful of additions and never
//! across an `.await`, so it costs nanoseconds even with many chats at once.
//!
//! Everything here is bounded, because clients choose both model names and session ids:
//! per-session ledgers by count (oldest dropped first), and models by `MAX_MODELS` (2026-11
//! amendment): the first 256 distinct models get a row of their own, every later one (and any
//! name longer than a real model's) is summed under `"other"`. Each chat's cost is computed when it is recorded, so the sums (and `"other"`'s
//! cost) stay exact however the rows are merged.

use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Value, json};

use crate::services::openai::TokenUsage;
use crate::services::pricing::PriceTable;

/// Models with a row of their own in `by_model`; later ones go under `OTHER`.
pub const MAX_MODELS: usize = 256;
/// Longer names (no real model's) are summed under `OTHER` too, so the answer stays small:
/// at most 256 × 128 bytes of names, in `by_model` and `unpriced_models` each.
pub const MAX_MODEL_NAME_BYTES: usize = 128;
/// The `by_model` row of the models past `MAX_MODELS`.
pub const OTHER: &str = "other";

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    prompt: u64,
    completion: u64,
    total: u64,
    cached: u64,
    requests: u64,
    prompt_cost: f64,
    completion_cost: f64,
    /// Some of these tokens were priced at the fallback rate.
    unpriced: bool,
}

impl Tally {
    fn add(&mut self, usage: &TokenUsage, cost: &crate::services::pricing::Cost) {
        self.prompt += usage.prompt_tokens;
        self.completion += usage.completion_tokens;
        self.total += usage.total_tokens;
        self.cached += usage.cached_tokens;
        self.requests += 1;
        self.prompt_cost += cost.prompt;
        self.completion_cost += cost.completion;
        self.unpriced |= !cost.priced;
    }

    fn merge(&mut self, other: &Tally) {
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.total += other.total;
        self.cached += other.cached;
        self.requests += other.requests;
        self.prompt_cost += other.prompt_cost;
        self.completion_cost += other.completion_cost;
        self.unpriced |= other.unpriced;
    }
}

/// Figures for everything or for one session. Model names are shared with the global ledger
/// (`Arc<str>`), so a session's rows cost no copies of the names.
#[derive(Debug, Default)]
struct Ledger {
    by_model: IndexMap<Arc<str>, Tally>,
    other: Tally,
    latest_model: Option<Arc<str>>,
}

impl Ledger {
    fn add(
        &mut self,
        slot: Option<&Arc<str>>,
        model: &Arc<str>,
        usage: &TokenUsage,
        cost: &crate::services::pricing::Cost,
    ) {
        match slot {
            Some(name) => match self.by_model.get_mut(name) {
                Some(tally) => tally.add(usage, cost),
                None => {
                    let mut tally = Tally::default();
                    tally.add(usage, cost);
                    self.by_model.insert(name.clone(), tally);
                }
            },
            None => self.other.add(usage, cost),
        }
        if self.latest_model.as_ref() != Some(model) {
            self.latest_model = Some(model.clone());
        }
    }
}

#[derive(Debug, Default)]
struct State {
    all: Ledger,
    sessions: IndexMap<String, Ledger>,
}

pub struct UsageStats {
    state: Mutex<State>,
    pricing: PriceTable,
    default_model: String,
    max_sessions: usize,
}

#[derive(Debug, Serialize)]
pub struct ModelUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens served from OpenAI's prompt cache (priced at the cached rate).
    pub cached_tokens: u64,
    pub request_count: u64,
    pub cost_usd: f64,
    /// False when the price table does not know the model (priced at the fallback rate).
    pub priced: bool,
}

pub const USAGE_DASHBOARD_URL: &str = "https://platform.openai.com/account/usage";
pub const BILLING_DASHBOARD_URL: &str = "https://platform.openai.com/account/billing";
const NOTE: &str =
    "For full account usage and billing credit balance, visit the OpenAI Billing Dashboard";

impl UsageStats {
    pub fn new(pricing: PriceTable, default_model: &str, max_sessions: usize) -> Self {
        Self {
            state: Mutex::default(),
            pricing,
            default_model: default_model.to_string(),
            max_sessions,
        }
    }

    /// Counts one successful chat.
    pub fn record(&self, session_id: Option<&str>, model: &str, usage: &TokenUsage) {
        let cost = self.pricing.cost(
            model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        );
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        // The model's own row if it has one or there is room for it; else `other`.
        let slot: Option<Arc<str>> = match state.all.by_model.get_key_value(model) {
            Some((name, _)) => Some(name.clone()),
            None if state.all.by_model.len() < MAX_MODELS
                && model.len() <= MAX_MODEL_NAME_BYTES =>
            {
                Some(Arc::from(model))
            }
            None => None,
        };
        let name = slot
            .clone()
            .unwrap_or_else(|| match &state.all.latest_model {
                Some(latest) if &**latest == model => latest.clone(),
                _ => Arc::from(model),
            });
        state.all.add(slot.as_ref(), &name, usage, &cost);
        if let Some(id) = session_id {
            // Look up before inserting: `entry` would allocate the key on every chat.
            if let Some(ledger) = state.sessions.get_mut(id) {
                ledger.add(slot.as_ref(), &name, usage, &cost);
            } else {
                if state.sessions.len() >= self.max_sessions {
                    state.sessions.shift_remove_index(0);
                }
                let mut ledger = Ledger::default();
                ledger.add(slot.as_ref(), &name, usage, &cost);
                state.sessions.insert(id.to_string(), ledger);
            }
        }
    }

    /// The `/api/openai/usage` answer, for everything or for one session.
    pub fn report(&self, session_id: Option<&str>, account_info: Value) -> Value {
        let (rows, latest) = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let ledger = match session_id {
                Some(id) => state.sessions.get(id),
                None => Some(&state.all),
            };
            match ledger {
                Some(l) => (rows_of(l), l.latest_model.clone()),
                None => (Vec::new(), None),
            }
        };
        let mut total = Tally::default();
        let mut by_model = IndexMap::with_capacity(rows.len());
        let mut unpriced = Vec::new();
        for (model, tally) in rows {
            total.merge(&tally);
            if tally.unpriced {
                unpriced.push(model.clone());
            }
            by_model.insert(
                model,
                ModelUsage {
                    prompt_tokens: tally.prompt,
                    completion_tokens: tally.completion,
                    total_tokens: tally.total,
                    cached_tokens: tally.cached,
                    request_count: tally.requests,
                    cost_usd: round4(tally.prompt_cost + tally.completion_cost),
                    priced: !tally.unpriced,
                },
            );
        }
        let latest = latest.map_or_else(|| self.default_model.clone(), |m| m.to_string());
        let mut report = json!({
            "total_prompt_tokens": total.prompt,
            "total_completion_tokens": total.completion,
            "total_tokens": total.total,
            "request_count": total.requests,
            "model": latest,
            "estimated_cost_usd": round4(total.prompt_cost + total.completion_cost),
            "prompt_cost_usd": round4(total.prompt_cost),
            "completion_cost_usd": round4(total.completion_cost),
            "account_info": account_info,
            "billing_credit_balance": null,
            "usage_dashboard_url": USAGE_DASHBOARD_URL,
            "billing_dashboard_url": BILLING_DASHBOARD_URL,
            "note": NOTE,
            "by_model": by_model,
            "unpriced_models": unpriced,
        });
        if let Some(id) = session_id {
            report["session_id"] = json!(id);
        }
        report
    }
}

/// A ledger's rows, with `other` last; a model that is itself named "other" shares its row.
fn rows_of(ledger: &Ledger) -> Vec<(String, Tally)> {
    let mut rows: Vec<(String, Tally)> = ledger
        .by_model
        .iter()
        .map(|(m, t)| (m.to_string(), *t))
        .collect();
    if ledger.other.requests > 0 {
        match rows.iter_mut().find(|(m, _)| m == OTHER) {
            Some((_, tally)) => tally.merge(&ledger.other),
            None => rows.push((OTHER.to_string(), ledger.other)),
        }
    }
    rows
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(p: u64, c: u64) -> TokenUsage {
        TokenUsage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            cached_tokens: 0,
        }
    }

    fn stats(max_sessions: usize) -> UsageStats {
        UsageStats::new(
            PriceTable::load(None).unwrap(),
            "gpt-3.5-turbo",
            max_sessions,
        )
    }

    #[test]
    fn cost_is_summed_per_model_actually_used() {
        let stats = stats(10);
        stats.record(None, "gpt-4", &usage(1_000_000, 0)); // $30
        stats.record(None, "gpt-3.5-turbo", &usage(1_000_000, 1_000_000)); // $0.5 + $1.5
        let r = stats.report(None, json!({}));
        assert_eq!(r["estimated_cost_usd"], 32.0);
        assert_eq!(r["prompt_cost_usd"], 30.5);
        assert_eq!(r["model"], "gpt-3.5-turbo", "latest model");
        assert_eq!(r["request_count"], 2);
        assert_eq!(r["by_model"]["gpt-4"]["cost_usd"], 30.0);
    }

    #[test]
    fn session_view_and_bound() {
        let stats = stats(2);
        stats.record(Some("a"), "gpt-4o", &usage(10, 5));
        stats.record(Some("b"), "gpt-4o", &usage(1, 1));
        stats.record(Some("c"), "gpt-4o", &usage(1, 1));
        assert_eq!(
            stats.report(Some("a"), json!({}))["request_count"],
            0,
            "oldest session forgotten"
        );
        assert_eq!(stats.report(Some("c"), json!({}))["total_tokens"], 2);
        assert_eq!(stats.report(None, json!({}))["total_tokens"], 19);
        assert_eq!(
            stats.report(Some("zzz"), json!({}))["model"],
            "gpt-3.5-turbo"
        );
    }

    #[test]
    fn unknown_models_are_flagged() {
        let stats = stats(2);
        stats.record(None, "my-local-llama", &usage(1000, 1000));
        let r = stats.report(None, json!({}));
        assert_eq!(r["unpriced_models"], json!(["my-local-llama"]));
        assert_eq!(r["by_model"]["my-local-llama"]["priced"], false);
    }

    #[test]
    fn models_past_the_bound_are_summed_under_other_with_exact_totals() {
        let stats = stats(10);
        for i in 0..MAX_MODELS + 50 {
            stats.record(Some("s"), &format!("m{i}"), &usage(1, 2));
        }
        stats.record(None, "gpt-4", &usage(1_000_000, 0)); // past the bound: $30 under other
        for view in [
            stats.report(None, json!({})),
            stats.report(Some("s"), json!({})),
        ] {
            let by_model = view["by_model"].as_object().unwrap();
            assert_eq!(by_model.len(), MAX_MODELS + 1, "256 rows and other");
            assert_eq!(
                by_model
                    .values()
                    .map(|r| r["request_count"].as_u64().unwrap())
                    .sum::<u64>(),
                view["request_count"].as_u64().unwrap()
            );
            assert!(view["unpriced_models"].as_array().unwrap().len() <= MAX_MODELS + 1);
        }
        let all = stats.report(None, json!({}));
        assert_eq!(all["request_count"], MAX_MODELS as u64 + 51);
        assert_eq!(
            all["total_tokens"],
            3 * (MAX_MODELS as u64 + 50) + 1_000_000
        );
        assert_eq!(all["by_model"][OTHER]["request_count"], 51);
        assert!(all["by_model"][OTHER]["cost_usd"].as_f64().unwrap() >= 30.0);
        assert_eq!(all["model"], "gpt-4", "the latest model, even under other");
    }
}

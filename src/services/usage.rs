//! Usage statistics since start-up (contract §8): totals, per model, per session, with costs.
//!
//! One `std::sync::Mutex` guards a few counters; it is held for a handful of additions and never
//! across an `.await`, so it costs nanoseconds even with many chats at once. Per-session ledgers
//! are bounded (oldest dropped first) so memory does not grow with the number of sessions seen.

use std::sync::Mutex;

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Value, json};

use crate::services::openai::TokenUsage;
use crate::services::pricing::PriceTable;

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    prompt: u64,
    completion: u64,
    total: u64,
    requests: u64,
}

impl Tally {
    fn add(&mut self, usage: &TokenUsage) {
        self.prompt += usage.prompt_tokens;
        self.completion += usage.completion_tokens;
        self.total += usage.total_tokens;
        self.requests += 1;
    }
}

#[derive(Debug, Default)]
struct Ledger {
    by_model: IndexMap<String, Tally>,
    latest_model: Option<String>,
}

impl Ledger {
    fn add(&mut self, model: &str, usage: &TokenUsage) {
        match self.by_model.get_mut(model) {
            Some(tally) => tally.add(usage),
            None => {
                let mut tally = Tally::default();
                tally.add(usage);
                self.by_model.insert(model.to_string(), tally);
            }
        }
        if self.latest_model.as_deref() != Some(model) {
            self.latest_model = Some(model.to_string());
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
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.all.add(model, usage);
        if let Some(id) = session_id {
            // Look up before inserting: `entry` would allocate the key on every chat.
            if let Some(ledger) = state.sessions.get_mut(id) {
                ledger.add(model, usage);
            } else {
                if state.sessions.len() >= self.max_sessions {
                    state.sessions.shift_remove_index(0);
                }
                let mut ledger = Ledger::default();
                ledger.add(model, usage);
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
                Some(l) => (
                    l.by_model
                        .iter()
                        .map(|(m, t)| (m.clone(), *t))
                        .collect::<Vec<_>>(),
                    l.latest_model.clone(),
                ),
                None => (Vec::new(), None),
            }
        };
        let (mut total, mut prompt_cost, mut completion_cost) = (Tally::default(), 0.0, 0.0);
        let mut by_model = IndexMap::new();
        let mut unpriced = Vec::new();
        for (model, tally) in rows {
            let (p_cost, c_cost, priced) =
                self.pricing.cost(&model, tally.prompt, tally.completion);
            total.prompt += tally.prompt;
            total.completion += tally.completion;
            total.total += tally.total;
            total.requests += tally.requests;
            prompt_cost += p_cost;
            completion_cost += c_cost;
            if !priced {
                unpriced.push(model.clone());
            }
            by_model.insert(
                model,
                ModelUsage {
                    prompt_tokens: tally.prompt,
                    completion_tokens: tally.completion,
                    total_tokens: tally.total,
                    request_count: tally.requests,
                    cost_usd: round4(p_cost + c_cost),
                    priced,
                },
            );
        }
        let mut report = json!({
            "total_prompt_tokens": total.prompt,
            "total_completion_tokens": total.completion,
            "total_tokens": total.total,
            "request_count": total.requests,
            "model": latest.unwrap_or_else(|| self.default_model.clone()),
            "estimated_cost_usd": round4(prompt_cost + completion_cost),
            "prompt_cost_usd": round4(prompt_cost),
            "completion_cost_usd": round4(completion_cost),
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
        }
    }

    #[test]
    fn cost_is_summed_per_model_actually_used() {
        let stats = UsageStats::new(PriceTable::load(None).unwrap(), "gpt-3.5-turbo", 10);
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
        let stats = UsageStats::new(PriceTable::load(None).unwrap(), "gpt-3.5-turbo", 2);
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
        let stats = UsageStats::new(PriceTable::load(None).unwrap(), "gpt-3.5-turbo", 2);
        stats.record(None, "my-local-llama", &usage(1000, 1000));
        let r = stats.report(None, json!({}));
        assert_eq!(r["unpriced_models"], json!(["my-local-llama"]));
        assert_eq!(r["by_model"]["my-local-llama"]["priced"], false);
    }
}

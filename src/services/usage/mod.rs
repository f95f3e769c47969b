//! Usage statistics since start-up (contract §8): totals, per model, per session, with costs.
//! Each chat is priced when it is recorded; the figures live in a `UsageStore` (in-process by
//! default), and this service turns them into the `/api/openai/usage` answer.

mod activity;
mod store;

use std::sync::Arc;

use indexmap::IndexMap;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::TokenUsage;
use crate::domain::pricing::{Cost, PriceTable};
use crate::services::consumers::ConsumerUsage;
use crate::services::guardrails::BudgetReport;

pub use activity::ChatsPerMinute;
pub use store::{
    Figures, MAX_MODEL_NAME_BYTES, MAX_MODELS, MemoryUsageStore, OTHER, Tally, UsageKind,
    UsageStore,
};

pub struct UsageStats {
    store: Arc<dyn UsageStore>,
    pricing: PriceTable,
    default_model: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
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
    pub fn new(store: Arc<dyn UsageStore>, pricing: PriceTable, default_model: &str) -> Self {
        Self {
            store,
            pricing,
            default_model: default_model.to_string(),
        }
    }

    /// Counts one successful chat; what it cost, priced once for everything that needs it.
    pub async fn record(&self, session_id: Option<&str>, model: &str, usage: &TokenUsage) -> Cost {
        self.record_kind(UsageKind::Chat, session_id, model, usage)
            .await
    }

    /// Counts a call of another kind: a connection test, or a cut-short stream's estimate.
    pub async fn record_kind(
        &self,
        kind: UsageKind,
        session_id: Option<&str>,
        model: &str,
        usage: &TokenUsage,
    ) -> Cost {
        let cost = self.pricing.cost(
            model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        );
        self.store
            .record(kind, session_id, model, usage, &cost)
            .await;
        cost
    }

    /// The whole service's chat rows (for the metrics), bounded like `by_model`.
    pub async fn figures(&self) -> Figures {
        self.store.figures(None).await
    }

    /// A summary of the tests' or the estimates' ledger.
    async fn side_summary(&self, kind: UsageKind) -> SideUsage {
        let figures = self.store.side_figures(kind).await;
        let mut total = Tally::default();
        for (_, tally) in &figures.rows {
            total.merge(tally);
        }
        SideUsage {
            prompt_tokens: total.prompt,
            completion_tokens: total.completion,
            total_tokens: total.prompt + total.completion,
            request_count: total.requests,
            cost_usd: round4(total.prompt_cost + total.completion_cost),
            estimated: (kind == UsageKind::Estimated).then_some(true),
        }
    }

    /// The `/api/openai/usage` answer, for everything or for one session.
    pub async fn report(&self, session_id: Option<&str>, account_info: AccountInfo) -> UsageReport {
        let Figures { rows, latest_model } = self.store.figures(session_id).await;
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
        // Apart from the contract's totals, which stay chats as OpenAI reported them.
        let (test_usage, estimated_usage) = match session_id {
            Some(_) => (None, None),
            None => (
                Some(self.side_summary(UsageKind::Test).await),
                Some(self.side_summary(UsageKind::Estimated).await),
            ),
        };
        UsageReport {
            total_prompt_tokens: total.prompt,
            total_completion_tokens: total.completion,
            total_tokens: total.total,
            request_count: total.requests,
            model: latest_model.unwrap_or_else(|| self.default_model.clone()),
            estimated_cost_usd: round4(total.prompt_cost + total.completion_cost),
            prompt_cost_usd: round4(total.prompt_cost),
            completion_cost_usd: round4(total.completion_cost),
            account_info,
            billing_credit_balance: None,
            usage_dashboard_url: USAGE_DASHBOARD_URL,
            billing_dashboard_url: BILLING_DASHBOARD_URL,
            note: NOTE,
            by_model,
            unpriced_models: unpriced,
            session_id: session_id.map(str::to_owned),
            test_usage,
            estimated_usage,
            budget: None,
            by_upstream: None,
            user: None,
        }
    }
}

/// `GET /api/openai/usage`'s answer (contract §8), for everything or for one session.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub total_prompt_tokens: u64,
    pub total_completion_tokens: u64,
    pub total_tokens: u64,
    pub request_count: u64,
    /// The model of the latest chat counted, else the configured one.
    pub model: String,
    pub estimated_cost_usd: f64,
    pub prompt_cost_usd: f64,
    pub completion_cost_usd: f64,
    pub account_info: AccountInfo,
    /// Always `null` (OpenAI has no API for it), as in the Flask service.
    pub billing_credit_balance: Option<f64>,
    pub usage_dashboard_url: &'static str,
    pub billing_dashboard_url: &'static str,
    pub note: &'static str,
    #[schema(value_type = std::collections::BTreeMap<String, ModelUsage>)]
    pub by_model: IndexMap<String, ModelUsage>,
    /// Models the price table does not know (priced at the fallback rate).
    pub unpriced_models: Vec<String>,
    /// Only with `?session_id=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Only without `?session_id=`: `/api/openai/test` calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_usage: Option<SideUsage>,
    /// Only without `?session_id=`: chats whose usage was estimated (no `usage` from upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_usage: Option<SideUsage>,
    /// Only when a budget is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetReport>,
    /// Only with fallback upstreams: this replica's chats by the upstream that answered them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::BTreeMap<String, UpstreamUsage>>)]
    pub by_upstream: Option<IndexMap<String, UpstreamUsage>>,
    /// Only with `?username=`: that user's usage today (behind `ADMIN_TOKEN` when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<ConsumerUsage>,
}

/// One upstream's share (`by_upstream`), since start-up, on this replica.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct UpstreamUsage {
    /// Chats it answered.
    pub request_count: u64,
    /// Attempts that failed over to the next upstream (or ended the chat).
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The key in use: its 7-character prefix only (`null` for a key of 7 characters or fewer).
/// `{}` when no key is configured.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum AccountInfo {
    Active(ActiveAccount),
    NoKey(NoAccount),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActiveAccount {
    pub api_key_prefix: Option<String>,
    pub model: String,
    /// `active`.
    pub status: &'static str,
}

/// `{}`: no key configured.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoAccount {}

/// Usage kept apart from the contract's totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct SideUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub request_count: u64,
    pub cost_usd: f64,
    /// `true` for estimated usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated: Option<bool>,
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn report(stats: &UsageStats, session: Option<&str>) -> Value {
        serde_json::to_value(now(stats.report(session, AccountInfo::NoKey(NoAccount {})))).unwrap()
    }

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
            Arc::new(MemoryUsageStore::new(max_sessions)),
            PriceTable::load(None).unwrap(),
            "gpt-3.5-turbo",
        )
    }

    /// The in-process store answers at once; these tests drive its futures without a runtime.
    fn now<T>(future: impl std::future::Future<Output = T>) -> T {
        futures_util::FutureExt::now_or_never(future).expect("the in-process store never waits")
    }

    #[test]
    fn cost_is_summed_per_model_actually_used() {
        let stats = stats(10);
        now(stats.record(None, "gpt-4", &usage(1_000_000, 0))); // $30
        now(stats.record(None, "gpt-3.5-turbo", &usage(1_000_000, 1_000_000))); // $0.5 + $1.5
        let r = report(&stats, None);
        assert_eq!(r["estimated_cost_usd"], 32.0);
        assert_eq!(r["prompt_cost_usd"], 30.5);
        assert_eq!(r["model"], "gpt-3.5-turbo", "latest model");
        assert_eq!(r["request_count"], 2);
        assert_eq!(r["by_model"]["gpt-4"]["cost_usd"], 30.0);
    }

    #[test]
    fn session_view_and_bound() {
        let stats = stats(2);
        now(stats.record(Some("a"), "gpt-4o", &usage(10, 5)));
        now(stats.record(Some("b"), "gpt-4o", &usage(1, 1)));
        now(stats.record(Some("c"), "gpt-4o", &usage(1, 1)));
        assert_eq!(
            report(&stats, Some("a"))["request_count"],
            0,
            "oldest session forgotten"
        );
        assert_eq!(report(&stats, Some("c"))["total_tokens"], 2);
        assert_eq!(report(&stats, None)["total_tokens"], 19);
        assert_eq!(report(&stats, Some("zzz"))["model"], "gpt-3.5-turbo");
    }

    #[test]
    fn unknown_models_are_flagged() {
        let stats = stats(2);
        now(stats.record(None, "my-local-llama", &usage(1000, 1000)));
        let r = report(&stats, None);
        assert_eq!(r["unpriced_models"], json!(["my-local-llama"]));
        assert_eq!(r["by_model"]["my-local-llama"]["priced"], false);
    }

    #[test]
    fn models_past_the_bound_are_summed_under_other_with_exact_totals() {
        let stats = stats(10);
        for i in 0..MAX_MODELS + 50 {
            now(stats.record(Some("s"), &format!("m{i}"), &usage(1, 2)));
        }
        now(stats.record(None, "gpt-4", &usage(1_000_000, 0))); // past the bound: $30 under other
        for view in [report(&stats, None), report(&stats, Some("s"))] {
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
        let all = report(&stats, None);
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

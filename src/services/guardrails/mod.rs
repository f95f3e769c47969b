//! Guardrails for a public chat endpoint (contract §12, §13): which models, how often per client,
//! how much per day and per session, each user's, guest's and address's fair share (quotas), and,
//! with `AUTH_JWT_*`, who is chatting as the site's token proves. Every one is off or permissive
//! by default, so the website works unchanged. Counters live behind store traits (`RateLimitStore`, `BudgetStore`), so a shared
//! store can enforce them across replicas.

mod admission;
pub mod budget;
pub mod models;
pub mod rate;

pub use admission::Admission;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

pub use budget::{
    Accounts, BudgetDenied, BudgetRefusal, BudgetReport, BudgetSpent, BudgetStore, Budgets, Charge,
    MemoryBudgetStore, Payer, QuotaSpent, Reservation,
};
pub use models::ModelPolicy;
pub use rate::{Limited, MemoryRateLimits, RateLimitStore, RateRefusal};

use crate::config::RateLimits;
use crate::domain::UserIdentity;
use crate::domain::pricing::PriceTable;
use crate::domain::tokens::{PER_REPLY, TokenCounter, prompt_upper_bound};
use crate::domain::{ChatMessage, ChatRequest, InputError, Role};
use crate::services::identity::{AuthError, SiteIdentity};
use std::net::IpAddr;
use std::num::NonZeroU32;
use tokio_util::task::TaskTracker;

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
    /// A user's, guest's or address's daily quota (429).
    #[error(transparent)]
    Quota(#[from] QuotaSpent),
    /// `AUTH_JWT_*` is set and the request's token is missing or not valid (401).
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// Past `MAX_INPUT_CHARS`: the sentence names the part to shorten (413).
    #[error(transparent)]
    InputTooLarge(InputError),
    /// The current message (with its attachments and the system messages) and its answer do
    /// not fit the model's context window even without history (413).
    #[error(
        "This message is too long for {model}: with its answer it needs {needed} tokens, and the model's context window is {window} tokens. Shorten the message or its attachments."
    )]
    TooLongForModel {
        model: String,
        window: u64,
        needed: u64,
    },
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
            Self::ModelNotAllowed { .. }
            | Self::InputTooLarge(_)
            | Self::TooLongForModel { .. }
            | Self::Unauthorized(_) => None,
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            Self::Budget(b) => Some(b.retry_after),
            Self::Quota(q) => Some(q.retry_after),
            Self::StateUnavailable => Some(Duration::from_secs(2)),
        }
    }
}

/// Whole seconds, rounded up, at least one.
pub fn retry_secs(wait: &Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Refusals since start-up, by guardrail; counted here only, read through `refusal_counts`.
#[derive(Debug, Default)]
struct Refusals {
    model: AtomicU64,
    rate_limit: AtomicU64,
    budget: AtomicU64,
    quota: AtomicU64,
    input_too_large: AtomicU64,
    admin_token: AtomicU64,
    auth_token: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefusalCounts {
    pub model: u64,
    pub rate_limit: u64,
    pub budget: u64,
    pub quota: u64,
    pub input_too_large: u64,
    pub admin_token: u64,
    pub auth_token: u64,
}

impl Refusals {
    fn snapshot(&self) -> RefusalCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RefusalCounts {
            model: get(&self.model),
            rate_limit: get(&self.rate_limit),
            budget: get(&self.budget),
            quota: get(&self.quota),
            input_too_large: get(&self.input_too_large),
            admin_token: get(&self.admin_token),
            auth_token: get(&self.auth_token),
        }
    }
}

/// The one door to OpenAI: `check_rate` on a request's head (`http::guards::RateChecked`), then
/// `admit_chat` / `admit_test` (size, model, budget reservation) for the call itself.
pub struct Guardrails {
    models: ModelPolicy,
    rate: Arc<dyn RateLimitStore>,
    rate_limits: RateLimits,
    budgets: Arc<Budgets>,
    limits: CallLimits,
    pricing: PriceTable,
    tokens: Arc<TokenCounter>,
    refusals: Refusals,
    /// Where an admission dropped unsettled settles (the application's background tasks).
    tasks: TaskTracker,
    /// `AUTH_JWT_*`: who is chatting is what the site signed.
    identity: Option<SiteIdentity>,
}

/// What one call may be: its input (`MAX_INPUT_CHARS`), its output cap (`Config::output_cap`)
/// and the least answer a budget must leave room for (`OPENAI_MIN_OUTPUT_TOKENS`).
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub max_input_chars: usize,
    pub output_cap: Option<u32>,
    pub min_output: u32,
    /// `HISTORY_TRIM=auto`.
    pub history_trim: bool,
}

/// Prompts up to this many bytes are counted where they are (microseconds); larger ones on a
/// blocking thread.
const COUNT_INLINE_BYTES: usize = 64 * 1024;

/// `/api/openai/test`'s own cap: a connection test needs a word, not an essay.
pub const TEST_OUTPUT_TOKENS: u64 = 16;

impl Guardrails {
    pub fn new(
        models: ModelPolicy,
        rate: Arc<dyn RateLimitStore>,
        rate_limits: RateLimits,
        budgets: Arc<Budgets>,
        limits: CallLimits,
        pricing: PriceTable,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            models,
            rate,
            rate_limits,
            budgets,
            limits,
            pricing,
            tokens: Arc::default(),
            refusals: Refusals::default(),
            tasks,
            identity: None,
        }
    }

    /// Chats and sessions need the site's token (`AUTH_JWT_*`).
    pub fn with_identity(mut self, identity: SiteIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The algorithm the site's tokens must be signed with, when `AUTH_JWT_*` is set.
    pub fn identity_algorithm(&self) -> Option<&'static str> {
        self.identity.as_ref().map(SiteIdentity::algorithm)
    }

    /// With `AUTH_JWT_*` set: the identity the request's `Authorization` header proves, or the
    /// 401. Without: `None` (the body's fields count, unverified).
    pub fn verify(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<Option<UserIdentity>, GuardrailError> {
        let Some(identity) = &self.identity else {
            return Ok(None);
        };
        identity.verify(authorization).map(Some).map_err(|e| {
            self.refusals.auth_token.fetch_add(1, Ordering::Relaxed);
            e.into()
        })
    }

    /// The budget and quota counters (the consumers' table reads what quota is left).
    pub fn budgets(&self) -> Arc<Budgets> {
        self.budgets.clone()
    }

    /// The key a client's rate limits and quotas count against (`rate_key`).
    pub fn client_key(&self, client: IpAddr) -> IpAddr {
        rate_key(client, self.rate_limits.ipv6_prefix)
    }

    /// Refusals since start-up, by guardrail (`/metrics`, `/api/dashboard`).
    pub fn refusal_counts(&self) -> RefusalCounts {
        self.refusals.snapshot()
    }

    /// A request without the admin token was refused (`http::guards::AdminAccess`).
    pub fn count_admin_token_refusal(&self) {
        self.refusals.admin_token.fetch_add(1, Ordering::Relaxed);
    }

    /// `budget` for `/api/openai/usage`, when any budget is set.
    pub async fn budget_report(&self) -> Option<BudgetReport> {
        self.budgets.report().await
    }

    /// A chat, after its client passed `check_rate`: its size (`MAX_INPUT_CHARS`), its model,
    /// its fit in the model's context window (`HISTORY_TRIM`: the oldest turns dropped from
    /// `request`), and its budget reservation, in that order. The `Admission` settles itself
    /// however it ends.
    pub async fn admit_chat(
        &self,
        request: &mut ChatRequest,
        session: Option<&str>,
    ) -> Result<Admission, GuardrailError> {
        let accounts = self.budgets.accounts(Payer {
            session,
            user: Some(&request.user),
            client: request.client,
        });
        if let Err(e) = request.check_size(self.limits.max_input_chars) {
            self.refusals
                .input_too_large
                .fetch_add(1, Ordering::Relaxed);
            return Err(GuardrailError::InputTooLarge(e));
        }
        self.check_model(&request.model)?;
        let cap = self.limits.output_cap.map(u64::from);
        // Each text is counted once, and only when something needs the count.
        let mut counts = None;
        let trimmed = self
            .fit_window(request, cap, &mut counts)
            .await
            .inspect_err(|_| {
                self.refusals
                    .input_too_large
                    .fetch_add(1, Ordering::Relaxed);
            })?;
        let prompt = match (self.budgets.any(), counts) {
            (false, _) => None,
            (true, Some(counts)) => Some(PER_REPLY + counts.iter().sum::<u64>()),
            (true, None) => Some(PER_REPLY + self.count_each(request).await.iter().sum::<u64>()),
        };
        let mut admission = self
            .admit(accounts, &request.model, prompt, cap, request.stream)
            .await?;
        admission.history_trimmed = trimmed;
        Ok(admission)
    }

    /// `HISTORY_TRIM=auto`: when prompt plus answer (the cap, else a quarter of the window; at
    /// most half of it) would pass the model's context window, drops the oldest history turns (never a system
    /// message, never the current message) until it fits; how many, or 413 if the current
    /// message alone cannot fit. Nothing is counted when the prompt's bytes already fit.
    async fn fit_window(
        &self,
        request: &mut ChatRequest,
        cap: Option<u64>,
        counts: &mut Option<Vec<u64>>,
    ) -> Result<usize, GuardrailError> {
        let window = match self.pricing.context_window(&request.model) {
            Some(window) if self.limits.history_trim => window,
            _ => return Ok(0),
        };
        // The answer's room: the cap, else a quarter of the window; never more than half of
        // it (a cap above a small model's window would otherwise refuse every chat).
        let answer = cap.unwrap_or(window / 4).min(window / 2);
        if prompt_upper_bound(&request.messages) + answer <= window {
            return Ok(0);
        }
        let per_message = counts.insert(self.count_each(request).await);
        let mut prompt = PER_REPLY + per_message.iter().sum::<u64>();
        let last = request.messages.len().saturating_sub(1);
        let mut drop = vec![false; request.messages.len()];
        let mut dropped = 0;
        for (i, message) in request.messages.iter().enumerate().take(last) {
            if prompt + answer <= window {
                break;
            }
            if message.role != Role::System {
                drop[i] = true;
                prompt -= per_message[i];
                dropped += 1;
            }
        }
        if prompt + answer > window {
            return Err(GuardrailError::TooLongForModel {
                model: request.model.clone(),
                window,
                needed: prompt + answer,
            });
        }
        let mut index = 0..;
        request
            .messages
            .retain(|_| !drop[index.next().unwrap_or(0)]);
        let mut index = 0..;
        per_message.retain(|_| !drop[index.next().unwrap_or(0)]);
        Ok(dropped)
    }

    /// Another attempt of an admitted chat (a fallback after an attempt that may have been
    /// billed): the same prompt, reserved again under `model`.
    pub async fn admit_again(
        &self,
        accounts: Accounts,
        model: &str,
        prompt_tokens: u64,
        stream: bool,
    ) -> Result<Admission, GuardrailError> {
        let prompt = self.budgets.any().then_some(prompt_tokens);
        let cap = self.limits.output_cap.map(u64::from);
        self.admit(accounts, model, prompt, cap, stream).await
    }

    /// `GET /api/openai/test` (it spends money too): reserved and settled like a chat, with a
    /// small output cap of its own.
    pub async fn admit_test(
        &self,
        model: &str,
        messages: &[ChatMessage],
    ) -> Result<Admission, GuardrailError> {
        let prompt = self
            .budgets
            .any()
            .then(|| self.count_prompt(model, messages));
        self.admit(
            Accounts::default(),
            model,
            prompt,
            Some(TEST_OUTPUT_TOKENS),
            false,
        )
        .await
    }

    /// The budget reservation of `prompt` tokens (counted when a budget is set) plus the most
    /// answer tokens up to `cap` that every budget has room for.
    async fn admit(
        &self,
        accounts: Accounts,
        model: &str,
        prompt: Option<u64>,
        cap: Option<u64>,
        stream: bool,
    ) -> Result<Admission, GuardrailError> {
        let (prompt_tokens, reservation) = match prompt {
            Some(prompt) => {
                // With a budget there is always a cap (`Config::output_cap`).
                let max = cap.unwrap_or(u64::from(crate::config::BUDGETED_OUTPUT_TOKENS));
                let min = u64::from(self.limits.min_output);
                (
                    prompt,
                    self.reserve(&accounts, model, prompt, min, max).await?,
                )
            }
            None => (0, Reservation::default()),
        };
        let output_cap = if reservation.is_empty() {
            cap
        } else {
            Some(reservation.output)
        };
        Ok(Admission::new(
            self.budgets.clone(),
            accounts,
            reservation,
            self.tasks.clone(),
            prompt_tokens,
            output_cap,
            stream,
        ))
    }

    /// Each message's tokens with its overhead. A large prompt, or the first with an encoding
    /// not yet loaded, is counted on a blocking thread, so counting it never holds up the
    /// requests that share this one.
    async fn count_each(&self, request: &mut ChatRequest) -> Vec<u64> {
        let tokenizer = self.pricing.tokenizer(&request.model);
        let bytes: usize = request.messages.iter().map(|m| m.content.len()).sum();
        if bytes <= COUNT_INLINE_BYTES && tokenizer.is_ready() {
            return self.tokens.per_message(tokenizer, &request.messages);
        }
        let (tokens, messages) = (self.tokens.clone(), std::mem::take(&mut request.messages));
        let counted = tokio::task::spawn_blocking(move || {
            let counts = tokens.per_message(tokenizer, &messages);
            (messages, counts)
        })
        .await;
        // The task is awaited, never cancelled: its only error is a panic, passed on (a 500).
        let (messages, counts) =
            counted.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        request.messages = messages;
        counts
    }

    /// A prompt's tokens as the model's encoding counts them, with OpenAI's overheads.
    pub fn count_prompt(&self, model: &str, messages: &[ChatMessage]) -> u64 {
        let tokenizer = self.pricing.tokenizer(model);
        PER_REPLY
            + self
                .tokens
                .per_message(tokenizer, messages)
                .iter()
                .sum::<u64>()
    }

    /// An answer's tokens, for an upstream that reported no usage.
    pub fn count_answer(&self, model: &str, text: &str) -> u64 {
        self.tokens.count(self.pricing.tokenizer(model), text)
    }

    /// The model allow-list (the playground's model picker).
    pub fn models(&self) -> &ModelPolicy {
        &self.models
    }

    /// Before anything reaches OpenAI: is this model allowed?
    fn check_model(&self, model: &str) -> Result<(), GuardrailError> {
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

    /// Reserves a call's spend (see `budget.rs`).
    async fn reserve(
        &self,
        accounts: &Accounts,
        model: &str,
        prompt_tokens: u64,
        min_output: u64,
        max_output: u64,
    ) -> Result<Reservation, GuardrailError> {
        self.budgets
            .reserve(accounts, model, prompt_tokens, min_output, max_output)
            .await
            .map_err(|denied| match denied {
                BudgetDenied::Spent(spent) => {
                    self.refusals.budget.fetch_add(1, Ordering::Relaxed);
                    spent.into()
                }
                BudgetDenied::Quota(spent) => {
                    self.refusals.quota.fetch_add(1, Ordering::Relaxed);
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

//! A chat from request to reply: the guardrails' door, credentials, the upstream call (once more
//! with a fresh key after a 401), and one `Bookkeeping::record` however the call ended, the same
//! for whole and streamed answers.
//!
//! `ChatService` holds what it uses; it knows nothing of HTTP or of the application state.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use serde::Serialize;

use crate::clock::{Clock, timestamp};
use std::sync::atomic::{AtomicU64, Ordering};

use indexmap::IndexMap;

use crate::config::ModelMap;
use crate::domain::{ApiKey, ChatMessage, ChatRequest, Consumer, Role, TokenUsage};
use crate::metrics::Metrics;
use crate::services::bookkeeping::{Bookkeeping, Outcome};
use crate::services::breaker::{Breaker, BreakerState};
use crate::services::credentials::CredentialProvider;
use crate::services::guardrails::{Admission, GuardrailError, Guardrails};
use crate::services::openai::{Completion, OpenAiService, StreamPiece};
use crate::services::sessions::Sessions;
use crate::services::upstream::{UpstreamError, UpstreamKind};
use crate::services::usage::ChatsPerMinute;
use crate::services::usage::UpstreamUsage;

/// The success answer of `POST /api/chat`, and the `done` event's data when streaming.
// `ToSchema`: the OpenAPI document describes these very types (`http/openapi.rs`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChatReply {
    pub message: String,
    pub usage: ReplyUsage,
    pub timestamp: String,
    /// Only when the answer stopped at the output cap (`OPENAI_MAX_OUTPUT_TOKENS`, or what a
    /// budget had room for). Additive: the site's chat window ignores it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Only when history turns were dropped to fit the model's context window (`HISTORY_TRIM`).
    #[serde(skip_serializing_if = "is_zero")]
    pub history_trimmed: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplyUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub model: String,
    /// Only when the upstream reported no usage and the tokens were counted here.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

/// What a streamed chat sends to the client.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Delta(String),
    Done(ChatReply),
    Error(String),
}

pub const STREAM_WITHOUT_USAGE: &str =
    "OpenAI API error: the stream ended before the answer was complete (no usage reported)";

/// Why a chat got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// No usable key, from Papita or the environment.
    #[error("{NOT_CONFIGURED}")]
    NotConfigured,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A guardrail refused it before it reached OpenAI.
    #[error(transparent)]
    Guardrail(#[from] GuardrailError),
    /// With fallbacks: every upstream's circuit breaker is open.
    #[error(
        "Every upstream is failing right now (their circuit breakers are open); chats resume when one recovers. Try again in {} s.",
        crate::services::guardrails::retry_secs(.retry_after)
    )]
    AllUpstreamsDown { retry_after: Duration },
}

/// Counts a streamed reply in `sse_streams_open` while it lives.
struct OpenStream(prometheus_client::metrics::gauge::Gauge);

impl OpenStream {
    fn new(metrics: &Metrics) -> Self {
        metrics.streams_open.inc();
        Self(metrics.streams_open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One admitted call until it ends: its `Admission` (the budget reservation, which settles
/// itself if dropped) and, for a stream, what to count as an estimate if it is cut short.
struct InFlight {
    admission: Option<Admission>,
    /// A stream: if it ends before the upstream's usage, the estimate goes in the books.
    estimate: Option<Estimate>,
}

struct Estimate {
    books: Arc<Bookkeeping>,
    session: Option<String>,
    consumer: Consumer,
    model: String,
}

impl InFlight {
    fn streamed(&mut self, chars: usize) {
        if let Some(admission) = &mut self.admission {
            admission.streamed(chars);
        }
    }

    async fn settle(mut self, actual: &TokenUsage) {
        self.estimate = None;
        if let Some(admission) = self.admission.take() {
            admission.settle(actual).await;
        }
    }

    fn output_cap(&self) -> Option<u32> {
        self.admission.as_ref().and_then(Admission::output_cap)
    }

    /// The attempt so far may have been billed and another upstream is next: that attempt keeps
    /// its whole reservation, and the next one reserves its own (refused like a chat when the
    /// budget has no room for it).
    async fn reserve_again(
        &mut self,
        guardrails: &Guardrails,
        model: &str,
    ) -> Result<(), ChatError> {
        let Some(previous) = self.admission.take() else {
            return Ok(());
        };
        let (prompt, trimmed) = (previous.prompt_tokens(), previous.history_trimmed);
        let (stream, accounts) = (previous.is_stream(), previous.accounts().clone());
        previous.keep();
        let mut next = guardrails
            .admit_again(accounts, model, prompt, stream)
            .await?;
        next.history_trimmed = trimmed;
        self.admission = Some(next);
        Ok(())
    }

    fn history_trimmed(&self) -> usize {
        self.admission.as_ref().map_or(0, |a| a.history_trimmed)
    }

    fn prompt_tokens(&self) -> u64 {
        self.admission.as_ref().map_or(0, Admission::prompt_tokens)
    }

    /// The call failed before an answer: released if the upstream provably took nothing,
    /// else kept (a whole answer's reservation stays whole, a stream's settles what was seen).
    async fn failed(mut self, error: &ChatError) {
        self.estimate = None;
        let Some(admission) = self.admission.take() else {
            return;
        };
        let unprocessed = match error {
            ChatError::NotConfigured
            | ChatError::Guardrail(_)
            | ChatError::AllUpstreamsDown { .. } => true,
            ChatError::Upstream(e) => e.unprocessed,
        };
        if unprocessed {
            admission.release().await;
        } else {
            admission.ambiguous().await;
        }
    }

    /// The upstream cut the stream (or never reported usage): settle and book the estimate.
    async fn cut_short(&mut self) {
        let Some(admission) = self.admission.take() else {
            return;
        };
        let estimate = admission.estimate();
        admission.settle(&estimate).await;
        if let Some(Estimate {
            books,
            session,
            consumer,
            model,
        }) = self.estimate.take()
        {
            books
                .record(Outcome::Estimated {
                    session: session.as_deref(),
                    consumer: &consumer,
                    model: &model,
                    usage: &estimate,
                })
                .await;
        }
    }
}

impl Drop for InFlight {
    /// Dropped before it ended (the client went away): the admission settles its estimate by
    /// itself; a stream's estimate is booked on the application's tracked tasks.
    fn drop(&mut self) {
        if let (Some(admission), Some(estimate)) = (&self.admission, self.estimate.take()) {
            estimate.books.record_estimate_later(
                estimate.session,
                estimate.consumer,
                estimate.model,
                admission.estimate(),
            );
        }
    }
}

/// The upstream side of a chat: where the key comes from, and the OpenAI client.
pub struct Upstream {
    pub credentials: Arc<CredentialProvider>,
    pub openai: OpenAiService,
    /// Tried in order when the primary fails over (`OPENAI_FALLBACK_*`, `UPSTREAMS_FILE`).
    pub fallbacks: Vec<Fallback>,
    /// With fallbacks: the primary's breaker, and how long after the first attempt a next
    /// upstream may still be tried (`OPENAI_RETRY_BUDGET_SECS`).
    pub breaker: Breaker,
    pub failover_budget: Duration,
}

/// What an upstream did since start-up (`by_upstream`, `/metrics`).
#[derive(Default)]
pub struct UpstreamCounts {
    answered: AtomicU64,
    failures: AtomicU64,
    prompt: AtomicU64,
    completion: AtomicU64,
}

/// A fallback upstream: its own client (base URL, kind), its own key, its model names.
pub struct Fallback {
    pub name: String,
    pub counts: UpstreamCounts,
    pub openai: OpenAiService,
    /// Sent to this upstream only. A server without authentication gets a placeholder.
    pub key: ApiKey,
    pub model_map: ModelMap,
    pub breaker: Breaker,
}

/// Contract §6: the not-configured answer.
pub const NOT_CONFIGURED: &str = "OpenAI service not configured. Please set OPENAI_API_KEY in .env file or ensure Papita API is running.";

/// The user message of `GET /api/openai/test` (contract §5).
pub const TEST_PROMPT: &str = "Say 'Connection successful' if you can read this.";

pub struct ChatService {
    credentials: Arc<CredentialProvider>,
    openai: OpenAiService,
    fallbacks: Vec<Fallback>,
    breaker: Breaker,
    counts: UpstreamCounts,
    failover_budget: Duration,
    guardrails: Arc<Guardrails>,
    books: Arc<Bookkeeping>,
    sessions: Arc<Sessions>,
    clock: Arc<dyn Clock>,
    /// `None` with `METRICS_ENABLED=false`: nothing is timed or recorded.
    metrics: Option<Arc<Metrics>>,
}

impl ChatService {
    pub fn new(
        upstream: Upstream,
        guardrails: Arc<Guardrails>,
        books: Arc<Bookkeeping>,
        sessions: Arc<Sessions>,
        clock: Arc<dyn Clock>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            credentials: upstream.credentials,
            openai: upstream.openai,
            fallbacks: upstream.fallbacks,
            breaker: upstream.breaker,
            counts: UpstreamCounts::default(),
            failover_budget: upstream.failover_budget,
            guardrails,
            books,
            sessions,
            clock,
            metrics,
        }
    }

    /// Successful chats per minute over the last hour (the dashboard).
    pub fn chats_per_minute(&self) -> &ChatsPerMinute {
        self.books.chats_per_minute()
    }

    /// Through the guardrails' door: size, model, budget. `stream`: a cut-short end is booked
    /// as an estimate.
    async fn admit(
        &self,
        request: &mut ChatRequest,
        session: Option<&str>,
        stream: bool,
    ) -> Result<InFlight, ChatError> {
        let admission = self.guardrails.admit_chat(request, session).await?;
        Ok(InFlight {
            admission: Some(admission),
            estimate: stream.then(|| Estimate {
                books: self.books.clone(),
                session: session.map(str::to_string),
                consumer: Consumer::of(&request.user, request.client),
                model: request.model.clone(),
            }),
        })
    }

    /// A whole answer.
    pub async fn complete(
        self: &Arc<Self>,
        mut request: ChatRequest,
    ) -> Result<ChatReply, ChatError> {
        let started = self.metrics.is_some().then(Instant::now);
        let session = self.sessions.resolve(request.session_id.clone()).await;
        // A client that goes away mid-call drops this: the reservation then stays whole.
        let mut in_flight = self.admit(&mut request, session.as_deref(), false).await?;
        let history_trimmed = in_flight.history_trimmed();
        let upstream_started = started.map(|_| Instant::now());
        let completion = {
            let messages = &request.messages;
            self.with_failover(
                &request.model,
                &mut in_flight,
                |openai, key, model, cap| async move {
                    openai.complete(&key, &model, messages, cap).await
                },
            )
            .await
        };
        let upstream = upstream_started.map(|t| t.elapsed());
        if let (Some(metrics), Some(upstream)) = (&self.metrics, upstream) {
            Metrics::observe(&metrics.upstream_duration, upstream);
        }
        let (completion, answered) = match completion {
            Ok((completion, answered)) => {
                self.answered_by(&mut request, answered);
                (completion, answered)
            }
            Err(e) => {
                in_flight.failed(&e).await;
                return Err(e);
            }
        };
        let (usage, estimated) = match completion.usage {
            Some(usage) => (usage, false),
            // An OpenAI-compatible server that reports no usage: counted here, and flagged.
            None => (
                self.count_usage(&request, in_flight.prompt_tokens(), &completion.text),
                true,
            ),
        };
        in_flight.settle(&usage).await;
        self.count_answer(answered, &usage);
        let session = session.as_deref();
        let consumer = estimated.then(|| Consumer::of(&request.user, request.client));
        let outcome = if let Some(consumer) = &consumer {
            Outcome::Estimated {
                session,
                consumer,
                model: &request.model,
                usage: &usage,
            }
        } else {
            Outcome::Answered {
                request: &request,
                session,
                usage: &usage,
                history_trimmed,
            }
        };
        self.books.record(outcome).await;
        // What the gateway adds: everything but the OpenAI call (gateways publish this figure).
        if let (Some(metrics), Some(started), Some(upstream)) = (&self.metrics, started, upstream) {
            Metrics::observe(
                &metrics.overhead,
                started.elapsed().saturating_sub(upstream),
            );
        }
        let mut reply = self.reply(completion.text, usage, &request.model);
        reply.truncated = completion.truncated;
        reply.usage.estimated = estimated;
        reply.history_trimmed = history_trimmed;
        Ok(reply)
    }

    /// Tokens of a call whose upstream reported none, counted with the model's tokenizer.
    fn count_usage(&self, request: &ChatRequest, prompt_tokens: u64, answer: &str) -> TokenUsage {
        let prompt = match prompt_tokens {
            0 => self
                .guardrails
                .count_prompt(&request.model, &request.messages),
            counted => counted,
        };
        let completion = self.guardrails.count_answer(&request.model, answer);
        TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: 0,
        }
    }

    /// A streamed answer. Failures before the upstream starts answering are errors here; later
    /// ones end the stream with an `Error` event. A stream that ends without reporting usage is
    /// a failure (not a zero-token success) and is not counted.
    pub async fn stream(
        self: &Arc<Self>,
        mut request: ChatRequest,
    ) -> Result<impl Stream<Item = StreamEvent> + Send + use<>, ChatError> {
        let started = Instant::now();
        let session = self.sessions.resolve(request.session_id.clone()).await;
        // Cut short (client gone, upstream cut): the tokens streamed so far are estimated and
        // settled, so closing streams early is no way around a budget.
        let mut in_flight = self.admit(&mut request, session.as_deref(), true).await?;
        let history_trimmed = in_flight.history_trimmed();
        let upstream = {
            let messages = &request.messages;
            self.with_failover(
                &request.model,
                &mut in_flight,
                |openai, key, model, cap| async move {
                    openai.stream(&key, &model, messages, cap).await
                },
            )
            .await
        };
        let (upstream, answered) = match upstream {
            Ok((upstream, answered)) => {
                self.answered_by(&mut request, answered);
                (upstream, answered)
            }
            Err(e) => {
                in_flight.failed(&e).await;
                return Err(e);
            }
        };
        let this = self.clone();
        let open = self.metrics.as_deref().map(OpenStream::new);
        Ok(async_stream::stream! {
            let _open = open;
            let mut first = true;
            let mut in_flight = in_flight;
            let mut upstream = std::pin::pin!(upstream);
            let mut text = String::new();
            let mut usage = None;
            let mut truncated = false;
            while let Some(piece) = upstream.next().await {
                match piece {
                    Ok(StreamPiece::Delta(delta)) => {
                        if std::mem::take(&mut first) {
                            if let Some(metrics) = &this.metrics {
                                Metrics::observe(&metrics.time_to_first_token, started.elapsed());
                            }
                        }
                        text.push_str(&delta);
                        in_flight.streamed(text.len());
                        yield StreamEvent::Delta(delta);
                    }
                    Ok(StreamPiece::Usage(u)) => usage = Some(u),
                    Ok(StreamPiece::Truncated) => truncated = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream failed after it started");
                        in_flight.cut_short().await;
                        yield StreamEvent::Error(e.to_string());
                        return;
                    }
                }
            }
            match usage {
                Some(usage) => {
                    in_flight.settle(&usage).await;
                    this.count_answer(answered, &usage);
                    this.books
                        .record(Outcome::Answered {
                            request: &request,
                            session: session.as_deref(),
                            usage: &usage,
                            history_trimmed,
                        })
                        .await;
                    let mut reply = this.reply(text, usage, &request.model);
                    reply.truncated = truncated;
                    reply.history_trimmed = history_trimmed;
                    yield StreamEvent::Done(reply);
                }
                None => {
                    tracing::warn!("stream ended without usage; counted as an estimate");
                    in_flight.cut_short().await;
                    yield StreamEvent::Error(STREAM_WITHOUT_USAGE.into());
                }
            }
        })
    }

    /// `GET /api/openai/test`: one real call with `model`. It spends money too, so it passes
    /// the budgets and is counted, apart from the chats (`test_usage`).
    pub async fn test_connection(self: &Arc<Self>, model: &str) -> Result<Completion, ChatError> {
        let messages = [ChatMessage {
            role: Role::User,
            content: TEST_PROMPT.into(),
        }];
        // Dropped (the client left): its reservation stays whole, as a chat's does.
        let admission = self.guardrails.admit_test(model, &messages).await?;
        let (messages, cap) = (&messages, admission.output_cap());
        let result = self
            .with_key(|key| async move { self.openai.complete(&key, model, messages, cap).await })
            .await;
        match &result {
            Ok(completion) => {
                let used = completion.usage.unwrap_or_else(|| {
                    let answer = self.guardrails.count_answer(model, &completion.text);
                    let prompt = self.guardrails.count_prompt(model, messages);
                    TokenUsage {
                        prompt_tokens: prompt,
                        completion_tokens: answer,
                        total_tokens: prompt + answer,
                        cached_tokens: 0,
                    }
                });
                admission.settle(&used).await;
                self.books
                    .record(Outcome::Tested {
                        model,
                        usage: &used,
                    })
                    .await;
            }
            Err(ChatError::Upstream(e)) if !e.unprocessed => admission.ambiguous().await,
            Err(_) => admission.release().await,
        }
        result
    }

    /// Runs `attempt(client, key, model, cap)` on the primary and, when it fails in a way
    /// another upstream can fix (`UpstreamError::failover`), on each fallback in turn, with that
    /// upstream's client, key and name of `model`. Upstreams whose breaker is open are skipped
    /// with no wait; no new upstream is tried once `OPENAI_RETRY_BUDGET_SECS` has passed.
    /// Returns the answer and who gave it (0: the primary; a fallback's place plus one).
    /// Without fallbacks: the primary, as before.
    async fn with_failover<'a, T, F, Fut>(
        &'a self,
        model: &str,
        in_flight: &mut InFlight,
        attempt: F,
    ) -> Result<(T, usize), ChatError>
    where
        F: Fn(&'a OpenAiService, ApiKey, String, Option<u32>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        // The primary's key comes from the credential provider (again after a 401); each
        // fallback's is its own.
        let attempt = &attempt;
        let call = move |i: usize, asked: String, cap: Option<u32>| async move {
            match i.checked_sub(1).map(|f| &self.fallbacks[f]) {
                None => {
                    let asked = &asked;
                    self.with_key(|key| attempt(&self.openai, key, asked.clone(), cap))
                        .await
                }
                Some(f) => Ok(attempt(&f.openai, f.key.clone(), asked, cap).await?),
            }
        };
        if self.fallbacks.is_empty() {
            let answer = call(0, model.to_string(), in_flight.output_cap()).await?;
            return Ok((answer, 0));
        }
        let started = tokio::time::Instant::now();
        let mut last = None;
        // The last attempt may have been billed: the next one needs a reservation of its own.
        let mut reserve_again = false;
        for i in 0..=self.fallbacks.len() {
            let (name, breaker, asked) = match i {
                0 => ("primary", &self.breaker, model),
                _ => {
                    let f = &self.fallbacks[i - 1];
                    (f.name.as_str(), &f.breaker, f.model_map.map(model))
                }
            };
            if last.is_some() && started.elapsed() > self.failover_budget {
                break;
            }
            if !breaker.admit() {
                continue;
            }
            if std::mem::take(&mut reserve_again) {
                in_flight.reserve_again(&self.guardrails, asked).await?;
            }
            match call(i, asked.to_string(), in_flight.output_cap()).await {
                Ok(answer) => {
                    breaker.succeeded();
                    return Ok((answer, i));
                }
                Err(ChatError::Upstream(e)) if e.failover => {
                    breaker.failed();
                    self.counts_of(i).failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(upstream = name, error = %e, "upstream failed; trying the next one");
                    reserve_again = !e.unprocessed;
                    last = Some(ChatError::Upstream(e));
                }
                // No key for the primary: the fallbacks have their own.
                Err(ChatError::NotConfigured) => last = Some(ChatError::NotConfigured),
                Err(e) => {
                    // It answered: the request's fault, not the upstream's.
                    breaker.succeeded();
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            let wait = std::iter::once(&self.breaker)
                .chain(self.fallbacks.iter().map(|f| &f.breaker))
                .map(Breaker::retry_after)
                .min()
                .unwrap_or_default();
            ChatError::AllUpstreamsDown { retry_after: wait }
        }))
    }

    /// Runs `call` with the current key; on a 401 asks for the key again (Papita may have
    /// rotated it) and tries once more if that gives a different key.
    async fn with_key<T, F, Fut>(&self, call: F) -> Result<T, ChatError>
    where
        F: Fn(ApiKey) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let credentials = self.credentials.get().await;
        let key = credentials
            .usable_key()
            .ok_or(ChatError::NotConfigured)?
            .clone();
        match call(key.clone()).await {
            Err(e) if e.kind == UpstreamKind::Unauthorized => {
                let fresh = self.credentials.after_rejection(&key).await;
                match fresh.usable_key() {
                    Some(new_key) if *new_key != key => {
                        tracing::info!(
                            "OpenAI rejected the key; retrying once with the newly resolved key"
                        );
                        Ok(call(new_key.clone()).await?)
                    }
                    _ => Err(e.into()),
                }
            }
            other => Ok(other?),
        }
    }

    fn counts_of(&self, upstream: usize) -> &UpstreamCounts {
        match upstream.checked_sub(1) {
            None => &self.counts,
            Some(i) => &self.fallbacks[i].counts,
        }
    }

    /// A chat answered by `upstream` (0: the primary) used `usage`.
    fn count_answer(&self, upstream: usize, usage: &TokenUsage) {
        if self.fallbacks.is_empty() {
            return;
        }
        let counts = self.counts_of(upstream);
        counts.answered.fetch_add(1, Ordering::Relaxed);
        counts
            .prompt
            .fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        counts
            .completion
            .fetch_add(usage.completion_tokens, Ordering::Relaxed);
    }

    /// `by_upstream` for `/api/openai/usage`: only with fallbacks.
    pub fn upstream_report(&self) -> Option<IndexMap<String, UpstreamUsage>> {
        if self.fallbacks.is_empty() {
            return None;
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let all = std::iter::once(("primary", &self.counts))
            .chain(self.fallbacks.iter().map(|f| (f.name.as_str(), &f.counts)));
        Some(
            all.map(|(name, c)| {
                (
                    name.to_string(),
                    UpstreamUsage {
                        request_count: get(&c.answered),
                        failures: get(&c.failures),
                        prompt_tokens: get(&c.prompt),
                        completion_tokens: get(&c.completion),
                    },
                )
            })
            .collect(),
        )
    }

    /// With fallbacks: each upstream's name and breaker state, the primary first (empty without).
    pub fn upstream_states(&self) -> Vec<(String, BreakerState)> {
        if self.fallbacks.is_empty() {
            return Vec::new();
        }
        std::iter::once(("primary".to_string(), self.breaker.state()))
            .chain(
                self.fallbacks
                    .iter()
                    .map(|f| (f.name.clone(), f.breaker.state())),
            )
            .collect()
    }

    /// A fallback answered: the chat is counted, priced and logged under the model it asked.
    fn answered_by(&self, request: &mut ChatRequest, answered: usize) {
        if let Some(f) = answered.checked_sub(1).and_then(|i| self.fallbacks.get(i)) {
            let model = f.model_map.map(&request.model).to_string();
            request.model = model;
        }
    }

    fn reply(&self, message: String, usage: TokenUsage, model: &str) -> ChatReply {
        ChatReply {
            message,
            usage: ReplyUsage::new(usage, model),
            timestamp: timestamp(&self.clock.now()),
            truncated: false,
            history_trimmed: 0,
        }
    }
}

impl ReplyUsage {
    pub fn new(usage: TokenUsage, model: &str) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            model: model.to_string(),
            estimated: false,
        }
    }
}

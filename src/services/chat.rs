//! A chat from request to reply: credentials, the upstream call (once more with a fresh key after
//! a 401), and the bookkeeping every successful chat does (usage statistics, the Papita record,
//! the session's `chat_usage` line), the same for whole and streamed answers.
//!
//! `ChatService` holds what it uses; it knows nothing of HTTP or of the application state.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use serde::Serialize;

use crate::clock::{Clock, timestamp};
use crate::domain::{ApiKey, ChatMessage, ChatRequest, Role, TokenUsage};
use crate::error::NOT_CONFIGURED;
use crate::metrics::Metrics;
use crate::services::credentials::CredentialProvider;
use crate::services::guardrails::budget::CHARS_PER_TOKEN;
use crate::services::guardrails::{GuardrailError, Guardrails, Reservation};
use crate::services::openai::{Completion, OpenAiService, StreamPiece};
use crate::services::papita::{UsageRecord, UsageReporter};
use crate::services::session_log::{SessionLog, entries};
use crate::services::sessions::Sessions;
use crate::services::upstream::{UpstreamError, UpstreamKind};
use crate::services::usage::{ChatsPerMinute, UsageKind, UsageStats};

/// The success answer of `POST /api/chat`, and the `done` event's data when streaming.
// `ToSchema`: the OpenAPI document describes these very types (`http/openapi.rs`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChatReply {
    pub message: String,
    pub usage: ReplyUsage,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplyUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub model: String,
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

/// One admitted call: its budget reservation until the call ends. Dropped before it ended (the
/// client went away), it settles an estimate in the background: the prompt, plus for a stream
/// the text streamed so far, which is also counted in `estimated_usage`.
struct InFlight {
    chat: Arc<ChatService>,
    reservation: Option<Reservation>,
    model: String,
    session: Option<String>,
    prompt_tokens: u64,
    streamed_chars: u64,
    /// A stream: an unfinished end is an estimate worth reporting.
    estimate_on_drop: bool,
    /// The copy a `Drop` hands to a task: if that task never runs (the runtime is shutting
    /// down), dropping it must not hand itself on again.
    detached: bool,
}

impl InFlight {
    fn estimate(&self) -> TokenUsage {
        let completion = self.streamed_chars.div_ceil(CHARS_PER_TOKEN);
        TokenUsage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
            cached_tokens: 0,
        }
    }

    async fn settle(mut self, actual: &TokenUsage) {
        if let Some(reservation) = self.reservation.take() {
            self.chat
                .guardrails
                .budgets
                .settle(reservation, actual)
                .await;
        }
        self.estimate_on_drop = false;
    }

    async fn release(self) {
        self.settle(&TokenUsage::default()).await;
    }

    /// The upstream cut the stream (or never reported usage): settle and report the estimate.
    async fn cut_short(&mut self) {
        let estimate = self.estimate();
        if let Some(reservation) = self.reservation.take() {
            self.chat
                .guardrails
                .budgets
                .settle(reservation, &estimate)
                .await;
        }
        if std::mem::take(&mut self.estimate_on_drop) {
            self.chat
                .usage
                .record_kind(
                    UsageKind::Estimated,
                    self.session.as_deref(),
                    &self.model,
                    &estimate,
                )
                .await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.detached || (self.reservation.is_none() && !self.estimate_on_drop) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = InFlight {
            chat: self.chat.clone(),
            reservation: self.reservation.take(),
            model: std::mem::take(&mut self.model),
            session: self.session.take(),
            prompt_tokens: self.prompt_tokens,
            streamed_chars: self.streamed_chars,
            estimate_on_drop: std::mem::take(&mut self.estimate_on_drop),
            detached: true,
        };
        runtime.spawn(async move { rest.cut_short().await });
    }
}

/// The user message of `GET /api/openai/test` (contract §5).
pub const TEST_PROMPT: &str = "Say 'Connection successful' if you can read this.";

pub struct ChatService {
    credentials: Arc<CredentialProvider>,
    openai: OpenAiService,
    usage: Arc<UsageStats>,
    sessions: Arc<Sessions>,
    papita: UsageReporter,
    session_log: SessionLog,
    clock: Arc<dyn Clock>,
    guardrails: Arc<Guardrails>,
    /// `None` with `METRICS_ENABLED=false`: nothing is timed or recorded.
    metrics: Option<Arc<Metrics>>,
    /// Successful chats per minute over the last hour (the dashboard).
    pub chats_per_minute: ChatsPerMinute,
}

impl ChatService {
    // The services a chat touches, each shared with whoever else needs it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        credentials: Arc<CredentialProvider>,
        openai: OpenAiService,
        usage: Arc<UsageStats>,
        sessions: Arc<Sessions>,
        papita: UsageReporter,
        session_log: SessionLog,
        clock: Arc<dyn Clock>,
        guardrails: Arc<Guardrails>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            credentials,
            openai,
            usage,
            sessions,
            papita,
            session_log,
            clock,
            guardrails,
            metrics,
            chats_per_minute: ChatsPerMinute::default(),
        }
    }

    /// The guardrails a chat passes before it reaches OpenAI: the model, then the budgets
    /// (reserved here, settled when the call ends, however it ends).
    async fn admit(
        self: &Arc<Self>,
        request: &ChatRequest,
        session: Option<&str>,
        estimate_on_drop: bool,
    ) -> Result<InFlight, ChatError> {
        self.guardrails.check_model(&request.model)?;
        let reservation = self
            .guardrails
            .reserve(session, &request.model, request.input_chars)
            .await?;
        Ok(InFlight {
            chat: self.clone(),
            // An empty reservation needs no settling, so a dropped call spawns nothing for it.
            reservation: Some(reservation).filter(|r| !r.is_empty()),
            model: request.model.clone(),
            session: session.map(str::to_string),
            prompt_tokens: (request.input_chars as u64).div_ceil(CHARS_PER_TOKEN),
            streamed_chars: 0,
            estimate_on_drop,
            detached: false,
        })
    }

    /// A whole answer.
    pub async fn complete(self: &Arc<Self>, request: ChatRequest) -> Result<ChatReply, ChatError> {
        let started = self.metrics.is_some().then(Instant::now);
        let session = self.sessions.resolve(request.session_id.clone()).await;
        // A client that goes away mid-call drops this: the prompt's estimate is then settled.
        let in_flight = self.admit(&request, session.as_deref(), false).await?;
        let upstream_started = started.map(|_| Instant::now());
        let completion = {
            let request = &request;
            self.with_key(|key| async move {
                self.openai
                    .complete(&key, &request.model, &request.messages)
                    .await
            })
            .await
        };
        let upstream = upstream_started.map(|t| t.elapsed());
        if let (Some(metrics), Some(upstream)) = (&self.metrics, upstream) {
            Metrics::observe(&metrics.upstream_duration, upstream);
        }
        let completion = match completion {
            Ok(completion) => completion,
            Err(e) => {
                in_flight.release().await;
                return Err(e);
            }
        };
        in_flight
            .settle(&completion.usage.unwrap_or_default())
            .await;
        if let Some(usage) = &completion.usage {
            self.account(&request, session.as_deref(), usage).await;
        }
        // What the gateway adds: everything but the OpenAI call (gateways publish this figure).
        if let (Some(metrics), Some(started), Some(upstream)) = (&self.metrics, started, upstream) {
            Metrics::observe(
                &metrics.overhead,
                started.elapsed().saturating_sub(upstream),
            );
        }
        Ok(self.reply(
            completion.text,
            completion.usage.unwrap_or_default(),
            &request.model,
        ))
    }

    /// A streamed answer. Failures before the upstream starts answering are errors here; later
    /// ones end the stream with an `Error` event. A stream that ends without reporting usage is
    /// a failure (not a zero-token success) and is not counted.
    pub async fn stream(
        self: &Arc<Self>,
        request: ChatRequest,
    ) -> Result<impl Stream<Item = StreamEvent> + Send + use<>, ChatError> {
        let started = Instant::now();
        let session = self.sessions.resolve(request.session_id.clone()).await;
        // Cut short (client gone, upstream cut): the tokens streamed so far are estimated and
        // settled, so closing streams early is no way around a budget.
        let mut in_flight = self.admit(&request, session.as_deref(), true).await?;
        let upstream = {
            let request = &request;
            self.with_key(|key| async move {
                self.openai
                    .stream(&key, &request.model, &request.messages)
                    .await
            })
            .await
        };
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(e) => {
                in_flight.estimate_on_drop = false;
                in_flight.release().await;
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
            while let Some(piece) = upstream.next().await {
                match piece {
                    Ok(StreamPiece::Delta(delta)) => {
                        if std::mem::take(&mut first) {
                            if let Some(metrics) = &this.metrics {
                                Metrics::observe(&metrics.time_to_first_token, started.elapsed());
                            }
                        }
                        text.push_str(&delta);
                        in_flight.streamed_chars = text.len() as u64;
                        yield StreamEvent::Delta(delta);
                    }
                    Ok(StreamPiece::Usage(u)) => usage = Some(u),
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
                    this.account(&request, session.as_deref(), &usage).await;
                    yield StreamEvent::Done(this.reply(text, usage, &request.model));
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
        let reservation = self
            .guardrails
            .reserve(None, model, TEST_PROMPT.len())
            .await?;
        let messages = &messages;
        let result = self
            .with_key(|key| async move { self.openai.complete(&key, model, messages).await })
            .await;
        let used = result
            .as_ref()
            .ok()
            .and_then(|c| c.usage)
            .unwrap_or_default();
        self.guardrails.budgets.settle(reservation, &used).await;
        if result.is_ok() {
            self.usage
                .record_kind(UsageKind::Test, None, model, &used)
                .await;
        }
        result
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

    /// The bookkeeping of one successful chat; nothing here waits on the network or the disk.
    async fn account(&self, request: &ChatRequest, session: Option<&str>, usage: &TokenUsage) {
        self.usage.record(session, &request.model, usage).await;
        let now = self.clock.now();
        self.chats_per_minute
            .record(now.timestamp().div_euclid(60) as u64);
        self.papita.submit(UsageRecord {
            user_id: None,
            username: request.user.username.clone(),
            is_guest: request.user.is_guest,
            session_id: session.map(str::to_string),
            project_id: "al-chat",
            model: request.model.clone(),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
        });
        if let Some(id) = session {
            self.session_log.append_background(entries::chat_usage(
                id,
                &request.model,
                usage,
                &now,
            ));
        }
    }

    fn reply(&self, message: String, usage: TokenUsage, model: &str) -> ChatReply {
        ChatReply {
            message,
            usage: ReplyUsage::new(usage, model),
            timestamp: timestamp(&self.clock.now()),
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
        }
    }
}

//! The OpenAI client service: chat completions (whole or streamed) with async-openai's request
//! and response types, sent through our transport (bounded retries) on one shared reqwest
//! client, with our timeouts and our error classification (contract §6).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CompletionUsage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason,
};
use futures_util::{Stream, StreamExt};
use reqwest::header::{self, HeaderValue};

use crate::config::{ApiKind, CapField, FallbackSettings, OpenAiSettings};
use crate::domain::{ApiKey, ChatMessage, Role, TokenUsage};
mod sse;
mod transport;

use crate::services::upstream::{UpstreamError, UpstreamKind};
use sse::{SseData, SseError};
use transport::{CallError, OpenAiTransport, RetryPolicy, UpstreamStatus};

impl From<CompletionUsage> for TokenUsage {
    fn from(u: CompletionUsage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens.into(),
            completion_tokens: u.completion_tokens.into(),
            total_tokens: u.total_tokens.into(),
            cached_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .map_or(0, u64::from),
        }
    }
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    /// `None` when the server reported no usage (some OpenAI-compatible servers).
    pub usage: Option<TokenUsage>,
    /// The answer stopped at the output cap (`finish_reason: "length"`).
    pub truncated: bool,
}

/// One item of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPiece {
    Delta(String),
    Usage(TokenUsage),
    /// The answer stopped at the output cap (`finish_reason: "length"`).
    Truncated,
}

pub struct OpenAiService {
    base_url: String,
    transport: OpenAiTransport,
    timeout: Duration,
    stream_idle: Duration,
    stream_max: Duration,
    cap_field: CapField,
    kind: ApiKind,
    /// Azure's `api-version`.
    api_version: String,
    /// `{base_url}/chat/completions`, parsed once: whole answers are sent straight through
    /// reqwest with async-openai's types (its per-request URL building and parsing was a tenth
    /// of a chat's instructions). Azure's URL names the deployment, so it is built per call.
    completions_url: reqwest::Url,
    /// The current key and its header (`Authorization: Bearer`, or Azure's `api-key`).
    authorization: Mutex<Option<(ApiKey, HeaderValue)>>,
}

impl OpenAiService {
    /// `http` is shared by every OpenAI call (connection pooling); it has a connect timeout but
    /// no overall timeout, which would cut long healthy streams. Time limits are applied here.
    pub fn new(settings: &OpenAiSettings, http: reqwest::Client) -> Self {
        Self::for_upstream(settings, &settings.base_url, ApiKind::OpenAi, None, http)
    }

    /// A fallback upstream, with the primary's time limits and retries.
    pub fn fallback(
        settings: &OpenAiSettings,
        fallback: &FallbackSettings,
        http: reqwest::Client,
    ) -> Self {
        let version = fallback.api_version.as_deref();
        Self::for_upstream(settings, &fallback.base_url, fallback.kind, version, http)
    }

    fn for_upstream(
        settings: &OpenAiSettings,
        base_url: &str,
        kind: ApiKind,
        api_version: Option<&str>,
        http: reqwest::Client,
    ) -> Self {
        let policy = RetryPolicy {
            max_retries: settings.max_retries,
            budget: settings.retry_budget,
            wait_on_rate_limit: settings.fallbacks.is_empty(),
        };
        Self {
            completions_url: reqwest::Url::parse(&format!("{base_url}/chat/completions"))
                .expect("base URLs are checked at start-up"),
            kind,
            api_version: api_version.unwrap_or_default().to_string(),
            base_url: base_url.to_string(),
            transport: OpenAiTransport::new(http, policy),
            timeout: settings.timeout,
            stream_idle: settings.stream_idle_timeout,
            stream_max: settings.stream_max,
            cap_field: settings.cap_field,
            authorization: Mutex::new(None),
        }
    }

    /// The `Authorization` header for `key` (marked sensitive, so it is never printed), kept for
    /// the current key. A key no HTTP header can carry (a control character from a `.env` or
    /// Papita) is refused here, not panicked on.
    fn authorization(&self, key: &ApiKey) -> Result<HeaderValue, UpstreamError> {
        let mut slot = self.authorization.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((current, header)) = slot.as_ref() {
            if current == key {
                return Ok(header.clone());
            }
        }
        let value = match self.kind {
            ApiKind::OpenAi => format!("Bearer {}", key.expose()),
            ApiKind::Azure => key.expose().to_string(),
        };
        let Ok(mut header) = HeaderValue::from_str(&value) else {
            return Err(UpstreamError::new(
                UpstreamKind::Unauthorized,
                "the OpenAI key holds characters an HTTP header cannot carry",
            ));
        };
        header.set_sensitive(true);
        *slot = Some((key.clone(), header.clone()));
        Ok(header)
    }

    /// The upstream request: the messages, a stream's usage option, and the output cap in the
    /// field this upstream takes (`OPENAI_OUTPUT_CAP_FIELD`).
    fn build_request(
        &self,
        model: &str,
        messages: &[ChatMessage],
        stream: bool,
        cap: Option<u32>,
    ) -> UpstreamRequest {
        let messages = messages
            .iter()
            .map(|m| match m.role {
                Role::System => ChatCompletionRequestSystemMessage::from(m.content.as_str()).into(),
                Role::User => ChatCompletionRequestUserMessage::from(m.content.as_str()).into(),
                Role::Assistant => {
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()).into()
                }
            })
            .collect::<Vec<ChatCompletionRequestMessage>>();
        let (max_completion_tokens, max_tokens) = match self.cap_field {
            CapField::MaxCompletionTokens => (cap, None),
            CapField::MaxTokens => (None, cap),
        };
        UpstreamRequest {
            request: CreateChatCompletionRequest {
                model: model.to_string(),
                messages,
                stream: stream.then_some(true),
                // Without this, a streamed answer carries no usage and would be counted as zero.
                stream_options: stream.then(|| ChatCompletionStreamOptions {
                    include_usage: Some(true),
                    ..Default::default()
                }),
                max_completion_tokens,
                ..Default::default()
            },
            max_tokens,
        }
    }

    /// Where a chat with `model` goes: OpenAI's one URL (borrowed: the request clones it once),
    /// or Azure's deployment URL.
    fn url_for(&self, model: &str) -> Result<std::borrow::Cow<'_, reqwest::Url>, UpstreamError> {
        match self.kind {
            ApiKind::OpenAi => Ok(std::borrow::Cow::Borrowed(&self.completions_url)),
            ApiKind::Azure => {
                let mut url =
                    reqwest::Url::parse(&self.base_url).expect("base URLs are checked at start-up");
                url.path_segments_mut()
                    .map_err(|()| UpstreamError::new(UpstreamKind::Rejected, "bad base URL"))?
                    .pop_if_empty()
                    .extend(["openai", "deployments", model, "chat", "completions"]);
                url.query_pairs_mut()
                    .append_pair("api-version", &self.api_version);
                Ok(std::borrow::Cow::Owned(url))
            }
        }
    }

    /// The request for `body`, built anew for each attempt (same URL, key and body).
    fn post(
        &self,
        url: &reqwest::Url,
        authorization: &HeaderValue,
        body: &bytes::Bytes,
    ) -> reqwest::Request {
        let mut request = reqwest::Request::new(reqwest::Method::POST, url.clone());
        let headers = request.headers_mut();
        let name = match self.kind {
            ApiKind::OpenAi => header::AUTHORIZATION,
            ApiKind::Azure => header::HeaderName::from_static("api-key"),
        };
        headers.insert(name, authorization.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        *request.body_mut() = Some(body.clone().into());
        request
    }

    /// One whole answer. Dropping the future drops the upstream request.
    ///
    /// Sent straight through reqwest with async-openai's types: the request is serialized once,
    /// to a URL parsed once; the transport retries within its policy.
    pub async fn complete(
        &self,
        key: &ApiKey,
        model: &str,
        messages: &[ChatMessage],
        cap: Option<u32>,
    ) -> Result<Completion, UpstreamError> {
        let authorization = self.authorization(key)?;
        let url = self.url_for(model)?;
        let body = serialize(&self.build_request(model, messages, false, cap))?;
        // One timer for the whole answer (a second one cost 1 % of a chat's instructions); what
        // fails before the response head may be answered by another upstream, what fails after
        // it may not.
        let head = AtomicBool::new(false);
        let exchange = async {
            let response = self
                .transport
                .send(|| self.post(&url, &authorization, &body))
                .await?;
            head.store(true, Ordering::Relaxed);
            let bytes = read_capped(response).await?;
            serde_json::from_slice::<CreateChatCompletionResponse>(&bytes).map_err(|e| {
                CallError::Malformed(format!("malformed answer from the OpenAI server: {e}"))
            })
        };
        let outcome = tokio::time::timeout(self.timeout, exchange).await;
        let head_pending = !head.load(Ordering::Relaxed);
        let response = outcome
            .map_err(|_| {
                if head_pending {
                    before_head(timed_out("no answer", self.timeout))
                } else {
                    timed_out("no complete answer", self.timeout)
                }
            })?
            .map_err(|e| classify(e, key, &self.base_url, head_pending))?;
        let usage = response.usage.map(TokenUsage::from);
        let choice = response.choices.into_iter().next().ok_or_else(|| {
            UpstreamError::new(UpstreamKind::Unavailable, "the answer had no choices")
        })?;
        Ok(Completion {
            text: choice.message.content.unwrap_or_default(),
            usage,
            truncated: choice.finish_reason == Some(FinishReason::Length),
        })
    }

    /// A streamed answer. Errors before the stream starts (status codes, refused connection,
    /// no response head in time) are returned here; later ones are the stream's last item.
    /// Dropping the stream closes the upstream connection.
    ///
    /// Read straight off reqwest's body (`openai::sse`), with async-openai's chunk type: the
    /// upstream is read only as fast as the stream is polled, which is as fast as the client
    /// takes the answer. `OPENAI_STREAM_MAX_SECS` is checked before every chunk, so a fast
    /// upstream cannot outrun it; a client that stops reading is cut by the server
    /// (`SSE_WRITE_STALL_SECS`), which drops this stream.
    pub async fn stream(
        &self,
        key: &ApiKey,
        model: &str,
        messages: &[ChatMessage],
        cap: Option<u32>,
    ) -> Result<impl Stream<Item = Result<StreamPiece, UpstreamError>> + Send + use<>, UpstreamError>
    {
        let started = Instant::now();
        let authorization = self.authorization(key)?;
        let url = self.url_for(model)?;
        let body = serialize(&self.build_request(model, messages, true, cap))?;
        let response = tokio::time::timeout(
            self.timeout,
            self.transport
                .send(|| self.post(&url, &authorization, &body)),
        )
        .await
        .map_err(|_| before_head(timed_out("no answer", self.timeout)))?
        .map_err(|e| classify(e, key, &self.base_url, true))?;
        let mut events = Box::pin(SseData::new(response.bytes_stream()));
        let (first_limit, idle, max) = (self.timeout, self.stream_idle, self.stream_max);
        let (key, base_url) = (key.clone(), self.base_url.clone());
        Ok(async_stream::stream! {
            let mut first = true;
            // The text streamed so far: the chat keeps it for the `done` event.
            let mut streamed = 0usize;
            loop {
                if started.elapsed() >= max {
                    yield Err(timed_out("the stream did not finish", max));
                    break;
                }
                // Time to the first token, then the longest silence between chunks, never past max.
                let limit = if first { first_limit.saturating_sub(started.elapsed()) } else { idle };
                let limit = limit.min(max.saturating_sub(started.elapsed()));
                let next = match tokio::time::timeout(limit, events.next()).await {
                    Ok(next) => next,
                    Err(_) if started.elapsed() >= max => { yield Err(timed_out("the stream did not finish", max)); break; }
                    Err(_) if first => { yield Err(timed_out("no first token", first_limit)); break; }
                    Err(_) => { yield Err(timed_out("the stream stalled: no data", idle)); break; }
                };
                let data = match next {
                    None => break,
                    Some(Err(SseError::Body(e))) => { yield Err(classify(CallError::Http(e), &key, &base_url, false)); break; }
                    Some(Err(e)) => { yield Err(UpstreamError::new(UpstreamKind::Unavailable, e.to_string())); break; }
                    Some(Ok(data)) => data,
                };
                let chunk = match serde_json::from_slice::<CreateChatCompletionStreamResponse>(&data) {
                    Ok(chunk) => chunk,
                    Err(e) => { yield Err(stream_failure(&data, e, &key)); break; }
                };
                first = false;
                let mut too_long = false;
                for choice in chunk.choices {
                    if choice.finish_reason == Some(FinishReason::Length) {
                        yield Ok(StreamPiece::Truncated);
                    }
                    if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                        streamed += text.len();
                        too_long |= streamed > MAX_ANSWER_BYTES;
                        yield Ok(StreamPiece::Delta(text));
                    }
                }
                if too_long {
                    yield Err(UpstreamError::new(
                        UpstreamKind::Unavailable,
                        format!("the answer is longer than {} MB; it was cut", MAX_ANSWER_BYTES / (1024 * 1024)),
                    ));
                    break;
                }
                if let Some(usage) = chunk.usage {
                    yield Ok(StreamPiece::Usage(usage.into()));
                }
            }
        })
    }
}

/// The longest answer taken from an upstream, whole (as JSON) or streamed (as text). OpenAI's
/// longest outputs (128k tokens) are about half a megabyte; a lenient server that sends more is
/// cut rather than read into memory without end.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// A whole answer's body, at most `MAX_ANSWER_BYTES`.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, CallError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(CallError::Http)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(CallError::Malformed(format!(
                "the answer from the OpenAI server is larger than {} MB",
                MAX_ANSWER_BYTES / (1024 * 1024)
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// async-openai's request, plus `max_tokens`: async-openai marks it deprecated (OpenAI wants
/// `max_completion_tokens`), but OpenAI-compatible servers (vLLM, llama.cpp) still take only it.
struct UpstreamRequest {
    request: CreateChatCompletionRequest,
    max_tokens: Option<u32>,
}

/// The request body, serialized once for every attempt. `max_tokens` is appended to the
/// object's end (`#[serde(flatten)]` would serialize the whole request through a map, which
/// cost a tenth of a chat's instructions).
fn serialize(upstream: &UpstreamRequest) -> Result<bytes::Bytes, UpstreamError> {
    let mut body = serde_json::to_vec(&upstream.request).map_err(|e| {
        UpstreamError::new(
            UpstreamKind::Unavailable,
            format!("the request could not be serialized: {e}"),
        )
    })?;
    if let (Some(cap), Some(b'}')) = (upstream.max_tokens, body.last()) {
        body.pop();
        body.extend_from_slice(format!(",\"max_tokens\":{cap}}}").as_bytes());
    }
    Ok(body.into())
}

/// An event that is not a chunk: OpenAI's `{"error": {...}}` mid-stream, or garbage.
fn stream_failure(data: &[u8], error: serde_json::Error, key: &ApiKey) -> UpstreamError {
    let message = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_string))
        .map(|m| format!("the stream failed: {m}"))
        .unwrap_or_else(|| format!("malformed event from the OpenAI server: {error}"));
    UpstreamError::new(UpstreamKind::Unavailable, key.redact(&message))
}

fn timed_out(what: &str, after: Duration) -> UpstreamError {
    UpstreamError::new(
        UpstreamKind::Timeout,
        format!(
            "{what} from the OpenAI server within {:.0} s",
            after.as_secs_f64()
        ),
    )
}

/// An upstream's `context_length_exceeded`, in words a chat window's user can act on.
pub const CONTEXT_TOO_LONG: &str = "This conversation is too long for the model's context window. Start a new conversation, or shorten the message or its attachments.";

/// Maps a failed call to the client-facing classification; the key is redacted from anything
/// the upstream said.
fn classify(error: CallError, key: &ApiKey, base_url: &str, head_pending: bool) -> UpstreamError {
    // Before the response head: a refused or reset connection, or a timeout (which `send`
    // reports when its own limits pass), may go to another upstream; so may a 429 or a 5xx.
    let failover = match &error {
        CallError::Status(status) => {
            status.status.as_u16() == 429 || status.status.is_server_error()
        }
        CallError::Http(_) => head_pending,
        CallError::Malformed(_) => false,
    };
    let unprocessed = match &error {
        CallError::Status(status) => status.status.is_client_error(),
        CallError::Http(e) => e.is_connect(),
        CallError::Malformed(_) => false,
    };
    let (kind, message) = match error {
        // The window is unknown here or wrong in the price table: a sentence, not OpenAI's text.
        CallError::Status(status) if status.code.as_deref() == Some("context_length_exceeded") => {
            (UpstreamKind::Rejected, CONTEXT_TOO_LONG.to_string())
        }
        CallError::Status(status) => (
            kind_of(status.status, status.retry_after),
            describe(&status),
        ),
        CallError::Http(e) if e.is_timeout() => (
            UpstreamKind::Timeout,
            format!("request timed out: {}", root_cause(&e)),
        ),
        CallError::Http(e) if e.is_connect() => (
            UpstreamKind::Unavailable,
            format!("cannot connect to {base_url}: {}", root_cause(&e)),
        ),
        CallError::Http(e) => (
            UpstreamKind::Unavailable,
            format!("connection failed: {}", root_cause(&e)),
        ),
        CallError::Malformed(reason) => (UpstreamKind::Unavailable, reason),
    };
    UpstreamError {
        unprocessed,
        failover,
        ..UpstreamError::new(kind, key.redact(&message))
    }
}

/// A failure before the response head: another upstream may answer.
fn before_head(error: UpstreamError) -> UpstreamError {
    UpstreamError {
        failover: true,
        ..error
    }
}

fn kind_of(status: reqwest::StatusCode, retry_after: Option<Duration>) -> UpstreamKind {
    match status.as_u16() {
        401 => UpstreamKind::Unauthorized,
        429 => UpstreamKind::RateLimited { retry_after },
        408 => UpstreamKind::Timeout,
        400..=499 => UpstreamKind::Rejected,
        _ => UpstreamKind::Unavailable,
    }
}

fn describe(status: &UpstreamStatus) -> String {
    if status.status.is_server_error() {
        format!(
            "server error {}: {}",
            status.status.as_u16(),
            status.message
        )
    } else {
        status.message.clone()
    }
}

/// The innermost cause ("Connection refused"), which says more than reqwest's outer text.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

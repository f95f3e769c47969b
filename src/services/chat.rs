//! A chat from request to reply: credentials, the upstream call (once more with a fresh key after
//! a 401), and the bookkeeping every successful chat does (usage statistics, the Papita record,
//! the session's `chat_usage` line), the same for whole and streamed answers.

use std::future::Future;

use futures_util::{Stream, StreamExt};
use serde::Serialize;

use crate::clock::timestamp;
use crate::domain::{ApiKey, ChatRequest};
use crate::error::{ApiError, UpstreamError, UpstreamKind};
use crate::services::log_entries;
use crate::services::openai::{StreamPiece, TokenUsage};
use crate::services::papita::UsageRecord;
use crate::state::AppState;

/// The success answer of `POST /api/chat`, and the `done` event's data when streaming.
#[derive(Debug, Clone, Serialize)]
pub struct ChatReply {
    pub message: String,
    pub usage: ReplyUsage,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize)]
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

/// A whole answer.
pub async fn complete(state: &AppState, request: ChatRequest) -> Result<ChatReply, ApiError> {
    let session = state.sessions.resolve(request.session_id.clone());
    let completion = {
        let request = &request;
        with_key(state, |key| async move {
            state
                .openai
                .complete(&key, &request.model, &request.messages)
                .await
        })
        .await?
    };
    if let Some(usage) = &completion.usage {
        account(state, &request, session.as_deref(), usage);
    }
    Ok(reply(
        state,
        completion.text,
        completion.usage.unwrap_or_default(),
        &request.model,
    ))
}

/// A streamed answer. Failures before the upstream starts answering are ordinary errors; later
/// ones end the stream with an `Error` event. A stream that ends without reporting usage is a
/// failure (not a zero-token success) and is not counted.
pub async fn stream(
    state: &AppState,
    request: ChatRequest,
) -> Result<impl Stream<Item = StreamEvent> + Send + use<>, ApiError> {
    let session = state.sessions.resolve(request.session_id.clone());
    let upstream = {
        let request = &request;
        with_key(state, |key| async move {
            state
                .openai
                .stream(&key, &request.model, &request.messages)
                .await
        })
        .await?
    };
    let state = state.clone();
    Ok(async_stream::stream! {
        let mut upstream = std::pin::pin!(upstream);
        let mut text = String::new();
        let mut usage = None;
        while let Some(piece) = upstream.next().await {
            match piece {
                Ok(StreamPiece::Delta(delta)) => {
                    text.push_str(&delta);
                    yield StreamEvent::Delta(delta);
                }
                Ok(StreamPiece::Usage(u)) => usage = Some(u),
                Err(e) => {
                    tracing::warn!(error = %e, "stream failed after it started");
                    yield StreamEvent::Error(e.to_string());
                    return;
                }
            }
        }
        match usage {
            Some(usage) => {
                account(&state, &request, session.as_deref(), &usage);
                yield StreamEvent::Done(reply(&state, text, usage, &request.model));
            }
            None => {
                tracing::warn!("stream ended without usage; not counted");
                yield StreamEvent::Error(STREAM_WITHOUT_USAGE.into());
            }
        }
    })
}

/// Runs `call` with the current key; on a 401 asks for the key again (Papita may have rotated it)
/// and tries once more if that gives a different key.
pub async fn with_key<T, F, Fut>(state: &AppState, call: F) -> Result<T, ApiError>
where
    F: Fn(ApiKey) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let credentials = state.credentials.get().await;
    let key = credentials
        .usable_key()
        .ok_or(ApiError::NotConfigured)?
        .clone();
    match call(key.clone()).await {
        Err(e) if e.kind == UpstreamKind::Unauthorized => {
            let fresh = state.credentials.after_rejection(&key).await;
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

/// The bookkeeping of one successful chat; nothing here waits on I/O.
fn account(state: &AppState, request: &ChatRequest, session: Option<&str>, usage: &TokenUsage) {
    state.usage.record(session, &request.model, usage);
    state.papita.submit(UsageRecord {
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
        state.session_log.append_background(log_entries::chat_usage(
            id,
            &request.model,
            usage,
            &state.clock.now(),
        ));
    }
}

fn reply(state: &AppState, message: String, usage: TokenUsage, model: &str) -> ChatReply {
    ChatReply {
        message,
        usage: ReplyUsage::new(usage, model),
        timestamp: timestamp(&state.clock.now()),
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

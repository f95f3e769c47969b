//! A chat from request to reply: credentials, the upstream call (once more with a fresh key after
//! a 401), and the bookkeeping every successful chat does (usage statistics, the Papita record,
//! the session's `chat_usage` line), the same for whole and streamed answers.
//!
//! `ChatService` holds what it uses; it knows nothing of HTTP or of the application state.

use std::future::Future;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use serde::Serialize;

use crate::clock::{Clock, timestamp};
use crate::domain::{ApiKey, ChatMessage, ChatRequest, Role, TokenUsage};
use crate::error::NOT_CONFIGURED;
use crate::services::credentials::CredentialProvider;
use crate::services::openai::{Completion, OpenAiService, StreamPiece};
use crate::services::papita::{UsageRecord, UsageReporter};
use crate::services::session_log::{SessionLog, entries};
use crate::services::sessions::Sessions;
use crate::services::upstream::{UpstreamError, UpstreamKind};
use crate::services::usage::UsageStats;

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

/// Why a chat got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// No usable key, from Papita or the environment.
    #[error("{NOT_CONFIGURED}")]
    NotConfigured,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
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
}

impl ChatService {
    pub fn new(
        credentials: Arc<CredentialProvider>,
        openai: OpenAiService,
        usage: Arc<UsageStats>,
        sessions: Arc<Sessions>,
        papita: UsageReporter,
        session_log: SessionLog,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            credentials,
            openai,
            usage,
            sessions,
            papita,
            session_log,
            clock,
        }
    }

    /// A whole answer.
    pub async fn complete(&self, request: ChatRequest) -> Result<ChatReply, ChatError> {
        let session = self.sessions.resolve(request.session_id.clone()).await;
        let completion = {
            let request = &request;
            self.with_key(|key| async move {
                self.openai
                    .complete(&key, &request.model, &request.messages)
                    .await
            })
            .await?
        };
        if let Some(usage) = &completion.usage {
            self.account(&request, session.as_deref(), usage).await;
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
        let session = self.sessions.resolve(request.session_id.clone()).await;
        let upstream = {
            let request = &request;
            self.with_key(|key| async move {
                self.openai
                    .stream(&key, &request.model, &request.messages)
                    .await
            })
            .await?
        };
        let this = self.clone();
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
                    this.account(&request, session.as_deref(), &usage).await;
                    yield StreamEvent::Done(this.reply(text, usage, &request.model));
                }
                None => {
                    tracing::warn!("stream ended without usage; not counted");
                    yield StreamEvent::Error(STREAM_WITHOUT_USAGE.into());
                }
            }
        })
    }

    /// `GET /api/openai/test`: one real call with `model`; not counted in usage statistics.
    pub async fn test_connection(&self, model: &str) -> Result<Completion, ChatError> {
        let messages = [ChatMessage {
            role: Role::User,
            content: TEST_PROMPT.into(),
        }];
        let messages = &messages;
        self.with_key(|key| async move { self.openai.complete(&key, model, messages).await })
            .await
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
                &self.clock.now(),
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

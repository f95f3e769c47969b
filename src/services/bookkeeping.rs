//! What a finished call leaves behind, in one place: usage statistics, its consumer's figures,
//! chats per minute, the Papita usage record and the session's `chat_usage` line. `ChatService` calls `record` once
//! per call, however it ended; nothing here waits on the network or the disk.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::{ChatRequest, Consumer, TokenUsage};
use crate::services::consumers::Consumers;
use crate::services::papita::{UsageRecord, UsageReporter};
use crate::services::session_log::{SessionLog, entries};
use crate::services::usage::{ChatsPerMinute, UsageKind, UsageStats};

/// How a call ended, as far as the books go.
pub enum Outcome<'a> {
    /// A chat answered with the upstream's usage: everything is counted.
    Answered {
        request: &'a ChatRequest,
        session: Option<&'a str>,
        usage: &'a TokenUsage,
        /// History turns dropped to fit the model's window (recorded in `chat_usage`).
        history_trimmed: usize,
    },
    /// `GET /api/openai/test` answered: `test_usage`, apart from the chats.
    Tested {
        model: &'a str,
        usage: &'a TokenUsage,
    },
    /// A stream cut short (the client left, the upstream broke, no usage came): its estimate,
    /// `estimated_usage`.
    Estimated {
        session: Option<&'a str>,
        consumer: &'a Consumer,
        model: &'a str,
        usage: &'a TokenUsage,
    },
}

pub struct Bookkeeping {
    usage: Arc<UsageStats>,
    consumers: Arc<Consumers>,
    papita: UsageReporter,
    session_log: SessionLog,
    clock: Arc<dyn Clock>,
    /// Successful chats per minute over the last hour (the dashboard).
    chats_per_minute: ChatsPerMinute,
    /// Where `record_later` runs: the application's background tasks, which shutdown waits for.
    tasks: TaskTracker,
}

impl Bookkeeping {
    pub fn new(
        usage: Arc<UsageStats>,
        consumers: Arc<Consumers>,
        papita: UsageReporter,
        session_log: SessionLog,
        clock: Arc<dyn Clock>,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            usage,
            consumers,
            papita,
            session_log,
            clock,
            chats_per_minute: ChatsPerMinute::default(),
            tasks,
        }
    }

    pub fn chats_per_minute(&self) -> &ChatsPerMinute {
        &self.chats_per_minute
    }

    pub async fn record(&self, outcome: Outcome<'_>) {
        match outcome {
            Outcome::Answered {
                request,
                session,
                usage,
                history_trimmed,
            } => {
                self.answered(request, session, usage, history_trimmed)
                    .await
            }
            Outcome::Tested { model, usage } => {
                self.usage
                    .record_kind(UsageKind::Test, None, model, usage)
                    .await;
            }
            Outcome::Estimated {
                session,
                consumer,
                model,
                usage,
            } => {
                let cost = self
                    .usage
                    .record_kind(UsageKind::Estimated, session, model, usage)
                    .await;
                // What a cut stream cost counts against its consumer, as against its quota.
                self.consumers.record(consumer, usage, &cost).await;
            }
        }
    }

    /// `record` of an estimate from where nothing can be awaited (a `Drop`): on the tracker.
    pub fn record_estimate_later(
        self: &Arc<Self>,
        session: Option<String>,
        consumer: Consumer,
        model: String,
        usage: TokenUsage,
    ) {
        let books = self.clone();
        self.tasks.spawn(async move {
            books
                .record(Outcome::Estimated {
                    session: session.as_deref(),
                    consumer: &consumer,
                    model: &model,
                    usage: &usage,
                })
                .await;
        });
    }

    async fn answered(
        &self,
        request: &ChatRequest,
        session: Option<&str>,
        usage: &TokenUsage,
        history_trimmed: usize,
    ) {
        let cost = self.usage.record(session, &request.model, usage).await;
        let consumer = Consumer::of(&request.user, request.client);
        self.consumers.record(&consumer, usage, &cost).await;
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
                history_trimmed,
                &request.user,
                &now,
            ));
        }
    }
}

//! Usage records to Papita (contract §9), off the request path.
//!
//! A chat only puts its record into a bounded queue (never waits, never fails because of Papita);
//! a background worker sends records with a few in flight at once, retries connection errors and
//! 5xx with backoff, counts what it drops, and on shutdown sends what is still queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PapitaSettings;
use crate::services::papita::{PapitaClient, UsageRejected};

/// The record exactly as Papita expects it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageRecord {
    #[serde(rename = "userId")]
    pub user_id: Option<String>,
    pub username: String,
    #[serde(rename = "isGuest")]
    pub is_guest: bool,
    #[serde(rename = "sessionId")]
    pub session_id: Option<String>,
    #[serde(rename = "projectId")]
    pub project_id: &'static str,
    pub model: String,
    #[serde(rename = "inputTokens")]
    pub input_tokens: u64,
    #[serde(rename = "outputTokens")]
    pub output_tokens: u64,
    #[serde(rename = "totalTokens")]
    pub total_tokens: u64,
}

/// Counters for the logs and for tests.
#[derive(Debug, Default)]
pub struct ReporterStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Clone)]
pub struct UsageReporter {
    queue: mpsc::Sender<UsageRecord>,
    stats: Arc<ReporterStats>,
}

/// Records sent to Papita at the same time.
const CONCURRENCY: usize = 8;

impl UsageReporter {
    /// Starts the worker on `tracker`; it stops taking new records when `shutdown` fires, sends
    /// what is queued, and ends.
    pub fn spawn(
        settings: &PapitaSettings,
        client: PapitaClient,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let (queue, rx) = mpsc::channel(settings.usage_queue_capacity.get());
        let stats = Arc::new(ReporterStats::default());
        let sender = Sender {
            client,
            max_attempts: settings.usage_max_attempts.get(),
            stats: stats.clone(),
        };
        tracker.spawn(run(rx, sender, shutdown));
        Self { queue, stats }
    }

    /// Queues a record; when the queue is full the record is dropped and counted.
    pub fn submit(&self, record: UsageRecord) {
        if self.queue.try_send(record).is_err() {
            let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                "Papita usage queue full or closed; usage record dropped"
            );
        }
    }

    pub fn stats(&self) -> &ReporterStats {
        &self.stats
    }
}

async fn run(mut rx: mpsc::Receiver<UsageRecord>, sender: Sender, shutdown: CancellationToken) {
    let sender = Arc::new(sender);
    let in_flight = Arc::new(Semaphore::new(CONCURRENCY));
    let tasks = TaskTracker::new();
    loop {
        let record = tokio::select! {
            record = rx.recv() => record,
            _ = shutdown.cancelled() => {
                // Take no more; what is already queued is still sent below.
                rx.close();
                rx.recv().await
            }
        };
        let Some(record) = record else { break };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let sender = sender.clone();
        tasks.spawn(async move {
            sender.send(&record).await;
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    tracing::debug!(
        sent = sender.stats.sent.load(Ordering::Relaxed),
        dropped = sender.stats.dropped.load(Ordering::Relaxed),
        "Papita usage reporter stopped"
    );
}

struct Sender {
    client: PapitaClient,
    max_attempts: u32,
    stats: Arc<ReporterStats>,
}

impl Sender {
    async fn send(&self, record: &UsageRecord) {
        for attempt in 1..=self.max_attempts {
            let UsageRejected { retryable, reason } = match self.client.post_usage(record).await {
                Ok(()) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(rejected) => rejected,
            };
            if !retryable || attempt == self.max_attempts {
                let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(attempt, %reason, dropped, "Papita usage record dropped");
                return;
            }
            tracing::debug!(attempt, %reason, "Papita usage record failed; retrying");
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt - 1))).await;
        }
    }
}

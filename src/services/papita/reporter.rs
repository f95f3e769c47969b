//! Usage records to Papita (contract §9), off the request path, never lost silently.
//!
//! A chat only hands its record over (never waits on Papita or the disk, never fails because
//! of them). Records are spread over `PAPITA_USAGE_CONCURRENCY` lanes by session, so each lane
//! sends in order and a session's records arrive in order. A lane sends from memory while Papita
//! keeps up; when its share of the memory queue is full, or a record still fails after
//! `PAPITA_USAGE_MAX_ATTEMPTS`, the lane moves what waits to its durable spool
//! (`spool.rs`) and replays it in order once Papita answers again, also after a restart. Only
//! past `PAPITA_SPOOL_MAX_MB` (or when the disk refuses) is a record dropped, counted and logged.
//!
//! On shutdown the lanes send what is queued in memory; at the end of the grace budget they write
//! what is left to the spool. A crash (kill -9) loses at most the records in memory: at most
//! `PAPITA_USAGE_QUEUE_CAPACITY` queued, plus each lane's overflow (at most the larger of its
//! share of the queue and 1,024) on its way to disk, plus one in flight per lane.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PapitaSettings;
use crate::services::papita::connection::UsageConnection;
use crate::services::papita::spool::{LaneSpool, SpoolBudget};
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

/// What happened to the records since start-up (for `/api/ready`, the logs and tests).
#[derive(Debug, Default)]
pub struct ReporterStats {
    /// Delivered from memory (a 2xx).
    pub sent: AtomicU64,
    /// Attempts made again after a failure (in memory or from the spool).
    pub retried: AtomicU64,
    /// Written to the spool.
    pub spooled: AtomicU64,
    /// Delivered from the spool.
    pub replayed: AtomicU64,
    /// Refused by Papita with a 4xx (sending again cannot help): not kept.
    pub rejected: AtomicU64,
    /// Lost: the spool was full or not writable, or its memory overflow was.
    pub dropped: AtomicU64,
    /// Spool lines that were not a record (a damaged file): skipped.
    pub malformed: AtomicU64,
}

/// A snapshot of the counters, as `/api/ready` reports them.
#[derive(Debug, Clone, Serialize)]
pub struct ReporterSnapshot {
    pub sent: u64,
    pub retried: u64,
    pub spooled: u64,
    pub replayed: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub malformed: u64,
    /// Bytes in the spool still to be replayed, and the limit.
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub spool_dir: String,
}

/// One lane as the submitting side sees it.
struct LaneInput {
    queue: mpsc::Sender<Bytes>,
    /// Set when the queue was full: until the lane has moved everything to its spool, new
    /// records go here (after the queue's, so the order holds). Bounded like the queue.
    overflow: Mutex<Vec<Bytes>>,
    overflowing: AtomicBool,
    /// Shared by every lane's overflow: a hot lane (one busy session: all its records go to one
    /// lane, in order) may hold more than its share while its spool write waits on the disk.
    held: Arc<OverflowBudget>,
    /// Wakes the lane when records land in the overflow.
    wake: tokio::sync::Notify,
}

#[derive(Clone)]
pub struct UsageReporter {
    lanes: Arc<Vec<Arc<LaneInput>>>,
    stats: Arc<ReporterStats>,
    budget: Arc<SpoolBudget>,
    spool_dir: Arc<PathBuf>,
    next_guest_lane: Arc<AtomicUsize>,
    spool_at: Arc<OnceLock<Instant>>,
}

/// The lanes' overflows hold at least this many records per lane between them while they are
/// moved to disk, so a lane busy with one record does not drop the burst behind it (32 lanes:
/// ~8 MB at most). It is one budget for all lanes: one busy session's lane may use all of it.
const OVERFLOW_MIN: usize = 1024;

/// Records held in all the lanes' overflows, and the most they may hold together.
#[derive(Debug)]
struct OverflowBudget {
    held: AtomicUsize,
    max: usize,
}

impl OverflowBudget {
    fn take_one(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max).then_some(held + 1)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}
/// Replayed lines per read from the spool.
const REPLAY_BATCH: usize = 64;
/// Waits between attempts while Papita is failing: from the first to the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl UsageReporter {
    /// Starts the lanes on `tracker`. When `shutdown` fires they send what is queued in memory
    /// and end; at the moment given to `spool_at` they write whatever is left to the spool and
    /// end.
    pub fn spawn(
        settings: &PapitaSettings,
        spool_dir: PathBuf,
        client: PapitaClient,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let spool_at = Arc::new(OnceLock::new());
        let lanes = settings.usage_concurrency.get();
        let per_lane = settings.usage_queue_capacity.get().div_ceil(lanes).max(1);
        let stats = Arc::new(ReporterStats::default());
        let budget = Arc::new(SpoolBudget {
            used: AtomicU64::new(0),
            max: settings.spool_max_bytes,
        });
        let mut inputs = Vec::with_capacity(lanes);
        let held = Arc::new(OverflowBudget {
            held: AtomicUsize::new(0),
            max: per_lane.max(OVERFLOW_MIN) * lanes,
        });
        for index in 0..lanes {
            let (queue, rx) = mpsc::channel(per_lane);
            let input = Arc::new(LaneInput {
                queue,
                overflow: Mutex::new(Vec::new()),
                overflowing: AtomicBool::new(false),
                held: held.clone(),
                wake: tokio::sync::Notify::new(),
            });
            let spool = match LaneSpool::open(&spool_dir, index, lanes, budget.clone()) {
                Ok(spool) => Some(spool),
                Err(e) => {
                    tracing::error!(error = %e, dir = %spool_dir.display(), "Papita spool cannot be opened; records that cannot be sent will be dropped");
                    None
                }
            };
            let lane = Lane {
                index,
                input: input.clone(),
                rx,
                spool: spool.map(|s| Arc::new(Mutex::new(s))),
                connection: client.usage_connection(tracker),
                client: client.clone(),
                max_attempts: settings.usage_max_attempts.get(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                spool_at: spool_at.clone(),
            };
            tracker.spawn(lane.run());
            inputs.push(input);
        }
        Self {
            lanes: Arc::new(inputs),
            stats,
            budget,
            spool_dir: Arc::new(spool_dir),
            next_guest_lane: Arc::default(),
            spool_at,
        }
    }

    /// At shutdown, before the lanes are told to stop: from `at` on, what they have not sent
    /// goes to the spool (the end of the grace budget, less the time spooling takes).
    pub fn spool_at(&self, at: Instant) {
        let _ = self.spool_at.set(at);
    }

    /// Hands a record over; never waits.
    pub fn submit(&self, record: UsageRecord) {
        let lane = match &record.session_id {
            Some(id) => {
                let mut hasher = DefaultHasher::new();
                id.hash(&mut hasher);
                hasher.finish() as usize % self.lanes.len()
            }
            // No session, no order to keep: spread them.
            None => self.next_guest_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len(),
        };
        let body = Bytes::from(serde_json::to_vec(&record).expect("a record serializes"));
        let input = &self.lanes[lane];
        if input.overflowing.load(Ordering::Acquire) && input.push_overflow(&body, &self.stats) {
            return;
        }
        match input.queue.try_send(body) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(body)) => {
                let mut overflow = input.overflow.lock().unwrap_or_else(|e| e.into_inner());
                input.overflowing.store(true, Ordering::Release);
                input.push_locked(&mut overflow, body, &self.stats);
                drop(overflow);
                input.wake.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    dropped,
                    "Papita usage reporter stopped; usage record dropped"
                );
            }
        }
    }

    pub fn stats(&self) -> &ReporterStats {
        &self.stats
    }

    pub fn snapshot(&self) -> ReporterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        ReporterSnapshot {
            sent: get(&s.sent),
            retried: get(&s.retried),
            spooled: get(&s.spooled),
            replayed: get(&s.replayed),
            rejected: get(&s.rejected),
            dropped: get(&s.dropped),
            malformed: get(&s.malformed),
            spool_bytes: get(&self.budget.used),
            spool_max_bytes: self.budget.max,
            spool_dir: self.spool_dir.display().to_string(),
        }
    }
}

impl LaneInput {
    /// Pushes to the overflow if the lane is still overflowing (checked under the lock, so a
    /// lane that just caught up never strands a record there). False: use the queue.
    fn push_overflow(&self, body: &Bytes, stats: &ReporterStats) -> bool {
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        if !self.overflowing.load(Ordering::Acquire) {
            return false;
        }
        self.push_locked(&mut overflow, body.clone(), stats);
        drop(overflow);
        self.wake.notify_one();
        true
    }

    fn push_locked(&self, overflow: &mut Vec<Bytes>, body: Bytes, stats: &ReporterStats) {
        if self.held.take_one() {
            overflow.push(body);
        } else {
            let dropped = stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                "Papita usage overflow full (the spool cannot keep up); usage record dropped"
            );
        }
    }
}

/// One sending lane: everything of the sessions hashed to it, in order.
struct Lane {
    index: usize,
    input: Arc<LaneInput>,
    rx: mpsc::Receiver<Bytes>,
    spool: Option<Arc<Mutex<LaneSpool>>>,
    client: PapitaClient,
    /// The lane's own kept-alive connection for plain-HTTP Papita URLs (`connection.rs`);
    /// `None`: the pooled reqwest client.
    connection: Option<UsageConnection>,
    max_attempts: u32,
    stats: Arc<ReporterStats>,
    shutdown: CancellationToken,
    /// Set at shutdown: when what is unsent goes to the spool.
    spool_at: Arc<OnceLock<Instant>>,
}

/// Completes at the spool moment: once `shutdown` fired and `at` has come (at once if shutdown
/// came without one).
async fn spool_moment(shutdown: &CancellationToken, at: &OnceLock<Instant>) {
    shutdown.cancelled().await;
    if let Some(at) = at.get() {
        tokio::time::sleep_until(*at).await;
    }
}

/// How an attempt to deliver ended.
enum Delivery {
    Delivered,
    /// A 4xx: Papita will never take it.
    Rejected(String),
    /// Still failing after the attempts allowed.
    Failed(String),
    /// The spool moment came mid-attempt.
    Interrupted,
}

impl Lane {
    async fn run(mut self) {
        loop {
            if self.spool_time() {
                break;
            }
            if self.has_backlog().await {
                if self.shutdown.is_cancelled() {
                    // Shutting down: what waits on disk stays there for the next start.
                    self.move_memory_to_spool(None).await;
                    if !self.input.overflowing.load(Ordering::Acquire) && self.rx.is_empty() {
                        break;
                    }
                    continue;
                }
                self.spool_mode().await;
                continue;
            }
            let record = tokio::select! {
                biased;
                () = spool_moment(&self.shutdown, &self.spool_at) => break,
                record = self.rx.recv() => record,
                () = self.shutdown.cancelled(), if self.rx.is_empty() => break,
                () = self.input.wake.notified() => continue,
            };
            let Some(record) = record else { break };
            match self.deliver(&record, self.max_attempts).await {
                Delivery::Delivered => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::Rejected(reason) => self.rejected(&reason),
                Delivery::Failed(reason) => {
                    tracing::warn!(lane = self.index, %reason, "Papita usage record not delivered; spooled for later");
                    self.move_memory_to_spool(Some(record)).await;
                }
                Delivery::Interrupted => {
                    self.move_memory_to_spool(Some(record)).await;
                }
            }
        }
        // Whatever is still in memory goes to disk rather than being lost.
        self.move_memory_to_spool(None).await;
    }

    /// Something waits on disk, or the memory queue overflowed.
    async fn has_backlog(&self) -> bool {
        if self.input.overflowing.load(Ordering::Acquire) {
            return true;
        }
        match &self.spool {
            Some(spool) => !spool.lock().unwrap_or_else(|e| e.into_inner()).is_empty(),
            None => false,
        }
    }

    /// Spool mode: what arrives goes to disk (after what is there), and the disk is replayed in
    /// order while Papita takes it.
    async fn spool_mode(&mut self) {
        self.move_memory_to_spool(None).await;
        let Some(spool) = self.spool.clone() else {
            return;
        };
        let batch = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || {
                spool
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_batch(REPLAY_BATCH)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(lane = self.index, error = %e, "Papita spool unreadable; waiting");
                self.pause(BACKOFF_MAX).await;
                return;
            }
        };
        if batch.malformed > 0 {
            self.stats
                .malformed
                .fetch_add(batch.malformed, Ordering::Relaxed);
            tracing::warn!(
                lane = self.index,
                skipped = batch.malformed,
                "Papita spool: lines that are not a usage record were skipped"
            );
        }
        let mut committed = None;
        let mut backoff = BACKOFF_FIRST;
        for (line, end) in batch.lines {
            if !line.is_empty() {
                loop {
                    match self.deliver(&line, 1).await {
                        Delivery::Delivered => {
                            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Delivery::Rejected(reason) => {
                            self.rejected(&reason);
                            break;
                        }
                        Delivery::Failed(_) => {
                            // Papita is still failing: keep the record on disk, wait, try again.
                            self.commit(&spool, committed).await;
                            self.stats.retried.fetch_add(1, Ordering::Relaxed);
                            if !self.pause(backoff).await {
                                return;
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            // New records may have arrived meanwhile: to disk, behind this one.
                            self.move_memory_to_spool(None).await;
                            committed = None;
                        }
                        Delivery::Interrupted => {
                            self.commit(&spool, committed).await;
                            return;
                        }
                    }
                }
            }
            committed = Some(end);
        }
        self.commit(&spool, committed).await;
    }

    async fn commit(&self, spool: &Arc<Mutex<LaneSpool>>, offset: Option<u64>) {
        let Some(offset) = offset else { return };
        let spool = spool.clone();
        let result = tokio::task::spawn_blocking(move || {
            spool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .commit(offset)
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!(lane = self.index, error = %e, "Papita spool cursor not saved (a restart may send some records twice)");
        }
    }

    /// Shutting down and the spool moment reached.
    fn spool_time(&self) -> bool {
        self.shutdown.is_cancelled() && self.spool_at.get().is_none_or(|at| Instant::now() >= *at)
    }

    /// Completes at the spool moment.
    async fn spool_moment(&self) {
        spool_moment(&self.shutdown, &self.spool_at).await;
    }

    /// Waits `backoff`, unless told to stop; false when told to stop.
    async fn pause(&self, backoff: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(backoff) => true,
            () = self.spool_moment() => false,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Moves `first` (if any), then the queue, then the overflow to the spool, in that order,
    /// and ends the overflow once it is empty.
    async fn move_memory_to_spool(&mut self, first: Option<Bytes>) {
        let mut lines: Vec<Bytes> = first.into_iter().collect();
        while let Ok(record) = self.rx.try_recv() {
            lines.push(record);
        }
        {
            let mut overflow = self
                .input
                .overflow
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.input.held.give_back(overflow.len());
            lines.append(&mut overflow);
            // Records submitted from now on use the queue again; it was just emptied, and the
            // spool (if any) is replayed before the queue is read, so order holds.
            self.input.overflowing.store(false, Ordering::Release);
        }
        if lines.is_empty() {
            return;
        }
        let count = lines.len() as u64;
        let Some(spool) = self.spool.clone() else {
            let dropped = self.stats.dropped.fetch_add(count, Ordering::Relaxed) + count;
            tracing::error!(
                lane = self.index,
                dropped,
                "Papita spool unavailable; usage records dropped"
            );
            return;
        };
        let result = tokio::task::spawn_blocking(move || {
            spool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&lines)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match result {
            Ok(appended) => {
                self.stats
                    .spooled
                    .fetch_add(appended.spooled, Ordering::Relaxed);
                if appended.dropped > 0 {
                    let dropped = self
                        .stats
                        .dropped
                        .fetch_add(appended.dropped, Ordering::Relaxed)
                        + appended.dropped;
                    tracing::error!(
                        lane = self.index,
                        dropped,
                        "Papita spool full (PAPITA_SPOOL_MAX_MB); usage records dropped"
                    );
                }
            }
            Err(e) => {
                let dropped = self.stats.dropped.fetch_add(count, Ordering::Relaxed) + count;
                tracing::error!(lane = self.index, error = %e, dropped, "Papita spool not writable; usage records dropped");
            }
        }
    }

    /// Up to `attempts` tries, with backoff between them on failures worth repeating. Meanwhile
    /// an overflowing queue is moved to the spool (behind this record only if it is delivered:
    /// a record that finally fails lands after what was spilled during its attempts).
    async fn deliver(&mut self, body: &Bytes, attempts: u32) -> Delivery {
        let client = self.client.clone();
        let mut backoff = BACKOFF_FIRST;
        for attempt in 1..=attempts {
            // Out of `self` while the post runs (the spool moves below need `&mut self`); an
            // interrupted post leaves it out, so a half-sent request's connection is not reused.
            let mut connection = self.connection.take();
            let sent = {
                let mut post = std::pin::pin!(async {
                    match connection.as_mut() {
                        Some(connection) => connection.post(body.clone()).await,
                        None => client.post_usage_body(body.clone()).await,
                    }
                });
                loop {
                    tokio::select! {
                        sent = &mut post => break sent,
                        () = self.spool_moment() => return Delivery::Interrupted,
                        () = self.input.wake.notified() => self.move_memory_to_spool(None).await,
                    }
                }
            };
            self.connection = connection;
            let UsageRejected { retryable, reason } = match sent {
                Ok(()) => return Delivery::Delivered,
                Err(rejected) => rejected,
            };
            if !retryable {
                return Delivery::Rejected(reason);
            }
            if attempt == attempts {
                return Delivery::Failed(reason);
            }
            tracing::debug!(attempt, %reason, "Papita usage record failed; retrying");
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            let mut wait = std::pin::pin!(tokio::time::sleep(backoff));
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    () = self.spool_moment() => return Delivery::Interrupted,
                    () = self.input.wake.notified() => self.move_memory_to_spool(None).await,
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        Delivery::Failed("no attempt allowed".into())
    }

    fn rejected(&self, reason: &str) {
        let rejected = self.stats.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(%reason, rejected, "Papita refused a usage record (4xx) or did not answer in time (it may have counted it); not sent again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(held: &Arc<OverflowBudget>) -> LaneInput {
        LaneInput {
            queue: mpsc::channel(1).0,
            overflow: Mutex::new(Vec::new()),
            overflowing: AtomicBool::new(true),
            held: held.clone(),
            wake: tokio::sync::Notify::new(),
        }
    }

    #[test]
    fn one_busy_lane_may_use_the_whole_overflow_budget_and_no_more() {
        // 32 lanes' worth of overflow, all of it wanted by one session's lane.
        let held = Arc::new(OverflowBudget {
            held: AtomicUsize::new(0),
            max: 32 * OVERFLOW_MIN,
        });
        let (hot, quiet) = (lane(&held), lane(&held));
        let stats = ReporterStats::default();
        for _ in 0..5 * OVERFLOW_MIN {
            assert!(hot.push_overflow(&Bytes::from_static(b"{}"), &stats));
        }
        assert_eq!(hot.overflow.lock().unwrap().len(), 5 * OVERFLOW_MIN);
        assert_eq!(
            stats.dropped.load(Ordering::Relaxed),
            0,
            "more than one lane's share, none lost"
        );
        for _ in 0..27 * OVERFLOW_MIN {
            quiet.push_overflow(&Bytes::from_static(b"{}"), &stats);
        }
        // The budget is spent: the next record is dropped (and counted), whichever lane.
        hot.push_overflow(&Bytes::from_static(b"{}"), &stats);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
        // Moved to disk, the records give their room back.
        let moved = hot.overflow.lock().unwrap().len();
        held.give_back(moved);
        assert!(hot.push_overflow(&Bytes::from_static(b"{}"), &stats));
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    }
}

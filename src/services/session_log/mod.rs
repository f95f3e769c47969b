//! The session log (contract §10): daily JSON-lines files, one writer, group commit.
//!
//! One OS thread owns the files. Handlers hand it finished lines over a bounded channel; it takes
//! whatever is queued, appends each date's lines with one `write`, makes them durable with one
//! `fdatasync` per file, and only then acknowledges every line of the batch. So lines are never
//! interleaved or torn, a 200 for a session start/stop means its line is on disk, and a hundred
//! concurrent sessions cost one sync, not a hundred. A failed write is cut back to the last whole
//! line and the file is reopened on the next batch, so logging resumes by itself once the folder
//! is writable again.
//!
//! Lines nobody waits for (`chat_usage` metrics) do not wake the writer: they collect in a bounded
//! buffer that the writer takes with its next batch, or at the latest every `BACKGROUND_EVERY`.
//! At thousands of chats a second that is one `write` per tick instead of one wake-up per line.

pub mod entries;
mod line;
mod writer;

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::NaiveDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::SessionLogMetrics;
pub use line::Line;
use writer::Writer;

/// Lines taken into one batch at most.
const MAX_BATCH: usize = 4096;
/// How long a background line may wait for the writer.
const BACKGROUND_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

enum Command {
    Append {
        line: Line,
        ack: Option<oneshot::Sender<io::Result<()>>>,
    },
    /// Answered once everything queued before it has been handled.
    Flush(oneshot::Sender<()>),
    /// As `Flush`, then the writer thread ends (shutdown).
    Close(oneshot::Sender<()>),
    /// Write what the background buffer holds.
    Tick,
}

/// Background lines waiting for the writer, bounded.
type Backlog = Arc<std::sync::Mutex<Vec<Line>>>;

#[derive(Clone)]
pub struct SessionLog {
    tx: mpsc::Sender<Command>,
    backlog: Backlog,
    /// Most background lines held at once; more are dropped and counted.
    backlog_capacity: usize,
    dir: Arc<PathBuf>,
    dropped: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    /// `LOG_MIN_FREE_MB` in bytes, and the session writes refused for want of it.
    min_free: u64,
    refused_low_disk: Arc<AtomicU64>,
    /// The writer thread, joined by `close`.
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// The log folder's file system has less free space than `LOG_MIN_FREE_MB`.
#[derive(Debug, Clone, Copy)]
pub struct LowDisk {
    pub free: u64,
    pub min_free: u64,
}

impl std::fmt::Display for LowDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MB free, below the {} MB kept free (LOG_MIN_FREE_MB)",
            self.free / (1024 * 1024),
            self.min_free / (1024 * 1024)
        )
    }
}

impl SessionLog {
    /// Starts the writer thread for `dir` (created when first needed) and the ticker that has it
    /// write background lines. Call from within the Tokio runtime.
    ///
    /// `init` (the `project_init` line) is written first; if the folder is not writable yet, it
    /// is written with the first batch that succeeds.
    /// The writer records its fsync latency and batch sizes in `metrics`.
    /// The ticker runs on `tasks` until `stop`; `close` joins the writer thread.
    pub fn start(
        dir: PathBuf,
        capacity: usize,
        init: Line,
        metrics: SessionLogMetrics,
        min_free: u64,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity);
        let syncs = Arc::new(AtomicU64::new(0));
        let backlog = Backlog::default();
        let written = Arc::new(AtomicU64::new(0));
        let writer = Writer::new(dir.clone(), syncs.clone(), backlog.clone())
            .with_init(init)
            .with_written(written.clone())
            .with_metrics(metrics);
        let thread = std::thread::Builder::new()
            .name("session-log".into())
            .spawn(move || writer.run(rx))?;
        // The ticker ends at shutdown (the last flush takes what is left), or when the log is
        // dropped (it holds only a weak sender).
        let (weak, pending) = (tx.downgrade(), backlog.clone());
        tasks.spawn(async move {
            let mut every = tokio::time::interval(BACKGROUND_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = every.tick() => {}
                }
                let Some(tx) = weak.upgrade() else { break };
                let waiting = !pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
                if waiting {
                    let _ = tx.try_send(Command::Tick);
                }
            }
        });
        Ok(Self {
            tx,
            backlog,
            backlog_capacity: capacity,
            dir: Arc::new(dir),
            dropped: Arc::default(),
            syncs,
            written,
            min_free,
            refused_low_disk: Arc::default(),
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// Writes everything queued, makes it durable, ends the writer thread and waits for it
    /// (shutdown). Appends after this fail.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Command::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Free bytes for an unprivileged writer on the log folder's file system (the folder, or
    /// its nearest existing parent before it is created); `None` when it cannot be read.
    pub fn free_bytes(&self) -> Option<u64> {
        let mut dir: &Path = &self.dir;
        loop {
            if let Ok(stat) = rustix::fs::statvfs(dir) {
                return Some(stat.f_bavail.saturating_mul(stat.f_frsize));
            }
            dir = dir.parent().filter(|p| !p.as_os_str().is_empty())?;
        }
    }

    /// Whether the folder has `LOG_MIN_FREE_MB` free. Session start and stop ask first: past it
    /// they are refused (507) before anything is written, so what was acknowledged stays whole
    /// and the room left serves lines already accepted and the Papita spool.
    pub fn check_room(&self) -> Result<(), LowDisk> {
        match self.free_bytes() {
            Some(free) if free < self.min_free => Err(LowDisk {
                free,
                min_free: self.min_free,
            }),
            _ => Ok(()),
        }
    }

    /// `check_room` for a write: a refusal is counted (`refused_low_disk`).
    pub fn reserve_room(&self) -> Result<(), LowDisk> {
        self.check_room().inspect_err(|low| {
            self.refused_low_disk.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(dir = %self.dir.display(), %low, "session write refused: the disk is nearly full");
        })
    }

    /// Session writes refused because the disk was nearly full.
    pub fn refused_low_disk(&self) -> u64 {
        self.refused_low_disk.load(Ordering::Relaxed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many `fdatasync`s the writer has made (one per file per batch, not per line).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Lines written to the files so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Appends a line and returns once it is on disk (fsync'd).
    pub async fn append_durable(&self, line: Line) -> io::Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Command::Append {
                line,
                ack: Some(ack),
            })
            .await
            .map_err(|_| io::Error::other("the session log writer has stopped"))?;
        done.await
            .unwrap_or_else(|_| Err(io::Error::other("the session log writer has stopped")))
    }

    /// Queues a line without waiting (metric lines: a slow disk must not slow a chat). It is
    /// written within `BACKGROUND_EVERY`, not synced on its own. When the buffer is full the line
    /// is dropped and counted.
    pub fn append_background(&self, line: Line) {
        let accepted = {
            let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
            let room = backlog.len() < self.backlog_capacity;
            if room {
                backlog.push(line);
            }
            room
        };
        if !accepted {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped, "session log queue full; metric line dropped");
        }
    }

    /// Whether the folder takes a new file now (readiness): a probe file is created, written and
    /// removed. Runs on the blocking pool.
    pub async fn check_writable(&self) -> io::Result<()> {
        let dir = self.dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let probe = dir.join(format!(".ready-probe-{}", std::process::id()));
            let written = std::fs::write(&probe, b"ok");
            let _ = std::fs::remove_file(&probe);
            written
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// Waits until everything queued so far has been written (shutdown).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Command::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// Every `session_start` in the files of `dates` (in that order): `(session_id, timestamp)` in
/// file order. Read once at start-up so that a stop after a restart knows its session's start
/// without reading a file per request. Blocking: call from `spawn_blocking`. Unreadable files
/// and lines that are not a whole `session_start` object are skipped.
pub fn read_starts(dir: &Path, dates: &[String]) -> Vec<(String, NaiveDateTime)> {
    let mut starts = Vec::new();
    for date in dates {
        let Ok(file) = File::open(file_path(dir, date)) else {
            continue;
        };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            // Most lines are chat metrics: skip them without parsing.
            if !line.contains("\"session_start\"") {
                continue;
            }
            let Ok(entry) = serde_json::from_str::<StartLine>(&line) else {
                continue;
            };
            if entry.event != "session_start" {
                continue;
            }
            if let Ok(at) = NaiveDateTime::parse_from_str(&entry.timestamp, "%Y-%m-%dT%H:%M:%S%.f")
            {
                starts.push((entry.session_id, at));
            }
        }
    }
    starts
}

#[derive(serde::Deserialize)]
struct StartLine {
    event: String,
    session_id: String,
    timestamp: String,
}

pub fn file_path(dir: &Path, date: &str) -> PathBuf {
    dir.join(format!("session_{date}.log"))
}

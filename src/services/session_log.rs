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

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Lines taken into one batch at most.
const MAX_BATCH: usize = 4096;
/// How long a background line may wait for the writer.
const BACKGROUND_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A finished log line for the file of `date` (`YYYY-MM-DD`, the line's own timestamp date).
#[derive(Debug)]
pub struct Line {
    pub date: String,
    pub bytes: Vec<u8>,
}

impl Line {
    /// Serializes `entry` as the Flask service did (`json.dumps(..., ensure_ascii=False)`):
    /// `", "` and `": "` separators, non-ASCII as is, keys in declaration order.
    pub fn new<T: Serialize>(date: String, entry: &T) -> Self {
        let mut bytes = Vec::with_capacity(160);
        let mut ser = serde_json::Serializer::with_formatter(&mut bytes, PythonFormatter);
        entry
            .serialize(&mut ser)
            .expect("log entries always serialize");
        bytes.push(b'\n');
        Self { date, bytes }
    }
}

/// `serde_json` formatting with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

enum Command {
    Append {
        line: Line,
        ack: Option<oneshot::Sender<io::Result<()>>>,
    },
    /// Answered once everything queued before it has been handled.
    Flush(oneshot::Sender<()>),
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
}

impl SessionLog {
    /// Starts the writer thread for `dir` (created when first needed) and the ticker that has it
    /// write background lines. Call from within the Tokio runtime.
    pub fn start(dir: PathBuf, capacity: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity);
        let syncs = Arc::new(AtomicU64::new(0));
        let backlog = Backlog::default();
        let writer = Writer {
            files: Vec::new(),
            dir: dir.clone(),
            syncs: syncs.clone(),
            backlog: backlog.clone(),
        };
        std::thread::Builder::new()
            .name("session-log".into())
            .spawn(move || writer.run(rx))?;
        // The ticker holds only a weak sender, so it ends when the log is dropped.
        let (weak, pending) = (tx.downgrade(), backlog.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(BACKGROUND_EVERY);
            loop {
                every.tick().await;
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
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many `fdatasync`s the writer has made (one per file per batch, not per line).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
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

    /// Waits until everything queued so far has been written (shutdown).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Command::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The start time of `session_id` as logged in `date`'s file, if it is there
    /// (sessions this process did not start). Blocking: call from `spawn_blocking`.
    pub fn find_start_timestamp(dir: &Path, date: &str, session_id: &str) -> Option<String> {
        let file = File::open(file_path(dir, date)).ok()?;
        let needle = serde_json::to_string(session_id).ok()?;
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                if !line.contains("\"session_start\"") || !line.contains(&needle) {
                    return None;
                }
                let value: serde_json::Value = serde_json::from_str(&line).ok()?;
                (value["event"] == "session_start" && value["session_id"] == session_id)
                    .then(|| value["timestamp"].as_str().map(str::to_string))
                    .flatten()
            })
    }
}

pub fn file_path(dir: &Path, date: &str) -> PathBuf {
    dir.join(format!("session_{date}.log"))
}

struct Writer {
    dir: PathBuf,
    syncs: Arc<AtomicU64>,
    backlog: Backlog,
    /// Open files by date; at most two (today and, around midnight, yesterday).
    files: Vec<(String, File)>,
}

/// The lines of one batch that go to one file.
struct Group {
    date: String,
    bytes: Vec<u8>,
    acks: Vec<oneshot::Sender<io::Result<()>>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut groups: Vec<Group> = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(command) = next.take() {
                taken += 1;
                match command {
                    Command::Append { line, ack } => {
                        // Background lines queued before this one go first.
                        self.take_backlog(&mut groups);
                        add(&mut groups, line, ack);
                    }
                    Command::Flush(ack) => flushes.push(ack),
                    Command::Tick => {}
                }
                if taken < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.take_backlog(&mut groups);
            // Only start/stop lines wait for durability; a batch of metric lines alone is written
            // without a sync (the next durable batch, or shutdown, syncs it).
            let sync = !flushes.is_empty() || groups.iter().any(|g| !g.acks.is_empty());
            for group in groups {
                let result = self.write(&group.date, &group.bytes, sync);
                if let Err(e) = &result {
                    tracing::error!(date = %group.date, error = %e, dir = %self.dir.display(), "session log write failed");
                }
                for ack in group.acks {
                    let _ = ack.send(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| io::Error::new(e.kind(), e.to_string())),
                    );
                }
            }
            if !flushes.is_empty() {
                // Shutdown: make the metric lines written without a sync durable too.
                for (_, file) in &self.files {
                    let _ = file.sync_data();
                }
            }
            for ack in flushes {
                let _ = ack.send(());
            }
        }
    }

    fn take_backlog(&self, groups: &mut Vec<Group>) {
        let lines = std::mem::take(&mut *self.backlog.lock().unwrap_or_else(|e| e.into_inner()));
        for line in lines {
            add(groups, line, None);
        }
    }

    fn write(&mut self, date: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
        let syncs = self.syncs.clone();
        let result = self.file(date).and_then(|file| {
            let before = file.metadata()?.len();
            let mut written = file.write_all(bytes);
            if sync && written.is_ok() {
                written = file.sync_data();
                syncs.fetch_add(1, Ordering::Relaxed);
            }
            if written.is_err() {
                // Cut back to the last whole line, so a full disk never leaves half a line.
                let _ = file.set_len(before);
            }
            written
        });
        if result.is_err() {
            // Reopen next time: the folder may have been replaced, fixed or freed.
            self.files.retain(|(d, _)| d != date);
        }
        result
    }

    fn file(&mut self, date: &str) -> io::Result<&mut File> {
        if let Some(i) = self.files.iter().position(|(d, _)| d == date) {
            return Ok(&mut self.files[i].1);
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = file_path(&self.dir, date);
        let existed = path.exists();
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if !existed {
            // Make the new directory entry itself durable.
            File::open(&self.dir).and_then(|d| d.sync_all())?;
        }
        if self.files.len() >= 2 {
            self.files.remove(0);
        }
        self.files.push((date.to_string(), file));
        Ok(&mut self.files.last_mut().expect("just pushed").1)
    }
}

/// Appends `line` to its date's group, keeping the order of arrival within a date.
fn add(groups: &mut Vec<Group>, line: Line, ack: Option<oneshot::Sender<io::Result<()>>>) {
    let group = match groups.iter_mut().position(|g| g.date == line.date) {
        Some(i) => &mut groups[i],
        None => {
            groups.push(Group {
                date: line.date.clone(),
                bytes: Vec::new(),
                acks: Vec::new(),
            });
            groups.last_mut().expect("just pushed")
        }
    };
    group.bytes.extend_from_slice(&line.bytes);
    group.acks.extend(ack);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_lines_are_written_on_a_tick_without_a_sync_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let backlog = Backlog::default();
        for i in 0..50 {
            backlog
                .lock()
                .unwrap()
                .push(Line::new("2026-11-23".into(), &serde_json::json!({"i": i})));
        }
        let (tx, rx) = mpsc::channel(10);
        tx.try_send(Command::Tick).unwrap();
        drop(tx);
        let syncs = Arc::new(AtomicU64::new(0));
        Writer {
            dir: dir.path().to_path_buf(),
            syncs: syncs.clone(),
            files: Vec::new(),
            backlog: backlog.clone(),
        }
        .run(rx);
        assert_eq!(syncs.load(Ordering::Relaxed), 0);
        assert!(backlog.lock().unwrap().is_empty());
        let text = std::fs::read_to_string(file_path(dir.path(), "2026-11-23")).unwrap();
        assert_eq!(text.lines().count(), 50);
        assert!(text.starts_with("{\"i\": 0}\n"));
    }

    #[test]
    fn queued_lines_are_committed_together_with_one_sync_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(1000);
        let mut acks = Vec::new();
        for i in 0..300 {
            let (ack, done) = oneshot::channel();
            let date = if i % 3 == 0 {
                "2026-11-23"
            } else {
                "2026-11-24"
            };
            let line = Line::new(date.into(), &serde_json::json!({"i": i}));
            tx.try_send(Command::Append {
                line,
                ack: Some(ack),
            })
            .unwrap();
            acks.push(done);
        }
        drop(tx);
        let syncs = Arc::new(AtomicU64::new(0));
        Writer {
            dir: dir.path().to_path_buf(),
            syncs: syncs.clone(),
            files: Vec::new(),
            backlog: Backlog::default(),
        }
        .run(rx);
        assert_eq!(syncs.load(Ordering::Relaxed), 2, "one batch, two files");
        for done in acks {
            done.blocking_recv().unwrap().unwrap();
        }
        let lines = |d: &str| {
            std::fs::read_to_string(file_path(dir.path(), d))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!((lines("2026-11-23"), lines("2026-11-24")), (100, 200));
    }

    #[derive(Serialize)]
    struct Sample<'a> {
        event: &'a str,
        n: f64,
        list: Vec<u8>,
        nested: serde_json::Value,
    }

    #[test]
    fn lines_are_formatted_like_pythons_json_dumps() {
        let line = Line::new(
            "2026-11-23".into(),
            &Sample {
                event: "café",
                n: 1.5,
                list: vec![1, 2],
                nested: serde_json::json!({"b": 1, "a": "x"}),
            },
        );
        assert_eq!(
            String::from_utf8(line.bytes).unwrap(),
            "{\"event\": \"café\", \"n\": 1.5, \"list\": [1, 2], \"nested\": {\"b\": 1, \"a\": \"x\"}}\n"
        );
    }
}

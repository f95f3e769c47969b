//! The writer thread: owns the files, batches what is queued, writes and syncs, acknowledges.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::metrics::SessionLogMetrics;

use super::{Backlog, Command, Line, MAX_BATCH, file_path};

pub(super) struct Writer {
    dir: PathBuf,
    syncs: Arc<AtomicU64>,
    backlog: Backlog,
    /// Open files by date; at most two (today and, around midnight, yesterday).
    files: Vec<(String, File)>,
    /// Lines written so far (for the metrics).
    written: Arc<AtomicU64>,
    /// The start-up `project_init` line until it is written: a folder that is not writable at
    /// start-up delays it, never loses it.
    pending_init: Option<Line>,
    /// Fsync latency and batch sizes, when the application measures them.
    metrics: Option<SessionLogMetrics>,
}

/// The lines of one batch that go to one file.
struct Group {
    date: String,
    bytes: Vec<u8>,
    acks: Vec<oneshot::Sender<io::Result<()>>>,
}

impl Writer {
    pub(super) fn new(dir: PathBuf, syncs: Arc<AtomicU64>, backlog: Backlog) -> Self {
        Self {
            dir,
            syncs,
            backlog,
            files: Vec::new(),
            pending_init: None,
            written: Arc::default(),
            metrics: None,
        }
    }

    /// Records each fsync's latency and each batch's line count in `metrics`.
    pub(super) fn with_metrics(mut self, metrics: SessionLogMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts every line written into `counter`.
    pub(super) fn with_written(mut self, counter: Arc<AtomicU64>) -> Self {
        self.written = counter;
        self
    }

    /// `line` is written first, and retried before every batch until it has been written.
    pub(super) fn with_init(mut self, line: Line) -> Self {
        self.pending_init = Some(line);
        self
    }

    fn write_pending_init(&mut self) {
        if let Some(init) = self.pending_init.take()
            && let Err(e) = self.write(&init.date, &init.bytes, false)
        {
            tracing::warn!(error = %e, dir = %self.dir.display(), "session log folder not writable; project_init line kept for the next write");
            self.pending_init = Some(init);
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.write_pending_init();
        while let Some(first) = rx.blocking_recv() {
            self.write_pending_init();
            let mut groups: Vec<Group> = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            let mut taken = 0;
            let mut closing = false;
            while let Some(command) = next.take() {
                taken += 1;
                match command {
                    Command::Append { line, ack } => {
                        // Background lines queued before this one go first.
                        self.take_backlog(&mut groups);
                        add(&mut groups, line, ack);
                    }
                    Command::Flush(ack) => flushes.push(ack),
                    Command::Close(ack) => {
                        flushes.push(ack);
                        closing = true;
                    }
                    Command::Tick => {}
                }
                if taken < MAX_BATCH && !closing {
                    next = rx.try_recv().ok();
                }
            }
            self.take_backlog(&mut groups);
            // Only start/stop lines wait for durability; a batch of metric lines alone is written
            // without a sync (the next durable batch, or shutdown, syncs it).
            let sync = !flushes.is_empty() || groups.iter().any(|g| !g.acks.is_empty());
            let mut batch_lines = 0;
            for group in groups {
                let result = self.write(&group.date, &group.bytes, sync);
                if result.is_ok() {
                    let lines = group.bytes.iter().filter(|b| **b == b'\n').count() as u64;
                    self.written.fetch_add(lines, Ordering::Relaxed);
                    batch_lines += lines;
                }
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
            if let Some(metrics) = &self.metrics
                && batch_lines > 0
            {
                metrics.batch_lines.observe(batch_lines as f64);
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
            if closing {
                return;
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
        let fsync = self.metrics.as_ref().map(|m| m.fsync.clone());
        let result = self.file(date).and_then(|file| {
            let before = file.metadata()?.len();
            let mut written = file.write_all(bytes);
            if sync && written.is_ok() {
                let started = std::time::Instant::now();
                written = file.sync_data();
                syncs.fetch_add(1, Ordering::Relaxed);
                if let Some(fsync) = &fsync {
                    fsync.observe(started.elapsed().as_secs_f64());
                }
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
        Writer::new(dir.path().to_path_buf(), syncs.clone(), backlog.clone()).run(rx);
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
        Writer::new(dir.path().to_path_buf(), syncs.clone(), Backlog::default()).run(rx);
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
}

//! The durable spool of usage records that Papita could not take yet (contract §9; issue 13).
//!
//! One append-only JSON-lines file per sending lane (`lane-NN.jsonl`), with a cursor file
//! (`lane-NN.cursor`, the byte offset replayed so far). A lane appends with one `write` and one
//! `fdatasync` per batch (group commit), replays from its cursor in order, and truncates its file
//! once everything in it was delivered. Files of a different lane count (after a restart with
//! another `PAPITA_USAGE_CONCURRENCY`) are replayed first by lane `index % lanes`.
//!
//! All methods block (file I/O): call them from `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// Unreplayed bytes across all lanes, against `PAPITA_SPOOL_MAX_MB`.
#[derive(Debug, Default)]
pub struct SpoolBudget {
    pub used: AtomicU64,
    pub max: u64,
}

/// One file of a lane: replayed from `cursor`.
#[derive(Debug)]
struct SpoolFile {
    path: PathBuf,
    cursor_path: PathBuf,
    cursor: u64,
    len: u64,
}

/// One lane's spool: older files first, its own file last.
#[derive(Debug)]
pub struct LaneSpool {
    files: Vec<SpoolFile>,
    budget: Arc<SpoolBudget>,
}

/// What an append did with the lines it was given.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub spooled: u64,
    /// Over the size limit: not written.
    pub dropped: u64,
}

/// Lines read for replay: each with the file offset just past it (to commit once delivered).
#[derive(Debug, Default)]
pub struct ReplayBatch {
    pub lines: Vec<(Bytes, u64)>,
    /// Lines that are not a JSON object (a hand-edited or damaged file): skipped.
    pub malformed: u64,
}

impl LaneSpool {
    /// Opens lane `lane` of `lanes` in `dir` (created with the first append, so a service that
    /// never spools leaves no folder); a torn last line (a crash mid-write) is cut off, so new
    /// lines never join it.
    pub fn open(
        dir: &Path,
        lane: usize,
        lanes: usize,
        budget: Arc<SpoolBudget>,
    ) -> io::Result<Self> {
        let mut older: Vec<(usize, PathBuf)> = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries.collect::<Vec<_>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            let index = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
                n.strip_prefix("lane-")?
                    .strip_suffix(".jsonl")?
                    .parse()
                    .ok()
            });
            if let Some(index) = index
                && index != lane
                && index % lanes == lane
            {
                older.push((index, path));
            }
        }
        older.sort();
        let own = dir.join(format!("lane-{lane:02}.jsonl"));
        let mut files = Vec::new();
        for path in older.into_iter().map(|(_, p)| p).chain([own]) {
            let file = SpoolFile::open(path)?;
            budget
                .used
                .fetch_add(file.len - file.cursor, Ordering::Relaxed);
            files.push(file);
        }
        Ok(Self { files, budget })
    }

    /// Nothing left to replay.
    pub fn is_empty(&self) -> bool {
        self.files.iter().all(|f| f.cursor >= f.len)
    }

    /// Appends `lines` (each one JSON object, no newline) to this lane's own file and makes them
    /// durable with one sync. Lines past the size limit are not written.
    pub fn append(&mut self, lines: &[Bytes]) -> io::Result<Appended> {
        let mut out = Vec::new();
        let mut appended = Appended::default();
        for line in lines {
            let size = line.len() as u64 + 1;
            let used = self.budget.used.load(Ordering::Relaxed);
            if used + size > self.budget.max {
                appended.dropped += 1;
                continue;
            }
            self.budget.used.fetch_add(size, Ordering::Relaxed);
            out.extend_from_slice(line);
            out.push(b'\n');
            appended.spooled += 1;
        }
        if out.is_empty() {
            return Ok(appended);
        }
        let own = self
            .files
            .last_mut()
            .expect("a lane always has its own file");
        let written = (|| {
            if let Some(dir) = own.path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&own.path)?;
            file.write_all(&out)?;
            file.sync_data()
        })();
        match written {
            Ok(()) => {
                own.len += out.len() as u64;
                Ok(appended)
            }
            Err(e) => {
                // Nothing of this batch counts as spooled; cut back any partial write.
                self.budget
                    .used
                    .fetch_sub(out.len() as u64, Ordering::Relaxed);
                if let Ok(file) = OpenOptions::new().write(true).open(&own.path) {
                    let _ = file.set_len(own.len);
                }
                Err(e)
            }
        }
    }

    /// Up to `max` lines from the oldest unreplayed position, in order.
    pub fn read_batch(&mut self, max: usize) -> io::Result<ReplayBatch> {
        let mut batch = ReplayBatch::default();
        let Some(file) = self.files.iter().find(|f| f.cursor < f.len) else {
            return Ok(batch);
        };
        let mut reader = BufReader::new(File::open(&file.path)?);
        reader.seek(SeekFrom::Start(file.cursor))?;
        let mut offset = file.cursor;
        let mut line = Vec::new();
        while batch.lines.len() < max && offset < file.len {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            // A JSON object, checked without building it (replays run at the full chat rate).
            let is_object = body.trim_ascii_start().first() == Some(&b'{')
                && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
            if is_object {
                batch.lines.push((Bytes::copy_from_slice(body), offset));
            } else {
                batch.malformed += 1;
                // Skipped lines are committed with the next delivered one (or below).
                batch.lines.push((Bytes::new(), offset));
            }
        }
        Ok(batch)
    }

    /// Everything up to `offset` of the oldest unreplayed file was delivered (or skipped).
    /// A file replayed to its end is removed (older files) or emptied (the lane's own).
    pub fn commit(&mut self, offset: u64) -> io::Result<()> {
        let last = self.files.len() - 1;
        let Some(index) = self.files.iter().position(|f| f.cursor < f.len) else {
            return Ok(());
        };
        let file = &mut self.files[index];
        let done = offset.min(file.len).saturating_sub(file.cursor);
        self.budget.used.fetch_sub(done, Ordering::Relaxed);
        file.cursor += done;
        if file.cursor < file.len {
            return fs::write(&file.cursor_path, file.cursor.to_string());
        }
        if index == last {
            // Empty the lane's own file rather than let it grow for ever.
            OpenOptions::new()
                .write(true)
                .open(&file.path)?
                .set_len(0)?;
            file.len = 0;
            file.cursor = 0;
            let _ = fs::remove_file(&file.cursor_path);
        } else {
            let _ = fs::remove_file(&file.path);
            let _ = fs::remove_file(&file.cursor_path);
            self.files.remove(index);
        }
        Ok(())
    }
}

impl SpoolFile {
    fn open(path: PathBuf) -> io::Result<Self> {
        let cursor_path = path.with_extension("cursor");
        let mut len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if len > 0 {
            len = cut_torn_tail(&path, len)?;
        }
        let cursor = fs::read_to_string(&cursor_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(len);
        Ok(Self {
            path,
            cursor_path,
            cursor,
            len,
        })
    }
}

/// Cuts a file back to its last newline; returns the new length.
fn cut_torn_tail(path: &Path, len: u64) -> io::Result<u64> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let tail = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - tail))?;
    let mut buf = Vec::with_capacity(tail as usize);
    file.read_to_end(&mut buf)?;
    if buf.last() == Some(&b'\n') {
        return Ok(len);
    }
    let keep = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => len - tail + i as u64 + 1,
        None if tail == len => 0,
        None => return Ok(len), // a line longer than 64 KiB: leave it to the reader
    };
    tracing::warn!(path = %path.display(), "Papita spool: cut a torn last line (a crash mid-write)");
    file.set_len(keep)?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: u64) -> Arc<SpoolBudget> {
        Arc::new(SpoolBudget {
            used: AtomicU64::new(0),
            max,
        })
    }

    fn line(i: u32) -> Bytes {
        Bytes::from(format!("{{\"i\": {i}}}"))
    }

    #[test]
    fn lines_replay_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = LaneSpool::open(dir.path(), 0, 4, budget(1 << 20)).unwrap();
        assert!(spool.is_empty());
        spool
            .append(&(0..10).map(line).collect::<Vec<_>>())
            .unwrap();
        let batch = spool.read_batch(4).unwrap();
        assert_eq!(batch.lines[0].0, line(0));
        spool.commit(batch.lines[3].1).unwrap();
        drop(spool);
        // A restart: the cursor says four were delivered.
        let mut spool = LaneSpool::open(dir.path(), 0, 4, budget(1 << 20)).unwrap();
        let batch = spool.read_batch(100).unwrap();
        assert_eq!(batch.lines.len(), 6);
        assert_eq!(batch.lines[0].0, line(4));
        spool.commit(batch.lines[5].1).unwrap();
        assert!(spool.is_empty());
        assert_eq!(
            fs::metadata(dir.path().join("lane-00.jsonl"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_malformed_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("lane-01.jsonl"),
            "{\"a\": 1}\nnot json\n[1]\n{\"b\": 2}\n{\"torn",
        )
        .unwrap();
        let mut spool = LaneSpool::open(dir.path(), 1, 4, budget(1 << 20)).unwrap();
        let batch = spool.read_batch(100).unwrap();
        assert_eq!(batch.malformed, 2);
        let good: Vec<&Bytes> = batch
            .lines
            .iter()
            .map(|(l, _)| l)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            good,
            [&Bytes::from("{\"a\": 1}"), &Bytes::from("{\"b\": 2}")]
        );
    }

    #[test]
    fn past_the_size_limit_lines_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = LaneSpool::open(dir.path(), 0, 1, budget(30)).unwrap();
        let appended = spool
            .append(&(0..10).map(line).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(
            appended,
            Appended {
                spooled: 3,
                dropped: 7
            }
        );
    }

    #[test]
    fn files_of_another_lane_count_are_replayed_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("lane-05.jsonl"), "{\"old\": 1}\n").unwrap();
        let mut spool = LaneSpool::open(dir.path(), 1, 4, budget(1 << 20)).unwrap();
        spool.append(&[Bytes::from("{\"new\": 1}")]).unwrap();
        let batch = spool.read_batch(100).unwrap();
        assert_eq!(batch.lines[0].0, Bytes::from("{\"old\": 1}"));
        spool.commit(batch.lines[0].1).unwrap();
        assert!(!dir.path().join("lane-05.jsonl").exists());
        assert_eq!(
            spool.read_batch(100).unwrap().lines[0].0,
            Bytes::from("{\"new\": 1}")
        );
    }
}

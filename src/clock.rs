//! Wall-clock time, injectable so tests can stand at 23:59:59.999 without waiting for midnight.

use std::sync::Mutex;

use chrono::{DateTime, Datelike, Local, Timelike, Utc};

/// Source of the local time used for timestamps, session ids and log file dates.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Local>;
}

/// The process's local clock (zone from `TZ`).
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Local> {
        Local::now()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Local>>);

impl ManualClock {
    pub fn new(start: DateTime<Local>) -> Self {
        Self(Mutex::new(start))
    }

    pub fn set(&self, now: DateTime<Local>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Local> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The contract's timestamp: local time, ISO 8601, microseconds, no offset
/// (`2026-11-23T14:05:09.123456`), as Python's `datetime.now().isoformat()` wrote it.
pub fn timestamp(at: &DateTime<Local>) -> String {
    iso_micros(at, 26)
}

/// The log lines' timestamp (`2026-11-25T16:39:41.221332Z`): UTC, as tracing-subscriber's own
/// timer writes it, built the same cheap way (every request writes an access line).
pub fn utc_timestamp(at: &DateTime<Utc>) -> String {
    let mut out = iso_micros(at, 27);
    out.push('Z');
    out
}

fn iso_micros(at: &(impl Datelike + Timelike), capacity: usize) -> String {
    // Digits written directly: chrono's `format` (and even `format!`) cost thousands of
    // instructions per call, and every chat writes two timestamps (Docs/BENCHMARKS.md).
    let mut out = String::with_capacity(capacity);
    push_date(&mut out, at);
    out.push('T');
    push_digits(&mut out, at.hour(), 2);
    out.push(':');
    push_digits(&mut out, at.minute(), 2);
    out.push(':');
    push_digits(&mut out, at.second(), 2);
    out.push('.');
    // A leap second carries nanosecond >= 1e9; it still prints six digits.
    push_digits(&mut out, at.nanosecond() % 1_000_000_000 / 1_000, 6);
    out
}

/// The local date of `at` as `YYYY-MM-DD` (log file names and the `date` field).
pub fn date(at: &DateTime<Local>) -> String {
    let mut out = String::with_capacity(10);
    push_date(&mut out, at);
    out
}

fn push_date(out: &mut String, at: &impl Datelike) {
    push_digits(out, at.year().clamp(0, 9999) as u32, 4);
    out.push('-');
    push_digits(out, at.month(), 2);
    out.push('-');
    push_digits(out, at.day(), 2);
}

/// `value` zero-padded to exactly `width` digits.
fn push_digits(out: &mut String, value: u32, width: u32) {
    for i in (0..width).rev() {
        let digit = value / 10u32.pow(i) % 10;
        out.push(char::from(b'0' + digit as u8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamp_has_microseconds_and_no_offset() {
        let at = Local
            .with_ymd_and_hms(2026, 11, 23, 14, 5, 9)
            .unwrap()
            .checked_add_signed(chrono::Duration::microseconds(123_456))
            .unwrap();
        assert_eq!(timestamp(&at), "2026-11-23T14:05:09.123456");
        assert_eq!(date(&at), "2026-11-23");
        assert_eq!(
            timestamp(&at),
            at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
        );
        // A leap second (nanosecond >= 1e9) still prints six digits.
        let leap = at.with_nanosecond(1_999_999_000).unwrap();
        assert_eq!(timestamp(&leap), "2026-11-23T14:05:09.999999");
    }
}

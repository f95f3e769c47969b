//! Logging: `RUST_LOG` filter, text or JSON lines (`LOG_FORMAT`), written off the request path.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FmtSpan, Writer};
use tracing_subscriber::fmt::time::FormatTime;

use crate::config::LogFormat;

/// Lines the non-blocking stdout writer holds before dropping (see `init`).
const LOG_QUEUE_LINES: usize = 32_768;

/// Installs the global subscriber. Keep the guard alive until exit: dropping it flushes.
pub fn init(format: LogFormat, filter: &str) -> WorkerGuard {
    // The worker flushes whenever its queue runs empty, so buffering costs no latency but turns
    // one write(2) per line into one per burst (stdout itself is line-buffered).
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    // 32,768 queued lines (4 s of access lines at 8,000 requests/s) rather than the default
    // 128,000: the queue is allocated and touched in full at start-up, and its 4 MB were over a
    // quarter of the idle RSS (15 MB target). Lossy as before: a stalled stdout drops lines
    // instead of blocking requests.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .finish(stdout);
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: RUST_LOG={filter:?} is not a valid filter ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(UtcMicros)
        .with_span_events(FmtSpan::NONE);
    match format {
        // JSON escapes every string itself.
        LogFormat::Json => builder
            .with_writer(writer)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder
            .with_writer(EscapeControls(writer))
            .with_ansi(false)
            .init(),
    }
    guard
}

/// Text lines with every control character escaped but the line's own end. Fields are written
/// raw by tracing-subscriber's text format (`%` values), and some carry what a client or an
/// upstream sent (a model name, an upstream's error text): a `\n` in one would start a forged
/// line, a `\r` or an ANSI escape would rewrite the terminal. tracing-subscriber hands each event
/// to the writer in one `write`, so escaping here covers every field of every line.
#[derive(Clone)]
struct EscapeControls<M>(M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapeControls<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }
}

struct EscapingWriter<W>(W);

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match escape_controls(buf) {
            None => self.0.write(buf),
            Some(escaped) => {
                self.0.write_all(&escaped)?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `line` with its control characters (C0, DEL and C1) written as `\n`, `\r`, `\t` or `\u{..}`,
/// keeping one final line break; `None` when there is nothing to escape (the usual case, found
/// with one pass over the bytes).
fn escape_controls(line: &[u8]) -> Option<Vec<u8>> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    // C1 controls are U+0080..U+009F, which UTF-8 writes as 0xC2 0x80..0x9F.
    if !body.iter().any(|&b| b < 0x20 || b == 0x7f || b == 0xc2) {
        return None;
    }
    let text = String::from_utf8_lossy(body);
    if !text.chars().any(char::is_control) {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    if body.len() < line.len() {
        out.push('\n');
    }
    Some(out.into_bytes())
}

/// The timestamp tracing-subscriber writes by default (`2026-11-25T16:39:41.221332Z`: UTC,
/// microseconds), written in one piece: its own timer makes seven `write!` calls per line,
/// a noticeable share of the access line that every request writes (Docs/BENCHMARKS.md).
struct UtcMicros;

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        w.write_str(&crate::clock::utc_timestamp(&chrono::Utc::now()))
    }
}

/// Where the C library looks for zone files.
const ZONEINFO: &str = "/usr/share/zoneinfo";

/// A warning when `TZ` names a zone this system does not know: the C library then silently
/// uses UTC, and every timestamp and log file date would be hours off without a word.
pub fn time_zone_warning(tz: Option<&str>) -> Option<String> {
    let tz = tz?.trim();
    if tz.is_empty() {
        return None;
    }
    let name = tz.strip_prefix(':').unwrap_or(tz);
    let known = if name.starts_with('/') {
        std::path::Path::new(name).is_file()
    } else {
        std::path::Path::new(ZONEINFO).join(name).is_file() || is_posix_tz(name)
    };
    (!known).then(|| {
        format!(
            "TZ={tz:?} is not a time zone this system knows (no {ZONEINFO}/{name}); \
             timestamps and log file dates are in UTC. Use a name like Europe/Madrid (tzdata)."
        )
    })
}

/// A POSIX rule such as `UTC0`, `EST5EDT` or `<+0330>-3:30`: a name of three letters or more
/// (or `<...>`), then an offset.
fn is_posix_tz(value: &str) -> bool {
    let rest = if let Some(quoted) = value.strip_prefix('<') {
        match quoted.find('>') {
            Some(end) => &quoted[end + 1..],
            None => return false,
        }
    } else {
        let letters = value.bytes().take_while(u8::is_ascii_alphabetic).count();
        if letters < 3 {
            return false;
        }
        &value[letters..]
    };
    let rest = rest.strip_prefix(['+', '-']).unwrap_or(rest);
    rest.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_are_what_tracing_subscriber_wrote() {
        use chrono::TimeZone;
        let at = chrono::Utc
            .with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
            .unwrap()
            .checked_add_signed(chrono::TimeDelta::microseconds(7_089))
            .unwrap();
        assert_eq!(
            crate::clock::utc_timestamp(&at),
            "2026-01-02T03:04:05.007089Z"
        );
        // The same shape as tracing-subscriber's own timer, for any instant.
        let now = chrono::Utc::now();
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let ours = crate::clock::utc_timestamp(&now);
        assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
        let same_shape = ours.chars().zip(theirs.chars()).all(|(a, b)| {
            a.is_ascii_digit() == b.is_ascii_digit() && (a.is_ascii_digit() || a == b)
        });
        assert!(same_shape, "{ours} vs {theirs}");
    }

    #[test]
    fn control_characters_in_text_lines_are_escaped_and_the_line_end_kept() {
        let forged = "2026-12-07T01:00:00Z INFO chat model=x\n2026-01-01T00:00:00Z INFO forged\r\u{1b}[2K\u{9b}\n";
        let escaped = String::from_utf8(escape_controls(forged.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            escaped,
            "2026-12-07T01:00:00Z INFO chat model=x\\n2026-01-01T00:00:00Z INFO forged\\r\\u{1b}[2K\\u{9b}\n"
        );
        assert_eq!(escaped.matches('\n').count(), 1);
        assert!(escape_controls(b"plain line, caf\xc3\xa9 \xc2\xa9\n").is_none());
    }

    #[test]
    fn unknown_zones_are_named_and_known_ones_pass() {
        assert!(time_zone_warning(None).is_none());
        assert!(time_zone_warning(Some("")).is_none());
        for posix in [
            "UTC0",
            "EST5EDT",
            "<+0330>-3:30",
            "CET-1CEST,M3.5.0,M10.5.0/3",
        ] {
            assert!(time_zone_warning(Some(posix)).is_none(), "{posix}");
        }
        let warning = time_zone_warning(Some("Mars/Olympus_Mons")).unwrap();
        assert!(warning.contains("Mars/Olympus_Mons") && warning.contains("UTC"));
        assert!(time_zone_warning(Some("/nonexistent/zone")).is_some());
        if std::path::Path::new(ZONEINFO)
            .join("Europe/Madrid")
            .is_file()
        {
            assert!(time_zone_warning(Some("Europe/Madrid")).is_none());
            assert!(time_zone_warning(Some(":Europe/Madrid")).is_none());
        }
    }
}

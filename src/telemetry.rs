//! Logging: `RUST_LOG` filter, text or JSON lines (`LOG_FORMAT`), written off the request path.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::LogFormat;

/// Installs the global subscriber. Keep the guard alive until exit: dropping it flushes.
pub fn init(format: LogFormat, filter: &str) -> WorkerGuard {
    // The worker flushes whenever its queue runs empty, so buffering costs no latency but turns
    // one write(2) per line into one per burst (stdout itself is line-buffered).
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking(stdout);
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: RUST_LOG={filter:?} is not a valid filter ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_span_events(FmtSpan::NONE);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    guard
}

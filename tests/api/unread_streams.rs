//! Issue 24, against the release-shaped binary (memory is read from `/proc/<pid>/status`):
//! streamed answers that nobody reads, and text log lines that a client or an upstream tries to
//! forge.
//!
//! The upstream here is a small axum server that streams a long answer (50 MB of chunks) as fast
//! as its socket takes it, and records how much it produced and when its body was dropped (the
//! service closed the connection).

use std::io::Write as _;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::post;
use serde_json::Value;

use crate::binary::{sigterm, start_service, upstream_mocks, wait_exit};
use crate::mock_openai::Reply;

const MB: u64 = 1024 * 1024;
/// What the upstream would stream in full.
const ANSWER_BYTES: u64 = 50 * MB;

/// The long-answer upstream's record of what happened.
#[derive(Default)]
struct Produced {
    bytes: AtomicU64,
    /// Bodies dropped before the whole answer was sent (the service hung up).
    abandoned: AtomicUsize,
    finished: AtomicUsize,
    /// Milliseconds since `epoch` of the last chunk the socket took.
    last_progress_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Produced {
    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
}

/// Counts an abandoned body when the stream is dropped unfinished.
struct Body50 {
    produced: Arc<Produced>,
    sent: u64,
    done: bool,
}

impl Drop for Body50 {
    fn drop(&mut self) {
        if !self.done {
            self.produced.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn chunk_event(text: &str) -> Bytes {
    let chunk = serde_json::json!({
        "id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1, "model": "gpt-3.5-turbo",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

async fn long_answer(produced: Arc<Produced>) -> Response {
    let piece = "word ".repeat(200); // ~1 KB of text per chunk
    let state = Body50 {
        produced,
        sent: 0,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut state| {
        let piece = piece.clone();
        async move {
            if state.sent >= ANSWER_BYTES {
                state.done = true;
                state.produced.finished.fetch_add(1, Ordering::SeqCst);
                return None;
            }
            let event = chunk_event(&piece);
            state.sent += event.len() as u64;
            let p = &state.produced;
            p.bytes.fetch_add(event.len() as u64, Ordering::SeqCst);
            p.last_progress_ms.store(p.now_ms(), Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(event), state))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The upstream on a runtime of its own threads; returns it, its record and its base URL.
fn long_upstream() -> (tokio::runtime::Runtime, Arc<Produced>, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let produced = Arc::new(Produced::default());
    produced.now_ms();
    let app = Router::new().route(
        "/v1/chat/completions",
        post({
            let produced = produced.clone();
            move || long_answer(produced.clone())
        }),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, produced, url)
}

fn rss_bytes(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn get(port: u16, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
    text
}

fn json_of(port: u16, path: &str) -> Value {
    let text = get(port, path);
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn streams_open(port: u16) -> String {
    get(port, "/metrics")
        .lines()
        .find(|l| l.starts_with("alchat_sse_streams_open "))
        .unwrap()
        .to_string()
}

/// A client that asks for a streamed answer (and then reads it, or never reads a byte).
fn stream_client(port: u16) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"message": "Tell me everything", "stream": true}"#;
    write!(
        stream,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

fn non_reading_client(port: u16) -> std::net::TcpStream {
    stream_client(port)
}

/// Samples the service's RSS until `done` or `within`; returns the highest.
fn peak_rss_until(child: &Child, within: Duration, mut done: impl FnMut() -> bool) -> u64 {
    let started = Instant::now();
    let mut peak = rss_bytes(child);
    while !done() {
        assert!(started.elapsed() < within, "not done within {within:?}");
        peak = peak.max(rss_bytes(child));
        std::thread::sleep(Duration::from_millis(20));
    }
    peak.max(rss_bytes(child))
}

fn start(upstream: &str, env: &[(&str, &str)]) -> (tempfile::TempDir, Child, u16) {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("SessionLog");
    let mut all = vec![
        ("OPENAI_BASE_URL", upstream),
        ("OPENAI_API_KEY", "sk-test-unread-0123456789"),
        ("AL_CHAT_LOG_DIR", log_dir.to_str().unwrap()),
        ("OPENAI_STREAM_IDLE_TIMEOUT_SECS", "60"),
    ];
    all.extend_from_slice(env);
    let (child, port) = start_service(tmp.path(), &all);
    // Warm up: the first requests allocate what every later one reuses.
    json_of(port, "/api/health");
    json_of(port, "/api/openai/usage");
    (tmp, child, port)
}

fn stop(child: Child) {
    sigterm(&child);
    let out = wait_exit(child);
    assert!(out.status.success(), "{out:?}");
}

/// Row 3: an upstream streaming a long answer to a client that stopped reading was read whole
/// into memory (300 MB upstream: RSS 642 MiB), and the stream stayed open 90 s. Now the upstream
/// is read only as fast as the client takes it; the client is cut `SSE_WRITE_STALL_SECS` after it
/// stopped taking bytes, the upstream call with it; the open-streams gauge returns to 0 and the
/// cut answer is counted as an estimate.
#[test]
fn a_client_that_never_reads_holds_no_memory_and_is_cut_at_the_stall_timeout() {
    let (_rt, produced, upstream) = long_upstream();
    let stall = Duration::from_secs(3);
    let (_tmp, child, port) = start(&upstream, &[("SSE_WRITE_STALL_SECS", "3")]);
    let baseline = rss_bytes(&child);

    let client = non_reading_client(port);
    let peak = peak_rss_until(&child, Duration::from_secs(60), || {
        produced.abandoned.load(Ordering::SeqCst) == 1
    });
    let closed_ms = produced.now_ms();
    let grew = peak.saturating_sub(baseline);
    assert!(grew < 20 * MB, "RSS grew by {} MB", grew / MB);
    let sent = produced.bytes.load(Ordering::SeqCst);
    assert!(
        sent < ANSWER_BYTES / 5,
        "the upstream was read only as far as the sockets take: {} MB of 50",
        sent / MB
    );
    assert_eq!(produced.finished.load(Ordering::SeqCst), 0);
    // Cut within the stall timeout of the last byte the client's side took.
    let silent =
        Duration::from_millis(closed_ms - produced.last_progress_ms.load(Ordering::SeqCst));
    assert!(
        silent <= stall + Duration::from_secs(2),
        "cut {silent:?} after the last progress"
    );
    assert_eq!(streams_open(port), "alchat_sse_streams_open 0");
    crate::ports::wait_for("the estimate", Duration::from_secs(10), || {
        json_of(port, "/api/openai/usage")["estimated_usage"]["request_count"] == 1
    });
    let usage = json_of(port, "/api/openai/usage");
    assert!(
        usage["estimated_usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{usage}"
    );
    drop(client);
    stop(child);
}

/// Row 3 at scale: 50 such clients at once stay under 100 MB of RSS in all.
#[test]
fn fifty_clients_that_never_read_stay_under_100_mb() {
    let (_rt, produced, upstream) = long_upstream();
    let (_tmp, child, port) = start(&upstream, &[("SSE_WRITE_STALL_SECS", "3")]);
    let baseline = rss_bytes(&child);
    let clients: Vec<_> = (0..50).map(|_| non_reading_client(port)).collect();
    let peak = peak_rss_until(&child, Duration::from_secs(90), || {
        produced.abandoned.load(Ordering::SeqCst) == 50
    });
    assert!(
        peak < 100 * MB,
        "peak RSS {} MB (idle {} MB)",
        peak / MB,
        baseline / MB
    );
    assert_eq!(streams_open(port), "alchat_sse_streams_open 0");
    drop(clients);
    stop(child);
}

/// Row 3, the limit: `OPENAI_STREAM_MAX_SECS=20` never fired for a client that did not read.
/// It now holds whether or not the client reads (the server cuts the connection at the limit
/// and a short grace).
#[test]
fn the_stream_time_limit_holds_for_a_client_that_does_not_read() {
    let (_rt, produced, upstream) = long_upstream();
    let (_tmp, child, port) = start(
        &upstream,
        &[
            ("SSE_WRITE_STALL_SECS", "600"),
            ("OPENAI_STREAM_MAX_SECS", "2"),
        ],
    );
    let started = Instant::now();
    let client = non_reading_client(port);
    crate::ports::wait_for("the stream to be cut", Duration::from_secs(20), || {
        produced.abandoned.load(Ordering::SeqCst) == 1
    });
    let after = started.elapsed();
    // The limit plus the 5 s grace in which a reading client gets its error event.
    assert!(after < Duration::from_secs(10), "cut after {after:?}");
    assert!(
        after >= Duration::from_secs(2),
        "cut before the limit: {after:?}"
    );
    assert_eq!(streams_open(port), "alchat_sse_streams_open 0");
    drop(client);
    stop(child);
}

/// Row 5: a model name `x\n2026-01-01T00:00:00Z INFO forged` put a forged line into the text log.
/// Such a model is now refused (no control characters in identifiers), and whatever else reaches
/// a text line raw, here an upstream's error text with a line break, a carriage return and an
/// ANSI escape, is written escaped: one event, one line.
#[test]
fn nothing_a_client_or_an_upstream_sends_forges_a_text_log_line() {
    let (_rt, openai, _papita) = upstream_mocks();
    let forged = "boom\n2026-01-01T00:00:00Z INFO forged line\r\u{1b}[2K\u{1b}[31mred";
    openai.set_default(Reply::status(500, forged));
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("SessionLog");
    let (child, port) = start_service(
        tmp.path(),
        &[
            ("OPENAI_BASE_URL", &openai.base_url()),
            ("OPENAI_API_KEY", "sk-test-forge-0123456789"),
            ("OPENAI_MAX_RETRIES", "0"),
            ("AL_CHAT_LOG_DIR", log_dir.to_str().unwrap()),
            ("LOG_FORMAT", "text"),
            ("RUST_LOG", "info"),
        ],
    );
    let chat = |body: &str| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text
    };
    let model = chat(r#"{"message": "hi", "model": "x\n2026-01-01T00:00:00Z INFO forged"}"#);
    assert!(model.starts_with("HTTP/1.1 400"), "{model}");
    let username = chat(r#"{"message": "hi", "username": "\u001b[31mroot"}"#);
    assert!(username.starts_with("HTTP/1.1 400"), "{username}");
    let upstream = chat(r#"{"message": "hi"}"#);
    assert!(upstream.starts_with("HTTP/1.1 502"), "{upstream}");
    sigterm(&child);
    let out = wait_exit(child);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("boom\\n2026-01-01T00:00:00Z INFO forged line\\r\\u{1b}[2K"),
        "the upstream's text is in the log, escaped:\n{log}"
    );
    for line in log.lines() {
        assert!(!line.starts_with("2026-01-01"), "forged line: {line:?}");
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
    }
}

/// A client that does read gets the answer up to the longest one taken (8 MB of text), then an
/// `error` event: a lenient upstream streaming without end cannot grow memory either.
#[test]
fn a_reading_client_gets_an_error_event_past_the_longest_answer() {
    let (_rt, produced, upstream) = long_upstream();
    let (_tmp, child, port) = start(&upstream, &[]);
    let baseline = rss_bytes(&child);
    let mut stream = stream_client(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut received = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut received).unwrap();
    let peak = rss_bytes(&child);
    let text = String::from_utf8_lossy(&received);
    let tail = &text[text.len().saturating_sub(300)..];
    assert!(
        tail.contains("event: error") && tail.contains("longer than 8 MB"),
        "{tail}"
    );
    assert!(!text.contains("event: done"));
    assert!(received.len() > 8 * MB as usize, "{} bytes", received.len());
    assert!(
        peak.saturating_sub(baseline) < 40 * MB,
        "RSS grew by {} MB",
        peak.saturating_sub(baseline) / MB
    );
    crate::ports::wait_for("the upstream call to end", Duration::from_secs(10), || {
        produced.abandoned.load(Ordering::SeqCst) == 1
    });
    stop(child);
}

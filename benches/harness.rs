//! Benchmarks: AL-Chat against the thinnest possible proxy, on loopback. Run with `benches/run`.
//!
//! This one binary plays several parts, each in its own process so their CPU and memory are
//! their own:
//! - `harness mock PORT DELAY_MS`: a fast OpenAI-compatible upstream (and a Papita that accepts
//!   usage records), answering after DELAY_MS;
//! - `harness proxy PORT UPSTREAM`: the yardstick — axum + one shared reqwest client: parse the
//!   JSON, make the one upstream call, answer; nothing else;
//! - `harness rate URL RPS SECS BODY`: an open-loop load generator at a fixed rate (latency from
//!   the scheduled send time, so a slow server cannot hide its queueing);
//! - no arguments (as `cargo bench` runs it): the orchestrator, which starts the others and the
//!   release build of `al-chat`, drives load with `wrk` and prints the table.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some("mock") => serve_mock(args[1].parse().unwrap(), args[2].parse().unwrap()),
        Some("proxy") => serve_proxy(args[1].parse().unwrap(), args[2].clone()),
        Some("rate") => open_loop(
            &args[1],
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            &args[4],
        ),
        _ => orchestrate(),
    }
}

// ---------------------------------------------------------------------------------------------
// The fast mock upstream.

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-3.5-turbo","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;

fn sse_body() -> String {
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-3.5-turbo\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
        )
    };
    let mut body = chunk(r#"{"role":"assistant","content":"Hello"}"#, "null");
    body += &chunk(r#"{"content":" there"}"#, "null");
    body += &chunk(r#"{}"#, "\"stop\"");
    body += "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-3.5-turbo\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n";
    body += "data: [DONE]\n\n";
    body
}

fn serve_mock(port: u16, delay_ms: u64) {
    let delay = Duration::from_millis(delay_ms);
    let sse: &'static str = Box::leak(sse_body().into_boxed_str());
    async fn completions(
        State((delay, sse)): State<(Duration, &'static str)>,
        body: Bytes,
    ) -> Response {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A cheap look at the body is enough to tell a streamed request.
        const STREAM: &[u8] = b"\"stream\":true";
        let streamed = body.windows(STREAM.len()).any(|w| w == STREAM);
        if streamed {
            return ([("content-type", "text/event-stream")], sse).into_response();
        }
        ([("content-type", "application/json")], COMPLETION).into_response()
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route(
            "/api/credentials/global/openai",
            get(|| async { StatusCode::NOT_FOUND }),
        )
        .route("/api/usage/log", post(|| async { StatusCode::OK }))
        .with_state((delay, sse));
    run_server(port, app);
}

// ---------------------------------------------------------------------------------------------
// The yardstick: the least a chat proxy can do.

#[derive(Clone)]
struct Proxy {
    client: reqwest::Client,
    url: String,
}

fn serve_proxy(port: u16, upstream: String) {
    async fn chat(State(proxy): State<Proxy>, Json(body): Json<Value>) -> Response {
        let message = body["message"].as_str().unwrap_or_default();
        let request =
            json!({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": message}]});
        let answer = proxy
            .client
            .post(&proxy.url)
            .bearer_auth("sk-bench")
            .json(&request)
            .send()
            .await;
        match answer {
            Ok(r) => match r.json::<Value>().await {
                Ok(v) => Json(
                    json!({"message": v["choices"][0]["message"]["content"], "usage": v["usage"]}),
                )
                .into_response(),
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            },
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        }
    }
    let proxy = Proxy {
        client: reqwest::Client::new(),
        url: format!("{upstream}/chat/completions"),
    };
    run_server(
        port,
        Router::new()
            .route("/api/chat", post(chat))
            .with_state(proxy),
    );
}

fn run_server(port: u16, app: Router) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        axum::serve(listener, app).await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------
// Open-loop load at a fixed rate.

fn open_loop(url: &str, rps: u64, secs: u64, body: &str) {
    // Like wrk2: a fixed pool of senders, each on its own schedule (rate / SENDERS). Latency is
    // measured from when a request was due, not when it went out, so a server that falls behind
    // shows its queueing instead of hiding it (no coordinated omission).
    const SENDERS: u64 = 64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (url, body) = (url.to_string(), body.to_string());
    let results = rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(SENDERS as usize)
            .build()
            .unwrap();
        let per_sender = Duration::from_secs_f64(SENDERS as f64 / rps as f64);
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let mut senders = tokio::task::JoinSet::new();
        for k in 0..SENDERS {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            senders.spawn(async move {
                let offset = per_sender.mul_f64(k as f64 / SENDERS as f64);
                let mut results = Vec::new();
                for i in 0..(rps * secs / SENDERS) {
                    let due = start + offset + per_sender * i as u32;
                    tokio::time::sleep_until(due).await;
                    let request = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone());
                    let ok = match request.send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    results.push((due.elapsed(), ok));
                }
                results
            });
        }
        let mut all = Vec::new();
        while let Some(r) = senders.join_next().await {
            all.extend(r.unwrap());
        }
        all
    });
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    let mut latencies: Vec<Duration> = results.into_iter().map(|(d, _)| d).collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{} {} {} {}",
        pct(0.5).as_micros(),
        pct(0.99).as_micros(),
        latencies.len(),
        errors
    );
}

// ---------------------------------------------------------------------------------------------
// The orchestrator.

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn rss_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_self(args: &[String]) -> Server {
    let port: u16 = args[1].parse().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    Server { child, port }
}

fn start_al_chat(upstream: &str, papita: &str, log_dir: &Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_al-chat"))
        .env_clear()
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("OPENAI_BASE_URL", upstream)
        .env("OPENAI_API_KEY", "sk-bench-0123456789")
        .env("PAPITA_API_URL", papita)
        .env("AL_CHAT_LOG_DIR", log_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    Server { child, port }
}

#[derive(Debug, Default, Clone)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

fn wrk(url: &str, connections: u32, secs: u32, script: Option<&Path>, timeout_s: u32) -> WrkResult {
    let threads = 2.min(connections);
    let mut cmd = Command::new("wrk");
    cmd.args([
        "--latency",
        &format!("-t{threads}"),
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
    ]);
    cmd.arg(format!("--timeout={timeout_s}s"));
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("wrk runs (benches/run installs it)");
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> WrkResult {
    let mut r = WrkResult::default();
    let ms = |v: &str| -> f64 {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            "m" => n * 60_000.0,
            _ => f64::NAN,
        }
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = ms(v),
            ["99%", v] => r.p99_ms = ms(v),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    r
}

fn lua(dir: &Path, name: &str, body: &str, path_note: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "-- {path_note}\nwrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"").unwrap();
    path
}

fn rate(url: &str, rps: u64, secs: u64, body: &str) -> (f64, f64, u64, u64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["rate", url, &rps.to_string(), &secs.to_string(), body])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0] as f64 / 1000.0, v[1] as f64 / 1000.0, v[2], v[3])
}

/// Time to the first `delta` event over `n` sequential streamed requests; (p50, p99) in ms.
fn first_delta(url: &str, body: &Value, marker: &[u8], n: usize) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let mut times = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let started = Instant::now();
            let mut response = client.post(url).json(body).send().await.unwrap();
            let mut seen = Vec::new();
            while let Some(chunk) = response.chunk().await.unwrap() {
                seen.extend_from_slice(&chunk);
                if seen.windows(marker.len()).any(|w| w == marker) {
                    break;
                }
            }
            if i >= 20 {
                times.push(started.elapsed()); // the first 20 warm the connection pools
            }
            while response.chunk().await.unwrap().is_some() {}
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        (ms(times[n / 2]), ms(times[n * 99 / 100]))
    })
}

/// Runs each closure `rounds` times, interleaved (a, b, c, a, b, c, ...), and returns each one's
/// median run: on a small, noisy machine the comparison is only fair if both sides see the same
/// moments.
fn interleaved<const N: usize>(rounds: usize, runs: [&dyn Fn() -> WrkResult; N]) -> [WrkResult; N] {
    let mut results: [Vec<WrkResult>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..rounds {
        for (i, run) in runs.iter().enumerate() {
            results[i].push(run());
        }
    }
    results.map(|mut r| {
        r.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        r[r.len() / 2].clone()
    })
}

fn orchestrate() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let (secs, rounds) = if quick { (3, 1) } else { (5, 3) };
    let tmp = tempfile::tempdir().unwrap();
    let chat_body = r#"{"message":"Hello, benchmark!","sessionId":"session_bench","username":"bench","isGuest":false}"#;
    let upstream_body =
        r#"{"model":"gpt-3.5-turbo","messages":[{"role":"user","content":"Hello, benchmark!"}]}"#;
    let chat_lua = lua(tmp.path(), "chat.lua", chat_body, "POST /api/chat");
    let upstream_lua = lua(
        tmp.path(),
        "upstream.lua",
        upstream_body,
        "POST /v1/chat/completions",
    );
    let start_lua = lua(tmp.path(), "start.lua", "{}", "POST /api/session/start");

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "AL-Chat benchmarks: {cores} cores; wrk over loopback; {secs} s per run; medians of {rounds} interleaved rounds\n"
    );
    let mut rows: Vec<String> = Vec::new();
    let mut row = |name: &str, value: String, verdict: String| {
        let line = format!("| {name} | {value} | {verdict} |");
        println!("{line}");
        rows.push(verdict);
    };
    println!("| scenario | result | target |");
    println!("|---|---|---|");

    // --- instant upstream -------------------------------------------------------------------
    let mock_port = free_port();
    let mock = start_self(&["mock".into(), mock_port.to_string(), "0".into()]);
    let upstream = format!("{}/v1", mock.url());
    let proxy_port = free_port();
    let proxy = start_self(&["proxy".into(), proxy_port.to_string(), upstream.clone()]);
    let al_chat = start_al_chat(&upstream, &mock.url(), &tmp.path().join("logs"));
    std::thread::sleep(Duration::from_secs(1));

    let idle_rss = al_chat.rss_kb("VmRSS:");
    row(
        "6. idle RSS after start-up",
        format!("{:.1} MB", idle_rss as f64 / 1024.0),
        verdict(idle_rss < 15 * 1024, "< 15 MB"),
    );

    // Warm the chat path (connection pools, credentials).
    wrk(
        &format!("{}/api/chat", al_chat.url()),
        16,
        1,
        Some(&chat_lua),
        5,
    );
    wrk(
        &format!("{}/api/chat", proxy.url()),
        16,
        1,
        Some(&chat_lua),
        5,
    );

    let [health, starts16] = interleaved(
        rounds,
        [
            &|| wrk(&format!("{}/api/health", al_chat.url()), 16, secs, None, 5),
            &|| {
                wrk(
                    &format!("{}/api/session/start", al_chat.url()),
                    16,
                    secs,
                    Some(&start_lua),
                    5,
                )
            },
        ],
    );
    row(
        "1. GET /api/health, 16 connections",
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            health.rps, health.p50_ms, health.p99_ms
        ),
        "(reference)".into(),
    );

    let [direct, yardstick, ours] = interleaved(
        rounds,
        [
            &|| {
                wrk(
                    &format!("{upstream}/chat/completions"),
                    16,
                    secs,
                    Some(&upstream_lua),
                    5,
                )
            },
            &|| {
                wrk(
                    &format!("{}/api/chat", proxy.url()),
                    16,
                    secs,
                    Some(&chat_lua),
                    5,
                )
            },
            &|| {
                wrk(
                    &format!("{}/api/chat", al_chat.url()),
                    16,
                    secs,
                    Some(&chat_lua),
                    5,
                )
            },
        ],
    );
    row(
        "2a. straight to the mock upstream, 16 connections",
        format!("{:.0} req/s, p99 {:.2} ms", direct.rps, direct.p99_ms),
        "(reference)".into(),
    );
    row(
        "2b. minimal proxy (the yardstick), 16 connections",
        format!("{:.0} req/s, p99 {:.2} ms", yardstick.rps, yardstick.p99_ms),
        "(reference)".into(),
    );
    let ratio = ours.rps / yardstick.rps;
    row(
        "2. POST /api/chat, everything on, 16 connections",
        format!(
            "{:.0} req/s, p99 {:.2} ms, {} errors",
            ours.rps, ours.p99_ms, ours.errors
        ),
        verdict(
            ratio >= 0.7 && ours.errors == 0,
            &format!("{ratio:.2} of the yardstick; target ≥ 0.70"),
        ),
    );

    let half = ((yardstick.rps / 2.0) as u64).max(100);
    let rate_secs = if quick { 3 } else { 5 };
    let mut p99s = Vec::new();
    for _ in 0..rounds {
        let proxy_run = rate(
            &format!("{}/api/chat", proxy.url()),
            half,
            rate_secs,
            chat_body,
        );
        let ours_run = rate(
            &format!("{}/api/chat", al_chat.url()),
            half,
            rate_secs,
            chat_body,
        );
        p99s.push((ours_run.1 - proxy_run.1, ours_run, proxy_run));
    }
    p99s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (diff, ours_run, proxy_run) = p99s[p99s.len() / 2];
    row(
        &format!("2. p99 at half the yardstick's throughput ({half} req/s, open loop)"),
        format!(
            "ours {:.2} ms, yardstick {:.2} ms ({} errors)",
            ours_run.1,
            proxy_run.1,
            ours_run.3 + proxy_run.3
        ),
        verdict(
            diff <= 1.0 && ours_run.3 == 0,
            &format!("{diff:+.2} ms; target ≤ +1 ms"),
        ),
    );

    let ratio16 = starts16.rps / health.rps;
    row(
        "4. POST /api/session/start (fsync'd), 16 connections",
        format!("{:.0} req/s, p99 {:.2} ms", starts16.rps, starts16.p99_ms),
        format!("{ratio16:.2} of health at 16 connections (bounded by fsync latency; see below)"),
    );
    let [health64, starts64] = interleaved(
        rounds,
        [
            &|| wrk(&format!("{}/api/health", al_chat.url()), 64, secs, None, 5),
            &|| {
                wrk(
                    &format!("{}/api/session/start", al_chat.url()),
                    64,
                    secs,
                    Some(&start_lua),
                    5,
                )
            },
        ],
    );
    let ratio64 = starts64.rps / health64.rps;
    row(
        "4. POST /api/session/start (fsync'd), 64 connections",
        format!(
            "{:.0} req/s vs health {:.0} req/s, p99 {:.2} ms",
            starts64.rps, health64.rps, starts64.p99_ms
        ),
        verdict(
            ratio64 >= 0.5 && starts64.errors == 0,
            &format!("{ratio64:.2} of health; target ≥ 0.50"),
        ),
    );

    let n = if quick { 50 } else { 300 };
    let streamed = json!({"message": "Hello", "stream": true});
    let upstream_stream = json!({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hello"}], "stream": true});
    let (direct_fd, direct_fd99) = first_delta(
        &format!("{upstream}/chat/completions"),
        &upstream_stream,
        b"data: ",
        n,
    );
    let (ours_fd, ours_fd99) = first_delta(
        &format!("{}/api/chat", al_chat.url()),
        &streamed,
        b"event: delta",
        n,
    );
    row(
        "5. streaming: time to first delta (sequential)",
        format!(
            "ours p50 {ours_fd:.3} ms (p99 {ours_fd99:.3}), direct p50 {direct_fd:.3} ms (p99 {direct_fd99:.3})"
        ),
        verdict(
            ours_fd - direct_fd < 1.0,
            &format!("{:+.3} ms at p50; target < 1 ms", ours_fd - direct_fd),
        ),
    );
    let peak_fast = al_chat.rss_kb("VmHWM:");
    row(
        "   peak RSS over all the runs above",
        format!("{:.1} MB", peak_fast as f64 / 1024.0),
        String::new(),
    );
    drop(al_chat);
    drop(proxy);
    drop(mock);

    // --- 10,000 concurrent slow chats ---------------------------------------------------------
    let slow_port = free_port();
    let slow = start_self(&["mock".into(), slow_port.to_string(), "2000".into()]);
    let al_chat = start_al_chat(
        &format!("{}/v1", slow.url()),
        &slow.url(),
        &tmp.path().join("logs-slow"),
    );
    let many = wrk(
        &format!("{}/api/chat", al_chat.url()),
        10_000,
        if quick { 6 } else { 12 },
        Some(&chat_lua),
        10,
    );
    let peak = al_chat.rss_kb("VmHWM:");
    row(
        "3. 10,000 concurrent chats, 2 s upstream",
        format!(
            "{} answered, {} errors, p50 {:.0} ms, peak RSS {:.1} MB",
            many.requests,
            many.errors,
            many.p50_ms,
            peak as f64 / 1024.0
        ),
        verdict(
            many.errors == 0 && many.requests > 0 && peak < 150 * 1024,
            "0 errors and peak RSS < 150 MB",
        ),
    );
    drop(al_chat);
    drop(slow);

    let met = rows.iter().filter(|v| v.starts_with("met")).count();
    let missed = rows.iter().filter(|v| v.starts_with("MISSED")).count();
    println!("\n{met} targets met, {missed} missed (see Docs/BENCHMARKS.md for why)");
}

fn verdict(ok: bool, what: &str) -> String {
    format!("{}: {what}", if ok { "met" } else { "MISSED" })
}

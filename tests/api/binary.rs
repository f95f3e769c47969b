//! The `al-chat` binary itself: configuration errors, `.env` precedence, a busy port,
//! `healthcheck`, and SIGTERM.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use al_chat::config::VARS;

use crate::ports::{free_port, wait_for, wait_listening};

const BIN: &str = env!("CARGO_BIN_EXE_al-chat");

/// A command with a clean environment (nothing from the developer's shell leaks in).
pub(crate) fn al_chat(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(dir)
        .env("PAPITA_API_URL", "http://127.0.0.1:9")
        .env("RUST_LOG", "warn");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the service on a free loopback port with `env` added, and waits until it listens.
pub(crate) fn start_service(dir: &Path, env: &[(&str, &str)]) -> (Child, u16) {
    let port = free_port();
    let mut cmd = al_chat(dir);
    cmd.env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .envs(env.iter().copied());
    let child = cmd.spawn().unwrap();
    wait_listening(port);
    (child, port)
}

/// A single-threaded runtime for the async client calls of these synchronous tests.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

pub(crate) fn wait_exit(mut child: Child) -> Output {
    wait_for("al-chat to exit", Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    child.wait_with_output().unwrap()
}

/// Mock OpenAI and Papita on a runtime of their own threads, serving while a test blocks.
pub(crate) fn upstream_mocks() -> (
    tokio::runtime::Runtime,
    crate::mock_openai::MockOpenAi,
    crate::mock_papita::MockPapita,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let openai = rt.block_on(crate::mock_openai::MockOpenAi::start());
    let papita = rt.block_on(crate::mock_papita::MockPapita::start());
    (rt, openai, papita)
}

/// SIGTERM, then the exit and how long it took from the signal.
fn sigterm_and_time(child: Child) -> (Output, Duration) {
    let stopping = Instant::now();
    sigterm(&child);
    let out = wait_exit(child);
    (out, stopping.elapsed())
}

fn get_json(port: u16, path: &str) -> serde_json::Value {
    let rt = runtime();
    rt.block_on(async {
        reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

#[test]
fn help_lists_every_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = al_chat(tmp.path()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for var in VARS {
        assert!(text.contains(var.name), "--help misses {}", var.name);
    }
    assert!(text.contains("healthcheck") && text.contains("--env-file"));
}

#[test]
fn a_bad_value_stops_start_up_with_one_clear_line_and_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = al_chat(tmp.path()).env("PORT", "abc").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("PORT") && err.contains("abc"), "{err}");
}

#[test]
fn bad_numbers_and_a_bad_pricing_file_exit_2_naming_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("prices.json"), "{ not json").unwrap();
    for (name, value) in [
        ("PAPITA_USAGE_MAX_ATTEMPTS", "4294967296"),
        ("PRICING_FILE", "prices.json"),
        ("PRICING_FILE", "missing.json"),
    ] {
        let out = al_chat(tmp.path()).env(name, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("invalid {name}=")), "{err}");
    }
}

#[test]
fn a_missing_env_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = al_chat(tmp.path())
        .args(["--env-file", "nope.env"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.env"));
}

#[test]
fn a_busy_port_fails_with_a_message_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = al_chat(tmp.path())
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on 127.0.0.1:") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn env_file_is_read_and_the_environment_wins_then_sigterm_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        tmp.path().join(".env"),
        format!("PORT={port}\nHOST=127.0.0.1\nOPENAI_MODEL=model-from-dotenv\nOPENAI_API_KEY=sk-from-dotenv-123456\nAL_CHAT_LOG_DIR=logs\n"),
    )
    .unwrap();
    let child = al_chat(tmp.path())
        .env("OPENAI_MODEL", "model-from-env")
        .spawn()
        .unwrap();
    wait_listening(port);

    let info = get_json(port, "/api/openai/info");
    assert_eq!(info["model"], "model-from-env", "environment wins: {info}");
    assert_eq!(info["credentials_info"]["credential_source"], "local_env");
    assert_eq!(
        info["credentials_info"]["openai_api_key_prefix"],
        "sk-from..."
    );
    assert_eq!(info["credentials_info"]["env_file_exists"], true);
    assert!(
        info["credentials_info"]["env_file_path"]
            .as_str()
            .unwrap()
            .ends_with(".env")
    );

    // The healthcheck subcommand reads the same configuration and finds the service healthy.
    let check = al_chat(tmp.path()).arg("healthcheck").output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    sigterm(&child);
    let out = wait_exit(child);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The project_init line was written to the configured folder before exit.
    let logs: Vec<_> = std::fs::read_dir(tmp.path().join("logs"))
        .unwrap()
        .collect();
    assert_eq!(logs.len(), 1);

    let check = al_chat(tmp.path()).arg("healthcheck").output().unwrap();
    assert_eq!(check.status.code(), Some(1), "nothing listens any more");
}

#[test]
fn with_no_key_at_all_every_route_answers_and_chat_says_how_to_configure() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, port) = start_service(tmp.path(), &[]);
    let rt = runtime();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
        let chat = client
            .post(url("/api/chat"))
            .json(&serde_json::json!({"message": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(chat.status(), 503);
        let body: serde_json::Value = chat.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("OPENAI_API_KEY"),
            "{body}"
        );
        for path in ["/api/health", "/api/openai/info", "/api/openai/usage"] {
            assert_eq!(
                client.get(url(path)).send().await.unwrap().status(),
                200,
                "{path}"
            );
        }
        assert_eq!(
            client
                .get(url("/api/openai/test"))
                .send()
                .await
                .unwrap()
                .status(),
            500
        );
        assert_eq!(
            client
                .post(url("/api/session/start"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    });
    sigterm(&child);
    assert_eq!(wait_exit(child).status.code(), Some(0));
}

#[test]
fn json_logs_have_one_line_per_request_with_route_status_latency_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    // FLASK_ENV is accepted and ignored.
    let env = [
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("FLASK_ENV", "production"),
    ];
    let (child, port) = start_service(tmp.path(), &env);
    let rt = runtime();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/api/session/start");
        let r = client
            .post(url)
            .header("x-request-id", "req-json-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    sigterm(&child);
    let out = wait_exit(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let access = lines
        .iter()
        .find(|l| l["span"]["request_id"] == "req-json-1")
        .unwrap_or_else(|| panic!("no access line: {stdout}"));
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["span"]["method"], "POST");
    assert_eq!(access["span"]["path"], "/api/session/start");
    assert_eq!(access["fields"]["status"], 200);
    assert!(
        access["fields"]["latency"]
            .as_str()
            .is_some_and(|l| l.ends_with(" μs")),
        "{access}"
    );
    assert_eq!(access["fields"]["message"], "finished processing request");
    // tower-http's own target, so existing filters (RUST_LOG=tower_http=warn) keep working.
    assert_eq!(access["target"], "tower_http::trace::on_response");
}

#[test]
fn sigterm_with_a_hanging_request_exits_within_the_grace() {
    let (rt, openai, _papita) = upstream_mocks();
    openai.set_default(crate::mock_openai::Reply::Hang);
    let tmp = tempfile::tempdir().unwrap();
    let base = openai.base_url();
    let env = [
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test-1234567890"),
        ("SHUTDOWN_GRACE_SECS", "0.5"),
    ];
    let (child, port) = start_service(tmp.path(), &env);
    let in_flight = rt.spawn(async move {
        let url = format!("http://127.0.0.1:{port}/api/chat");
        let body = serde_json::json!({"message": "hi"});
        reqwest::Client::new().post(url).json(&body).send().await
    });
    wait_for(
        "the chat to reach the upstream",
        Duration::from_secs(5),
        || openai.request_count() > 0,
    );
    let (out, took) = sigterm_and_time(child);
    assert_eq!(out.status.code(), Some(0));
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert!(
        rt.block_on(in_flight).unwrap().is_err(),
        "the hanging request was cut at exit"
    );
    wait_for(
        "the upstream connection to close",
        Duration::from_secs(2),
        || openai.abandoned() > 0,
    );
}

/// Bytes the process has read through `read` calls so far (files and sockets alike).
fn bytes_read(child: &Child) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", child.id())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn stops_with_unknown_ids_never_read_the_log_file_per_request() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("SessionLog");
    std::fs::create_dir(&log_dir).unwrap();
    // A busy day's file: 100,000 lines, one session started ten seconds ago among them.
    let now = chrono::Local::now();
    let stamp =
        |at: chrono::DateTime<chrono::Local>| at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    let date = now.format("%Y-%m-%d").to_string();
    let mut text = String::new();
    for i in 0..100_000 {
        let line = if i == 50_000 {
            format!(
                "{{\"event\": \"session_start\", \"session_id\": \"restored\", \"timestamp\": \"{}\", \"date\": \"{date}\"}}\n",
                stamp(now - chrono::Duration::seconds(10))
            )
        } else {
            format!(
                "{{\"event\": \"metric\", \"session_id\": \"session_{i}\", \"metric_name\": \"chat_usage\", \"metric_value\": {{\"model\": \"gpt-4o\", \"prompt_tokens\": 11, \"completion_tokens\": 7, \"total_tokens\": 18}}, \"timestamp\": \"{}\", \"date\": \"{date}\"}}\n",
                stamp(now)
            )
        };
        text.push_str(&line);
    }
    let file_size = text.len() as u64;
    std::fs::write(log_dir.join(format!("session_{date}.log")), text).unwrap();

    let dir = log_dir.display().to_string();
    let (child, port) = start_service(tmp.path(), &[("AL_CHAT_LOG_DIR", dir.as_str())]);
    assert_eq!(get_json(port, "/api/health")["status"], "healthy");
    let before = bytes_read(&child);
    let rt = runtime();
    rt.block_on(async {
        use futures_util::StreamExt;
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/api/session/stop");
        let statuses: Vec<u16> = futures_util::stream::iter(0..1000)
            .map(|i| {
                let request = client
                    .post(&url)
                    .json(&serde_json::json!({"session_id": format!("unknown-{i}")}));
                async move { request.send().await.unwrap().status().as_u16() }
            })
            .buffer_unordered(50)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| *s == 200));
    });
    let read = bytes_read(&child) - before;
    eprintln!("bytes read by 1,000 stops with unknown ids: {read} (log file: {file_size})");
    // 1,000 requests of ~200 bytes each; one scan of the file per stop would be 1,000 × 20 MB.
    assert!(
        read < file_size / 10,
        "{read} bytes read for 1,000 stops against a {file_size}-byte log"
    );
    // The start index was read from the file once, at start-up.
    let body = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/api/session/stop"))
            .json(&serde_json::json!({"session_id": "restored"}))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    let duration = body["duration_seconds"].as_f64().unwrap();
    assert!((10.0..120.0).contains(&duration), "{duration}");
    sigterm(&child);
    assert!(wait_exit(child).status.success());
}

#[test]
fn sigterm_closes_idle_and_half_sent_connections_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, port) = start_service(tmp.path(), &[("SHUTDOWN_GRACE_SECS", "30")]);
    use std::io::Write;
    // One client that sent half a head, one that connected and said nothing.
    let mut half = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Connections are accepted in order: once a later one is answered, both were taken.
    assert_eq!(get_json(port, "/api/health")["status"], "healthy");
    let (out, took) = sigterm_and_time(child);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        took < Duration::from_secs(3),
        "a half-sent head held shutdown for {took:?} (grace 30 s)"
    );
}

#[test]
fn in_flight_requests_and_the_papita_drain_share_one_grace_budget() {
    let (rt, openai, papita) = upstream_mocks();
    // Papita takes every usage record and never answers within the grace.
    papita.set_usage(crate::mock_papita::Usage::Slow(Duration::from_secs(60)));
    let tmp = tempfile::tempdir().unwrap();
    let (base, papita_url) = (openai.base_url(), papita.url());
    let env = [
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test-1234567890"),
        ("PAPITA_API_URL", papita_url.as_str()),
        ("PAPITA_USAGE_TIMEOUT_SECS", "60"),
        ("SHUTDOWN_GRACE_SECS", "2"),
    ];
    let (child, port) = start_service(tmp.path(), &env);
    let url = format!("http://127.0.0.1:{port}/api/chat");
    // One chat answered (its record now hangs in Papita), then one that hangs upstream.
    let answered = rt.block_on(
        reqwest::Client::new()
            .post(&url)
            .json(&serde_json::json!({"message": "one"}))
            .send(),
    );
    assert_eq!(answered.unwrap().status(), 200);
    openai.set_default(crate::mock_openai::Reply::Hang);
    let in_flight = rt.spawn(
        reqwest::Client::new()
            .post(url)
            .json(&serde_json::json!({"message": "two"}))
            .send(),
    );
    wait_for("the chat and the record", Duration::from_secs(5), || {
        openai.request_count() >= 2 && papita.usage_attempts() > 0
    });
    let (out, took) = sigterm_and_time(child);
    assert_eq!(out.status.code(), Some(0));
    // Two budgets one after the other would be 4 s.
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_millis(3500), "{took:?}");
    assert!(rt.block_on(in_flight).unwrap().is_err());
}

#[test]
fn an_unknown_time_zone_is_named_in_a_start_up_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, _) = start_service(tmp.path(), &[("TZ", "Mars/Olympus_Mons")]);
    sigterm(&child);
    let out = wait_exit(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(
            |l| l.contains("WARN") && l.contains("TZ=\"Mars/Olympus_Mons\" is not a time zone")
        ),
        "{stdout}"
    );
}

#[test]
fn records_spooled_before_a_kill_9_arrive_after_the_restart() {
    let (rt, openai, papita) = upstream_mocks();
    papita.set_usage(crate::mock_papita::Usage::Status(503));
    let tmp = tempfile::tempdir().unwrap();
    let (base, papita_url) = (openai.base_url(), papita.url());
    let logs = tmp.path().join("logs").display().to_string();
    let env = [
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test-1234567890"),
        ("PAPITA_API_URL", papita_url.as_str()),
        ("PAPITA_USAGE_MAX_ATTEMPTS", "1"),
        ("AL_CHAT_LOG_DIR", logs.as_str()),
    ];
    let (mut child, port) = start_service(tmp.path(), &env);
    rt.block_on(async {
        let client = reqwest::Client::new();
        for i in 0..20 {
            let body = serde_json::json!({"message": "m", "sessionId": "s-1", "username": format!("u{i:02}")});
            let r = client
                .post(format!("http://127.0.0.1:{port}/api/chat"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    });
    wait_for("20 records in the spool", Duration::from_secs(20), || {
        get_json(port, "/api/ready")["checks"]["papita"]["usage_records"]["spooled"] == 20
    });
    child.kill().unwrap(); // SIGKILL: no drain, nothing written at exit
    child.wait().unwrap();

    papita.set_usage(crate::mock_papita::Usage::Ok);
    let (child, _) = start_service(tmp.path(), &env);
    wait_for(
        "the spooled records after the restart",
        Duration::from_secs(20),
        || papita.record_count() >= 20,
    );
    let users: Vec<String> = papita
        .records()
        .iter()
        .map(|r| r["username"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("u{i:02}")).collect();
    assert_eq!(users, expected, "each once, in order");
    sigterm(&child);
    assert!(wait_exit(child).status.success());
}

/// schemathesis, as `scripts/test` installs it.
fn schemathesis() -> String {
    let installed = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/schemathesis-venv/bin/st"
    );
    let bin = std::env::var("SCHEMATHESIS_BIN").unwrap_or_else(|_| installed.to_string());
    assert!(
        Path::new(&bin).exists(),
        "schemathesis is needed: run scripts/test (the README's test command), which installs it \
         into target/schemathesis-venv"
    );
    bin
}

#[test]
fn schemathesis_fuzzing_from_the_openapi_document_finds_nothing() {
    let st = schemathesis();
    let (_rt, openai, papita) = upstream_mocks();
    let tmp = tempfile::tempdir().unwrap();
    let (base, papita_url) = (openai.base_url(), papita.url());
    let env = [
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test-1234567890"),
        ("PAPITA_API_URL", papita_url.as_str()),
    ];
    let (child, port) = start_service(tmp.path(), &env);
    // Every check, bounded examples, deterministic generation. `positive_data_acceptance` is
    // excluded: a chat needs "a message or a file" and a whitespace-only message counts as none,
    // which JSON Schema cannot say, so schema-valid bodies can rightly get 400.
    let out = Command::new(&st)
        .args([
            "run",
            &format!("http://127.0.0.1:{port}/api/openapi.json"),
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "25",
            "--generation-deterministic",
            "--workers",
            "1",
        ])
        .env("NO_COLOR", "1")
        .current_dir(tmp.path())
        .output()
        .expect("schemathesis runs");
    sigterm(&child);
    let exit = wait_exit(child);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("Tested: 15"),
        "schemathesis selected and tested all fifteen operations:\n{report}"
    );
    assert!(exit.status.success());
}

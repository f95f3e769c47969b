//! Issue 24: everything a client controls is bounded. Each test is one probe of the issue's table
//! (what a hostile client did to the release binary), with the probe's figure as the bound.
//! The memory and log-forging probes run against the real binary (`unread_streams.rs`).

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, any_model, error_of, spawn_app, spawn_app_with};
use crate::mock_openai::Reply;

fn log_bytes(app: &TestApp) -> u64 {
    std::fs::read_dir(&app.log_dir)
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("session_"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        })
        .unwrap_or(0)
}

/// Row 1: 300 chats with a different 1 MB `sessionId` each grew RSS by 601 MiB and the session
/// log by 300 MB. Now each is a 400 naming the field, before any state, counter, log line or
/// Papita record: nothing is kept, nothing is written, the upstream is never asked.
#[tokio::test]
async fn a_megabyte_session_id_is_refused_before_anything_is_kept_or_written() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.session_tokens = Some(1_000_000);
        openai.set_default(Reply::text("ok", 3, 1));
    })
    .await;
    let before = log_bytes(&app);
    for i in 0..300 {
        let id = format!("{i:04}{}", "x".repeat(1024 * 1024));
        let response = app
            .post_chat(&json!({"message": "hi", "sessionId": id}))
            .await;
        assert_eq!(response.status(), 400);
        let error = error_of(response).await;
        assert!(
            error.starts_with("Field 'sessionId' is 1048580 bytes long; at most 128"),
            "{error}"
        );
    }
    // The same through the header, and for the other identifiers.
    let long = "y".repeat(129);
    let header = app
        .client
        .post(format!("{}/api/chat", app.url))
        .header("X-Session-ID", &long)
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(header.status(), 400);
    assert!(error_of(header).await.contains("'X-Session-ID'"));
    for field in ["username", "model"] {
        let response = app.post_chat(&json!({"message": "hi", field: long})).await;
        assert_eq!(response.status(), 400, "{field}");
        assert!(error_of(response).await.contains(&format!("'{field}'")));
    }
    assert_eq!(
        app.openai.request_count(),
        0,
        "nothing reached the upstream"
    );
    assert_eq!(
        log_bytes(&app),
        before,
        "nothing was written to the session log"
    );
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["request_count"], 0);
    assert_eq!(app.papita.record_count(), 0);

    // At the limit, ids work as before: 128 bytes, each its own session.
    let id = "s".repeat(128);
    let response = app
        .post_chat(&json!({"message": "hi", "sessionId": id}))
        .await;
    assert_eq!(response.status(), 200);
    crate::helpers::eventually("the chat_usage line", || log_bytes(&app) > before).await;
}

/// Row 2: a stop with a 15 MB `metrics` object from an id never started answered 200 and
/// fsync'd a 15 MB line, 8 of them 120 MB in 0.8 s. Now: 413 naming the limit, nothing written.
#[tokio::test]
async fn an_oversized_stop_is_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let before = log_bytes(&app);
    let big = json!({"blob": "z".repeat(15 * 1024 * 1024)});
    for i in 0..8 {
        let response = app
            .stop_session(&json!({"session_id": format!("session_never_{i}"), "metrics": big}))
            .await;
        assert_eq!(response.status(), 413);
        let error = error_of(response).await;
        assert!(
            error.contains("SESSION_METRICS_MAX_BYTES") && error.contains("65536"),
            "{error}"
        );
    }
    assert_eq!(log_bytes(&app), before, "not one byte written");

    // Exactly at the limit is accepted: `{"blob":"…"}` is 11 bytes plus the string.
    let fits = json!({"blob": "z".repeat(65_536 - 11)});
    assert_eq!(serde_json::to_vec(&fits).unwrap().len(), 65_536);
    let response = app
        .stop_session(&json!({"session_id": "session_20261207_010203", "metrics": fits}))
        .await;
    assert_eq!(response.status(), 200);
    let over = json!({"blob": "z".repeat(65_536 - 10)});
    let response = app
        .stop_session(&json!({"session_id": "session_20261207_010203", "metrics": over}))
        .await;
    assert_eq!(response.status(), 413);

    let bad_id = app
        .stop_session(&json!({"session_id": "a\nb", "metrics": {}}))
        .await;
    assert_eq!(bad_id.status(), 400);
    assert!(error_of(bad_id).await.contains("'session_id'"));
}

/// Row 2, the other half: no rate limit applied to session routes. Now
/// `RATE_LIMIT_SESSION_PER_MIN` covers start and stop together, per client.
#[tokio::test]
async fn session_routes_share_one_rate_limit_per_client() {
    let app = spawn_app_with(|c, _, _| c.guardrails.rate.session = NonZeroU32::new(3)).await;
    let id = app.start_session_id().await;
    assert_eq!(
        app.stop_session(&json!({"session_id": id})).await.status(),
        200
    );
    app.start_session().await;
    let refused = app.post_json("/api/session/start", &json!({})).await;
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(
        error_of(refused)
            .await
            .contains("RATE_LIMIT_SESSION_PER_MIN")
    );
    let refused = app.stop_session(&json!({"session_id": id})).await;
    assert_eq!(refused.status(), 429);
    // Chats have their own allowance (none set here).
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
}

/// With nothing set the site's calls are unlimited, as before.
#[tokio::test]
async fn session_routes_are_unlimited_by_default() {
    let app = spawn_app().await;
    for _ in 0..40 {
        app.start_session().await;
    }
}

/// Row 8: the rate check ran after the body (up to 16 MB) was read and parsed. Now a refused
/// client is answered on its head: the body is never waited for.
#[tokio::test]
async fn a_rate_limited_chat_is_refused_before_its_body_is_read() {
    let app = spawn_app_with(|c, _, _| c.guardrails.rate.chat = NonZeroU32::new(1)).await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let mut stream = TcpStream::connect(app.url.trim_start_matches("http://"))
        .await
        .unwrap();
    // A head announcing 16 MB, and not one byte of the body.
    stream
        .write_all(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 16000000\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
        .await
        .expect("answered without the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
}

/// Row 4: `GET /api/openai/info` (open by default) returned Papita's password.
#[tokio::test]
async fn info_shows_urls_without_their_credentials() {
    let app = spawn_app_with(|c, _, papita| {
        c.papita.url = papita
            .url()
            .replace("http://", "http://papita-user:hunter2@");
    })
    .await;
    let body = app.get("/api/openai/info").await.text().await.unwrap();
    assert!(
        !body.contains("hunter2") && !body.contains("papita-user"),
        "{body}"
    );
    let info: Value = serde_json::from_str(&body).unwrap();
    let shown = info["credentials_info"]["papita_api_url"].as_str().unwrap();
    assert!(shown.starts_with("http://127.0.0.1:"), "{shown}");
}

/// Row 6: a model name went raw into Prometheus label values; a `"}` forged series. Any name
/// passes `OPENAI_ALLOWED_MODELS=*`: quotes, braces and backslashes are escaped in the labels,
/// and every line of the exposition still parses.
#[tokio::test]
async fn model_names_cannot_forge_metric_series() {
    let app = spawn_app_with(|c, openai, papita| {
        any_model(c, openai, papita);
        openai.set_default(Reply::text("ok", 3, 1));
    })
    .await;
    let model = r#"evil"} 1 alchat_forged_total{x="y\"#;
    let response = app
        .post_chat(&json!({"message": "hi", "model": model}))
        .await;
    assert_eq!(response.status(), 200);
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains(r#"model="evil\"} 1 alchat_forged_total{x=\"y\\""#),
        "{text}"
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(!line.starts_with("alchat_forged"), "{line}");
        // name, optional {labels}, one value: the labels' quotes balance once escapes are read.
        let mut quoted = false;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if quoted => {
                    chars.next();
                }
                '"' => quoted = !quoted,
                _ => {}
            }
        }
        assert!(!quoted, "unbalanced quotes: {line}");
    }
}

/// Row 7: IPv6 clients were limited per whole address (a /64 is 2^64 fresh keys), and with
/// `HOST=::` IPv4 peers arrived as `::ffff:a.b.c.d` and never matched IPv4 `TRUSTED_PROXIES`.
/// Here the service listens on `::` and the test connects over IPv4 through a "proxy" at
/// 127.0.0.1: the mapped peer is trusted, and the forwarded IPv6 clients share their /64.
#[tokio::test]
async fn ipv6_clients_share_their_64_and_mapped_ipv4_proxies_are_trusted() {
    let app = spawn_app_with(|c, openai, _| {
        c.host = "::".into();
        c.guardrails.rate.chat = NonZeroU32::new(1);
        c.guardrails.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        openai.set_default(Reply::text("ok", 3, 1));
    })
    .await;
    let port = app.url.rsplit(':').next().unwrap().to_string();
    let url = format!("http://127.0.0.1:{port}/api/chat");
    let chat = |client: &'static str| {
        app.client
            .post(&url)
            .header("X-Forwarded-For", client)
            .json(&json!({"message": "hi"}))
            .send()
    };
    assert_eq!(chat("2001:db8:1:2::1").await.unwrap().status(), 200);
    assert_eq!(
        chat("2001:db8:1:2:ffff:ffff:ffff:fffe")
            .await
            .unwrap()
            .status(),
        429,
        "the same /64"
    );
    assert_eq!(
        chat("2001:db8:1:3::1").await.unwrap().status(),
        200,
        "another /64"
    );
    // An IPv4 client behind the (mapped) proxy has its own allowance, written either way.
    assert_eq!(chat("198.51.100.7").await.unwrap().status(), 200);
    assert_eq!(chat("::ffff:198.51.100.7").await.unwrap().status(), 429);
}

/// The disk is watched: below `LOG_MIN_FREE_MB`, session writes get 507 JSON and nothing is
/// written, `/api/ready` says not ready, and the metrics count it. (A threshold above any real
/// disk's free space is a real low-disk condition for the service.)
#[tokio::test]
async fn a_nearly_full_disk_refuses_session_writes_with_507() {
    let mut app = spawn_app_with(|c, _, _| c.log_min_free_bytes = u64::MAX / 2).await;
    let before = log_bytes(&app);
    let start = app.post_json("/api/session/start", &json!({})).await;
    assert_eq!(start.status(), 507);
    let error = error_of(start).await;
    assert!(
        error.contains("LOG_MIN_FREE_MB") && error.contains("nearly full"),
        "{error}"
    );
    let stop = app
        .stop_session(&json!({"session_id": "session_20261207_010203"}))
        .await;
    assert_eq!(stop.status(), 507);
    let ready = app.get("/api/ready").await;
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["session_log"]["status"], "failing");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"alchat_session_log_lines_total{outcome="refused_low_disk"} 2"#),
        "{metrics}"
    );
    // Chats go on (their usage lines use the room kept free).
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    app.shutdown().await;
    assert!(log_bytes(&app) >= before);
}

/// Readiness is open to anyone, but with `ADMIN_TOKEN` set only the operator sees where the
/// files are and which hosts the service talks to.
#[tokio::test]
async fn ready_shows_paths_and_hosts_only_with_the_admin_token() {
    let app = spawn_app_with(|c, _, _| c.guardrails.admin_token = Some("t0ken".into())).await;
    let anonymous = app.get("/api/ready").await;
    assert_eq!(anonymous.status(), 200);
    let text = anonymous.text().await.unwrap();
    let dir = app.log_dir.display().to_string();
    assert!(
        !text.contains(&dir) && !text.contains("spool_dir"),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["session_log"], json!({"status": "ok"}));
    let operator = app.get_json("/api/ready", Some("t0ken")).await;
    assert_eq!(operator["checks"]["session_log"]["dir"], dir.as_str());
}

/// The drop-in's own calls stay as they were with every setting at its default: a session,
/// a chat in it with the site's fields, a stop with metrics.
#[tokio::test]
async fn the_sites_calls_are_unchanged_at_the_defaults() {
    let app = spawn_app_with(|_, openai, _| openai.set_default(Reply::text("Hi!", 9, 2))).await;
    let id = app.start_session_id().await;
    let started = Instant::now();
    let reply = app
        .post_chat(&json!({
            "message": "Hello", "history": [{"role": "user", "content": "earlier"}],
            "username": "ana", "isGuest": false, "sessionId": id, "model": "gpt-3.5-turbo",
        }))
        .await;
    assert_eq!(reply.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(10));
    let stop = app
        .stop_session(&json!({"session_id": id, "metrics": {"messages": 2}}))
        .await;
    assert_eq!(stop.status(), 200);
}

/// A whole answer larger than the longest one taken (8 MB) is a 502, not read without end.
#[tokio::test]
async fn a_whole_answer_past_the_longest_one_taken_is_a_502() {
    let app = spawn_app_with(|_, openai, _| {
        openai.set_default(Reply::text(&"w".repeat(9 * 1024 * 1024), 3, 1));
    })
    .await;
    let response = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(response.status(), 502);
    let error = error_of(response).await;
    assert!(error.contains("larger than 8 MB"), "{error}");
}

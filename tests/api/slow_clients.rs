//! Slow and idle clients over real sockets: a head that never ends, a connection that sits idle,
//! a body that trickles, more connections than allowed; and client-chosen request ids.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, captured_logs, spawn_app_with};

/// Generous enough for a loaded 2-core machine, far below the old "never".
const CUT_WITHIN: Duration = Duration::from_secs(5);

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection; returns what it sent and when it closed.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Instant) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(CUT_WITHIN * 2, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server never closed the connection"),
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        Instant::now(),
    )
}

fn quick_limits(c: &mut al_chat::Config) {
    c.header_read_timeout = Duration::from_millis(500);
    c.idle_timeout = Duration::from_millis(800);
    c.body_read_timeout = Duration::from_millis(500);
}

#[tokio::test]
async fn a_head_that_never_ends_is_cut_after_the_header_timeout() {
    let app = spawn_app_with(|c, _, _| quick_limits(c)).await;
    let mut stream = connect(&app).await;
    let sent = Instant::now();
    stream
        .write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut stream).await;
    let after = closed - sent;
    assert!(
        after >= Duration::from_millis(450),
        "cut too early: {after:?}"
    );
    assert!(after < CUT_WITHIN, "{after:?}");
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_is_cut_from_its_first_byte_not_its_last() {
    let app = spawn_app_with(|c, _, _| quick_limits(c)).await;
    let mut stream = connect(&app).await;
    let started = Instant::now();
    // One byte every 100 ms: each arrives well within any per-read timeout.
    let head = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > CUT_WITHIN {
            panic!("still accepting bytes after {:?}", started.elapsed());
        }
    }
    let (received, _) = read_until_closed(&mut stream).await;
    assert!(!received.contains("200 OK"), "{received}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() {
    let app = spawn_app_with(|c, openai, _| {
        quick_limits(c);
        // A whole answer slower than the idle timeout: in progress is not idle.
        openai.set_default(crate::mock_openai::Reply::slow(
            "late",
            Duration::from_millis(1500),
        ));
    })
    .await;
    let mut stream = connect(&app).await;
    let body = r#"{"message": "hi"}"#;
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(CUT_WITHIN, stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = Instant::now();
    // Now idle on keep-alive: closed after IDLE_TIMEOUT_SECS.
    let (_, closed) = read_until_closed(&mut stream).await;
    let idle_for = closed - answered;
    assert!(idle_for >= Duration::from_millis(700), "{idle_for:?}");
    assert!(idle_for < CUT_WITHIN, "{idle_for:?}");
}

#[tokio::test]
async fn a_body_that_trickles_gets_a_json_408() {
    let app = spawn_app_with(|c, _, _| quick_limits(c)).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"message\"")
        .await
        .unwrap();
    let (received, _) = read_until_closed(&mut stream).await;
    assert!(received.starts_with("HTTP/1.1 408"), "{received}");
    let body = &received[received.find("\r\n\r\n").unwrap() + 4..];
    let json: Value = serde_json::from_str(body).unwrap();
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("BODY_READ_TIMEOUT_SECS"),
        "{json}"
    );
    assert_eq!(app.openai.request_count(), 0);
}

#[tokio::test]
async fn past_the_connection_cap_new_clients_wait_and_health_still_answers() {
    let app = spawn_app_with(|c, _, _| {
        quick_limits(c);
        c.max_connections = std::num::NonZeroUsize::new(20);
    })
    .await;
    // 200 slowloris connections, ten times the cap.
    let mut slow = Vec::new();
    for _ in 0..200 {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_millis(50),
            TcpStream::connect(app.url.trim_start_matches("http://")),
        )
        .await
        {
            let _ = s
                .write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
                .await;
            slow.push(s);
        }
    }
    let started = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(15), app.get("/api/health"))
        .await
        .expect("health answered");
    assert_eq!(health.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        captured_logs().contains("connection limit reached (MAX_CONNECTIONS)"),
        "the cap is logged"
    );
    drop(slow);
}

#[tokio::test]
async fn client_request_ids_are_checked_and_quoted_in_the_log() {
    let app = spawn_app_with(|_, _, _| {}).await;
    let id_of = |response: &reqwest::Response| {
        response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let get = |id: String| {
        app.client
            .get(format!("{}/api/health", app.url))
            .header("x-request-id", id)
            .send()
    };
    // A good id is kept.
    let r = get("trace-42".into()).await.unwrap();
    assert_eq!(id_of(&r), "trace-42");
    // Spaces (log injection) and 8 KB ids are replaced by a fresh one.
    for bad in ["abc\" injected=1".to_string(), "x".repeat(8192)] {
        let r = get(bad.clone()).await.unwrap();
        let id = id_of(&r);
        assert_ne!(id, bad);
        assert_eq!(id.len(), 36, "a UUID: {id}");
    }
    // A visible but odd id is kept and written quoted, so it cannot pose as other fields.
    let r = get("q\"x=1".into()).await.unwrap();
    assert_eq!(id_of(&r), "q\"x=1");
    crate::helpers::eventually("the access log line", || {
        captured_logs().contains(r#"request_id="q\"x=1""#)
    })
    .await;
    assert!(!captured_logs().contains("injected=1"));
}

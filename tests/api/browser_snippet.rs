//! Docs/STREAMING.md's browser code, run as written under Node (which has `fetch`,
//! `ReadableStream` and `AbortController` like a browser) against the real service.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{eventually, spawn_app};
use crate::mock_openai::{Reply, StreamScript};

const SNIPPET: &str = include_str!("../../src/http/pages/stream-chat.mjs");
const DOC: &str = include_str!("../../Docs/STREAMING.md");

async fn run_driver(base_url: &str, scenario: &str) -> Value {
    let driver = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/node/stream-chat-driver.mjs"
    );
    let mut command = Command::new("node");
    command.args([driver, base_url, scenario]);
    // Blocking, off the runtime thread: the app under test keeps serving meanwhile.
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap();
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run node ({e}); install Node.js 18 or later (Debian: apt-get install nodejs)"
        ),
    };
    assert!(
        out.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_documented_snippet_is_the_file_the_tests_run() {
    assert!(
        DOC.contains(SNIPPET.trim()),
        "Docs/STREAMING.md must show src/http/pages/stream-chat.mjs verbatim"
    );
    let version = Command::new("node").arg("--version").output();
    assert!(
        version.is_ok_and(|v| v.status.success()),
        "node is needed by these tests; install Node.js 18 or later (Debian: apt-get install nodejs)"
    );
}

#[tokio::test]
async fn the_snippet_streams_a_reply_piece_by_piece() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::Stream(StreamScript {
        deltas: vec!["Hel".into(), "lo".into(), " there".into()],
        usage: Some((9, 4)),
        ..Default::default()
    }));
    let seen = run_driver(&app.url, "ok").await;
    assert_eq!(seen["deltas"], serde_json::json!(["Hel", "lo", " there"]));
    assert_eq!(seen["done"]["message"], "Hello there");
    assert_eq!(seen["done"]["usage"]["total_tokens"], 13);
}

#[tokio::test]
async fn its_abort_signal_stops_the_reply_and_the_upstream() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::Stream(StreamScript {
        deltas: (0..50).map(|i| format!("w{i} ")).collect(),
        usage: Some((9, 50)),
        gap: Duration::from_millis(100),
        ..Default::default()
    }));
    let seen = run_driver(&app.url, "abort").await;
    assert_eq!(seen["aborted"], true, "{seen}");
    eventually("the upstream request is closed", || {
        app.openai.abandoned() == 1
    })
    .await;
}

#[tokio::test]
async fn its_errors_are_the_services_sentence_or_a_status_for_a_proxy_page() {
    let app = spawn_app().await;
    let seen = run_driver(&app.url, "json-error").await;
    assert_eq!(seen["error"], "Message or attachment is required");
    let seen = run_driver(&app.url, "html-error").await;
    assert_eq!(seen["error"], "The chat service answered HTTP 502.");
}

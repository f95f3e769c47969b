//! Contract §11: graceful shutdown.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{date_of, eventually, manual_clock, spawn_app, spawn_app_with_clock};
use crate::mock_openai::Reply;

#[tokio::test]
async fn an_in_flight_chat_completes_after_shutdown_begins() {
    let mut app = spawn_app().await;
    app.openai
        .enqueue(Reply::slow("late but whole", Duration::from_millis(700)));
    let in_flight = app.chat_in_background();
    eventually("the chat reached the upstream", || {
        app.openai.request_count() == 1
    })
    .await;
    app.trigger_shutdown();
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["message"], "late but whole");
    app.wait_stopped().await;
    // And no new connections are taken.
    assert!(
        app.client
            .get(format!("{}/api/health", app.url))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn shutdown_writes_out_queued_log_lines_and_usage_records() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let mut app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let session = app.start_session().await;
    let sid = session["session_id"].as_str().unwrap().to_string();
    let r = app
        .post_chat(&json!({"message": "hi", "sessionId": sid}))
        .await;
    assert_eq!(r.status(), 200);
    app.shutdown().await;
    let today = date_of(&clock);
    let lines = app.log_lines(&today);
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "metric" && l["session_id"] == sid.as_str()),
        "metric line written before exit"
    );
    assert_eq!(
        app.papita.records().len(),
        1,
        "usage record sent before exit"
    );
}

#[tokio::test]
async fn run_until_stopped_returns_after_the_grace_period_despite_a_hanging_request() {
    let mut app = crate::helpers::spawn_app_with(|c, openai, _| {
        c.shutdown_grace = Duration::from_millis(300);
        c.openai.timeout = Duration::from_secs(60);
        openai.set_default(Reply::Hang);
    })
    .await;
    let hanging = app.chat_in_background();
    eventually("the chat reached the upstream", || {
        app.openai.request_count() == 1
    })
    .await;
    let started = std::time::Instant::now();
    app.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    // `run_until_stopped` returns once the grace period is over. Connection tasks still running
    // then end with the process (binary::sigterm_with_a_hanging_request_exits_within_the_grace).
    hanging.abort();
}

/// Shutdown ends with the session log: what was queued is written and synced, then the writer
/// thread is joined (one path with the background tasks). A line handed over afterwards is
/// refused, not silently kept in a queue nobody drains.
#[tokio::test]
async fn shutdown_writes_the_session_log_and_joins_its_writer() {
    let mut app = spawn_app().await;
    let id = app.start_session_id().await;
    let reply = app
        .client
        .post(format!("{}/api/chat", app.url))
        .header("X-Session-ID", &id)
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    app.shutdown().await;
    let today = chrono::Local::now().format("%Y-%m-%d").to_string();
    let lines = app.log_lines(&today);
    assert!(
        lines
            .iter()
            .any(|l| l["session_id"] == id.as_str() && l["metric_name"] == "chat_usage"),
        "{lines:?}"
    );
    let late = app
        .state
        .session_log
        .append_durable(al_chat::services::session_log::entries::session_start(
            "session_late",
            None,
            &chrono::Local::now(),
        ))
        .await;
    assert!(late.is_err(), "the writer has ended");
}

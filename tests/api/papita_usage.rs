//! Contract §9: usage records to Papita, off the request path.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{eventually, spawn_app, spawn_app_with};
use crate::mock_papita::Usage;

#[tokio::test]
async fn a_successful_chat_sends_one_record_of_the_contract_shape() {
    let app = spawn_app().await;
    let body = json!({"message": "hi", "username": "ana", "isGuest": false, "sessionId": "s-1", "model": "gpt-4o"});
    assert_eq!(app.post_chat(&body).await.status(), 200);
    eventually("record arrives", || app.papita.records().len() == 1).await;
    assert_eq!(
        app.papita.records()[0],
        json!({"userId": null, "username": "ana", "isGuest": false, "sessionId": "s-1", "projectId": "al-chat",
               "model": "gpt-4o", "inputTokens": 11, "outputTokens": 7, "totalTokens": 18})
    );
}

#[tokio::test]
async fn guests_are_recorded_as_guests() {
    let app = spawn_app().await;
    app.post_chat(&json!({"message": "hi", "username": "  ", "isGuest": false}))
        .await;
    eventually("record arrives", || app.papita.records().len() == 1).await;
    let record = &app.papita.records()[0];
    assert_eq!(
        (record["username"].clone(), record["isGuest"].clone()),
        (json!("guest"), json!(true))
    );
    assert_eq!(record["sessionId"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_slow_papita_adds_nothing_to_chat_latency() {
    let app =
        spawn_app_with(|_, _, papita| papita.set_usage(Usage::Slow(Duration::from_secs(5)))).await;
    app.wait_configured(true).await;
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_papita_that_is_down_never_fails_a_chat_and_the_record_is_spooled() {
    let app = spawn_app_with(|c, _, _| {
        let closed = crate::helpers::closed_address();
        c.papita.url = format!("http://{closed}");
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let stats = app.state.papita.stats();
    eventually("the record is spooled after its attempts", || {
        stats.spooled.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn server_errors_are_retried_from_memory_a_bounded_number_of_times_then_spooled() {
    let mut app = spawn_app_with(|_, _, papita| papita.set_usage(Usage::Status(503))).await;
    app.post_chat(&json!({"message": "hi"})).await;
    let stats = app.state.papita.stats();
    eventually("three attempts from memory, then the spool", || {
        stats.spooled.load(Ordering::Relaxed) == 1
    })
    .await;
    // PAPITA_USAGE_MAX_ATTEMPTS from memory, then at most the spool's first replay attempt
    // (later ones back off from 200 ms up to 10 s: no retry storm).
    let attempts = app.papita.usage_attempts();
    assert!((3..=4).contains(&attempts), "{attempts} attempts");
    app.shutdown().await;
    assert_eq!(app.state.papita.stats().dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let mut app = spawn_app_with(|_, _, papita| papita.set_usage(Usage::Status(400))).await;
    app.post_chat(&json!({"message": "hi"})).await;
    app.shutdown().await;
    assert_eq!(app.papita.usage_attempts(), 1);
}

#[tokio::test]
async fn a_full_queue_spills_to_the_spool_and_every_record_arrives_in_order() {
    let app = spawn_app_with(|c, _, papita| {
        c.papita.usage_queue_capacity = std::num::NonZeroUsize::MIN;
        papita.set_usage(Usage::Slow(Duration::from_millis(100)));
    })
    .await;
    // One session: one lane, one record in memory at a time; the rest overflow to disk.
    for i in 0..20 {
        let body = json!({"message": "hi", "sessionId": "s-1", "username": format!("u{i:02}")});
        assert_eq!(app.post_chat(&body).await.status(), 200);
    }
    let stats = app.state.papita.stats();
    eventually("some records spilled to the spool", || {
        stats.spooled.load(Ordering::Relaxed) > 0
    })
    .await;
    crate::helpers::eventually_within("every record", Duration::from_secs(20), || {
        app.papita.records().len() == 20
    })
    .await;
    let order: Vec<String> = app
        .papita
        .records()
        .iter()
        .map(|r| r["username"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("u{i:02}")).collect();
    assert_eq!(order, expected, "in the order of the chats");
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn no_record_for_a_failed_chat() {
    let mut app = spawn_app().await;
    app.openai
        .enqueue(crate::mock_openai::Reply::status(400, "bad"));
    app.post_chat(&json!({"message": "hi"})).await;
    app.shutdown().await;
    assert!(app.papita.records().is_empty());
}

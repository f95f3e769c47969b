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
async fn a_papita_that_is_down_never_fails_a_chat_and_drops_are_counted() {
    let app = spawn_app_with(|c, _, _| {
        let closed = crate::helpers::closed_address();
        c.papita.url = format!("http://{closed}");
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let stats = app.state.papita.stats();
    eventually("the record is dropped after its attempts", || {
        stats.dropped.load(Ordering::Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let mut app = spawn_app_with(|_, _, papita| papita.set_usage(Usage::Status(503))).await;
    app.post_chat(&json!({"message": "hi"})).await;
    // Shutdown waits for the reporter to finish its retries: then count.
    app.shutdown().await;
    assert_eq!(app.papita.usage_attempts(), 3, "three attempts and no more");
    assert_eq!(app.state.papita.stats().dropped.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let mut app = spawn_app_with(|_, _, papita| papita.set_usage(Usage::Status(400))).await;
    app.post_chat(&json!({"message": "hi"})).await;
    app.shutdown().await;
    assert_eq!(app.papita.usage_attempts(), 1);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_growing() {
    let app = spawn_app_with(|c, _, papita| {
        c.papita.usage_queue_capacity = std::num::NonZeroUsize::MIN;
        papita.set_usage(Usage::Slow(Duration::from_secs(3)));
    })
    .await;
    // 8 records are in flight at once, one waits in the queue; the rest are dropped.
    let chats = (0..20).map(|_| app.post_chat(&json!({"message": "hi"})));
    let responses = futures_util::future::join_all(chats).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    let dropped = app.state.papita.stats().dropped.load(Ordering::Relaxed);
    assert!(dropped >= 10, "dropped {dropped}");
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

//! Papita usage records are never lost silently (issue 13): a burst against a slow Papita, an
//! outage, a crash with records spooled, a full spool, a damaged spool file.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, eventually_seeing, eventually_within, spawn_app_with};
use crate::mock_papita::Usage;

/// `n` chats per session over `sessions` sessions: sessions at once, each one's chats in turn;
/// the username carries the chat's number within its session.
async fn chats(app: &TestApp, sessions: usize, n: usize) {
    futures_util::stream::iter(0..sessions)
        .for_each_concurrent(None, |s| async move {
            for i in 0..n {
                let body = json!({"message": "m", "sessionId": format!("s{s}"), "username": format!("{i:06}"), "isGuest": false});
                assert_eq!(app.post_chat(&body).await.status(), 200);
            }
        })
        .await;
}

/// Every session's records arrived exactly once each, in the order of its chats.
fn assert_all_in_order(records: &[Value], sessions: usize, n: usize) {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for r in records {
        seen.entry(r["sessionId"].as_str().unwrap().to_string())
            .or_default()
            .push(r["username"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), sessions);
    let expected: Vec<String> = (0..n).map(|i| format!("{i:06}")).collect();
    for (session, order) in seen {
        assert_eq!(order, expected, "session {session}: once each, in order");
    }
}

async fn ready(app: &TestApp) -> Value {
    app.get("/api/ready").await.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_20000_chats_against_a_slow_papita_delivers_every_record_in_order() {
    let app = spawn_app_with(|c, _, papita| {
        // A small memory queue, so the burst spills to the spool too.
        c.papita.usage_queue_capacity = std::num::NonZeroUsize::new(64).unwrap();
        papita.set_usage(Usage::Slow(Duration::from_millis(2)));
    })
    .await;
    let started = std::time::Instant::now();
    chats(&app, 50, 400).await;
    eprintln!("20,000 chats answered in {:?}", started.elapsed());
    eventually_seeing(
        "all 20,000 records at Papita",
        Duration::from_secs(90),
        || async { (app.papita.record_count(), app.state.papita.snapshot()) },
        |(arrived, _)| *arrived >= 20_000,
    )
    .await;
    eprintln!("and their records delivered after {:?}", started.elapsed());
    assert_all_in_order(&app.papita.records(), 50, 400);
    let stats = app.state.papita.stats();
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn records_spooled_while_papita_is_down_all_arrive_once_when_it_is_back() {
    let app = spawn_app_with(|_, _, papita| papita.set_usage(Usage::Status(503))).await;
    chats(&app, 10, 10).await;
    let stats = app.state.papita.stats();
    eventually_within("all 100 spooled", Duration::from_secs(20), || {
        stats.spooled.load(Ordering::Relaxed) == 100
    })
    .await;
    let state = ready(&app).await;
    assert_eq!(state["checks"]["papita"]["status"], "spooling");
    assert_eq!(state["checks"]["papita"]["usage_records"]["spooled"], 100);
    // Papita comes back: every record arrives, and none twice (every POST got an answer).
    app.papita.set_usage(Usage::Ok);
    eventually_within("the spool replayed", Duration::from_secs(30), || {
        app.papita.record_count() >= 100
    })
    .await;
    assert_all_in_order(&app.papita.records(), 10, 10);
    // Counted once Papita's answer is read, a moment after the mock counted the record.
    eventually("all 100 counted as replayed", || {
        stats.replayed.load(Ordering::Relaxed) == 100
    })
    .await;
    eventually("the spool empty", || {
        app.state.papita.snapshot().spool_bytes == 0
    })
    .await;
}

#[tokio::test]
async fn a_full_spool_drops_and_counts_while_chats_and_health_carry_on() {
    let app = spawn_app_with(|c, _, papita| {
        c.papita.spool_max_bytes = 1000; // about four records
        c.papita.usage_max_attempts = std::num::NonZeroU32::MIN;
        papita.set_usage(Usage::Status(503));
    })
    .await;
    chats(&app, 1, 20).await;
    let stats = app.state.papita.stats();
    eventually_within("all 20 spooled or dropped", Duration::from_secs(20), || {
        stats.spooled.load(Ordering::Relaxed) + stats.dropped.load(Ordering::Relaxed) == 20
    })
    .await;
    assert!(stats.dropped.load(Ordering::Relaxed) >= 10);
    assert_eq!(app.get("/api/health").await.status(), 200);
    let state = ready(&app).await;
    assert_eq!(state["status"], "ready");
    assert_eq!(state["checks"]["papita"]["status"], "dropping");
    assert!(
        state["checks"]["papita"]["usage_records"]["dropped"]
            .as_u64()
            .unwrap()
            >= 10
    );
    assert_eq!(
        app.post_chat(&json!({"message": "still fine"}))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_damaged_spool_line_is_skipped_and_reported_and_the_rest_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let record = |user: &str| {
        json!({"userId": null, "username": user, "isGuest": false, "sessionId": "s-old",
               "projectId": "al-chat", "model": "gpt-4o", "inputTokens": 1, "outputTokens": 1,
               "totalTokens": 2})
        .to_string()
    };
    std::fs::write(
        spool.join("lane-00.jsonl"),
        format!(
            "{}\n{{not a record\n{}\n",
            record("first"),
            record("second")
        ),
    )
    .unwrap();
    let dir = spool.clone();
    let app = spawn_app_with(move |c, _, _| c.papita.spool_dir = Some(dir)).await;
    eventually("both good records replayed", || {
        app.papita.records().len() == 2
    })
    .await;
    let users: Vec<Value> = app
        .papita
        .records()
        .iter()
        .map(|r| r["username"].clone())
        .collect();
    assert_eq!(users, [json!("first"), json!("second")]);
    let state = ready(&app).await;
    assert_eq!(state["checks"]["papita"]["usage_records"]["malformed"], 1);
    assert_eq!(state["checks"]["papita"]["usage_records"]["replayed"], 2);
}

#[tokio::test]
async fn at_shutdown_unsent_records_are_spooled_and_sent_by_the_next_start() {
    let mut app = spawn_app_with(|c, _, papita| {
        c.shutdown_grace = Duration::from_secs(1);
        c.papita.usage_timeout = Duration::from_secs(30);
        papita.set_usage(Usage::Slow(Duration::from_secs(30)));
    })
    .await;
    chats(&app, 5, 1).await;
    eventually("records in flight", || app.papita.usage_attempts() >= 1).await;
    let log_dir = app.log_dir.clone();
    app.shutdown().await;
    assert_eq!(app.state.papita.stats().spooled.load(Ordering::Relaxed), 5);
    assert_eq!(app.papita.record_count(), 0);

    let next = spawn_app_with(move |c, _, _| c.log_dir = log_dir).await;
    eventually("the five records", || next.papita.record_count() == 5).await;
    assert_all_in_order(&next.papita.records(), 5, 1);
}

//! Contract §7: session ids, durations, stops, bounds.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{date_of, local, manual_clock, read_log, spawn_app_with_clock};

#[tokio::test]
async fn start_issues_an_id_from_the_local_time_and_logs_it() {
    let clock = manual_clock(2026, 11, 23, 14, 5, 9, 123_456);
    let app = spawn_app_with_clock(clock, |_, _, _| {}).await;
    let body = app.start_session().await;
    assert_eq!(
        body,
        json!({"session_id": "session_20261123_140509", "timestamp": "2026-11-23T14:05:09.123456"})
    );
    let lines = app.log_lines("2026-11-23");
    let start = lines
        .iter()
        .find(|l| l["event"] == "session_start")
        .expect("session_start line");
    assert_eq!(
        start,
        &json!({"event": "session_start", "session_id": "session_20261123_140509", "timestamp": "2026-11-23T14:05:09.123456", "date": "2026-11-23"})
    );
}

#[tokio::test]
async fn ids_in_the_same_second_get_suffixes() {
    let app = spawn_app_with_clock(manual_clock(2026, 11, 23, 14, 5, 9, 0), |_, _, _| {}).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.start_session_id().await);
    }
    assert_eq!(
        ids,
        [
            "session_20261123_140509",
            "session_20261123_140509_2",
            "session_20261123_140509_3"
        ]
    );
}

#[tokio::test]
async fn a_thousand_concurrent_sessions_each_get_their_own_id_lines_and_duration() {
    let clock = manual_clock(2026, 11, 23, 10, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let starts = futures_util::future::join_all(
        (0..1000).map(|_| app.post_json("/api/session/start", &json!({}))),
    )
    .await;
    let mut ids = Vec::new();
    for r in starts {
        assert_eq!(r.status(), 200);
        ids.push(
            r.json::<Value>().await.unwrap()["session_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 1000);

    clock.set(local(2026, 11, 23, 10, 0, 7, 500_000));
    let stops = futures_util::future::join_all(
        ids.iter()
            .map(|id| app.stop_session(&json!({"session_id": id, "metrics": {"n": 1}}))),
    )
    .await;
    for r in stops {
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "stopped");
        assert_eq!(body["timestamp"], "2026-11-23T10:00:07.500000");
    }

    let lines = app.log_lines("2026-11-23");
    let starts: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "session_start")
        .collect();
    let stops: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "session_stop")
        .collect();
    assert_eq!((starts.len(), stops.len()), (1000, 1000));
    for stop in stops {
        let keys: Vec<&String> = stop.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "event",
                "session_id",
                "timestamp",
                "date",
                "duration_seconds",
                "metrics"
            ]
        );
        assert_eq!(stop["duration_seconds"], 7.5);
        assert_eq!(stop["metrics"], json!({"n": 1}));
    }
}

#[tokio::test]
async fn concurrent_sessions_each_have_their_own_duration() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let a = app.start_session_id().await;
    clock.set(local(2026, 11, 23, 9, 0, 10, 0));
    let b = app.start_session_id().await;
    clock.set(local(2026, 11, 23, 9, 0, 15, 250_000));
    let stop_a: Value = app
        .stop_session(&json!({"session_id": a}))
        .await
        .json()
        .await
        .unwrap();
    let stop_b: Value = app
        .stop_session(&json!({"session_id": b}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stop_a["duration_seconds"], 15.25);
    assert_eq!(stop_b["duration_seconds"], 5.25);
}

#[tokio::test]
async fn a_session_can_be_saved_several_times_each_from_its_start() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let id = app.start_session_id().await;
    clock.set(local(2026, 11, 23, 9, 0, 5, 0));
    assert_eq!(
        app.stop_session(&json!({"session_id": id, "metrics": {"messages": 2}}))
            .await
            .status(),
        200
    );
    clock.set(local(2026, 11, 23, 9, 0, 8, 0));
    assert_eq!(
        app.stop_session(&json!({"session_id": id, "metrics": {"messages": 4}}))
            .await
            .status(),
        200
    );
    let stops: Vec<Value> = app
        .log_lines("2026-11-23")
        .into_iter()
        .filter(|l| l["event"] == "session_stop")
        .collect();
    assert_eq!(stops.len(), 2);
    assert_eq!(
        (
            stops[0]["duration_seconds"].clone(),
            stops[1]["duration_seconds"].clone()
        ),
        (json!(5.0), json!(8.0))
    );
    assert_eq!(stops[1]["metrics"], json!({"messages": 4}));
}

#[tokio::test]
async fn stop_without_id_stops_the_latest_session_or_says_it_is_required() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let r = app.stop_session(&json!({})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "session_id is required"
    );
    // No body at all behaves the same.
    let r = app
        .client
        .post(format!("{}/api/session/stop", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    app.start_session().await;
    let latest = app.start_session_id().await;
    assert_eq!(
        app.stop_session(&json!({"metrics": {}})).await.status(),
        200
    );
    let today = date_of(&clock);
    let lines = app.log_lines(&today);
    let stop = lines.iter().find(|l| l["event"] == "session_stop").unwrap();
    assert_eq!(stop["session_id"], latest.as_str());
}

#[tokio::test]
async fn metrics_must_be_an_object() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let id = app.start_session_id().await;
    for bad in [json!([1, 2]), json!("x"), json!(3)] {
        let r = app
            .stop_session(&json!({"session_id": id, "metrics": bad}))
            .await;
        assert_eq!(r.status(), 400, "{bad}");
        assert!(
            r.json::<Value>().await.unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("'metrics'")
        );
    }
    let r = app.stop_session(&json!({"session_id": 12})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        app.stop_session(&json!({"session_id": id, "metrics": null}))
            .await
            .status(),
        200
    );
    let today = date_of(&clock);
    let stop = app
        .log_lines(&today)
        .into_iter()
        .find(|l| l["event"] == "session_stop")
        .unwrap();
    assert_eq!(stop["metrics"], json!({}));
}

#[tokio::test]
async fn after_a_restart_the_start_comes_from_the_log_then_from_the_id() {
    let clock = manual_clock(2026, 11, 23, 8, 0, 0, 0);
    let first = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let id = first.start_session_id().await;
    let log_dir = first.log_dir.clone();

    clock.set(local(2026, 11, 23, 8, 0, 0, 750_000));
    let dir = log_dir.clone();
    let second = spawn_app_with_clock(clock.clone(), move |c, _, _| c.log_dir = dir).await;
    clock.set(local(2026, 11, 23, 8, 1, 0, 500_000));
    // The start line says 08:00:00.000000 (the id alone would say the same second).
    let body: Value = second
        .stop_session(&json!({"session_id": id}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["duration_seconds"], 60.5);

    // Not in the log: from the id.
    let body: Value = second
        .stop_session(&json!({"session_id": "session_20261123_075900"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["duration_seconds"], 120.5);
    // Neither: null, and the stop is still logged.
    let r = second
        .stop_session(&json!({"session_id": "my-own-id"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["duration_seconds"],
        Value::Null
    );
    let stops: Vec<Value> = read_log(&log_dir, "2026-11-23")
        .into_iter()
        .filter(|l| l["event"] == "session_stop")
        .collect();
    assert_eq!(stops.len(), 3);
    assert_eq!(stops[2]["duration_seconds"], Value::Null);
}

#[tokio::test]
async fn tracked_sessions_are_bounded_and_forgotten_ones_still_stop_correctly() {
    let clock = manual_clock(2026, 11, 23, 8, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |c, _, _| {
        c.sessions_max = std::num::NonZeroUsize::new(3).unwrap()
    })
    .await;
    let mut ids = Vec::new();
    for s in 0..5 {
        clock.set(local(2026, 11, 23, 8, 0, s, 0));
        ids.push(app.start_session_id().await);
    }
    assert!(app.state.sessions.tracked().await <= 3);
    clock.set(local(2026, 11, 23, 8, 0, 30, 0));
    let body: Value = app
        .stop_session(&json!({"session_id": ids[0]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["duration_seconds"], 30.0, "from its id, no log read");
}

#[tokio::test]
async fn sessions_older_than_the_age_limit_are_forgotten() {
    let clock = manual_clock(2026, 11, 23, 8, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |c, _, _| {
        c.sessions_max_age = Duration::from_secs(3600)
    })
    .await;
    app.start_session().await;
    clock.set(local(2026, 11, 23, 9, 30, 0, 0));
    app.start_session().await;
    assert_eq!(app.state.sessions.tracked().await, 1);
}

#[tokio::test]
async fn a_chat_in_a_known_session_writes_a_chat_usage_line() {
    let clock = manual_clock(2026, 11, 23, 12, 0, 0, 0);
    let app = spawn_app_with_clock(clock, |_, _, _| {}).await;
    let id = app.start_session_id().await;
    // Header wins over the body; without either, the latest session is used.
    let r = app
        .client
        .post(format!("{}/api/chat", app.url))
        .header("x-session-id", "from-header")
        .json(&json!({"message": "a", "sessionId": "from-body", "model": "gpt-4o"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.post_chat(&json!({"message": "b"})).await.status(), 200);
    crate::helpers::eventually("metric lines written", || {
        app.log_lines("2026-11-23")
            .iter()
            .filter(|l| l["event"] == "metric")
            .count()
            == 2
    })
    .await;
    let metrics: Vec<Value> = app
        .log_lines("2026-11-23")
        .into_iter()
        .filter(|l| l["event"] == "metric")
        .collect();
    assert_eq!(
        metrics[0],
        json!({"event": "metric", "session_id": "from-header", "metric_name": "chat_usage",
               "metric_value": {"model": "gpt-4o", "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
               "timestamp": "2026-11-23T12:00:00.000000", "date": "2026-11-23"})
    );
    assert_eq!(metrics[1]["session_id"], id.as_str());
    let keys: Vec<&String> = metrics[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "event",
            "session_id",
            "metric_name",
            "metric_value",
            "timestamp",
            "date"
        ]
    );
}

#[tokio::test]
async fn a_chat_with_no_session_writes_no_metric_line() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    assert_eq!(app.post_chat(&json!({"message": "b"})).await.status(), 200);
    // Everything queued is written once the flush answers.
    app.state.session_log.flush().await;
    let today = date_of(&clock);
    assert!(app.log_lines(&today).iter().all(|l| l["event"] != "metric"));
}

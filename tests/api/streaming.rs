//! Contract §6 "Streaming": delta events as tokens arrive, one done or error event, the same
//! bookkeeping as a whole answer, and cancellation when the browser goes away.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{
    eventually, local, manual_clock, spawn_app, spawn_app_with, spawn_app_with_clock,
};
use crate::mock_openai::{Reply, StreamScript};
use crate::sse::SseReader;

fn script(deltas: &[&str], gap_ms: u64) -> StreamScript {
    StreamScript {
        deltas: deltas.iter().map(|d| d.to_string()).collect(),
        usage: Some((9, 4)),
        gap: Duration::from_millis(gap_ms),
        ..Default::default()
    }
}

#[tokio::test]
async fn deltas_then_one_done_event_with_the_non_streaming_answer() {
    let app = spawn_app().await;
    app.openai
        .enqueue(Reply::Stream(script(&["Hel", "lo", " there"], 0)));
    let reader = SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    );
    let (events, _) = reader.all().await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["delta", "delta", "delta", "done"]);
    assert_eq!(events[0].data, json!({"content": "Hel"}));
    let done = &events[3].data;
    assert_eq!(done["message"], "Hello there");
    assert_eq!(
        done["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, "model": "gpt-3.5-turbo"})
    );
    assert!(done["timestamp"].is_string());
    assert_eq!(
        done.as_object().unwrap().len(),
        3,
        "same fields as the JSON answer"
    );
}

#[tokio::test]
async fn the_upstream_is_asked_to_stream_and_to_report_usage() {
    let app = spawn_app().await;
    SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    )
    .all()
    .await;
    let body = &app.openai.requests()[0].body;
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn the_first_delta_arrives_before_the_upstream_has_finished() {
    let app = spawn_app().await;
    app.openai
        .enqueue(Reply::Stream(script(&["a", "b", "c", "d", "e", "f"], 300)));
    let started = Instant::now();
    let mut reader = SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    );
    let first = reader.next().await.unwrap();
    assert_eq!(first.event, "delta");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "first delta after {:?}",
        started.elapsed()
    );
    assert_eq!(app.openai.completed(), 0, "the upstream is still sending");
    let (rest, _) = reader.all().await;
    assert_eq!(rest.last().unwrap().event, "done");
}

#[tokio::test]
async fn a_streamed_chat_is_counted_logged_and_reported_like_a_whole_one() {
    let clock = manual_clock(2026, 11, 23, 15, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let id = app.start_session_id().await;
    clock.set(local(2026, 11, 23, 15, 0, 1, 0));
    app.openai.enqueue(Reply::Stream(script(&["x"], 0)));
    let body = json!({"message": "hi", "stream": true, "sessionId": id, "username": "ana", "isGuest": false});
    SseReader::new(app.post_chat(&body).await).all().await;

    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(
        (
            usage["request_count"].clone(),
            usage["total_tokens"].clone()
        ),
        (json!(1), json!(13))
    );
    eventually("papita record", || app.papita.records().len() == 1).await;
    assert_eq!(app.papita.records()[0]["inputTokens"], 9);
    assert_eq!(app.papita.records()[0]["username"], "ana");
    eventually("metric line", || {
        app.log_lines("2026-11-23")
            .iter()
            .any(|l| l["event"] == "metric")
    })
    .await;
    let metric = app
        .log_lines("2026-11-23")
        .into_iter()
        .find(|l| l["event"] == "metric")
        .unwrap();
    assert_eq!(
        metric["metric_value"],
        json!({"model": "gpt-3.5-turbo", "prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    );
}

#[tokio::test]
async fn a_stream_cut_before_usage_is_an_error_and_is_not_counted() {
    let mut app = spawn_app().await;
    app.openai.enqueue(Reply::Stream(StreamScript {
        cut_after: Some(2),
        ..script(&["a", "b", "c"], 0)
    }));
    let (events, _) = SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    )
    .all()
    .await;
    // Some deltas (how many got out before the cut is up to the network), then one error.
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert!(
        names.len() >= 2 && names[..names.len() - 1].iter().all(|n| *n == "delta"),
        "{names:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert!(
        last.data["error"]
            .as_str()
            .unwrap()
            .starts_with("OpenAI API error: ")
    );
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["request_count"], 0);
    // Shutdown sends whatever is queued: after it, no record means none was made.
    app.shutdown().await;
    assert!(app.papita.records().is_empty());
}

#[tokio::test]
async fn a_stream_that_ends_without_usage_is_an_error_not_zero_tokens() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::Stream(StreamScript {
        usage: None,
        ..script(&["a"], 0)
    }));
    let (events, _) = SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    )
    .all()
    .await;
    assert_eq!(events.last().unwrap().event, "error");
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["request_count"], 0);
}

#[tokio::test]
async fn failures_before_the_first_byte_are_ordinary_json_answers() {
    let app = spawn_app().await;
    let r = app.post_chat(&json!({"stream": true})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "Message or attachment is required"
    );

    app.openai
        .enqueue(Reply::status(429, "slow down").with_header("retry-after", "30"));
    let r = app
        .post_chat(&json!({"message": "hi", "stream": true}))
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );

    let unconfigured = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    assert_eq!(
        unconfigured
            .post_chat(&json!({"message": "hi", "stream": true}))
            .await
            .status(),
        503
    );
}

#[tokio::test]
async fn a_browser_that_goes_away_mid_stream_cancels_the_upstream_within_a_second() {
    let app = spawn_app().await;
    let deltas: Vec<String> = (0..100).map(|i| format!("t{i} ")).collect();
    let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
    app.openai.enqueue(Reply::Stream(script(&deltas, 100)));
    let mut reader = SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    );
    assert_eq!(reader.next().await.unwrap().event, "delta");
    drop(reader);
    let gone = Instant::now();
    eventually("the mock sees its connection closed", || {
        app.openai.abandoned() == 1
    })
    .await;
    assert!(
        gone.elapsed() < Duration::from_secs(1),
        "{:?}",
        gone.elapsed()
    );
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(
        usage["request_count"], 0,
        "a cancelled stream is not a success"
    );
}

#[tokio::test]
async fn keep_alive_comments_flow_during_long_silences() {
    let app = spawn_app_with(|c, _, _| c.openai.sse_keepalive = Duration::from_millis(100)).await;
    app.openai
        .enqueue(Reply::Stream(script(&["slow", " answer"], 500)));
    let (events, comments) = SseReader::new(
        app.post_chat(&json!({"message": "hi", "stream": true}))
            .await,
    )
    .all()
    .await;
    assert_eq!(events.last().unwrap().event, "done");
    assert!(comments >= 3, "comments: {comments}");
}

#[tokio::test]
async fn stream_false_or_absent_is_a_json_answer() {
    let app = spawn_app().await;
    let r = app
        .post_chat(&json!({"message": "hi", "stream": false}))
        .await;
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(r.status(), 200);
    let r = app
        .post_chat(&json!({"message": "hi", "stream": "yes"}))
        .await;
    assert_eq!(r.status(), 400, "stream must be a boolean");
}

#[tokio::test]
async fn the_stream_opens_within_one_keepalive_interval_while_the_upstream_is_slow() {
    let app = spawn_app_with(|c, _, _| c.openai.sse_keepalive = Duration::from_millis(200)).await;
    let upstream_head_after = Duration::from_secs(3);
    app.openai.enqueue(Reply::Stream(StreamScript {
        head_delay: upstream_head_after,
        ..script(&["late ", "but ", "fine"], 0)
    }));
    let started = Instant::now();
    let response = app
        .post_chat(&json!({"message": "hi", "stream": true}))
        .await;
    let head_after = started.elapsed();
    assert!(
        head_after < upstream_head_after,
        "the client saw nothing for {head_after:?}, until the upstream answered"
    );
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let mut reader = SseReader::new(response);
    let first = reader.next().await.expect("events");
    assert!(reader.comments >= 1, "a keep-alive comment came first");
    assert_eq!(first.event, "delta");
    let (rest, _) = reader.all().await;
    assert_eq!(rest.last().unwrap().event, "done");
    assert_eq!(rest.last().unwrap().data["message"], "late but fine");
}

#[tokio::test]
async fn an_upstream_failure_after_the_stream_opened_is_an_error_event() {
    let app = spawn_app_with(|c, _, _| c.openai.sse_keepalive = Duration::from_millis(100)).await;
    app.openai.enqueue(Reply::Delayed(
        Duration::from_millis(800),
        Box::new(Reply::status(404, "The model `nope` does not exist")),
    ));
    let response = app
        .post_chat(&json!({"message": "hi", "stream": true}))
        .await;
    let (events, comments) = SseReader::new(response).all().await;
    assert!(comments >= 1);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "error");
    assert_eq!(
        events[0].data["error"],
        "OpenAI API error: The model `nope` does not exist"
    );
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["request_count"], 0);
}

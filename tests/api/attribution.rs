//! Which session a chat is counted under (contract §6, 2026-11 amendment): the header, else the
//! body's `sessionId`, else the most recently started session that has not been stopped.

use std::time::Duration;

use reqwest::header::HeaderValue;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, date_of, error_of, eventually, local, manual_clock, spawn_app, spawn_app_with_clock,
};

/// Sends one chat (with an optional raw `X-Session-ID`) and returns the `sessionId` of the
/// Papita record it produced: where the chat was counted.
async fn counted_under(app: &TestApp, header: Option<HeaderValue>, body: Value) -> Value {
    let before = app.papita.records().len();
    let mut request = app.client.post(format!("{}/api/chat", app.url)).json(&body);
    if let Some(value) = header {
        request = request.header("x-session-id", value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    eventually("the Papita record", || {
        app.papita.records().len() == before + 1
    })
    .await;
    app.papita.records()[before]["sessionId"].clone()
}

fn hi() -> Value {
    json!({"message": "hi"})
}

async fn start(app: &TestApp) -> String {
    app.start_session_id().await
}

#[tokio::test]
async fn a_chat_after_its_session_stopped_belongs_to_no_session_until_the_next_start() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let first = start(&app).await;
    assert_eq!(counted_under(&app, None, hi()).await, json!(first));

    // Stopped by id: the fallback is cleared (Flask sent null here).
    let stop = app.stop_session(&json!({"session_id": first})).await;
    assert_eq!(stop.status(), 200);
    assert_eq!(counted_under(&app, None, hi()).await, Value::Null);
    let usage: Value = app
        .get(&format!("/api/openai/usage?session_id={first}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        usage["request_count"], 1,
        "the chat after the stop is not the session's"
    );

    // A later start sets it again; a stop without an id clears it too.
    let second = start(&app).await;
    assert_eq!(counted_under(&app, None, hi()).await, json!(second));
    assert_eq!(app.stop_session(&json!({})).await.status(), 200);
    assert_eq!(counted_under(&app, None, hi()).await, Value::Null);

    // Stopping an older session leaves the current one alone.
    let third = start(&app).await;
    let r = app.stop_session(&json!({"session_id": first})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(counted_under(&app, None, hi()).await, json!(third));

    // The chat after the stop wrote no chat_usage line for the stopped session.
    app.state.session_log.flush().await;
    let today = date_of(&clock);
    let metrics_of_first = app
        .log_lines(&today)
        .iter()
        .filter(|l| l["event"] == "metric" && l["session_id"] == first.as_str())
        .count();
    assert_eq!(metrics_of_first, 1);
}

#[tokio::test]
async fn blank_null_and_undefined_session_ids_mean_no_session() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let current = start(&app).await;
    let null = || Some(HeaderValue::from_static("null"));
    // The header `null` does not override a real id in the body.
    assert_eq!(
        counted_under(
            &app,
            null(),
            json!({"message": "hi", "sessionId": "s-body"})
        )
        .await,
        json!("s-body")
    );
    // Neither names a session: the current one.
    for (header, body_id) in [
        (null(), json!(null)),
        (
            Some(HeaderValue::from_static("undefined")),
            json!("undefined"),
        ),
        (Some(HeaderValue::from_static("  ")), json!("null")),
        (None, json!("")),
    ] {
        assert_eq!(
            counted_under(&app, header, json!({"message": "hi", "sessionId": body_id})).await,
            json!(current)
        );
    }
    // A stop naming "null" stops the latest session, not one called "null".
    let r = app.stop_session(&json!({"session_id": "null"})).await;
    assert_eq!(r.status(), 200);
    app.state.session_log.flush().await;
    let today = date_of(&clock);
    let stop = app
        .log_lines(&today)
        .into_iter()
        .find(|l| l["event"] == "session_stop")
        .unwrap();
    assert_eq!(stop["session_id"], current.as_str());
    // And usage for "undefined" is the whole service's, not an empty session's.
    app.get("/api/openai/usage").await;
    let usage: Value = app
        .get("/api/openai/usage?session_id=undefined")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["request_count"], 5);
    assert!(usage.get("session_id").is_none());
}

#[tokio::test]
async fn an_unreadable_session_header_is_refused_naming_the_header() {
    let app = spawn_app().await;
    start(&app).await;
    for raw in [&b"\xffsession"[..], b"session\tone", b"caf\xc3"] {
        let response = app
            .client
            .post(format!("{}/api/chat", app.url))
            .header("x-session-id", HeaderValue::from_bytes(raw).unwrap())
            .json(&hi())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{raw:?}");
        let error = error_of(response).await;
        assert!(error.contains("X-Session-ID"), "{error}");
    }
    assert_eq!(app.openai.request_count(), 0, "nothing reached OpenAI");
    // Non-ASCII that is valid UTF-8 is visible text, and accepted.
    let id = HeaderValue::from_bytes("sesión_1".as_bytes()).unwrap();
    assert_eq!(counted_under(&app, Some(id), hi()).await, json!("sesión_1"));
}

#[tokio::test]
async fn a_session_nobody_stops_ages_out_of_the_fallback() {
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |c, _, _| {
        c.sessions_max_age = Duration::from_secs(48 * 3600)
    })
    .await;
    let id = start(&app).await;
    clock.set(local(2026, 11, 25, 8, 59, 59, 0));
    assert_eq!(
        counted_under(&app, None, hi()).await,
        json!(id),
        "47:59:59 old"
    );
    clock.set(local(2026, 11, 25, 9, 0, 1, 0));
    assert_eq!(
        counted_under(&app, None, hi()).await,
        Value::Null,
        "past SESSION_MAX_AGE_HOURS a closed tab's session is nobody's"
    );
}

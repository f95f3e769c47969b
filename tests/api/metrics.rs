//! `GET /metrics`: Prometheus text, scraped as Prometheus would after real traffic.

use serde_json::json;

use crate::helpers::{any_model, spawn_app, spawn_app_with};

async fn scrape(app: &crate::helpers::TestApp) -> String {
    let r = app.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    r.text().await.unwrap()
}

/// The value of the series whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn traffic_shows_up_by_route_model_and_outcome() {
    let app = spawn_app().await;
    let id = app.start_session_id().await;
    assert_eq!(
        app.post_chat(&json!({"message": "hi", "sessionId": id}))
            .await
            .status(),
        200
    );
    let streamed = app
        .post_chat(&json!({"message": "hi", "stream": true}))
        .await;
    streamed.text().await.unwrap();
    assert_eq!(app.get("/no/such/path/secret-123").await.status(), 404);
    crate::helpers::eventually("the Papita records", || app.papita.record_count() == 2).await;
    app.state.session_log.flush().await;

    let text = scrape(&app).await;
    assert_eq!(
        value(
            &text,
            r#"alchat_http_requests_total{route="/api/chat",method="POST",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            r#"alchat_http_requests_total{route="unmatched",method="GET",status="404"}"#
        ),
        1.0
    );
    assert!(!text.contains("secret-123"), "raw URLs never become labels");
    assert_eq!(
        value(
            &text,
            r#"alchat_chat_tokens_total{model="gpt-3.5-turbo",kind="prompt"}"#
        ),
        22.0,
        "11 prompt tokens each (the mock's default), whole and streamed"
    );
    assert!(
        value(
            &text,
            r#"alchat_chat_cost_usd_total{model="gpt-3.5-turbo"}"#
        ) > 0.0
    );
    assert_eq!(
        value(
            &text,
            r#"alchat_papita_usage_records_total{outcome="sent"}"#
        ),
        2.0
    );
    assert!(
        value(
            &text,
            r#"alchat_session_log_lines_total{outcome="written"}"#
        ) >= 2.0
    );
    assert_eq!(value(&text, "alchat_chat_overhead_seconds_count"), 1.0);
    assert_eq!(
        value(&text, "alchat_openai_request_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        value(&text, "alchat_openai_time_to_first_token_seconds_count"),
        1.0
    );
    assert_eq!(value(&text, "alchat_sse_streams_open"), 0.0);
    // The test app has a key of its own for a custom base URL: resolved locally, usable.
    assert!(
        value(
            &text,
            r#"alchat_credential_resolutions_total{source="local_env",result="usable"}"#
        ) >= 1.0
    );
    // The session start waited for an fsync; each batch's size is recorded.
    assert!(value(&text, "alchat_session_log_fsync_duration_seconds_count") >= 1.0);
    assert!(value(&text, "alchat_session_log_batch_lines_count") >= 1.0);
    assert!(
        value(&text, "alchat_session_log_batch_lines_sum") >= 2.0,
        "the start line and the chats' usage lines"
    );
    assert_eq!(
        value(
            &text,
            r#"alchat_guardrail_refusals_total{guardrail="model"}"#
        ),
        0.0
    );
}

#[tokio::test]
async fn model_labels_are_bounded_like_by_model() {
    let app = spawn_app_with(any_model).await;
    for i in 0..300 {
        let r = app
            .post_chat(&json!({"message": "m", "model": format!("m-{i}")}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let text = scrape(&app).await;
    let series = text
        .lines()
        .filter(|l| l.starts_with("alchat_chat_cost_usd_total{"))
        .count();
    assert_eq!(series, 257, "256 models and other");
    assert!(text.contains(r#"alchat_chat_cost_usd_total{model="other"}"#));
}

#[tokio::test]
async fn metrics_can_be_turned_off_and_are_behind_the_admin_token() {
    let app = spawn_app_with(|c, _, _| c.metrics_enabled = false).await;
    assert_eq!(app.get("/metrics").await.status(), 404);
    // Turned off, nothing is recorded either (what the benchmark's on/off comparison relies on).
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let unrecorded = app.state.metrics.render(Default::default());
    assert!(!unrecorded.contains(r#"route="/api/chat",method="POST",status="200"} 1"#));
    assert!(unrecorded.contains("alchat_chat_overhead_seconds_count 0"));
    let app = spawn_app_with(|c, _, _| c.guardrails.admin_token = Some("tok".into())).await;
    assert_eq!(app.get("/metrics").await.status(), 401);
    let r = app
        .client
        .get(format!("{}/metrics", app.url))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn credential_resolutions_are_counted_by_source_and_result() {
    let app = spawn_app_with(|c, _, papita| {
        c.openai.api_key = None;
        papita.set_credentials(crate::mock_papita::Credentials::Status(404));
    })
    .await;
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 503, "no key anywhere: not configured");
    let text = scrape(&app).await;
    assert!(
        value(
            &text,
            r#"alchat_credential_resolutions_total{source="none",result="missing"}"#
        ) >= 1.0
    );
    assert!(!text.contains(r#"result="usable""#));
}

//! Contract §1: every error is JSON with the right status; CORS; request ids.

use serde_json::{Value, json};

use crate::helpers::{post_raw, spawn_app, spawn_app_with};

async fn assert_json_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "{content_type:?}"
    );
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test]
async fn unknown_route_is_a_json_404() {
    let app = spawn_app().await;
    assert_json_error(app.get("/api/nope").await, 404).await;
    assert_json_error(app.get("/").await, 404).await;
}

#[tokio::test]
async fn wrong_method_is_a_json_405() {
    let app = spawn_app().await;
    assert_json_error(app.get("/api/chat").await, 405).await;
    let r = app
        .client
        .post(format!("{}/api/health", app.url))
        .send()
        .await
        .unwrap();
    assert_json_error(r, 405).await;
}

#[tokio::test]
async fn malformed_json_is_a_400_not_a_500() {
    let app = spawn_app().await;
    let r = post_raw(
        &app,
        "/api/chat",
        "application/json",
        b"{\"message\": ".to_vec(),
    )
    .await;
    let body = assert_json_error(r, 400).await;
    assert!(
        body["error"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_named() {
    let app = spawn_app().await;
    let body = assert_json_error(app.post_chat(&json!({"message": 42})).await, 400).await;
    assert!(
        body["error"].as_str().unwrap().contains("'message'"),
        "{body}"
    );
    let body = assert_json_error(
        app.post_chat(&json!({"message": "hi", "history": "nope"}))
            .await,
        400,
    )
    .await;
    assert!(
        body["error"].as_str().unwrap().contains("'history'"),
        "{body}"
    );
    let body = assert_json_error(app.post_chat(&json!(["message"])).await, 400).await;
    assert!(
        body["error"].as_str().unwrap().contains("JSON object"),
        "{body}"
    );
}

#[tokio::test]
async fn wrong_content_type_is_a_json_415() {
    let app = spawn_app().await;
    let r = post_raw(
        &app,
        "/api/chat",
        "text/plain",
        b"{\"message\": \"hi\"}".to_vec(),
    )
    .await;
    assert_json_error(r, 415).await;
}

#[tokio::test]
async fn body_over_the_limit_is_a_json_413() {
    let app =
        spawn_app_with(|c, _, _| c.body_limit = std::num::NonZeroUsize::new(1024).unwrap()).await;
    let big = json!({"message": "x".repeat(4096)});
    assert_json_error(app.post_chat(&big).await, 413).await;
    // Without Content-Length (chunked), the limit still holds.
    let chunks =
        futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.to_string().into_bytes())]);
    let r = app
        .client
        .post(format!("{}/api/chat", app.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_json_error(r, 413).await;
}

#[tokio::test]
async fn default_limit_accepts_ten_one_megabyte_files() {
    // The body limit is the point here. Ten 1 MB files pass gpt-3.5's context window, so with
    // HISTORY_TRIM=auto this is a 413 naming the model's limit (tests/api/context_window.rs);
    // sent whole, as Flask did, the upstream decides.
    let app = spawn_app_with(|c, _, _| c.guardrails.history_trim = false).await;
    let files: Vec<Value> = (0..10)
        .map(|i| json!({"name": format!("f{i}.txt"), "content": "y".repeat(1_000_000)}))
        .collect();
    let r = app
        .post_chat(&json!({"message": "compare", "attached_files": files}))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn cors_allows_any_origin_by_default() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/api/health", app.url))
        .header("origin", "https://site.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/api/chat", app.url))
        .header("origin", "https://site.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-session-id,x-some-site-header",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    let methods = preflight.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(methods.contains("POST"), "{methods}");
    let headers = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        headers.contains("content-type")
            && headers.contains("x-session-id")
            && headers.contains("x-some-site-header"),
        "{headers}"
    );
}

#[tokio::test]
async fn cors_allowed_origins_restricts() {
    let app =
        spawn_app_with(|c, _, _| c.cors_origins = Some(vec!["https://ok.example".into()])).await;
    let ok = app
        .client
        .get(format!("{}/api/health", app.url))
        .header("origin", "https://ok.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://ok.example"
    );
    let other = app
        .client
        .get(format!("{}/api/health", app.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn errors_carry_cors_headers_so_the_browser_can_read_them() {
    let app = spawn_app().await;
    let r = app
        .client
        .post(format!("{}/api/chat", app.url))
        .header("origin", "https://site.example")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/api/health", app.url))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = app.get("/api/nope").await;
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let logs = crate::helpers::captured_logs();
    assert!(
        logs.contains("abc-123"),
        "the request id is in the request's log line"
    );
}

#[tokio::test]
async fn a_request_past_the_request_timeout_is_a_json_408() {
    let app = spawn_app_with(|c, openai, _| {
        c.request_timeout = std::time::Duration::from_millis(300);
        openai.set_default(crate::mock_openai::Reply::slow(
            "late",
            std::time::Duration::from_secs(3),
        ));
    })
    .await;
    let body = assert_json_error(app.post_chat(&json!({"message": "hi"})).await, 408).await;
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("REQUEST_TIMEOUT_SECS"),
        "{body}"
    );
}

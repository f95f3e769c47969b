//! Contract §6, non-streaming: what goes upstream, what comes back, every error row.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TEST_KEY, eventually, spawn_app, spawn_app_with};
use crate::mock_openai::Reply;

#[tokio::test]
async fn chat_answers_with_message_usage_and_timestamp() {
    let app = spawn_app().await;
    let response = app.post_chat(&json!({"message": "Hello"})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["message"], "Hello from the mock");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "model": "gpt-3.5-turbo"})
    );
    let ts = body["timestamp"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%S%.6f").is_ok(),
        "{ts}"
    );
}

#[tokio::test]
async fn history_goes_upstream_before_the_message_without_extra_fields() {
    let app = spawn_app().await;
    let history = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "timestamp": "2026-01-01", "id": 7},
        {"role": "assistant", "content": "Hello!"}
    ]);
    assert_eq!(
        app.post_chat(&json!({"message": "And now?", "history": history}))
            .await
            .status(),
        200
    );
    let sent = &app.openai.requests()[0];
    assert_eq!(sent.authorization, format!("Bearer {TEST_KEY}"));
    assert_eq!(sent.body["model"], "gpt-3.5-turbo");
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"}
        ])
    );
}

#[tokio::test]
async fn attached_files_are_composed_exactly() {
    let app = spawn_app().await;
    let files = json!([{"name": "a.txt", "content": "AAA"}, {"name": "b.md", "content": "BBB"}]);
    assert_eq!(
        app.post_chat(&json!({"message": "Which is longer?", "attached_files": files}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_chat(&json!({"attached_files": [{"content": "only"}]}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_chat(&json!({"attached_files": files}))
            .await
            .status(),
        200
    );
    let sent: Vec<String> = app
        .openai
        .requests()
        .iter()
        .map(|r| {
            r.body["messages"].as_array().unwrap().last().unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        sent[0],
        "[Attached file 1: a.txt]\n\nAAA\n\n---\n\n[Attached file 2: b.md]\n\nBBB\n\n---\n\nWhich is longer?"
    );
    assert_eq!(
        sent[1],
        "[Attached file 1: file]\n\nonly\n\n---\n\nPlease analyze the attached file."
    );
    assert!(sent[2].ends_with("\n\n---\n\nPlease compare and analyze the attached files."));
}

#[tokio::test]
async fn legacy_attachment_fields_still_work() {
    let app = spawn_app().await;
    let body = json!({"message": "Summarise", "attached_content": "text", "attached_filename": "notes.txt"});
    assert_eq!(app.post_chat(&body).await.status(), 200);
    assert_eq!(
        app.post_chat(&json!({"attached_content": "t2"}))
            .await
            .status(),
        200
    );
    let requests = app.openai.requests();
    let last = |i: usize| {
        requests[i].body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        last(0),
        "[Attached file 1: notes.txt]\n\ntext\n\n---\n\nSummarise"
    );
    assert_eq!(
        last(1),
        "[Attached file 1: file]\n\nt2\n\n---\n\nPlease analyze the attached file."
    );
}

#[tokio::test]
async fn model_in_the_request_overrides_the_default() {
    let app = spawn_app().await;
    let body: Value = app
        .post_chat(&json!({"message": "hi", "model": "gpt-4o"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["usage"]["model"], "gpt-4o");
    assert_eq!(app.openai.requests()[0].body["model"], "gpt-4o");
}

#[tokio::test]
async fn no_message_and_no_file_is_a_400() {
    let app = spawn_app().await;
    for body in [
        json!({}),
        json!({"message": ""}),
        json!({"message": "   ", "attached_files": []}),
    ] {
        let r = app.post_chat(&body).await;
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "Message or attachment is required"
        );
    }
    assert_eq!(app.openai.request_count(), 0);
}

#[tokio::test]
async fn not_configured_is_a_503_saying_how_to_configure() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "OpenAI service not configured. Please set OPENAI_API_KEY in .env file or ensure Papita API is running."
    );
}

#[tokio::test]
async fn upstream_401_is_a_401_with_the_contract_text() {
    let app = spawn_app().await;
    app.openai.accept_only_keys(&["sk-some-other-key"]);
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"],
        "Invalid OpenAI API key. Please check your credentials in Papita API or .env file."
    );
    assert_eq!(
        body["details"],
        "The OpenAI API key is invalid or expired. If using Papita API, ensure it's running and has valid credentials."
    );
}

#[tokio::test]
async fn upstream_429_with_a_long_retry_after_is_passed_on_at_once() {
    let app = spawn_app().await;
    app.openai
        .set_default(Reply::status(429, "Rate limit reached").with_header("retry-after", "60"));
    let started = Instant::now();
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a 429 must not hold the request: {:?}",
        started.elapsed()
    );
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    let error = crate::helpers::error_of(r).await;
    assert!(
        error.starts_with("OpenAI API error: ") && error.contains("Rate limit reached"),
        "{error}"
    );
    assert_eq!(app.openai.request_count(), 1, "no retry beyond the budget");
}

#[tokio::test]
async fn upstream_429_with_a_short_retry_after_is_retried() {
    let app = spawn_app().await;
    app.openai
        .enqueue(Reply::status(429, "slow down").with_header("retry-after", "1"));
    let started = Instant::now();
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited as told"
    );
    assert_eq!(app.openai.request_count(), 2);
}

#[tokio::test]
async fn insufficient_quota_is_not_retried() {
    let app = spawn_app().await;
    let body = json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}});
    app.openai.set_default(Reply::Status {
        status: 429,
        body: body.to_string(),
        headers: vec![],
    });
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 429);
    assert_eq!(app.openai.request_count(), 1);
}

#[tokio::test]
async fn upstream_rejections_are_400s_with_the_upstreams_reason() {
    // Any model may reach the upstream here: its own refusal is under test.
    let app = spawn_app_with(crate::helpers::any_model).await;
    for status in [400, 404, 422] {
        app.openai
            .enqueue(Reply::status(status, "The model `gpt-9` does not exist"));
        let r = app
            .post_chat(&json!({"message": "hi", "model": "gpt-9"}))
            .await;
        assert_eq!(r.status(), 400, "upstream {status}");
        let error = crate::helpers::error_of(r).await;
        assert_eq!(error, "OpenAI API error: The model `gpt-9` does not exist");
    }
}

#[tokio::test]
async fn upstream_5xx_is_a_502_after_bounded_retries() {
    let app = spawn_app().await;
    app.openai.set_default(Reply::status(500, "boom"));
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 502);
    let error = crate::helpers::error_of(r).await;
    assert!(
        error.starts_with("OpenAI API error: ") && error.contains("500"),
        "{error}"
    );
    assert_eq!(app.openai.request_count(), 3, "one attempt and two retries");
}

#[tokio::test]
async fn a_5xx_then_success_is_a_success() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::status(503, "overloaded"));
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
}

#[tokio::test]
async fn a_malformed_answer_is_a_502() {
    let app = spawn_app().await;
    app.openai.set_default(Reply::Malformed);
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 502);
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .starts_with("OpenAI API error: malformed answer")
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_502() {
    let app = spawn_app_with(|c, _, _| {
        let closed = crate::helpers::closed_address();
        c.openai.base_url = format!("http://{closed}/v1");
        c.openai.retry_budget = Duration::from_millis(600);
    })
    .await;
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 502);
    let error = crate::helpers::error_of(r).await;
    assert!(
        error.starts_with("OpenAI API error: cannot connect"),
        "{error}"
    );
}

#[tokio::test]
async fn a_hanging_upstream_is_a_504_when_the_timeout_fires() {
    let app = spawn_app_with(|c, openai, _| {
        c.openai.timeout = Duration::from_millis(500);
        openai.set_default(Reply::Hang);
    })
    .await;
    let started = Instant::now();
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .starts_with("OpenAI API error: ")
    );
    // The upstream request was abandoned, not left running.
    eventually("upstream connection closed", || app.openai.abandoned() == 1).await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_request() {
    let app = spawn_app().await;
    app.openai
        .enqueue(Reply::slow("too late", Duration::from_secs(10)));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let result = client
        .post(format!("{}/api/chat", app.url))
        .json(&json!({"message": "hi"}))
        .send()
        .await;
    assert!(result.is_err(), "the client gave up");
    eventually("the mock sees its connection closed", || {
        app.openai.abandoned() == 1
    })
    .await;
    assert_eq!(app.openai.completed(), 0);
    // And nothing was counted for the abandoned chat.
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["request_count"], 0);
}

#[tokio::test]
async fn a_5xx_that_echoes_the_key_reaches_neither_the_answer_nor_the_logs() {
    const ECHOED: &str = "sk-ECHOED-by-a-broken-upstream-123456";
    let app = spawn_app_with(|c, _, _| c.openai.api_key = Some(ECHOED.into())).await;
    app.openai.set_default(Reply::status(
        500,
        &format!("internal error handling key {ECHOED}"),
    ));
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains(ECHOED) && text.contains("sk-ECHO..."),
        "{text}"
    );
    assert_eq!(
        app.openai.request_count(),
        3,
        "retried, so the retry log line was written"
    );
    assert!(!crate::helpers::captured_logs().contains(ECHOED));
}

#[tokio::test]
async fn upstream_errors_never_echo_the_key() {
    let app = spawn_app().await;
    app.openai.set_default(Reply::status(
        400,
        &format!("bad request for key {TEST_KEY}"),
    ));
    let r = app.post_chat(&json!({"message": "hi"})).await;
    let text = r.text().await.unwrap();
    assert!(!text.contains(TEST_KEY), "{text}");
    assert!(text.contains("sk-test..."), "{text}");
}

#[tokio::test]
async fn openai_http2_chooses_the_upstream_protocol() {
    use al_chat::config::Http2;
    use axum::http::Version;
    for (setting, expected) in [
        (Http2::Always, Version::HTTP_2),
        (Http2::Never, Version::HTTP_11),
        // A plain http:// upstream under `auto`: no TLS to negotiate HTTP/2 with.
        (Http2::Auto, Version::HTTP_11),
    ] {
        let app = spawn_app_with(|c, _, _| c.openai.http2 = setting).await;
        for stream in [false, true] {
            let r = app
                .post_chat(&json!({"message": "hi", "stream": stream}))
                .await;
            assert_eq!(r.status(), 200);
            r.text().await.unwrap();
        }
        let versions: Vec<Version> = app.openai.requests().iter().map(|r| r.version).collect();
        assert_eq!(versions, vec![expected; 2], "{setting:?}");
    }
}

#[tokio::test]
async fn a_key_no_http_header_can_carry_is_a_401_not_a_crash() {
    // A control character inside the key (a stray byte in a .env): the Authorization header
    // cannot be built. It is refused before anything is sent, whole and streamed.
    let app = spawn_app_with(|c, _, _| c.openai.api_key = Some("sk-bad\u{7}key-1234".into())).await;
    for body in [
        json!({"message": "hi"}),
        json!({"message": "hi", "stream": true}),
    ] {
        let r = app.post_chat(&body).await;
        assert_eq!(r.status(), 401, "{body}");
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .starts_with("Invalid OpenAI API key"),
            "{answer}"
        );
    }
    assert_eq!(app.openai.request_count(), 0, "nothing was sent");
}

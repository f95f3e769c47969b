//! Guardrails for a public endpoint (contract §12): each refusal over real HTTP, with its
//! status, text and `Retry-After`, and never reaching the mock OpenAI.

use std::num::NonZeroU32;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    TestApp, error_of, eventually, local, manual_clock, retry_after, spawn_app, spawn_app_with,
    spawn_app_with_clock,
};
use crate::mock_openai::{Counted, Reply, StreamScript};

async fn usage(app: &TestApp) -> Value {
    app.get("/api/openai/usage").await.json().await.unwrap()
}

#[tokio::test]
async fn a_model_off_the_allow_list_is_refused_before_openai_whole_and_streamed() {
    let app =
        spawn_app_with(|c, _, _| c.guardrails.allowed_models = Some("gpt-4o-mini, o3*".into()))
            .await;
    for stream in [false, true] {
        let r = app
            .post_chat(&json!({"message": "hi", "model": "o1-pro", "stream": stream}))
            .await;
        assert_eq!(r.status(), 400);
        let error = error_of(r).await;
        assert_eq!(
            error,
            "Model 'o1-pro' is not allowed. Allowed: gpt-4o-mini, o3*"
        );
    }
    assert_eq!(app.openai.request_count(), 0);
    for model in ["gpt-4o-mini", "o3-mini"] {
        let r = app
            .post_chat(&json!({"message": "hi", "model": model}))
            .await;
        assert_eq!(r.status(), 200, "{model}");
    }
}

#[tokio::test]
async fn by_default_the_configured_model_and_the_price_tables_are_allowed() {
    let app = spawn_app_with(|c, _, _| c.openai.model = "my-local-model".into()).await;
    for model in ["my-local-model", "gpt-4o-mini", "gpt-4o-2024-08-06"] {
        let r = app
            .post_chat(&json!({"message": "hi", "model": model}))
            .await;
        assert_eq!(r.status(), 200, "{model}");
    }
    let r = app
        .post_chat(&json!({"message": "hi", "model": "someone-elses-model"}))
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn chats_past_the_per_minute_limit_get_429_with_retry_after() {
    let app = spawn_app_with(|c, _, _| c.guardrails.rate.chat = NonZeroU32::new(2)).await;
    for _ in 0..2 {
        assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    }
    let r = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(r.status(), 429);
    let wait = retry_after(&r);
    assert!((1..=30).contains(&wait), "{wait}");
    let error = error_of(r).await;
    assert!(
        error.contains("at most 2 per minute (RATE_LIMIT_CHAT_PER_MIN)"),
        "{error}"
    );
    assert_eq!(
        app.openai.request_count(),
        2,
        "the refused chat never reached OpenAI"
    );
}

#[tokio::test]
async fn the_connection_test_has_its_own_limit_and_counts_apart_from_chats() {
    let app = spawn_app_with(|c, _, _| c.guardrails.rate.test = NonZeroU32::new(1)).await;
    app.openai
        .enqueue(Reply::text("Connection successful", 20, 3));
    assert_eq!(app.get("/api/openai/test").await.status(), 200);
    let r = app.get("/api/openai/test").await;
    assert_eq!(r.status(), 429);
    assert!(error_of(r).await.contains("RATE_LIMIT_TEST_PER_MIN"));
    let u = usage(&app).await;
    assert_eq!(u["request_count"], 0, "Flask's totals stay chats only");
    assert_eq!(u["test_usage"]["request_count"], 1);
    assert_eq!(u["test_usage"]["total_tokens"], 23);
    // Chats are not limited by the test's limit.
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
}

async fn chat_as(app: &TestApp, forwarded_for: &str) -> u16 {
    app.client
        .post(format!("{}/api/chat", app.url))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    // Untrusted peer: the header is ignored, both "clients" are the one peer.
    let app = spawn_app_with(|c, _, _| c.guardrails.rate.chat = NonZeroU32::new(1)).await;
    assert_eq!(chat_as(&app, "198.51.100.1").await, 200);
    assert_eq!(
        chat_as(&app, "198.51.100.2").await,
        429,
        "a client cannot spoof"
    );
    // Behind a trusted proxy (the loopback peer): each forwarded address has its own limit.
    let app = spawn_app_with(|c, _, _| {
        c.guardrails.rate.chat = NonZeroU32::new(1);
        c.guardrails.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    assert_eq!(chat_as(&app, "198.51.100.1").await, 200);
    assert_eq!(chat_as(&app, "198.51.100.2").await, 200);
    assert_eq!(chat_as(&app, "198.51.100.1").await, 429);
    // A client's own prefix on the header changes nothing: our proxy's entry is last.
    assert_eq!(chat_as(&app, "203.0.113.50, 198.51.100.2").await, 429);
}

#[tokio::test]
async fn fifty_concurrent_chats_against_a_budget_for_ten_let_ten_through() {
    let app = spawn_app_with(|c, openai, _| {
        // "hi" is 1 prompt token by the estimate, plus 1,000 reserved for the answer.
        c.guardrails.budget.daily_tokens = Some(10 * 1001);
        openai.set_default(Reply::slow("ok", Duration::from_millis(300)));
    })
    .await;
    let chats = (0..50).map(|_| app.post_chat(&json!({"message": "hi"})));
    let responses = futures_util::future::join_all(chats).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let refused: Vec<&reqwest::Response> = responses.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(ok, 10);
    assert_eq!(refused.len(), 40);
    assert!(
        refused
            .iter()
            .all(|r| r.headers().contains_key("retry-after"))
    );
    assert_eq!(app.openai.request_count(), 10, "only ten reached OpenAI");
    let u = usage(&app).await;
    let spent = u["budget"]["spent"]["daily_tokens"].as_u64().unwrap();
    assert_eq!(
        spent,
        10 * 5,
        "settled to the real usage (3 + 2 tokens each)"
    );
    assert!(spent <= 10 * 1001);
}

#[tokio::test]
async fn a_spent_budget_says_when_it_resets_and_resets_at_local_midnight() {
    let clock = manual_clock(2026, 11, 23, 22, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |c, _, _| {
        c.guardrails.budget.daily_usd = Some(0.5);
    })
    .await;
    // 1M prompt tokens of gpt-3.5-turbo: $0.50, the whole budget.
    app.openai.enqueue(Reply::text("x", 1_000_000, 0));
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    for stream in [false, true] {
        let r = app
            .post_chat(&json!({"message": "hi", "stream": stream}))
            .await;
        assert_eq!(r.status(), 429, "stream: {stream}");
        assert_eq!(retry_after(&r), 2 * 3600);
        let error = error_of(r).await;
        assert_eq!(
            error,
            "The daily budget of $0.50 (BUDGET_DAILY_USD) is spent; it resets at 2026-11-24T00:00:00.000000. Try again then."
        );
    }
    let u = usage(&app).await;
    assert_eq!(u["budget"]["remaining"]["daily_usd"], 0.0);
    assert_eq!(u["budget"]["resets_at"], "2026-11-24T00:00:00.000000");
    clock.set(local(2026, 11, 24, 0, 0, 1, 0));
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
}

#[tokio::test]
async fn a_session_budget_holds_per_session() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.session_tokens = Some(100);
        c.openai.max_output_tokens = Some(60);
        openai.set_default(Reply::Counted(Counted::long(60)));
    })
    .await;
    let chat = |s: &str| app.post_chat(&json!({"message": "hi", "sessionId": s}));
    assert_eq!(chat("a").await.status(), 200);
    // 8 prompt tokens and 60 answered: 24 left, short of the prompt and a minimal answer (64).
    assert_eq!(chat("a").await.status(), 429);
    assert_eq!(chat("b").await.status(), 200, "another session has its own");
}

#[tokio::test]
async fn a_stream_the_client_cancels_still_counts_as_an_estimate() {
    let app = spawn_app_with(|c, _, _| c.guardrails.budget.daily_tokens = Some(1_000_000)).await;
    app.openai.enqueue(Reply::Stream(StreamScript {
        deltas: (0..100).map(|i| format!("word{i:02} ")).collect(),
        usage: Some((9, 100)),
        gap: Duration::from_millis(50),
        ..Default::default()
    }));
    let mut response = app
        .post_chat(&json!({"message": "tell me a long story", "stream": true}))
        .await;
    // Read a few pieces, then go away.
    let mut seen = 0;
    while seen < 3 {
        if let Some(chunk) = response.chunk().await.unwrap() {
            seen += String::from_utf8_lossy(&chunk)
                .matches("event: delta")
                .count();
        }
    }
    drop(response);
    eventually("the upstream request closed", || {
        app.openai.abandoned() == 1
    })
    .await;
    // The estimate is settled by a task when the stream is dropped: poll for it.
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let mut u = usage(&app).await;
    for _ in 0..250 {
        if u["estimated_usage"]["request_count"] == 1 {
            break;
        }
        poll.tick().await;
        u = usage(&app).await;
    }
    assert_eq!(u["estimated_usage"]["request_count"], 1, "{u}");
    assert_eq!(u["estimated_usage"]["estimated"], true);
    assert!(u["estimated_usage"]["completion_tokens"].as_u64().unwrap() >= 3);
    assert_eq!(
        u["request_count"], 0,
        "the contract's totals stay what OpenAI reported"
    );
    let spent = u["budget"]["spent"]["daily_tokens"].as_u64().unwrap();
    assert!(
        spent > 0 && spent < 1001,
        "settled to the estimate, not the reservation: {spent}"
    );
}

#[tokio::test]
async fn input_past_max_input_chars_is_a_413_naming_the_part() {
    let app = spawn_app_with(|c, _, _| c.guardrails.max_input_chars = 1000).await;
    let r = app
        .post_chat(&json!({"message": "hi", "attached_files": [{"name": "big.txt", "content": "x".repeat(5000)}]}))
        .await;
    assert_eq!(r.status(), 413);
    let error = error_of(r).await;
    assert!(
        error.contains("MAX_INPUT_CHARS") && error.contains("the attached files"),
        "{error}"
    );
    assert_eq!(app.openai.request_count(), 0);
}

#[tokio::test]
async fn the_admin_token_guards_info_and_test_and_nothing_the_website_calls() {
    const TOKEN: &str = "s3cret-admin-token";
    let app = spawn_app_with(|c, _, _| c.guardrails.admin_token = Some(TOKEN.into())).await;
    for path in ["/api/openai/info", "/api/openai/test"] {
        let r = app.get(path).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(error_of(r).await.contains("Authorization: Bearer"));
        let r = app
            .client
            .get(format!("{}{path}", app.url))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = app
            .client
            .get(format!("{}{path}", app.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(app.get("/api/health").await.status(), 200);
    assert_eq!(app.get("/api/openai/usage").await.status(), 200);
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let id = app.start_session_id().await;
    assert_eq!(
        app.stop_session(&json!({"session_id": id})).await.status(),
        200
    );
}

#[tokio::test]
async fn with_every_guardrail_at_its_default_the_website_calls_work() {
    let app = spawn_app().await;
    assert_eq!(app.get("/api/health").await.status(), 200);
    let id = app.start_session_id().await;
    for _ in 0..100 {
        assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    }
    assert_eq!(
        app.stop_session(&json!({"session_id": id})).await.status(),
        200
    );
    let u = usage(&app).await;
    assert_eq!(u["request_count"], 100);
    assert!(u.get("budget").is_none(), "no budget set, none reported");
    assert_eq!(app.get("/api/openai/info").await.status(), 200);
}

//! Contract §3: Papita first, then the environment (the other way round with a custom base URL);
//! cached, single-flight, refreshed once per rejected key after a 401.
//!
//! The mock OpenAI is a custom base URL, where a set `OPENAI_API_KEY` wins over Papita. So tests
//! of Papita's key in chats unset `OPENAI_API_KEY`, and tests of the order with OpenAI's own URL
//! ask `/api/openai/info`, which resolves the key without calling OpenAI.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TEST_KEY, captured_logs, skip_time, spawn_app_with};
use crate::mock_papita::{Credentials, Usage};

const PAPITA_KEY: &str = "sk-papita-key-abcdefghijklmnop";

async fn source(app: &crate::helpers::TestApp) -> Value {
    let info: Value = app.get("/api/openai/info").await.json().await.unwrap();
    info["credentials_info"]["credential_source"].clone()
}

/// OpenAI's own base URL (nothing calls it in these tests), and an `OPENAI_API_KEY` set.
fn openais_url(c: &mut al_chat::Config) {
    c.openai.base_url = al_chat::config::DEFAULT_OPENAI_BASE_URL.into();
}

/// Papita's key is the only one (the mock's custom URL would otherwise prefer the env key).
fn papita_only(c: &mut al_chat::Config) {
    c.openai.api_key = None;
}

#[tokio::test]
async fn with_openais_url_papitas_key_is_used_first() {
    let app = spawn_app_with(|c, _, papita| {
        openais_url(c);
        papita.set_key(PAPITA_KEY);
    })
    .await;
    assert_eq!(source(&app).await, "papita_api");
    let info: Value = app.get("/api/openai/info").await.json().await.unwrap();
    assert_eq!(
        info["credentials_info"]["openai_api_key_prefix"],
        "sk-papi..."
    );
}

#[tokio::test]
async fn with_a_custom_url_the_env_key_wins_and_papitas_key_never_goes_there() {
    let app = spawn_app_with(|_, _, papita| papita.set_key(PAPITA_KEY)).await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    assert_eq!(
        app.openai.requests()[0].authorization,
        format!("Bearer {TEST_KEY}")
    );
    assert_eq!(source(&app).await, "local_env");
    assert_eq!(app.papita.credential_requests(), 0, "Papita not even asked");
}

#[tokio::test]
async fn with_a_custom_url_and_no_env_key_papitas_key_is_used_with_a_warning_naming_the_host() {
    let app = spawn_app_with(|c, _, papita| {
        papita_only(c);
        papita.set_key(PAPITA_KEY);
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    assert_eq!(
        app.openai.requests()[0].authorization,
        format!("Bearer {PAPITA_KEY}")
    );
    assert_eq!(source(&app).await, "papita_api");
    let logs = captured_logs();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("the OpenAI key from Papita will be sent to 127.0.0.1")),
        "no warning naming the host"
    );
}

#[tokio::test]
async fn every_papita_answer_shape_is_understood() {
    for body in [
        json!({"credentials": {"credentials": {"api_key": PAPITA_KEY}}}),
        json!({"credentials": {"api_key": PAPITA_KEY}}),
        json!({"api_key": PAPITA_KEY}),
        json!({"value": PAPITA_KEY}),
        json!({"credential_value": format!("  {PAPITA_KEY}  ")}),
    ] {
        let app = spawn_app_with(|c, _, papita| {
            openais_url(c);
            papita.set_credentials(Credentials::Json(body.clone()))
        })
        .await;
        assert_eq!(source(&app).await, "papita_api", "{body}");
        let info: Value = app.get("/api/openai/info").await.json().await.unwrap();
        assert_eq!(
            info["credentials_info"]["openai_api_key_length"],
            PAPITA_KEY.len()
        );
    }
}

#[tokio::test]
async fn papita_failures_fall_through_to_the_environment() {
    for behaviour in [
        Credentials::Status(500),
        Credentials::Status(404),
        Credentials::Garbage,
        Credentials::Json(json!({})),
        Credentials::Json(json!({"api_key": "   "})),
        Credentials::Json(json!(["sk-in-an-array"])),
    ] {
        let app = spawn_app_with(|c, _, papita| {
            openais_url(c);
            papita.set_credentials(behaviour.clone())
        })
        .await;
        assert_eq!(source(&app).await, "local_env", "{behaviour:?}");
        assert!(app.papita.credential_requests() >= 1, "Papita was asked");
    }
}

#[tokio::test]
async fn a_papita_that_is_down_falls_through() {
    let app = spawn_app_with(|c, _, _| {
        openais_url(c);
        let closed = crate::helpers::closed_address();
        c.papita.url = format!("http://{closed}");
    })
    .await;
    assert_eq!(source(&app).await, "local_env");
}

#[tokio::test]
async fn a_slow_papita_costs_at_most_its_timeout() {
    let app = spawn_app_with(|c, _, papita| {
        openais_url(c);
        c.papita.credentials_timeout = Duration::from_millis(300);
        papita.set_credentials(Credentials::Slow(
            Duration::from_secs(10),
            json!({"api_key": PAPITA_KEY}),
        ));
    })
    .await;
    let started = Instant::now();
    assert_eq!(app.get("/api/openai/info").await.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(source(&app).await, "local_env");
}

#[tokio::test]
async fn no_key_anywhere_is_not_configured() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    assert_eq!(source(&app).await, "none");
}

#[tokio::test]
async fn a_hundred_chats_on_a_cold_cache_make_one_papita_request() {
    let app = spawn_app_with(|c, _, papita| {
        papita_only(c);
        papita.set_credentials(Credentials::Slow(
            Duration::from_millis(300),
            json!({"api_key": PAPITA_KEY}),
        ));
    })
    .await;
    let chats = (0..100).map(|_| app.post_chat(&json!({"message": "hi"})));
    let responses = futures_util::future::join_all(chats).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(app.papita.credential_requests(), 1);
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_after_a_401_without_a_restart() {
    let app = spawn_app_with(|c, openai, papita| {
        papita_only(c);
        papita.set_key("sk-old-key-1234567890");
        openai.accept_only_keys(&["sk-old-key-1234567890"]);
    })
    .await;
    assert_eq!(
        app.post_chat(&json!({"message": "one"})).await.status(),
        200
    );
    // Papita rotates the key; OpenAI revokes the old one.
    app.papita.set_key("sk-new-key-0987654321");
    app.openai.accept_only_keys(&["sk-new-key-0987654321"]);
    let r = app.post_chat(&json!({"message": "two"})).await;
    assert_eq!(r.status(), 200);
    let auth: Vec<String> = app
        .openai
        .requests()
        .iter()
        .map(|r| r.authorization.clone())
        .collect();
    assert_eq!(
        auth,
        [
            "Bearer sk-old-key-1234567890",
            "Bearer sk-old-key-1234567890",
            "Bearer sk-new-key-0987654321"
        ]
    );
}

#[tokio::test]
async fn a_key_still_rejected_after_refresh_is_a_401_and_asks_papita_once() {
    let app = spawn_app_with(|c, openai, papita| {
        papita_only(c);
        papita.set_key(PAPITA_KEY);
        openai.accept_only_keys(&["sk-nobody-has-this"]);
    })
    .await;
    app.wait_configured(true).await;
    let before = app.papita.credential_requests();
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 401);
    assert_eq!(app.papita.credential_requests(), before + 1);
    assert_eq!(
        app.openai.request_count(),
        1,
        "same key again: no second call"
    );
}

#[tokio::test]
async fn a_dozen_concurrent_401s_resolve_the_key_once() {
    let app = spawn_app_with(|c, openai, papita| {
        papita_only(c);
        papita.set_credentials(Credentials::Slow(
            Duration::from_millis(200),
            json!({"api_key": PAPITA_KEY}),
        ));
        openai.accept_only_keys(&["sk-nobody-has-this"]);
    })
    .await;
    app.wait_configured(true).await;
    let before = app.papita.credential_requests();
    let chats = (0..12).map(|_| app.post_chat(&json!({"message": "hi"})));
    for r in futures_util::future::join_all(chats).await {
        assert_eq!(r.status(), 401);
    }
    assert_eq!(
        app.papita.credential_requests(),
        before + 1,
        "one resolution for the one rejected key"
    );
}

#[tokio::test]
async fn a_papita_that_comes_up_later_is_noticed_quickly() {
    let app = spawn_app_with(|c, _, _| {
        c.openai.api_key = None;
        c.credentials_failure_ttl = Duration::from_millis(200);
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 503);
    app.papita.set_key(PAPITA_KEY);
    skip_time(Duration::from_millis(300)).await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    app.wait_configured(true).await;
}

#[tokio::test]
async fn an_expired_key_is_refreshed_in_the_background() {
    let app = spawn_app_with(|c, _, papita| {
        papita_only(c);
        c.credentials_ttl = Duration::from_millis(200);
        papita.set_key("sk-first-key-1234567890");
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    app.papita.set_key("sk-second-key-1234567890");
    skip_time(Duration::from_millis(300)).await;
    // The first chat after expiry is served with the cached key while Papita is asked again.
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let credentials = app.state.credentials.clone();
    crate::helpers::eventually("the refreshed key is cached", || {
        credentials
            .peek()
            .and_then(|c| {
                c.key
                    .as_ref()
                    .map(|k| k.expose() == "sk-second-key-1234567890")
            })
            .unwrap_or(false)
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let last = app.openai.requests().last().unwrap().authorization.clone();
    assert_eq!(last, "Bearer sk-second-key-1234567890");
}

#[tokio::test]
async fn the_key_never_appears_beyond_its_prefix_in_answers_or_logs() {
    const SECRET: &str = "sk-UNIQUE-secret-value-9f8e7d6c5b4a";
    let app = spawn_app_with(|c, openai, papita| {
        c.openai.api_key = Some(SECRET.into());
        openai.accept_only_keys(&["sk-other"]);
        papita.set_usage(Usage::Ok);
    })
    .await;
    let mut bodies = Vec::new();
    for path in [
        "/api/health",
        "/api/openai/info",
        "/api/openai/usage",
        "/api/openai/test",
    ] {
        bodies.push(app.get(path).await.text().await.unwrap());
    }
    bodies.push(
        app.post_chat(&json!({"message": "hi"}))
            .await
            .text()
            .await
            .unwrap(),
    );
    app.openai.accept_only_keys(&[SECRET]);
    bodies.push(
        app.post_chat(&json!({"message": "hi"}))
            .await
            .text()
            .await
            .unwrap(),
    );
    bodies.push(app.get("/api/openai/usage").await.text().await.unwrap());
    bodies.push(app.get("/api/openai/test").await.text().await.unwrap());
    for body in &bodies {
        assert!(!body.contains(SECRET), "{body}");
    }
    assert!(
        bodies.iter().any(|b| b.contains("sk-UNIQ...")),
        "the prefix is shown"
    );
    let logs = captured_logs();
    assert!(!logs.contains(SECRET), "the key is in the logs");
    assert!(!logs.contains("secret-value"));
}

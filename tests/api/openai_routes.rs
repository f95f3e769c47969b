//! Contract §5: /api/openai/info and /api/openai/test.

use serde_json::{Value, json};

use crate::helpers::{TEST_KEY, spawn_app, spawn_app_with};
use crate::mock_openai::Reply;

#[tokio::test]
async fn info_when_configured() {
    let app = spawn_app_with(|c, _, _| c.openai.model = "gpt-4o-mini".into()).await;
    let r = app.get("/api/openai/info").await;
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["model"], "gpt-4o-mini");
    assert_eq!(info["credentials_valid"], true);
    assert!(info.get("error").is_none());
    let ci = &info["credentials_info"];
    assert_eq!(ci["openai_api_key_set"], true);
    assert_eq!(ci["openai_api_key_length"], TEST_KEY.len());
    assert_eq!(ci["openai_api_key_prefix"], "sk-test...");
    assert_eq!(ci["openai_model"], "gpt-4o-mini");
    assert_eq!(ci["papita_api_url"], app.papita.url());
    assert_eq!(ci["credential_source"], "local_env");
    assert!(ci["env_file_path"].is_string() && ci["env_file_exists"].is_boolean());
    assert_eq!(info["base_url"], app.openai.base_url());
}

#[tokio::test]
async fn info_without_a_key() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    let r = app.get("/api/openai/info").await;
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(
        info["error"],
        "OPENAI_API_KEY not found in environment variables. Please set it in .env file."
    );
    let ci = &info["credentials_info"];
    assert_eq!(ci["openai_api_key_set"], false);
    assert_eq!(ci["openai_api_key_length"], 0);
    assert_eq!(ci["openai_api_key_prefix"], Value::Null);
    assert_eq!(ci["credential_source"], "none");
}

#[tokio::test]
async fn a_key_without_sk_is_invalid_for_openai_itself() {
    let app = spawn_app_with(|c, _, _| {
        c.openai.base_url = al_chat::config::DEFAULT_OPENAI_BASE_URL.into();
        c.openai.api_key = Some("not-a-real-key".into());
    })
    .await;
    let info: Value = app.get("/api/openai/info").await.json().await.unwrap();
    assert_eq!(
        info["error"],
        "OPENAI_API_KEY appears to be invalid. OpenAI API keys start with 'sk-'."
    );
    assert_eq!(
        info["credentials_info"]["openai_api_key_prefix"],
        "not-a-r..."
    );
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 503);
}

#[tokio::test]
async fn any_key_is_fine_for_a_compatible_server() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = Some("ollama".into())).await;
    let info: Value = app.get("/api/openai/info").await.json().await.unwrap();
    assert_eq!(info["credentials_valid"], true);
    assert_eq!(
        info["credentials_info"]["openai_api_key_prefix"],
        Value::Null,
        "7 characters or fewer: no prefix"
    );
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
}

#[tokio::test]
async fn test_route_success_is_not_counted_in_usage() {
    let app = spawn_app().await;
    app.openai
        .enqueue(Reply::text("Connection successful", 20, 3));
    let r = app.get("/api/openai/test").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "success");
    assert_eq!(body["message"], "OpenAI connection is working");
    assert_eq!(body["test_response"], "Connection successful");
    assert_eq!(body["model"], "gpt-3.5-turbo");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23, "model": "gpt-3.5-turbo"}),
        "usage carries the model, like the chat answer's (Flask did)"
    );
    assert_eq!(
        app.openai.requests()[0].body["messages"],
        json!([{"role": "user", "content": "Say 'Connection successful' if you can read this."}])
    );
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["request_count"], 0);
    assert!(app.papita.records().is_empty());
}

#[tokio::test]
async fn test_route_upstream_failure_is_a_200_with_status_error() {
    let app = spawn_app().await;
    app.openai
        .set_default(Reply::status(404, "The model does not exist"));
    let r = app.get("/api/openai/test").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "error");
    assert_eq!(
        body["message"],
        "OpenAI connection failed: The model does not exist"
    );
    assert_eq!(body["model"], "gpt-3.5-turbo");
}

#[tokio::test]
async fn test_route_not_configured_is_a_500_with_the_info() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    let r = app.get("/api/openai/test").await;
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "error");
    assert_eq!(body["message"], "OpenAI service not configured");
    assert_eq!(
        body["info"]["credentials_info"]["credential_source"],
        "none"
    );
    assert!(body["info"]["error"].is_string());
}

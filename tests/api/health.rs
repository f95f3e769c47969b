//! Contract §4.

use crate::helpers::{spawn_app, spawn_app_with};

fn is_contract_timestamp(s: &str) -> bool {
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.6f").is_ok() && s.len() == 26
}

#[tokio::test]
async fn health_answers_healthy_with_a_local_timestamp() {
    let app = spawn_app().await;
    let response = app.get("/api/health").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "healthy");
    let ts = body["timestamp"].as_str().unwrap();
    assert!(is_contract_timestamp(ts), "{ts}");
    assert_eq!(body.as_object().unwrap().len(), 3);
}

#[tokio::test]
async fn health_reports_configured_when_a_key_is_known() {
    let app = spawn_app().await;
    app.wait_configured(true).await;
}

#[tokio::test]
async fn health_reports_not_configured_without_any_key() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    app.wait_configured(false).await;
}

#[tokio::test]
async fn health_never_waits_on_a_hanging_papita() {
    use crate::mock_papita::Credentials;
    let app = spawn_app_with(|c, _, papita| {
        c.papita.credentials_timeout = std::time::Duration::from_secs(30);
        papita.set_credentials(Credentials::Slow(
            std::time::Duration::from_secs(30),
            serde_json::json!({}),
        ));
    })
    .await;
    let started = std::time::Instant::now();
    let response = app.get("/api/health").await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "health waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn ready_when_the_session_log_folder_is_writable() {
    let app = spawn_app().await;
    let response = app.get("/api/ready").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["session_log"]["status"], "ok");
    // The probe leaves nothing behind.
    let leftovers: Vec<_> = std::fs::read_dir(&app.log_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ready-probe"))
        .collect();
    assert!(leftovers.is_empty());
}

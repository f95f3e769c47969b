//! The one Papita client on its own, against the loopback mock: each answer shape and failure.

use std::time::{Duration, Instant};

use al_chat::services::papita::{PapitaClient, UsageRecord};
use serde_json::json;

use crate::helpers::closed_address;
use crate::mock_papita::{Credentials, MockPapita, Usage};

fn client(url: String) -> PapitaClient {
    let mut settings = al_chat::Config::defaults().papita;
    settings.url = url;
    settings.credentials_timeout = Duration::from_millis(300);
    settings.usage_timeout = Duration::from_millis(300);
    PapitaClient::new(&settings, reqwest::Client::new())
}

fn record() -> UsageRecord {
    UsageRecord {
        user_id: None,
        username: "ana".into(),
        is_guest: false,
        session_id: Some("s-1".into()),
        project_id: "al-chat",
        model: "gpt-4o".into(),
        input_tokens: 3,
        output_tokens: 2,
        total_tokens: 5,
    }
}

#[tokio::test]
async fn a_200_with_a_key_gives_the_key() {
    let papita = MockPapita::start().await;
    papita.set_key("sk-from-papita-123456");
    let key = client(papita.url()).openai_key().await.expect("a key");
    assert_eq!(key.expose(), "sk-from-papita-123456");
}

#[tokio::test]
async fn garbage_a_500_and_no_key_give_none() {
    let papita = MockPapita::start().await;
    let client = client(papita.url());
    for behaviour in [
        Credentials::Garbage,
        Credentials::Status(500),
        Credentials::Json(json!({"api_key": ""})),
    ] {
        papita.set_credentials(behaviour.clone());
        assert!(client.openai_key().await.is_none(), "{behaviour:?}");
    }
}

#[tokio::test]
async fn a_slow_papita_costs_the_timeout_and_gives_none() {
    let papita = MockPapita::start().await;
    papita.set_credentials(Credentials::Slow(
        Duration::from_secs(30),
        json!({"api_key": "sk-too-late-123456"}),
    ));
    let started = Instant::now();
    assert!(client(papita.url()).openai_key().await.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the 300 ms timeout"
    );
}

#[tokio::test]
async fn usage_records_are_posted_as_the_contract_says() {
    let papita = MockPapita::start().await;
    client(papita.url()).post_usage(&record()).await.unwrap();
    assert_eq!(
        papita.records(),
        [
            json!({"userId": null, "username": "ana", "isGuest": false, "sessionId": "s-1",
                "projectId": "al-chat", "model": "gpt-4o", "inputTokens": 3, "outputTokens": 2,
                "totalTokens": 5})
        ]
    );
}

#[tokio::test]
async fn usage_failures_say_whether_sending_again_is_safe() {
    let papita = MockPapita::start().await;
    let client = client(papita.url());
    papita.set_usage(Usage::Status(500));
    assert!(
        client.post_usage(&record()).await.unwrap_err().retryable,
        "5xx"
    );
    papita.set_usage(Usage::Status(400));
    assert!(
        !client.post_usage(&record()).await.unwrap_err().retryable,
        "4xx"
    );
    // A timeout may have been counted by Papita already: not sent again.
    papita.set_usage(Usage::Slow(Duration::from_secs(30)));
    assert!(
        !client.post_usage(&record()).await.unwrap_err().retryable,
        "timeout"
    );
    let refused = self::client(format!("http://{}", closed_address()));
    assert!(
        refused.post_usage(&record()).await.unwrap_err().retryable,
        "refused"
    );
}

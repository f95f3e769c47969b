//! The one Papita client on its own, against the loopback mock: each answer shape and failure.

use std::time::{Duration, Instant};

use al_chat::services::papita::{PapitaClient, UsageRecord};
use serde_json::json;
use tokio_util::task::TaskTracker;

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

/// The reporter lanes' own connection (plain HTTP): the same answers and the same classification
/// as the pooled client above.
#[tokio::test]
async fn a_lanes_own_connection_posts_and_classifies_like_the_client() {
    let papita = MockPapita::start().await;
    let mut connection = client(papita.url())
        .usage_connection(&TaskTracker::new())
        .expect("plain http gets its own connection");
    let body = bytes::Bytes::from(serde_json::to_vec(&record()).unwrap());
    for _ in 0..3 {
        connection.post(body.clone()).await.unwrap();
    }
    assert_eq!(papita.record_count(), 3);
    assert_eq!(papita.records()[0]["username"], "ana");

    papita.set_usage(Usage::Status(503));
    assert!(
        connection.post(body.clone()).await.unwrap_err().retryable,
        "5xx"
    );
    papita.set_usage(Usage::Status(422));
    assert!(
        !connection.post(body.clone()).await.unwrap_err().retryable,
        "4xx"
    );
    papita.set_usage(Usage::Slow(Duration::from_secs(30)));
    let started = Instant::now();
    assert!(
        !connection.post(body.clone()).await.unwrap_err().retryable,
        "timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the 300 ms timeout"
    );
    // After a timeout the connection is replaced, and the next record goes through.
    papita.set_usage(Usage::Ok);
    connection.post(body.clone()).await.unwrap();
    assert_eq!(papita.record_count(), 4);

    let mut refused = client(format!("http://{}", closed_address()))
        .usage_connection(&TaskTracker::new())
        .unwrap();
    assert!(refused.post(body).await.unwrap_err().retryable, "refused");
}

/// A Papita (or a proxy in front of it) that closes each connection after its answer, with and
/// without saying so: every record still arrives, exactly once, each on a new connection.
#[tokio::test]
async fn a_lanes_connection_survives_papita_closing_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, records) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let closed = Arc::new(AtomicUsize::new(0));
    {
        let (connections, records, closed) = (connections.clone(), records.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let n = connections.fetch_add(1, Ordering::SeqCst);
                let (records, closed) = (records.clone(), closed.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    // One request: the head, then Content-Length bytes of body.
                    loop {
                        let read = tcp.read(&mut buf).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..read]);
                        let text = String::from_utf8_lossy(&seen).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length: usize = text
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length: ")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            if seen.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    records.fetch_add(1, Ordering::SeqCst);
                    // Every other connection says it closes; the rest just close.
                    let answer = if n % 2 == 0 {
                        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    } else {
                        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                    };
                    let _ = tcp.write_all(answer.as_bytes()).await;
                    let _ = tcp.shutdown().await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
    }
    let mut connection = client(format!("http://{addr}"))
        .usage_connection(&TaskTracker::new())
        .unwrap();
    let body = bytes::Bytes::from(serde_json::to_vec(&record()).unwrap());
    for i in 0..10 {
        connection
            .post(body.clone())
            .await
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        // As with an idle keep-alive timeout: the close has happened before the next record.
        crate::helpers::eventually("Papita to close the connection", || {
            closed.load(Ordering::SeqCst) == i + 1
        })
        .await;
    }
    assert_eq!(records.load(Ordering::SeqCst), 10, "each record once");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        10,
        "a new connection for each"
    );
}

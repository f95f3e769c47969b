//! When the primary fails, the chat goes on (issue 27): a second mock upstream on loopback as
//! the fallback, each mock accepting only its own key.

use std::time::Duration;

use al_chat::config::{ApiKind, BreakerSettings, FallbackSettings, ModelMap};
use serde_json::{Value, json};

use crate::helpers::{TEST_KEY, TestApp, closed_address, skip_time, spawn_app_with};
use crate::mock_openai::{MockOpenAi, Reply, StreamScript};

const FALLBACK_KEY: &str = "sk-fallback-0123456789";

struct Pair {
    app: TestApp,
    fallback: MockOpenAi,
}

/// The app with the usual mock as its primary and a second mock as its fallback.
async fn pair(setup: impl FnOnce(&mut al_chat::Config, &MockOpenAi)) -> Pair {
    let fallback = MockOpenAi::start().await;
    fallback.accept_only_keys(&[FALLBACK_KEY]);
    fallback.set_default(Reply::text("from the fallback", 5, 3));
    let base = fallback.base_url();
    let app = spawn_app_with(|c, openai, _| {
        openai.accept_only_keys(&[TEST_KEY]);
        c.openai.timeout = Duration::from_millis(800);
        c.openai.retry_budget = Duration::from_secs(3);
        c.openai.fallbacks = vec![FallbackSettings {
            name: "second".into(),
            base_url: base,
            api_key: Some(FALLBACK_KEY.into()),
            kind: ApiKind::OpenAi,
            api_version: None,
            model_map: ModelMap::parse("*=gpt-4o-mini").unwrap(),
        }];
        c.openai.breaker = BreakerSettings {
            failures: 3,
            cooldown: Duration::from_secs(30),
        };
        setup(c, openai);
    })
    .await;
    Pair { app, fallback }
}

async fn chat(app: &TestApp, stream: bool) -> (u16, String) {
    let response = app
        .post_chat(&json!({"message": "hi", "stream": stream}))
        .await;
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The answer's text, whole or from the stream's `done` event.
fn answer_of(body: &str) -> Value {
    let data = body
        .split("event: done\ndata: ")
        .nth(1)
        .map_or(body, |rest| rest.lines().next().unwrap());
    serde_json::from_str(data).unwrap_or(Value::Null)
}

#[tokio::test]
async fn each_trigger_fails_over_whole_and_streamed() {
    let triggers: Vec<(&str, Option<Reply>)> = vec![
        ("refused", None),
        ("reset", Some(Reply::Reset)),
        ("hang", Some(Reply::Hang)),
        (
            "429",
            Some(Reply::status(429, "slow down").with_header("retry-after", "20")),
        ),
        ("500", Some(Reply::status(500, "boom"))),
        ("503", Some(Reply::status(503, "overloaded"))),
    ];
    for (name, reply) in triggers {
        for stream in [false, true] {
            let refused = reply.is_none();
            let Pair { app, fallback } = pair(|c, openai| {
                if refused {
                    c.openai.base_url = format!("http://{}/v1", closed_address());
                }
                if let Some(reply) = reply.clone() {
                    openai.set_default(reply);
                }
            })
            .await;
            let (status, body) = chat(&app, stream).await;
            let label = format!("{name} ({})", if stream { "streamed" } else { "whole" });
            assert_eq!(status, 200, "{label}: {body}");
            let answer = answer_of(&body);
            assert_eq!(answer["message"], "from the fallback", "{label}: {body}");
            assert_eq!(
                answer["usage"]["model"], "gpt-4o-mini",
                "{label}: the model that answered"
            );
            assert_eq!(fallback.request_count(), 1, "{label}");
            assert_eq!(
                fallback.requests()[0].body["model"],
                "gpt-4o-mini",
                "{label}"
            );
        }
    }
}

#[tokio::test]
async fn no_failover_after_a_streams_first_delta() {
    let Pair { app, fallback } = pair(|_, openai| {
        openai.set_default(Reply::Stream(StreamScript {
            deltas: vec!["one ".into(), "two ".into(), "three".into()],
            gap: Duration::from_millis(50),
            cut_after: Some(2),
            ..Default::default()
        }));
    })
    .await;
    let (status, body) = chat(&app, true).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("event: delta") && body.contains("event: error"),
        "{body}"
    );
    assert_eq!(fallback.request_count(), 0, "an answer had begun");
}

#[tokio::test]
async fn a_request_the_upstream_refuses_is_not_failed_over() {
    let Pair { app, fallback } = pair(|_, openai| {
        openai.set_default(Reply::status(400, "bad request"));
    })
    .await;
    let (status, _) = chat(&app, false).await;
    assert_eq!(status, 400);
    assert_eq!(fallback.request_count(), 0);
}

/// Opens after 3 failures, skips with no wait, probes after the cooldown (tokio's clock) and
/// closes on success: counted in the primary's requests.
#[tokio::test]
async fn the_breaker_opens_skips_probes_and_closes() {
    let Pair { app, fallback } = pair(|c, openai| {
        // One request per chat, so the primary's requests count the chats that tried it.
        c.openai.max_retries = 0;
        openai.set_default(Reply::status(500, "down"));
    })
    .await;
    for _ in 0..3 {
        assert_eq!(chat(&app, false).await.0, 200);
    }
    assert_eq!(app.openai.request_count(), 3);
    assert_eq!(chat(&app, false).await.0, 200);
    assert_eq!(
        app.openai.request_count(),
        3,
        "open: the primary is skipped"
    );
    assert_eq!(fallback.request_count(), 4);
    let ready: Value = app.get("/api/ready").await.json().await.unwrap();
    assert_eq!(
        ready["checks"]["upstreams"]["status"], "degraded",
        "{ready}"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("upstream_state{upstream=\"primary\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("upstream_requests_total{upstream=\"primary\",outcome=\"failed\"} 3"),
        "{metrics}"
    );
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(
        usage["by_upstream"]["second"]["request_count"], 4,
        "{usage}"
    );
    assert_eq!(usage["by_upstream"]["primary"]["failures"], 3);
    assert_eq!(usage["by_upstream"]["primary"]["request_count"], 0);
    assert_eq!(
        usage["by_model"]["gpt-4o-mini"]["request_count"], 4,
        "priced by the model that answered"
    );
    crate::helpers::eventually("the Papita records", || app.papita.record_count() == 4).await;
    assert!(
        app.papita
            .records()
            .iter()
            .all(|r| r["model"] == "gpt-4o-mini"),
        "{:?}",
        app.papita.records()
    );

    app.openai
        .set_default(Reply::text("the primary is back", 5, 3));
    skip_time(Duration::from_secs(31)).await;
    let (status, body) = chat(&app, false).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer_of(&body)["message"],
        "the primary is back",
        "the probe"
    );
    assert_eq!(app.openai.request_count(), 4);
    assert_eq!(chat(&app, false).await.0, 200);
    assert_eq!(app.openai.request_count(), 5, "closed again");
    let ready: Value = app.get("/api/ready").await.json().await.unwrap();
    assert_eq!(ready["checks"]["upstreams"]["status"], "ok");
}

#[tokio::test]
async fn with_every_upstream_open_the_answer_is_503_with_retry_after() {
    let Pair { app, fallback } = pair(|_, openai| {
        openai.set_default(Reply::status(500, "down"));
    })
    .await;
    fallback.set_default(Reply::status(502, "also down"));
    for _ in 0..3 {
        assert_eq!(chat(&app, false).await.0, 502);
    }
    let response = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(response.status(), 503);
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    let error = crate::helpers::error_of(response).await;
    assert!(error.contains("Every upstream is failing"), "{error}");
}

#[tokio::test]
async fn azure_gets_its_header_path_and_query() {
    let azure = MockOpenAi::start().await;
    azure.accept_only_keys(&["azure-key-0123456789"]);
    azure.set_default(Reply::text("from azure", 5, 3));
    let base = azure.base_url().trim_end_matches("/v1").to_string();
    let app = spawn_app_with(|c, openai, _| {
        openai.set_default(Reply::status(503, "overloaded"));
        c.openai.fallbacks = vec![FallbackSettings {
            name: "azure".into(),
            base_url: base,
            api_key: Some("azure-key-0123456789".into()),
            kind: ApiKind::Azure,
            api_version: Some("2024-10-21".into()),
            model_map: ModelMap::parse("gpt-3.5-turbo=prod-35").unwrap(),
        }];
    })
    .await;
    for stream in [false, true] {
        let (status, body) = chat(&app, stream).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(answer_of(&body)["message"], "from azure");
    }
    let sent = azure.requests();
    assert_eq!(
        sent[0].uri,
        "/openai/deployments/prod-35/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(sent[0].api_key, "azure-key-0123456789");
    assert_eq!(sent[0].authorization, "", "no bearer token to Azure");
    assert_eq!(
        sent[1].body["stream_options"]["include_usage"], true,
        "usage in streams"
    );
}

/// Each upstream sees its own key and no other.
#[tokio::test]
async fn keys_stay_with_their_hosts() {
    let Pair { app, fallback } = pair(|_, openai| {
        openai.set_default(Reply::status(503, "overloaded"));
    })
    .await;
    for stream in [false, true] {
        assert_eq!(chat(&app, stream).await.0, 200);
    }
    for r in app.openai.requests() {
        assert_eq!(r.authorization, format!("Bearer {TEST_KEY}"));
    }
    for r in fallback.requests() {
        assert_eq!(r.authorization, format!("Bearer {FALLBACK_KEY}"));
    }
    let logs = crate::helpers::captured_logs();
    assert!(
        !logs.contains(FALLBACK_KEY),
        "the fallback's key is never logged"
    );
}

/// Nothing configured: one upstream, as before: a 503 is answered, not retried elsewhere.
#[tokio::test]
async fn without_fallbacks_nothing_changes() {
    let app =
        spawn_app_with(|_, openai, _| openai.set_default(Reply::status(503, "overloaded"))).await;
    let response = app.post_chat(&json!({"message": "hi"})).await;
    assert_eq!(response.status(), 502);
    let ready: Value = app.get("/api/ready").await.json().await.unwrap();
    assert!(ready["checks"].get("upstreams").is_none(), "{ready}");
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert!(usage.get("by_upstream").is_none(), "{usage}");
}

/// A chat reserves once; an attempt that may have been billed (here a 5xx) keeps its reservation
/// and the fallback's attempt reserves its own. 50 concurrent chats, the primary failing half:
/// spend never passes the cap, and never falls below what the upstreams billed.
#[tokio::test]
async fn budgets_hold_with_failover() {
    use crate::mock_openai::Counted;
    const CAP: u64 = 20_000;
    let Pair { app, fallback } = pair(|c, openai| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.max_output_tokens = Some(300);
        c.openai.max_retries = 0;
        // The mocks count prompts with tiktoken in a debug build: no timeouts here.
        c.openai.timeout = Duration::from_secs(20);
        c.openai.breaker.failures = 1_000;
        openai.set_default(Reply::Counted(Counted::long(200)));
        for _ in 0..25 {
            openai.enqueue(Reply::status(500, "down"));
            openai.enqueue(Reply::Counted(Counted::long(200)));
        }
    })
    .await;
    fallback.set_default(Reply::Counted(Counted::long(200)));
    let answers = futures_util::future::join_all(
        (0..50).map(|i| app.post_chat(&json!({"message": format!("chat {i}")}))),
    )
    .await;
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(fallback.request_count() > 0, "the fallback answered some");
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    let spent = usage["budget"]["spent"]["daily_tokens"].as_u64().unwrap();
    let billed = app.openai.billed() + fallback.billed();
    assert!(spent <= CAP, "spent {spent} of {CAP}");
    assert!(
        spent >= billed,
        "spent {spent} covers what was billed, {billed}"
    );
}

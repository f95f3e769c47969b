//! The fault matrix: every upstream failure, whole and streamed, gives the contract's status or
//! `error` event, and the service stays healthy afterwards.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::spawn_app_with;
use crate::mock_openai::{Reply, StreamScript};
use crate::sse::SseReader;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A JSON error answer with this status (for a stream: before the first byte).
    Status(u16),
    /// A 200 stream that ends with one `error` event.
    ErrorEvent,
    /// A normal answer (or `done` event).
    Success,
}

struct Case {
    name: &'static str,
    reply: Option<Reply>,
    /// A different reply for the whole (non-streamed) request, where the fault looks different.
    whole_reply: Option<Reply>,
    refused: bool,
    whole: Expect,
    streamed: Expect,
}

fn stream(script: StreamScript) -> Reply {
    Reply::Stream(StreamScript {
        usage: script.usage.or(Some((5, 5))),
        ..script
    })
}

fn deltas(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i} ")).collect()
}

fn cases() -> Vec<Case> {
    let case = |name, reply, whole, streamed| Case {
        name,
        reply: Some(reply),
        whole_reply: None,
        refused: false,
        whole,
        streamed,
    };
    let trickle = |gap_ms, cut| {
        Some(Reply::Trickle {
            gap: Duration::from_millis(gap_ms),
            cut,
        })
    };
    vec![
        Case {
            name: "refused",
            reply: None,
            whole_reply: None,
            refused: true,
            whole: Expect::Status(502),
            streamed: Expect::Status(502),
        },
        case(
            "401",
            Reply::status(401, "Incorrect API key"),
            Expect::Status(401),
            Expect::Status(401),
        ),
        case(
            "429",
            Reply::status(429, "Rate limit").with_header("retry-after", "60"),
            Expect::Status(429),
            Expect::Status(429),
        ),
        case(
            "500",
            Reply::status(500, "boom"),
            Expect::Status(502),
            Expect::Status(502),
        ),
        case(
            "503",
            Reply::status(503, "overloaded"),
            Expect::Status(502),
            Expect::Status(502),
        ),
        case(
            "malformed body",
            Reply::Malformed,
            Expect::Status(502),
            Expect::ErrorEvent,
        ),
        case(
            "malformed SSE chunk",
            stream(StreamScript {
                deltas: deltas(2),
                malformed_chunk: true,
                ..Default::default()
            }),
            Expect::Status(502),
            Expect::ErrorEvent,
        ),
        Case {
            whole_reply: trickle(10, true),
            ..case(
                "connection cut mid-answer",
                stream(StreamScript {
                    deltas: deltas(3),
                    cut_after: Some(1),
                    ..Default::default()
                }),
                Expect::Status(502),
                Expect::ErrorEvent,
            )
        },
        case(
            "hanging upstream",
            Reply::Hang,
            Expect::Status(504),
            Expect::Status(504),
        ),
        case(
            "stalled after the first tokens",
            stream(StreamScript {
                deltas: deltas(2),
                stall: true,
                ..Default::default()
            }),
            Expect::Status(504),
            Expect::ErrorEvent,
        ),
        Case {
            whole_reply: trickle(100, false),
            ..case(
                "slow trickle within the limits",
                stream(StreamScript {
                    deltas: deltas(6),
                    gap: Duration::from_millis(100),
                    ..Default::default()
                }),
                Expect::Success,
                Expect::Success,
            )
        },
        Case {
            whole_reply: trickle(300, false),
            ..case(
                "slow trickle past the limits",
                stream(StreamScript {
                    deltas: deltas(30),
                    gap: Duration::from_millis(200),
                    ..Default::default()
                }),
                Expect::Status(504),
                Expect::ErrorEvent,
            )
        },
    ]
}

async fn check(case: &Case, streaming: bool) {
    let expect = if streaming { case.streamed } else { case.whole };
    let refused = case.refused;
    let app = spawn_app_with(|c, _, _| {
        c.openai.timeout = Duration::from_millis(1500);
        c.openai.stream_idle_timeout = Duration::from_millis(700);
        c.openai.stream_max = Duration::from_secs(3);
        c.openai.retry_budget = Duration::from_millis(800);
        if refused {
            let closed = crate::helpers::closed_address();
            c.openai.base_url = format!("http://{closed}/v1");
        }
    })
    .await;
    let reply = if streaming {
        case.reply.clone()
    } else {
        case.whole_reply.clone().or_else(|| case.reply.clone())
    };
    if let Some(reply) = reply {
        app.openai.set_default(reply);
    }
    let label = format!(
        "{} ({})",
        case.name,
        if streaming { "streamed" } else { "whole" }
    );
    let response = app
        .post_chat(&json!({"message": "hi", "stream": streaming}))
        .await;
    match expect {
        Expect::Status(status) => {
            assert_eq!(response.status(), status, "{label}");
            assert!(
                response.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("application/json"),
                "{label}"
            );
            if status == 429 {
                assert_eq!(response.headers()["retry-after"], "60", "{label}");
            }
            let body: Value = response.json().await.unwrap();
            let error = body["error"].as_str().unwrap_or_default().to_string();
            if status != 401 {
                assert!(error.starts_with("OpenAI API error: "), "{label}: {error}");
            }
        }
        Expect::ErrorEvent | Expect::Success if streaming => {
            let (events, _) = SseReader::new(response).all().await;
            let last = events
                .last()
                .unwrap_or_else(|| panic!("{label}: no events"));
            let finals = events.iter().filter(|e| e.event != "delta").count();
            assert_eq!(finals, 1, "{label}: exactly one final event: {events:?}");
            if expect == Expect::Success {
                assert_eq!(last.event, "done", "{label}: {events:?}");
            } else {
                assert_eq!(last.event, "error", "{label}: {events:?}");
                assert!(
                    last.data["error"]
                        .as_str()
                        .unwrap()
                        .starts_with("OpenAI API error: "),
                    "{label}"
                );
            }
        }
        Expect::ErrorEvent | Expect::Success => {
            assert_eq!(response.status(), 200, "{label}");
        }
    }
    // The service is still healthy and serves the next chat normally.
    assert_eq!(app.get("/api/health").await.status(), 200, "{label}");
    if !refused {
        app.openai.set_default(Reply::text("fine again", 1, 1));
        let r = app.post_chat(&json!({"message": "again"})).await;
        assert_eq!(r.status(), 200, "{label}: next chat");
    }
}

#[tokio::test]
async fn every_fault_whole() {
    let runs = cases()
        .into_iter()
        .map(|case| async move { check(&case, false).await });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn every_fault_streamed() {
    let runs = cases()
        .into_iter()
        .map(|case| async move { check(&case, true).await });
    futures_util::future::join_all(runs).await;
}

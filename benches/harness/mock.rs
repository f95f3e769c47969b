//! The fast mock upstream: an OpenAI-compatible `/v1/chat/completions` (whole or streamed,
//! answering after a fixed delay) and a Papita that takes usage records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::run_server;

/// Usage records Papita received.
static RECORDS: AtomicU64 = AtomicU64::new(0);

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-3.5-turbo","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;

fn sse_body() -> String {
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-3.5-turbo\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
        )
    };
    let mut body = chunk(r#"{"role":"assistant","content":"Hello"}"#, "null");
    body += &chunk(r#"{"content":" there"}"#, "null");
    body += &chunk(r#"{}"#, "\"stop\"");
    body += "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-3.5-turbo\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n";
    body += "data: [DONE]\n\n";
    body
}

pub fn serve(port: u16, delay_ms: u64) {
    let delay = Duration::from_millis(delay_ms);
    let sse: &'static str = Box::leak(sse_body().into_boxed_str());
    async fn completions(
        State((delay, sse)): State<(Duration, &'static str)>,
        body: Bytes,
    ) -> Response {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A cheap look at the body is enough to tell a streamed request.
        const STREAM: &[u8] = b"\"stream\":true";
        let streamed = body.windows(STREAM.len()).any(|w| w == STREAM);
        if streamed {
            return ([("content-type", "text/event-stream")], sse).into_response();
        }
        ([("content-type", "application/json")], COMPLETION).into_response()
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route(
            "/api/credentials/global/openai",
            get(|| async { StatusCode::NOT_FOUND }),
        )
        .route(
            "/api/usage/log",
            post(|| async {
                RECORDS.fetch_add(1, Ordering::Relaxed);
                StatusCode::OK
            }),
        )
        // How many usage records arrived (the benchmark compares it with the chats answered).
        .route(
            "/records",
            get(|| async { RECORDS.load(Ordering::Relaxed).to_string() }),
        )
        .with_state((delay, sse));
    run_server(port, app);
}

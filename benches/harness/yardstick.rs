//! The yardstick: the least a chat proxy can do. axum + one shared reqwest client: parse the
//! JSON, make the one upstream call, answer; nothing else.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::run_server;

#[derive(Clone)]
struct Proxy {
    client: reqwest::Client,
    url: String,
}

pub fn serve(port: u16, upstream: String) {
    async fn chat(State(proxy): State<Proxy>, Json(body): Json<Value>) -> Response {
        let message = body["message"].as_str().unwrap_or_default();
        let request =
            json!({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": message}]});
        let answer = proxy
            .client
            .post(&proxy.url)
            .bearer_auth("sk-bench")
            .json(&request)
            .send()
            .await;
        match answer {
            Ok(r) => match r.json::<Value>().await {
                Ok(v) => Json(
                    json!({"message": v["choices"][0]["message"]["content"], "usage": v["usage"]}),
                )
                .into_response(),
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            },
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        }
    }
    let proxy = Proxy {
        client: reqwest::Client::new(),
        url: format!("{upstream}/chat/completions"),
    };
    run_server(
        port,
        Router::new()
            .route("/api/chat", post(chat))
            .with_state(proxy),
    );
}

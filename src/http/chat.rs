//! `POST /api/chat` (contract §6): a JSON answer, or with `"stream": true` server-sent events.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;

use crate::domain::session_id::SESSION_HEADER;
use crate::domain::{ChatBody, ChatRequest};
use crate::error::Result;
use crate::http::extract::JsonBody;
use crate::services::chat::{self, StreamEvent};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/chat", post(post_chat))
}

async fn post_chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ChatBody>,
) -> Result<Response> {
    let session_header = headers.get(SESSION_HEADER).map(|v| v.as_bytes());
    let request = ChatRequest::parse(body, session_header, &state.config.openai.model)?;
    if !request.stream {
        return Ok(Json(chat::complete(&state, request).await?).into_response());
    }
    // Comments during long silences keep proxies and browsers from closing the stream.
    let keepalive = KeepAlive::new().interval(state.config.openai.sse_keepalive);
    let events = chat::stream(&state, request)
        .await?
        .map(|event| Ok::<_, Infallible>(sse_event(event)));
    Ok(Sse::new(events).keep_alive(keepalive).into_response())
}

fn sse_event(event: StreamEvent) -> Event {
    let (name, data) = match event {
        StreamEvent::Delta(content) => ("delta", json!({ "content": content })),
        StreamEvent::Done(reply) => ("done", json!(reply)),
        StreamEvent::Error(error) => ("error", json!({ "error": error })),
    };
    Event::default().event(name).data(data.to_string())
}

//! `POST /api/chat` (contract §6): a JSON answer, or with `"stream": true` server-sent events.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};

use crate::domain::session_id::SessionHeader;
use crate::domain::{ChatBody, ChatRequest};
use crate::http::error::{ApiError, ErrorBody, Result};
use crate::http::extract::JsonBody;
use crate::http::guards::{ChatRoute, RateChecked, Verified};
use crate::server::CutAt;
use crate::services::chat::StreamEvent;
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

/// The header that names a chat's session; it wins over the body's `sessionId`.
pub const SESSION_HEADER: &str = "X-Session-ID";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_chat))
}

#[utoipa::path(post, path = "/api/chat", tag = "chat",
    request_body(content = Option<ChatBody>, description = "The chat; an empty body counts as {}"),
    params(("X-Session-ID" = Option<String>, Header, description = "The session this chat belongs to (wins over sessionId)")),
    responses(
        (status = 200, description = "The reply (JSON), or with \"stream\": true server-sent events: `delta` {content}, then one `done` (this object) or `error` {error}",
            content(
                (crate::services::chat::ChatReply = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Bad input, a model off the allow-list, or OpenAI refused the request", body = super::error::ErrorBody),
        (status = 401, description = "OpenAI rejected the key; or, with AUTH_JWT_* set, the sign-in token is missing or not valid", body = super::error::ErrorBody),
        (status = 408, description = "The body or the answer took too long", body = super::error::ErrorBody),
        (status = 413, description = "Body or input too large", body = super::error::ErrorBody),
        (status = 415, description = "Not JSON", body = super::error::ErrorBody),
        (status = 429, description = "Rate limit, budget, a daily quota (\"You have used today's allowance…\"), or OpenAI's rate limit (Retry-After)", body = super::error::ErrorBody),
        (status = 502, description = "OpenAI failed", body = super::error::ErrorBody),
        (status = 503, description = "No OpenAI key configured", body = super::error::ErrorBody),
        (status = 504, description = "OpenAI too slow", body = super::error::ErrorBody),
    ))]
pub(super) async fn post_chat(
    State(state): State<AppState>,
    // The rate check and the identity's run on the head, before the body is read.
    RateChecked(client, _): RateChecked<ChatRoute>,
    Verified(verified): Verified,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ChatBody>,
) -> Result<Response> {
    // Only the session header is kept. The head's values share hyper's read buffer: holding
    // the map through the upstream wait kept that 8 KiB buffer alive while hyper read ahead
    // into a second one (80 MB with 10,000 chats in flight).
    let session_header = headers.get(SESSION_HEADER).map(|v| v.as_bytes().to_vec());
    drop(headers);
    let session_header = session_header.as_deref().map(|value| SessionHeader {
        name: SESSION_HEADER,
        value,
    });
    let mut request = ChatRequest::parse(body, session_header, &state.config.openai.model)?;
    request.client = Some(state.guardrails.client_key(client));
    if let Some(user) = verified {
        request.user = user;
    }
    if !request.stream {
        return Ok(Json(state.chat.complete(request).await?).into_response());
    }
    let keepalive = state.config.openai.sse_keepalive;
    let mut opening = Box::pin({
        let chat = state.chat.clone();
        async move { chat.stream(request).await }
    });
    // Within one keep-alive interval the upstream has usually answered: its failures are then
    // ordinary JSON answers with their statuses. If it has not, the stream opens anyway, with a
    // comment, so proxies with an idle timeout do not cut it; later failures are `error` events
    // (2026-11 amendment).
    match tokio::time::timeout(keepalive, &mut opening).await {
        Ok(opened) => Ok(event_stream(opened?.map(sse_event), &state)),
        Err(_) => {
            let events = async_stream::stream! {
                yield Event::default().comment("");
                match opening.await {
                    Ok(events) => {
                        let mut events = std::pin::pin!(events);
                        while let Some(event) = events.next().await {
                            yield sse_event(event);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream failed after the stream opened");
                        let error = ApiError::from(e);
                        yield Event::default().event("error").data(error.body().to_string());
                    }
                }
            };
            Ok(event_stream(events, &state))
        }
    }
}

/// After `OPENAI_STREAM_MAX_SECS` the stream ends itself with an `error` event; a client that does
/// not read that far is cut this much later by the server (`CutAt`).
const CUT_GRACE: Duration = Duration::from_secs(5);

/// The event-stream response: comments during long silences, and headers that keep proxies
/// (nginx) from buffering or caching it.
fn event_stream(events: impl Stream<Item = Event> + Send + 'static, state: &AppState) -> Response {
    let keepalive = KeepAlive::new().interval(state.config.openai.sse_keepalive);
    let mut response = Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(keepalive)
        .into_response();
    // The hard limit holds whether or not the client reads: the server closes the connection at
    // this moment if the stream is still being sent, which drops it and its upstream call.
    let cut = tokio::time::Instant::now() + state.config.openai.stream_max + CUT_GRACE;
    response.extensions_mut().insert(CutAt(cut));
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    response
}

/// A `delta` event's data.
#[derive(serde::Serialize)]
struct Delta<'a> {
    content: &'a str,
}

fn sse_event(event: StreamEvent) -> Event {
    let (name, data) = match event {
        StreamEvent::Delta(content) => {
            ("delta", serde_json::to_string(&Delta { content: &content }))
        }
        StreamEvent::Done(reply) => ("done", serde_json::to_string(&reply)),
        StreamEvent::Error(error) => (
            "error",
            serde_json::to_string(&ErrorBody {
                error,
                details: None,
            }),
        ),
    };
    // Serializing strings and numbers cannot fail.
    Event::default().event(name).data(data.unwrap_or_default())
}

//! `POST /api/session/start` and `/api/session/stop` (contract §7).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::domain::session_id::client_session_id;
use crate::error::Result;
use crate::http::extract::JsonBody;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/session/start", post(start))
        .route("/api/session/stop", post(stop))
}

/// The body is ignored, as before.
#[utoipa::path(post, path = "/api/session/start", tag = "sessions",
    responses(
        (status = 200, description = "Started; its line is on disk", body = super::openapi::SessionStarted),
        (status = 500, description = "The session log cannot be written", body = super::openapi::ErrorBody),
    ))]
pub(super) async fn start(State(state): State<AppState>) -> Result<Json<Value>> {
    let started = state.sessions.start().await?;
    Ok(Json(
        json!({ "session_id": started.session_id, "timestamp": started.timestamp }),
    ))
}

#[derive(Deserialize)]
pub(super) struct StopBody {
    #[serde(default)]
    session_id: Option<String>,
    /// Any JSON object; `null` or missing is `{}`.
    #[serde(default)]
    metrics: Option<Map<String, Value>>,
}

#[utoipa::path(post, path = "/api/session/stop", tag = "sessions",
    request_body(content = Option<super::openapi::StopBody>, description = "Without session_id: the latest session"),
    responses(
        (status = 200, description = "Stopped (or saved); its line is on disk", body = super::openapi::SessionStopped),
        (status = 400, description = "No session to stop, or metrics not an object", body = super::openapi::ErrorBody),
        (status = 415, description = "Not JSON", body = super::openapi::ErrorBody),
        (status = 500, description = "The session log cannot be written", body = super::openapi::ErrorBody),
    ))]
pub(super) async fn stop(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<StopBody>,
) -> Result<Json<Value>> {
    let session_id = client_session_id(body.session_id.as_deref());
    let stopped = state
        .sessions
        .stop(session_id, body.metrics.unwrap_or_default())
        .await?;
    Ok(Json(json!({
        "status": "stopped",
        "timestamp": stopped.timestamp,
        "duration_seconds": stopped.duration_seconds,
    })))
}

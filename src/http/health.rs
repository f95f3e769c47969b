//! `GET /api/health` (contract §4): liveness; never waits on Papita, it reports the cached
//! credentials. `GET /api/ready` (contract §11, 2026-11 amendment): readiness; 503 while the
//! session log folder cannot be written, since session start and stop would then fail.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::clock::timestamp;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/ready", get(ready))
}

#[utoipa::path(get, path = "/api/ready", tag = "health",
    responses(
        (status = 200, description = "Ready: the session log folder takes writes", body = super::openapi::ReadyAnswer),
        (status = 503, description = "Not ready, saying what is wrong", body = super::openapi::ErrorBody),
    ))]
pub(super) async fn ready(State(state): State<AppState>) -> Response {
    let dir = state.session_log.dir().display().to_string();
    let now = timestamp(&state.clock.now());
    // Papita's state is reported, not judged: chats work whatever it is.
    let papita = papita_check(&state);
    // Reported, not judged: with Redis down chats go on with local state (Docs/SCALING.md).
    let shared = state.shared.as_ref().map(|s| s.check());
    match state.session_log.check_writable().await {
        Ok(()) => Json(json!({
            "status": "ready",
            "timestamp": now,
            "checks": {"session_log": {"status": "ok", "dir": dir}, "papita": papita, "shared_state": shared},
        }))
        .into_response(),
        Err(e) => {
            let error = format!(
                "The session log folder {dir} is not writable ({e}); session start and stop will fail. \
                 Check the folder (AL_CHAT_LOG_DIR) and its owner (the service runs as uid 10001 in Docker)."
            );
            tracing::warn!(%dir, error = %e, "not ready: session log folder not writable");
            let body = json!({
                "error": error,
                "status": "not_ready",
                "timestamp": now,
                "checks": {
                    "session_log": {"status": "failing", "dir": dir, "reason": e.to_string()},
                    "papita": papita,
                    "shared_state": shared,
                },
            });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Papita's delivery state: `ok`, `spooling` (records wait on disk) or `dropping`.
pub(super) fn papita_check(state: &AppState) -> Value {
    let papita = state.papita.snapshot();
    let status = if papita.dropped > 0 {
        "dropping"
    } else if papita.spool_bytes > 0 {
        "spooling"
    } else {
        "ok"
    };
    json!({"status": status, "usage_records": papita})
}

#[utoipa::path(get, path = "/api/health", tag = "health",
    responses((status = 200, description = "Alive", body = super::openapi::HealthAnswer)))]
pub(super) async fn health(State(state): State<AppState>) -> Json<Value> {
    let configured = state
        .credentials
        .peek()
        .is_some_and(|c| c.usable_key().is_some());
    Json(json!({
        "status": "healthy",
        "timestamp": timestamp(&state.clock.now()),
        "openai_configured": configured,
    }))
}

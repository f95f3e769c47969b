//! `GET /api/health` (contract §4): liveness; never waits on Papita, it reports the cached
//! credentials. `GET /api/ready` (contract §11, 2026-11 amendment): readiness; 503 while the
//! session log folder cannot be written, since session start and stop would then fail.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use serde::Serialize;
use utoipa::ToSchema;

use crate::clock::timestamp;
use crate::http::guards::AdminView;
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
}

#[utoipa::path(get, path = "/api/ready", tag = "health",
    responses(
        (status = 200, description = "Ready: the session log folder takes writes and has LOG_MIN_FREE_MB free. With ADMIN_TOKEN set, callers without it see only the statuses (no paths, hosts or reasons)", body = super::openapi::ReadyAnswer),
        (status = 503, description = "Not ready, saying what is wrong", body = super::error::ErrorBody),
    ))]
pub(super) async fn ready(State(state): State<AppState>, AdminView(full): AdminView) -> Response {
    let dir = state.session_log.dir().display().to_string();
    let now = timestamp(&state.clock.now());
    // Papita's state is reported, not judged: chats work whatever it is.
    let papita = papita_check(&state);
    // Reported, not judged: with Redis down chats go on with local state (Docs/SCALING.md).
    let shared = state.redis.as_ref().map(|s| s.check());
    let problem = match state.session_log.check_writable().await {
        Err(e) => Some((
            format!(
                "The session log folder {dir} is not writable ({e}); session start and stop will fail. \
                 Check the folder (AL_CHAT_LOG_DIR) and its owner (the service runs as uid 10001 in Docker)."
            ),
            e.to_string(),
        )),
        Ok(()) => state.session_log.check_room().err().map(|low| {
            (
                format!(
                    "The session log folder {dir} is on a nearly full disk ({low}); session start and stop get 507. \
                     Make room, or lower LOG_MIN_FREE_MB."
                ),
                low.to_string(),
            )
        }),
    };
    let (status, mut body) = match problem {
        None => (
            StatusCode::OK,
            json!({
                "status": "ready",
                "timestamp": now,
                "checks": {"session_log": {"status": "ok", "dir": dir}, "papita": papita, "shared_state": shared},
            }),
        ),
        Some((error, reason)) => {
            tracing::warn!(%dir, %reason, "not ready: the session log cannot take writes");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "error": error,
                    "status": "not_ready",
                    "timestamp": now,
                    "checks": {
                        "session_log": {"status": "failing", "dir": dir, "reason": reason},
                        "papita": papita,
                        "shared_state": shared,
                    },
                }),
            )
        }
    };
    if !full {
        // Anyone may ask whether the service is ready; where its files live and which hosts it
        // talks to are the operator's (ADMIN_TOKEN).
        if status != StatusCode::OK {
            body["error"] = json!(
                "Not ready: the session log cannot take writes. Details need the admin token."
            );
        }
        if let Some(checks) = body["checks"].as_object_mut() {
            for check in checks.values_mut() {
                if let Some(status) = check.get("status").cloned() {
                    *check = json!({ "status": status });
                }
            }
        }
    }
    (status, Json(body)).into_response()
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
    responses((status = 200, description = "Alive", body = HealthAnswer)))]
pub(super) async fn health(State(state): State<AppState>) -> Json<HealthAnswer> {
    let configured = state
        .credentials
        .peek()
        .is_some_and(|c| c.usable_key().is_some());
    Json(HealthAnswer {
        status: "healthy",
        timestamp: timestamp(&state.clock.now()),
        openai_configured: configured,
    })
}

/// `GET /api/health`'s answer (contract §4).
#[derive(Serialize, ToSchema)]
pub struct HealthAnswer {
    /// Always `healthy`.
    pub status: &'static str,
    /// Local time, ISO 8601 with microseconds, no offset.
    pub timestamp: String,
    /// A usable key is known (from Papita or `OPENAI_API_KEY`).
    pub openai_configured: bool,
}

//! `POST /api/session/start` and `/api/session/stop` (contract §7).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::domain::identifier::check_optional;
use crate::domain::session_id::client_session_id;
use crate::http::error::{ApiError, Result};
use crate::http::extract::JsonBody;
use crate::http::guards::{RateChecked, SessionRoute};
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start))
        .routes(routes!(stop))
}

/// The body is ignored, as before.
#[utoipa::path(post, path = "/api/session/start", tag = "sessions",
    responses(
        (status = 200, description = "Started; its line is on disk", body = super::openapi::SessionStarted),
        (status = 429, description = "RATE_LIMIT_SESSION_PER_MIN (Retry-After)", body = super::openapi::ErrorBody),
        (status = 500, description = "The session log cannot be written", body = super::openapi::ErrorBody),
        (status = 507, description = "The log folder's disk is nearly full (LOG_MIN_FREE_MB); nothing was written", body = super::openapi::ErrorBody),
    ))]
pub(super) async fn start(
    State(state): State<AppState>,
    _rate: RateChecked<SessionRoute>,
) -> Result<Json<Value>> {
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
        (status = 400, description = "No session to stop, metrics not an object, or a session_id over 128 bytes or with control characters", body = super::openapi::ErrorBody),
        (status = 413, description = "metrics larger than SESSION_METRICS_MAX_BYTES as JSON; nothing was written", body = super::openapi::ErrorBody),
        (status = 415, description = "Not JSON", body = super::openapi::ErrorBody),
        (status = 429, description = "RATE_LIMIT_SESSION_PER_MIN (Retry-After)", body = super::openapi::ErrorBody),
        (status = 500, description = "The session log cannot be written", body = super::openapi::ErrorBody),
        (status = 507, description = "The log folder's disk is nearly full (LOG_MIN_FREE_MB); nothing was written", body = super::openapi::ErrorBody),
    ))]
pub(super) async fn stop(
    State(state): State<AppState>,
    _rate: RateChecked<SessionRoute>,
    JsonBody(body): JsonBody<StopBody>,
) -> Result<Json<Value>> {
    check_optional("session_id", body.session_id.as_deref())?;
    let session_id = client_session_id(body.session_id.as_deref());
    let metrics = body.metrics.unwrap_or_default();
    let limit = state.config.session_metrics_max_bytes.get();
    let size = serialized_len(&metrics);
    if size > limit {
        return Err(ApiError::InputTooLarge(format!(
            "The metrics object is {size} bytes as JSON, over the limit of {limit} \
             (SESSION_METRICS_MAX_BYTES); nothing was written. Send a smaller metrics object."
        )));
    }
    let stopped = state.sessions.stop(session_id, metrics).await?;
    Ok(Json(json!({
        "status": "stopped",
        "timestamp": stopped.timestamp,
        "duration_seconds": stopped.duration_seconds,
    })))
}

/// The length of `value` as compact JSON, without building the text.
fn serialized_len(value: &Map<String, Value>) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and a map of JSON values always serializes.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

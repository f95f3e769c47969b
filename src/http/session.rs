//! `POST /api/session/start` and `/api/session/stop` (contract §7).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::domain::identifier::check_optional;
use crate::domain::session_id::client_session_id;
use crate::http::error::{ApiError, Result};
use crate::http::extract::JsonBody;
use crate::http::guards::{RateChecked, SessionRoute, Verified};
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
        (status = 200, description = "Started; its line is on disk", body = SessionStarted),
        (status = 401, description = "AUTH_JWT_* is set and the sign-in token is missing or not valid", body = super::error::ErrorBody),
        (status = 429, description = "RATE_LIMIT_SESSION_PER_MIN (Retry-After)", body = super::error::ErrorBody),
        (status = 500, description = "The session log cannot be written", body = super::error::ErrorBody),
        (status = 507, description = "The log folder's disk is nearly full (LOG_MIN_FREE_MB); nothing was written", body = super::error::ErrorBody),
    ))]
pub(super) async fn start(
    State(state): State<AppState>,
    _rate: RateChecked<SessionRoute>,
    Verified(verified): Verified,
) -> Result<Json<SessionStarted>> {
    let started = state.sessions.start(verified.as_ref()).await?;
    Ok(Json(SessionStarted {
        session_id: started.session_id,
        timestamp: started.timestamp,
    }))
}

/// `POST /api/session/start`'s answer.
#[derive(Serialize, ToSchema)]
pub struct SessionStarted {
    pub session_id: String,
    pub timestamp: String,
}

/// `POST /api/session/stop`'s body: what is parsed is what the document describes.
#[derive(Deserialize, ToSchema)]
pub(super) struct StopBody {
    #[serde(default)]
    session_id: Option<String>,
    /// Any JSON object; `null` or missing is `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metrics: Option<Map<String, Value>>,
}

/// `POST /api/session/stop`'s answer.
#[derive(Serialize, ToSchema)]
pub struct SessionStopped {
    /// `stopped`.
    pub status: &'static str,
    pub timestamp: String,
    /// Seconds since the session's start; `null` when its start is unknown.
    pub duration_seconds: Option<f64>,
}

#[utoipa::path(post, path = "/api/session/stop", tag = "sessions",
    request_body(content = Option<StopBody>, description = "Without session_id: the latest session"),
    responses(
        (status = 200, description = "Stopped (or saved); its line is on disk", body = SessionStopped),
        (status = 400, description = "No session to stop, metrics not an object, or a session_id over 128 bytes or with control characters", body = super::error::ErrorBody),
        (status = 401, description = "AUTH_JWT_* is set and the sign-in token is missing or not valid", body = super::error::ErrorBody),
        (status = 413, description = "metrics larger than SESSION_METRICS_MAX_BYTES as JSON; nothing was written", body = super::error::ErrorBody),
        (status = 415, description = "Not JSON", body = super::error::ErrorBody),
        (status = 429, description = "RATE_LIMIT_SESSION_PER_MIN (Retry-After)", body = super::error::ErrorBody),
        (status = 500, description = "The session log cannot be written", body = super::error::ErrorBody),
        (status = 507, description = "The log folder's disk is nearly full (LOG_MIN_FREE_MB); nothing was written", body = super::error::ErrorBody),
    ))]
pub(super) async fn stop(
    State(state): State<AppState>,
    _rate: RateChecked<SessionRoute>,
    _identity: Verified,
    JsonBody(body): JsonBody<StopBody>,
) -> Result<Json<SessionStopped>> {
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
    Ok(Json(SessionStopped {
        status: "stopped",
        timestamp: stopped.timestamp,
        duration_seconds: stopped.duration_seconds,
    }))
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

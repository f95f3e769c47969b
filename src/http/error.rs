//! The one error type of the HTTP API and its one mapping to status codes and JSON bodies.
//!
//! Every failure a client can see is an `ApiError`; its `IntoResponse` is the only place where a
//! failure becomes a status code and a `{"error": ..., "details"?: ...}` body (contract §1).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::domain::InputError;
use crate::services::chat::{ChatError, NOT_CONFIGURED};
use crate::services::guardrails::GuardrailError;
use crate::services::sessions::SessionError;
pub use crate::services::upstream::{UpstreamError, UpstreamKind};

const INVALID_KEY: &str =
    "Invalid OpenAI API key. Please check your credentials in Papita API or .env file.";
const INVALID_KEY_DETAILS: &str = "The OpenAI API key is invalid or expired. If using Papita API, ensure it's running and has valid credentials.";

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// `{"error": "a sentence saying what to do", "details"?: "..."}`: every error, every status.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

impl std::fmt::Display for ErrorBody {
    /// As JSON (an SSE `error` event's data, a body written by hand).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client's mistake, with a sentence saying what to change.
    #[error("{0}")]
    BadRequest(String),
    #[error("Not found: {0}. See README.md for the routes under /api.")]
    NotFound(String),
    #[error("Method {0} is not allowed for this route.")]
    MethodNotAllowed(String),
    #[error("Request body is larger than the limit (REQUEST_BODY_LIMIT_BYTES).")]
    PayloadTooLarge,
    /// Past `MAX_INPUT_CHARS`, with the part to shorten.
    #[error("{0}")]
    InputTooLarge(String),
    /// A guardrail refused the request (model, rate limit, budget).
    #[error(transparent)]
    Guardrail(GuardrailError),
    /// `ADMIN_TOKEN` is set and the request did not carry it.
    #[error("This route needs the admin token: send Authorization: Bearer <ADMIN_TOKEN>.")]
    AdminTokenRequired,
    #[error(
        "Content-Type must be application/json (with curl: -H 'Content-Type: application/json')."
    )]
    UnsupportedMediaType,
    /// No response within `REQUEST_TIMEOUT_SECS` (tower-http's timeout layer).
    #[error("The request took too long to answer (REQUEST_TIMEOUT_SECS).")]
    RequestTimeout,
    /// Any other status a layer produced without a body of ours.
    #[error("{}", .0.canonical_reason().unwrap_or("Request failed"))]
    Status(StatusCode),
    #[error(
        "The request body did not arrive in time (BODY_READ_TIMEOUT_SECS); send it whole, promptly."
    )]
    BodyReadTimeout,
    #[error("{NOT_CONFIGURED}")]
    NotConfigured,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// With fallbacks, every upstream's breaker is open (503 with `Retry-After`).
    #[error(transparent)]
    AllUpstreamsDown(ChatError),
    /// The session log line could not be made durable (the I/O error is its source).
    #[error("{0}")]
    SessionLog(SessionError),
    #[error("Internal server error: {0}")]
    Internal(String),
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::NotConfigured => Self::NotConfigured,
            ChatError::Upstream(e) => Self::Upstream(e),
            ChatError::Guardrail(e) => Self::Guardrail(e),
            e @ ChatError::AllUpstreamsDown { .. } => Self::AllUpstreamsDown(e),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::IdRequired => Self::BadRequest(e.to_string()),
            SessionError::LowDisk { .. } | SessionError::Log { .. } => Self::SessionLog(e),
        }
    }
}

/// Invalid input is always the client's to fix: a 400 with the domain's sentence (413 when it
/// is too large).
impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        match e {
            InputError::TooLarge { .. } => Self::InputTooLarge(e.to_string()),
            _ => Self::BadRequest(e.to_string()),
        }
    }
}

impl From<GuardrailError> for ApiError {
    fn from(e: GuardrailError) -> Self {
        Self::Guardrail(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge | Self::InputTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Guardrail(GuardrailError::ModelNotAllowed { .. }) => StatusCode::BAD_REQUEST,
            Self::Guardrail(
                GuardrailError::InputTooLarge(_) | GuardrailError::TooLongForModel { .. },
            ) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Guardrail(GuardrailError::StateUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Guardrail(GuardrailError::Unauthorized(_)) => StatusCode::UNAUTHORIZED,
            Self::Guardrail(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::AdminTokenRequired => StatusCode::UNAUTHORIZED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyReadTimeout | Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Status(status) => *status,
            Self::NotConfigured | Self::AllUpstreamsDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(e) => match e.kind {
                UpstreamKind::Unauthorized => StatusCode::UNAUTHORIZED,
                UpstreamKind::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                UpstreamKind::Rejected => StatusCode::BAD_REQUEST,
                UpstreamKind::Unavailable => StatusCode::BAD_GATEWAY,
                UpstreamKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            },
            Self::SessionLog(SessionError::LowDisk { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            Self::SessionLog(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: `error` always, `details` where the contract has one.
    pub fn body(&self) -> ErrorBody {
        match self {
            Self::Upstream(UpstreamError {
                kind: UpstreamKind::Unauthorized,
                ..
            }) => ErrorBody {
                error: INVALID_KEY.into(),
                details: Some(INVALID_KEY_DETAILS.into()),
            },
            other => ErrorBody {
                error: other.to_string(),
                details: None,
            },
        }
    }
}

/// Logged once, at a level an operator sees when it matters: a revoked key (401) or a rate limit
/// (429) is a `warn` at the default level, a server fault an `error`, a rejected request `debug`.
pub fn log_upstream_failure(e: &UpstreamError) {
    match e.kind {
        UpstreamKind::Unauthorized => {
            tracing::warn!(error = %e, "OpenAI rejected the key (401); check the key in Papita or .env");
        }
        UpstreamKind::RateLimited { .. } => {
            tracing::warn!(error = %e, "OpenAI rate-limited the request (429)");
        }
        UpstreamKind::Unavailable | UpstreamKind::Timeout => {
            tracing::error!(error = %e, "OpenAI call failed");
        }
        UpstreamKind::Rejected => tracing::debug!(error = %e, "OpenAI refused the request"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Upstream(e) => log_upstream_failure(e),
            _ if status.is_server_error() => {
                // The whole chain: an I/O error's cause is its source, not its text.
                tracing::error!(status = status.as_u16(), error = %self, source = ?std::error::Error::source(&self), "request failed");
            }
            Self::Guardrail(_) | Self::AdminTokenRequired | Self::InputTooLarge(_) => {
                tracing::info!(status = status.as_u16(), error = %self, "request refused by a guardrail");
            }
            _ => tracing::debug!(status = status.as_u16(), error = %self, "request rejected"),
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let retry_after = match &self {
            Self::Upstream(UpstreamError {
                kind:
                    UpstreamKind::RateLimited {
                        retry_after: Some(wait),
                    },
                ..
            }) => Some(*wait),
            Self::Guardrail(e) => e.retry_after(),
            Self::AllUpstreamsDown(ChatError::AllUpstreamsDown { retry_after }) => {
                Some((*retry_after).max(Duration::from_secs(1)))
            }
            _ => None,
        };
        if let Some(wait) = retry_after {
            // Whole seconds, rounded up, as Retry-After requires.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if matches!(
            self,
            Self::AdminTokenRequired | Self::Guardrail(GuardrailError::Unauthorized(_))
        ) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn upstream_kinds_map_to_the_contract_statuses() {
        let status = |kind| {
            ApiError::Upstream(UpstreamError::new(kind, "x"))
                .status()
                .as_u16()
        };
        assert_eq!(status(UpstreamKind::Unauthorized), 401);
        assert_eq!(status(UpstreamKind::RateLimited { retry_after: None }), 429);
        assert_eq!(status(UpstreamKind::Rejected), 400);
        assert_eq!(status(UpstreamKind::Unavailable), 502);
        assert_eq!(status(UpstreamKind::Timeout), 504);
        assert_eq!(ApiError::NotConfigured.status().as_u16(), 503);
    }

    #[test]
    fn upstream_errors_start_with_the_contract_prefix() {
        let e = ApiError::Upstream(UpstreamError::new(
            UpstreamKind::Rejected,
            "model not found",
        ));
        assert_eq!(e.body().error, "OpenAI API error: model not found");
    }

    #[test]
    fn retry_after_is_passed_on_in_whole_seconds() {
        let e = ApiError::Upstream(UpstreamError::new(
            UpstreamKind::RateLimited {
                retry_after: Some(Duration::from_millis(1500)),
            },
            "slow down",
        ));
        let response = e.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}

//! How a call to the OpenAI server failed, classified once where it happens (`services::openai`)
//! so that the API layer only maps kinds to statuses (`crate::http::error`).

use std::time::Duration;

/// How a call to the OpenAI server failed, already classified for the client (contract §6).
#[derive(Debug, Clone, thiserror::Error)]
#[error("OpenAI API error: {message}")]
pub struct UpstreamError {
    pub kind: UpstreamKind,
    /// Safe to show: never holds the key (see `services::openai::redact`).
    pub message: String,
    /// The upstream provably did not process the request: the connection was refused before
    /// anything was written, or a 4xx answer came back. Anything else (a timeout, a 5xx, a cut
    /// connection) may have been processed and billed.
    pub unprocessed: bool,
    /// Another upstream may answer instead (`services::chat`'s failover): a refused or reset
    /// connection, no response head in time, a 429 or a 5xx. Never once an answer has begun.
    pub failover: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// 401: the key is wrong or revoked.
    Unauthorized,
    /// 429, with the upstream's `Retry-After` when it sent one.
    RateLimited { retry_after: Option<Duration> },
    /// 400/404/422: the upstream refused this request (unknown model, too long, ...).
    Rejected,
    /// 5xx, unreadable answer, refused or cut connection.
    Unavailable,
    /// No (complete) answer within the configured time.
    Timeout,
}

impl UpstreamError {
    pub fn new(kind: UpstreamKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            unprocessed: false,
            failover: false,
        }
    }
}

//! The HTTP transport of every OpenAI call: one shared reqwest client and a bounded retry.
//!
//! async-openai's default stack retries 429s with whatever `Retry-After` says, uncapped (see
//! FIELD_NOTES), so a `Retry-After: 60` would hold a chat for minutes. Our calls go through this
//! instead: a few attempts, waits within a total budget, and a `Retry-After` longer than the
//! budget is not waited for but handed back to the client.
//!
//! Non-success answers become `UpstreamStatus`, so that the status, the upstream's message and its
//! `Retry-After` survive to the error mapping (`openai.rs`).

use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode, header};

/// A non-success HTTP answer from the OpenAI server, read and classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream answered {status}: {message}")]
pub struct UpstreamStatus {
    pub status: StatusCode,
    /// `error.message` of OpenAI's error JSON, else the start of the body.
    pub message: String,
    /// `error.code`, e.g. `insufficient_quota`.
    pub code: Option<String>,
    pub retry_after: Option<Duration>,
}

/// Why an OpenAI call failed, before it is classified for the client (`openai::classify`).
#[derive(Debug)]
pub enum CallError {
    /// The server answered with a failure status.
    Status(UpstreamStatus),
    /// No answer: refused, reset, timed out, cut.
    Http(reqwest::Error),
    /// An answer that is not what OpenAI sends (the reason, and the start of the body).
    Malformed(String),
}

/// Error bodies are read up to this size; the rest is not needed to classify them.
const MAX_ERROR_BODY: usize = 16 * 1024;

impl UpstreamStatus {
    async fn read(mut response: Response) -> Self {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        let message = error
            .and_then(|e| {
                e.get("message")
                    .and_then(|m| m.as_str())
                    .or_else(|| e.as_str())
            })
            .map(str::to_string)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&body);
                let text = text.trim();
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_string()
                } else {
                    text.chars().take(300).collect()
                }
            });
        let code = error
            .and_then(|e| e.get("code"))
            .and_then(|c| c.as_str())
            .map(str::to_string);
        Self {
            status,
            message,
            code,
            retry_after,
        }
    }

    fn retryable(&self) -> bool {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => self.code.as_deref() != Some("insufficient_quota"),
            StatusCode::INTERNAL_SERVER_ERROR
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => true,
            _ => false,
        }
    }
}

/// `retry-after-ms` (OpenAI's own), else `Retry-After` in seconds.
/// HTTP-date values are rare from OpenAI-style servers and are ignored.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    let wait = value("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| value("retry-after"))?;
    (wait.is_finite() && wait >= 0.0).then(|| Duration::from_secs_f64(wait.min(86_400.0)))
}

/// Retry policy: at most `max_retries` more attempts, all waits together within `budget`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub budget: Duration,
    /// False with fallbacks: a 429 goes to the next upstream at once instead of waiting.
    pub wait_on_rate_limit: bool,
}

impl RetryPolicy {
    /// How long to wait before attempt `attempt + 1`, or `None` to give up now.
    fn wait(
        &self,
        attempt: u32,
        started: Instant,
        requested: Option<Duration>,
    ) -> Option<Duration> {
        if attempt >= self.max_retries {
            return None;
        }
        // Exponential backoff 250 ms, 500 ms, 1 s, ... unless the server said how long.
        let wait = requested
            .unwrap_or_else(|| Duration::from_millis(250u64.saturating_mul(1 << attempt.min(10))));
        (started.elapsed() + wait <= self.budget).then_some(wait)
    }
}

/// Sends OpenAI requests with the retry policy.
#[derive(Clone)]
pub struct OpenAiTransport {
    client: reqwest::Client,
    policy: RetryPolicy,
}

impl OpenAiTransport {
    pub fn new(client: reqwest::Client, policy: RetryPolicy) -> Self {
        Self { client, policy }
    }
}

impl OpenAiTransport {
    /// Sends the request `make` builds (again for each attempt), retrying within the policy;
    /// `Ok` only for a success status. Whole answers and streams alike.
    pub async fn send(
        &self,
        mut make: impl FnMut() -> reqwest::Request,
    ) -> Result<Response, CallError> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let request = make();
            let failure = match self.client.execute(request).await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = UpstreamStatus::read(response).await;
                    let rate_limited = status.status.as_u16() == 429;
                    let wait = if status.retryable()
                        && (self.policy.wait_on_rate_limit || !rate_limited)
                    {
                        self.policy.wait(attempt, started, status.retry_after)
                    } else {
                        None
                    };
                    match wait {
                        // Only the status: the upstream's text may echo the key, and the transport
                        // does not know it to redact it (the error mapping does).
                        Some(wait) => (wait, format!("status {}", status.status.as_u16())),
                        None => return Err(CallError::Status(status)),
                    }
                }
                // Only failures to connect are retried: the request never reached the server.
                // A timeout or a cut answer may have been processed (and billed) already.
                Err(e) if e.is_connect() => match self.policy.wait(attempt, started, None) {
                    Some(wait) => (wait, e.to_string()),
                    None => return Err(CallError::Http(e)),
                },
                Err(e) => return Err(CallError::Http(e)),
            };
            let (wait, reason) = failure;
            tracing::warn!(attempt = attempt + 1, wait_ms = wait.as_millis() as u64, %reason, "retrying OpenAI request");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = header::HeaderMap::new();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn policy_is_bounded_in_count_and_time() {
        let p = RetryPolicy {
            max_retries: 2,
            budget: Duration::from_secs(10),
            wait_on_rate_limit: true,
        };
        let now = Instant::now();
        assert_eq!(p.wait(0, now, None), Some(Duration::from_millis(250)));
        assert_eq!(
            p.wait(1, now, Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(p.wait(2, now, None), None, "attempts are bounded");
        assert_eq!(
            p.wait(0, now, Some(Duration::from_secs(60))),
            None,
            "a long Retry-After is not waited for"
        );
    }
}

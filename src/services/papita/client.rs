//! The one Papita client: owns the base URL (parsed once), the shared pooled HTTP client and
//! the timeouts of each call (contract §3, §9).

use std::time::Duration;

use serde_json::Value;
use tokio_util::task::TaskTracker;

use crate::config::PapitaSettings;
use crate::domain::ApiKey;
use crate::services::papita::UsageRecord;
use crate::services::papita::connection::{UsageConnection, UsageTarget};

/// Connecting to Papita (a local service) takes milliseconds; a hung connect is not waited for.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct PapitaClient {
    http: reqwest::Client,
    credentials_url: reqwest::Url,
    usage_url: reqwest::Url,
    /// Set for plain-HTTP URLs without a proxy: each reporter lane then keeps its own connection.
    usage_target: Option<UsageTarget>,
    credentials_timeout: Duration,
    usage_timeout: Duration,
}

/// Why Papita did not take a usage record.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct UsageRejected {
    /// Worth sending again: a refused connection or a 5xx. A timeout is not, since Papita may
    /// have counted the record already; nor is a 4xx.
    pub retryable: bool,
    pub reason: String,
}

impl UsageRejected {
    /// Papita's answer to a record: 2xx took it; a 5xx is worth sending again, a 4xx never.
    /// One rule for the pooled client and the lanes' own connections.
    pub fn check(status: reqwest::StatusCode) -> Result<(), Self> {
        if status.is_success() {
            Ok(())
        } else {
            Err(Self {
                retryable: status.is_server_error(),
                reason: format!("status {}", status.as_u16()),
            })
        }
    }
}

impl PapitaClient {
    /// `http` is shared (pooled connections); it has a connect timeout, each call its own limit.
    pub fn new(settings: &PapitaSettings, http: reqwest::Client) -> Self {
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{}{path}", settings.url))
                .expect("PAPITA_API_URL was checked at start-up")
        };
        let usage_url = url("/api/usage/log");
        Self {
            http,
            credentials_url: url("/api/credentials/global/openai"),
            usage_target: UsageTarget::for_url(&usage_url),
            usage_url,
            credentials_timeout: settings.credentials_timeout,
            usage_timeout: settings.usage_timeout,
        }
    }

    /// The OpenAI key Papita holds, if it answers one in time. Any failure (refused, timeout,
    /// non-200, not JSON, no key) is `None`: the caller falls through to the environment.
    pub async fn openai_key(&self) -> Option<ApiKey> {
        let response = match self
            .http
            .get(self.credentials_url.clone())
            .timeout(self.credentials_timeout)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "Papita credentials unavailable");
                return None;
            }
        };
        if response.status() != reqwest::StatusCode::OK {
            tracing::debug!(
                status = response.status().as_u16(),
                "Papita credentials: no key"
            );
            return None;
        }
        let body: Value = response.json().await.ok()?;
        key_in_papita_body(&body)
    }

    /// A connection of its own for a reporter lane (plain HTTP, no proxy), else `None`: then
    /// `post_usage_body` sends through the pooled client. Its driving task runs on `tasks`.
    pub fn usage_connection(&self, tasks: &TaskTracker) -> Option<UsageConnection> {
        let target = self.usage_target.clone()?;
        Some(UsageConnection::new(
            target,
            CONNECT_TIMEOUT,
            self.usage_timeout,
            tasks.clone(),
        ))
    }

    /// Posts one usage record; `Ok` once Papita answered 2xx.
    pub async fn post_usage(&self, record: &UsageRecord) -> Result<(), UsageRejected> {
        let body = serde_json::to_vec(record).expect("a record serializes");
        self.post_usage_body(body.into()).await
    }

    /// Posts one usage record already serialized (as the spool keeps them).
    pub async fn post_usage_body(&self, body: bytes::Bytes) -> Result<(), UsageRejected> {
        let result = self
            .http
            .post(self.usage_url.clone())
            .timeout(self.usage_timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        match result {
            Ok(r) => UsageRejected::check(r.status()),
            Err(e) => Err(UsageRejected {
                retryable: e.is_connect(),
                reason: e.to_string(),
            }),
        }
    }
}

/// The first non-blank string among the contract's five places, in order.
pub fn key_in_papita_body(body: &Value) -> Option<ApiKey> {
    const PATHS: [&[&str]; 5] = [
        &["credentials", "credentials", "api_key"],
        &["credentials", "api_key"],
        &["api_key"],
        &["value"],
        &["credential_value"],
    ];
    if !body.is_object() {
        return None;
    }
    PATHS.iter().find_map(|path| {
        let value = path.iter().try_fold(body, |v, key| v.get(key))?;
        ApiKey::parse(value.as_str()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn papita_key_is_taken_from_the_first_non_blank_place() {
        let key = |v: Value| key_in_papita_body(&v).map(|k| k.expose().to_string());
        assert_eq!(
            key(json!({"credentials": {"credentials": {"api_key": "sk-1"}}})).as_deref(),
            Some("sk-1")
        );
        assert_eq!(
            key(json!({"credentials": {"api_key": " sk-2 "}})).as_deref(),
            Some("sk-2")
        );
        assert_eq!(
            key(json!({"api_key": "", "value": "sk-4"})).as_deref(),
            Some("sk-4")
        );
        assert_eq!(
            key(json!({"credential_value": "sk-5"})).as_deref(),
            Some("sk-5")
        );
        assert_eq!(key(json!({"api_key": 5})), None);
        assert_eq!(key(json!(["sk-x"])), None);
        assert_eq!(key(json!({})), None);
    }
}

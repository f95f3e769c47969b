//! One kept-alive HTTP/1.1 connection per lane for usage records, on plain `http://` Papita
//! URLs (the usual, internal, case).
//!
//! A lane sends one record at a time, in order, so it needs exactly one connection, and no pool,
//! redirect layer or URL re-parsing: through reqwest a record cost ~48,000 instructions (two
//! URL parses per request, the pool's checkout, the redirect hook), a fifth of a whole chat
//! (Docs/BENCHMARKS.md). Here the request is built from parts prepared once.
//!
//! The outcome is classified as `PapitaClient::post_usage_body` does: refused connections and
//! 5xx are worth sending again, a 4xx or a timeout is not (Papita may have counted it).
//! `https://` URLs, URLs with credentials, and any `HTTP_PROXY` / `ALL_PROXY` in the environment
//! (which reqwest would honour), keep the pooled reqwest client.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::services::papita::UsageRejected;

/// Papita's answers to usage records are short; a longer one is not read to the end (and its
/// connection is not reused).
const MAX_ANSWER: usize = 64 * 1024;

/// Where usage records go, prepared once from `PAPITA_API_URL`.
#[derive(Debug, Clone)]
pub struct UsageTarget {
    /// `host:port`, for connecting (resolved on each new connection).
    authority: String,
    host: HeaderValue,
    path: Uri,
}

impl UsageTarget {
    /// `None` when the URL is not plain `http://`, carries credentials (reqwest turns them into
    /// basic auth), or a proxy is configured in the environment.
    pub fn for_url(url: &reqwest::Url) -> Option<Self> {
        let credentials = !url.username().is_empty() || url.password().is_some();
        if url.scheme() != "http" || credentials || proxy_in_environment() {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let authority = if host.contains(':') {
            format!("[{}]:{port}", host.trim_matches(['[', ']']))
        } else {
            format!("{host}:{port}")
        };
        let host_header = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str()?),
            None => url.host_str()?.to_string(),
        };
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        Some(Self {
            authority,
            host: HeaderValue::from_str(&host_header).ok()?,
            path: path.parse().ok()?,
        })
    }
}

/// Proxies reqwest would use for an `http://` URL: then it is left to reqwest.
fn proxy_in_environment() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// A lane's connection: opened when first needed, reopened after any failure.
pub struct UsageConnection {
    target: UsageTarget,
    sender: Option<SendRequest<Full<Bytes>>>,
    connect_timeout: Duration,
    timeout: Duration,
    /// Where the task driving the connection runs, so shutdown waits for it.
    tasks: TaskTracker,
}

impl UsageConnection {
    pub fn new(
        target: UsageTarget,
        connect_timeout: Duration,
        timeout: Duration,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            target,
            sender: None,
            tasks,
            connect_timeout,
            timeout,
        }
    }

    /// Posts one record already serialized; `Ok` once Papita answered 2xx. Bounded by the usage
    /// timeout as a whole (connecting included).
    pub async fn post(&mut self, body: Bytes) -> Result<(), UsageRejected> {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(result) => result,
            Err(_) => {
                // The request may be half-written or answered later: this connection is done.
                self.sender = None;
                Err(UsageRejected {
                    retryable: false,
                    reason: format!(
                        "no answer from Papita within {} ms",
                        self.timeout.as_millis()
                    ),
                })
            }
        }
    }

    async fn exchange(&mut self, body: Bytes) -> Result<(), UsageRejected> {
        let mut request = self.request(body);
        // At most twice: a failed attempt clears `sender`, so the next one is never "reused".
        loop {
            let reused = self.sender.is_some();
            let sender = self.ready_sender().await?;
            let mut failed = match sender.try_send_request(request).await {
                Ok(response) => return self.answer(response).await,
                Err(failed) => failed,
            };
            self.sender = None;
            match failed.take_message() {
                // A kept-alive connection Papita closed while idle hands the request back
                // unsent: it goes once more, on a new connection.
                Some(unsent) if reused => request = unsent,
                // Unsent even on a new connection: as good as refused, worth sending again.
                // Sent, then the connection failed: Papita may have counted it.
                unsent => {
                    return Err(UsageRejected {
                        retryable: unsent.is_some(),
                        reason: failed.into_error().to_string(),
                    });
                }
            }
        }
    }

    fn request(&self, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.target.path.clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.target.host.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        request
    }

    /// The open connection once it can take a request, or a new one.
    async fn ready_sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, UsageRejected> {
        if let Some(sender) = self.sender.as_mut() {
            if sender.ready().await.is_err() {
                self.sender = None;
            }
        }
        if self.sender.is_none() {
            self.sender = Some(self.connect().await?);
        }
        Ok(self.sender.as_mut().expect("just set"))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, UsageRejected> {
        let refused = |reason: String| UsageRejected {
            retryable: true,
            reason,
        };
        let authority = &self.target.authority;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| refused(format!("connecting to {authority} timed out")))?
            .map_err(|e| refused(format!("cannot connect to {authority}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| refused(format!("HTTP handshake with {authority} failed: {e}")))?;
        // Drives the connection; it ends when the sender is dropped or Papita closes it.
        self.tasks.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "Papita connection ended");
            }
        });
        Ok(sender)
    }

    async fn answer(
        &mut self,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<(), UsageRejected> {
        let status = response.status();
        // Read to the end, so the connection can carry the next record.
        if Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .is_err()
        {
            self.sender = None;
        }
        UsageRejected::check(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_prepared_from_plain_http_urls_only() {
        let target = |url: &str| UsageTarget::for_url(&reqwest::Url::parse(url).unwrap());
        let plain = target("http://papita:3000/api/usage/log").unwrap();
        assert_eq!(plain.authority, "papita:3000");
        assert_eq!(plain.host, "papita:3000");
        assert_eq!(plain.path, "/api/usage/log");
        let default_port = target("http://papita/base/api/usage/log?x=1").unwrap();
        assert_eq!(default_port.authority, "papita:80");
        assert_eq!(default_port.host, "papita");
        assert_eq!(default_port.path, "/base/api/usage/log?x=1");
        let v6 = target("http://[::1]:3000/api/usage/log").unwrap();
        assert_eq!(v6.authority, "[::1]:3000");
        assert!(target("https://papita.example/api/usage/log").is_none());
        assert!(target("http://user:secret@papita:3000/api/usage/log").is_none());
    }
}

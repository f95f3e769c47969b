//! Serving connections: our own accept loop around hyper's HTTP/1 connection.
//!
//! `axum::serve` has no limits for clients that are slow or idle, and such clients are how a
//! public endpoint runs out of file descriptors (slowloris). So each connection here is watched:
//!
//! - a request head must arrive whole within `HEADER_READ_TIMEOUT_SECS` of its first byte;
//! - a connection with no request in progress (new, or kept alive) is closed after
//!   `IDLE_TIMEOUT_SECS`;
//! - a request body must arrive within `BODY_READ_TIMEOUT_SECS` (enforced where bodies are read,
//!   `http::extract`, from the deadline this module puts in the request's extensions);
//! - a response the client takes no bytes of for `SSE_WRITE_STALL_SECS` (its socket stays full:
//!   it stopped reading) is cut, closing the connection, which drops the response body and with
//!   it the upstream call: a client that never reads holds no more than the socket buffers;
//! - a response that carries a `CutAt` (a streamed chat: `OPENAI_STREAM_MAX_SECS` and a grace)
//!   is cut then, whether or not the client reads;
//! - at most `MAX_CONNECTIONS` connections are open; beyond that new ones wait in the kernel's
//!   backlog (logged once per episode) until a slot frees, which the limits above guarantee.
//!
//! On shutdown the listener closes at once. A connection with a request in progress finishes it
//! and closes (`Connection: close`); one without (idle, or a head still arriving) may still bring
//! one request within `KEEPALIVE_DRAIN` (1 s), answered the same way, and is then closed, so a
//! proxy never has a request reset on a keep-alive connection it was just reusing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// On shutdown, how long a keep-alive connection with no request in progress may still bring
/// one (served with `Connection: close`) before it is closed. A proxy in front (nginx) may be
/// sending a request on it at the very moment it is closed, and must not resend a POST it has
/// sent: closing idle connections at once made a rolling restart fail a few requests behind
/// nginx (reset by peer). Under load a proxy reuses its most recent connections within this
/// time; the listener itself closes at once, so new connections go to another replica.
const KEEPALIVE_DRAIN: Duration = Duration::from_secs(1);

/// `SO_SNDBUF` of accepted connections.
const SEND_BUFFER: usize = 128 * 1024;

/// While connections keep waiting for a slot, the limit is logged at most this often.
const SATURATION_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long clients may take, and how many may be connected at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub body_read: Duration,
    /// A response whose bytes the client does not take for this long is cut.
    pub write_stall: Duration,
    pub max_connections: usize,
    /// From the shutdown signal, how long requests in progress may take to finish.
    pub grace: Duration,
}

/// Put in a response's extensions: the connection is closed at this moment if the response is
/// still being sent (a streamed answer past its hard limit, with a client that stopped reading).
#[derive(Debug, Clone, Copy)]
pub struct CutAt(pub Instant);

/// `MAX_CONNECTIONS=auto`, from the open-file limit in force.
pub fn auto_max_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    connections_for_open_files(soft)
}

/// Each chat in flight may hold an upstream connection as well as its client's (HTTP/1.1
/// upstreams), so half of what is left once a reserve is kept for everything else: log and
/// spool files, Papita's and Redis's connections, the listener. Without the reserve, 10,000
/// slow chats over HTTP/1.1 took every descriptor and the Papita spool could not open its
/// file (EMFILE): records were dropped. Never below 64.
fn connections_for_open_files(limit: u64) -> usize {
    let reserve = (limit / 10).min(1024);
    usize::try_from((limit - reserve) / 2)
        .unwrap_or(usize::MAX)
        .max(64)
}

/// Raises the open-file soft limit to the hard limit (as Go's runtime does), so the default
/// connection limit is not the shell's 1024. Returns the limit in force.
pub fn raise_open_file_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// When the request's body must have arrived (put in every request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct BodyReadDeadline(pub Instant);

/// Serves `router` on `listener` until `signal` completes; then closes the listener, closes idle
/// connections, lets requests in progress finish, and returns when every connection is closed or
/// `limits.grace` has passed since the signal (what is still running is then dropped). Returns
/// that deadline: the rest of the shutdown shares the same budget.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    signal: impl Future<Output = ()>,
) -> Instant {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    // Connections learn of the stop when this sender is dropped.
    let (stopping, stop) = watch::channel(());
    let mut signal = std::pin::pin!(signal);
    let mut last_warned: Option<Instant> = None;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // One line per episode, not one per waiting connection.
                if last_warned.is_none_or(|at| at.elapsed() > SATURATION_LOG_EVERY) {
                    last_warned = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached (MAX_CONNECTIONS); new connections wait until one closes"
                    );
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                    () = &mut signal => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        // Without TCP_NODELAY, small writes (SSE events, short answers) wait on the client's
        // delayed ACK: ~40 ms per streamed event.
        let _ = tcp.set_nodelay(true);
        // A fixed send buffer instead of the kernel's autotuning (which grows to 4 MB and more):
        // what a client that stops reading can make us produce before back-pressure reaches the
        // upstream is this buffer plus hyper's, not megabytes per connection. 128 KiB (the kernel
        // doubles it) still carries 2.5 MB/s over a 100 ms round trip, far above any answer's.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&tcp, SEND_BUFFER);
        let (router, stop) = (router.clone(), stop.clone());
        connections.spawn(async move {
            serve_connection(tcp, peer, router, limits, stop).await;
            drop(permit);
        });
    }
    let deadline = Instant::now() + limits.grace;
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    drop(listener);
    drop(stopping);
    connections.close();
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = limits.grace.as_secs_f64(),
            "grace period over; dropping unfinished requests"
        );
    }
    deadline
}

/// Accept errors are the machine's (out of descriptors, memory): log and breathe, never exit.
async fn accept_failed(error: &std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(%error, "accept failed; retrying shortly (is the open-file limit too low for MAX_CONNECTIONS?)");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<()>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedIo {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let guard = activity.request_started();
            let extensions = request.extensions_mut();
            extensions.insert(ConnectInfo(peer));
            extensions.insert(BodyReadDeadline(Instant::now() + limits.body_read));
            let response = router.clone().oneshot(request.map(Body::new));
            async move {
                // The guard lives until the response body is finished (or dropped, when the
                // client goes away): a long stream is a request in progress, never idle.
                let response = response
                    .await
                    .unwrap_or_else(|never: Infallible| match never {});
                if let Some(CutAt(at)) = response.extensions().get::<CutAt>() {
                    guard.cut_at(*at);
                }
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    })
                }))
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        // Our own watchdog below enforces the head timeout (hyper's would also cut idle
        // keep-alive connections at the same, short, limit).
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    // After `stop`: until when a connection without a request in progress may still bring one.
    let mut draining_until: Option<Instant> = None;
    let mut closing = false;
    // When the watchdog must act: while draining, a connection without a request in progress
    // closes at the drain's end; otherwise the activity's own deadline (head, idle, stall, cut).
    let due = |draining_until: Option<Instant>| match draining_until {
        Some(until) if !activity.busy() => Some(until),
        _ => activity.deadline(&limits),
    };
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            () = sleep_until(due(draining_until)) => {
                // Looked at again: a request may have begun or ended while it slept.
                if due(draining_until).is_some_and(|at| Instant::now() >= at) {
                    if activity.busy() {
                        tracing::info!(%peer, "cutting a response the client stopped reading (SSE_WRITE_STALL_SECS) or that ran past its limit");
                    } else if draining_until.is_none() {
                        tracing::debug!(%peer, "closing a connection that was idle or too slow to send its request");
                    }
                    return;
                }
            }
            () = activity.changed.notified() => {}
            _ = stop.changed(), if draining_until.is_none() => {
                draining_until = Some(Instant::now() + KEEPALIVE_DRAIN);
            }
        }
        // Draining: a request in progress, or one whose head has begun, is answered with
        // `Connection: close` and the connection then closes. hyper's graceful shutdown would
        // close an idle connection at once, so it is called only once a request is there.
        if draining_until.is_some() && !closing && (activity.busy() || activity.head_begun()) {
            closing = true;
            connection.as_mut().graceful_shutdown();
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

const NONE: u64 = u64::MAX;

/// What a connection is doing, as its watchdog sees it. Times are milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    /// Requests whose head was read and whose response is not finished.
    in_progress: AtomicUsize,
    /// When the connection last had no request in progress.
    idle_since: AtomicU64,
    /// When the first byte of a request head not yet complete arrived; `NONE` when none has.
    head_since: AtomicU64,
    /// Woken when a deadline may have moved (a head begins, the last request ends).
    changed: Notify,
    /// Set once the watchdog was told about the current head (one notification per head).
    head_announced: AtomicBool,
    /// Since when the socket has refused our writes (the client is not reading); `NONE` while
    /// writes go through.
    write_blocked_since: AtomicU64,
    /// When the response in progress must be cut (`CutAt`); `NONE`: never.
    cut_at: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_progress: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            changed: Notify::new(),
            head_announced: AtomicBool::new(false),
            write_blocked_since: AtomicU64::new(NONE),
            cut_at: AtomicU64::new(NONE),
        }
    }

    /// A write found the socket full: the stall clock starts (once per stall).
    fn write_blocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) == NONE {
            self.write_blocked_since
                .store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn wrote(&self, blocked: bool) {
        if blocked {
            self.write_blocked();
        } else {
            self.write_went_through();
        }
    }

    /// A write went through: the client is reading.
    fn write_went_through(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) != NONE {
            self.write_blocked_since.store(NONE, Ordering::Release);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn busy(&self) -> bool {
        self.in_progress.load(Ordering::Acquire) > 0
    }

    /// The first bytes of a request head have arrived (no request in progress yet).
    fn head_begun(&self) -> bool {
        self.head_since.load(Ordering::Acquire) != NONE
    }

    /// Bytes arrived: if no request is in progress, a new head has begun.
    fn bytes_read(&self) {
        if !self.busy() && !self.head_announced.swap(true, Ordering::AcqRel) {
            self.head_since.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
        RequestGuard(self.clone())
    }

    /// The next moment the watchdog must look. While a request is in progress: when a stalled
    /// write or the response's `CutAt` runs out, if either applies.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.busy() {
            let stalled = self.write_blocked_since.load(Ordering::Acquire);
            let stalled = (stalled != NONE).then(|| self.at(stalled) + limits.write_stall);
            let cut = self.cut_at.load(Ordering::Acquire);
            let cut = (cut != NONE).then(|| self.at(cut));
            return match (stalled, cut) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let head = self.head_since.load(Ordering::Acquire);
        Some(if head != NONE {
            self.at(head) + limits.header_read
        } else {
            self.at(self.idle_since.load(Ordering::Acquire)) + limits.idle
        })
    }
}

/// One request in progress; dropped when its response body ends or is abandoned.
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn cut_at(&self, at: Instant) {
        let activity = &self.0;
        let ms = at.saturating_duration_since(activity.epoch).as_millis() as u64;
        activity.cut_at.store(ms, Ordering::Release);
        activity.changed.notify_one();
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.now_ms(), Ordering::Release);
        activity.head_announced.store(false, Ordering::Release);
        activity.cut_at.store(NONE, Ordering::Release);
        if activity.in_progress.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.changed.notify_one();
        }
    }
}

/// A response body that holds its request's guard until it is done.
struct GuardedBody {
    body: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The TCP stream, reporting reads and blocked writes to the watchdog.
struct WatchedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(result.is_pending());
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::connections_for_open_files;

    #[test]
    fn automatic_connection_limit_leaves_descriptors_for_files_and_upstreams() {
        // Two descriptors per chat, plus a reserve for files and service connections.
        assert_eq!(connections_for_open_files(20_000), 9_488);
        assert!(connections_for_open_files(20_000) * 2 + 1024 <= 20_000);
        assert_eq!(connections_for_open_files(1024), 461);
        assert_eq!(connections_for_open_files(100), 64);
        assert_eq!(connections_for_open_files(1 << 20), 523_776);
    }
}

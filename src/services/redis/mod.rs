//! State shared by replicas on Redis (or Valkey), when `STATE_URL` is set: sessions, the
//! current-session fallback, usage statistics, budgets and rate-limit counters. Each store here
//! implements the same trait as its in-process twin, so the services do not know which runs.
//!
//! One multiplexed connection per process (`redis`'s `ConnectionManager`: concurrent commands
//! are pipelined on it, and it reconnects by itself). Every call has a short timeout
//! (`STATE_TIMEOUT_MS`). After a failure Redis is marked down and skipped: calls fail at once,
//! with no wait, and each store falls back to what it does locally until a background probe
//! (one `PING` a second) sees Redis back. So no request waits on a dead Redis for more than
//! one timeout, and only the requests in flight when it died wait that long. Health stays up;
//! readiness and the metrics report the degraded state. What each store does while down is in
//! its own module and in Docs/SCALING.md.

mod budget;
mod consumers;
mod rate;
mod sessions;
mod usage;

use secrecy::ExposeSecret;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, FromRedisValue, RedisError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use budget::RedisBudgetStore;
pub use consumers::RedisConsumerStore;
pub use rate::RedisRateLimits;
pub use sessions::RedisSessionStore;
pub use usage::RedisUsageStore;

use crate::config::{RedisSettings, WhenStateUnavailable, without_credentials};

/// How often a probe tries Redis while it is down.
/// How long the first record of a batch waits for others before the batch goes to Redis.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// What a store that hands its local buffer to Redis in batches shares: `poke` after each
/// record; `spawn_flusher` runs the store's `flush` `BATCH_WINDOW` after the first poke of a
/// batch, whenever Redis comes back, and once more at shutdown. So a burst of chats costs Redis
/// a few calls, not one each, and a chat never waits on Redis for it.
#[derive(Default)]
pub(crate) struct Batcher {
    wake: tokio::sync::Notify,
    /// A batch is scheduled (the flusher was woken and has not taken the buffer yet).
    scheduled: AtomicBool,
}

impl Batcher {
    pub(crate) fn poke(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }
}

/// A store with a `Batcher`.
pub(crate) trait Batched: Send + Sync + 'static {
    fn batcher(&self) -> &Batcher;
    fn redis(&self) -> &Arc<Redis>;
    /// Hands the buffer to Redis (what fails is kept for the next call).
    fn flush(&self) -> futures_util::future::BoxFuture<'_, ()>;
}

/// The flusher of `store`, on `background`; it hands over what is left when `stop` fires.
pub(crate) fn spawn_flusher<T: Batched>(
    store: Arc<T>,
    background: &TaskTracker,
    stop: CancellationToken,
) {
    let mut up = store.redis().watch();
    background.spawn(async move {
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                changed = up.changed() => changed.is_err(),
                () = async {
                    store.batcher().wake.notified().await;
                    tokio::time::sleep(BATCH_WINDOW).await;
                } => false,
            };
            store.batcher().scheduled.store(false, Ordering::Release);
            if *up.borrow_and_update() || stopping {
                store.flush().await;
            }
            if stopping {
                return;
            }
        }
    });
}

const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Slow answers in a row that mark Redis down (a refused or dropped connection does at once):
/// one slow answer under a burst falls back for that call only.
const SLOW_IN_A_ROW: u32 = 3;
/// Commands queued on the one connection at most before callers wait (the crate's default, 50,
/// is too few for a web server's bursts).
const PIPELINE_BUFFER: usize = 4096;

/// Redis is down (or was just seen failing): the caller falls back.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

/// Counters for the metrics and readiness.
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Calls that failed or timed out (each marks Redis down).
    pub failures: AtomicU64,
    /// Operations done locally, or refused, because Redis was down.
    pub fallbacks: AtomicU64,
    /// Times Redis was seen back after being down.
    pub recoveries: AtomicU64,
}

pub struct Redis {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    pub when_unavailable: WhenStateUnavailable,
    up: AtomicBool,
    probing: AtomicBool,
    slow_in_a_row: std::sync::atomic::AtomicU32,
    /// `true` while up; stores that buffered work while Redis was down watch it to flush.
    up_tx: watch::Sender<bool>,
    stop: CancellationToken,
    /// Where the probe runs: the application's tracked tasks.
    tasks: TaskTracker,
    pub stats: SharedStats,
    /// The URL without its password, for logs and readiness.
    pub location: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("location", &self.location)
            .field("up", &self.is_up())
            .finish()
    }
}

impl Redis {
    /// Connects to `settings.url`, waiting at most one timeout. If Redis is not there yet the
    /// service still starts, degraded, and a probe keeps trying.
    pub async fn connect(
        settings: &RedisSettings,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Arc<Self>, RedisError> {
        let client = Client::open(settings.url.expose_secret())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            // Reconnecting is the probe's job; a command never waits for retries.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500))
            .set_pipeline_buffer_size(PIPELINE_BUFFER);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let (up_tx, _) = watch::channel(false);
        let state = Arc::new(Self {
            conn,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            when_unavailable: settings.when_unavailable,
            up: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            slow_in_a_row: std::sync::atomic::AtomicU32::new(0),
            up_tx,
            stop,
            tasks,
            stats: SharedStats::default(),
            location: without_credentials(settings.url.expose_secret()),
        });
        match state.ping().await {
            Ok(()) => {
                state.up_tx.send_replace(true);
                tracing::info!(state = %state.location, "shared state on Redis");
            }
            Err(e) => {
                tracing::warn!(state = %state.location, error = %e, "Redis unreachable at start-up; running on local state until it answers");
                state.mark_down();
            }
        }
        Ok(state)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Watches up (`true`) and down.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.up_tx.subscribe()
    }

    /// `prefix` + `rest`.
    pub fn key(&self, rest: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + rest.len());
        key.push_str(&self.prefix);
        key.push_str(rest);
        key
    }

    async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// `GET key` through `call`: `Ok(None)` when the key is not there.
    pub async fn get<T>(
        self: &Arc<Self>,
        what: &'static str,
        key: String,
    ) -> Result<Option<T>, Unavailable>
    where
        T: FromRedisValue,
    {
        self.call(what, |mut conn| async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<T>>(&mut conn)
                .await
        })
        .await
    }

    /// Runs one Redis call with the timeout, unless Redis is down. A failure marks it down.
    pub async fn call<T, F, Fut>(
        self: &Arc<Self>,
        what: &'static str,
        f: F,
    ) -> Result<T, Unavailable>
    where
        T: FromRedisValue,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if !self.is_up() {
            self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Err(Unavailable);
        }
        let (error, down) = match tokio::time::timeout(self.timeout, f(self.conn.clone())).await {
            Ok(Ok(value)) => {
                self.slow_in_a_row.store(0, Ordering::Relaxed);
                return Ok(value);
            }
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error();
                let down = unreachable
                    || self.slow_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= SLOW_IN_A_ROW;
                (e.to_string(), down)
            }
            Err(_) => {
                let down = self.slow_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= SLOW_IN_A_ROW;
                (format!("no answer within {:?}", self.timeout), down)
            }
        };
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        if !down {
            tracing::warn!(state = %self.location, op = what, %error, "Redis call failed; this one falls back to local state");
            return Err(Unavailable);
        }
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::error!(state = %self.location, op = what, %error, "Redis call failed; using local state until it is back");
        }
        self.mark_down();
        Err(Unavailable)
    }

    /// Marks Redis down and starts the probe (once).
    fn mark_down(self: &Arc<Self>) {
        self.up.store(false, Ordering::Release);
        self.up_tx.send_replace(false);
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::downgrade(self);
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(PROBE_EVERY) => {}
                }
                let Some(state) = this.upgrade() else { return };
                if state.ping().await.is_ok() {
                    state.probing.store(false, Ordering::Release);
                    state.slow_in_a_row.store(0, Ordering::Relaxed);
                    state.up.store(true, Ordering::Release);
                    state.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                    state.up_tx.send_replace(true);
                    tracing::info!(state = %state.location, "Redis is back; shared state resumed");
                    return;
                }
            }
        });
    }

    /// For `/api/ready`: `{status: ok|degraded, backend, location, when_unavailable, ...}`.
    pub fn check(&self) -> RedisCheck {
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        RedisCheck {
            status: if self.is_up() { "ok" } else { "degraded" },
            details: Some(RedisDetails {
                backend: "redis",
                location: self.location.clone(),
                when_unavailable: match self.when_unavailable {
                    WhenStateUnavailable::Local => "local",
                    WhenStateUnavailable::Refuse => "refuse",
                },
                failures: count(&self.stats.failures),
                fallbacks: count(&self.stats.fallbacks),
                recoveries: count(&self.stats.recoveries),
            }),
        }
    }
}

/// Redis's line in `/api/ready`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RedisCheck {
    /// `ok`, or `degraded` (chats go on with local state, or are refused: `when_unavailable`).
    pub status: &'static str,
    /// Without the admin token: absent.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub details: Option<RedisDetails>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RedisDetails {
    pub backend: &'static str,
    /// `STATE_URL` without credentials.
    pub location: String,
    /// `local` or `refuse` (`STATE_UNAVAILABLE`).
    pub when_unavailable: &'static str,
    pub failures: u64,
    pub fallbacks: u64,
    pub recoveries: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_never_leave_the_url() {
        assert_eq!(
            crate::config::without_credentials("redis://:s3cret@cache:6379/0"),
            "redis://cache:6379/0"
        );
        assert_eq!(
            crate::config::without_credentials("redis://cache:6379"),
            "redis://cache:6379"
        );
    }
}

//! Building and running the application: bind, wire the services, serve until told to stop,
//! then drain what is queued (session log lines, Papita usage records).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Local, TimeZone};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::time::timeout_at;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Http2};
use crate::domain::ApiKey;
use crate::metrics::Metrics;
use crate::server;
use crate::services::bookkeeping::Bookkeeping;
use crate::services::breaker::Breaker;
use crate::services::chat::{ChatService, Fallback, Upstream, UpstreamCounts};
use crate::services::consumers::{ConsumerStore, Consumers, MemoryConsumerStore};
use crate::services::credentials::CredentialProvider;
use crate::services::guardrails::{
    BudgetStore, Budgets, CallLimits, Guardrails, MemoryBudgetStore, MemoryRateLimits, ModelPolicy,
    RateLimitStore,
};
use crate::services::identity::{SiteIdentity, Verifier};
use crate::services::openai::OpenAiService;
use crate::services::papita::{PapitaClient, UsageReporter};
use crate::services::redis::{
    Redis, RedisBudgetStore, RedisConsumerStore, RedisRateLimits, RedisSessionStore,
    RedisUsageStore,
};
use crate::services::session_log::entries;
use crate::services::session_log::{self, SessionLog};
use crate::services::sessions::{MemorySessionStore, SessionStore, Sessions};
use crate::services::usage::{MemoryUsageStore, UsageStats, UsageStore};
use crate::state::{AppState, Services};

/// Lines waiting for the session log writer; start/stop wait when it is full.
const SESSION_LOG_QUEUE: usize = 16 * 1024;
/// The session log's last flush may take this long even when the grace period is spent.
const SESSION_LOG_FLUSH_MIN: Duration = Duration::from_secs(2);
/// The end of the grace budget kept for writing unsent Papita records to the spool.
const SPOOL_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("cannot start the session log writer: {0}")]
    SessionLog(io::Error),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("invalid STATE_URL: {0}")]
    StateUrl(redis::RedisError),
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// Every background task: Papita lanes, credential refresh, the Redis probe and usage
    /// flusher, the session-log ticker, settlements of guardrail admissions.
    background: TaskTracker,
    /// Cancelled once the requests are done: every background task ends on it.
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As `build`, with the clock used for timestamps, ids and log dates (tests move it).
    pub async fn build_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;

        // One pooled client per upstream. No overall timeout on the OpenAI one: it would cut
        // long, healthy streams; the OpenAI service applies its own limits.
        // Neither OpenAI nor Papita redirects; a redirect would be a misconfiguration, and
        // following it would send the request (and its key) somewhere else.
        let openai_http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.openai.connect_timeout)
            .tcp_nodelay(true);
        // HTTP/2: chats in flight share a connection (streams) instead of holding one each,
        // which is most of what 10,000 slow chats cost (Docs/BENCHMARKS.md).
        let openai_http = match config.openai.http2 {
            Http2::Auto => openai_http,
            Http2::Always => openai_http.http2_prior_knowledge(),
            Http2::Never => openai_http.http1_only(),
        }
        .build()?;
        let papita_http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(crate::services::papita::CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;

        let background = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let session_log = SessionLog::start(
            config.log_dir.clone(),
            SESSION_LOG_QUEUE,
            entries::project_init(&clock.now()),
            metrics.session_log.clone(),
            config.log_min_free_bytes,
            &background,
            shutdown.clone(),
        )
        .map_err(StartupError::SessionLog)?;

        let logged_starts = logged_starts(&config, clock.as_ref()).await;
        let papita = PapitaClient::new(&config.papita, papita_http);
        let credentials = Arc::new(CredentialProvider::new(
            &config,
            papita.clone(),
            metrics.credential_resolutions.clone(),
            background.clone(),
        ));
        // Resolve the key now, in the background, so health soon tells the truth.
        credentials.peek();

        let max_age =
            chrono::Duration::from_std(config.sessions_max_age).unwrap_or(chrono::Duration::MAX);
        let session_store = MemorySessionStore::new(
            config.sessions_max.get(),
            max_age,
            clock.now(),
            logged_starts,
        );
        // STATE_URL: the shared stores on Redis, each falling back to its in-process twin.
        let redis = match &config.redis {
            Some(settings) => Some(
                Redis::connect(settings, shutdown.clone(), background.clone())
                    .await
                    .map_err(StartupError::StateUrl)?,
            ),
            None => None,
        };
        let (session_store, usage_store): (Arc<dyn SessionStore>, Arc<dyn UsageStore>) =
            match &redis {
                Some(shared) => (
                    Arc::new(RedisSessionStore::new(
                        shared.clone(),
                        session_store,
                        max_age,
                    )),
                    Arc::new(RedisUsageStore::new(
                        shared.clone(),
                        config.sessions_max.get(),
                        max_age,
                        &background,
                        shutdown.clone(),
                    )),
                ),
                None => (
                    Arc::new(session_store),
                    Arc::new(MemoryUsageStore::new(config.sessions_max.get())),
                ),
            };
        let sessions = Arc::new(Sessions::new(
            session_store,
            session_log.clone(),
            clock.clone(),
        ));
        let usage = Arc::new(UsageStats::new(
            usage_store,
            config.pricing.clone(),
            &config.openai.model,
        ));
        let spool_dir = config
            .papita
            .spool_dir
            .clone()
            .unwrap_or_else(|| config.log_dir.join("papita-spool"));
        let papita = UsageReporter::spawn(
            &config.papita,
            spool_dir,
            papita,
            &background,
            shutdown.clone(),
        );
        let guardrails = Arc::new(guardrails(
            &config,
            clock.clone(),
            redis.as_ref(),
            background.clone(),
        ));
        let tracked = config.guardrails.quota_max_tracked;
        let consumer_store: Arc<dyn ConsumerStore> = match &redis {
            Some(shared) => Arc::new(RedisConsumerStore::new(
                shared.clone(),
                tracked,
                &background,
                shutdown.clone(),
            )),
            None => Arc::new(MemoryConsumerStore::new(tracked)),
        };
        let consumers = Arc::new(Consumers::new(
            consumer_store,
            guardrails.budgets(),
            config.guardrails.budget.quota,
        ));
        let books = Arc::new(Bookkeeping::new(
            usage.clone(),
            consumers.clone(),
            papita.clone(),
            session_log.clone(),
            clock.clone(),
            background.clone(),
        ));
        let chat = Arc::new(ChatService::new(
            Upstream {
                credentials: credentials.clone(),
                fallbacks: config
                    .openai
                    .fallbacks
                    .iter()
                    .map(|f| Fallback {
                        name: f.name.clone(),
                        counts: UpstreamCounts::default(),
                        openai: OpenAiService::fallback(&config.openai, f, openai_http.clone()),
                        key: f
                            .api_key
                            .as_ref()
                            .and_then(|k| ApiKey::parse(k.expose_secret()))
                            .unwrap_or_else(|| ApiKey::parse("no-key").expect("not blank")),
                        model_map: f.model_map.clone(),
                        breaker: Breaker::new(config.openai.breaker),
                    })
                    .collect(),
                openai: OpenAiService::new(&config.openai, openai_http),
                breaker: Breaker::new(config.openai.breaker),
                failover_budget: config.openai.retry_budget,
            },
            guardrails.clone(),
            books,
            sessions.clone(),
            clock.clone(),
            config.metrics_enabled.then(|| metrics.clone()),
        ));
        let state = AppState::new(Services {
            redis,
            metrics,
            chat,
            guardrails,
            credentials,
            usage,
            consumers,
            sessions,
            papita,
            session_log,
            clock,
            config,
        });
        Ok(Self {
            listener,
            state,
            background,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` completes; then stops accepting, lets in-flight requests finish,
    /// and sends or writes out everything queued, all within one `SHUTDOWN_GRACE_SECS` budget
    /// (so Docker's stop timeout, above it, never cuts the drain).
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let (grace, state) = (self.state.config.shutdown_grace, &self.state);
        let router = crate::http::router(state.clone());
        let deadline = server::serve(self.listener, router, limits(&state.config), signal).await;
        // The requests are done: what they queued drains now. Papita sends until shortly before
        // the deadline and spools what is left then; the other tasks end at once.
        let spool_margin = (grace / 4).min(SPOOL_MARGIN);
        state.papita.spool_at(deadline - spool_margin);
        self.shutdown.cancel();
        self.background.close();
        // Local disk is written even when the budget is spent, but never waited on forever.
        let by = || deadline.max(tokio::time::Instant::now() + SESSION_LOG_FLUSH_MIN);
        if timeout_at(by(), self.background.wait()).await.is_err() {
            tracing::error!("background tasks still running at the end of the grace period");
        }
        // The writer thread writes what the last tasks queued, syncs, and is joined.
        if timeout_at(by(), state.session_log.close()).await.is_err() {
            tracing::error!("the session log writer did not finish in time");
        }
        let papita = state.papita.snapshot();
        let (sent, spooled, dropped) = (papita.sent, papita.spooled, papita.dropped);
        tracing::info!(
            sent,
            spooled,
            dropped,
            "stopped; Papita usage records at exit"
        );
        Ok(())
    }
}

/// How long clients may take, and how many may be connected at once (`server`).
fn limits(config: &Config) -> server::Limits {
    server::Limits {
        header_read: config.header_read_timeout,
        idle: config.idle_timeout,
        body_read: config.body_read_timeout,
        write_stall: config.openai.write_stall,
        max_connections: config
            .max_connections
            .map_or_else(server::auto_max_connections, NonZeroUsize::get),
        grace: config.shutdown_grace,
    }
}

/// The guardrails, their counters in process or, with `STATE_URL`, on Redis.
fn guardrails(
    config: &Config,
    clock: Arc<dyn Clock>,
    shared: Option<&Arc<Redis>>,
    tasks: TaskTracker,
) -> Guardrails {
    let settings = &config.guardrails;
    let models = ModelPolicy::new(
        settings.allowed_models.as_deref(),
        &config.openai.model,
        &config.pricing.models(),
    );
    // Session counters are bounded like the sessions themselves, quota counters by
    // `QUOTA_MAX_TRACKED`; day counters apart.
    let budget_store =
        MemoryBudgetStore::new(config.sessions_max.get(), settings.quota_max_tracked);
    let (rate, budget_store): (Arc<dyn RateLimitStore>, Arc<dyn BudgetStore>) = match shared {
        Some(shared) => (
            Arc::new(RedisRateLimits::new(shared.clone(), &settings.rate)),
            Arc::new(RedisBudgetStore::new(shared.clone(), budget_store)),
        ),
        None => (
            Arc::new(MemoryRateLimits::new(&settings.rate)),
            Arc::new(budget_store),
        ),
    };
    let budgets = Budgets::new(
        budget_store,
        settings.budget,
        config.pricing.clone(),
        clock.clone(),
    );
    // The key was checked when the configuration was read.
    let identity = settings
        .jwt
        .as_ref()
        .and_then(|key| Verifier::new(key).ok())
        .map(|verifier| SiteIdentity::new(verifier, clock.clone()));
    let guardrails = Guardrails::new(
        models,
        rate,
        settings.rate,
        Arc::new(budgets),
        CallLimits {
            max_input_chars: settings.max_input_chars,
            output_cap: config.output_cap(),
            min_output: config.openai.min_output_tokens,
            history_trim: settings.history_trim,
        },
        config.pricing.clone(),
        tasks,
    );
    match identity {
        Some(identity) => guardrails.with_identity(identity),
        None => guardrails,
    }
}

/// The session starts still within `SESSION_MAX_AGE_HOURS`, read once from the log files of the
/// days that window touches, oldest first: the index that lets a stop after a restart find its
/// session's start without reading a file per request.
async fn logged_starts(config: &Config, clock: &dyn Clock) -> Vec<(String, DateTime<Local>)> {
    let now = clock.now();
    let max_age =
        chrono::Duration::from_std(config.sessions_max_age).unwrap_or(chrono::Duration::MAX);
    let first = now.checked_sub_signed(max_age).unwrap_or(now).date_naive();
    let dates: Vec<String> = first
        .iter_days()
        .take_while(|d| *d <= now.date_naive())
        .map(|d| d.format("%Y-%m-%d").to_string())
        .collect();
    let dir = config.log_dir.clone();
    let mut starts: Vec<(String, DateTime<Local>)> =
        tokio::task::spawn_blocking(move || session_log::read_starts(&dir, &dates))
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, naive)| Some((id, Local.from_local_datetime(&naive).earliest()?)))
            .collect();
    starts.sort_by_key(|(_, at)| *at);
    starts
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
}

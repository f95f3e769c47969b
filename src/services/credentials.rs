//! Where the OpenAI key comes from (contract §3): Papita first, then `OPENAI_API_KEY`; with a
//! custom `OPENAI_BASE_URL` the other way round (2026-11 amendment), so the company's OpenAI key
//! from Papita only goes to another server when no key of its own is set, and then a warning
//! names the host.
//!
//! The key is resolved when needed and cached. On a cold cache, callers share one resolution
//! (single flight: at most one Papita request in flight) instead of each asking; once a
//! usable key is known, an expired cache is refreshed in the background while the old key keeps
//! serving. After OpenAI rejects a key, it is resolved again once per rejected key, however many
//! requests saw the 401 at the same time. `peek` never waits at all (health). Expiry runs on
//! tokio's clock, so tests can pause and advance it.

use secrecy::ExposeSecret;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::task::TaskTracker;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use crate::config::Config;
use crate::domain::ApiKey;
use crate::metrics::CredentialLabels;
use crate::services::papita::PapitaClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Papita,
    LocalEnv,
    None,
}

impl CredentialSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Papita => "papita_api",
            Self::LocalEnv => "local_env",
            Self::None => "none",
        }
    }
}

/// The outcome of one resolution.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The key found, valid or not (reported, as a prefix, by `/api/openai/info`).
    pub key: Option<ApiKey>,
    pub source: CredentialSource,
    /// `Some` when the key is missing or unusable: the contract's reason text.
    pub problem: Option<&'static str>,
}

pub const KEY_MISSING: &str =
    "OPENAI_API_KEY not found in environment variables. Please set it in .env file.";
pub const KEY_INVALID: &str =
    "OPENAI_API_KEY appears to be invalid. OpenAI API keys start with 'sk-'.";

impl Credentials {
    /// The key to call OpenAI with, if there is a usable one.
    pub fn usable_key(&self) -> Option<&ApiKey> {
        if self.problem.is_none() {
            self.key.as_ref()
        } else {
            None
        }
    }
}

struct Cached {
    credentials: Arc<Credentials>,
    expires: Instant,
    /// The key whose rejection made this resolution: requests that saw the same 401 take this
    /// result instead of asking Papita again.
    after_rejecting: Option<ApiKey>,
}

pub struct CredentialProvider {
    papita: PapitaClient,
    env_key: Option<ApiKey>,
    requires_sk: bool,
    /// The host of a custom `OPENAI_BASE_URL`; `None` for OpenAI's own.
    custom_host: Option<String>,
    warned_papita_key_to_custom_host: AtomicBool,
    ttl: Duration,
    failure_ttl: Duration,
    cache: RwLock<Option<Cached>>,
    /// Held while a resolution runs: at most one Papita request in flight.
    resolving: tokio::sync::Mutex<()>,
    background_refresh: AtomicBool,
    resolutions: Family<CredentialLabels, Counter>,
    /// Where background refreshes run: the application's tracked tasks.
    tasks: TaskTracker,
}

impl CredentialProvider {
    pub fn new(
        config: &Config,
        papita: PapitaClient,
        resolutions: Family<CredentialLabels, Counter>,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            tasks,
            papita,
            env_key: config
                .openai
                .api_key
                .as_ref()
                .and_then(|k| ApiKey::parse(k.expose_secret())),
            requires_sk: config.openai.requires_sk_prefix(),
            custom_host: (!config.openai.requires_sk_prefix()).then(|| {
                reqwest::Url::parse(&config.openai.base_url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_else(|| config.openai.base_url.clone())
            }),
            warned_papita_key_to_custom_host: AtomicBool::new(false),
            ttl: config.credentials_ttl,
            failure_ttl: config.credentials_failure_ttl,
            cache: RwLock::new(None),
            resolving: tokio::sync::Mutex::new(()),
            background_refresh: AtomicBool::new(false),
            resolutions,
        }
    }

    /// The current credentials, resolving them if nothing usable is cached.
    pub async fn get(self: &Arc<Self>) -> Arc<Credentials> {
        match self.cached() {
            Some((creds, fresh)) if fresh => creds,
            Some((creds, _)) if creds.usable_key().is_some() => {
                // Stale but usable: answer now, refresh behind the caller's back.
                self.refresh_in_background();
                creds
            }
            _ => self.resolve_single_flight(None).await,
        }
    }

    /// What is cached, without waiting; starts a refresh when that is stale or missing.
    pub fn peek(self: &Arc<Self>) -> Option<Arc<Credentials>> {
        let cached = self.cached();
        if !matches!(cached, Some((_, true))) {
            self.refresh_in_background();
        }
        cached.map(|(creds, _)| creds)
    }

    /// OpenAI said 401 to `rejected`: forget it and resolve again (once per rejected key, however
    /// many requests saw the 401 at the same time).
    pub async fn after_rejection(self: &Arc<Self>, rejected: &ApiKey) -> Arc<Credentials> {
        self.resolve_single_flight(Some(rejected)).await
    }

    fn cached(&self) -> Option<(Arc<Credentials>, bool)> {
        let guard = self.cache.read().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .map(|c| (c.credentials.clone(), Instant::now() < c.expires))
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            this.resolve_single_flight(None).await;
            this.background_refresh.store(false, Ordering::Release);
        });
    }

    async fn resolve_single_flight(&self, rejected: Option<&ApiKey>) -> Arc<Credentials> {
        let _one_at_a_time = self.resolving.lock().await;
        // Whoever held the lock before us may have resolved already.
        if let Some(cached) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let fresh = Instant::now() < cached.expires;
            let answers_this_rejection = match rejected {
                None => true,
                // A different key is already cached, or this very rejection was resolved.
                Some(key) => {
                    cached.credentials.key.as_ref() != Some(key)
                        || cached.after_rejecting.as_ref() == Some(key)
                }
            };
            if fresh && answers_this_rejection {
                return cached.credentials.clone();
            }
        }
        let creds = Arc::new(self.resolve().await);
        // A key from Papita is kept for the full TTL; anything else is retried soon, so a Papita
        // that comes up (or gains a key) is noticed quickly.
        let ttl = if creds.source == CredentialSource::Papita {
            self.ttl
        } else {
            self.failure_ttl
        };
        let mut guard = self.cache.write().unwrap_or_else(|e| e.into_inner());
        *guard = Some(Cached {
            credentials: creds.clone(),
            expires: Instant::now() + ttl,
            after_rejecting: rejected.cloned(),
        });
        creds
    }

    async fn resolve(&self) -> Credentials {
        let (key, source) = match (&self.custom_host, &self.env_key) {
            // Another server with a key of its own: Papita's (OpenAI's) key is not needed.
            (Some(_), Some(env_key)) => (Some(env_key.clone()), CredentialSource::LocalEnv),
            _ => match self.papita.openai_key().await {
                Some(key) => (Some(key), CredentialSource::Papita),
                None => match &self.env_key {
                    Some(key) => (Some(key.clone()), CredentialSource::LocalEnv),
                    None => (None, CredentialSource::None),
                },
            },
        };
        if let (CredentialSource::Papita, Some(host)) = (source, &self.custom_host)
            && !self
                .warned_papita_key_to_custom_host
                .swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                host = %host,
                "the OpenAI key from Papita will be sent to {host} (OPENAI_BASE_URL is not OpenAI's); \
                 set OPENAI_API_KEY to that server's own key to keep Papita's key from it"
            );
        }
        let problem = match &key {
            None => Some(KEY_MISSING),
            Some(k) if self.requires_sk && !k.expose().starts_with("sk-") => Some(KEY_INVALID),
            Some(_) => None,
        };
        tracing::info!(source = source.as_str(), usable = problem.is_none(), key = ?key, "resolved OpenAI credentials");
        let result = match problem {
            None => "usable",
            Some(KEY_MISSING) => "missing",
            Some(_) => "invalid",
        };
        self.resolutions
            .get_or_create(&CredentialLabels {
                source: source.as_str(),
                result,
            })
            .inc();
        Credentials {
            key,
            source,
            problem,
        }
    }
}

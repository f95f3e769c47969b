//! Configuration: parsed once at start-up into typed values.
//!
//! Sources, highest priority first: the process environment, then a `.env` file (the working
//! directory's, or `--env-file`). The `.env` file is read into a map rather than into the
//! process environment, so loading it needs no `unsafe` `set_var` and tests can build a
//! `Config` from any map they like.

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use secrecy::SecretString;

use crate::domain::pricing::PriceTable;

/// The template's placeholder; counts as "no key" (contract §2).
pub const KEY_PLACEHOLDER: &str = "your_openai_api_key_here";
/// The longest time setting accepted, in seconds: larger values are typos, and would overflow
/// the clocks they are added to.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;
/// OpenAI's own endpoint; only with this base URL must keys start with `sk-` (contract §3).
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// One environment variable the service reads: the single list behind `--help`,
/// `env_template.txt` and `Docs/CONFIGURATION.md` (a test keeps the latter two in step).
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

pub const VARS: &[Var] = &[
    Var {
        name: "HOST",
        default: "0.0.0.0",
        help: "listen address",
    },
    Var {
        name: "PORT",
        default: "5000",
        help: "listen port",
    },
    Var {
        name: "OPENAI_API_KEY",
        default: "",
        help: "fallback OpenAI key when Papita has none (the template placeholder counts as unset)",
    },
    Var {
        name: "OPENAI_MODEL",
        default: "gpt-3.5-turbo",
        help: "default model",
    },
    Var {
        name: "OPENAI_BASE_URL",
        default: DEFAULT_OPENAI_BASE_URL,
        help: "any OpenAI-compatible server",
    },
    Var {
        name: "OPENAI_TIMEOUT_SECS",
        default: "120",
        help: "limit for a whole non-streamed answer, and for a stream's first token",
    },
    Var {
        name: "OPENAI_CONNECT_TIMEOUT_SECS",
        default: "10",
        help: "TCP/TLS connect timeout to the OpenAI server",
    },
    Var {
        name: "OPENAI_HTTP2",
        default: "auto",
        help: "HTTP/2 to the OpenAI server: auto (when TLS negotiates it, as OpenAI's does), always (also h2c on plain http://), never",
    },
    Var {
        name: "OPENAI_MAX_RETRIES",
        default: "2",
        help: "retries on 429 / 5xx / refused connections (0 disables)",
    },
    Var {
        name: "OPENAI_RETRY_BUDGET_SECS",
        default: "10",
        help: "total time retries may wait; a longer Retry-After is passed to the client instead",
    },
    Var {
        name: "OPENAI_STREAM_IDLE_TIMEOUT_SECS",
        default: "30",
        help: "a stream silent this long after its first token fails",
    },
    Var {
        name: "OPENAI_STREAM_MAX_SECS",
        default: "600",
        help: "hard limit on one streamed answer",
    },
    Var {
        name: "SSE_KEEPALIVE_SECS",
        default: "15",
        help: "a comment is sent on a silent stream this often (keeps proxies from closing it)",
    },
    Var {
        name: "SSE_WRITE_STALL_SECS",
        default: "30",
        help: "a client that takes no bytes of an answer this long is cut (its upstream call cancelled)",
    },
    Var {
        name: "PAPITA_API_URL",
        default: "http://localhost:3000",
        help: "Papita: credentials and usage records",
    },
    Var {
        name: "PAPITA_CREDENTIALS_TIMEOUT_MS",
        default: "2000",
        help: "timeout of the Papita credentials request",
    },
    Var {
        name: "PAPITA_USAGE_TIMEOUT_SECS",
        default: "5",
        help: "timeout of one Papita usage record request",
    },
    Var {
        name: "PAPITA_USAGE_QUEUE_CAPACITY",
        default: "10000",
        help: "usage records waiting in memory for Papita; more go to the spool",
    },
    Var {
        name: "PAPITA_USAGE_MAX_ATTEMPTS",
        default: "3",
        help: "attempts per usage record from memory (connection errors, 5xx, timeouts) before it is spooled",
    },
    Var {
        name: "PAPITA_USAGE_CONCURRENCY",
        default: "32",
        help: "usage records sent at once (lanes; one session's records stay in order)",
    },
    Var {
        name: "PAPITA_SPOOL_DIR",
        default: "",
        help: "durable spool of records Papita could not take yet [default: AL_CHAT_LOG_DIR/papita-spool]",
    },
    Var {
        name: "PAPITA_SPOOL_MAX_MB",
        default: "256",
        help: "spool size limit; only past it are usage records dropped (counted and logged)",
    },
    Var {
        name: "CREDENTIALS_CACHE_SECS",
        default: "300",
        help: "how long a resolved key is used before asking Papita again",
    },
    Var {
        name: "CREDENTIALS_FAILURE_CACHE_SECS",
        default: "5",
        help: "how long a resolution without a Papita key is kept",
    },
    Var {
        name: "AL_CHAT_LOG_DIR",
        default: "./SessionLog",
        help: "session log folder (created if missing)",
    },
    Var {
        name: "SESSION_MAX_TRACKED",
        default: "10000",
        help: "sessions remembered in memory (oldest forgotten first)",
    },
    Var {
        name: "SESSION_METRICS_MAX_BYTES",
        default: "65536",
        help: "largest metrics object a session stop may carry, serialized (413 past it)",
    },
    Var {
        name: "LOG_MIN_FREE_MB",
        default: "256",
        help: "below this much free space on the log folder's file system, session writes get 507",
    },
    Var {
        name: "SESSION_MAX_AGE_HOURS",
        default: "48",
        help: "sessions older than this are forgotten (their stop still works from the log)",
    },
    Var {
        name: "PRICING_FILE",
        default: "",
        help: "JSON price table replacing the built-in one",
    },
    Var {
        name: "OPENAI_ALLOWED_MODELS",
        default: "",
        help: "models a chat may ask for: names or prefix* patterns, comma-separated; * any [default: OPENAI_MODEL and the price table's models]",
    },
    Var {
        name: "RATE_LIMIT_CHAT_PER_MIN",
        default: "",
        help: "chats per minute per client (unset: no limit; recommended 60)",
    },
    Var {
        name: "RATE_LIMIT_TEST_PER_MIN",
        default: "",
        help: "GET /api/openai/test per minute per client (unset: no limit; recommended 2)",
    },
    Var {
        name: "RATE_LIMIT_SESSION_PER_MIN",
        default: "",
        help: "session starts and stops together per minute per client (unset: no limit; recommended 30)",
    },
    Var {
        name: "RATE_LIMIT_IPV6_PREFIX",
        default: "64",
        help: "IPv6 clients share their rate limits per network of this many bits (a /64 is one customer's)",
    },
    Var {
        name: "TRUSTED_PROXIES",
        default: "",
        help: "CIDRs of proxies whose X-Forwarded-For names the client (unset: none, the peer is the client)",
    },
    Var {
        name: "BUDGET_DAILY_USD",
        default: "",
        help: "spend per local day across all chats and tests, in USD (unset: no limit)",
    },
    Var {
        name: "BUDGET_DAILY_TOKENS",
        default: "",
        help: "tokens per local day across all chats and tests (unset: no limit)",
    },
    Var {
        name: "BUDGET_SESSION_TOKENS",
        default: "",
        help: "tokens per session per local day (unset: no limit)",
    },
    Var {
        name: "QUOTA_USER_DAILY_TOKENS",
        default: "",
        help: "tokens per signed-in username per local day (unset: no quota)",
    },
    Var {
        name: "QUOTA_GUEST_DAILY_TOKENS",
        default: "",
        help: "tokens per guest per local day; a guest is its client address, as for rate limits (unset: no quota)",
    },
    Var {
        name: "QUOTA_CLIENT_DAILY_TOKENS",
        default: "",
        help: "tokens per client address per local day, whoever it claims to be (unset: no quota)",
    },
    Var {
        name: "QUOTA_MAX_TRACKED",
        default: "100000",
        help: "users and addresses whose quota counters and daily usage are kept in memory (oldest forgotten first)",
    },
    Var {
        name: "AUTH_JWT_SECRET",
        default: "",
        help: "HS256 secret shared with the site: /api/chat and /api/session/* then need Authorization: Bearer <jwt> (unset: the body's username is taken unverified)",
    },
    Var {
        name: "AUTH_JWT_PUBLIC_KEY",
        default: "",
        help: "instead of a secret: the site's RS256 (RSA) or ES256 (P-256) public key, PEM text or a path to a .pem file",
    },
    Var {
        name: "OPENAI_MAX_OUTPUT_TOKENS",
        default: "",
        help: "the most tokens an answer may have, sent upstream with every call (unset: 1000 when a budget or quota is set, else nothing is sent, as in Flask)",
    },
    Var {
        name: "BUDGET_ESTIMATE_OUTPUT_TOKENS",
        default: "",
        help: "the former name of OPENAI_MAX_OUTPUT_TOKENS, still accepted",
    },
    Var {
        name: "OPENAI_OUTPUT_CAP_FIELD",
        default: "auto",
        help: "how the cap is sent: max_completion_tokens (OpenAI), max_tokens (older OpenAI-compatible servers), or auto (max_completion_tokens for openai.com and Azure, else max_tokens)",
    },
    Var {
        name: "OPENAI_FALLBACK_BASE_URL",
        default: "",
        help: "an upstream tried when the primary refuses, resets, times out before answering, answers 429 or 5xx (unset: no fallback)",
    },
    Var {
        name: "OPENAI_FALLBACK_API_KEY",
        default: "",
        help: "the fallback's own key; sent only to OPENAI_FALLBACK_BASE_URL",
    },
    Var {
        name: "OPENAI_FALLBACK_KIND",
        default: "openai",
        help: "openai (Authorization: Bearer, {base}/chat/completions) or azure (api-key header, {base}/openai/deployments/{deployment}/chat/completions)",
    },
    Var {
        name: "OPENAI_FALLBACK_API_VERSION",
        default: "2024-10-21",
        help: "Azure OpenAI's api-version query parameter (azure only)",
    },
    Var {
        name: "OPENAI_FALLBACK_MODEL_MAP",
        default: "",
        help: "which model or Azure deployment to ask the fallback for, e.g. gpt-4o=prod-4o,*=gpt-4o-mini (unset: the same name)",
    },
    Var {
        name: "UPSTREAMS_FILE",
        default: "",
        help: "a JSON list of fallbacks tried in order, each {name, base_url, api_key, kind, api_version, model_map}; replaces OPENAI_FALLBACK_*",
    },
    Var {
        name: "UPSTREAM_BREAKER_FAILURES",
        default: "5",
        help: "with fallbacks: failures in a row that open an upstream's circuit breaker (chats skip it)",
    },
    Var {
        name: "UPSTREAM_BREAKER_COOLDOWN_SECS",
        default: "30",
        help: "with fallbacks: how long an open breaker skips its upstream before one chat probes it",
    },
    Var {
        name: "OPENAI_MIN_OUTPUT_TOKENS",
        default: "64",
        help: "a chat is refused by a budget only when its prompt and this many answer tokens do not fit",
    },
    Var {
        name: "HISTORY_TRIM",
        default: "auto",
        help: "auto: when a conversation would pass the model's context window, drop its oldest turns until it fits (only where OpenAI would refuse it); off: send it whole",
    },
    Var {
        name: "MAX_INPUT_CHARS",
        default: "16777216",
        help: "characters of message + history + attachments per chat (413 past it)",
    },
    Var {
        name: "ADMIN_TOKEN",
        default: "",
        help: "when set, /api/openai/info and /api/openai/test need Authorization: Bearer <token>",
    },
    Var {
        name: "STATE_URL",
        default: "",
        help: "redis://host:port/db: sessions, usage, budgets and rate limits shared by replicas on Redis/Valkey; unset keeps them in this process",
    },
    Var {
        name: "STATE_PREFIX",
        default: "al-chat:",
        help: "prefix of every key this service writes in Redis",
    },
    Var {
        name: "STATE_UNAVAILABLE",
        default: "local",
        help: "while Redis is unreachable: local (budgets and rate limits per replica) or refuse (chats get 503)",
    },
    Var {
        name: "STATE_TIMEOUT_MS",
        default: "250",
        help: "longest wait for one Redis call; after a failure Redis is skipped until a probe sees it back",
    },
    Var {
        name: "REQUEST_BODY_LIMIT_BYTES",
        default: "16777216",
        help: "larger request bodies get 413",
    },
    Var {
        name: "REQUEST_TIMEOUT_SECS",
        default: "300",
        help: "limit for producing a response's head (streams then run on)",
    },
    Var {
        name: "HEADER_READ_TIMEOUT_SECS",
        default: "10",
        help: "a request head must arrive whole this soon after its first byte (slow clients are cut)",
    },
    Var {
        name: "BODY_READ_TIMEOUT_SECS",
        default: "120",
        help: "a request body must arrive this soon after its head (else 408)",
    },
    Var {
        name: "IDLE_TIMEOUT_SECS",
        default: "75",
        help: "a connection with no request in progress is closed after this (longer than nginx's 60 s keep-alive)",
    },
    Var {
        name: "MAX_CONNECTIONS",
        default: "auto",
        help: "open connections at most (more wait); auto: half the open-file limit left after a reserve for files and service connections (a tenth, at most 1,024)",
    },
    Var {
        name: "CORS_ALLOWED_ORIGINS",
        default: "",
        help: "comma-separated origins; empty allows any origin",
    },
    Var {
        name: "SHUTDOWN_GRACE_SECS",
        default: "30",
        help: "on SIGTERM/Ctrl-C, how long in-flight requests and the Papita drain may take, together",
    },
    Var {
        name: "METRICS_ENABLED",
        default: "true",
        help: "serve Prometheus metrics at GET /metrics (behind ADMIN_TOKEN when set); false also stops recording them",
    },
    Var {
        name: "LOG_FORMAT",
        default: "text",
        help: "text or json (one JSON object per line)",
    },
    Var {
        name: "RUST_LOG",
        default: "info",
        help: "log filter, e.g. debug or al_chat=debug,tower_http=info",
    },
    Var {
        name: "FLASK_ENV",
        default: "",
        help: "accepted and ignored (kept for the old deployment)",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// `OPENAI_API_KEY`, trimmed; `None` when unset, blank or the placeholder.
    pub api_key: Option<SecretString>,
    pub model: String,
    pub base_url: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    pub retry_budget: Duration,
    pub stream_idle_timeout: Duration,
    pub stream_max: Duration,
    pub sse_keepalive: Duration,
    /// A client that takes no bytes of an answer this long is cut (`SSE_WRITE_STALL_SECS`).
    pub write_stall: Duration,
    pub http2: Http2,
    /// `OPENAI_MAX_OUTPUT_TOKENS` (or its former name) as set; `Config::output_cap` adds the
    /// budgets' default.
    pub max_output_tokens: Option<u32>,
    pub cap_field: CapField,
    pub min_output_tokens: u32,
    /// Tried in order when the primary fails in a way another upstream can fix
    /// (`OPENAI_FALLBACK_*` or `UPSTREAMS_FILE`); empty: the one upstream, as before.
    pub fallbacks: Vec<FallbackSettings>,
    pub breaker: BreakerSettings,
}

/// A fallback upstream. Its key goes to its own base URL only.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FallbackSettings {
    pub name: String,
    pub base_url: String,
    /// `Debug` shows `[REDACTED]`.
    #[serde(default, deserialize_with = "secret")]
    pub api_key: Option<SecretString>,
    #[serde(default)]
    pub kind: ApiKind,
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub model_map: ModelMap,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    let key: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(key
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .map(SecretString::from))
}

/// How an upstream is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    /// `Authorization: Bearer`, `{base}/chat/completions` (OpenAI and compatible servers).
    #[default]
    OpenAi,
    /// `api-key`, `{base}/openai/deployments/{deployment}/chat/completions?api-version=...`.
    Azure,
}

/// `gpt-4o=prod-4o,*=gpt-4o-mini`: which model (or Azure deployment) to ask a fallback for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelMap(Vec<(String, String)>);

impl ModelMap {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (from, to) = item
                .split_once('=')
                .map(|(f, t)| (f.trim(), t.trim()))
                .filter(|(f, t)| !f.is_empty() && !t.is_empty())
                .ok_or_else(|| format!("{item:?} is not model=name"))?;
            pairs.push((from.to_string(), to.to_string()));
        }
        Ok(Self(pairs))
    }

    /// The name to ask for: the exact entry, else `*`'s, else the same name.
    pub fn map<'a>(&'a self, model: &'a str) -> &'a str {
        let find = |key: &str| {
            self.0
                .iter()
                .find(|(f, _)| f == key)
                .map(|(_, t)| t.as_str())
        };
        find(model).or_else(|| find("*")).unwrap_or(model)
    }
}

impl<'de> serde::Deserialize<'de> for ModelMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A circuit breaker per upstream (only with fallbacks: one upstream is always tried).
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown: Duration,
}

/// The request field that carries the output cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapField {
    MaxCompletionTokens,
    MaxTokens,
}

/// The cap sent when a budget is set and `OPENAI_MAX_OUTPUT_TOKENS` is not (the former
/// `BUDGET_ESTIMATE_OUTPUT_TOKENS` default).
pub const BUDGETED_OUTPUT_TOKENS: u32 = 1000;

/// `OPENAI_HTTP2`: whether chats share HTTP/2 connections to the upstream instead of holding one
/// HTTP/1.1 connection each while in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2 {
    /// When TLS's ALPN agrees on it (OpenAI does); plain `http://` stays HTTP/1.1.
    Auto,
    /// Always, with prior knowledge (h2c) on plain `http://`.
    Always,
    /// HTTP/1.1 only.
    Never,
}

impl OpenAiSettings {
    /// Keys must start with `sk-` only when talking to OpenAI itself.
    pub fn requires_sk_prefix(&self) -> bool {
        self.base_url.trim_end_matches('/') == DEFAULT_OPENAI_BASE_URL
    }
}

#[derive(Debug, Clone)]
pub struct PapitaSettings {
    pub url: String,
    pub credentials_timeout: Duration,
    pub usage_timeout: Duration,
    pub usage_queue_capacity: NonZeroUsize,
    pub usage_max_attempts: NonZeroU32,
    pub usage_concurrency: NonZeroUsize,
    /// `PAPITA_SPOOL_DIR`; `None`: `papita-spool` inside the session log folder.
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: u64,
}

/// Guardrails for a public endpoint (contract §12); all off or permissive by default.
#[derive(Debug, Clone)]
pub struct GuardrailSettings {
    /// `OPENAI_ALLOWED_MODELS` as written; `None`: the default list.
    pub allowed_models: Option<String>,
    pub rate: RateLimits,
    pub trusted_proxies: Vec<IpNet>,
    pub budget: BudgetLimits,
    pub max_input_chars: usize,
    /// `HISTORY_TRIM=auto`: conversations past the model's window lose their oldest turns.
    pub history_trim: bool,
    /// `Debug` shows `[REDACTED]`: a `Config` printed in a log or a panic never carries it.
    pub admin_token: Option<SecretString>,
    /// Users and addresses whose quota counters and usage are kept in memory.
    pub quota_max_tracked: usize,
    /// `AUTH_JWT_*`: chats and sessions need a token signed by the site.
    pub jwt: Option<JwtKey>,
}

/// Budgets (the company's money) and quotas (each visitor's fair share), reserved together.
#[derive(Debug, Clone, Copy, Default)]
pub struct BudgetLimits {
    pub daily_usd: Option<f64>,
    pub daily_tokens: Option<u64>,
    pub session_tokens: Option<u64>,
    pub quota: QuotaLimits,
}

/// Daily token quotas (`QUOTA_*_DAILY_TOKENS`); `None`: no quota.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuotaLimits {
    /// Per signed-in username.
    pub user: Option<u64>,
    /// Per guest, keyed by client address.
    pub guest: Option<u64>,
    /// Per client address, whoever it claims to be.
    pub client: Option<u64>,
}

impl QuotaLimits {
    pub fn any(&self) -> bool {
        self.user.is_some() || self.guest.is_some() || self.client.is_some()
    }
}

impl BudgetLimits {
    /// Any budget or quota: every call is then reserved, and carries an output cap.
    pub fn any(&self) -> bool {
        self.any_budget() || self.quota.any()
    }

    /// Any budget (the company's money; `budget` in `/api/openai/usage`).
    pub fn any_budget(&self) -> bool {
        self.daily_usd.is_some() || self.daily_tokens.is_some() || self.session_tokens.is_some()
    }
}

/// The key that verifies the site's tokens (`AUTH_JWT_*`); `Debug` never shows a secret.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// `AUTH_JWT_SECRET`: HS256.
    Secret(SecretString),
    /// `AUTH_JWT_PUBLIC_KEY`: RS256 or ES256, by the key's kind (PEM text).
    PublicPem(String),
}

/// Per-client rate limits (`RATE_LIMIT_*`); `None`: no limit.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    pub chat: Option<NonZeroU32>,
    pub test: Option<NonZeroU32>,
    /// Session start and stop together.
    pub session: Option<NonZeroU32>,
    /// IPv6 clients are keyed by their network of this many bits.
    pub ipv6_prefix: u8,
}

/// `redis://user:secret@host:6379/0` → `redis://host:6379/0`: a URL fit for logs and errors.
pub fn without_credentials(url: &str) -> String {
    let Some(scheme) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    // Only the authority (up to the path, query or fragment) can hold credentials: an `@` in a
    // path is not one.
    let authority_end = url[scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme + i);
    match url[scheme..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme], &url[scheme + at + 1..]),
        None => url.to_string(),
    }
}

/// What budgets and rate limits do while the shared state is unreachable (`STATE_UNAVAILABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenStateUnavailable {
    /// Enforce them per replica (the website keeps working).
    Local,
    /// Refuse chats (503) rather than enforce them per replica.
    Refuse,
}

/// Shared state on Redis (`STATE_*`); `None` in `Config::state`: in-process.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// May hold Redis's password (`redis://:pw@host`): secret, shown only without credentials.
    pub url: SecretString,
    pub prefix: String,
    pub when_unavailable: WhenStateUnavailable,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub guardrails: GuardrailSettings,
    /// `STATE_URL` and its settings; `None`: state in this process.
    pub redis: Option<RedisSettings>,
    pub host: String,
    pub port: u16,
    pub openai: OpenAiSettings,
    pub papita: PapitaSettings,
    pub credentials_ttl: Duration,
    pub credentials_failure_ttl: Duration,
    pub log_dir: PathBuf,
    pub sessions_max: NonZeroUsize,
    pub sessions_max_age: Duration,
    /// `SESSION_METRICS_MAX_BYTES`: a stop's `metrics`, serialized, at most this long.
    pub session_metrics_max_bytes: NonZeroUsize,
    /// `LOG_MIN_FREE_MB` in bytes: below this free on the log folder's file system, session
    /// writes are refused (507) and the service is not ready.
    pub log_min_free_bytes: u64,
    /// `PRICING_FILE`, else the built-in table; checked at start-up like every other setting.
    pub pricing: PriceTable,
    pub body_limit: NonZeroUsize,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: `auto`, half the process's open-file limit (each chat may hold an upstream
    /// connection too).
    pub max_connections: Option<NonZeroUsize>,
    /// `None`: any origin.
    pub cors_origins: Option<Vec<String>>,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub metrics_enabled: bool,
    pub log_filter: String,
    /// The `.env` file consulted (reported by `/api/openai/info`).
    pub env_file: PathBuf,
    pub env_file_exists: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read env file {path}: {reason}")]
    EnvFile { path: PathBuf, reason: String },
}

impl Config {
    /// The output cap sent with every call: `OPENAI_MAX_OUTPUT_TOKENS`, else 1000 when a budget
    /// is set (a reservation must bound the answer), else none (as Flask sent none).
    pub fn output_cap(&self) -> Option<u32> {
        // `budget.any()` counts the quotas too: "with any budget or quota set" (contract §13).
        self.openai.max_output_tokens.or(self
            .guardrails
            .budget
            .any()
            .then_some(BUDGETED_OUTPUT_TOKENS))
    }

    /// Reads the process environment and the `.env` file (`env_file`, else `./.env`).
    pub fn load(env_file: Option<&Path>) -> Result<Self, ConfigError> {
        let explicit = env_file.is_some();
        let path = env_file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".env"));
        let path = std::path::absolute(&path).unwrap_or(path);
        let file_vars = read_env_file(&path, explicit)?;
        let exists = path.is_file();
        Self::from_sources(|name| std::env::var(name).ok(), &file_vars, path, exists)
    }

    /// Builds a configuration from a variable lookup (the environment) and the `.env` file's
    /// pairs; the lookup wins. Blank values count as unset.
    pub fn from_sources(
        env: impl Fn(&str) -> Option<String>,
        file_vars: &HashMap<String, String>,
        env_file: PathBuf,
        env_file_exists: bool,
    ) -> Result<Self, ConfigError> {
        let src = Source {
            env: &env,
            file: file_vars,
        };
        Ok(Self {
            guardrails: guardrail_settings(&src)?,
            redis: redis_settings(&src)?,
            host: src.string("HOST"),
            port: src.parse("PORT")?,
            openai: openai_settings(&src)?,
            papita: papita_settings(&src)?,
            credentials_ttl: src.secs("CREDENTIALS_CACHE_SECS")?,
            credentials_failure_ttl: src.secs("CREDENTIALS_FAILURE_CACHE_SECS")?,
            log_dir: PathBuf::from(src.string("AL_CHAT_LOG_DIR")),
            sessions_max: src.positive("SESSION_MAX_TRACKED")?,
            sessions_max_age: src.hours("SESSION_MAX_AGE_HOURS")?,
            session_metrics_max_bytes: src.positive("SESSION_METRICS_MAX_BYTES")?,
            log_min_free_bytes: src
                .parse::<u64>("LOG_MIN_FREE_MB")?
                .saturating_mul(1024 * 1024),
            pricing: pricing(&src)?,
            body_limit: src.positive("REQUEST_BODY_LIMIT_BYTES")?,
            request_timeout: src.secs("REQUEST_TIMEOUT_SECS")?,
            header_read_timeout: src.secs("HEADER_READ_TIMEOUT_SECS")?,
            body_read_timeout: src.secs("BODY_READ_TIMEOUT_SECS")?,
            idle_timeout: src.secs("IDLE_TIMEOUT_SECS")?,
            max_connections: match src.string("MAX_CONNECTIONS").as_str() {
                "auto" => None,
                _ => Some(src.positive("MAX_CONNECTIONS")?),
            },
            cors_origins: src
                .list("CORS_ALLOWED_ORIGINS")
                .filter(|list| !list.is_empty() && !list.iter().any(|o| o == "*")),
            shutdown_grace: src.secs("SHUTDOWN_GRACE_SECS")?,
            log_format: src.choice(
                "LOG_FORMAT",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            metrics_enabled: src.choice(
                "METRICS_ENABLED",
                &[
                    ("true", true),
                    ("1", true),
                    ("yes", true),
                    ("on", true),
                    ("false", false),
                    ("0", false),
                    ("no", false),
                    ("off", false),
                ],
            )?,
            log_filter: src.string("RUST_LOG"),
            env_file,
            env_file_exists,
        })
    }

    /// Defaults only (no environment, no file): the starting point for tests.
    pub fn defaults() -> Self {
        Self::from_sources(|_| None, &HashMap::new(), PathBuf::from(".env"), false)
            .expect("built-in defaults are valid")
    }

    /// `--help` text listing every variable with its default.
    pub fn help_text() -> String {
        let mut out =
            String::from("Environment variables (also read from .env; the environment wins):\n");
        for var in VARS {
            let default = if var.default.is_empty() {
                "unset"
            } else {
                var.default
            };
            out.push_str(&format!(
                "  {:<34} {} [default: {}]\n",
                var.name, var.help, default
            ));
        }
        out
    }
}

fn read_env_file(path: &Path, explicit: bool) -> Result<HashMap<String, String>, ConfigError> {
    let env_err = |reason: String| ConfigError::EnvFile {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        // A missing default `.env` is normal; a missing `--env-file` is a mistake.
        return if explicit {
            Err(env_err("no such file".into()))
        } else {
            Ok(HashMap::new())
        };
    }
    let iter = dotenvy::from_path_iter(path).map_err(|e| env_err(e.to_string()))?;
    iter.map(|item| item.map_err(|e| env_err(e.to_string())))
        .collect()
}

/// `OPENAI_*` and the stream settings.
fn openai_settings(src: &Source) -> Result<OpenAiSettings, ConfigError> {
    Ok(OpenAiSettings {
        api_key: src
            .raw("OPENAI_API_KEY")
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty() && k != KEY_PLACEHOLDER)
            .map(SecretString::from),
        model: src.string("OPENAI_MODEL"),
        base_url: src.http_url("OPENAI_BASE_URL")?,
        timeout: src.secs("OPENAI_TIMEOUT_SECS")?,
        connect_timeout: src.secs("OPENAI_CONNECT_TIMEOUT_SECS")?,
        max_retries: src.parse("OPENAI_MAX_RETRIES")?,
        retry_budget: src.secs("OPENAI_RETRY_BUDGET_SECS")?,
        stream_idle_timeout: src.secs("OPENAI_STREAM_IDLE_TIMEOUT_SECS")?,
        stream_max: src.secs("OPENAI_STREAM_MAX_SECS")?,
        sse_keepalive: src.secs("SSE_KEEPALIVE_SECS")?,
        write_stall: src.secs("SSE_WRITE_STALL_SECS")?,
        http2: src.choice(
            "OPENAI_HTTP2",
            &[
                ("auto", Http2::Auto),
                ("always", Http2::Always),
                ("never", Http2::Never),
            ],
        )?,
        max_output_tokens: match src.raw("OPENAI_MAX_OUTPUT_TOKENS") {
            Some(_) => src.optional::<NonZeroU32>("OPENAI_MAX_OUTPUT_TOKENS")?,
            None => src.optional::<NonZeroU32>("BUDGET_ESTIMATE_OUTPUT_TOKENS")?,
        }
        .map(NonZeroU32::get),
        cap_field: match src.choice(
            "OPENAI_OUTPUT_CAP_FIELD",
            &[
                ("auto", None),
                ("max_completion_tokens", Some(CapField::MaxCompletionTokens)),
                ("max_tokens", Some(CapField::MaxTokens)),
            ],
        )? {
            Some(field) => field,
            None => CapField::for_base_url(&src.http_url("OPENAI_BASE_URL")?),
        },
        min_output_tokens: src
            .positive::<NonZeroU32>("OPENAI_MIN_OUTPUT_TOKENS")?
            .get(),
        fallbacks: fallbacks(src)?,
        breaker: BreakerSettings {
            failures: src
                .positive::<NonZeroU32>("UPSTREAM_BREAKER_FAILURES")?
                .get(),
            cooldown: src.secs("UPSTREAM_BREAKER_COOLDOWN_SECS")?,
        },
    })
}

/// `UPSTREAMS_FILE`, else the one `OPENAI_FALLBACK_*`, else none.
fn fallbacks(src: &Source) -> Result<Vec<FallbackSettings>, ConfigError> {
    let list = match src.raw("UPSTREAMS_FILE") {
        Some(path) => {
            let text = std::fs::read_to_string(path.trim())
                .map_err(|e| invalid("UPSTREAMS_FILE", &path, &e.to_string()))?;
            serde_json::from_str::<Vec<FallbackSettings>>(&text).map_err(|e| {
                invalid(
                    "UPSTREAMS_FILE",
                    &path,
                    &format!("expected a JSON list of {{name, base_url, api_key, kind, api_version, model_map}}: {e}"),
                )
            })?
        }
        None => match src.raw("OPENAI_FALLBACK_BASE_URL") {
            None => Vec::new(),
            Some(_) => vec![FallbackSettings {
                name: "fallback".into(),
                base_url: src.http_url("OPENAI_FALLBACK_BASE_URL")?,
                api_key: src
                    .raw("OPENAI_FALLBACK_API_KEY")
                    .map(|k| SecretString::from(k.trim())),
                kind: src.choice(
                    "OPENAI_FALLBACK_KIND",
                    &[("openai", ApiKind::OpenAi), ("azure", ApiKind::Azure)],
                )?,
                api_version: Some(src.string("OPENAI_FALLBACK_API_VERSION")),
                model_map: ModelMap::parse(&src.string("OPENAI_FALLBACK_MODEL_MAP")).map_err(
                    |e| {
                        invalid(
                            "OPENAI_FALLBACK_MODEL_MAP",
                            &src.string("OPENAI_FALLBACK_MODEL_MAP"),
                            &e,
                        )
                    },
                )?,
            }],
        },
    };
    for fallback in &list {
        check_http_url("UPSTREAMS_FILE", &fallback.base_url)?;
    }
    Ok(list
        .into_iter()
        .map(|mut f| {
            f.base_url = f.base_url.trim_end_matches('/').to_string();
            if f.kind == ApiKind::Azure && f.api_version.is_none() {
                f.api_version = Some(default_of("OPENAI_FALLBACK_API_VERSION").into());
            }
            f
        })
        .collect())
}

impl CapField {
    /// OpenAI and Azure OpenAI take `max_completion_tokens` (and reasoning models only that);
    /// other OpenAI-compatible servers (vLLM, llama.cpp, older gateways) know `max_tokens`.
    fn for_base_url(url: &str) -> Self {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        if host.ends_with("openai.com") || host.ends_with("openai.azure.com") {
            Self::MaxCompletionTokens
        } else {
            Self::MaxTokens
        }
    }
}

/// `PAPITA_*`: credentials and usage records.
fn papita_settings(src: &Source) -> Result<PapitaSettings, ConfigError> {
    Ok(PapitaSettings {
        url: src.http_url("PAPITA_API_URL")?,
        credentials_timeout: Duration::from_millis(
            src.positive::<NonZeroU64>("PAPITA_CREDENTIALS_TIMEOUT_MS")?
                .get(),
        ),
        usage_timeout: src.secs("PAPITA_USAGE_TIMEOUT_SECS")?,
        usage_queue_capacity: src.positive("PAPITA_USAGE_QUEUE_CAPACITY")?,
        usage_max_attempts: src.positive("PAPITA_USAGE_MAX_ATTEMPTS")?,
        usage_concurrency: src.positive("PAPITA_USAGE_CONCURRENCY")?,
        spool_dir: src.raw("PAPITA_SPOOL_DIR").map(PathBuf::from),
        spool_max_bytes: src
            .positive::<NonZeroU64>("PAPITA_SPOOL_MAX_MB")?
            .get()
            .checked_mul(1024 * 1024)
            .ok_or_else(|| {
                invalid(
                    "PAPITA_SPOOL_MAX_MB",
                    &src.string("PAPITA_SPOOL_MAX_MB"),
                    "too large",
                )
            })?,
    })
}

/// The guardrails (contract §12): models, rate limits, proxies, budgets, input size, admin token.
fn guardrail_settings(src: &Source) -> Result<GuardrailSettings, ConfigError> {
    let trusted_proxies = src
        .list("TRUSTED_PROXIES")
        .unwrap_or_default()
        .iter()
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        "TRUSTED_PROXIES",
                        p,
                        "expected CIDRs like 10.0.0.0/8 or addresses",
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(GuardrailSettings {
        allowed_models: src
            .raw("OPENAI_ALLOWED_MODELS")
            .map(|v| v.trim().to_string()),
        rate: RateLimits {
            chat: src.optional("RATE_LIMIT_CHAT_PER_MIN")?,
            test: src.optional("RATE_LIMIT_TEST_PER_MIN")?,
            session: src.optional("RATE_LIMIT_SESSION_PER_MIN")?,
            ipv6_prefix: match src.parse::<u8>("RATE_LIMIT_IPV6_PREFIX")? {
                bits @ 0..=128 => bits,
                bits => {
                    return Err(invalid(
                        "RATE_LIMIT_IPV6_PREFIX",
                        &bits.to_string(),
                        "expected a prefix length from 0 to 128",
                    ));
                }
            },
        },
        trusted_proxies,
        budget: BudgetLimits {
            daily_usd: src.optional_usd("BUDGET_DAILY_USD")?,
            daily_tokens: src
                .optional::<NonZeroU64>("BUDGET_DAILY_TOKENS")?
                .map(NonZeroU64::get),
            session_tokens: src
                .optional::<NonZeroU64>("BUDGET_SESSION_TOKENS")?
                .map(NonZeroU64::get),
            quota: QuotaLimits {
                user: src
                    .optional::<NonZeroU64>("QUOTA_USER_DAILY_TOKENS")?
                    .map(NonZeroU64::get),
                guest: src
                    .optional::<NonZeroU64>("QUOTA_GUEST_DAILY_TOKENS")?
                    .map(NonZeroU64::get),
                client: src
                    .optional::<NonZeroU64>("QUOTA_CLIENT_DAILY_TOKENS")?
                    .map(NonZeroU64::get),
            },
        },
        quota_max_tracked: src.positive::<NonZeroUsize>("QUOTA_MAX_TRACKED")?.get(),
        jwt: jwt_key(src)?,
        max_input_chars: src.positive::<NonZeroUsize>("MAX_INPUT_CHARS")?.get(),
        history_trim: src.choice("HISTORY_TRIM", &[("auto", true), ("off", false)])?,
        admin_token: src.raw("ADMIN_TOKEN").map(|t| SecretString::from(t.trim())),
    })
}

/// `AUTH_JWT_SECRET` or `AUTH_JWT_PUBLIC_KEY` (not both), checked here: a key that cannot verify
/// anything stops the start, not every chat.
fn jwt_key(src: &Source) -> Result<Option<JwtKey>, ConfigError> {
    let secret = src.raw("AUTH_JWT_SECRET");
    let public = src.raw("AUTH_JWT_PUBLIC_KEY").map(|k| k.trim().to_string());
    let key = match (secret, public) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "AUTH_JWT_PUBLIC_KEY",
                "(set)",
                "set AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY, not both",
            ));
        }
        (Some(secret), None) => {
            if secret.len() < 32 {
                return Err(invalid(
                    "AUTH_JWT_SECRET",
                    "[REDACTED]",
                    "an HS256 secret needs at least 32 bytes (openssl rand -base64 48)",
                ));
            }
            JwtKey::Secret(SecretString::from(secret))
        }
        (None, Some(public)) if public.starts_with("-----BEGIN") => JwtKey::PublicPem(public),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(pem) => JwtKey::PublicPem(pem),
            Err(e) => {
                return Err(invalid(
                    "AUTH_JWT_PUBLIC_KEY",
                    &path,
                    &format!("neither PEM text nor a readable file: {e}"),
                ));
            }
        },
    };
    crate::services::identity::Verifier::new(&key)
        .map_err(|reason| invalid(jwt_setting(&key), "[REDACTED]", &reason))?;
    Ok(Some(key))
}

fn jwt_setting(key: &JwtKey) -> &'static str {
    match key {
        JwtKey::Secret(_) => "AUTH_JWT_SECRET",
        JwtKey::PublicPem(_) => "AUTH_JWT_PUBLIC_KEY",
    }
}

/// `STATE_URL` and its settings; `None` when unset. Errors name the URL without its password.
fn redis_settings(src: &Source) -> Result<Option<RedisSettings>, ConfigError> {
    let Some(url) = src.raw("STATE_URL").map(|u| u.trim().to_string()) else {
        return Ok(None);
    };
    let shown = without_credentials(&url);
    // No TLS client is built in: rediss:// is refused here, not at the first call.
    if url.starts_with("rediss://") || url.starts_with("valkeys://") {
        return Err(invalid(
            "STATE_URL",
            &shown,
            "TLS to Redis is not built in; use redis:// on a private network, or a TLS sidecar",
        ));
    }
    const SCHEMES: &[&str] = &[
        "redis://",
        "valkey://",
        "redis+unix://",
        "valkey+unix://",
        "unix://",
    ];
    if !SCHEMES.iter().any(|s| url.starts_with(s)) {
        return Err(invalid(
            "STATE_URL",
            &shown,
            "expected redis://host:port/db",
        ));
    }
    Ok(Some(RedisSettings {
        url: url.into(),
        prefix: src.string("STATE_PREFIX"),
        when_unavailable: src.choice(
            "STATE_UNAVAILABLE",
            &[
                ("local", WhenStateUnavailable::Local),
                ("refuse", WhenStateUnavailable::Refuse),
            ],
        )?,
        timeout: Duration::from_millis(src.positive::<NonZeroU64>("STATE_TIMEOUT_MS")?.get()),
    }))
}

/// `PRICING_FILE`, else the built-in price table; checked at start-up like every other setting.
fn pricing(src: &Source) -> Result<PriceTable, ConfigError> {
    PriceTable::load(src.raw("PRICING_FILE").map(PathBuf::from).as_deref())
        .map_err(|e| invalid("PRICING_FILE", &src.string("PRICING_FILE"), e.reason()))
}

struct Source<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    file: &'a HashMap<String, String>,
}

impl Source<'_> {
    /// The variable's value if set and not blank: environment first, then the file.
    fn raw(&self, name: &str) -> Option<String> {
        (self.env)(name)
            .filter(|v| !v.trim().is_empty())
            .or_else(|| {
                self.file
                    .get(name)
                    .filter(|v| !v.trim().is_empty())
                    .cloned()
            })
    }

    /// One of `options` (compared without case), e.g. `text`/`json`; the error lists them.
    fn choice<T: Copy>(&self, name: &'static str, options: &[(&str, T)]) -> Result<T, ConfigError> {
        let value = self.string(name).to_ascii_lowercase();
        options
            .iter()
            .find(|(text, _)| *text == value)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(text, _)| *text).collect();
                let (last, rest) = names.split_last().expect("options are listed");
                let expected = if rest.is_empty() {
                    format!("expected {last}")
                } else {
                    format!("expected {} or {last}", rest.join(", "))
                };
                invalid(name, &value, &expected)
            })
    }

    /// A comma-separated list, items trimmed and blanks dropped; `None` when unset.
    fn list(&self, name: &'static str) -> Option<Vec<String>> {
        self.raw(name).map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(String::from)
                .collect()
        })
    }

    /// An `http://` or `https://` URL with a host, without its trailing `/`.
    fn http_url(&self, name: &'static str) -> Result<String, ConfigError> {
        let url = self.string(name).trim_end_matches('/').to_string();
        check_http_url(name, &url)?;
        Ok(url)
    }

    fn string(&self, name: &'static str) -> String {
        self.raw(name)
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| default_of(name).to_string())
    }

    fn parse<T: FromStr>(&self, name: &'static str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.string(name);
        value
            .parse()
            .map_err(|e: T::Err| invalid(name, &value, &e.to_string()))
    }

    /// A whole number greater than 0 that fits `T` (`NonZeroU32`, `NonZeroUsize`, ...):
    /// `4294967296` for a `u32` is an error, never a silent wrap to 0.
    fn positive<T: TryFrom<NonZeroU64>>(&self, name: &'static str) -> Result<T, ConfigError> {
        let value = self.string(name);
        let n: u64 = value.parse().map_err(|e: std::num::ParseIntError| {
            invalid(name, &value, &format!("expected a whole number ({e})"))
        })?;
        let n = NonZeroU64::new(n).ok_or_else(|| invalid(name, "0", "must be greater than 0"))?;
        T::try_from(n).map_err(|_| invalid(name, &value, "too large"))
    }

    /// Unset (or blank) is `None`; otherwise as `positive`.
    fn optional<T: TryFrom<NonZeroU64>>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.raw(name) {
            None => Ok(None),
            Some(_) => self.positive(name).map(Some),
        }
    }

    fn optional_usd(&self, name: &'static str) -> Result<Option<f64>, ConfigError> {
        let Some(value) = self.raw(name) else {
            return Ok(None);
        };
        match value.trim().parse::<f64>() {
            Ok(usd) if usd.is_finite() && usd > 0.0 => Ok(Some(usd)),
            _ => Err(invalid(
                name,
                &value,
                "expected a positive amount of US dollars, e.g. 5.00",
            )),
        }
    }

    fn secs(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let value = self.string(name);
        match value.parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s <= MAX_SECS => Ok(Duration::from_secs_f64(s)),
            _ => Err(invalid(
                name,
                &value,
                "expected a positive number of seconds, at most a year",
            )),
        }
    }

    fn hours(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let hours = self.positive::<NonZeroU64>(name)?.get();
        hours
            .checked_mul(3600)
            .filter(|s| *s as f64 <= MAX_SECS * 100.0)
            .map(Duration::from_secs)
            .ok_or_else(|| invalid(name, &hours.to_string(), "too large"))
    }
}

fn check_http_url(name: &'static str, value: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(()),
        _ => Err(invalid(name, value, "expected an http:// or https:// URL")),
    }
}

/// The default from `VARS`. A name missing there is a programming error, caught by every test
/// that builds a `Config` (all of them do), never a silent `""`.
fn default_of(name: &str) -> &'static str {
    VARS.iter()
        .find(|v| v.name == name)
        .map(|v| v.default)
        .unwrap_or_else(|| panic!("{name} is read but not listed in config::VARS"))
}

fn invalid(name: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(env: &[(&str, &str)], file: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(|k| env.get(k).cloned(), &file, PathBuf::from(".env"), false)
    }

    #[test]
    fn the_cap_field_follows_the_base_url() {
        assert_eq!(
            CapField::for_base_url(DEFAULT_OPENAI_BASE_URL),
            CapField::MaxCompletionTokens
        );
        assert_eq!(
            CapField::for_base_url("https://my-resource.openai.azure.com/openai/v1"),
            CapField::MaxCompletionTokens
        );
        assert_eq!(
            CapField::for_base_url("http://127.0.0.1:8000/v1"),
            CapField::MaxTokens
        );
    }

    #[test]
    fn the_output_cap_takes_its_former_name_and_a_budget_default() {
        let none = build(&[], &[]).unwrap();
        assert_eq!(
            none.output_cap(),
            None,
            "no budget, no cap: nothing is sent"
        );
        let budgeted = build(&[("BUDGET_DAILY_TOKENS", "5000")], &[]).unwrap();
        assert_eq!(budgeted.output_cap(), Some(BUDGETED_OUTPUT_TOKENS));
        // "With any budget or quota set, every upstream call carries an output cap."
        for quota in [
            "QUOTA_USER_DAILY_TOKENS",
            "QUOTA_GUEST_DAILY_TOKENS",
            "QUOTA_CLIENT_DAILY_TOKENS",
        ] {
            let quoted = build(&[(quota, "5000")], &[]).unwrap();
            assert_eq!(quoted.output_cap(), Some(BUDGETED_OUTPUT_TOKENS), "{quota}");
            assert!(build(&[(quota, "0")], &[]).is_err(), "{quota}=0");
        }
        let former = build(&[("BUDGET_ESTIMATE_OUTPUT_TOKENS", "77")], &[]).unwrap();
        assert_eq!(former.output_cap(), Some(77));
        let both = build(
            &[
                ("BUDGET_ESTIMATE_OUTPUT_TOKENS", "77"),
                ("OPENAI_MAX_OUTPUT_TOKENS", "88"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(both.output_cap(), Some(88), "the new name wins");
        assert!(build(&[("OPENAI_MAX_OUTPUT_TOKENS", "0")], &[]).is_err());
        assert!(build(&[("HISTORY_TRIM", "sometimes")], &[]).is_err());
        assert!(
            !build(&[("HISTORY_TRIM", "OFF")], &[])
                .unwrap()
                .guardrails
                .history_trim
        );
    }

    #[test]
    fn fallbacks_come_from_the_environment_or_a_file() {
        assert!(build(&[], &[]).unwrap().openai.fallbacks.is_empty());
        let one = build(
            &[
                (
                    "OPENAI_FALLBACK_BASE_URL",
                    "https://example.openai.azure.com/",
                ),
                ("OPENAI_FALLBACK_API_KEY", "azure-secret-key"),
                ("OPENAI_FALLBACK_KIND", "azure"),
                ("OPENAI_FALLBACK_MODEL_MAP", "gpt-4o=prod-4o, *=mini"),
            ],
            &[],
        )
        .unwrap();
        let f = &one.openai.fallbacks[0];
        assert_eq!(f.base_url, "https://example.openai.azure.com");
        assert_eq!(f.kind, ApiKind::Azure);
        assert_eq!(f.api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(f.model_map.map("gpt-4o"), "prod-4o");
        assert_eq!(f.model_map.map("gpt-4.1"), "mini");
        assert!(
            !format!("{one:?}").contains("azure-secret-key"),
            "Debug hides the key"
        );
        assert!(build(&[("OPENAI_FALLBACK_BASE_URL", "ftp://x")], &[]).is_err());
        assert!(
            build(
                &[
                    ("OPENAI_FALLBACK_BASE_URL", "http://x"),
                    ("OPENAI_FALLBACK_MODEL_MAP", "gpt-4o")
                ],
                &[]
            )
            .is_err()
        );

        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            br#"[{"name": "local", "base_url": "http://127.0.0.1:8000/v1"},
                 {"name": "azure", "base_url": "https://a.openai.azure.com", "api_key": "k", "kind": "azure", "model_map": "*=dep"}]"#,
        )
        .unwrap();
        let path = file.path().display().to_string();
        let listed = build(&[("UPSTREAMS_FILE", &path)], &[]).unwrap();
        let names: Vec<&str> = listed
            .openai
            .fallbacks
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["local", "azure"]);
        assert_eq!(
            listed.openai.fallbacks[1].api_version.as_deref(),
            Some("2024-10-21")
        );
        assert!(listed.openai.fallbacks[0].api_key.is_none());
    }

    #[test]
    fn openai_http2_takes_auto_always_or_never() {
        assert_eq!(build(&[], &[]).unwrap().openai.http2, Http2::Auto);
        let always = build(&[("OPENAI_HTTP2", "Always")], &[]).unwrap();
        assert_eq!(always.openai.http2, Http2::Always);
        let e = build(&[("OPENAI_HTTP2", "h3")], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("OPENAI_HTTP2"), "{e}");
    }

    #[test]
    fn state_url_is_checked_and_its_password_never_echoed() {
        assert!(
            build(&[], &[]).unwrap().redis.is_none(),
            "unset: in process"
        );
        let state = build(&[("STATE_URL", "redis://cache:6379/2")], &[])
            .unwrap()
            .redis
            .unwrap();
        assert_eq!(state.prefix, "al-chat:");
        assert_eq!(state.when_unavailable, WhenStateUnavailable::Local);
        assert_eq!(state.timeout, Duration::from_millis(250));
        for bad in ["http://:hunter2@cache:6379", "rediss://:hunter2@cache:6379"] {
            let e = build(&[("STATE_URL", bad)], &[]).unwrap_err().to_string();
            assert!(e.contains("STATE_URL") && !e.contains("hunter2"), "{e}");
        }
        let e = build(
            &[
                ("STATE_URL", "redis://cache"),
                ("STATE_UNAVAILABLE", "maybe"),
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("STATE_UNAVAILABLE"), "{e}");
    }

    #[test]
    fn every_variable_is_documented_in_the_template_and_the_docs() {
        let template = include_str!("../env_template.txt");
        let docs = include_str!("../Docs/CONFIGURATION.md");
        for var in VARS {
            let line = format!(
                "{}={}",
                var.name,
                if var.name == "OPENAI_API_KEY" {
                    KEY_PLACEHOLDER
                } else {
                    var.default
                }
            );
            assert!(
                template.lines().any(|l| l == line),
                "env_template.txt lacks {line}"
            );
            assert!(
                docs.contains(&format!("`{}`", var.name)),
                "Docs/CONFIGURATION.md lacks {}",
                var.name
            );
        }
    }

    #[test]
    fn debug_output_of_the_whole_config_holds_no_secret() {
        let c = build(
            &[
                ("OPENAI_API_KEY", "sk-live-SECRET-0123456789abcdef"),
                ("ADMIN_TOKEN", "admin-SECRET-token"),
                ("STATE_URL", "redis://:redis-SECRET-pw@cache:6379/0"),
            ],
            &[],
        )
        .unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(
            shown.contains("REDACTED"),
            "the secrets are there, redacted"
        );
        use secrecy::ExposeSecret;
        assert_eq!(
            c.openai.api_key.as_ref().unwrap().expose_secret(),
            "sk-live-SECRET-0123456789abcdef"
        );
    }

    #[test]
    fn urls_are_shown_without_their_credentials() {
        for (url, shown) in [
            ("http://user:pw@papita:3000", "http://papita:3000"),
            ("http://user:p@ss@papita:3000/x", "http://papita:3000/x"),
            ("redis://:hunter2@cache:6379/0", "redis://cache:6379/0"),
            ("https://api.openai.com/v1", "https://api.openai.com/v1"),
            ("http://host/v1/@me", "http://host/v1/@me"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(without_credentials(url), shown, "{url}");
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::defaults();
        assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 5000));
        assert_eq!(c.openai.model, "gpt-3.5-turbo");
        assert_eq!(c.openai.base_url, "https://api.openai.com/v1");
        assert_eq!(c.papita.url, "http://localhost:3000");
        assert_eq!(c.log_dir, PathBuf::from("./SessionLog"));
        assert_eq!(c.body_limit.get(), 16 * 1024 * 1024);
        assert!(c.cors_origins.is_none());
        assert!(c.openai.api_key.is_none());
    }

    #[test]
    fn environment_wins_over_env_file() {
        let c = build(
            &[("OPENAI_MODEL", "gpt-4o")],
            &[("OPENAI_MODEL", "gpt-4"), ("PORT", "8080")],
        )
        .unwrap();
        assert_eq!(c.openai.model, "gpt-4o");
        assert_eq!(c.port, 8080);
    }

    #[test]
    fn placeholder_and_blank_keys_count_as_unset() {
        assert!(
            build(&[("OPENAI_API_KEY", KEY_PLACEHOLDER)], &[])
                .unwrap()
                .openai
                .api_key
                .is_none()
        );
        assert!(
            build(&[("OPENAI_API_KEY", "   ")], &[])
                .unwrap()
                .openai
                .api_key
                .is_none()
        );
        let c = build(&[("OPENAI_API_KEY", " sk-abc ")], &[]).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(
            c.openai.api_key.as_ref().map(|k| k.expose_secret()),
            Some("sk-abc")
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = build(&[("PORT", "abc")], &[]).unwrap_err().to_string();
        assert!(err.contains("PORT") && err.contains("abc"), "{err}");
        let err = build(&[("LOG_FORMAT", "xml")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("LOG_FORMAT"), "{err}");
        let err = build(&[("OPENAI_TIMEOUT_SECS", "-1")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("OPENAI_TIMEOUT_SECS"), "{err}");
    }

    #[test]
    fn numbers_that_do_not_fit_are_refused_not_wrapped() {
        let err = build(&[("PAPITA_USAGE_MAX_ATTEMPTS", "4294967296")], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PAPITA_USAGE_MAX_ATTEMPTS") && err.contains("too large"),
            "{err}"
        );
        assert_eq!(
            build(&[("PAPITA_USAGE_MAX_ATTEMPTS", "4294967295")], &[])
                .unwrap()
                .papita
                .usage_max_attempts
                .get(),
            u32::MAX
        );
        for (name, value) in [
            ("SESSION_MAX_AGE_HOURS", "18446744073709551615"),
            ("OPENAI_TIMEOUT_SECS", "1e300"),
            ("SESSION_MAX_TRACKED", "99999999999999999999999"),
        ] {
            let err = build(&[(name, value)], &[]).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn a_bad_pricing_file_names_the_variable() {
        let err = build(&[("PRICING_FILE", "/nonexistent/prices.json")], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid PRICING_FILE=\"/nonexistent/prices.json\""),
            "{err}"
        );
    }

    #[test]
    fn cors_origins_are_a_trimmed_list() {
        let c = build(
            &[(
                "CORS_ALLOWED_ORIGINS",
                "https://a.example, https://b.example ,",
            )],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.cors_origins.unwrap(),
            vec!["https://a.example", "https://b.example"]
        );
        assert!(
            build(&[("CORS_ALLOWED_ORIGINS", "*")], &[])
                .unwrap()
                .cors_origins
                .is_none()
        );
    }

    #[test]
    fn only_openais_own_endpoint_requires_sk_keys() {
        assert!(Config::defaults().openai.requires_sk_prefix());
        let c = build(&[("OPENAI_BASE_URL", "http://localhost:11434/v1/")], &[]).unwrap();
        assert!(!c.openai.requires_sk_prefix());
        assert_eq!(c.openai.base_url, "http://localhost:11434/v1");
    }
}

//! Prometheus metrics (`GET /metrics`), with `prometheus-client`: one registry per application,
//! so tests that run several apps in one process never share series.
//!
//! Two kinds of series. Those measured where things happen (HTTP requests, upstream latency,
//! time to first token, the service's own overhead per chat, requests in flight, open streams)
//! are counters, gauges and histograms updated on the spot. Those the services already count
//! (tokens and cost by model, Papita records, guardrail refusals, session-log lines) are read at
//! scrape time into a snapshot and written by a collector, so the hot path pays nothing twice.

use std::sync::LazyLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The matched route (`/api/chat`), never the raw URL: unknown paths are `unmatched`.
    /// Static strings, so labelling a request allocates nothing.
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// Where the key came from: `papita_api`, `local_env` or `none`.
    pub source: &'static str,
    /// `usable`, `missing` or `invalid`.
    pub result: &'static str,
}

/// What the session-log writer thread measures, one observation per batch.
#[derive(Clone, Debug)]
pub struct SessionLogMetrics {
    /// Time one `fdatasync` took.
    pub fsync: Histogram,
    /// Lines written by one batch (the group commit's size).
    pub batch_lines: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

/// What the services counted, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (model, prompt tokens, completion tokens, cost USD); at most 256 models and `other`.
    pub models: Vec<(String, u64, u64, f64)>,
    /// (outcome, records).
    pub papita: Vec<(&'static str, u64)>,
    /// (guardrail, refusals).
    pub refusals: Vec<(&'static str, u64)>,
    /// (outcome, lines).
    pub session_log: Vec<(&'static str, u64)>,
    pub session_log_syncs: u64,
    pub spool_bytes: u64,
    /// With `STATE_URL`: (Redis up, failed calls, operations done locally or refused, recoveries).
    pub shared_state: Option<(bool, u64, u64, u64)>,
    /// With fallbacks: (upstream, breaker state: 0 closed, 1 half-open, 2 open, chats answered,
    /// attempts failed).
    pub upstreams: Vec<(String, i64, u64, u64)>,
}

/// Every documented route, as its `route` label: the paths of the OpenAPI document that the
/// router is built from (`http::route_paths`), so a route gets its label where it is registered.
/// The same for every application in the process; computed once.
pub static ROUTES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    crate::http::route_paths()
        .into_iter()
        .map(|path| &*Box::leak(path.into_boxed_str()))
        .collect()
});

/// The series of one route and method, looked up once at start-up: the common case (a 200 on a
/// known route) then costs two atomic updates and no hashing.
pub struct RouteSeries {
    pub duration: Histogram,
    pub ok: Counter,
}

pub struct Metrics {
    registry: Registry,
    /// `ROUTES` × (GET, POST).
    routes: Vec<[RouteSeries; 2]>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub in_flight: Gauge,
    pub streams_open: Gauge,
    pub upstream_duration: Histogram,
    pub time_to_first_token: Histogram,
    pub overhead: Histogram,
    pub credential_resolutions: Family<CredentialLabels, Counter>,
    pub session_log: SessionLogMetrics,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Latency buckets from 100 µs to ~100 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("alchat");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(seconds as fn() -> Histogram);
        let in_flight = Gauge::default();
        let streams_open = Gauge::default();
        let upstream_duration = seconds();
        let time_to_first_token = seconds();
        let overhead = seconds();
        registry.register(
            "http_requests",
            "HTTP requests by matched route, method and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer, by matched route and method (streams: to the response head)",
            http_duration.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests being answered now",
            in_flight.clone(),
        );
        registry.register(
            "sse_streams_open",
            "Streamed chat replies open now",
            streams_open.clone(),
        );
        registry.register(
            "openai_request_duration_seconds",
            "Time the OpenAI call of a whole (non-streamed) chat took",
            upstream_duration.clone(),
        );
        registry.register(
            "openai_time_to_first_token_seconds",
            "Time from a streamed chat's request to its first token from OpenAI",
            time_to_first_token.clone(),
        );
        registry.register(
            "chat_overhead_seconds",
            "The service's own time per whole chat: total time minus the OpenAI call",
            overhead.clone(),
        );
        let credential_resolutions = Family::<CredentialLabels, Counter>::default();
        registry.register(
            "credential_resolutions",
            "OpenAI key resolutions by where the key came from and whether it was usable",
            credential_resolutions.clone(),
        );
        let session_log = SessionLogMetrics {
            fsync: seconds(),
            // 1 to 4096 lines (MAX_BATCH is 1024).
            batch_lines: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        };
        registry.register(
            "session_log_fsync_duration_seconds",
            "Time one fdatasync of the session log took (one per file per durable batch)",
            session_log.fsync.clone(),
        );
        registry.register(
            "session_log_batch_lines",
            "Lines the session log writer wrote per batch (its group commit size)",
            session_log.batch_lines.clone(),
        );
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        let series = |route: &'static str, method: &'static str| RouteSeries {
            duration: http_duration
                .get_or_create(&RouteLabels { route, method })
                .clone(),
            ok: http_requests
                .get_or_create(&HttpLabels {
                    route,
                    method,
                    status: 200,
                })
                .clone(),
        };
        let routes = ROUTES
            .iter()
            .map(|route| [series(route, "GET"), series(route, "POST")])
            .collect();
        Self {
            registry,
            routes,
            http_requests,
            http_duration,
            in_flight,
            streams_open,
            upstream_duration,
            time_to_first_token,
            overhead,
            credential_resolutions,
            session_log,
            snapshot,
        }
    }

    /// The text exposition, with `snapshot` as the services' counts.
    pub fn render(&self, snapshot: Snapshot) -> String {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The start-up series of `ROUTES[route]` with GET (0) or POST (1).
    pub fn route_series(&self, route: usize, method: usize) -> Option<&RouteSeries> {
        self.routes.get(route).and_then(|r| r.get(method))
    }

    pub fn observe(histogram: &Histogram, took: Duration) {
        histogram.observe(took.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct SnapshotCollector(Arc<Mutex<Snapshot>>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelKindLabels {
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardrailLabels {
    guardrail: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamOutcomeLabels {
    upstream: String,
    outcome: &'static str,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();

        let mut tokens = encoder.encode_descriptor(
            "chat_tokens",
            "Tokens of successful chats as OpenAI reported them, by model (at most 256, then other) and kind",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (model, prompt, completion, _) in &snap.models {
            for (kind, value) in [("prompt", *prompt), ("completion", *completion)] {
                let labels = ModelKindLabels {
                    model: model.clone(),
                    kind,
                };
                ConstCounter::new(value).encode(tokens.encode_family(&labels)?)?;
            }
        }

        let mut cost = encoder.encode_descriptor(
            "chat_cost_usd",
            "Cost of successful chats in US dollars, by model (at most 256, then other)",
            None,
            ConstCounter::new(0.0f64).metric_type(),
        )?;
        for (model, _, _, usd) in &snap.models {
            let labels = ModelLabels {
                model: model.clone(),
            };
            ConstCounter::new(*usd).encode(cost.encode_family(&labels)?)?;
        }

        let mut papita = encoder.encode_descriptor(
            "papita_usage_records",
            "Papita usage records by outcome (sent, retried, spooled, replayed, rejected, dropped, malformed)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (outcome, value) in &snap.papita {
            ConstCounter::new(*value).encode(papita.encode_family(&OutcomeLabels { outcome })?)?;
        }

        let spool = ConstGauge::new(snap.spool_bytes as i64);
        spool.encode(encoder.encode_descriptor(
            "papita_spool_bytes",
            "Bytes of Papita usage records waiting in the spool",
            None,
            spool.metric_type(),
        )?)?;

        let mut refusals = encoder.encode_descriptor(
            "guardrail_refusals",
            "Requests refused by each guardrail",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (guardrail, value) in &snap.refusals {
            ConstCounter::new(*value)
                .encode(refusals.encode_family(&GuardrailLabels { guardrail })?)?;
        }

        let mut lines = encoder.encode_descriptor(
            "session_log_lines",
            "Session log lines by outcome (written, dropped, refused_low_disk: session writes refused below LOG_MIN_FREE_MB)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (outcome, value) in &snap.session_log {
            ConstCounter::new(*value).encode(lines.encode_family(&OutcomeLabels { outcome })?)?;
        }

        if !snap.upstreams.is_empty() {
            let mut states = encoder.encode_descriptor(
                "upstream_state",
                "With fallbacks: each upstream's circuit breaker (0 closed, 1 half-open, 2 open)",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (upstream, state, _, _) in &snap.upstreams {
                ConstGauge::new(*state).encode(states.encode_family(&UpstreamLabels {
                    upstream: upstream.clone(),
                })?)?;
            }
            let mut requests = encoder.encode_descriptor(
                "upstream_requests",
                "With fallbacks: chats each upstream answered, and its attempts that failed (over to the next upstream, or ending the chat)",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (upstream, _, answered, failed) in &snap.upstreams {
                for (outcome, value) in [("answered", answered), ("failed", failed)] {
                    ConstCounter::new(*value).encode(requests.encode_family(
                        &UpstreamOutcomeLabels {
                            upstream: upstream.clone(),
                            outcome,
                        },
                    )?)?;
                }
            }
        }

        let syncs = ConstCounter::new(snap.session_log_syncs);
        syncs.encode(encoder.encode_descriptor(
            "session_log_syncs",
            "fdatasync calls of the session log writer (one per file per batch)",
            None,
            syncs.metric_type(),
        )?)?;

        if let Some((up, failures, fallbacks, recoveries)) = snap.shared_state {
            let gauge = ConstGauge::new(i64::from(up));
            gauge.encode(encoder.encode_descriptor(
                "shared_state_up",
                "1 while the shared state (Redis, STATE_URL) answers, 0 while it is skipped",
                None,
                gauge.metric_type(),
            )?)?;
            for (name, help, value) in [
                (
                    "shared_state_failures",
                    "Redis calls that failed or timed out (each marks it down until a probe sees it back)",
                    failures,
                ),
                (
                    "shared_state_fallbacks",
                    "Operations done on local state, or refused, because Redis was down",
                    fallbacks,
                ),
                (
                    "shared_state_recoveries",
                    "Times Redis was seen back after being down",
                    recoveries,
                ),
            ] {
                let counter = ConstCounter::new(value);
                counter.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    counter.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

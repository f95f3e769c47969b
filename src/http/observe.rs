//! `GET /metrics` (Prometheus text format) and the layer that measures every request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, State};
use axum::http::{Method, Request, header};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use crate::http::error::ApiError;
use crate::http::guards::AdminAccess;
use crate::metrics::{HttpLabels, Metrics, ROUTES, RouteLabels, Snapshot};
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(scrape))
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format (Docs/OBSERVABILITY.md)", content_type = "text/plain", body = String),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::error::ErrorBody),
        (status = 404, description = "METRICS_ENABLED=false", body = super::error::ErrorBody),
    ))]
pub(super) async fn scrape(_admin: AdminAccess, State(state): State<AppState>) -> Response {
    if !state.config.metrics_enabled {
        return ApiError::NotFound("/metrics (METRICS_ENABLED=false)".into()).into_response();
    }
    let snapshot = snapshot(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(snapshot),
    )
        .into_response()
}

/// What the services counted, gathered for one scrape.
async fn snapshot(state: &AppState) -> Snapshot {
    let figures = state.usage.figures().await;
    let papita = state.papita.snapshot();
    let refusals = state.guardrails.refusal_counts();
    Snapshot {
        models: figures
            .rows
            .iter()
            .map(|(model, t)| {
                (
                    label_value(model),
                    t.prompt,
                    t.completion,
                    t.prompt_cost + t.completion_cost,
                )
            })
            .collect(),
        papita: vec![
            ("sent", papita.sent),
            ("retried", papita.retried),
            ("spooled", papita.spooled),
            ("replayed", papita.replayed),
            ("rejected", papita.rejected),
            ("dropped", papita.dropped),
            ("malformed", papita.malformed),
        ],
        refusals: vec![
            ("model", refusals.model),
            ("rate_limit", refusals.rate_limit),
            ("budget", refusals.budget),
            ("quota", refusals.quota),
            ("input_too_large", refusals.input_too_large),
            ("admin_token", refusals.admin_token),
            ("auth_token", refusals.auth_token),
        ],
        session_log: vec![
            ("written", state.session_log.written()),
            ("dropped", state.session_log.dropped()),
            ("refused_low_disk", state.session_log.refused_low_disk()),
        ],
        session_log_syncs: state.session_log.syncs(),
        upstreams: {
            let counts = state.chat.upstream_report().unwrap_or_default();
            state
                .chat
                .upstream_states()
                .into_iter()
                .map(|(name, s)| {
                    let c = counts.get(&name).cloned().unwrap_or_default();
                    (label_value(&name), s as i64, c.request_count, c.failures)
                })
                .collect()
        },
        spool_bytes: papita.spool_bytes,
        shared_state: state.redis.as_ref().map(|s| {
            let get =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            (
                s.is_up(),
                get(&s.stats.failures),
                get(&s.stats.fallbacks),
                get(&s.stats.recoveries),
            )
        }),
    }
}

/// `value` fit for a label in the text exposition: prometheus-client writes label values as
/// given, and a model name comes from a client (any name passes `OPENAI_ALLOWED_MODELS=*`) or
/// from an upstream, so a `"` or a line break in it would end the label and forge series. The
/// format's own escapes: `\\`, `\"` and `\n` (and `\r`, which the format has no escape for,
/// as `\\r`).
fn label_value(value: &str) -> String {
    if !value.contains(['\\', '"', '\n', '\r']) {
        return value.to_string();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// The route's index in `ROUTES` and its label (`unmatched` when no route matched).
fn route_label(path: Option<&MatchedPath>) -> (Option<usize>, &'static str) {
    let Some(path) = path.map(MatchedPath::as_str) else {
        return (None, "unmatched");
    };
    // The documented route itself, or one below it that serves its parts (`/docs` serves
    // `/docs/` and `/docs/{*rest}` for Swagger UI's files).
    let index = ROUTES.iter().position(|r| *r == path).or_else(|| {
        ROUTES.iter().position(|r| {
            path.strip_prefix(r)
                .is_some_and(|rest| rest.starts_with('/'))
        })
    });
    match index {
        Some(i) => (Some(i), ROUTES[i]),
        None => (None, "other"),
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Counts and times every request by its matched route (never the raw URL, so a client cannot
/// create series), method and status. A tower layer rather than `middleware::from_fn`, which
/// boxes a clone of the inner service and its future on every request: this costs the hot path
/// two clock reads, an `Arc` clone and three atomic updates.
#[derive(Clone)]
pub struct MeasureLayer(pub Arc<Metrics>);

impl<S> Layer<S> for MeasureLayer {
    type Service = Measure<S>;

    fn layer(&self, inner: S) -> Measure<S> {
        Measure {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Measure<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for Measure<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = MeasureFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (route_index, route) = route_label(request.extensions().get::<MatchedPath>());
        let method = method_label(request.method());
        self.metrics.in_flight.inc();
        MeasureFuture {
            inner: self.inner.call(request),
            in_flight: InFlight(self.metrics.clone()),
            route_index,
            route,
            method,
            started: Instant::now(),
        }
    }
}

/// Counts the request in `http_requests_in_flight` until it is answered or dropped (a client
/// that went away).
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

pin_project_lite::pin_project! {
    pub struct MeasureFuture<F> {
        #[pin]
        inner: F,
        in_flight: InFlight,
        route_index: Option<usize>,
        route: &'static str,
        method: &'static str,
        started: Instant,
    }
}

impl<F, E> Future for MeasureFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            record(
                &this.in_flight.0,
                *this.route_index,
                this.route,
                this.method,
                response.status().as_u16(),
                this.started.elapsed().as_secs_f64(),
            );
        }
        Poll::Ready(result)
    }
}

fn record(
    metrics: &Metrics,
    route_index: Option<usize>,
    route: &'static str,
    method: &'static str,
    status: u16,
    took: f64,
) {
    let method_index = match method {
        "GET" => Some(0),
        "POST" => Some(1),
        _ => None,
    };
    // The common case through the series looked up at start-up; the rest through the families.
    let cached = route_index
        .zip(method_index)
        .and_then(|(r, m)| metrics.route_series(r, m));
    match cached {
        Some(series) => {
            series.duration.observe(took);
            if status == 200 {
                series.ok.inc();
            } else {
                metrics
                    .http_requests
                    .get_or_create(&HttpLabels {
                        route,
                        method,
                        status,
                    })
                    .inc();
            }
        }
        None => {
            metrics
                .http_duration
                .get_or_create(&RouteLabels { route, method })
                .observe(took);
            metrics
                .http_requests
                .get_or_create(&HttpLabels {
                    route,
                    method,
                    status,
                })
                .inc();
        }
    }
}

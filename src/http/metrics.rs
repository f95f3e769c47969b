//! `GET /metrics` (Prometheus text format) and the layer that measures every request.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;
use crate::http::guards::AdminAccess;
use crate::metrics::{HttpLabels, Metrics, ROUTES, RouteLabels, Snapshot};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format (Docs/OBSERVABILITY.md)", content_type = "text/plain", body = String),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::openapi::ErrorBody),
        (status = 404, description = "METRICS_ENABLED=false", body = super::openapi::ErrorBody),
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
    let refusals = state.guardrails.refusals.snapshot();
    Snapshot {
        models: figures
            .rows
            .iter()
            .map(|(model, t)| {
                (
                    model.clone(),
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
            ("input_too_large", refusals.input_too_large),
            ("admin_token", refusals.admin_token),
        ],
        session_log: vec![
            ("written", state.session_log.written()),
            ("dropped", state.session_log.dropped()),
        ],
        session_log_syncs: state.session_log.syncs(),
        spool_bytes: papita.spool_bytes,
    }
}

/// The route's index in `ROUTES` and its label (`unmatched` when no route matched).
fn route_label(path: Option<&MatchedPath>) -> (Option<usize>, &'static str) {
    match path {
        Some(path) => match ROUTES.iter().position(|r| *r == path.as_str()) {
            Some(i) => (Some(i), ROUTES[i]),
            None => (None, "other"),
        },
        None => (None, "unmatched"),
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
/// create series), method and status.
pub async fn measure(
    State(metrics): State<std::sync::Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let (route_index, route) = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let started = Instant::now();
    metrics.in_flight.inc();
    let response = next.run(request).await;
    metrics.in_flight.dec();
    let took = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
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
    response
}

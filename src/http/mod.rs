//! Everything HTTP: the router, its layers, the extractors and the handlers.
//!
//! Each resource module owns its routes; this is the one place that puts them together and
//! wraps them in the middleware stack.

mod chat;
mod dashboard;
mod error;
mod extract;
mod fallback;
mod guards;
mod health;
mod models;
mod observe;
mod openai;
mod openapi;
mod pages;
mod session;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use tower::ServiceBuilder;
use tower::util::{MapRequestLayer, MapResponseLayer};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, Any, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::{Config, LogFormat};
use crate::state::AppState;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

/// The application: every route under `/api` with its middleware.
pub fn router(state: AppState) -> Router {
    let config = &state.config;
    // Text logs quote the id (a client's id may hold `"` or `=`); JSON escapes it anyway.
    let quote_ids = config.log_format == LogFormat::Text;
    let layers = ServiceBuilder::new()
        .layer(MapRequestLayer::new(drop_unusable_request_id))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |request: &Request| request_span(request, quote_ids))
                .on_request(())
                .on_response(access_line)
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(cors(config))
        .layer(CatchPanicLayer::custom(fallback::panic_response))
        .layer(MapResponseLayer::new(fallback::ensure_json_error))
        .layer(RequestBodyLimitLayer::new(config.body_limit.get()))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ));

    let (routes, mut document) = api().split_for_parts();
    if let Some(algorithm) = state.guardrails.identity_algorithm() {
        openapi::require_site_token(&mut document, algorithm);
    }
    let routes = routes
        .merge(openapi::router(document))
        .fallback(fallback::not_found)
        .method_not_allowed_fallback(fallback::method_not_allowed)
        // The tower-http limit above answers 413 for every route; axum's own 2 MB default is off.
        .layer(DefaultBodyLimit::disable());
    // With METRICS_ENABLED=false nothing is measured at all (so the benchmark can compare).
    let routes = if config.metrics_enabled {
        routes.layer(observe::MeasureLayer(state.metrics.clone()))
    } else {
        routes
    };
    routes.layer(layers).with_state(state)
}

/// Every route of the API, each registered once: `routes!(handler)` in its module takes the path
/// and method from the handler's `#[utoipa::path]`, which is also its operation in the OpenAPI
/// document; the metrics take their route labels from the same document (`route_paths`).
/// Adding a route is a handler and one `.routes(routes!(handler))` line in its module.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(health::router())
        .merge(chat::router())
        .merge(session::router())
        .merge(openai::router())
        .merge(observe::router())
        .merge(models::router())
        .merge(dashboard::router())
        .merge(pages::router())
}

/// The path of every documented route (the metrics' route labels), in the document's order.
pub(crate) fn route_paths() -> Vec<String> {
    api().split_for_parts().1.paths.paths.into_keys().collect()
}

/// Longest client-chosen `X-Request-ID` kept; longer ones are replaced, not echoed.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's `X-Request-ID` is kept only when it is visible ASCII of at most 128 characters;
/// otherwise it is removed, so a fresh one is made (and never an 8 KB id echoed back).
fn drop_unusable_request_id(mut request: Request) -> Request {
    let usable = request.headers().get("x-request-id").is_none_or(|id| {
        let bytes = id.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes.iter().all(u8::is_ascii_graphic)
    });
    if !usable {
        request.headers_mut().remove("x-request-id");
    }
    request
}

/// One span per request: method, matched route (not the raw path when there is one), request id.
fn request_span(request: &Request, quote_id: bool) -> tracing::Span {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path(), MatchedPath::as_str);
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    if quote_id {
        tracing::info_span!("request", method = %request.method(), path = %path, request_id = ?id)
    } else {
        tracing::info_span!("request", method = %request.method(), path = %path, request_id = %id)
    }
}

/// The access line, as tower-http's `DefaultOnResponse` wrote it at info with microseconds
/// (`latency="412 μs" status=200`), without its gRPC status parsing and level dispatch: it runs
/// once per request.
fn access_line<B>(response: &axum::http::Response<B>, latency: Duration, _: &tracing::Span) {
    struct Micros(Duration);
    impl std::fmt::Display for Micros {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} μs", self.0.as_micros())
        }
    }
    // tower-http's target, so `RUST_LOG=tower_http=warn` still silences it.
    tracing::info!(
        target: "tower_http::trace::on_response",
        latency = %Micros(latency),
        status = response.status().as_u16(),
        "finished processing request"
    );
}

/// Any origin by default (as the Flask service), or only `CORS_ALLOWED_ORIGINS`.
fn cors(config: &Config) -> CorsLayer {
    let origins = match &config.cors_origins {
        None => AllowOrigin::from(Any),
        Some(list) => AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok())),
    };
    // Like Flask-CORS's defaults: whatever headers and method a preflight asks for are allowed
    // (the chat window may send headers we do not know of); origins as configured.
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
        .max_age(Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    /// Docs/API.md is the API reference README points to: every operation of the document (which
    /// is what the router serves: one registration gives both) has its section there.
    #[test]
    fn every_route_is_documented() {
        let api = include_str!("../../Docs/API.md");
        let (_, document) = super::api().split_for_parts();
        let mut operations = 0;
        for (path, item) in &document.paths.paths {
            for (method, operation) in [("GET", &item.get), ("POST", &item.post)] {
                if operation.is_some() {
                    // `## GET /a` or `## GET /a, GET /b` (routes documented together).
                    let operation = format!("{method} {path}");
                    let documented = api.lines().any(|line| {
                        line.strip_prefix("## ")
                            .is_some_and(|heading| heading.split(", ").any(|h| h == operation))
                    });
                    assert!(documented, "Docs/API.md has no section for {operation}");
                    operations += 1;
                }
            }
        }
        assert!(operations >= 14, "{operations} operations in the document");
        assert_eq!(
            super::route_paths().len(),
            document.paths.paths.len(),
            "every path is a metrics label"
        );
    }
}

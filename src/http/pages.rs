//! The pages a person looks at: `/dashboard` (the operator's view of usage and health) and
//! `/playground` (a chat by hand, streamed). Each is one HTML file plus a script and a shared
//! stylesheet under `/assets/`, all built into the binary: no CDN, no build step, nothing fetched
//! from the internet. Scripts are files, not inline, so the pages run under a strict
//! Content-Security-Policy (`script-src 'self'`): an admin token kept in the tab is not one
//! injected script away from leaking.

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::http::error::ApiError;
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(dashboard))
        .routes(routes!(playground))
        .routes(routes!(asset))
}

/// (file name, content type, contents).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "pages.css",
        "text/css; charset=utf-8",
        include_str!("pages/pages.css"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("pages/dashboard.js"),
    ),
    (
        "playground.js",
        "text/javascript; charset=utf-8",
        include_str!("pages/playground.js"),
    ),
    // The documented browser code (Docs/STREAMING.md shows this file verbatim), served as is: the
    // playground runs it. It lives under src/ because everything the binary embeds does: the
    // Docker build stage copies src/ (see tests/api/build_context.rs).
    (
        "stream-chat.mjs",
        "text/javascript; charset=utf-8",
        include_str!("pages/stream-chat.mjs"),
    ),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // Small, and a new binary may change them: revalidate rather than keep stale copies.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/dashboard", tag = "pages",
    responses((status = 200, description = "The usage dashboard (HTML; reads /api/openai/usage and /api/dashboard)", content_type = "text/html", body = String)))]
pub(super) async fn dashboard() -> Response {
    page(
        "text/html; charset=utf-8",
        include_str!("pages/dashboard.html"),
    )
}

#[utoipa::path(get, path = "/playground", tag = "pages",
    responses((status = 200, description = "The chat playground (HTML; streams through /api/chat)", content_type = "text/html", body = String)))]
pub(super) async fn playground() -> Response {
    page(
        "text/html; charset=utf-8",
        include_str!("pages/playground.html"),
    )
}

#[utoipa::path(get, path = "/assets/{file}", tag = "pages",
    params(("file" = String, Path, example = "pages.css", description = "pages.css, dashboard.js, playground.js or stream-chat.mjs")),
    responses(
        (status = 200, description = "A script or stylesheet of the pages", content(
            (String = "text/javascript"),
            (String = "text/css"),
        )),
        (status = 404, description = "No such asset", body = super::error::ErrorBody),
    ))]
pub(super) async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => page(content_type, body),
        None => ApiError::NotFound(format!("/assets/{file}")).into_response(),
    }
}

//! Answers for requests no handler took, and the guarantee that every error is JSON.

use std::any::Any;

use axum::body::Body;
use axum::http::{Method, Response, StatusCode, Uri, header};
use axum::response::IntoResponse;

use crate::http::error::ApiError;

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

pub async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

pub fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response<Body> {
    ApiError::Internal("unexpected failure; it has been logged".into()).into_response()
}

/// Errors produced below the handlers (tower-http's 413 and 408, axum's own rejections) come
/// as plain text or empty bodies; give them the contract's `{"error": ...}` shape.
///
/// A plain `MapResponse` layer: no boxed clone of the inner service per request (as
/// `middleware::from_fn` makes).
pub fn ensure_json_error<B>(response: Response<B>) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response.map(Body::new);
    }
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ApiError::RequestTimeout,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        other => ApiError::Status(other),
    };
    // Keep the layer's headers (CORS, request id, Allow), replace the body with ours.
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(error.body().to_string()))
}

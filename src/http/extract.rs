//! JSON bodies through our error type: a malformed body gets a 400 naming the field and the
//! problem, a wrong content type 415, a too-large body 413 — never axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::http::error::ApiError;
use crate::server::BodyReadDeadline;

/// A JSON object body parsed into `T`. An empty body counts as `{}`, so `curl -X POST` with no
/// data behaves like an empty request, not like a syntax error.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"));
        // Slow bodies are cut at the deadline the server set when the head arrived.
        let deadline = request.extensions().get::<BodyReadDeadline>().copied();
        let reading = Bytes::from_request(request, state);
        let read = match deadline {
            Some(BodyReadDeadline(at)) => tokio::time::timeout_at(at, reading)
                .await
                .map_err(|_| ApiError::BodyReadTimeout)?,
            None => reading.await,
        };
        let bytes = read.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest(format!("Could not read the request body: {rejection}"))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return parse_json(b"{}").map(JsonBody);
        }
        if !json_type {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON object into `T`, with errors that say which field is wrong and why.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would also accept an array for a struct (as a tuple); the contract wants objects.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "Request body must be a JSON object.".into(),
        ));
    }
    // The plain parse is the fast path; only a failure is parsed again, with path tracking, to
    // say which field is wrong.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        ApiError::BadRequest(if inner.is_syntax() || inner.is_eof() {
            format!("Request body is not valid JSON: {inner}")
        } else if path == "." {
            format!("Request body must be a JSON object: {inner}")
        } else {
            format!("Invalid field '{path}': {inner}")
        })
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("Request body is not valid JSON: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ChatBody;

    #[test]
    fn wrong_field_types_name_the_field() {
        let err = parse_json::<ChatBody>(br#"{"message": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "Invalid field 'message': invalid type: integer `5`, expected a string"
            ),
            "{err}"
        );
        let err = parse_json::<ChatBody>(br#"{"history": [{"role": "robot", "content": "x"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'history[0].role'") && err.contains("robot"),
            "{err}"
        );
    }

    #[test]
    fn non_objects_and_bad_syntax_are_explained() {
        let err = parse_json::<ChatBody>(b"[1]").unwrap_err().to_string();
        assert!(
            err.starts_with("Request body must be a JSON object"),
            "{err}"
        );
        let err = parse_json::<ChatBody>(b"{\"message\": ")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Request body is not valid JSON"), "{err}");
        let err = parse_json::<ChatBody>(b"{} x").unwrap_err().to_string();
        assert!(err.starts_with("Request body is not valid JSON"), "{err}");
    }
}

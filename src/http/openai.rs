//! `GET /api/openai/info`, `/api/openai/test` (contract §5) and `/api/openai/usage` (§8).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::without_credentials;
use crate::domain::session_id::client_session_id;
use crate::http::error::{ApiError, log_upstream_failure};
use crate::http::guards::{AdminAccess, ClientAddr};
use crate::services::chat::{ChatError, ReplyUsage};
use crate::services::credentials::Credentials;
use crate::services::guardrails::Limited;
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(info))
        .routes(routes!(test))
        .routes(routes!(usage))
}

#[utoipa::path(get, path = "/api/openai/info", tag = "openai",
    responses(
        (status = 200, description = "The OpenAI configuration (never more of the key than its prefix)", body = super::openapi::InfoAnswer),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::openapi::ErrorBody),
    ))]
pub(super) async fn info(_admin: AdminAccess, State(state): State<AppState>) -> Json<Value> {
    let credentials = state.credentials.get().await;
    Json(info_body(&state, &credentials))
}

fn info_body(state: &AppState, credentials: &Credentials) -> Value {
    let config = &state.config;
    let key = credentials.key.as_ref();
    let credentials_info = json!({
        "openai_api_key_set": key.is_some(),
        "openai_api_key_length": key.map_or(0, |k| k.len()),
        "openai_api_key_prefix": key.and_then(|k| k.prefix()),
        "openai_model": config.openai.model,
        "env_file_path": config.env_file.display().to_string(),
        "env_file_exists": config.env_file_exists,
        // A URL may carry a user and password (http://user:pw@host): never shown.
        "papita_api_url": without_credentials(&config.papita.url),
        "credential_source": credentials.source.as_str(),
    });
    match credentials.problem {
        None => json!({
            "model": config.openai.model,
            "credentials_valid": true,
            "credentials_info": credentials_info,
            "base_url": without_credentials(&config.openai.base_url),
        }),
        Some(reason) => json!({
            "error": reason,
            "credentials_info": credentials_info,
            "base_url": without_credentials(&config.openai.base_url),
        }),
    }
}

/// A real one-message call; not counted in usage statistics.
#[utoipa::path(get, path = "/api/openai/test", tag = "openai",
    responses(
        (status = 200, description = "A live call: status success, or error with the reason", body = super::openapi::TestAnswer),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::openapi::ErrorBody),
        (status = 429, description = "Rate limit or budget", body = super::openapi::ErrorBody),
        (status = 500, description = "Not configured (status error, with the info)", body = super::openapi::TestAnswer),
    ))]
pub(super) async fn test(
    _admin: AdminAccess,
    ClientAddr(client): ClientAddr,
    State(state): State<AppState>,
) -> Response {
    if let Err(refused) = state.guardrails.check_rate(Limited::Test, client).await {
        return ApiError::from(refused).into_response();
    }
    let model = state.config.openai.model.clone();
    match state.chat.test_connection(&model).await {
        Ok(completion) => Json(json!({
            "status": "success",
            "message": "OpenAI connection is working",
            "test_response": completion.text,
            "model": model,
            // Like the chat answer's usage, with the model (as Flask's test answer had).
            "usage": ReplyUsage::new(completion.usage.unwrap_or_default(), &model),
        }))
        .into_response(),
        Err(ChatError::NotConfigured) => {
            let credentials = state.credentials.get().await;
            let body = json!({
                "status": "error",
                "message": "OpenAI service not configured",
                "info": info_body(&state, &credentials),
            });
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
        Err(ChatError::Guardrail(e)) => ApiError::from(e).into_response(),
        Err(ChatError::Upstream(e)) => {
            log_upstream_failure(&e);
            Json(json!({
                "status": "error",
                "message": format!("OpenAI connection failed: {}", e.message),
                "model": model,
            }))
            .into_response()
        }
    }
}

#[derive(Deserialize)]
pub(super) struct UsageQuery {
    session_id: Option<String>,
}

#[utoipa::path(get, path = "/api/openai/usage", tag = "openai",
    params(("session_id" = Option<String>, Query, description = "Only this session's chats")),
    responses((status = 200, description = "Usage and cost since start-up", body = super::openapi::UsageAnswer)))]
pub(super) async fn usage(
    State(state): State<AppState>,
    Query(query): Query<UsageQuery>,
) -> Json<Value> {
    let credentials = state.credentials.get().await;
    let account_info = match credentials.usable_key() {
        Some(key) => json!({
            "api_key_prefix": key.prefix(),
            "model": state.config.openai.model,
            "status": "active",
        }),
        None => json!({}),
    };
    let session = client_session_id(query.session_id.as_deref());
    let mut report = state.usage.report(session.as_deref(), account_info).await;
    if let Some(budget) = state.guardrails.budget_report().await {
        report["budget"] = budget;
    }
    Json(report)
}

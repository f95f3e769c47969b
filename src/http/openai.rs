//! `GET /api/openai/info`, `/api/openai/test` (contract §5) and `/api/openai/usage` (§8).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::without_credentials;
use crate::domain::identifier::check_optional;
use crate::domain::session_id::client_session_id;
use crate::http::error::{ApiError, Result, log_upstream_failure};
use crate::http::guards::{AdminAccess, AdminView, RateChecked, TestRoute};
use crate::services::chat::{ChatError, ReplyUsage};
use crate::services::credentials::Credentials;
use crate::services::usage::{AccountInfo, ActiveAccount, NoAccount, UsageReport};
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
        (status = 200, description = "The OpenAI configuration (never more of the key than its prefix)", body = InfoAnswer),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::error::ErrorBody),
    ))]
pub(super) async fn info(_admin: AdminAccess, State(state): State<AppState>) -> Json<InfoAnswer> {
    let credentials = state.credentials.get().await;
    Json(info_body(&state, &credentials))
}

/// `GET /api/openai/info`'s answer (contract §5): configured, `model` and `credentials_valid`;
/// not configured, `error` with the reason. Fields in the contract's order.
#[derive(Serialize, ToSchema)]
pub struct InfoAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_valid: Option<bool>,
    pub credentials_info: CredentialsInfo,
    pub base_url: String,
}

/// Where the key comes from; never more of it than its 7-character prefix.
#[derive(Serialize, ToSchema)]
pub struct CredentialsInfo {
    pub openai_api_key_set: bool,
    pub openai_api_key_length: usize,
    pub openai_api_key_prefix: Option<String>,
    pub openai_model: String,
    pub env_file_path: String,
    pub env_file_exists: bool,
    /// Without any user or password the URL carries.
    pub papita_api_url: String,
    /// `papita_api`, `local_env` or `none`.
    pub credential_source: &'static str,
}

fn info_body(state: &AppState, credentials: &Credentials) -> InfoAnswer {
    let config = &state.config;
    let key = credentials.key.as_ref();
    let credentials_info = CredentialsInfo {
        openai_api_key_set: key.is_some(),
        openai_api_key_length: key.map_or(0, |k| k.len()),
        openai_api_key_prefix: key.and_then(|k| k.prefix()),
        openai_model: config.openai.model.clone(),
        env_file_path: config.env_file.display().to_string(),
        env_file_exists: config.env_file_exists,
        // A URL may carry a user and password (http://user:pw@host): never shown.
        papita_api_url: without_credentials(&config.papita.url),
        credential_source: credentials.source.as_str(),
    };
    let configured = credentials.problem.is_none();
    InfoAnswer {
        error: credentials.problem.map(str::to_string),
        model: configured.then(|| config.openai.model.clone()),
        credentials_valid: configured.then_some(true),
        credentials_info,
        base_url: without_credentials(&config.openai.base_url),
    }
}

/// `GET /api/openai/test`'s answer: `success` with the reply and its usage, or `error` with the
/// reason (and, when no key is configured, the configuration).
#[derive(Serialize, ToSchema)]
pub struct TestAnswer {
    /// `success` or `error`.
    pub status: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_response: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<ReplyUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<InfoAnswer>,
}

/// A real one-message call; not counted in usage statistics.
#[utoipa::path(get, path = "/api/openai/test", tag = "openai",
    responses(
        (status = 200, description = "A live call: status success, or error with the reason", body = TestAnswer),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::error::ErrorBody),
        (status = 429, description = "Rate limit or budget", body = super::error::ErrorBody),
        (status = 500, description = "Not configured (status error, with the info)", body = TestAnswer),
    ))]
pub(super) async fn test(
    _admin: AdminAccess,
    _rate: RateChecked<TestRoute>,
    State(state): State<AppState>,
) -> Response {
    let model = state.config.openai.model.clone();
    match state.chat.test_connection(&model).await {
        Ok(completion) => Json(TestAnswer {
            status: "success",
            message: "OpenAI connection is working".into(),
            test_response: Some(completion.text),
            // Like the chat answer's usage, with the model (as Flask's test answer had).
            usage: Some(ReplyUsage::new(
                completion.usage.unwrap_or_default(),
                &model,
            )),
            model: Some(model),
            info: None,
        })
        .into_response(),
        Err(ChatError::NotConfigured) => {
            let credentials = state.credentials.get().await;
            let body = TestAnswer {
                status: "error",
                message: "OpenAI service not configured".into(),
                test_response: None,
                model: None,
                usage: None,
                info: Some(info_body(&state, &credentials)),
            };
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
        Err(e @ (ChatError::Guardrail(_) | ChatError::AllUpstreamsDown { .. })) => {
            ApiError::from(e).into_response()
        }
        Err(ChatError::Upstream(e)) => {
            log_upstream_failure(&e);
            Json(TestAnswer {
                status: "error",
                message: format!("OpenAI connection failed: {}", e.message),
                test_response: None,
                model: Some(model),
                usage: None,
                info: None,
            })
            .into_response()
        }
    }
}

#[derive(Deserialize)]
pub(super) struct UsageQuery {
    session_id: Option<String>,
    username: Option<String>,
}

#[utoipa::path(get, path = "/api/openai/usage", tag = "openai",
    params(
        ("session_id" = Option<String>, Query, description = "Only this session's chats"),
        ("username" = Option<String>, Query, description = "Adds `user`: this user's usage today and quota left (behind ADMIN_TOKEN when set)"),
    ),
    responses(
        (status = 200, description = "Usage and cost since start-up", body = UsageReport),
        (status = 400, description = "A username over 128 bytes or with control characters", body = super::error::ErrorBody),
        (status = 401, description = "username= without the admin token, when ADMIN_TOKEN is set", body = super::error::ErrorBody),
    ))]
pub(super) async fn usage(
    State(state): State<AppState>,
    AdminView(admin): AdminView,
    Query(query): Query<UsageQuery>,
) -> Result<Json<UsageReport>> {
    // One user's usage is the operator's to see; the totals stay open (the website reads them).
    let user = match query.username.as_deref() {
        Some(_) if !admin => return Err(ApiError::AdminTokenRequired),
        Some(name) => {
            check_optional("username", Some(name))?;
            state.consumers.user(name).await
        }
        None => None,
    };
    let credentials = state.credentials.get().await;
    let account_info = match credentials.usable_key() {
        Some(key) => AccountInfo::Active(ActiveAccount {
            api_key_prefix: key.prefix(),
            model: state.config.openai.model.clone(),
            status: "active",
        }),
        None => AccountInfo::NoKey(NoAccount {}),
    };
    let session = client_session_id(query.session_id.as_deref());
    let mut report = state.usage.report(session.as_deref(), account_info).await;
    report.budget = state.guardrails.budget_report().await;
    report.by_upstream = state.chat.upstream_report();
    report.user = user;
    Ok(Json(report))
}

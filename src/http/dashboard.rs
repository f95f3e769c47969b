//! `GET /api/dashboard`: what the dashboard page shows besides `/api/openai/usage` (chats per
//! minute, the latest sessions, guardrail refusals, Papita and session-log health), in one
//! answer so a refresh is two requests. Behind `ADMIN_TOKEN` when it is set.

use axum::Json;
use axum::extract::State;
use chrono::{Local, TimeZone};
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::timestamp;
use crate::http::guards::AdminAccess;
use crate::services::guardrails::RefusalCounts;
use crate::services::sessions::RecentSession;
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(dashboard))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MinuteCount {
    /// The minute's start, local time (`2026-11-25T14:05:00`).
    pub minute: String,
    /// Chats answered successfully in it.
    pub chats: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DashboardAnswer {
    pub timestamp: String,
    /// The last 60 minutes, oldest first, the current one last.
    pub chats_per_minute: Vec<MinuteCount>,
    /// The latest sessions started or stopped on this replica, newest first (at most 20).
    pub recent_sessions: Vec<RecentSession>,
    /// Requests refused by each guardrail since start-up.
    #[schema(value_type = Object)]
    pub refusals: RefusalCounts,
    /// `{status: ok|spooling|dropping, usage_records: {...}}`, as `/api/ready` reports it.
    #[schema(value_type = Object)]
    pub papita: Value,
    /// `{status: ok|failing, dir, written, dropped, reason?}`.
    #[schema(value_type = Object)]
    pub session_log: Value,
    /// Streamed replies open now.
    pub streams_open: i64,
}

#[utoipa::path(get, path = "/api/dashboard", tag = "operations",
    responses(
        (status = 200, description = "The dashboard's figures", body = DashboardAnswer),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::error::ErrorBody),
    ))]
pub(super) async fn dashboard(_admin: AdminAccess, State(state): State<AppState>) -> Json<Value> {
    let now = state.clock.now();
    let minute = now.timestamp().div_euclid(60) as u64;
    let chats_per_minute = state
        .chat
        .chats_per_minute()
        .last_hour(minute)
        .into_iter()
        .map(|(minute, chats)| MinuteCount {
            minute: Local
                .timestamp_opt(minute as i64 * 60, 0)
                .single()
                .map(|at| at.format("%Y-%m-%dT%H:%M:%S").to_string())
                .unwrap_or_default(),
            chats,
        })
        .collect();
    let log = &state.session_log;
    let mut session_log = json!({
        "dir": log.dir().display().to_string(),
        "written": log.written(),
        "dropped": log.dropped(),
    });
    match log.check_writable().await {
        Ok(()) => session_log["status"] = "ok".into(),
        Err(e) => {
            session_log["status"] = "failing".into();
            session_log["reason"] = e.to_string().into();
        }
    }
    let answer = DashboardAnswer {
        timestamp: timestamp(&now),
        chats_per_minute,
        recent_sessions: state.sessions.recent(),
        refusals: state.guardrails.refusal_counts(),
        papita: super::health::papita_check(&state),
        session_log,
        streams_open: state.metrics.streams_open.get(),
    };
    Json(serde_json::to_value(answer).unwrap_or_default())
}

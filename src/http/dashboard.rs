//! `GET /api/dashboard`: what the dashboard page shows besides `/api/openai/usage` (chats per
//! minute, the latest sessions, guardrail refusals, today's top consumers, Papita and session-log health), in one
//! answer so a refresh is two requests. Behind `ADMIN_TOKEN` when it is set.

use axum::Json;
use axum::extract::State;
use chrono::{Local, TimeZone};
use serde::Serialize;

use crate::clock::timestamp;
use crate::http::guards::AdminAccess;
use crate::http::health::{PapitaCheck, UpstreamState};
use crate::services::consumers::ConsumerUsage;
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
    /// As `/api/ready` reports it.
    pub papita: PapitaCheck,
    pub session_log: SessionLogState,
    /// Streamed replies open now.
    pub streams_open: i64,
    /// Today's top consumers by tokens (at most 20): users by name, guests by masked address,
    /// with the quota each has left.
    pub consumers: Vec<ConsumerUsage>,
    /// Only with fallback upstreams: each one's circuit breaker, the primary first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamState>,
}

/// The session log's counters and health.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionLogState {
    pub dir: String,
    /// Lines written since start-up.
    pub written: u64,
    /// Lines that could not be written.
    pub dropped: u64,
    /// `ok` or `failing`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[utoipa::path(get, path = "/api/dashboard", tag = "operations",
    responses(
        (status = 200, description = "The dashboard's figures", body = DashboardAnswer),
        (status = 401, description = "ADMIN_TOKEN is set and was not sent", body = super::error::ErrorBody),
    ))]
pub(super) async fn dashboard(
    _admin: AdminAccess,
    State(state): State<AppState>,
) -> Json<DashboardAnswer> {
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
    let reason = log.check_writable().await.err().map(|e| e.to_string());
    let session_log = SessionLogState {
        dir: log.dir().display().to_string(),
        written: log.written(),
        dropped: log.dropped(),
        status: if reason.is_none() { "ok" } else { "failing" },
        reason,
    };
    let answer = DashboardAnswer {
        timestamp: timestamp(&now),
        chats_per_minute,
        recent_sessions: state.sessions.recent(),
        refusals: state.guardrails.refusal_counts(),
        papita: super::health::papita_check(&state),
        session_log,
        streams_open: state.metrics.streams_open.get(),
        consumers: state.consumers.top().await,
        upstreams: state
            .chat
            .upstream_states()
            .into_iter()
            .map(|(name, state)| UpstreamState { name, state })
            .collect(),
    };
    Json(answer)
}

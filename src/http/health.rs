//! `GET /api/health` (contract §4): liveness; never waits on Papita, it reports the cached
//! credentials. `GET /api/ready` (contract §11, 2026-11 amendment): readiness; 503 while the
//! session log folder cannot be written, since session start and stop would then fail.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use serde::Serialize;
use utoipa::ToSchema;

use crate::clock::timestamp;
use crate::http::guards::AdminView;
use crate::services::breaker::BreakerState;
use crate::services::papita::ReporterSnapshot;
use crate::services::redis::RedisCheck;
use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
}

#[utoipa::path(get, path = "/api/ready", tag = "health",
    responses(
        (status = 200, description = "Ready: the session log folder takes writes and has LOG_MIN_FREE_MB free. With ADMIN_TOKEN set, callers without it see only the statuses (no paths, hosts or reasons)", body = ReadyAnswer),
        (status = 503, description = "Not ready: `error` says what is wrong", body = ReadyAnswer),
    ))]
pub(super) async fn ready(
    State(state): State<AppState>,
    AdminView(full): AdminView,
) -> (StatusCode, Json<ReadyAnswer>) {
    let dir = state.session_log.dir().display().to_string();
    let problem = match state.session_log.check_writable().await {
        Err(e) => Some((
            format!(
                "The session log folder {dir} is not writable ({e}); session start and stop will fail. \
                 Check the folder (AL_CHAT_LOG_DIR) and its owner (the service runs as uid 10001 in Docker)."
            ),
            e.to_string(),
        )),
        Ok(()) => state.session_log.check_room().err().map(|low| {
            (
                format!(
                    "The session log folder {dir} is on a nearly full disk ({low}); session start and stop get 507. \
                     Make room, or lower LOG_MIN_FREE_MB."
                ),
                low.to_string(),
            )
        }),
    };
    if let Some((_, reason)) = &problem {
        tracing::warn!(%dir, %reason, "not ready: the session log cannot take writes");
    }
    let (error, reason) = problem.unzip();
    let mut answer = ReadyAnswer {
        error,
        status: if reason.is_none() {
            "ready"
        } else {
            "not_ready"
        },
        timestamp: timestamp(&state.clock.now()),
        checks: ReadyChecks {
            session_log: SessionLogCheck {
                status: if reason.is_none() { "ok" } else { "failing" },
                dir: Some(dir),
                reason,
            },
            // Papita's state is reported, not judged: chats work whatever it is.
            papita: papita_check(&state),
            // Reported, not judged: with Redis down chats go on with local state (SCALING.md).
            shared_state: state.redis.as_ref().map(|s| s.check()),
            upstreams: upstreams_check(&state),
        },
    };
    if !full {
        // Anyone may ask whether the service is ready; where its files live and which hosts it
        // talks to are the operator's (ADMIN_TOKEN).
        if answer.error.is_some() {
            answer.error = Some(
                "Not ready: the session log cannot take writes. Details need the admin token."
                    .into(),
            );
        }
        answer.checks.hide_details();
    }
    let status = match answer.error {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(answer))
}

/// `GET /api/ready`'s answer, 200 or 503 (contract §11).
#[derive(Serialize, ToSchema)]
pub struct ReadyAnswer {
    /// Only when not ready: what is wrong and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ready` or `not_ready`.
    pub status: &'static str,
    pub timestamp: String,
    pub checks: ReadyChecks,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyChecks {
    pub session_log: SessionLogCheck,
    pub papita: PapitaCheck,
    /// With `STATE_URL`: Redis, else `null`.
    pub shared_state: Option<RedisCheck>,
    /// Only with fallbacks: `degraded` while the primary's breaker is not closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<UpstreamsCheck>,
}

#[derive(Serialize, ToSchema)]
pub struct UpstreamsCheck {
    /// `ok`, or `degraded` while the primary is skipped or probed.
    pub status: &'static str,
    /// Each upstream's breaker, the primary first. Without the admin token: absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakers: Option<Vec<UpstreamState>>,
}

#[derive(Serialize, ToSchema)]
pub struct UpstreamState {
    pub name: String,
    pub state: BreakerState,
}

fn upstreams_check(state: &AppState) -> Option<UpstreamsCheck> {
    let states = state.chat.upstream_states();
    let primary = states.first()?.1;
    Some(UpstreamsCheck {
        status: if primary == BreakerState::Closed {
            "ok"
        } else {
            "degraded"
        },
        breakers: Some(
            states
                .into_iter()
                .map(|(name, state)| UpstreamState { name, state })
                .collect(),
        ),
    })
}

impl ReadyChecks {
    /// Only the statuses stay.
    fn hide_details(&mut self) {
        let log = &mut self.session_log;
        (log.dir, log.reason) = (None, None);
        self.papita.usage_records = None;
        if let Some(shared) = &mut self.shared_state {
            shared.details = None;
        }
        if let Some(upstreams) = &mut self.upstreams {
            upstreams.breakers = None;
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct SessionLogCheck {
    /// `ok` or `failing`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Papita's delivery state.
#[derive(Serialize, ToSchema)]
pub struct PapitaCheck {
    /// `ok`, `spooling` (records wait on disk) or `dropping`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub usage_records: Option<ReporterSnapshot>,
}

pub(super) fn papita_check(state: &AppState) -> PapitaCheck {
    let papita = state.papita.snapshot();
    let status = if papita.dropped > 0 {
        "dropping"
    } else if papita.spool_bytes > 0 {
        "spooling"
    } else {
        "ok"
    };
    PapitaCheck {
        status,
        usage_records: Some(papita),
    }
}

#[utoipa::path(get, path = "/api/health", tag = "health",
    responses((status = 200, description = "Alive", body = HealthAnswer)))]
pub(super) async fn health(State(state): State<AppState>) -> Json<HealthAnswer> {
    let configured = state
        .credentials
        .peek()
        .is_some_and(|c| c.usable_key().is_some());
    Json(HealthAnswer {
        status: "healthy",
        timestamp: timestamp(&state.clock.now()),
        openai_configured: configured,
    })
}

/// `GET /api/health`'s answer (contract §4).
#[derive(Serialize, ToSchema)]
pub struct HealthAnswer {
    /// Always `healthy`.
    pub status: &'static str,
    /// Local time, ISO 8601 with microseconds, no offset.
    pub timestamp: String,
    /// A usable key is known (from Papita or `OPENAI_API_KEY`).
    pub openai_configured: bool,
}

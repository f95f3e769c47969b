//! `GET /api/health` (contract §4). Never waits on Papita: it reports the cached credentials.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::clock::timestamp;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/health", get(health))
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    let configured = state
        .credentials
        .peek()
        .is_some_and(|c| c.usable_key().is_some());
    Json(json!({
        "status": "healthy",
        "timestamp": timestamp(&state.clock.now()),
        "openai_configured": configured,
    }))
}

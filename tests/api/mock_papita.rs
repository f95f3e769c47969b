//! A small Papita on loopback: the credentials endpoint (scripted) and the usage log (recorded).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

/// How the credentials endpoint answers.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// 200 with this JSON.
    Json(Value),
    /// This status, empty body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Garbage,
    /// Waits this long, then answers 200 with this JSON.
    Slow(Duration, Value),
}

/// How the usage endpoint answers.
#[derive(Debug, Clone)]
pub enum Usage {
    Ok,
    Status(u16),
    Slow(Duration),
}

struct PapitaState {
    credentials: Mutex<Credentials>,
    credential_requests: AtomicUsize,
    usage: Mutex<Usage>,
    usage_attempts: AtomicUsize,
    records: Mutex<Vec<Value>>,
}

#[derive(Clone)]
pub struct MockPapita {
    pub addr: SocketAddr,
    state: Arc<PapitaState>,
}

impl MockPapita {
    pub async fn start() -> Self {
        let state = Arc::new(PapitaState {
            credentials: Mutex::new(Credentials::Status(404)),
            credential_requests: AtomicUsize::new(0),
            usage: Mutex::new(Usage::Ok),
            usage_attempts: AtomicUsize::new(0),
            records: Mutex::default(),
        });
        let app = Router::new()
            .route("/api/credentials/global/openai", get(credentials))
            .route("/api/usage/log", post(usage))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_credentials(&self, c: Credentials) {
        *self.state.credentials.lock().unwrap() = c;
    }

    pub fn set_key(&self, key: &str) {
        self.set_credentials(Credentials::Json(
            serde_json::json!({"credentials": {"api_key": key}}),
        ));
    }

    pub fn set_usage(&self, u: Usage) {
        *self.state.usage.lock().unwrap() = u;
    }

    pub fn credential_requests(&self) -> usize {
        self.state.credential_requests.load(Ordering::SeqCst)
    }

    pub fn usage_attempts(&self) -> usize {
        self.state.usage_attempts.load(Ordering::SeqCst)
    }

    pub fn records(&self) -> Vec<Value> {
        self.state.records.lock().unwrap().clone()
    }

    /// How many records arrived (cheap to poll, unlike `records`).
    pub fn record_count(&self) -> usize {
        self.state.records.lock().unwrap().len()
    }
}

async fn credentials(State(state): State<Arc<PapitaState>>) -> Response {
    state.credential_requests.fetch_add(1, Ordering::SeqCst);
    let behaviour = state.credentials.lock().unwrap().clone();
    match behaviour {
        Credentials::Json(v) => Json(v).into_response(),
        Credentials::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Credentials::Garbage => (StatusCode::OK, "<html>not json</html>").into_response(),
        Credentials::Slow(d, v) => {
            tokio::time::sleep(d).await;
            Json(v).into_response()
        }
    }
}

async fn usage(State(state): State<Arc<PapitaState>>, Json(record): Json<Value>) -> Response {
    state.usage_attempts.fetch_add(1, Ordering::SeqCst);
    let behaviour = state.usage.lock().unwrap().clone();
    match behaviour {
        Usage::Ok => {}
        Usage::Status(s) => return StatusCode::from_u16(s).unwrap().into_response(),
        Usage::Slow(d) => tokio::time::sleep(d).await,
    }
    state.records.lock().unwrap().push(record);
    StatusCode::OK.into_response()
}

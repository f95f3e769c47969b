//! The one shared state: cheap to clone, handed to every handler. The services in it were built
//! by `Application` and own their dependencies; none of them knows this type.

use std::ops::Deref;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::services::chat::ChatService;
use crate::services::consumers::Consumers;
use crate::services::credentials::CredentialProvider;
use crate::services::guardrails::Guardrails;
use crate::services::papita::UsageReporter;
use crate::services::redis::Redis;
use crate::services::session_log::SessionLog;
use crate::services::sessions::Sessions;
use crate::services::usage::UsageStats;

#[derive(Clone)]
pub struct AppState(Arc<Services>);

pub struct Services {
    pub(crate) config: Config,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) chat: Arc<ChatService>,
    /// Rate limits (checked in the HTTP layer, per client address), refusal counts, budgets.
    pub(crate) guardrails: Arc<Guardrails>,
    /// For `/api/openai/info` and `/api/health` (which report the key without calling OpenAI).
    pub credentials: Arc<CredentialProvider>,
    pub(crate) usage: Arc<UsageStats>,
    /// Today's usage per user and guest (the dashboard, `/api/openai/usage?username=`).
    pub(crate) consumers: Arc<Consumers>,
    pub sessions: Arc<Sessions>,
    pub papita: UsageReporter,
    pub session_log: SessionLog,
    pub metrics: Arc<Metrics>,
    /// The Redis connection when `STATE_URL` is set (readiness, metrics).
    pub redis: Option<Arc<Redis>>,
}

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

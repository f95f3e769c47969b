//! The one shared state: cheap to clone, handed to every handler.

use std::ops::Deref;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::services::credentials::CredentialProvider;
use crate::services::openai::OpenAiService;
use crate::services::papita::UsageReporter;
use crate::services::session_log::SessionLog;
use crate::services::sessions::Sessions;
use crate::services::usage::UsageStats;

#[derive(Clone)]
pub struct AppState(Arc<Services>);

pub struct Services {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub credentials: Arc<CredentialProvider>,
    pub openai: OpenAiService,
    pub usage: UsageStats,
    pub papita: UsageReporter,
    pub sessions: Sessions,
    pub session_log: SessionLog,
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

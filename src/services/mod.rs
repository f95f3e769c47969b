//! The services behind the handlers. Each does one job and holds what it uses (clients, stores,
//! the clock), handed to it when `Application` builds it; none knows the HTTP layer or the
//! application state. Outbound calls go through one client per remote: `openai` (with its
//! transport) for OpenAI, `papita::PapitaClient` for Papita.

pub(crate) mod bookkeeping;
pub(crate) mod breaker;
pub(crate) mod chat;
pub(crate) mod consumers;
pub mod credentials;
pub(crate) mod guardrails;
pub mod identity;
pub(crate) mod openai;
pub mod papita;

pub mod redis;
pub mod session_log;
pub mod sessions;
pub(crate) mod upstream;
pub(crate) mod usage;

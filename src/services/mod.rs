//! The services behind the handlers; each owns one job and its outbound calls.

pub mod chat;
pub mod credentials;
pub mod openai;
pub mod openai_transport;
pub mod papita;
pub mod pricing;
pub mod session_log;
pub mod sessions;
pub mod upstream;
pub mod usage;

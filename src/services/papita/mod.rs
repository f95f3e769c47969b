//! Papita, the site's internal API: one client for both of its endpoints (the OpenAI key, usage
//! records), and the background reporter that sends usage records through it.

mod client;
mod connection;
mod reporter;
mod spool;

pub use client::{CONNECT_TIMEOUT, PapitaClient, UsageRejected};
pub use connection::UsageConnection;
pub use reporter::{ReporterSnapshot, ReporterStats, UsageRecord, UsageReporter};

//! Papita, the site's internal API: one client for both of its endpoints (the OpenAI key, usage
//! records), and the background reporter that sends usage records through it.

mod client;
mod reporter;
mod spool;

pub use client::{PapitaClient, UsageRejected};
pub use reporter::{ReporterSnapshot, ReporterStats, UsageRecord, UsageReporter};

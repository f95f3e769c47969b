//! AL-Chat backend: the chat feature's HTTP API (drop-in replacement for the Flask service).
//!
//! The whole application lives in this library so that `main.rs` stays a few lines and the
//! integration tests start the very same thing (`Application::build`).

// Public: what `main` and the integration tests use. The rest is the crate's own, so rustc
// reports what nothing uses.
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub(crate) mod http;
pub mod metrics;
pub(crate) mod server;
pub mod services;
pub mod state;
pub(crate) mod telemetry;

pub use app::Application;
pub use config::Config;

//! AL-Chat backend: the chat feature's HTTP API (drop-in replacement for the Flask service).
//!
//! The whole application lives in this library so that `main.rs` stays a few lines and the
//! integration tests start the very same thing (`Application::build`).

pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod server;
pub mod services;
pub mod state;
pub mod telemetry;

pub use app::Application;
pub use config::Config;

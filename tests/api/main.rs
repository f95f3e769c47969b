//! Integration tests: the real application over real HTTP, with OpenAI and Papita faked by
//! loopback servers. One binary; each module follows a part of ../shared/CONTRACT.md.

mod helpers;
mod metrics;
mod mock_openai;
mod mock_papita;
mod openapi;

mod attribution;
mod binary;
mod browser_pages;
mod browser_snippet;
mod budgets;
mod build_context;
mod chat;
mod client_bounds;
mod context_window;
mod credentials;
mod deployment;
mod failover;
mod faults;
mod guardrails;
mod health;
mod http_errors;
mod identity;
mod openai_routes;
mod papita_client;
mod papita_spool;
mod papita_usage;
mod ports;
mod quotas;
mod redis_server;
mod session_log;
mod sessions;
mod shared_state;
mod shutdown;
mod slow_clients;
mod sse;
mod stack;
mod streaming;
mod unread_streams;
mod usage_stats;

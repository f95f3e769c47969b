//! Benchmarks: AL-Chat against the thinnest possible proxy, on loopback. Run with `benches/run`.
//!
//! This one binary plays several parts, each in its own process so their CPU and memory are
//! their own:
//! - `harness mock PORT DELAY_MS`: a fast OpenAI-compatible upstream (and a Papita that accepts
//!   usage records), answering after DELAY_MS;
//! - `harness proxy PORT UPSTREAM`: the yardstick — axum + one shared reqwest client: parse the
//!   JSON, make the one upstream call, answer; nothing else;
//! - `harness rate URL RPS SECS BODY`: an open-loop load generator at a fixed rate (latency from
//!   the scheduled send time, so a slow server cannot hide its queueing);
//! - no arguments (as `cargo bench` runs it): the orchestrator, which starts the others and the
//!   release build of `al-chat`, drives load with `wrk` and prints the table.

mod load;
mod mock;
mod orchestrate;
#[path = "../../tests/api/ports.rs"]
mod ports;
mod yardstick;

use axum::Router;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some("mock") => mock::serve(args[1].parse().unwrap(), args[2].parse().unwrap()),
        Some("proxy") => yardstick::serve(args[1].parse().unwrap(), args[2].clone()),
        Some("rate") => load::open_loop(
            &args[1],
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            &args[4],
        ),
        _ => orchestrate::run(),
    }
}

/// Serves `app` on 127.0.0.1:`port` until the process is killed (the mock and the yardstick).
/// HTTP/1.1, and HTTP/2 with prior knowledge (h2c) with no limit on concurrent streams that a
/// benchmark could reach, so a client speaking HTTP/2 (`OPENAI_HTTP2=always`) can put all its
/// chats on one connection.
pub(crate) fn run_server(port: u16, app: Router) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let mut builder = Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(1_000_000);
        let builder = std::sync::Arc::new(builder);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            let builder = builder.clone();
            tokio::spawn(async move {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

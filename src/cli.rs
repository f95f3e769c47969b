//! The command line: `al-chat [--env-file PATH] [serve | healthcheck]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::Config;
use crate::{Application, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "al-chat",
    version,
    about = "AL-Chat backend: chat through OpenAI, session logs, usage statistics"
)]
struct Cli {
    /// Read variables from this file instead of ./.env (the environment still wins).
    #[arg(long, value_name = "PATH", global = true)]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service (the default).
    Serve,
    /// GET the local /api/health; exit 0 when healthy, 1 otherwise (Docker HEALTHCHECK).
    Healthcheck,
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.
pub fn run() -> ExitCode {
    let matches = Cli::command().after_help(Config::help_text()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let config = match Config::load(cli.env_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("al-chat: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Healthcheck => healthcheck(&config),
    }
}

fn serve(config: Config) -> ExitCode {
    let _log_guard = telemetry::init(config.log_format, &config.log_filter);
    let open_files = crate::server::raise_open_file_limit();
    if let Some(warning) = telemetry::time_zone_warning(std::env::var("TZ").ok().as_deref()) {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("al-chat: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("al-chat: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(addr = %app.local_addr(), version = env!("CARGO_PKG_VERSION"), open_files, "AL-Chat listening");
        match app.run_until_stopped(crate::app::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

fn healthcheck(config: &Config) -> ExitCode {
    let host = match config.host.as_str() {
        "0.0.0.0" | "::" | "" => "127.0.0.1",
        other => other,
    };
    let url = format!("http://{host}:{}/api/health", config.port);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return ExitCode::FAILURE,
    };
    let healthy = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        let response = client.get(&url).send().await.ok()?;
        let body: serde_json::Value = response.error_for_status().ok()?.json().await.ok()?;
        Some(body["status"] == "healthy")
    });
    if healthy == Some(true) {
        ExitCode::SUCCESS
    } else {
        eprintln!("al-chat healthcheck: {url} is not healthy");
        ExitCode::FAILURE
    }
}

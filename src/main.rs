//! The `order-pipeline` binary: settings, telemetry, then `serve` or `migrate`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use order_pipeline::settings::Settings;
use order_pipeline::startup::Application;
use order_pipeline::{storage, telemetry};
use tracing::{error, info};

/// Takes orders over REST and gets every one of them to RabbitMQ through a
/// transactional outbox. Configured by environment variables (see README).
#[derive(Debug, Parser)]
#[command(name = "order-pipeline", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run migrations, declare the broker topology, start every stage and
    /// serve HTTP (the default).
    Serve,
    /// Run pending migrations (creating the database if needed) and exit.
    Migrate,
}

fn main() -> ExitCode {
    // Usage errors exit 2, --help and --version exit 0 (clap's convention).
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("order-pipeline: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log_filter, settings.log_format);
    telemetry::log_panics();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => migrate(&settings),
        Command::Serve => serve(settings),
    }
}

fn migrate(settings: &Settings) -> ExitCode {
    match storage::migrate_blocking(&settings.database_url) {
        Ok(applied) => {
            info!(applied = ?applied, "migrations up to date");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "migrate failed");
            eprintln!("order-pipeline: migrate failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> ExitCode {
    info!(settings = ?settings, "starting");
    let code = actix_rt::System::new().block_on(async move {
        let app = match Application::build(settings).await {
            Ok(app) => app,
            Err(e) => {
                error!(error = %format!("{e:#}"), "start-up failed");
                eprintln!("order-pipeline: {e:#}");
                return 1;
            }
        };
        let shutdown = app.shutdown_handle();
        actix_rt::spawn(async move {
            let signal = wait_for_signal().await;
            info!(signal, "signal received; shutting down gracefully");
            shutdown.shutdown();
            let signal = wait_for_signal().await;
            error!(signal, "second signal; exiting at once");
            std::process::exit(130);
        });
        app.run_until_stopped().await
    });
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// SIGTERM or SIGINT, whichever comes first.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies by the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

//! `ctr-feedback` entry point: parse settings, set up logs, run the joiner until SIGINT/SIGTERM.

use clap::Parser;
use ctr_feedback::service::{self, FeedbackArgs};

#[derive(Debug, Parser)]
#[command(
    name = "ctr-feedback",
    about = "Join serves and clicks into labeled impressions"
)]
struct Cli {
    #[command(flatten)]
    args: FeedbackArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    match service::run(cli.args, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ctr-feedback failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

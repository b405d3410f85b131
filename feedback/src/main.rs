//! `ctr-feedback` entry point: parse settings, set up logs and metrics, run the joiner until
//! SIGINT/SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use ctr_feedback::{FeedbackArgs, FeedbackConfig};

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
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ctr-feedback failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = FeedbackConfig::try_from(cli.args).context("checking settings")?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP endpoint to {}", config.http_addr))?;
    ctr_feedback::run(config, listener, Some(metrics), shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

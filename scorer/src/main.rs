//! `ctr-scorer` entry point: parse settings, set up logs and metrics, run until SIGINT/SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use ctr_scorer::{ScorerArgs, ScorerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "ctr-scorer",
    about = "Learn CTR from labeled impressions; publish to Redis and HTTP"
)]
struct Cli {
    #[command(flatten)]
    args: ScorerArgs,
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
            tracing::error!(error = format!("{e:#}"), "ctr-scorer failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = ScorerConfig::try_from(cli.args).context("checking settings")?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP API to {}", config.http_addr))?;
    ctr_scorer::run(config, listener, Some(metrics), shutdown_signal()).await?;
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

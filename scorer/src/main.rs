//! `ctr-scorer` entry point: parse settings, set up logs and metrics, run until SIGINT/SIGTERM
//! (or until a task fails: then the exit code is non-zero).

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
    ctr_runtime::process::init_tracing();
    ctr_runtime::process::exit_code("ctr-scorer", run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = ScorerConfig::try_from(cli.args).context("checking settings")?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP API to {}", config.http_addr))?;
    ctr_scorer::run(
        config,
        listener,
        Some(metrics),
        ctr_runtime::process::shutdown_signal(),
    )
    .await?;
    Ok(())
}

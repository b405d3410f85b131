//! `ctr-feedback` entry point: parse settings, set up logs and metrics, run the joiner until
//! SIGINT/SIGTERM (or until it fails: then the exit code is non-zero).

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
    ctr_runtime::process::init_tracing();
    ctr_runtime::process::exit_code("ctr-feedback", run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = FeedbackConfig::try_from(cli.args).context("checking settings")?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP endpoint to {}", config.http_addr))?;
    ctr_feedback::run(
        config,
        listener,
        Some(metrics),
        ctr_runtime::process::shutdown_signal(),
    )
    .await?;
    Ok(())
}

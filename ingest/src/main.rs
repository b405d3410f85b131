//! `ctr-ingest` command line.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ctr_ingest::{adapter, replay, simulate};

#[derive(Debug, Parser)]
#[command(name = "ctr-ingest", about = "Get serve and click events into Kafka")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the simulated marketplace into Kafka.
    Simulate(simulate::SimulateArgs),
    /// Accept JSON serves and clicks over HTTP (POST /v1/events) and produce them to Kafka.
    Http(adapter::AdapterArgs),
    /// Replay recorded events (JSONL, or Avro container files) into Kafka.
    Replay(replay::ReplayArgs),
    /// Export a serves or clicks topic to an Avro container file (replayable).
    Export(replay::ExportArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ctr_runtime::process::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate(args) => simulate::run(args, shutdown_signal())
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
        Command::Http(args) => http(args).await,
        Command::Replay(args) => replay::replay(args, shutdown_signal())
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
        Command::Export(args) => replay::export(args)
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
    };
    ctr_runtime::process::exit_code("ctr-ingest", result)
}

async fn http(args: adapter::AdapterArgs) -> anyhow::Result<()> {
    let config = adapter::AdapterConfig::try_from(args).context("checking settings")?;
    let (metrics, listener) = ctr_runtime::process::http_endpoint(config.http_addr).await?;
    adapter::run(config, listener, Some(metrics), shutdown_signal()).await?;
    Ok(())
}

/// SIGINT or SIGTERM: the simulator stops issuing serves, sends the clicks it owes, and exits;
/// the adapter answers the requests in progress and exits; replay stops after the event in hand.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    ctr_runtime::process::shutdown_signal()
}

//! `ctr-ingest` command line.

use clap::{Parser, Subcommand};
use ctr_ingest::simulate;

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
    let result = match cli.command {
        Command::Simulate(args) => simulate::run(args, shutdown_signal()).await.map(|_| ()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ctr-ingest failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM: the simulator stops issuing serves, sends the clicks it owes, and exits.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

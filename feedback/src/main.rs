//! `ctr-feedback` entry point: parse settings and run the joiner until SIGINT/SIGTERM (or until it
//! fails: then the exit code is non-zero). Everything else is in the library.

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
    let settings = FeedbackConfig::try_from(Cli::parse().args);
    ctr_runtime::process::service_main("ctr-feedback", settings, |c| c.http_addr, ctr_feedback::run)
        .await
}

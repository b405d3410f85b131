//! `ctr-feedback` entry point: parse settings and run the joiner until SIGINT/SIGTERM (or until it
//! fails: then the exit code is non-zero). Everything else is in the library.

use clap::Parser;
use ctr_feedback::{FeedbackArgs, FeedbackConfig};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = FeedbackConfig::try_from(FeedbackArgs::parse());
    ctr_runtime::process::service_main("ctr-feedback", settings, |c| c.http_addr, ctr_feedback::run)
        .await
}

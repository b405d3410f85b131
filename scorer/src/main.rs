//! `ctr-scorer` entry point: parse settings and run the scorer until SIGINT/SIGTERM (or until it
//! fails: then the exit code is non-zero). Everything else is in the library.

use clap::Parser;
use ctr_scorer::{ScorerArgs, ScorerConfig};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = ScorerConfig::try_from(ScorerArgs::parse());
    ctr_runtime::process::service_main("ctr-scorer", settings, |c| c.http_addr, ctr_scorer::run)
        .await
}

//! `ctr-backtest` entry point.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "ctr-backtest",
    about = "Replay recorded traffic through model variants (progressive validation) and write a report"
)]
struct Cli {
    #[command(flatten)]
    args: ctr_backtest::BacktestArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match ctr_backtest::backtest(&cli.args) {
        Ok(report) => {
            for m in &report.models {
                eprintln!(
                    "{:>10}: log loss {:.5}, NE {:.4}, AUC {:.4}, calibration {:.4}, {:.0} records/s",
                    m.name,
                    m.log_loss.unwrap_or(f64::NAN),
                    m.ne.unwrap_or(f64::NAN),
                    m.auc.unwrap_or(f64::NAN),
                    m.calibration.unwrap_or(f64::NAN),
                    m.events_per_sec
                );
            }
            eprintln!(
                "{} records; report in {}",
                report.events,
                cli.args.report.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ctr-backtest: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `ctr-backtest`: replay recorded traffic through model variants, offline.
//!
//! The analyst's question is "what would this variant have done on last week's traffic?". The
//! answer must come from the code that scores live, or it answers a different question: every
//! record goes through the live scorer's partition state ([`ctr_scorer::state`]) with the
//! scorer's model settings ([`ctr_scorer::config::parse_models`]), with progressive
//! validation, deterministically (no clock, no randomness: shedding is off).
//!
//! - [`input`]: labeled impressions as JSON lines, and raw events labeled by the joiner's
//!   state machine, streamed.
//! - [`topic`]: a range of the labeled topic, read back from Kafka.
//! - [`run`]: the replay loop and per-variant timing.
//! - [`baseline`]: the `linfa-logistic` batch baseline (fit on the first half, score the rest).
//! - [`report`]: `report.json`, `report.md`, `timeline.json`, `calibration.svg`, `metrics.svg`.
//!
//! Inputs: labeled impressions (JSON lines), raw serves and clicks (JSON lines of the ingest
//! format) labeled by the joiner's own state machine, or a range (offsets or times) of the
//! labeled topic.

pub mod baseline;
pub mod input;
pub mod report;
pub mod run;
pub mod topic;

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

/// Most partitions `--layout-partitions` takes (each holds a full set of models).
pub const MAX_LAYOUT_PARTITIONS: u32 = 1_024;

/// The input's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `{"ts_ms", "ad_id", "position", "context", "clicked"}` per line.
    LabeledJsonl,
    /// Raw serves and clicks per line (the ingest adapter's JSON format), labeled by the
    /// joiner's state machine.
    EventsJsonl,
    /// A range of the labeled topic (Avro), `--input` naming the topic; see `--from`, `--to`.
    LabeledTopic,
}

/// Settings of `ctr-backtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct BacktestArgs {
    /// The recorded traffic: a file, or with `--format labeled-topic` the topic's name.
    #[arg(long)]
    pub input: PathBuf,
    /// What the input is.
    #[arg(long, value_enum, default_value_t = Format::LabeledJsonl)]
    pub format: Format,
    /// Directory for the report (created if missing).
    #[arg(long)]
    pub report: PathBuf,
    /// Model variants, comma-separated: counts, ftrl, combined (the scorer's settings).
    #[arg(long, default_value = "counts,ftrl,combined")]
    pub models: String,
    /// A point of the metrics-over-time series every this many records.
    #[arg(long, default_value_t = 10_000)]
    pub sample_every: u64,
    /// Label-ID dedupe horizon, event-time ms (as the scorer's `--dedupe-horizon-ms`).
    #[arg(long, default_value_t = 900_000)]
    pub dedupe_horizon_ms: i64,
    /// FTRL coordinates idle this long in event time are evicted (as the scorer's `--idle-ms`).
    #[arg(long, default_value_t = 3_600_000)]
    pub idle_ms: i64,
    /// Joiner settings for `events-jsonl` (as `ctr-feedback`'s): attribution window, ms.
    #[arg(long, default_value_t = 30_000)]
    pub window_ms: i64,
    /// Extra event time a serve stays open after its window, ms.
    #[arg(long, default_value_t = 5_000)]
    pub grace_ms: i64,
    /// How long closed serves are remembered for late-click corrections, ms.
    #[arg(long, default_value_t = 300_000)]
    pub late_horizon_ms: i64,
    /// Bounded out-of-orderness of event times, ms.
    #[arg(long, default_value_t = 2_000)]
    pub max_out_of_order_ms: i64,
    /// `labeled-topic`: the brokers and how to reach them (TLS, SASL), as for the services.
    #[command(flatten)]
    pub kafka: ctr_runtime::flags::KafkaFlags,
    /// `labeled-topic`: first record: beginning, offset:N, time:T (Unix ms or RFC 3339).
    #[arg(long, default_value = "beginning")]
    pub from: topic::Bound,
    /// `labeled-topic`: end of the range, exclusive: end (what the topic holds now, read until
    /// it goes quiet), offset:N, time:T.
    #[arg(long, default_value = "end")]
    pub to: topic::Bound,
    /// `labeled-topic`: only these partitions (comma-separated); one partition replays exactly
    /// what its live owner learned from.
    #[arg(long, value_delimiter = ',')]
    pub partitions: Option<Vec<i32>>,
    /// Replay the layout of a labeled topic with this many partitions: each record learned in
    /// the partition its ad ID is produced to, each partition alone, as its live owner learns
    /// (use the production topic's count to replay what production learned). 1: one state
    /// learns from everything.
    #[arg(long, default_value_t = 1)]
    pub layout_partitions: u32,
    /// Also fit a `linfa-logistic` logistic regression on the first half of the input and
    /// score the second half, beside every variant's metrics over that second half (reads the
    /// input three times: to count, to replay, to fit and score).
    #[arg(long)]
    pub batch_baseline: bool,
    /// Skip and count unusable lines (the report lists the first ten) instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
    /// No progress bar (also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// Why a backtest failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input file could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What opening it said.
        source: std::io::Error,
    },
    /// A setting that cannot work (the problem in words).
    #[error("{0}")]
    Settings(String),
    /// The replay failed.
    #[error(transparent)]
    Run(#[from] run::RunError),
    /// The report could not be written.
    #[error(transparent)]
    Report(#[from] report::ReportError),
    /// The topic could not be read.
    #[error("reading the topic: {0}")]
    Topic(#[from] topic::TopicError),
}

/// Runs a backtest and writes its report; returns `report.json`'s content.
pub fn backtest(args: &BacktestArgs) -> Result<report::Report, Error> {
    let models = ctr_scorer::config::parse_models(&args.models)
        .map_err(|e| Error::Settings(e.to_string()))?;
    if args.sample_every == 0 || args.dedupe_horizon_ms < 1_000 || args.idle_ms <= 0 {
        return Err(Error::Settings(
            "need sample_every >= 1, dedupe_horizon_ms >= 1000, idle_ms > 0".into(),
        ));
    }
    if !(1..=MAX_LAYOUT_PARTITIONS).contains(&args.layout_partitions) {
        return Err(Error::Settings(format!(
            "need 1 <= layout_partitions <= {MAX_LAYOUT_PARTITIONS}"
        )));
    }
    let mut cfg = run::RunConfig {
        dedupe_horizon_ms: args.dedupe_horizon_ms,
        idle_ms: args.idle_ms,
        sample_every: args.sample_every,
        skip_invalid: args.skip_invalid,
        partitions: args.layout_partitions,
        ..run::RunConfig::new(models)
    };
    if args.batch_baseline {
        // A first pass counts the records, so both halves are known before the online run.
        let mut source = plain_source(args)?;
        let mut n = 0u64;
        loop {
            match source.next_labeled() {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(Ok(_)) => {}
                Err(Err(io)) => return Err(run::RunError::Io(io).into()),
            }
        }
        cfg.split_at = Some(n / 2);
    }
    let (outcome, input) = match args.format {
        Format::LabeledTopic => from_topic(args, &cfg)?,
        Format::LabeledJsonl | Format::EventsJsonl => {
            (from_file(args, &cfg)?, args.input.display().to_string())
        }
    };
    let baseline = match cfg.split_at {
        Some(split) => Some(baseline::run(plain_source(args)?, split)?),
        None => None,
    };
    Ok(report::write_all(
        &args.report,
        &input,
        &outcome,
        baseline.as_ref(),
    )?)
}

/// The input again, without a progress bar (the batch baseline's extra passes).
fn plain_source(args: &BacktestArgs) -> Result<Box<dyn input::Source>, Error> {
    if args.format == Format::LabeledTopic {
        return Ok(Box::new(topic::LabeledTopic::open(&topic_range(args)?)?));
    }
    let file = File::open(&args.input).map_err(|source| Error::Open {
        path: args.input.clone(),
        source,
    })?;
    let reader = BufReader::with_capacity(1 << 16, file);
    Ok(match args.format {
        Format::EventsJsonl => Box::new(input::EventsJsonl::new(reader, join_config(args)?)),
        _ => Box::new(input::LabeledJsonl::new(reader)),
    })
}

fn topic_range(args: &BacktestArgs) -> Result<topic::TopicRange, Error> {
    Ok(topic::TopicRange {
        kafka: args.kafka.clone().check().map_err(Error::Settings)?,
        topic: args.input.display().to_string(),
        partitions: args.partitions.clone(),
        from: args.from,
        to: args.to,
        idle: std::time::Duration::from_millis(1_500),
    })
}

/// The joiner's settings for `events-jsonl`, checked.
fn join_config(args: &BacktestArgs) -> Result<ctr_feedback::join::JoinConfig, Error> {
    let join = ctr_feedback::join::JoinConfig {
        window_ms: args.window_ms,
        grace_ms: args.grace_ms,
        late_horizon_ms: args.late_horizon_ms,
        max_out_of_order_ms: args.max_out_of_order_ms,
        ..Default::default()
    };
    if join.window_ms <= 0 || join.grace_ms < 0 || join.late_horizon_ms < 0 {
        return Err(Error::Settings(
            "need window_ms > 0, grace_ms >= 0, late_horizon_ms >= 0".into(),
        ));
    }
    Ok(join)
}

/// Replays a range of the labeled topic; returns the outcome and how to name the input.
fn from_topic(
    args: &BacktestArgs,
    cfg: &run::RunConfig,
) -> Result<(run::RunOutcome, String), Error> {
    let range = topic_range(args)?;
    let source = topic::LabeledTopic::open(&range)?;
    let bar = ctr_ingest::replay::progress_bar(source.records_in_range(), args.no_progress);
    let outcome = run::run(source, cfg, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let name = format!(
        "topic {} from {:?} to {:?}",
        range.topic, range.from, range.to
    );
    Ok((outcome, name))
}

/// Replays a JSON-lines file, streamed, with a progress bar over its bytes.
fn from_file(args: &BacktestArgs, cfg: &run::RunConfig) -> Result<run::RunOutcome, Error> {
    let open = |source| Error::Open {
        path: args.input.clone(),
        source,
    };
    let file = File::open(&args.input).map_err(open)?;
    let size = file.metadata().map_err(open)?.len();
    let bar = ctr_ingest::replay::progress_bar(size, args.no_progress);
    let reader = BufReader::with_capacity(1 << 16, bar.wrap_read(file));
    let progress = |n: u64| {
        if n % (64 * 1024) < 1024 {
            bar.set_message(format!("{n} records"));
        }
    };
    let outcome = if args.format == Format::EventsJsonl {
        run::run(
            input::EventsJsonl::new(reader, join_config(args)?),
            cfg,
            progress,
        )?
    } else {
        run::run_labeled(reader, cfg, progress)?
    };
    bar.finish_and_clear();
    Ok(outcome)
}

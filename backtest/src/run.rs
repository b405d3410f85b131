//! The replay loop: each labeled impression through each model variant, by the live scorer's
//! own partition state ([`ctr_scorer::state::PartitionState::apply`], normal policy: no
//! shedding, learning on), with progressive validation (every example is scored before the
//! model learns from it; the variants record it).
//!
//! Each variant runs in its own partition state so its cost can be timed apart; variants never
//! interact, so its state is the one it would have beside the others. Records are handled in
//! chunks of [`CHUNK`]: one clock reading per chunk and variant keeps the timing honest and
//! cheap. Memory is bounded by the models (FTRL coordinates idle for `idle_ms` of event time
//! are evicted every [`MAINTAIN_EVERY`] records, as the scorer does at each checkpoint) and
//! the label-ID dedupe horizon, never by the input's length.

use std::io::BufRead;
use std::time::{Duration, Instant};

use ctr_models::{ModelSet, VariantConfig};
use ctr_schemas::LabeledImpression;
use ctr_scorer::state::{PartitionState, Policy};
use serde::Serialize;

use crate::input::{BadLine, LabeledJsonl, Source};

const CHUNK: usize = 1_024;
const MAINTAIN_EVERY: u64 = 100_000;

/// Settings of one backtest.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub models: Vec<VariantConfig>,
    /// Label-ID dedupe horizon, event-time ms (the scorer's default: 15 min).
    pub dedupe_horizon_ms: i64,
    /// FTRL coordinates idle this long in event time are evicted (the scorer's default: 1 h).
    pub idle_ms: i64,
    /// A point of the metrics-over-time series every this many records.
    pub sample_every: u64,
    /// Skip (and count) unusable lines instead of stopping at the first.
    pub skip_invalid: bool,
    /// Take a copy of every variant's metrics once this many records have been read (the
    /// batch baseline's split), so the report can give the metrics of the records after it.
    pub split_at: Option<u64>,
}

/// Why a backtest stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading the input: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} (use --skip-invalid to skip such lines)")]
    Bad(BadLine),
    #[error("model settings: {0}")]
    Models(ctr_models::ModelError),
    #[error("the batch baseline: {0}")]
    Baseline(String),
}

/// The cumulative progressive metrics of one variant at some point of the input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub events: u64,
    pub log_loss: Option<f64>,
    pub ne: Option<f64>,
    pub auc: Option<f64>,
    pub calibration: Option<f64>,
}

/// One variant's run.
#[derive(Debug)]
pub struct ModelRun {
    pub name: String,
    pub state: PartitionState,
    /// Time spent in this variant's learning path (apply and maintenance).
    pub busy: Duration,
    pub timeline: Vec<Point>,
    /// The variant's cumulative metrics at [`RunConfig::split_at`].
    pub at_split: Option<ctr_models::Metrics>,
}

impl ModelRun {
    fn point(&self, events: u64) -> Point {
        let m = self.state.models().variants()[0].metrics();
        Point {
            events,
            log_loss: m.log_loss(),
            ne: m.normalized_entropy(),
            auc: m.auc(),
            calibration: m.calibration(),
        }
    }

    /// The variant's metrics over the records after [`RunConfig::split_at`].
    pub fn after_split(&self) -> Option<ctr_models::Metrics> {
        let now = self.state.models().variants()[0].metrics();
        self.at_split.as_ref().map(|then| now.since(then))
    }

    /// Records per second of this variant's learning path alone.
    pub fn events_per_sec(&self, events: u64) -> f64 {
        events as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// What a backtest did.
#[derive(Debug)]
pub struct RunOutcome {
    pub events: u64,
    /// Unusable lines skipped (with `skip_invalid`), and records a model refused.
    pub skipped: u64,
    /// The first few lines skipped, for the report.
    pub first_bad: Vec<BadLine>,
    pub duplicates: u64,
    pub runs: Vec<ModelRun>,
    pub wall: Duration,
    /// What the input source reports about itself (the joiner's counts, say).
    pub notes: Vec<String>,
}

/// Replays labeled JSON lines from `reader` through every variant.
pub fn run_labeled(
    reader: impl BufRead,
    cfg: &RunConfig,
    progress: impl FnMut(u64),
) -> Result<RunOutcome, RunError> {
    run(LabeledJsonl::new(reader), cfg, progress)
}

/// Replays `source` through every variant. `progress` is called after each chunk with the
/// number of records so far.
pub fn run(
    mut input: impl Source,
    cfg: &RunConfig,
    mut progress: impl FnMut(u64),
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let mut runs = cfg
        .models
        .iter()
        .map(|m| {
            Ok(ModelRun {
                name: m.name.clone(),
                state: PartitionState::new(
                    ModelSet::new(vec![m.clone()]).map_err(RunError::Models)?,
                    cfg.dedupe_horizon_ms,
                ),
                busy: Duration::ZERO,
                timeline: Vec::new(),
                at_split: None,
            })
        })
        .collect::<Result<Vec<_>, RunError>>()?;
    let mut chunk: Vec<(LabeledImpression, String)> = Vec::with_capacity(CHUNK);
    let (mut events, mut skipped, mut duplicates) = (0u64, 0u64, 0u64);
    let mut refused = vec![false; CHUNK];
    let mut done = false;
    let mut first_bad = Vec::new();
    // Records read, and whether the metrics were copied at the split.
    let (mut read, mut split_taken) = (0u64, cfg.split_at.is_none());
    while !done {
        chunk.clear();
        // A chunk ends at the split, so the copy is taken exactly there.
        while chunk.len() < CHUNK && (split_taken || cfg.split_at != Some(read)) {
            match input.next_labeled() {
                Ok(Some(l)) => {
                    read += 1;
                    let key = l.context.key();
                    chunk.push((l, key));
                }
                Ok(None) => {
                    done = true;
                    break;
                }
                Err(Ok(bad)) if cfg.skip_invalid => {
                    skipped += 1;
                    if first_bad.len() < 10 {
                        first_bad.push(bad);
                    }
                }
                Err(Ok(bad)) => return Err(RunError::Bad(bad)),
                Err(Err(io)) => return Err(RunError::Io(io)),
            }
        }
        refused.iter_mut().for_each(|r| *r = false);
        let mut released = Vec::new();
        for (v, run) in runs.iter_mut().enumerate() {
            let t = Instant::now();
            for (i, (l, key)) in chunk.iter().enumerate() {
                // Clicks released by this record: the live scorer republishes their ads; a
                // backtest has nothing to republish.
                released.clear();
                match run.state.apply(l, key, Policy::NORMAL, &mut released) {
                    Ok(ctr_scorer::state::Outcome::Duplicate) if v == 0 => duplicates += 1,
                    Ok(_) => {}
                    // A model refused the example (nothing changed): like the scorer's poison.
                    Err(_) => refused[i] = true,
                }
            }
            run.busy += t.elapsed();
        }
        let refused_now = refused[..chunk.len()].iter().filter(|r| **r).count() as u64;
        skipped += refused_now;
        let before = events;
        events += chunk.len() as u64 - refused_now;
        if before / MAINTAIN_EVERY != events / MAINTAIN_EVERY {
            for run in &mut runs {
                let t = Instant::now();
                run.state.maintain(cfg.idle_ms);
                run.busy += t.elapsed();
            }
        }
        if !split_taken && cfg.split_at == Some(read) {
            for run in &mut runs {
                run.at_split = Some(run.state.models().variants()[0].metrics().clone());
            }
            split_taken = true;
        }
        if before / cfg.sample_every != events / cfg.sample_every || (done && events > before) {
            for run in &mut runs {
                let p = run.point(events);
                run.timeline.push(p);
            }
        }
        progress(events);
    }
    Ok(RunOutcome {
        events,
        skipped,
        first_bad,
        duplicates,
        runs,
        wall: started.elapsed(),
        notes: input.notes(),
    })
}

//! The replay loop: each labeled impression through each model variant, by the live scorer's
//! own partition state ([`ctr_scorer::state::PartitionState::apply`], normal policy: no
//! shedding, learning on), with progressive validation (every example is scored before the
//! model learns from it; the variants record it).
//!
//! Each variant runs in its own partition states so its cost can be timed apart; variants never
//! interact, so its state is the one it would have beside the others.
//!
//! The layout is the live one's: with [`RunConfig::partitions`] = N, each record goes to the
//! partition the producers' partitioner gives its key, the ad ID, in an N-partition labeled
//! topic ([`partition_of`]), and each partition learns alone, as its live owner does. So a
//! backtest with the production partition count ends with every partition in the state its
//! live owner reaches. With N = 1 (the default) one state learns from everything, as the
//! owner of a one-partition topic does. Metrics are summed over the partitions. Partitions
//! learn one after another on this thread: learning them on several threads was tried and
//! was slower, because each record then crosses cores from the thread that parsed it (see
//! docs/BENCHMARKS.md).
//!
//! Records are handled in chunks of [`CHUNK`]: one clock reading per chunk and variant keeps
//! the timing honest and cheap, and a chunk is small enough that its records, read once per
//! variant, are still in the cache (16k records per chunk cost a third of the rate). Memory is bounded by the models (FTRL coordinates idle for `idle_ms` of event time
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
    /// The variants to replay, side by side.
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
    /// Partitions of the labeled topic whose layout is replayed (at least 1).
    pub partitions: u32,
}

impl RunConfig {
    /// The scorer's defaults for `models`: one partition, no split.
    pub fn new(models: Vec<VariantConfig>) -> Self {
        Self {
            models,
            dedupe_horizon_ms: 900_000,
            idle_ms: 3_600_000,
            sample_every: 10_000,
            skip_invalid: false,
            split_at: None,
            partitions: 1,
        }
    }
}

/// The partition of the labeled topic an ad is learned in (the contract's partitioner).
pub use ctr_schemas::partition::partition_of;

/// Why a backtest stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The input could not be read.
    #[error("reading the input: {0}")]
    Io(#[from] std::io::Error),
    /// An unusable line, without `skip_invalid`.
    #[error("{0} (use --skip-invalid to skip such lines)")]
    Bad(BadLine),
    /// A variant's settings are invalid.
    #[error("model settings: {0}")]
    Models(ctr_models::ModelError),
    /// The batch baseline could not be fitted.
    #[error("the batch baseline: {0}")]
    Baseline(String),
}

/// The cumulative progressive metrics of one variant at some point of the input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Records replayed up to this point.
    pub events: u64,
    /// Mean log loss so far.
    pub log_loss: Option<f64>,
    /// Normalized entropy so far.
    pub ne: Option<f64>,
    /// AUC so far.
    pub auc: Option<f64>,
    /// Σp / Σy so far.
    pub calibration: Option<f64>,
}

/// One variant's run.
#[derive(Debug)]
pub struct ModelRun {
    /// The variant's name.
    pub name: String,
    /// The variant's state in each partition (partition `p` at index `p`).
    pub states: Vec<PartitionState>,
    /// Time spent in this variant's learning path (apply and maintenance).
    pub busy: Duration,
    /// Its cumulative metrics along the input.
    pub timeline: Vec<Point>,
    /// The variant's cumulative metrics at [`RunConfig::split_at`].
    pub at_split: Option<ctr_models::Metrics>,
}

impl ModelRun {
    /// The variant's cumulative metrics, summed over the partitions.
    pub fn metrics(&self) -> ctr_models::Metrics {
        let mut states = self
            .states
            .iter()
            .map(|s| s.models().variants()[0].metrics());
        let mut sum = states.next().cloned().unwrap_or_default();
        states.for_each(|m| sum.merge(m));
        sum
    }

    fn point(&self, events: u64) -> Point {
        let m = self.metrics();
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
        let now = self.metrics();
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
    /// Records replayed.
    pub events: u64,
    /// Unusable lines skipped (with `skip_invalid`), and records a model refused.
    pub skipped: u64,
    /// The first few lines skipped, for the report.
    pub first_bad: Vec<BadLine>,
    /// Label IDs seen before (changed nothing).
    pub duplicates: u64,
    /// One run per variant.
    pub runs: Vec<ModelRun>,
    /// Wall-clock time of the whole replay.
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

/// One record of a chunk: the label, its context key and its partition.
struct Record {
    label: LabeledImpression,
    context_key: String,
    partition: u32,
}

/// What one chunk did to one variant's partitions.
#[derive(Default)]
struct Applied {
    duplicates: u64,
    /// Indices (in the chunk) of the records a model refused.
    refused: Vec<usize>,
}

/// Applies the records of a chunk to one variant's partition states (`by_partition[p]`: the
/// indices of partition `p`'s records, in order).
fn apply_partitions(
    states: &mut [PartitionState],
    chunk: &[Record],
    by_partition: &[Vec<usize>],
) -> Applied {
    let mut applied = Applied::default();
    let mut released = Vec::new();
    for (state, indices) in states.iter_mut().zip(by_partition) {
        for &i in indices {
            let r = &chunk[i];
            // Clicks released by this record: the live scorer republishes their ads; a
            // backtest has nothing to republish.
            released.clear();
            match state.apply(&r.label, &r.context_key, Policy::NORMAL, &mut released) {
                Ok(ctr_scorer::state::Outcome::Duplicate) => applied.duplicates += 1,
                Ok(_) => {}
                // A model refused the example (nothing changed): like the scorer's poison.
                Err(_) => applied.refused.push(i),
            }
        }
    }
    applied
}

/// Replays `source` through every variant. `progress` is called after each chunk with the
/// number of records so far.
pub fn run(
    mut input: impl Source,
    cfg: &RunConfig,
    mut progress: impl FnMut(u64),
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let partitions = cfg.partitions.max(1);
    let mut runs = cfg
        .models
        .iter()
        .map(|m| {
            let set = ModelSet::new(vec![m.clone()]).map_err(RunError::Models)?;
            Ok(ModelRun {
                name: m.name.clone(),
                states: (0..partitions)
                    .map(|_| PartitionState::new(set.clone(), cfg.dedupe_horizon_ms))
                    .collect(),
                busy: Duration::ZERO,
                timeline: Vec::new(),
                at_split: None,
            })
        })
        .collect::<Result<Vec<_>, RunError>>()?;
    let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK);
    let mut by_partition: Vec<Vec<usize>> = vec![Vec::new(); partitions as usize];
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
                Ok(Some(label)) => {
                    read += 1;
                    chunk.push(Record {
                        context_key: label.context.key(),
                        partition: partition_of(&label.ad_id, partitions),
                        label,
                    });
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
        by_partition.iter_mut().for_each(Vec::clear);
        for (i, r) in chunk.iter().enumerate() {
            by_partition[r.partition as usize].push(i);
        }
        refused.iter_mut().for_each(|r| *r = false);
        for (v, run) in runs.iter_mut().enumerate() {
            let t = Instant::now();
            let applied = apply_partitions(&mut run.states, &chunk, &by_partition);
            run.busy += t.elapsed();
            // Every variant sees the same duplicates: count them once.
            if v == 0 {
                duplicates += applied.duplicates;
            }
            for i in applied.refused {
                refused[i] = true;
            }
        }
        let refused_now = refused[..chunk.len()].iter().filter(|r| **r).count() as u64;
        skipped += refused_now;
        let before = events;
        events += chunk.len() as u64 - refused_now;
        if before / MAINTAIN_EVERY != events / MAINTAIN_EVERY {
            for run in &mut runs {
                let t = Instant::now();
                for state in &mut run.states {
                    state.maintain(cfg.idle_ms);
                }
                run.busy += t.elapsed();
            }
        }
        if !split_taken && cfg.split_at == Some(read) {
            for run in &mut runs {
                run.at_split = Some(run.metrics());
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

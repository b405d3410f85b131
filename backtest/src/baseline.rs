//! The batch baseline (`--batch-baseline`): a `linfa-logistic` logistic regression fitted once
//! on the first half of the input and scoring the second half, beside the online variants'
//! progressive metrics over the same second half. It answers "what would a model retrained
//! offline (say daily) give, against learning online?".
//!
//! Features are those of the peer comparison (`backtest/peers/compare.py`): one-hot ad,
//! position, each context field, and the ad crossed with each context field, with the
//! vocabulary of the training half (a value first seen in the second half adds nothing).
//! `linfa-logistic` takes a dense matrix, so training uses at most [`MAX_TRAIN_ROWS`] rows (the
//! last ones of the first half) and [`MAX_FEATURES`] features (the most frequent); the report
//! states both. Only labels are examples (late-click corrections are not).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use ctr_models::Metrics;
use ctr_schemas::{LabelKind, LabeledImpression};
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};
use serde::Serialize;

use crate::input::Source;
use crate::run::RunError;

/// Training rows kept (a dense f64 matrix of rows × features).
pub const MAX_TRAIN_ROWS: usize = 100_000;
/// Features kept, the most frequent in the training rows.
pub const MAX_FEATURES: usize = 4_096;
/// Rows scored per matrix.
const SCORE_BATCH: usize = 4_096;

/// The baseline's line in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BaselineReport {
    /// The batch model's name.
    pub name: String,
    /// Records of the input before the split (the first half).
    pub split_at: u64,
    /// Rows it was fitted on (the first half, negatives possibly subsampled).
    pub train_rows: usize,
    /// Features after one-hot encoding.
    pub features: usize,
    /// Time to fit, s.
    pub fit_seconds: f64,
    /// Rows scored (the second half).
    pub scored: u64,
    /// Mean log loss over the scored rows.
    pub log_loss: Option<f64>,
    /// Normalized entropy over the scored rows.
    pub ne: Option<f64>,
    /// AUC over the scored rows.
    pub auc: Option<f64>,
    /// Σp / Σy over the scored rows.
    pub calibration: Option<f64>,
    /// Rows scored per second (the fit excluded).
    pub events_per_sec: f64,
}

/// The one-hot features of `l`, as strings.
fn features(l: &LabeledImpression) -> Vec<String> {
    let pairs = l.context.pairs();
    let mut out = Vec::with_capacity(2 + 2 * pairs.len());
    out.push(format!("ad={}", l.ad_id));
    out.push(format!("pos={}", l.position));
    for (k, v) in &pairs {
        out.push(format!("{k}={v}"));
        out.push(format!("ad={}^{k}={v}", l.ad_id));
    }
    out
}

fn matrix(rows: &[Vec<usize>], width: usize) -> Array2<f64> {
    let mut x = Array2::<f64>::zeros((rows.len(), width));
    for (i, cols) in rows.iter().enumerate() {
        for &j in cols {
            x[[i, j]] = 1.0;
        }
    }
    x
}

/// The next usable record of `source`, counting it in `index`. Unusable records were stopped at
/// or skipped by the online run already.
fn next_record(
    source: &mut impl Source,
    index: &mut u64,
) -> Result<Option<LabeledImpression>, RunError> {
    loop {
        match source.next_labeled() {
            Ok(Some(l)) => {
                *index += 1;
                return Ok(Some(l));
            }
            Ok(None) => return Ok(None),
            Err(Ok(_)) => continue,
            Err(Err(io)) => return Err(RunError::Io(io)),
        }
    }
}

/// Reads `source` (the same input the online run read), fits on records `0..split_at`, scores
/// the rest.
pub fn run(mut source: impl Source, split_at: u64) -> Result<BaselineReport, RunError> {
    let mut index = 0u64;
    // The training half: the last MAX_TRAIN_ROWS labels before the split.
    let mut train: VecDeque<(Vec<String>, bool)> = VecDeque::new();
    while index < split_at {
        let Some(l) = next_record(&mut source, &mut index)? else {
            break;
        };
        if l.kind == LabelKind::Label {
            if train.len() == MAX_TRAIN_ROWS {
                train.pop_front();
            }
            train.push_back((features(&l), l.clicked));
        }
    }
    let mut freq: HashMap<&str, usize> = HashMap::new();
    for (fs, _) in &train {
        for f in fs {
            *freq.entry(f.as_str()).or_default() += 1;
        }
    }
    let mut vocab: Vec<(&str, usize)> = freq.into_iter().collect();
    vocab.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    vocab.truncate(MAX_FEATURES);
    let column: HashMap<String, usize> = vocab
        .iter()
        .enumerate()
        .map(|(j, (f, _))| ((*f).to_string(), j))
        .collect();
    let width = column.len().max(1);
    let encode = |fs: &[String]| -> Vec<usize> {
        fs.iter().filter_map(|f| column.get(f).copied()).collect()
    };
    let rows: Vec<Vec<usize>> = train.iter().map(|(fs, _)| encode(fs)).collect();
    let y: Array1<bool> = train.iter().map(|(_, c)| *c).collect();
    let train_rows = rows.len();
    let fit_started = Instant::now();
    let both_classes = y.iter().any(|c| *c) && y.iter().any(|c| !*c);
    let model = if both_classes {
        let data = Dataset::new(matrix(&rows, width), y);
        Some(
            LogisticRegression::default()
                .alpha(1.0)
                .max_iterations(200)
                .fit(&data)
                .map_err(|e| RunError::Baseline(e.to_string()))?,
        )
    } else {
        None
    };
    let fit_seconds = fit_started.elapsed().as_secs_f64();
    drop(rows);

    // The second half, scored a batch at a time.
    let mut metrics = Metrics::default();
    let mut scored = 0u64;
    let mut scoring = std::time::Duration::ZERO;
    let mut batch: Vec<(Vec<usize>, bool)> = Vec::with_capacity(SCORE_BATCH);
    let mut score = |batch: &mut Vec<(Vec<usize>, bool)>| {
        if batch.is_empty() {
            return;
        }
        let t = Instant::now();
        let rows: Vec<Vec<usize>> = batch.iter().map(|(r, _)| r.clone()).collect();
        let p: Array1<f64> = match &model {
            // linfa's "positive" class is the larger one (no click, here): take the click's.
            Some(m) if m.labels().pos.class => m.predict_probabilities(&matrix(&rows, width)),
            Some(m) => m
                .predict_probabilities(&matrix(&rows, width))
                .mapv(|q| 1.0 - q),
            // One class only in training: predict its frequency (0 or 1, clamped by the metrics).
            None => Array1::from_elem(
                rows.len(),
                f64::from(u8::from(train.front().is_some_and(|t| t.1))),
            ),
        };
        for (p, (_, clicked)) in p.iter().zip(batch.iter()) {
            metrics.record(*p, *clicked, 1.0);
        }
        scoring += t.elapsed();
        scored += batch.len() as u64;
        batch.clear();
    };
    while let Some(l) = next_record(&mut source, &mut index)? {
        if l.kind == LabelKind::Label {
            batch.push((encode(&features(&l)), l.clicked));
            if batch.len() == SCORE_BATCH {
                score(&mut batch);
            }
        }
    }
    score(&mut batch);
    Ok(BaselineReport {
        name: "linfa-logistic (batch: first half)".into(),
        split_at,
        train_rows,
        features: column.len(),
        fit_seconds,
        scored,
        log_loss: metrics.log_loss(),
        ne: metrics.normalized_entropy(),
        auc: metrics.auc(),
        calibration: metrics.calibration(),
        events_per_sec: scored as f64 / scoring.as_secs_f64().max(1e-9),
    })
}

//! The backtest's report: `report.json` (the scriptable summary), `report.md` (for people),
//! `timeline.json` (metrics over the input), and two SVG plots: `calibration.svg`
//! (reliability bins per model against the diagonal) and `metrics.svg` (normalized entropy and
//! calibration over the input, per model).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;

use crate::baseline::BaselineReport;
use crate::run::RunOutcome;

/// One model's line in `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    /// The variant's name.
    pub name: String,
    /// Mean progressive log loss.
    pub log_loss: Option<f64>,
    /// Progressive normalized entropy (below 1 beats the base rate).
    pub ne: Option<f64>,
    /// Progressive AUC.
    pub auc: Option<f64>,
    /// Progressive Σp / Σy.
    pub calibration: Option<f64>,
    /// Records per second through this model's learning path (reading and parsing excluded).
    pub events_per_sec: f64,
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Records replayed.
    pub events: u64,
    /// Every variant's line.
    pub models: Vec<ModelReport>,
    /// With `--batch-baseline`: the batch model and every variant over the second half.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineSection>,
}

/// The batch baseline beside the online variants, all over the records after the split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BaselineSection {
    /// The batch model's line.
    pub batch: BaselineReport,
    /// Each online variant over the same records.
    pub online_after_split: Vec<Scores>,
}

/// A model's metrics over part of the input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// The model's name.
    pub name: String,
    /// Mean log loss.
    pub log_loss: Option<f64>,
    /// Normalized entropy.
    pub ne: Option<f64>,
    /// AUC.
    pub auc: Option<f64>,
    /// Σp / Σy.
    pub calibration: Option<f64>,
}

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What writing it said.
        source: std::io::Error,
    },
    /// A chart could not be drawn.
    #[error("drawing {path}: {problem}")]
    Plot {
        /// The chart's file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

impl Report {
    /// The report of `outcome`, with the batch baseline's line when one ran.
    pub fn of(outcome: &RunOutcome, baseline: Option<&BaselineReport>) -> Self {
        Self {
            baseline: baseline.map(|b| BaselineSection {
                batch: b.clone(),
                online_after_split: outcome
                    .runs
                    .iter()
                    .filter_map(|r| {
                        let m = r.after_split()?;
                        Some(Scores {
                            name: r.name.clone(),
                            log_loss: m.log_loss(),
                            ne: m.normalized_entropy(),
                            auc: m.auc(),
                            calibration: m.calibration(),
                        })
                    })
                    .collect(),
            }),
            events: outcome.events,
            models: outcome
                .runs
                .iter()
                .map(|r| {
                    let m = r.metrics();
                    ModelReport {
                        name: r.name.clone(),
                        log_loss: m.log_loss(),
                        ne: m.normalized_entropy(),
                        auc: m.auc(),
                        calibration: m.calibration(),
                        events_per_sec: r.events_per_sec(outcome.events),
                    }
                })
                .collect(),
        }
    }
}

fn write(path: PathBuf, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(&path, bytes).map_err(|source| ReportError::Io { path, source })
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("–".to_string(), |v| format!("{v:.5}"))
}

/// Writes every report file into `dir` (created if missing); returns `report.json`'s content.
pub fn write_all(
    dir: &Path,
    input: &str,
    outcome: &RunOutcome,
    baseline: Option<&BaselineReport>,
) -> Result<Report, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let report = Report::of(outcome, baseline);
    let json = serde_json::to_vec_pretty(&report).expect("a report serializes");
    write(dir.join("report.json"), &json)?;
    let timeline: Vec<serde_json::Value> = outcome
        .runs
        .iter()
        .map(|r| serde_json::json!({"name": r.name, "points": r.timeline}))
        .collect();
    let json = serde_json::to_vec_pretty(&serde_json::json!({ "models": timeline }))
        .expect("a timeline serializes");
    write(dir.join("timeline.json"), &json)?;
    write(
        dir.join("report.md"),
        markdown(input, outcome, &report).as_bytes(),
    )?;
    plot_calibration(&dir.join("calibration.svg"), outcome)?;
    plot_metrics(&dir.join("metrics.svg"), outcome)?;
    Ok(report)
}

fn markdown(input: &str, outcome: &RunOutcome, report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Backtest report\n");
    let _ = writeln!(
        md,
        "Input: `{input}`: {} labeled records replayed in {:.1} s \
         ({:.0} records/s including reading and parsing); {} skipped; {} duplicate label IDs \
         dropped.\n",
        outcome.events,
        outcome.wall.as_secs_f64(),
        outcome.events as f64 / outcome.wall.as_secs_f64().max(1e-9),
        outcome.skipped,
        outcome.duplicates
    );
    for note in &outcome.notes {
        let _ = writeln!(md, "Input: {note}.\n");
    }
    let _ = writeln!(
        md,
        "Progressive validation: every record is scored before the model learns from it.\n"
    );
    let _ = writeln!(
        md,
        "| model | log loss | normalized entropy | AUC | calibration (Σp / Σy) | records/s (model only) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (m, run) in report.models.iter().zip(&outcome.runs) {
        let bound = run
            .metrics()
            .auc_error_bound()
            .map_or(String::new(), |b| format!(" ± {b:.1e}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}{bound} | {} | {:.0} |",
            m.name,
            fmt(m.log_loss),
            fmt(m.ne),
            fmt(m.auc),
            fmt(m.calibration),
            m.events_per_sec
        );
    }
    let _ = writeln!(
        md,
        "\nAUC is computed over 4,096 logit bins, exact up to the stated bound. Normalized \
         entropy is the log loss divided by the entropy of the observed click rate (below 1 \
         beats predicting the average).\n"
    );
    if let Some(b) = &report.baseline {
        let t = &b.batch;
        let _ = writeln!(
            md,
            "## Batch baseline\n\n{}: fitted on {} labels of the first {} records ({} one-hot \
             features, {:.1} s), scoring the {} labels after them ({:.0} rows/s). The online \
             variants over the same records, each scored before it learned from it:\n",
            t.name, t.train_rows, t.split_at, t.features, t.fit_seconds, t.scored, t.events_per_sec
        );
        let _ = writeln!(
            md,
            "| model (second half) | log loss | normalized entropy | AUC | calibration |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        let batch = Scores {
            name: t.name.clone(),
            log_loss: t.log_loss,
            ne: t.ne,
            auc: t.auc,
            calibration: t.calibration,
        };
        for m in b.online_after_split.iter().chain([&batch]) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                m.name,
                fmt(m.log_loss),
                fmt(m.ne),
                fmt(m.auc),
                fmt(m.calibration)
            );
        }
        let _ = writeln!(md);
    }
    if !outcome.first_bad.is_empty() {
        let _ = writeln!(md, "Skipped lines (first {}):\n", outcome.first_bad.len());
        for b in &outcome.first_bad {
            let _ = writeln!(md, "- {b}");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "![calibration](calibration.svg)\n\n![metrics](metrics.svg)"
    );
    md
}

fn plot_error(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |problem| ReportError::Plot {
        path: path.to_path_buf(),
        problem,
    }
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One line per model (`series` in the order of `outcome.runs`), in the model's palette colour,
/// with a legend entry; returns the colours, for marks drawn on the same points.
fn draw_model_lines(
    chart: &mut Chart<'_, '_>,
    outcome: &RunOutcome,
    series: &[Vec<(f64, f64)>],
) -> Result<Vec<RGBAColor>, String> {
    let mut colors = Vec::with_capacity(series.len());
    for (i, (run, pts)) in outcome.runs.iter().zip(series).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(run.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        colors.push(color);
    }
    Ok(colors)
}

fn plot_calibration(path: &Path, outcome: &RunOutcome) -> Result<(), ReportError> {
    let err = plot_error(path);
    let bins: Vec<Vec<(f64, f64)>> = outcome
        .runs
        .iter()
        .map(|r| {
            r.metrics()
                .reliability()
                .iter()
                .map(|b| (b.mean_predicted, b.observed))
                .collect()
        })
        .collect();
    let top = bins
        .iter()
        .flatten()
        .fold(0.01f64, |m, &(x, y)| m.max(x).max(y))
        * 1.1;
    let root = SVGBackend::new(path, (720, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Calibration: observed CTR by predicted pCTR bin",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..top, 0f64..top)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("mean predicted pCTR")
        .y_desc("observed CTR")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (top, top)], BLACK.mix(0.3)))
        .map_err(|e| err(e.to_string()))?
        .label("perfect calibration")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
    let colors = draw_model_lines(&mut chart, outcome, &bins).map_err(&err)?;
    for (pts, color) in bins.iter().zip(colors) {
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

fn plot_metrics(path: &Path, outcome: &RunOutcome) -> Result<(), ReportError> {
    let err = plot_error(path);
    let root = SVGBackend::new(path, (720, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let panels = root.split_evenly((2, 1));
    let last = outcome.events.max(1) as f64;
    type Pick = fn(&crate::run::Point) -> Option<f64>;
    let metrics: [(&str, Pick); 2] = [
        ("normalized entropy (cumulative)", |p| p.ne),
        ("calibration Σp / Σy (cumulative)", |p| p.calibration),
    ];
    for (panel, (title, pick)) in panels.iter().zip(metrics) {
        let series: Vec<Vec<(f64, f64)>> = outcome
            .runs
            .iter()
            .map(|r| {
                r.timeline
                    .iter()
                    .filter_map(|p| pick(p).map(|v| (p.events as f64, v)))
                    .collect()
            })
            .collect();
        let (lo, hi) = series
            .iter()
            .flatten()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
                (lo.min(v), hi.max(v))
            });
        let (lo, hi) = if lo.is_finite() {
            let pad = ((hi - lo) * 0.1).max(0.01);
            (lo - pad, hi + pad)
        } else {
            (0.0, 1.0)
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..last, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("records replayed")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        draw_model_lines(&mut chart, outcome, &series).map_err(&err)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

//! The view half: the system-wide [`SystemView`] merged from every live report and the
//! joiners' signals ([`merge`], pure), with counters turned into rates.

use super::*;

/// Scalar metrics of a model, as the page shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Weighted examples scored.
    pub examples: f64,
    /// Mean log loss.
    pub log_loss: Option<f64>,
    /// Normalized entropy: log loss over the entropy of the observed rate (below 1 beats the base rate).
    pub ne: Option<f64>,
    /// Area under the ROC curve.
    pub auc: Option<f64>,
    /// Bound on the AUC's error from its histogram.
    pub auc_error: Option<f64>,
    /// Σp / Σy (1 is calibrated).
    pub calibration: Option<f64>,
    /// Weighted gap between predicted and observed rates over the reliability bins, relative to Σy.
    pub reliability_error: Option<f64>,
    /// Weighted mean prediction.
    pub mean_pctr: Option<f64>,
    /// Weighted observed click rate.
    pub observed_ctr: Option<f64>,
}

impl Scores {
    fn of(m: &Metrics) -> Self {
        Self {
            examples: m.weight(),
            log_loss: m.log_loss(),
            ne: m.normalized_entropy(),
            auc: m.auc(),
            auc_error: m.auc_error_bound(),
            calibration: m.calibration(),
            reliability_error: m.reliability_error(),
            mean_pctr: m.mean_prediction(),
            observed_ctr: m.observed_ctr(),
        }
    }
}

/// A reliability bin for the calibration plot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bin {
    /// Weighted mean prediction in the bin.
    pub mean_predicted: f64,
    /// Weighted observed click rate in the bin.
    pub observed: f64,
    /// Weight of the bin.
    pub weight: f64,
}

/// One model as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelView {
    /// The variant's name.
    pub name: String,
    /// Whether it is the serving variant.
    pub serving: bool,
    /// Since each partition's start.
    pub cumulative: Scores,
    /// Over the sliding event-time window.
    pub window: Scores,
    /// Cumulative reliability bins.
    pub reliability: Vec<Bin>,
}

/// One partition's owner and lag.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionView {
    /// The partition.
    pub partition: i32,
    /// Its consumer lag, records.
    pub lag: i64,
    /// The scorer instance that owns it.
    pub instance: String,
}

/// The joiners' view of the input, summed over joiner processes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JoinerView {
    /// Joiner processes reporting.
    pub instances: usize,
    /// Whether a joiner reports its click stream stalled.
    pub stalled: bool,
    /// Why, in words.
    pub reason: Option<String>,
    /// Share of judged clicks joined within the window, over the joiners' lifetimes.
    pub click_coverage: Option<f64>,
    /// Serves joined or expired.
    pub serves: u64,
    /// Clicks read.
    pub clicks: u64,
    /// Labels produced.
    pub labels: u64,
    /// Clicks that arrived after the window (late-click corrections).
    pub late_clicks: u64,
    /// Clicks whose serve was never seen.
    pub orphan_clicks: u64,
    /// Clicks for a serve already clicked.
    pub duplicate_clicks: u64,
}

/// Events per second over the last collection interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Serves and clicks into the joiners.
    pub events_in: f64,
    /// Labeled impressions into the scorers (every outcome).
    pub labeled: f64,
    /// Labels learned from.
    pub learned: f64,
    /// Shed before learning plus dropped unread.
    pub shed: f64,
    /// `shed / labeled`.
    pub shed_share: f64,
}

/// One busy ad as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdView {
    /// Exact totals and progressive predictions.
    #[serde(flatten)]
    pub health: AdHealth,
    /// What Redis serves for the ad now (the serving model, top slot).
    pub published_pctr: Option<f64>,
    /// `model@offset` of what Redis serves.
    pub model_version: Option<String>,
}

/// The whole deployment, as of `ts_ms`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemView {
    /// When the view was merged (Unix ms).
    pub ts_ms: i64,
    /// Scorer instances reporting.
    pub scorers: Vec<String>,
    /// The serving variant, if every scorer names the same one.
    pub serve_model: Option<String>,
    /// Event rates over the last interval.
    pub rates: Rates,
    /// Records per outcome, summed over the live scorer processes since each started.
    pub records: BTreeMap<String, u64>,
    /// The joiners' view.
    pub joiner: JoinerView,
    /// False while any scorer's learning guard is on.
    pub learning: bool,
    /// Why the guard is on.
    pub guard_reason: Option<String>,
    /// Lowest keep-rate of negatives and highest thinning factor over the scorers.
    pub keep_rate: f64,
    /// Highest thinning factor over the scorers.
    pub thinning: u32,
    /// Partitions by owner.
    pub partitions: Vec<PartitionView>,
    /// Wall-clock age of the newest estimate written to Redis, and of the newest event learned.
    pub publish_age_ms: Option<i64>,
    /// Wall-clock age of the newest event learned.
    pub event_age_ms: Option<i64>,
    /// The variants, serving first.
    pub models: Vec<ModelView>,
    /// The busiest ads.
    pub ads: Vec<AdView>,
}

#[derive(Debug, Default, Clone)]
pub(super) struct Previous {
    ts_ms: i64,
    scorer_records: HashMap<String, BTreeMap<String, u64>>,
    joiner_events: HashMap<String, u64>,
}

/// Merges reports and signals into the system view (pure, apart from the clock value given).
pub(super) fn merge(
    now_ms: i64,
    reports: &[InstanceReport],
    signals: &HashMap<String, String>,
    previous: &Previous,
) -> (SystemView, Previous) {
    let mut records: BTreeMap<String, u64> = BTreeMap::new();
    let mut models: Vec<(String, Metrics, Metrics)> = Vec::new();
    let mut partitions = Vec::new();
    let mut ads = Vec::new();
    let mut next = Previous {
        ts_ms: now_ms,
        ..Previous::default()
    };
    let dt_s = ((now_ms - previous.ts_ms) as f64 / 1000.0).max(1e-3);
    let mut rates = Rates::default();
    let per_s = |now: u64, before: Option<u64>| {
        // A counter that went down belongs to a restarted process: count from zero.
        before.map_or(0.0, |b| now.saturating_sub(b) as f64 / dt_s)
    };
    for r in reports {
        for (k, v) in &r.records {
            *records.entry(k.clone()).or_default() += v;
        }
        let before = previous.scorer_records.get(&r.instance);
        let rate_of = |label: &str| {
            per_s(
                r.records.get(label).copied().unwrap_or(0),
                before.map(|b| b.get(label).copied().unwrap_or(0)),
            )
        };
        let all: f64 = r.records.keys().map(|k| rate_of(k)).sum();
        rates.labeled += all;
        rates.learned += rate_of("learned");
        rates.shed += rate_of("shed") + rate_of("dropped");
        next.scorer_records
            .insert(r.instance.clone(), r.records.clone());
        for m in &r.models {
            match models.iter_mut().find(|(n, _, _)| *n == m.name) {
                Some((_, c, w)) => {
                    c.merge(&m.cumulative);
                    w.merge(&m.window);
                }
                None => models.push((m.name.clone(), m.cumulative.clone(), m.window.clone())),
            }
        }
        partitions.extend(r.lag.iter().map(|(&partition, &lag)| PartitionView {
            partition,
            lag,
            instance: r.instance.clone(),
        }));
        ads.extend(r.ads.iter().cloned());
    }
    rates.shed_share = if rates.labeled > 0.0 {
        rates.shed / rates.labeled
    } else {
        0.0
    };
    partitions.sort_by_key(|p| p.partition);
    busiest_first(&mut ads);

    let mut joiner = JoinerView::default();
    let mut t = JoinStats::default();
    for (instance, json) in signals {
        let Ok(s) = serde_json::from_str::<JoinerSignal>(json) else {
            continue;
        };
        if now_ms - s.updated_ms > JOINER_SIGNAL_FRESH_MS {
            continue;
        }
        joiner.instances += 1;
        if s.stalled && !joiner.stalled {
            joiner.stalled = true;
            joiner.reason = s.reason.map(|r| format!("{instance}: {r}"));
        }
        let totals = s.totals;
        t.add(&totals);
        let events = totals.serves + totals.clicks;
        rates.events_in += per_s(events, previous.joiner_events.get(instance).copied());
        next.joiner_events.insert(instance.clone(), events);
    }
    joiner.serves = t.serves;
    joiner.clicks = t.clicks;
    joiner.labels = t.positives + t.negatives;
    joiner.late_clicks = t.late_clicks;
    joiner.orphan_clicks = t.orphan_clicks;
    joiner.duplicate_clicks = t.duplicate_clicks;
    joiner.click_coverage = t.click_coverage();

    let serve_model = reports.first().map(|r| r.serve_model.clone());
    let view = SystemView {
        ts_ms: now_ms,
        scorers: reports.iter().map(|r| r.instance.clone()).collect(),
        serve_model: serve_model.clone(),
        rates,
        records,
        joiner,
        learning: reports.iter().all(|r| r.learning),
        guard_reason: reports.iter().find_map(|r| r.guard_reason.clone()),
        keep_rate: reports.iter().map(|r| r.keep_rate).fold(1.0, f64::min),
        thinning: reports.iter().map(|r| r.thinning).max().unwrap_or(1),
        partitions,
        publish_age_ms: reports
            .iter()
            .filter_map(|r| r.last_publish_ms)
            .max()
            .map(|t| (now_ms - t).max(0)),
        event_age_ms: reports
            .iter()
            .filter_map(|r| r.newest_event_ms)
            .max()
            .map(|t| (now_ms - t).max(0)),
        models: models
            .iter()
            .map(|(name, c, w)| ModelView {
                serving: serve_model.as_deref() == Some(name.as_str()),
                name: name.clone(),
                cumulative: Scores::of(c),
                window: Scores::of(w),
                reliability: c
                    .reliability()
                    .into_iter()
                    .map(|b| Bin {
                        mean_predicted: b.mean_predicted,
                        observed: b.observed,
                        weight: b.weight,
                    })
                    .collect(),
            })
            .collect(),
        ads: ads
            .into_iter()
            .map(|health| AdView {
                health,
                published_pctr: None,
                model_version: None,
            })
            .collect(),
    };
    (view, next)
}

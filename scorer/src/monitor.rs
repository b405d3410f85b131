//! Model health for the monitoring dashboard (Borealis's "system stream of monitoring events").
//!
//! Two halves, both in every scorer process:
//! - **Report**: once a second each process writes what it knows to Redis,
//!   `<prefix>monitor:scorer:<instance>` (JSON [`InstanceReport`], expiring after 15 s): its
//!   records per outcome since it started, consumer lag per partition, shedding and the
//!   learning guard, freshness, each model's progressive metrics merged over its partitions,
//!   and its busiest ads. Metrics travel as their sums (with a coarse AUC histogram), so they
//!   merge exactly across processes.
//! - **View**: every 2 s [`collect`] reads every live report and the joiners' signal hash,
//!   merges them into one [`SystemView`] of the whole deployment (whichever process serves the
//!   page), turns counters into rates, and keeps an hour of history. `GET /v1/monitor` answers
//!   it; `GET /dashboard` is the page that draws it (`scorer/dashboard/`).
//!
//! Read-only: nothing here changes a model or a published estimate.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctr_models::Metrics;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::config::ScorerConfig;
use ctr_schemas::contract::{JOINER_SIGNAL_FRESH_MS, JoinStats, JoinerSignal, keys};

use crate::load::{AdHealth, Control, merged_models, next_tick, unix_ms};

/// AUC resolution of the metrics in a report: 256 bins of logit keep a report small (a few
/// kB per model) with an AUC error bound still well under 1%.
const REPORT_AUC_BINS: usize = 256;
/// A report not refreshed for this long belongs to a process that is gone.
const REPORT_TTL_S: u64 = 15;
/// History kept: one point every 2 s for an hour.
const HISTORY_POINTS: usize = 1_800;
const COLLECT_EVERY: Duration = Duration::from_secs(2);
/// Busiest ads shown.
const ADS_SHOWN: usize = 15;

/// One model's metrics in a report: cumulative and over the sliding window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSums {
    pub name: String,
    pub cumulative: Metrics,
    pub window: Metrics,
}

/// What one scorer process reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceReport {
    pub instance: String,
    pub ts_ms: i64,
    /// Records per outcome since the process started.
    pub records: BTreeMap<String, u64>,
    /// Consumer lag per owned partition.
    pub lag: BTreeMap<i32, i64>,
    pub learning: bool,
    pub guard_reason: Option<String>,
    pub keep_rate: f64,
    pub thinning: u32,
    pub last_publish_ms: Option<i64>,
    pub newest_event_ms: Option<i64>,
    pub serve_model: String,
    pub models: Vec<ModelSums>,
    pub ads: Vec<AdHealth>,
}

fn instance_key(prefix: &str, instance: &str) -> String {
    keys::monitor_report(prefix, instance)
}

fn index_key(prefix: &str) -> String {
    keys::monitor_set(prefix)
}

/// This process's report, from what its workers last reported.
pub fn instance_report(cfg: &ScorerConfig, control: &Control, instance: &str) -> InstanceReport {
    let coarse = |m: &Metrics| {
        let mut c = Metrics::with_auc_bins(REPORT_AUC_BINS);
        c.merge(m);
        c
    };
    let models = merged_models(control)
        .into_iter()
        .map(|(name, cumulative, window)| ModelSums {
            name,
            cumulative: coarse(&cumulative),
            window: coarse(&window),
        })
        .collect();
    let (mut ads, newest_event_ms) = {
        let reports = control.reports.lock().expect("reports");
        let ads: Vec<AdHealth> = reports.values().flat_map(|r| r.ads.clone()).collect();
        (
            ads,
            reports.values().filter_map(|r| r.newest_event_ms).max(),
        )
    };
    busiest_first(&mut ads);
    InstanceReport {
        instance: instance.to_string(),
        ts_ms: unix_ms(),
        records: control
            .records()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        lag: control.lag.lock().expect("lag map").clone(),
        learning: control.learning(),
        guard_reason: control.guard_reason.lock().expect("guard reason").clone(),
        keep_rate: control.policy(1).negative_rate,
        thinning: control.thinning(),
        last_publish_ms: control.last_publish_ms(),
        newest_event_ms,
        serve_model: cfg.serve_model.clone(),
        models,
        ads,
    }
}

fn busiest_first(ads: &mut Vec<AdHealth>) {
    ads.sort_by(|a, b| {
        b.impressions
            .cmp(&a.impressions)
            .then_with(|| a.ad_id.cmp(&b.ad_id))
    });
    ads.truncate(ADS_SHOWN);
}

/// Writes this process's report every second until `stop`.
pub async fn report(
    cfg: Arc<ScorerConfig>,
    control: Arc<Control>,
    mut redis: ConnectionManager,
    instance: String,
    mut stop: watch::Receiver<bool>,
) {
    let key = instance_key(&cfg.service.redis_prefix, &instance);
    let index = index_key(&cfg.service.redis_prefix);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while next_tick(&mut tick, &mut stop).await {
        let json = match serde_json::to_string(&instance_report(&cfg, &control, &instance)) {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "monitoring report does not serialize");
                continue;
            }
        };
        let r: redis::RedisResult<()> = redis::pipe()
            .set_ex(&key, json, REPORT_TTL_S)
            .sadd(&index, &instance)
            .query_async(&mut redis)
            .await;
        if let Err(e) = r {
            warn!(error = %e, "writing the monitoring report failed");
        }
    }
    // Leave the view at once rather than after the TTL.
    let _: redis::RedisResult<()> = redis::pipe()
        .del(&key)
        .srem(&index, &instance)
        .query_async(&mut redis)
        .await;
}

/// Scalar metrics of a model, as the page shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    pub examples: f64,
    pub log_loss: Option<f64>,
    pub ne: Option<f64>,
    pub auc: Option<f64>,
    pub auc_error: Option<f64>,
    pub calibration: Option<f64>,
    pub reliability_error: Option<f64>,
    pub mean_pctr: Option<f64>,
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
    pub mean_predicted: f64,
    pub observed: f64,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelView {
    pub name: String,
    pub serving: bool,
    pub cumulative: Scores,
    pub window: Scores,
    /// Cumulative reliability bins.
    pub reliability: Vec<Bin>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionView {
    pub partition: i32,
    pub lag: i64,
    pub instance: String,
}

/// The joiners' view of the input, summed over joiner processes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JoinerView {
    pub instances: usize,
    pub stalled: bool,
    pub reason: Option<String>,
    /// Share of judged clicks joined within the window, over the joiners' lifetimes.
    pub click_coverage: Option<f64>,
    pub serves: u64,
    pub clicks: u64,
    pub labels: u64,
    pub late_clicks: u64,
    pub orphan_clicks: u64,
    pub duplicate_clicks: u64,
}

/// Events per second over the last collection interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Serves and clicks into the joiners.
    pub events_in: f64,
    /// Labeled impressions into the scorers (every outcome).
    pub labeled: f64,
    pub learned: f64,
    /// Shed before learning plus dropped unread.
    pub shed: f64,
    /// `shed / labeled`.
    pub shed_share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdView {
    #[serde(flatten)]
    pub health: AdHealth,
    /// What Redis serves for the ad now (the serving model, top slot).
    pub published_pctr: Option<f64>,
    pub model_version: Option<String>,
}

/// The whole deployment, as of `ts_ms`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemView {
    pub ts_ms: i64,
    pub scorers: Vec<String>,
    pub serve_model: Option<String>,
    pub rates: Rates,
    /// Records per outcome, summed over the live scorer processes since each started.
    pub records: BTreeMap<String, u64>,
    pub joiner: JoinerView,
    pub learning: bool,
    pub guard_reason: Option<String>,
    /// Lowest keep-rate of negatives and highest thinning factor over the scorers.
    pub keep_rate: f64,
    pub thinning: u32,
    pub partitions: Vec<PartitionView>,
    /// Wall-clock age of the newest estimate written to Redis, and of the newest event learned.
    pub publish_age_ms: Option<i64>,
    pub event_age_ms: Option<i64>,
    pub models: Vec<ModelView>,
    pub ads: Vec<AdView>,
}

/// One point of the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub ts_ms: i64,
    pub rates: Rates,
    pub lag: BTreeMap<i32, i64>,
    pub models: Vec<(String, Scores, Scores)>,
}

/// The history as columns, the shape the page's charts take.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct History {
    pub ts_ms: Vec<i64>,
    pub events_in: Vec<f64>,
    pub labeled: Vec<f64>,
    pub learned: Vec<f64>,
    pub shed: Vec<f64>,
    /// Consumer lag per partition (`null` while the partition had no owner reporting).
    pub lag: BTreeMap<i32, Vec<Option<i64>>>,
    /// Per model: cumulative and window series of each metric (`null` where undefined).
    pub models: BTreeMap<String, ModelSeries>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelSeries {
    pub log_loss: Vec<Option<f64>>,
    pub ne: Vec<Option<f64>>,
    pub auc: Vec<Option<f64>>,
    pub calibration: Vec<Option<f64>>,
    pub window_log_loss: Vec<Option<f64>>,
    pub window_ne: Vec<Option<f64>>,
    pub window_auc: Vec<Option<f64>>,
    pub window_calibration: Vec<Option<f64>>,
}

/// What `GET /v1/monitor` answers.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorResponse {
    pub latest: Option<SystemView>,
    pub history: History,
}

/// The view and its history, shared with the HTTP handler.
#[derive(Debug, Default)]
pub struct Monitor {
    inner: Mutex<MonitorState>,
}

#[derive(Debug, Default)]
struct MonitorState {
    latest: Option<SystemView>,
    history: VecDeque<Point>,
    /// Last counters seen per scorer and joiner instance, for rates.
    previous: Previous,
}

#[derive(Debug, Default, Clone)]
struct Previous {
    ts_ms: i64,
    scorer_records: HashMap<String, BTreeMap<String, u64>>,
    joiner_events: HashMap<String, u64>,
}

impl Monitor {
    pub fn response(&self) -> MonitorResponse {
        let state = self.inner.lock().expect("monitor");
        let mut h = History::default();
        for p in &state.history {
            h.ts_ms.push(p.ts_ms);
            h.events_in.push(p.rates.events_in);
            h.labeled.push(p.rates.labeled);
            h.learned.push(p.rates.learned);
            h.shed.push(p.rates.shed);
        }
        let n = state.history.len();
        for (i, p) in state.history.iter().enumerate() {
            for (&partition, &lag) in &p.lag {
                let col = h.lag.entry(partition).or_insert_with(|| vec![None; i]);
                col.resize(i, None);
                col.push(Some(lag));
            }
        }
        for col in h.lag.values_mut() {
            col.resize(n, None);
        }
        for (i, p) in state.history.iter().enumerate() {
            for (name, c, w) in &p.models {
                let s = h.models.entry(name.clone()).or_insert_with(|| {
                    // A model that appears late has no values before it appeared.
                    let empty = vec![None; i];
                    ModelSeries {
                        log_loss: empty.clone(),
                        ne: empty.clone(),
                        auc: empty.clone(),
                        calibration: empty.clone(),
                        window_log_loss: empty.clone(),
                        window_ne: empty.clone(),
                        window_auc: empty.clone(),
                        window_calibration: empty,
                    }
                });
                s.log_loss.push(c.log_loss);
                s.ne.push(c.ne);
                s.auc.push(c.auc);
                s.calibration.push(c.calibration);
                s.window_log_loss.push(w.log_loss);
                s.window_ne.push(w.ne);
                s.window_auc.push(w.auc);
                s.window_calibration.push(w.calibration);
            }
            // A model that disappeared keeps its columns aligned with the timestamps.
            for s in h.models.values_mut() {
                for col in [
                    &mut s.log_loss,
                    &mut s.ne,
                    &mut s.auc,
                    &mut s.calibration,
                    &mut s.window_log_loss,
                    &mut s.window_ne,
                    &mut s.window_auc,
                    &mut s.window_calibration,
                ] {
                    col.resize(i + 1, None);
                }
            }
        }
        debug_assert!(h.models.values().all(|s| s.ne.len() == n));
        MonitorResponse {
            latest: state.latest.clone(),
            history: h,
        }
    }

    fn push(&self, view: SystemView, previous: Previous) {
        let mut state = self.inner.lock().expect("monitor");
        let point = Point {
            ts_ms: view.ts_ms,
            rates: view.rates,
            lag: view
                .partitions
                .iter()
                .map(|p| (p.partition, p.lag))
                .collect(),
            models: view
                .models
                .iter()
                .map(|m| (m.name.clone(), m.cumulative, m.window))
                .collect(),
        };
        state.history.push_back(point);
        while state.history.len() > HISTORY_POINTS {
            state.history.pop_front();
        }
        state.latest = Some(view);
        state.previous = previous;
    }

    fn previous(&self) -> Previous {
        self.inner.lock().expect("monitor").previous.clone()
    }
}

/// Reads the live reports, the joiner signals and the busiest ads' published estimates.
async fn read(
    cfg: &ScorerConfig,
    redis: &mut ConnectionManager,
) -> redis::RedisResult<(Vec<InstanceReport>, HashMap<String, String>)> {
    let prefix = &cfg.service.redis_prefix;
    let index = index_key(prefix);
    let members: Vec<String> = redis.smembers(&index).await?;
    let keys: Vec<String> = members.iter().map(|m| instance_key(prefix, m)).collect();
    let jsons: Vec<Option<String>> = if keys.is_empty() {
        Vec::new()
    } else {
        redis::cmd("MGET").arg(&keys).query_async(redis).await?
    };
    let mut reports = Vec::new();
    for (member, json) in members.iter().zip(jsons) {
        match json.map(|j| serde_json::from_str::<InstanceReport>(&j)) {
            Some(Ok(r)) => reports.push(r),
            Some(Err(e)) => warn!(instance = %member, error = %e, "unreadable monitoring report"),
            // Expired: that process is gone.
            None => {
                let _: redis::RedisResult<()> = redis.srem(&index, member).await;
            }
        }
    }
    let signals: HashMap<String, String> = redis.hgetall(keys::joiner_signal(prefix)).await?;
    Ok((reports, signals))
}

/// Merges reports and signals into the system view (pure, apart from the clock value given).
fn merge(
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

/// An ad's `pctr`, `model` and `ver` fields in Redis.
type Published = (Option<f64>, Option<String>, Option<i64>);

/// Adds what Redis serves now for each ad in the view.
async fn add_published(cfg: &ScorerConfig, redis: &mut ConnectionManager, view: &mut SystemView) {
    if view.ads.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for a in &view.ads {
        pipe.cmd("HMGET")
            .arg(keys::ad(&cfg.service.redis_prefix, &a.health.ad_id))
            .arg("pctr")
            .arg("model")
            .arg("ver");
    }
    let rows: redis::RedisResult<Vec<Published>> = pipe.query_async(redis).await;
    match rows {
        Ok(rows) => {
            for (a, (pctr, model, ver)) in view.ads.iter_mut().zip(rows) {
                a.published_pctr = pctr;
                a.model_version = model.zip(ver).map(|(m, v)| format!("{m}@{v}"));
            }
        }
        Err(e) => warn!(error = %e, "reading published estimates for the dashboard failed"),
    }
}

/// Builds the system view every 2 s until `stop`.
pub async fn collect(
    cfg: Arc<ScorerConfig>,
    monitor: Arc<Monitor>,
    mut redis: ConnectionManager,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(COLLECT_EVERY);
    while next_tick(&mut tick, &mut stop).await {
        match read(&cfg, &mut redis).await {
            Ok((reports, signals)) => {
                let (mut view, next) = merge(unix_ms(), &reports, &signals, &monitor.previous());
                add_published(&cfg, &mut redis, &mut view).await;
                monitor.push(view, next);
            }
            Err(e) => warn!(error = %e, "reading the monitoring reports failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instance: &str, learned: u64, shed: u64, p: f64) -> InstanceReport {
        let mut m = Metrics::with_auc_bins(REPORT_AUC_BINS);
        for i in 0..1_000 {
            m.record(p, i % 10 == 0, 1.0);
        }
        InstanceReport {
            instance: instance.into(),
            ts_ms: 0,
            records: [("learned".to_string(), learned), ("shed".to_string(), shed)]
                .into_iter()
                .collect(),
            lag: [(0, 5), (1, 7)].into_iter().collect(),
            learning: true,
            guard_reason: None,
            keep_rate: 0.5,
            thinning: 1,
            last_publish_ms: Some(9_000),
            newest_event_ms: Some(8_000),
            serve_model: "counts".into(),
            models: vec![ModelSums {
                name: "counts".into(),
                cumulative: m.clone(),
                window: m,
            }],
            ads: vec![AdHealth {
                ad_id: format!("ad-{instance}"),
                impressions: learned,
                clicks: 1,
                mean_pctr: Some(p),
                observed_ctr: Some(0.1),
            }],
        }
    }

    #[test]
    fn reports_merge_exactly_and_counters_become_rates() {
        let signal = |serves: u64, clicks: u64| {
            serde_json::to_string(&JoinerSignal {
                stalled: false,
                reason: None,
                click_coverage: None,
                window_serves: 0,
                window_clicks: 0,
                clicks_per_serve: None,
                baseline_clicks_per_serve: None,
                updated_ms: 9_000,
                totals: JoinStats {
                    serves,
                    clicks,
                    positives: 3,
                    negatives: 97,
                    orphan_clicks: 1,
                    ..JoinStats::default()
                },
            })
            .unwrap()
        };
        let signals: HashMap<String, String> = [("j1".to_string(), signal(100, 10))].into();
        let (_, prev) = merge(
            8_000,
            &[report("a", 1_000, 0, 0.1), report("b", 500, 0, 0.1)],
            &signals,
            &Previous::default(),
        );
        let signals: HashMap<String, String> = [("j1".to_string(), signal(300, 30))].into();
        let (view, _) = merge(
            10_000,
            &[report("a", 3_000, 1_000, 0.1), report("b", 500, 0, 0.3)],
            &signals,
            &prev,
        );
        // 2 s: a learned 2,000 and shed 1,000; b nothing. Joiner: 220 events.
        assert_eq!(view.rates.learned, 1_000.0);
        assert_eq!(view.rates.shed, 500.0);
        assert_eq!(view.rates.labeled, 1_500.0);
        assert!((view.rates.shed_share - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(view.rates.events_in, 110.0);
        assert_eq!(view.records["learned"], 3_500);
        assert_eq!(view.joiner.click_coverage, Some(0.75), "3 joined, 1 orphan");
        // Metrics merge as sums: calibration over both = (0.1·1000 + 0.3·1000) / 200 clicks.
        let m = &view.models[0];
        assert!(m.serving);
        assert!((m.cumulative.calibration.unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(m.cumulative.examples, 2_000.0);
        assert_eq!(view.partitions.len(), 4);
        assert_eq!(view.publish_age_ms, Some(1_000));
        assert_eq!(view.event_age_ms, Some(2_000));
        assert_eq!(view.keep_rate, 0.5);
        assert_eq!(view.ads[0].health.ad_id, "ad-a", "busiest first");
    }

    #[test]
    fn a_restarted_process_counts_from_zero_and_stale_joiners_are_ignored() {
        let (_, prev) = merge(
            0,
            &[report("a", 5_000, 0, 0.1)],
            &HashMap::new(),
            &Previous::default(),
        );
        let stale: HashMap<String, String> = [(
            "old".to_string(),
            r#"{"stalled":true,"reason":"x","updated_ms":-60000}"#.to_string(),
        )]
        .into();
        let (view, _) = merge(1_000, &[report("a", 10, 0, 0.1)], &stale, &prev);
        assert_eq!(view.rates.learned, 0.0);
        assert_eq!(view.joiner.instances, 0);
        assert!(!view.joiner.stalled);
    }

    #[test]
    fn history_columns_stay_aligned_when_models_come_and_go() {
        let monitor = Monitor::default();
        let signals = HashMap::new();
        let mut prev = Previous::default();
        for (t, names) in [
            (0, vec!["counts"]),
            (2_000, vec!["counts", "ftrl"]),
            (4_000, vec!["ftrl"]),
        ] {
            let reports: Vec<InstanceReport> = names
                .iter()
                .map(|n| {
                    let mut r = report("a", 10, 0, 0.1);
                    r.models[0].name = (*n).to_string();
                    r
                })
                .collect();
            let (view, next) = merge(t, &reports, &signals, &prev);
            prev = next.clone();
            monitor.push(view, next);
        }
        let h = monitor.response().history;
        assert_eq!(h.ts_ms, [0, 2_000, 4_000]);
        assert_eq!(h.models["counts"].ne.len(), 3);
        assert!(h.models["counts"].ne[2].is_none());
        assert!(h.models["ftrl"].ne[0].is_none() && h.models["ftrl"].ne[1].is_some());
        assert_eq!(h.lag[&1], [Some(7), Some(7), Some(7)]);
    }
}

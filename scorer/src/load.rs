//! Load shedding and the learning guard: the switches every worker reads per record.
//!
//! Overload is judged from two signals against configured bounds: how full the workers'
//! queues are (the input outruns the workers) and the consumer lag per partition (the input
//! is piling up in the broker). The queues decide: at 80% full the scorer is overloaded; a lag
//! above its bound makes it overloaded from 50% full. A lag with near-empty queues is not
//! overload the workers cause (a slow broker, a backlog still being fetched), and learning
//! less would not reduce it. The [`Governor`] turns this into the keep-rate of negatives:
//! multiplicative decrease while overloaded, multiplicative increase once the queues are
//! below half full and the lag below half its bound (a drained queue with a backlog still in
//! the broker is not recovery), and exactly 1 (nothing shed) when there is no overload. The
//! lag is the high watermark minus the position handed to the scorer, per partition. The rate
//! and every shed record are exported (`ctr_scorer_negative_keep_rate`,
//! `ctr_scorer_records_total{outcome="shed"}`).
//!
//! Two stages, and only negatives are ever shed: clicks are always learned and counted.
//! 1. **Learning**: negatives are sampled before learning, each kept one carrying the
//!    importance weight 1/rate ([`crate::state::Sampler`]). Every record is still decoded,
//!    deduplicated and counted, so the published totals stay exact.
//! 2. **Whole events**: when the keep-rate is at its floor and the scorer is still
//!    overloaded, the consumer keeps one in `k` negatives of each ad and drops the others
//!    before decoding ([`crate::state::Thinning`], decided from the message key and the
//!    `ctr.clicked` header the joiner sets); the kept one stands for `k` in the totals and
//!    in learning. Totals are then exact but for each ad's unfinished group (fewer than `k`
//!    negatives), and dropped records escape dedupe. `k` grows ×1.5 per step up to
//!    `1/min_rate` (`ctr_scorer_thinning_factor`); on recovery stage two is undone first.
//!    Records without the header are never dropped.
//!
//! The learning guard follows the joiner's click-stream stall signal (`<prefix>signal:joiner`,
//! see `ctr-feedback`'s `signals`): while any joiner reports a stall, workers stop learning and
//! keep counting and serving; the switch is logged and exported as `ctr_scorer_learning_paused`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ctr_models::Metrics;
use ctr_runtime::DependencyError;
use ctr_schemas::contract::{JOINER_SIGNAL_FRESH_MS, JoinerSignal};
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::state::Policy;

/// What a partition owner reports for monitoring.
#[derive(Debug, Clone, Default)]
pub struct PartitionReport {
    /// Per serving and shadow variant: (name, cumulative metrics, sliding-window metrics).
    pub models: Vec<(String, Metrics, Metrics)>,
    /// The partition's busiest ads under the serving variant.
    pub ads: Vec<AdHealth>,
    /// Newest event time learned from (Unix ms).
    pub newest_event_ms: Option<i64>,
}

/// One ad's health: exact totals beside the serving variant's progressive predictions.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdHealth {
    pub ad_id: String,
    /// Exact, over distinct labels.
    pub impressions: u64,
    pub clicks: u64,
    /// Mean of the predictions made for the ad's impressions before learning from each
    /// (progressive), over the same impressions as `observed_ctr`.
    pub mean_pctr: Option<f64>,
    pub observed_ctr: Option<f64>,
}

/// What happened to records, as counted in `ctr_scorer_records_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Learned,
    /// Sampled out before learning (stage one); still counted in the totals.
    Shed,
    /// Dropped unread at the consumer (stage two).
    Dropped,
    /// Counted but not learned: the learning guard was on.
    Guarded,
    Corrected,
    Duplicate,
    Poison,
}

impl Counted {
    pub const ALL: [Counted; 7] = [
        Counted::Learned,
        Counted::Shed,
        Counted::Dropped,
        Counted::Guarded,
        Counted::Corrected,
        Counted::Duplicate,
        Counted::Poison,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Counted::Learned => "learned",
            Counted::Shed => "shed",
            Counted::Dropped => "dropped",
            Counted::Guarded => "guarded",
            Counted::Corrected => "corrected",
            Counted::Duplicate => "duplicate",
            Counted::Poison => "poison",
        }
    }
}

/// State shared by the consumer, the workers and the monitoring tasks.
#[derive(Debug)]
pub struct Control {
    rate_bits: AtomicU64,
    thinning: AtomicU32,
    learning: AtomicBool,
    /// Consumer lag per partition, from librdkafka's statistics.
    pub lag: Mutex<BTreeMap<i32, i64>>,
    /// Latest report per owned partition.
    pub reports: Mutex<BTreeMap<i32, PartitionReport>>,
    /// Records per [`Counted`] outcome since the process started.
    records: [AtomicU64; Counted::ALL.len()],
    /// Wall-clock time of the last successful publish to Redis (Unix ms; 0 = none yet).
    last_publish_ms: AtomicI64,
    /// Why learning is paused, while it is.
    pub guard_reason: Mutex<Option<String>>,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            rate_bits: AtomicU64::new(1.0f64.to_bits()),
            thinning: AtomicU32::new(1),
            learning: AtomicBool::new(true),
            lag: Mutex::default(),
            reports: Mutex::default(),
            records: Default::default(),
            last_publish_ms: AtomicI64::new(0),
            guard_reason: Mutex::default(),
        }
    }
}

impl Control {
    /// The policy for a record that stands for `thinned` negatives (1 unless thinned).
    pub fn policy(&self, thinned: u32) -> Policy {
        Policy {
            negative_rate: f64::from_bits(self.rate_bits.load(Ordering::Relaxed)),
            learn: self.learning.load(Ordering::Relaxed),
            thinned,
        }
    }

    pub fn set_rate(&self, rate: f64) {
        self.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Stage-two thinning factor: 1 = no negative dropped before decoding.
    pub fn thinning(&self) -> u32 {
        self.thinning.load(Ordering::Relaxed)
    }

    pub fn set_thinning(&self, k: u32) {
        self.thinning.store(k.max(1), Ordering::Relaxed);
    }

    pub fn learning(&self) -> bool {
        self.learning.load(Ordering::Relaxed)
    }

    fn set_learning(&self, on: bool) {
        self.learning.store(on, Ordering::Relaxed);
    }

    /// Counts `n` records with outcome `what`, in `/metrics` and for the dashboard. Called per
    /// batch, not per record.
    pub fn count(&self, what: Counted, n: u64) {
        if n > 0 {
            metrics::counter!("ctr_scorer_records_total", "outcome" => what.label()).increment(n);
            self.records[what as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records per outcome since the process started.
    pub fn records(&self) -> BTreeMap<&'static str, u64> {
        Counted::ALL
            .iter()
            .map(|c| (c.label(), self.records[*c as usize].load(Ordering::Relaxed)))
            .collect()
    }

    pub fn published_now(&self) {
        self.last_publish_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// When estimates were last written to Redis (Unix ms).
    pub fn last_publish_ms(&self) -> Option<i64> {
        Some(self.last_publish_ms.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    pub fn max_lag(&self) -> i64 {
        self.lag
            .lock()
            .expect("lag map")
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// Each model's metrics merged over every owned partition: (name, cumulative, window).
pub fn merged_models(control: &Control) -> Vec<(String, Metrics, Metrics)> {
    let reports = control.reports.lock().expect("reports");
    let mut out: Vec<(String, Metrics, Metrics)> = Vec::new();
    for report in reports.values() {
        for (name, cumulative, window) in &report.models {
            match out.iter_mut().find(|(n, _, _)| n == name) {
                Some((_, c, w)) => {
                    c.merge(cumulative);
                    w.merge(window);
                }
                None => out.push((name.clone(), cumulative.clone(), window.clone())),
            }
        }
    }
    out
}

/// The wall clock in Unix ms.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The two-stage controller (pure): the keep-rate of negatives for learning, then the
/// thinning factor of whole negative events.
#[derive(Debug, Clone)]
pub struct Governor {
    rate: f64,
    min_rate: f64,
    thinning: u32,
    max_thinning: u32,
    lag_bound: i64,
}

impl Governor {
    /// Queue fill at or above this is overload.
    pub const QUEUE_HIGH: f64 = 0.8;
    /// Below this (and lag below half its bound) the rate recovers.
    pub const QUEUE_LOW: f64 = 0.5;

    pub fn new(min_rate: f64, max_thinning: u32, lag_bound: i64) -> Self {
        Self {
            rate: 1.0,
            min_rate,
            thinning: 1,
            max_thinning: max_thinning.max(1),
            lag_bound,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn thinning(&self) -> u32 {
        self.thinning
    }

    /// One control step from the fullest queue's fill (0..=1) and the largest lag; returns
    /// the keep-rate of negatives.
    pub fn step(&mut self, queue_fill: f64, max_lag: i64) -> f64 {
        let lagging = max_lag > self.lag_bound;
        if queue_fill >= Self::QUEUE_HIGH || (lagging && queue_fill >= Self::QUEUE_LOW) {
            if self.rate > self.min_rate {
                self.rate = (self.rate * 0.5).max(self.min_rate);
            } else {
                self.thinning = (self.thinning * 2).min(self.max_thinning);
            }
        } else if queue_fill < Self::QUEUE_LOW && max_lag <= self.lag_bound / 2 {
            if self.thinning > 1 {
                self.thinning = (f64::from(self.thinning) / 1.5).floor().max(1.0) as u32;
            } else {
                self.rate = (self.rate * 1.25).min(1.0);
                if self.rate > 0.99 {
                    self.rate = 1.0;
                }
            }
        }
        self.rate
    }
}

/// Waits for `tick`'s next tick; `false` once `stop` has turned true. The loop of every
/// periodic task: `while next_tick(&mut tick, &mut stop).await { ... }`.
pub(crate) async fn next_tick(
    tick: &mut tokio::time::Interval,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        () = ctr_runtime::process::stopped(stop) => false,
        _ = tick.tick() => true,
    }
}

/// Runs the governor every 250 ms until `stop`: `fill` reports the fullest worker queue.
pub async fn govern(
    control: std::sync::Arc<Control>,
    mut governor: Governor,
    fill: impl Fn() -> f64,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while next_tick(&mut tick, &mut stop).await {
        let (f, lag) = (fill(), control.max_lag());
        let before = governor.rate();
        let rate = governor.step(f, lag);
        control.set_rate(rate);
        control.set_thinning(governor.thinning());
        metrics::gauge!("ctr_scorer_negative_keep_rate").set(rate);
        metrics::gauge!("ctr_scorer_thinning_factor").set(f64::from(governor.thinning()));
        metrics::gauge!("ctr_scorer_queue_fill").set(f);
        if (before == 1.0) != (rate == 1.0) {
            if rate < 1.0 {
                warn!(
                    queue_fill = f,
                    lag, rate, "overloaded: shedding negatives (importance-weighted)"
                );
            } else {
                info!("load back to normal: nothing shed");
            }
        }
    }
}

/// Whether any fresh joiner signal reports a stall; the first reason found.
fn stalled(entries: &HashMap<String, String>, now_ms: i64) -> (bool, Option<String>) {
    for (instance, json) in entries {
        match serde_json::from_str::<JoinerSignal>(json) {
            Ok(s) if s.stalled && now_ms - s.updated_ms <= JOINER_SIGNAL_FRESH_MS => {
                return (
                    true,
                    Some(format!("{instance}: {}", s.reason.unwrap_or_default())),
                );
            }
            Ok(_) => {}
            Err(e) => warn!(%instance, error = %e, "unreadable joiner signal ignored"),
        }
    }
    (false, None)
}

/// Why the learning guard stopped.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuardError(DependencyError<redis::RedisError>);

/// Polls the joiner's signal every second and flips the learning guard, until `stop`. Reads
/// follow the dependency policy; an outage past its budget, or a key that cannot be read as
/// the signal hash (a wrong type: somebody else writes it), ends the guard with an error, and
/// with it the process: learning on without the guard could learn a click-stream stall.
pub async fn guard(
    control: std::sync::Arc<Control>,
    redis: ConnectionManager,
    policy: ctr_runtime::Policy,
    key: String,
    mut stop: watch::Receiver<bool>,
) -> Result<(), GuardError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while next_tick(&mut tick, &mut stop).await {
        let entries: HashMap<String, String> = policy
            .retry(&format!("reading the joiner signal at {key}"), || {
                let mut c = redis.clone();
                let key = &key;
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
            })
            .await
            .map_err(GuardError)?;
        let (stall, reason) = stalled(&entries, unix_ms());
        *control.guard_reason.lock().expect("guard reason") = reason.clone();
        if stall == control.learning() {
            if stall {
                warn!(
                    reason = reason.as_deref().unwrap_or(""),
                    "click stream stalled: learning paused, serving continues"
                );
            } else {
                info!("click stream healthy again: learning resumed");
            }
            control.set_learning(!stall);
        }
        metrics::gauge!("ctr_scorer_learning_paused").set(f64::from(u8::from(stall)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_overload_sheds_nothing() {
        let mut g = Governor::new(0.01, 20, 1_000);
        for _ in 0..100 {
            assert_eq!(g.step(0.79, 1_000), 1.0);
        }
    }

    #[test]
    fn overload_lowers_the_rate_to_the_floor_then_it_recovers_to_exactly_one() {
        let mut g = Governor::new(0.05, 20, 1_000);
        let mut last = 1.0;
        for _ in 0..50 {
            let r = g.step(0.95, 0);
            assert!(r <= last);
            last = r;
        }
        assert_eq!(last, 0.05);
        assert_eq!(
            g.thinning(),
            20,
            "stage two took over at the floor, up to max_thinning"
        );
        // Between the bounds the rate holds, unless the lag is over its bound.
        assert_eq!(g.step(0.6, 0), 0.05);
        let mut g2 = Governor::new(0.05, 20, 1_000);
        assert_eq!(g2.step(0.6, 500), 1.0);
        assert!(
            g2.step(0.6, 5_000) < 1.0,
            "lag with filling queues is overload"
        );
        let mut g3 = Governor::new(0.05, 20, 1_000);
        assert_eq!(
            g3.step(0.1, 1_000_000),
            1.0,
            "lag the workers do not cause is not"
        );
        g.step(0.1, 100);
        assert!(
            g.thinning() < 20 && g.rate() == 0.05,
            "stage two is undone first"
        );
        for _ in 0..50 {
            g.step(0.1, 100);
        }
        assert_eq!((g.rate(), g.thinning()), (1.0, 1));
    }

    #[test]
    fn only_fresh_stall_signals_count() {
        let signal = |stalled: bool, updated_ms: i64| {
            serde_json::to_string(&JoinerSignal {
                stalled,
                reason: stalled.then(|| "no clicks".to_string()),
                click_coverage: None,
                window_serves: 0,
                window_clicks: 0,
                clicks_per_serve: None,
                baseline_clicks_per_serve: None,
                updated_ms,
                totals: ctr_schemas::contract::JoinStats::default(),
            })
            .unwrap()
        };
        let (fresh, old, ok) = (
            signal(true, 100_000),
            signal(true, 1_000),
            signal(false, 100_000),
        );
        let map = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert!(stalled(&map(&[("a", &fresh), ("b", &ok)]), 110_000).0);
        assert!(!stalled(&map(&[("a", &old), ("b", &ok)]), 110_000).0);
        assert!(!stalled(&map(&[("a", "garbage")]), 110_000).0);
    }
}

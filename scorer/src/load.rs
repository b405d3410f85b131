//! The hub the consumer, the workers, the shedding governor ([`crate::governor`]), the learning
//! guard ([`crate::guard`]) and the monitoring tasks share: the switches every worker reads
//! per record (the keep-rate of negatives, the thinning factor, whether to learn), the record
//! counters, the consumer lag and each partition's report.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ctr_models::Metrics;
use tokio::sync::watch;

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
    /// The ad.
    pub ad_id: String,
    /// Exact, over distinct labels.
    pub impressions: u64,
    /// Clicks over those impressions (late clicks included).
    pub clicks: u64,
    /// Mean of the predictions made for the ad's impressions before learning from each
    /// (progressive), over the same impressions as `observed_ctr`.
    pub mean_pctr: Option<f64>,
    /// Its observed click rate over the impressions learned from.
    pub observed_ctr: Option<f64>,
}

/// What happened to records, as counted in `ctr_scorer_records_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Learned from (weight 1, or an importance weight under shedding).
    Learned,
    /// Sampled out before learning (stage one); still counted in the totals.
    Shed,
    /// Dropped unread at the consumer (stage two).
    Dropped,
    /// Counted but not learned: the learning guard was on.
    Guarded,
    /// A late-click correction applied.
    Corrected,
    /// A label ID seen before: changed nothing.
    Duplicate,
    /// Unusable: sent to the dead-letter topic.
    Poison,
}

impl Counted {
    /// Every outcome, in the order `/metrics` lists them.
    pub const ALL: [Counted; 7] = [
        Counted::Learned,
        Counted::Shed,
        Counted::Dropped,
        Counted::Guarded,
        Counted::Corrected,
        Counted::Duplicate,
        Counted::Poison,
    ];

    /// The `outcome` label of `ctr_scorer_records_total`.
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

    /// Sets the keep-rate of negatives for learning (stage one), in (0, 1].
    pub fn set_rate(&self, rate: f64) {
        self.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Stage-two thinning factor: 1 = no negative dropped before decoding.
    pub fn thinning(&self) -> u32 {
        self.thinning.load(Ordering::Relaxed)
    }

    /// Sets the stage-two thinning factor (at least 1).
    pub fn set_thinning(&self, k: u32) {
        self.thinning.store(k.max(1), Ordering::Relaxed);
    }

    /// False while the learning guard is on.
    pub fn learning(&self) -> bool {
        self.learning.load(Ordering::Relaxed)
    }

    pub(crate) fn set_learning(&self, on: bool) {
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

    /// Notes that a batch was just written to Redis.
    pub fn published_now(&self) {
        self.last_publish_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// When estimates were last written to Redis (Unix ms).
    pub fn last_publish_ms(&self) -> Option<i64> {
        Some(self.last_publish_ms.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    /// The largest consumer lag over the owned partitions, records.
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

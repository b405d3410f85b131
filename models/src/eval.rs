//! Evaluation for progressive validation: every example is scored before the model learns
//! from it, and the score is recorded here.
//!
//! [`Metrics`] is a set of weighted sums, so it merges by addition: that is how slices
//! ([`SlicedMetrics`]) and sliding windows ([`WindowedMetrics`]) are built.
//!
//! - Log loss: mean of −[y ln p + (1 − y) ln(1 − p)], p clamped to [1e−15, 1 − 1e−15].
//! - Normalized entropy (He et al., ADKDD 2014): log loss divided by the entropy of the
//!   observed CTR, i.e. of always predicting the background rate. Below 1 is better than that.
//! - Calibration: Σp / Σy (1 = calibrated).
//! - AUC: streaming, from histograms of positives and negatives over `auc_bins` equal-width
//!   bins of logit(p) in [−12, 12]. Pairs in different bins are ranked exactly; pairs within one
//!   bin count as ties (½). The error is therefore at most half the share of
//!   positive–negative pairs that fall in the same bin, which [`Metrics::auc_error_bound`]
//!   reports; with the default 4,096 bins (width 0.006 in logit) it is typically below 10⁻³.
//! - Reliability: 20 bins over log10(p) in [−4, 0]: Σp, Σy and weight per bin, for a
//!   calibration plot.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use nohash_hasher::NoHashHasher;
use serde::{Deserialize, Serialize};

use crate::example::field_key;

/// Ad slices, keyed by the ad's name, with a fast fixed-seed string hash (the default SipHash
/// cost more than the slice's own sums; a fixed seed also makes iteration order reproducible).
type AdSlices = HashMap<String, Metrics, foldhash::fast::FixedState>;

/// Field slices are keyed by [`field_key`], already a hash.
type FieldSlices = HashMap<u64, (String, String, Metrics), BuildHasherDefault<NoHashHasher<u64>>>;

const LOGIT_RANGE: f64 = 12.0;
/// Buckets of the logit histogram that the AUC is computed from.
pub const DEFAULT_AUC_BINS: usize = 4096;
/// Bins of a reliability (calibration) plot.
pub const RELIABILITY_BINS: usize = 20;

/// Weighted progressive-validation sums.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    weight: f64,
    loss: f64,
    sum_p: f64,
    sum_y: f64,
    pos: Vec<f64>,
    neg: Vec<f64>,
    /// Per reliability bin: (Σ weight, Σ p·w, Σ y·w).
    reliability: Vec<(f64, f64, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_auc_bins(DEFAULT_AUC_BINS)
    }
}

/// One reliability bin for a calibration plot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// Lower and upper predicted probability of the bin.
    pub p_low: f64,
    /// Upper end of the bin.
    pub p_high: f64,
    /// Total weight of the predictions in the bin.
    pub weight: f64,
    /// Their weighted mean prediction.
    pub mean_predicted: f64,
    /// Their weighted observed click rate.
    pub observed: f64,
}

/// One valid prediction with what every set of sums needs from it, computed once: the
/// logarithms are most of the cost of recording, and a prediction is recorded in several places
/// (cumulative, window, slices).
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    w: f64,
    clicked: bool,
    /// p clamped to [1e−15, 1 − 1e−15].
    p: f64,
    /// w × the log loss of p.
    loss: f64,
    /// Where logit(p) falls in [−12, 12], scaled to [0, 1] (AUC histograms of any resolution).
    auc_x: f64,
    reliability_bin: usize,
}

impl Scored {
    /// `None` for a record that must leave no trace: a non-finite or non-positive weight, or a
    /// non-finite prediction (metrics must never turn into NaN).
    pub fn new(p: f64, clicked: bool, w: f64) -> Option<Self> {
        if !(w.is_finite() && w > 0.0 && p.is_finite()) {
            return None;
        }
        let p = p.clamp(1e-15, 1.0 - 1e-15);
        // Two logarithms give the loss, the logit and log10(p).
        let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
        Some(Self {
            w,
            clicked,
            p,
            loss: w * if clicked { ln_p } else { ln_q },
            auc_x: (ln_p - ln_q + LOGIT_RANGE) / (2.0 * LOGIT_RANGE),
            reliability_bin: ((ln_p * std::f64::consts::LOG10_E + 4.0) / 4.0
                * RELIABILITY_BINS as f64)
                .clamp(0.0, RELIABILITY_BINS as f64 - 1.0) as usize,
        })
    }
}

impl Metrics {
    /// Metrics with a given AUC resolution (slices use fewer bins to save memory).
    pub fn with_auc_bins(bins: usize) -> Self {
        let bins = bins.max(2);
        Self {
            weight: 0.0,
            loss: 0.0,
            sum_p: 0.0,
            sum_y: 0.0,
            pos: vec![0.0; bins],
            neg: vec![0.0; bins],
            reliability: vec![(0.0, 0.0, 0.0); RELIABILITY_BINS],
        }
    }

    /// Records prediction `p` for label `clicked` with weight `w`. Non-finite or non-positive
    /// weights and non-finite predictions are ignored (and leave no trace): metrics must never
    /// turn into NaN.
    pub fn record(&mut self, p: f64, clicked: bool, w: f64) {
        if let Some(s) = Scored::new(p, clicked, w) {
            self.add(&s);
        }
    }

    /// [`Metrics::record`] of a prediction already scored.
    pub fn add(&mut self, s: &Scored) {
        let Scored { w, clicked, p, .. } = *s;
        let y = f64::from(u8::from(clicked));
        self.weight += w;
        self.loss -= s.loss;
        self.sum_p += w * p;
        self.sum_y += w * y;
        let bins = self.pos.len();
        let b = ((s.auc_x * bins as f64) as usize).min(bins - 1);
        if clicked {
            self.pos[b] += w;
        } else {
            self.neg[b] += w;
        }
        let bin = &mut self.reliability[s.reliability_bin];
        bin.0 += w;
        bin.1 += w * p;
        bin.2 += w * y;
    }

    /// Adds another set of sums (same AUC resolution; a mismatched one is re-binned coarsely).
    pub fn merge(&mut self, o: &Metrics) {
        self.weight += o.weight;
        self.loss += o.loss;
        self.sum_p += o.sum_p;
        self.sum_y += o.sum_y;
        let (n, m) = (self.pos.len(), o.pos.len());
        for i in 0..m {
            let j = i * n / m;
            self.pos[j] += o.pos[i];
            self.neg[j] += o.neg[i];
        }
        for (a, b) in self.reliability.iter_mut().zip(&o.reliability) {
            a.0 += b.0;
            a.1 += b.1;
            a.2 += b.2;
        }
    }

    /// The metrics of what was recorded after `earlier`, a copy of these metrics taken then:
    /// the sums minus the earlier sums (same AUC resolution). Metrics are sums, so this is the
    /// exact metrics of the later records alone.
    pub fn since(&self, earlier: &Metrics) -> Metrics {
        let mut out = self.clone();
        out.weight -= earlier.weight;
        out.loss -= earlier.loss;
        out.sum_p -= earlier.sum_p;
        out.sum_y -= earlier.sum_y;
        if earlier.pos.len() == out.pos.len() {
            for (a, b) in out.pos.iter_mut().zip(&earlier.pos) {
                *a -= b;
            }
            for (a, b) in out.neg.iter_mut().zip(&earlier.neg) {
                *a -= b;
            }
        }
        for (a, b) in out.reliability.iter_mut().zip(&earlier.reliability) {
            a.0 -= b.0;
            a.1 -= b.1;
            a.2 -= b.2;
        }
        out
    }

    /// Total weight recorded (impressions, importance-weighted).
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Mean log loss; `None` before the first record.
    pub fn log_loss(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.loss / self.weight)
    }

    /// Log loss over the entropy of the observed CTR; `None` until both labels were seen.
    pub fn normalized_entropy(&self) -> Option<f64> {
        let ctr = self.sum_y / self.weight;
        if !(self.weight > 0.0 && ctr > 0.0 && ctr < 1.0) {
            return None;
        }
        let h = -(ctr * ctr.ln() + (1.0 - ctr) * (1.0 - ctr).ln());
        self.log_loss().map(|l| l / h)
    }

    /// Σp / Σy; `None` until a click was seen.
    pub fn calibration(&self) -> Option<f64> {
        (self.sum_y > 0.0).then(|| self.sum_p / self.sum_y)
    }

    /// Weighted observed click rate; `None` before the first record.
    pub fn observed_ctr(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.sum_y / self.weight)
    }

    /// Weighted mean prediction; `None` before the first record.
    pub fn mean_prediction(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.sum_p / self.weight)
    }

    fn pair_sums(&self) -> (f64, f64, f64) {
        let (mut below, mut ranked, mut tied) = (0.0, 0.0, 0.0);
        for (p, n) in self.pos.iter().zip(&self.neg) {
            ranked += p * below;
            tied += p * n;
            below += n;
        }
        (ranked, tied, self.pos.iter().sum::<f64>() * below)
    }

    /// Area under the ROC curve; `None` until both labels were seen.
    pub fn auc(&self) -> Option<f64> {
        let (ranked, tied, pairs) = self.pair_sums();
        (pairs > 0.0).then(|| (ranked + 0.5 * tied) / pairs)
    }

    /// Largest possible difference between [`Metrics::auc`] and the exact AUC.
    pub fn auc_error_bound(&self) -> Option<f64> {
        let (_, tied, pairs) = self.pair_sums();
        (pairs > 0.0).then(|| 0.5 * tied / pairs)
    }

    /// Non-empty reliability bins, lowest predicted probability first.
    /// Miscalibration across the reliability bins: Σ over bins of |Σp − Σy|, divided by Σy.
    /// 0 when every bin predicts as many clicks as it sees; unlike [`Metrics::calibration`],
    /// over- and under-prediction in different bins do not cancel (a model whose predictions
    /// are too close together scores badly here while its Σp/Σy can be 1). Includes the
    /// binomial noise of each bin, so it does not reach 0 on finite data.
    pub fn reliability_error(&self) -> Option<f64> {
        let miss: f64 = self.reliability.iter().map(|b| (b.1 - b.2).abs()).sum();
        (self.sum_y > 0.0).then(|| miss / self.sum_y)
    }

    /// The reliability plot: the non-empty bins, lowest first.
    pub fn reliability(&self) -> Vec<ReliabilityBin> {
        self.reliability
            .iter()
            .enumerate()
            .filter(|(_, b)| b.0 > 0.0)
            .map(|(i, b)| {
                let edge = |k: usize| 10f64.powf(-4.0 + 4.0 * k as f64 / RELIABILITY_BINS as f64);
                ReliabilityBin {
                    p_low: edge(i),
                    p_high: edge(i + 1),
                    weight: b.0,
                    mean_predicted: b.1 / b.0,
                    observed: b.2 / b.0,
                }
            })
            .collect()
    }
}

/// Metrics over a sliding window of event time, in buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowedMetrics {
    bucket_ms: i64,
    buckets: usize,
    auc_bins: usize,
    ring: VecDeque<(i64, Metrics)>,
}

impl WindowedMetrics {
    /// A window of `buckets` × `bucket_ms` of event time.
    pub fn new(bucket_ms: i64, buckets: usize, auc_bins: usize) -> Self {
        Self {
            bucket_ms: bucket_ms.max(1),
            buckets: buckets.max(1),
            auc_bins,
            ring: VecDeque::new(),
        }
    }

    /// Records one prediction `p` of an event at `ts_ms` with label `clicked` and weight `w`.
    pub fn record(&mut self, ts_ms: i64, p: f64, clicked: bool, w: f64) {
        if let Some(s) = Scored::new(p, clicked, w) {
            self.add(ts_ms, &s);
        }
    }

    /// [`WindowedMetrics::record`] of a prediction already scored.
    pub fn add(&mut self, ts_ms: i64, scored: &Scored) {
        let start = ts_ms.div_euclid(self.bucket_ms) * self.bucket_ms;
        // Newest first: nearly every record falls in the newest bucket.
        match self.ring.iter_mut().rev().find(|(s, _)| *s == start) {
            Some((_, m)) => m.add(scored),
            None => {
                let newest = self.ring.back().map_or(i64::MIN, |(s, _)| *s);
                let oldest_kept = newest.max(start) - (self.buckets as i64 - 1) * self.bucket_ms;
                if start < oldest_kept {
                    return; // older than the window: not part of it
                }
                let mut m = Metrics::with_auc_bins(self.auc_bins);
                m.add(scored);
                let at = self.ring.partition_point(|(s, _)| *s < start);
                self.ring.insert(at, (start, m));
                while self.ring.front().is_some_and(|(s, _)| *s < oldest_kept) {
                    self.ring.pop_front();
                }
            }
        }
    }

    /// The window's merged metrics.
    pub fn window(&self) -> Metrics {
        let mut out = Metrics::with_auc_bins(self.auc_bins);
        for (_, m) in &self.ring {
            out.merge(m);
        }
        out
    }

    /// Per-bucket metrics, oldest first: a metric over time.
    pub fn series(&self) -> impl Iterator<Item = (i64, &Metrics)> {
        self.ring.iter().map(|(s, m)| (*s, m))
    }
}

/// Serializes a map as a map, its entries in key order.
fn in_key_order<K: Ord + Serialize, V: Serialize, H, S: serde::Serializer>(
    map: &HashMap<K, V, H>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut entries: Vec<(&K, &V)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    serializer.collect_map(entries)
}

/// Metrics sliced by ad and by context field value, bounded in the number of slices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlicedMetrics {
    max_slices: usize,
    auc_bins: usize,
    /// Serialized in key order, as is `by_field`: the encoding of equal slices is the same
    /// bytes however each table was filled (an incremental checkpoint diffs those bytes).
    #[serde(serialize_with = "in_key_order")]
    by_ad: AdSlices,
    /// Keyed by the field's hash ([`crate::example::field_key`]) so recording allocates nothing;
    /// the names are kept for reports.
    #[serde(serialize_with = "in_key_order")]
    by_field: FieldSlices,
    /// Records whose slice did not fit under `max_slices`.
    overflow: Metrics,
}

impl SlicedMetrics {
    /// Per-slice metrics for at most `max_slices` ads and context-field values.
    pub fn new(max_slices: usize, auc_bins: usize) -> Self {
        Self {
            max_slices,
            auc_bins,
            by_ad: AdSlices::default(),
            by_field: FieldSlices::default(),
            overflow: Metrics::with_auc_bins(auc_bins),
        }
    }

    fn slices(&self) -> usize {
        self.by_ad.len() + self.by_field.len()
    }

    /// Records one prediction under its ad and each of its context fields.
    pub fn record(&mut self, ad: &str, context: &[(&str, &str)], p: f64, clicked: bool, w: f64) {
        if let Some(s) = Scored::new(p, clicked, w) {
            let keys: Vec<u64> = context.iter().map(|(n, v)| field_key(n, v)).collect();
            self.add(ad, context, &keys, &s);
        }
    }

    /// [`SlicedMetrics::record`] of a prediction already scored, with each context field's
    /// [`field_key`] already computed (`field_keys[i]` is the key of `context[i]`).
    pub fn add(&mut self, ad: &str, context: &[(&str, &str)], field_keys: &[u64], s: &Scored) {
        let bins = self.auc_bins;
        if let Some(m) = self.by_ad.get_mut(ad) {
            m.add(s);
        } else if self.slices() < self.max_slices {
            self.by_ad
                .entry(ad.to_string())
                .or_insert_with(|| Metrics::with_auc_bins(bins))
                .add(s);
        } else {
            self.overflow.add(s);
        }
        for ((n, v), key) in context.iter().zip(field_keys) {
            if let Some((_, _, m)) = self.by_field.get_mut(key) {
                m.add(s);
            } else if self.slices() < self.max_slices {
                let mut m = Metrics::with_auc_bins(bins);
                m.add(s);
                self.by_field
                    .insert(*key, ((*n).to_string(), (*v).to_string(), m));
            }
        }
    }

    /// The metrics of one ad, if it has a slice.
    pub fn ad(&self, ad: &str) -> Option<&Metrics> {
        self.by_ad.get(ad)
    }

    /// The metrics of one context field value, if it has a slice.
    pub fn field(&self, name: &str, value: &str) -> Option<&Metrics> {
        self.by_field
            .get(&field_key(name, value))
            .map(|(_, _, m)| m)
    }

    /// Every context-field slice as (name, value, metrics), in name and value order.
    pub fn fields(&self) -> Vec<(&str, &str, &Metrics)> {
        let mut v: Vec<(&str, &str, &Metrics)> = self
            .by_field
            .values()
            .map(|(n, val, m)| (n.as_str(), val.as_str(), m))
            .collect();
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        v
    }

    /// Ads by total weight, largest first.
    pub fn busiest_ads(&self, n: usize) -> Vec<(&str, &Metrics)> {
        let mut v: Vec<(&str, &Metrics)> =
            self.by_ad.iter().map(|(k, m)| (k.as_str(), m)).collect();
        v.sort_by(|a, b| b.1.weight().total_cmp(&a.1.weight()).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_loss_ne_and_calibration_of_a_constant_predictor() {
        let mut m = Metrics::default();
        for i in 0..1000 {
            m.record(0.1, i % 10 == 0, 1.0);
        }
        let h = -(0.1f64 * 0.1f64.ln() + 0.9 * 0.9f64.ln());
        assert!((m.log_loss().unwrap() - h).abs() < 1e-12);
        assert!(
            (m.normalized_entropy().unwrap() - 1.0).abs() < 1e-12,
            "background rate: NE = 1"
        );
        assert!((m.calibration().unwrap() - 1.0).abs() < 1e-12);
        assert!((m.auc().unwrap() - 0.5).abs() < 1e-12, "all tied");
    }

    #[test]
    fn auc_matches_exact_computation() {
        // Scores spread over many bins: the histogram AUC equals the exact pairwise AUC
        // within the reported bound.
        let mut m = Metrics::default();
        let mut scored = vec![];
        for i in 0..2000u32 {
            let p = 0.001 + 0.998 * ((i * 7919) % 2000) as f64 / 2000.0;
            let clicked = (i * 104_729) % 1000 < (p * 1000.0) as u32;
            m.record(p, clicked, 1.0);
            scored.push((p, clicked));
        }
        let (mut num, mut pairs) = (0.0, 0.0);
        for &(pp, yp) in &scored {
            for &(pn, yn) in &scored {
                if yp && !yn {
                    pairs += 1.0;
                    num += if pp > pn {
                        1.0
                    } else if pp == pn {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        let exact = num / pairs;
        let auc = m.auc().unwrap();
        assert!(
            (auc - exact).abs() <= m.auc_error_bound().unwrap() + 1e-12,
            "{auc} vs {exact}"
        );
        assert!(m.auc_error_bound().unwrap() < 1e-3);
    }

    #[test]
    fn bad_records_leave_no_trace() {
        let mut m = Metrics::default();
        m.record(f64::NAN, true, 1.0);
        m.record(0.5, true, f64::NAN);
        m.record(0.5, true, -1.0);
        assert_eq!(m, Metrics::default());
        m.record(0.0, true, 1.0); // clamped, finite
        assert!(m.log_loss().unwrap().is_finite());
    }

    #[test]
    fn windows_drop_old_buckets() {
        let mut w = WindowedMetrics::new(1000, 3, 64);
        for t in 0..10 {
            w.record(t * 1000, 0.5, true, 1.0);
        }
        assert_eq!(w.window().weight(), 3.0);
        w.record(0, 0.5, true, 1.0); // far too old: ignored
        assert_eq!(w.window().weight(), 3.0);
        assert_eq!(w.series().count(), 3);
    }

    #[test]
    fn slices_are_bounded() {
        let mut s = SlicedMetrics::new(3, 64);
        for ad in ["a", "b", "c", "d"] {
            s.record(ad, &[("geo", "US")], 0.1, false, 1.0);
        }
        assert!(s.ad("a").is_some() && s.ad("b").is_some());
        assert!(s.field("geo", "US").is_some());
        assert!(s.ad("d").is_none());
        assert_eq!(s.busiest_ads(10).len(), 2);
    }

    #[test]
    fn reliability_error_does_not_let_bins_cancel() {
        // Half the predictions at 0.01 for a true 0.02, half at 0.03 for a true 0.02: Σp/Σy is
        // 1, but each bin is off by half its clicks.
        let mut m = Metrics::default();
        for i in 0..100_000 {
            let p = if i % 2 == 0 { 0.01 } else { 0.03 };
            m.record(p, i % 50 < 1, 1.0);
            m.record(p, (i + 25) % 50 < 1, 1.0);
        }
        assert!((m.calibration().unwrap() - 1.0).abs() < 1e-9);
        assert!((m.reliability_error().unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(Metrics::default().reliability_error(), None);
    }

    #[test]
    fn since_is_the_metrics_of_the_later_records() {
        let (mut all, mut later) = (Metrics::default(), Metrics::default());
        for i in 0..2_000 {
            let (p, y) = (0.01 + (i % 7) as f64 * 0.01, i % 13 == 0);
            all.record(p, y, 1.0);
            if i == 999 {
                let earlier = all.clone();
                for j in 1_000..2_000 {
                    let (p, y) = (0.01 + (j % 7) as f64 * 0.01, j % 13 == 0);
                    all.record(p, y, 1.0);
                    later.record(p, y, 1.0);
                }
                let d = all.since(&earlier);
                assert!((d.log_loss().unwrap() - later.log_loss().unwrap()).abs() < 1e-9);
                assert!((d.calibration().unwrap() - later.calibration().unwrap()).abs() < 1e-9);
                assert!((d.auc().unwrap() - later.auc().unwrap()).abs() < 1e-9);
                return;
            }
        }
    }

    #[test]
    fn merge_is_addition() {
        let mut a = Metrics::default();
        let mut b = Metrics::default();
        let mut both = Metrics::default();
        for i in 0..100 {
            let p = 0.01 * f64::from(i % 50 + 1);
            if i % 2 == 0 {
                a.record(p, i % 3 == 0, 1.0)
            } else {
                b.record(p, i % 3 == 0, 1.0)
            }
            both.record(p, i % 3 == 0, 1.0);
        }
        a.merge(&b);
        assert!((a.log_loss().unwrap() - both.log_loss().unwrap()).abs() < 1e-12);
        assert_eq!(a.auc(), both.auc());
    }
}

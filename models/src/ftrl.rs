//! FTRL-Proximal logistic regression on hashed sparse features (McMahan et al., "Ad Click
//! Prediction: a View from the Trenches", KDD 2013, Algorithm 1).
//!
//! Per coordinate i the learner keeps z_i and n_i (the sum of squared gradients); the weight is
//! derived lazily:
//!
//! ```text
//! w_i = 0                                              if |z_i| ≤ λ1
//! w_i = −(z_i − sgn(z_i)·λ1) / ((β + √n_i)/α + λ2)      otherwise
//! ```
//!
//! and an update with gradient g_i = (p − y)·x_i·(importance weight) does
//! σ = (√(n_i + g²) − √n_i)/α; z_i += g − σ·w_i; n_i += g².
//!
//! State is sparse: a hash map from feature hash to coordinate, never an array sized by the
//! hash space. Memory stays bounded two ways (paper §5.2–5.3):
//! - **Admission**: a new feature gets a coordinate only after it has been seen
//!   `admit_after` times, counted in a fixed-size count-min sketch (two rows of saturating
//!   8-bit counters). Until then it contributes weight 0 and is not stored.
//! - **Eviction**: [`Ftrl::evict_idle`] drops coordinates not updated since a cut-off time, and
//!   [`Ftrl::enforce_cap`] drops the least recently updated ones beyond `max_coordinates`.
//!
//! Memory: a coordinate is a 24-byte slot (8-byte key; `z`, `n` as `f32`; last-update time as
//! `i64`) of a [`KeyMap`], which is between 1/4 and 1/2 full: 48–96 bytes per coordinate;
//! `bytes_per_coordinate` reports the live figure.
//!
//! Speed: a step first locates every feature's coordinate, then computes. In a table larger
//! than the caches each location is a cache miss, and locating them all before the arithmetic
//! lets those misses overlap instead of paying them one after another.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result, check_weight, config};
use crate::example::Feature;
use crate::keymap::{Found, KeyMap};

/// Settings of the FTRL learner.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FtrlConfig {
    /// Learning-rate scale (per-coordinate rate alpha / (beta + sqrt(Σg²))).
    pub alpha: f64,
    /// Learning-rate smoothing: keeps early per-coordinate rates bounded.
    pub beta: f64,
    /// L1 penalty: weights whose evidence is weaker stay exactly 0 (sparsity).
    pub l1: f64,
    /// L2 penalty.
    pub l2: f64,
    /// Occurrences before a feature is admitted; 0 or 1 admits every feature at once.
    pub admit_after: u8,
    /// log2 of the counters per admission-filter row.
    pub filter_bits: u8,
    /// Most coordinates kept; [`Ftrl::enforce_cap`] trims beyond it.
    pub max_coordinates: usize,
}

impl Default for FtrlConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            beta: 1.0,
            l1: 0.5,
            l2: 1.0,
            admit_after: 2,
            filter_bits: 20,
            max_coordinates: 4_000_000,
        }
    }
}

/// One coordinate. `z` and `n` are `f32`, as in Vowpal Wabbit and the paper's §5.4 (fewer bits
/// per coefficient cost no measurable accuracy): a 24-byte slot with its key keeps more of the
/// table in cache, and the table's cache misses are the learner's main cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Coord {
    z: f32,
    n: f32,
    last_ms: i64,
}

/// FTRL coordinates as one owner holds them after a batch: the coordinates the batch touched,
/// with their absolute values, and the keys maintenance dropped. A replica holding the
/// owner's coordinates as of the batch's start holds them as of its end after
/// [`Ftrl::apply`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FtrlDelta {
    set: Vec<(u64, Coord)>,
    removed: Vec<u64>,
}

impl FtrlDelta {
    /// This delta followed by `later` (a delta of the same learner from where this one ends),
    /// as one: applied once, it does what the two do applied in turn.
    pub fn merge(&mut self, later: FtrlDelta) {
        crate::keymap::merge_keyed(
            &mut self.set,
            &mut self.removed,
            later.set,
            later.removed,
            |s| *s,
            |s| s,
        );
    }

    /// Coordinates set plus coordinates removed.
    pub fn len(&self) -> usize {
        self.set.len() + self.removed.len()
    }

    /// No coordinate set or removed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The learner's full state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ftrl {
    cfg: FtrlConfig,
    coords: KeyMap<Coord>,
    /// Two rows of the admission count-min sketch, concatenated.
    filter: Vec<u8>,
}

/// Largest |logit| used; beyond it the sigmoid is 0 or 1 in f64 anyway.
const MAX_LOGIT: f64 = 35.0;

/// The logistic function, with the argument clamped to ±35.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x.clamp(-MAX_LOGIT, MAX_LOGIT)).exp())
}

/// Features on one example, at most; more is a caller bug and is rejected.
pub const MAX_FEATURES: usize = 256;

/// Features handled with small scratch arrays; the usual example has about 10 to 20.
const BLOCK: usize = 32;

impl Ftrl {
    /// An empty learner; `cfg` is checked first.
    pub fn new(cfg: FtrlConfig) -> Result<Self> {
        config(
            "alpha",
            cfg.alpha.is_finite() && cfg.alpha > 0.0,
            "must be > 0",
        )?;
        config(
            "beta",
            cfg.beta.is_finite() && cfg.beta >= 0.0,
            "must be >= 0",
        )?;
        config("l1", cfg.l1.is_finite() && cfg.l1 >= 0.0, "must be >= 0")?;
        config("l2", cfg.l2.is_finite() && cfg.l2 >= 0.0, "must be >= 0")?;
        config(
            "filter_bits",
            (8..=28).contains(&cfg.filter_bits),
            "must be 8..=28",
        )?;
        config("max_coordinates", cfg.max_coordinates > 0, "must be > 0")?;
        let filter = if cfg.admit_after > 1 {
            vec![0; 2 << cfg.filter_bits]
        } else {
            Vec::new()
        };
        Ok(Self {
            cfg,
            coords: KeyMap::new(),
            filter,
        })
    }

    /// The settings it was built with.
    pub fn config(&self) -> &FtrlConfig {
        &self.cfg
    }

    fn weight(&self, c: &Coord) -> f64 {
        weight_at(&self.cfg, c, f64::from(c.n).sqrt())
    }

    /// Probability of a click for these features.
    pub fn predict(&self, features: &[Feature]) -> f64 {
        self.predict_offset(features, 0.0)
    }

    /// Probability of a click for these features on top of a fixed `offset` (log-odds): the
    /// weights learn the correction to it (a base rate, another model's estimate).
    pub fn predict_offset(&self, features: &[Feature], offset: f64) -> f64 {
        // Blocks of a fixed size keep the scratch arrays small (they are initialised on every
        // call) while still locating a block's coordinates before reading any.
        let logit: f64 = features
            .chunks(BLOCK)
            .map(|block| {
                let mut at = [Found::Absent; BLOCK];
                self.locate(block, &mut at);
                block
                    .iter()
                    .zip(&at)
                    .map(|(f, a)| self.coords.at(*a).map_or(0.0, |c| self.weight(c) * f.value))
                    .sum::<f64>()
            })
            .sum::<f64>();
        sigmoid(offset + logit)
    }

    /// Finds every feature's coordinate before anything reads one (see the module docs).
    fn locate(&self, features: &[Feature], at: &mut [Found]) {
        for (a, f) in at.iter_mut().zip(features) {
            *a = self.coords.find(f.key);
        }
    }

    fn check(features: &[Feature]) -> Result<()> {
        if features.is_empty() {
            return Err(ModelError::NoFeatures);
        }
        if features.len() > MAX_FEATURES {
            return Err(ModelError::Config {
                name: "features",
                problem: "more than 256 on one example",
            });
        }
        if let Some(f) = features.iter().find(|f| !f.value.is_finite()) {
            return Err(ModelError::FeatureValue(f.value));
        }
        Ok(())
    }

    /// Progressive validation step: returns the prediction made *before* learning from the
    /// label, then updates with importance weight `weight`.
    pub fn learn(
        &mut self,
        features: &[Feature],
        clicked: bool,
        weight: f64,
        ts_ms: i64,
    ) -> Result<f64> {
        self.learn_offset(features, 0.0, clicked, weight, ts_ms)
    }

    /// [`Ftrl::learn`] on top of a fixed `offset` (log-odds, see [`Ftrl::predict_offset`]).
    pub fn learn_offset(
        &mut self,
        features: &[Feature],
        offset: f64,
        clicked: bool,
        weight: f64,
        ts_ms: i64,
    ) -> Result<f64> {
        check_weight(weight)?;
        Self::check(features)?;
        if !offset.is_finite() {
            return Err(ModelError::FeatureValue(offset));
        }
        if features.len() <= BLOCK {
            self.learn_checked::<BLOCK>(features, offset, clicked, weight, ts_ms)
        } else {
            self.learn_checked::<MAX_FEATURES>(features, offset, clicked, weight, ts_ms)
        }
    }

    /// [`Ftrl::learn`] of checked input of at most `N` features, with scratch arrays of `N`
    /// (small for the usual example, so that initialising them costs nothing measurable).
    fn learn_checked<const N: usize>(
        &mut self,
        features: &[Feature],
        offset: f64,
        clicked: bool,
        weight: f64,
        ts_ms: i64,
    ) -> Result<f64> {
        // Room for every feature to be new, so no insert below moves a located coordinate.
        self.coords.reserve(features.len());
        let mut at = [Found::Absent; N];
        self.locate(features, &mut at);
        let cfg = self.cfg;
        let mut w = [0.0f64; N];
        // n and √n of each located coordinate, √n reused by its update (0 for an absent one).
        let mut n_seen = [0.0f32; N];
        let mut sqrt_n = [0.0f64; N];
        let mut logit = offset;
        for (i, f) in features.iter().enumerate() {
            if let Some(c) = self.coords.at(at[i]) {
                n_seen[i] = c.n;
                sqrt_n[i] = f64::from(c.n).sqrt();
                w[i] = weight_at(&cfg, c, sqrt_n[i]);
                logit += w[i] * f.value;
            }
        }
        let p = sigmoid(logit);
        let g0 = (p - f64::from(u8::from(clicked))) * weight;
        for (i, f) in features.iter().enumerate() {
            let g = g0 * f.value;
            let c = match at[i] {
                Found::Absent => match self.coords.find(f.key) {
                    // Inserted by an earlier duplicate of this feature in the same example.
                    Found::Absent => {
                        if !admit(
                            &mut self.filter,
                            self.cfg.filter_bits,
                            self.cfg.admit_after,
                            f.key,
                        ) {
                            continue;
                        }
                        self.coords.get_or_insert_with(f.key, || Coord {
                            z: 0.0,
                            n: 0.0,
                            last_ms: ts_ms,
                        })
                    }
                    found => self.coords.at_mut(found).expect("just found"),
                },
                found => self.coords.at_mut(found).expect("located above"),
            };
            let n = f64::from(c.n);
            // √n from the first pass unless an earlier duplicate of this feature in the same
            // example moved n since (then as before: the current n).
            let root_n = if c.n == n_seen[i] {
                sqrt_n[i]
            } else {
                n.sqrt()
            };
            let sigma = ((n + g * g).sqrt() - root_n) / cfg.alpha;
            c.z = (f64::from(c.z) + g - sigma * w[i]) as f32;
            c.n = (n + g * g) as f32;
            c.last_ms = c.last_ms.max(ts_ms);
        }
        Ok(p)
    }

    /// Drops coordinates last updated before `cutoff_ms`; returns how many.
    pub fn evict_idle(&mut self, cutoff_ms: i64) -> usize {
        let mut dropped = Vec::new();
        self.evict_idle_into(cutoff_ms, &mut dropped);
        dropped.len()
    }

    /// [`Ftrl::evict_idle`], adding the dropped keys to `dropped`.
    fn evict_idle_into(&mut self, cutoff_ms: i64, dropped: &mut Vec<u64>) {
        self.coords.retain(|k, c| {
            let keep = c.last_ms >= cutoff_ms;
            if !keep {
                dropped.push(k);
            }
            keep
        });
    }

    /// [`Ftrl::evict_idle`] then [`Ftrl::enforce_cap`], adding every dropped key to `dropped`
    /// (what a replica must drop too, [`FtrlDelta`]).
    pub fn maintain_into(&mut self, cutoff_ms: i64, dropped: &mut Vec<u64>) {
        self.evict_idle_into(cutoff_ms, dropped);
        self.enforce_cap_into(dropped);
    }

    /// The coordinates of `keys` as they are now (absent ones as removed), for a replica.
    pub fn delta(&self, keys: impl IntoIterator<Item = u64>, evicted: &[u64]) -> FtrlDelta {
        let mut delta = FtrlDelta {
            set: Vec::new(),
            removed: evicted.to_vec(),
        };
        // A key without a coordinate is not admitted yet: its weight is 0 here and at the
        // replica alike.
        for k in keys {
            if let Some(c) = self.coords.get(k) {
                delta.set.push((k, *c));
            }
        }
        delta
    }

    /// Applies a delta from [`Ftrl::delta`]: afterwards every coordinate it names is the
    /// owner's. The admission filter is not replicated (a replica does not learn).
    pub fn apply(&mut self, delta: &FtrlDelta) {
        if !delta.removed.is_empty() {
            let removed: std::collections::HashSet<u64> = delta.removed.iter().copied().collect();
            self.coords.retain(|k, _| !removed.contains(&k));
        }
        for (k, c) in &delta.set {
            *self.coords.entry_or_default(*k) = *c;
        }
    }

    /// The admission filter: two rows of 2^`filter_bits` one-byte counters.
    pub fn admission_filter(&self) -> &[u8] {
        &self.filter
    }

    /// Replaces the admission filter with `filter` (from [`Ftrl::admission_filter`] of a
    /// learner with the same `filter_bits`); one of another size is refused.
    pub fn set_admission_filter(&mut self, filter: Vec<u8>) -> Result<()> {
        config(
            "admission filter",
            filter.len() == self.filter.len(),
            "has another size than this learner's filter_bits make",
        )?;
        self.filter = filter;
        Ok(())
    }

    /// Whether the two hold the same coordinates (the admission filters may differ).
    pub fn same_coordinates(&self, other: &Ftrl) -> bool {
        self.coords == other.coords
    }

    /// If more than `max_coordinates` are stored, drops the least recently updated (all
    /// coordinates older than the cut-off that brings the count to at most 90% of the cap, so
    /// trimming is rare). Deterministic: the result depends only on the state.
    pub fn enforce_cap(&mut self) -> usize {
        let mut dropped = Vec::new();
        self.enforce_cap_into(&mut dropped);
        dropped.len()
    }

    fn enforce_cap_into(&mut self, dropped: &mut Vec<u64>) {
        if self.coords.len() <= self.cfg.max_coordinates {
            return;
        }
        let keep = self.cfg.max_coordinates * 9 / 10;
        let mut times: Vec<i64> = self.coords.values().map(|c| c.last_ms).collect();
        let drop = times.len() - keep;
        let (_, cutoff, _) = times.select_nth_unstable(drop);
        let cutoff = *cutoff;
        self.evict_idle_into(cutoff, dropped);
        if self.coords.len() > self.cfg.max_coordinates {
            // Many coordinates share the cut-off time: drop those too.
            self.evict_idle_into(cutoff.saturating_add(1), dropped);
        }
    }

    /// Coordinates stored.
    pub fn coordinates(&self) -> usize {
        self.coords.len()
    }

    /// Heap bytes of the coordinate table per stored coordinate (the admission filter, a fixed
    /// 2^(filter_bits+1) bytes, is not included).
    pub fn bytes_per_coordinate(&self) -> f64 {
        let slot = KeyMap::<Coord>::slot_bytes();
        (self.coords.capacity() * slot) as f64 / self.coords.len().max(1) as f64
    }

    /// Bytes of the admission filter (fixed by its settings).
    pub fn filter_bytes(&self) -> usize {
        self.filter.len()
    }
}

/// A coordinate's weight, with `sqrt_n` = √n already computed (the update needs it too).
#[inline(always)]
fn weight_at(cfg: &FtrlConfig, c: &Coord, sqrt_n: f64) -> f64 {
    let z = f64::from(c.z);
    if z.abs() <= cfg.l1 {
        0.0
    } else {
        -(z - z.signum() * cfg.l1) / ((cfg.beta + sqrt_n) / cfg.alpha + cfg.l2)
    }
}

/// Counts one more sighting of `key` in the sketch; true once it has `admit_after` sightings.
fn admit(filter: &mut [u8], bits: u8, admit_after: u8, key: u64) -> bool {
    if admit_after <= 1 {
        return true;
    }
    let mask = (1usize << bits) - 1;
    let a = (key as usize) & mask;
    let b = (1usize << bits) + ((key >> 32) as usize & mask);
    filter[a] = filter[a].saturating_add(1);
    filter[b] = filter[b].saturating_add(1);
    filter[a].min(filter[b]) >= admit_after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(key: u64) -> Feature {
        Feature { key, value: 1.0 }
    }

    fn cfg() -> FtrlConfig {
        FtrlConfig {
            admit_after: 1,
            l1: 0.0,
            ..FtrlConfig::default()
        }
    }

    #[test]
    fn learns_a_rate() {
        let mut m = Ftrl::new(FtrlConfig {
            alpha: 0.1,
            ..cfg()
        })
        .unwrap();
        for i in 0..20_000 {
            m.learn(&[f(1)], i % 5 == 0, 1.0, i).unwrap();
        }
        let p = m.predict(&[f(1)]);
        assert!((p - 0.2).abs() < 0.02, "{p}");
    }

    #[test]
    fn progressive_prediction_precedes_the_update() {
        let mut m = Ftrl::new(cfg()).unwrap();
        let p0 = m.learn(&[f(1)], true, 1.0, 0).unwrap();
        assert_eq!(p0, 0.5, "nothing learned yet");
        assert!(m.predict(&[f(1)]) > 0.5);
    }

    #[test]
    fn l1_keeps_rare_noise_at_zero_weight() {
        let mut m = Ftrl::new(FtrlConfig { l1: 5.0, ..cfg() }).unwrap();
        m.learn(&[f(7)], true, 1.0, 0).unwrap();
        assert_eq!(m.predict(&[f(7)]), 0.5);
    }

    #[test]
    fn admission_waits_for_repeated_features() {
        let mut m = Ftrl::new(FtrlConfig {
            admit_after: 3,
            ..cfg()
        })
        .unwrap();
        m.learn(&[f(42)], true, 1.0, 0).unwrap();
        m.learn(&[f(42)], true, 1.0, 0).unwrap();
        assert_eq!(m.coordinates(), 0);
        m.learn(&[f(42)], true, 1.0, 0).unwrap();
        assert_eq!(m.coordinates(), 1);
    }

    #[test]
    fn importance_weight_scales_the_gradient() {
        let mut a = Ftrl::new(cfg()).unwrap();
        let mut b = Ftrl::new(cfg()).unwrap();
        a.learn(&[f(1)], false, 3.0, 0).unwrap();
        b.learn(&[f(1)], false, 1.0, 0).unwrap();
        assert!(a.predict(&[f(1)]) < b.predict(&[f(1)]));
    }

    #[test]
    fn eviction_bounds_memory() {
        let mut m = Ftrl::new(FtrlConfig {
            max_coordinates: 1000,
            ..cfg()
        })
        .unwrap();
        for i in 0..5_000u64 {
            m.learn(&[f(i)], false, 1.0, i as i64).unwrap();
        }
        assert_eq!(m.evict_idle(4_000), 4_000);
        assert_eq!(m.coordinates(), 1_000);
        for i in 5_000..6_000u64 {
            m.learn(&[f(i)], false, 1.0, i as i64).unwrap();
        }
        let dropped = m.enforce_cap();
        assert!(
            m.coordinates() <= 1_000 && dropped > 0,
            "{} left",
            m.coordinates()
        );
        assert!(
            m.predict(&[f(5_999)]) < 0.5,
            "the newest coordinates survive"
        );
    }

    #[test]
    fn bad_input_is_rejected_without_change() {
        let mut m = Ftrl::new(cfg()).unwrap();
        m.learn(&[f(1)], true, 1.0, 0).unwrap();
        let before = m.clone();
        assert_eq!(m.learn(&[], true, 1.0, 0), Err(ModelError::NoFeatures));
        assert!(matches!(
            m.learn(&[f(1)], true, f64::NAN, 0),
            Err(ModelError::Weight(_))
        ));
        assert!(matches!(
            m.learn(&[f(1)], true, -2.0, 0),
            Err(ModelError::Weight(_))
        ));
        let nan = Feature {
            key: 1,
            value: f64::NAN,
        };
        assert!(matches!(
            m.learn(&[nan], true, 1.0, 0),
            Err(ModelError::FeatureValue(_))
        ));
        assert_eq!(m, before);
        assert!(m.predict(&[f(1)]).is_finite());
    }

    #[test]
    fn settings_are_checked() {
        assert!(
            Ftrl::new(FtrlConfig {
                alpha: 0.0,
                ..cfg()
            })
            .is_err()
        );
        assert!(Ftrl::new(FtrlConfig { l1: -1.0, ..cfg() }).is_err());
        assert!(
            Ftrl::new(FtrlConfig {
                filter_bits: 40,
                ..cfg()
            })
            .is_err()
        );
    }
}

//! Model variants and running several side by side on one stream.
//!
//! Three kinds:
//! - **Counts**: the hierarchical smoothed counts ([`crate::counts`]) alone.
//! - **Ftrl**: FTRL-Proximal on hashed features (ad, campaign, position, context fields, ad ×
//!   field crosses).
//! - **Combined**: FTRL on top of the count model's estimate (its logit is FTRL's offset, and
//!   once more a real-valued feature; computed before either learns from the example). The
//!   count model contributes what it is good at (fast, well-smoothed per-key rates, with
//!   back-off for new ads); FTRL learns how much to trust it and corrects it with the ad,
//!   campaign, position and context fields (not the ad × field crosses, which the count model's
//!   levels already hold). This is the "counting features" idea of He et al. (ADKDD 2014) in
//!   its online form. It also weighs each context field's *deviation*: the logit of the count
//!   model's ad × field level minus the ad's ([`CountModel::predict_located`]), one weight per
//!   field name. The count estimate averages the field levels with equal weights, so a field
//!   whose ad-level differences are noise (geo, for most ads) puts its share of that noise in
//!   every estimate, and a field whose lift is real (an ad's favourite query category) gets no
//!   more than its share. The weights learn each field's worth from the clicks: a noise
//!   field's comes out negative, taking its share back out.
//!
//! FTRL learns on top of an [`Offset`]: `Ftrl` on the running base rate, `Combined` on the
//! count estimate. A fresh learner therefore predicts a sensible rate from its first example
//! (not ½), and its weights learn only departures from it, which sparse evidence keeps small.
//!
//! Each variant may put online Platt scaling ([`crate::calibration::Platt`]) on top, and keeps
//! its own progressive-validation metrics: cumulative, over a sliding event-time window, and
//! sliced by ad and context field. [`ModelSet`] runs variants side by side: every example is
//! scored by every variant, recorded, and only then learned from.
//!
//! Replication. A serving replica holds a copy of one variant and follows its owner through
//! [`VariantDelta`]s: after a batch the owner sends the absolute values of every parameter
//! the batch may have changed ([`Variant::touch`] collects their keys from the impressions
//! learned) and the keys its maintenance dropped; [`Variant::apply`] makes the copy's
//! parameters equal to the owner's, so both predict the same for any impression, seen or not.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use nohash_hasher::NoHashHasher;
use serde::{Deserialize, Serialize};

use crate::calibration::Platt;
use crate::counts::{
    BaseRate, CountModel, CountsConfig, CountsDelta, Estimate, Level, Located, Table, odds,
};
use crate::error::{ModelError, Result, check_weight};
use crate::eval::{Metrics, Scored, SlicedMetrics, WindowedMetrics};
use crate::example::{
    COUNT_FEATURE_KEY, Feature, FeatureSpec, Impression, Keys, MAX_CONTEXT_FIELDS, extract_keys,
    impression_feature_keys, shared_feature_keys,
};
use crate::ftrl::{Ftrl, FtrlConfig, FtrlDelta};
use crate::snapshot;

/// What a variant learns with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VariantKind {
    /// Hierarchical smoothed counts alone.
    Counts,
    /// FTRL-Proximal on hashed features alone.
    Ftrl,
    /// FTRL with the count model's estimate as one more feature.
    Combined,
}

impl std::str::FromStr for VariantKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "counts" => Ok(Self::Counts),
            "ftrl" => Ok(Self::Ftrl),
            "combined" => Ok(Self::Combined),
            _ => Err(ModelError::Config {
                name: "variant kind",
                problem: "must be counts, ftrl or combined",
            }),
        }
    }
}

/// Settings of one variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantConfig {
    /// Unique among the variants of a set (the scorer's `--models` name).
    pub name: String,
    /// What it learns with.
    pub kind: VariantKind,
    /// The count model's settings (used by `Counts` and `Combined`).
    pub counts: CountsConfig,
    /// FTRL's settings (used by `Ftrl` and `Combined`).
    pub ftrl: FtrlConfig,
    /// Which features FTRL sees.
    pub features: FeatureSpec,
    /// Online Platt scaling step size; `None` = no calibration layer.
    pub platt_rate: Option<f64>,
    /// Sliding-window metrics: bucket width (event-time ms) and number of buckets.
    pub window_bucket_ms: i64,
    /// Number of buckets of the sliding window.
    pub window_buckets: usize,
    /// Most metric slices (ads + context field values); 0 = no slicing.
    pub max_slices: usize,
}

impl VariantConfig {
    /// A variant of `kind` with default settings, named after the kind.
    pub fn of(kind: VariantKind) -> Self {
        let name = match kind {
            VariantKind::Counts => "counts",
            VariantKind::Ftrl => "ftrl",
            VariantKind::Combined => "combined",
        };
        Self {
            name: name.into(),
            kind,
            counts: CountsConfig::default(),
            ftrl: FtrlConfig::default(),
            // Combined's count estimate already holds the ad × field rates (its count model's
            // levels), so its FTRL part leaves the crosses out: they only repeated that
            // evidence. Without them it is better on every stream measured (docs/BENCHMARKS.md,
            // issue 18) and faster.
            features: FeatureSpec {
                ad_crosses: kind != VariantKind::Combined,
                ..FeatureSpec::default()
            },
            platt_rate: None,
            window_bucket_ms: 60_000,
            window_buckets: 60,
            max_slices: 2_000,
        }
    }
}

/// A variant's answer for one impression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Calibrated click probability.
    pub p: f64,
    /// Before the calibration layer.
    pub raw: f64,
    /// How the count model obtained its part, if the variant has one.
    pub level: Option<Level>,
}

/// One variant's full state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    cfg: VariantConfig,
    counts: Option<CountModel>,
    ftrl: Option<Ftrl>,
    platt: Option<Platt>,
    metrics: Metrics,
    window: WindowedMetrics,
    slices: SlicedMetrics,
    #[serde(skip)]
    scratch: Vec<Feature>,
    /// What FTRL learns on top of.
    offset: Offset,
}

/// What a variant's FTRL weights learn on top of: their sum is added to this log-odds. A fresh
/// learner so predicts a sensible rate from its first example (½ without it) and its weights
/// only learn departures from it, which sparse evidence keeps small.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Offset {
    /// Nothing: a `Counts` variant, or a variant restored from a snapshot of format 1, whose
    /// FTRL weights were learned without an offset (its bias weight holds the base rate).
    None,
    /// The running base rate (`Ftrl`).
    BaseRate(BaseRate),
    /// The count model's estimate for the impression (`Combined`): FTRL corrects the counts.
    CountEstimate,
}

fn logit(p: f64) -> f64 {
    odds(p).ln()
}

impl Variant {
    /// A fresh variant; `cfg` is checked first.
    pub fn new(cfg: VariantConfig) -> Result<Self> {
        let counts = match cfg.kind {
            VariantKind::Counts | VariantKind::Combined => Some(CountModel::new(cfg.counts)?),
            VariantKind::Ftrl => None,
        };
        let ftrl = match cfg.kind {
            VariantKind::Ftrl | VariantKind::Combined => Some(Ftrl::new(cfg.ftrl)?),
            VariantKind::Counts => None,
        };
        let platt = cfg.platt_rate.map(Platt::new).transpose()?;
        let offset = match cfg.kind {
            VariantKind::Ftrl => Offset::BaseRate(BaseRate::new(&cfg.counts)?),
            VariantKind::Combined => Offset::CountEstimate,
            VariantKind::Counts => Offset::None,
        };
        Ok(Self {
            counts,
            ftrl,
            platt,
            metrics: Metrics::default(),
            window: WindowedMetrics::new(cfg.window_bucket_ms, cfg.window_buckets, 512),
            slices: SlicedMetrics::new(cfg.max_slices, 64),
            scratch: Vec::with_capacity(32),
            offset,
            cfg,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Its settings.
    pub fn config(&self) -> &VariantConfig {
        &self.cfg
    }

    /// Cumulative progressive-validation metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Metrics over the sliding event-time window.
    pub fn window(&self) -> &WindowedMetrics {
        &self.window
    }

    /// Metrics per ad and per context-field value.
    pub fn slices(&self) -> &SlicedMetrics {
        &self.slices
    }

    /// The count model, for `Counts` and `Combined`.
    pub fn counts(&self) -> Option<&CountModel> {
        self.counts.as_ref()
    }

    /// The FTRL learner, for `Ftrl` and `Combined`.
    pub fn ftrl(&self) -> Option<&Ftrl> {
        self.ftrl.as_ref()
    }

    /// Parameters held: count keys plus FTRL coordinates.
    pub fn parameters(&self) -> usize {
        self.counts.as_ref().map_or(0, CountModel::keys)
            + self.ftrl.as_ref().map_or(0, Ftrl::coordinates)
    }

    /// FTRL's input for an impression: fills `features` with its features (and, for a
    /// combined variant, the count estimate `est` and the field `deviations` as real-valued
    /// ones) and returns the offset its weights add to ([`Offset`]). The count estimate's
    /// logit is computed once for both.
    fn ftrl_input(
        &self,
        keys: &Keys,
        est: Option<Estimate>,
        deviations: &[f64; MAX_CONTEXT_FIELDS],
        features: &mut Vec<Feature>,
    ) -> f64 {
        if self.ftrl.is_none() {
            return 0.0;
        }
        extract_keys(&self.cfg.features, keys, features);
        let count_logit = est.map(|e| logit(e.p));
        if let Some(value) = count_logit {
            features.push(Feature {
                key: COUNT_FEATURE_KEY,
                value,
            });
        }
        if self.weighs_deviations() {
            features.extend(
                keys.deviation_keys()
                    .zip(deviations)
                    .map(|(key, &value)| Feature { key, value }),
            );
        }
        match (self.offset, count_logit) {
            (Offset::BaseRate(b), _) => logit(b.rate()),
            (Offset::CountEstimate, Some(l)) => l,
            (Offset::None | Offset::CountEstimate, _) => 0.0,
        }
    }

    /// Whether this variant's FTRL weighs the count model's field deviations (a combined
    /// variant's does).
    fn weighs_deviations(&self) -> bool {
        matches!(self.offset, Offset::CountEstimate)
    }

    /// `deviations` if this variant [weighs them](Variant::weighs_deviations), else `None`.
    fn wants_deviations<'d>(
        &self,
        deviations: &'d mut [f64; MAX_CONTEXT_FIELDS],
    ) -> Option<&'d mut [f64; MAX_CONTEXT_FIELDS]> {
        self.weighs_deviations().then_some(deviations)
    }

    /// The running base rate, where the variant keeps one.
    fn base_mut(&mut self) -> Option<&mut BaseRate> {
        match &mut self.offset {
            Offset::BaseRate(b) => Some(b),
            _ => None,
        }
    }

    /// The variant's prediction for `x`, without learning.
    pub fn predict(&self, x: &Impression<'_>) -> Prediction {
        self.predict_keys(x, &Keys::of(x), &mut Vec::with_capacity(32))
    }

    /// [`Variant::predict`] with `x`'s keys already computed, using `features` as scratch
    /// space (a server asking for many candidates in one context reuses both).
    pub fn predict_keys(
        &self,
        x: &Impression<'_>,
        keys: &Keys,
        features: &mut Vec<Feature>,
    ) -> Prediction {
        let mut deviations = [0.0; MAX_CONTEXT_FIELDS];
        let est = self
            .counts
            .as_ref()
            .map(|c| c.predict_keys(x, keys, self.wants_deviations(&mut deviations)));
        let offset = self.ftrl_input(keys, est, &deviations, features);
        let raw = match &self.ftrl {
            Some(f) => f.predict_offset(features, offset),
            None => est.map_or(0.5, |e| e.p),
        };
        let p = self.platt.as_ref().map_or(raw, |c| c.calibrate(raw));
        Prediction {
            p,
            raw,
            level: est.map(|e| e.level),
        }
    }

    /// Progressive validation step: predict, record, then learn. Returns the prediction.
    /// On an error nothing has changed.
    pub fn learn(&mut self, x: &Impression<'_>, clicked: bool, weight: f64) -> Result<Prediction> {
        self.learn_keys(x, &Keys::of(x), clicked, weight)
    }

    /// [`Variant::learn`] with `x`'s keys already computed (several variants share them).
    pub fn learn_keys(
        &mut self,
        x: &Impression<'_>,
        keys: &Keys,
        clicked: bool,
        weight: f64,
    ) -> Result<Prediction> {
        check_weight(weight)?;
        x.validate()?;
        // The count keys are located once, for the prediction and for the update below.
        let mut at = Located::default();
        let mut deviations = [0.0; MAX_CONTEXT_FIELDS];
        let wanted = self.wants_deviations(&mut deviations);
        let est = self.counts.as_mut().map(|c| {
            c.locate(keys, &mut at);
            c.predict_located(x, &at, wanted)
        });
        let mut features = std::mem::take(&mut self.scratch);
        let offset = self.ftrl_input(keys, est, &deviations, &mut features);
        let raw = match &mut self.ftrl {
            Some(f) => f.learn_offset(&features, offset, clicked, weight, x.ts_ms),
            None => Ok(est.map_or(0.5, |e| e.p)),
        };
        // The buffer is scratch space, not state: leave it empty so equality and snapshots see
        // only the model.
        features.clear();
        self.scratch = features;
        let raw = raw?;
        if let Some(c) = &mut self.counts {
            c.update_located(x, &at, clicked, weight)?;
        }
        if let Some(b) = self.base_mut() {
            b.add(x.ts_ms, weight, 1.0, f64::from(u8::from(clicked)));
        }
        let p = match &mut self.platt {
            Some(c) => {
                let p = c.calibrate(raw);
                c.update(raw, clicked, weight);
                p
            }
            None => raw,
        };
        if let Some(scored) = Scored::new(p, clicked, weight) {
            self.metrics.add(&scored);
            self.window.add(x.ts_ms, &scored);
            if self.cfg.max_slices > 0 {
                self.slices.add(x.ad, x.context, keys.fields(), &scored);
            }
        }
        Ok(Prediction {
            p,
            raw,
            level: est.map(|e| e.level),
        })
    }

    /// Applies a late-click correction: `x` was learned as a negative, and its click arrived
    /// after the attribution window. The count model and the base rate add the click; FTRL,
    /// whose past gradient steps cannot be revised, and the metrics (the prediction was
    /// already scored) do not change.
    pub fn correct(&mut self, x: &Impression<'_>, weight: f64) -> Result<()> {
        check_weight(weight)?;
        x.validate()?;
        if let Some(c) = &mut self.counts {
            c.add_late_click(x, weight)?;
        }
        if let Some(b) = self.base_mut() {
            b.add(x.ts_ms, weight, 0.0, 1.0);
        }
        Ok(())
    }

    /// Bounds memory: drops FTRL coordinates idle since `cutoff_ms` and enforces the cap, and
    /// the count keys that have faded ([`crate::counts::CountModel::evict_faded`]). Returns
    /// what was dropped (a replica must drop it too: [`Variant::delta`]).
    pub fn maintain(&mut self, cutoff_ms: i64) -> Evicted {
        let mut evicted = Evicted::default();
        if let Some(f) = &mut self.ftrl {
            f.maintain_into(cutoff_ms, &mut evicted.ftrl);
        }
        if let Some(c) = &mut self.counts {
            c.evict_faded_into(&mut evicted.counts);
        }
        evicted
    }

    /// Adds to `touched` every parameter that learning from `x` (at any position) or a late
    /// click on it may change: the owner of a batch calls this for each impression the batch
    /// learned from, then [`Variant::delta`].
    pub fn touch(&self, x: &Impression<'_>, touched: &mut Touched) {
        self.touch_keys(&Keys::of(x), touched);
    }

    /// [`Variant::touch`] of an impression whose keys are `keys`.
    pub fn touch_keys(&self, keys: &Keys, touched: &mut Touched) {
        if self.counts.is_some() {
            CountModel::touched_keys(keys, &mut touched.counts);
        }
        if self.ftrl.is_some() {
            impression_feature_keys(&self.cfg.features, keys, &mut touched.ftrl);
        }
        if self.weighs_deviations() {
            touched.ftrl.extend(keys.deviation_keys());
        }
    }

    /// The parameters in `touched` as they are now, and what maintenance `evicted`: applied
    /// ([`Variant::apply`]) to a replica that held this variant's parameters as of the first
    /// touch, it makes every prediction of the replica equal to this variant's.
    pub fn delta(&self, touched: &Touched, evicted: &Evicted) -> VariantDelta {
        VariantDelta {
            counts: self
                .counts
                .as_ref()
                .map(|c| c.delta(touched.counts.iter(), &evicted.counts)),
            // The features every impression shares are always sent: 18 coordinates.
            ftrl: self.ftrl.as_ref().map(|f| {
                let keys = touched.ftrl.iter().copied().chain(shared_feature_keys());
                f.delta(keys, &evicted.ftrl)
            }),
            platt: self.platt,
            offset: self.offset,
        }
    }

    /// Applies an owner's [`Variant::delta`]. The delta must come from a variant of the same
    /// kind (same learners): otherwise nothing changes and the error says so. The metrics are
    /// the owner's business and are not replicated.
    pub fn apply(&mut self, delta: &VariantDelta) -> Result<()> {
        if delta.counts.is_some() != self.counts.is_some()
            || delta.ftrl.is_some() != self.ftrl.is_some()
            || delta.platt.is_some() != self.platt.is_some()
            || std::mem::discriminant(&delta.offset) != std::mem::discriminant(&self.offset)
        {
            return Err(ModelError::Config {
                name: "delta",
                problem: "comes from a variant of another kind",
            });
        }
        if let (Some(c), Some(d)) = (&mut self.counts, &delta.counts) {
            c.apply(d);
        }
        if let (Some(f), Some(d)) = (&mut self.ftrl, &delta.ftrl) {
            f.apply(d);
        }
        self.platt = delta.platt;
        self.offset = delta.offset;
        Ok(())
    }

    /// The landmark of the count model's decay clock, if the variant has one: when it moves,
    /// every counter was rescaled ([`crate::decay`]), so a delta no longer says all that
    /// changed since an earlier one ([`CountsDelta::merge`]).
    pub fn decay_landmark(&self) -> Option<i64> {
        self.counts.as_ref().map(|c| c.clock().landmark_ms())
    }

    /// Whether `other` holds the same parameters: every prediction of the two is the same.
    /// (Metrics and FTRL's admission filter, which no prediction reads, may differ.)
    pub fn same_parameters(&self, other: &Variant) -> bool {
        let ftrl = match (&self.ftrl, &other.ftrl) {
            (Some(a), Some(b)) => a.same_coordinates(b),
            (None, None) => true,
            _ => false,
        };
        ftrl && self.counts == other.counts
            && self.platt == other.platt
            && self.offset == other.offset
            && self.cfg == other.cfg
    }
}

/// What one variant's maintenance dropped ([`Variant::maintain`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evicted {
    counts: Vec<(Table, u64)>,
    ftrl: Vec<u64>,
}

impl Evicted {
    /// Entries dropped.
    pub fn len(&self) -> usize {
        self.counts.len() + self.ftrl.len()
    }

    /// Nothing dropped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `other`'s (a later maintenance of the same variant).
    pub fn extend(&mut self, other: Evicted) {
        self.counts.extend(other.counts);
        self.ftrl.extend(other.ftrl);
    }
}

/// Keys that are already uniform hashes need no hashing again.
type KeySet = HashSet<u64, BuildHasherDefault<NoHashHasher<u64>>>;

/// The parameters a batch of learning may have changed, per learner ([`Variant::touch`]), less
/// the few that every impression shares (every delta carries those).
#[derive(Debug, Clone, Default)]
pub struct Touched {
    counts: TouchedCounts,
    ftrl: KeySet,
}

/// Count keys per table.
#[derive(Debug, Clone, Default)]
struct TouchedCounts([KeySet; 4]);

impl Extend<(Table, u64)> for TouchedCounts {
    fn extend<I: IntoIterator<Item = (Table, u64)>>(&mut self, keys: I) {
        for (t, k) in keys {
            self.0[t as usize].insert(k);
        }
    }
}

impl TouchedCounts {
    fn iter(&self) -> impl Iterator<Item = (Table, u64)> + '_ {
        Table::ALL
            .into_iter()
            .flat_map(move |t| self.0[t as usize].iter().map(move |k| (t, *k)))
    }
}

impl Touched {
    /// No key touched.
    pub fn is_empty(&self) -> bool {
        self.counts.0.iter().all(KeySet::is_empty) && self.ftrl.is_empty()
    }

    /// Forgets every key (reused for the next batch).
    pub fn clear(&mut self) {
        self.counts.0.iter_mut().for_each(KeySet::clear);
        self.ftrl.clear();
    }
}

/// One variant's parameters as its owner holds them after a batch, for a replica
/// ([`Variant::delta`], [`Variant::apply`]): absolute values of what changed, never
/// increments, so applying a delta twice, or a delta whose batch the replica's state already
/// partly covers, gives the same result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantDelta {
    counts: Option<CountsDelta>,
    ftrl: Option<FtrlDelta>,
    platt: Option<Platt>,
    /// The offset, with its base rate (a few dozen bytes, always sent).
    offset: Offset,
}

impl VariantDelta {
    /// This delta followed by `later` (of the same variant, from where this one ends), as one:
    /// applied once, it does what the two do applied in turn, unless the count model's decay
    /// landmark moved in `later` ([`Variant::decay_landmark`]: the caller checks).
    pub fn merge(&mut self, later: VariantDelta) {
        if let (Some(c), Some(l)) = (&mut self.counts, later.counts) {
            c.merge(l);
        }
        if let (Some(f), Some(l)) = (&mut self.ftrl, later.ftrl) {
            f.merge(l);
        }
        self.platt = later.platt;
        self.offset = later.offset;
    }

    /// Parameters set or removed.
    pub fn len(&self) -> usize {
        self.counts.as_ref().map_or(0, CountsDelta::len)
            + self.ftrl.as_ref().map_or(0, FtrlDelta::len)
    }

    /// No parameter set or removed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a variant holds besides its parameters: its metrics, and FTRL's admission filter.
/// Bounded by the variant's settings (slices, window, filter bits), not by the keys it has
/// seen; an incremental checkpoint carries it as bytes, diffed against the last one's.
#[derive(Debug, Serialize)]
pub struct VariantExtrasRef<'a> {
    metrics: &'a Metrics,
    window: &'a WindowedMetrics,
    slices: &'a SlicedMetrics,
    admission: Option<&'a [u8]>,
}

/// [`VariantExtrasRef`], decoded (the same encoding).
#[derive(Debug, Deserialize)]
pub struct VariantExtras {
    metrics: Metrics,
    window: WindowedMetrics,
    slices: SlicedMetrics,
    admission: Option<Vec<u8>>,
}

/// [`ModelSet::extras`]: every variant's extras and the example count.
#[derive(Debug, Serialize)]
pub struct ModelSetExtrasRef<'a> {
    variants: Vec<VariantExtrasRef<'a>>,
    examples: u64,
}

/// [`ModelSetExtrasRef`], decoded (the same encoding), for [`ModelSet::set_extras`].
#[derive(Debug, Deserialize)]
pub struct ModelSetExtras {
    variants: Vec<VariantExtras>,
    examples: u64,
}

/// Several variants learning side by side from the same stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSet {
    variants: Vec<Variant>,
    examples: u64,
}

impl ModelSet {
    /// Fresh variants from `configs` (at least one, with unique names).
    pub fn new(configs: Vec<VariantConfig>) -> Result<Self> {
        if configs.is_empty() {
            return Err(ModelError::Config {
                name: "variants",
                problem: "need at least one",
            });
        }
        let mut names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ModelError::Config {
                name: "variants",
                problem: "names must be unique",
            });
        }
        let variants = configs
            .into_iter()
            .map(Variant::new)
            .collect::<Result<_>>()?;
        Ok(Self {
            variants,
            examples: 0,
        })
    }

    /// Scores `x` with every variant, records the metrics, then lets each learn.
    /// Returns `x`'s keys, which it learned with (a caller that notes what changed keeps them:
    /// [`ModelSet::touch_keys`]).
    pub fn learn(&mut self, x: &Impression<'_>, clicked: bool, weight: f64) -> Result<Keys> {
        check_weight(weight)?;
        x.validate()?;
        let keys = Keys::of(x);
        for v in &mut self.variants {
            v.learn_keys(x, &keys, clicked, weight)?;
        }
        self.examples += 1;
        Ok(keys)
    }

    /// Applies a late-click correction to every variant (see [`Variant::correct`]); returns
    /// `x`'s keys, as [`ModelSet::learn`] does.
    pub fn correct(&mut self, x: &Impression<'_>, weight: f64) -> Result<Keys> {
        check_weight(weight)?;
        x.validate()?;
        for v in &mut self.variants {
            v.correct(x, weight)?;
        }
        Ok(Keys::of(x))
    }

    /// The variant `name`, to change in place.
    pub fn variant_mut(&mut self, name: &str) -> Option<&mut Variant> {
        self.variants.iter_mut().find(|v| v.name() == name)
    }

    /// Examples learned so far.
    pub fn examples(&self) -> u64 {
        self.examples
    }

    /// Every variant, in the order configured.
    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    /// The variant `name`.
    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name() == name)
    }

    /// The variant `name`, taken out of the set (a serving replica keeps only that one).
    pub fn take_variant(self, name: &str) -> Option<Variant> {
        self.variants.into_iter().find(|v| v.name() == name)
    }

    /// [`Variant::maintain`] of every variant, in order.
    pub fn maintain(&mut self, cutoff_ms: i64) -> Vec<Evicted> {
        self.variants
            .iter_mut()
            .map(|v| v.maintain(cutoff_ms))
            .collect()
    }

    /// What the set holds besides its parameters (every variant's [`VariantExtras`] and the
    /// example count), borrowed: its encoding is [`ModelSetExtras`]'.
    pub fn extras(&self) -> ModelSetExtrasRef<'_> {
        ModelSetExtrasRef {
            variants: self
                .variants
                .iter()
                .map(|v| VariantExtrasRef {
                    metrics: &v.metrics,
                    window: &v.window,
                    slices: &v.slices,
                    admission: v.ftrl.as_ref().map(Ftrl::admission_filter),
                })
                .collect(),
            examples: self.examples,
        }
    }

    /// Replaces what the set holds besides its parameters with `extras` (from
    /// [`ModelSet::extras`] of a set of the same variants). On an error (another number of
    /// variants, or an admission filter of another size) nothing has changed.
    pub fn set_extras(&mut self, extras: ModelSetExtras) -> Result<()> {
        let fits = extras.variants.len() == self.variants.len()
            && self.variants.iter().zip(&extras.variants).all(|(v, e)| {
                v.ftrl.as_ref().map(|f| f.admission_filter().len())
                    == e.admission.as_ref().map(Vec::len)
            });
        if !fits {
            return Err(ModelError::Config {
                name: "extras",
                problem: "come from a set of other variants",
            });
        }
        for (v, e) in self.variants.iter_mut().zip(extras.variants) {
            v.metrics = e.metrics;
            v.window = e.window;
            v.slices = e.slices;
            if let (Some(f), Some(a)) = (&mut v.ftrl, e.admission) {
                f.set_admission_filter(a)?;
            }
        }
        self.examples = extras.examples;
        Ok(())
    }

    /// [`Variant::touch_keys`] of every variant, into `touched` (one per variant, in order).
    pub fn touch_keys(&self, keys: &Keys, touched: &mut [Touched]) {
        for (v, t) in self.variants.iter().zip(touched) {
            v.touch_keys(keys, t);
        }
    }

    /// [`Variant::apply`] of one delta per variant, in order. The deltas must come from a set of
    /// the same variants; otherwise nothing has changed and the error says so.
    pub fn apply(&mut self, deltas: &[VariantDelta]) -> Result<()> {
        let fits = deltas.len() == self.variants.len()
            && self.variants.iter().zip(deltas).all(|(v, d)| {
                d.counts.is_some() == v.counts.is_some()
                    && d.ftrl.is_some() == v.ftrl.is_some()
                    && d.platt.is_some() == v.platt.is_some()
                    && std::mem::discriminant(&d.offset) == std::mem::discriminant(&v.offset)
            });
        if !fits {
            return Err(ModelError::Config {
                name: "deltas",
                problem: "come from a set of other variants",
            });
        }
        for (v, d) in self.variants.iter_mut().zip(deltas) {
            v.apply(d)?;
        }
        Ok(())
    }

    /// The full state as a snapshot (see [`crate::snapshot`]).
    pub fn snapshot(&self) -> Vec<u8> {
        snapshot::encode(self)
    }

    /// Restores a snapshot; predictions and later updates are bit-identical to the original's.
    /// A snapshot of format 1 is converted ([`legacy::ModelSetV1`]).
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        let mut set: Self = match snapshot::open(bytes)? {
            (snapshot::FORMAT_VERSION, body) => snapshot::decode_body(body)?,
            (1, body) => snapshot::decode_body::<legacy::ModelSetV1>(body)?.into_current(),
            (found, _) => {
                return Err(snapshot::SnapshotError::UnsupportedVersion {
                    found,
                    supported: snapshot::FORMAT_VERSION,
                }
                .into());
            }
        };
        for v in &mut set.variants {
            v.scratch = Vec::with_capacity(32);
        }
        Ok(set)
    }
}

/// Readers of the layouts of older snapshot formats, each converted to the current one.
pub mod legacy {
    use super::*;

    /// A [`ModelSet`] of snapshot format 1: variants without an [`Offset`], and the count
    /// model's prior strengths in pseudo-impressions.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct ModelSetV1 {
        variants: Vec<VariantV1>,
        examples: u64,
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct VariantV1 {
        cfg: VariantConfig,
        counts: Option<CountModel>,
        ftrl: Option<Ftrl>,
        platt: Option<Platt>,
        metrics: Metrics,
        window: WindowedMetrics,
        slices: SlicedMetrics,
    }

    impl ModelSetV1 {
        /// `set` as format 1 would have held it, for tests of the readers of old snapshots:
        /// offsets dropped, strengths back in pseudo-impressions at the global prior's mean.
        pub fn of(set: &ModelSet) -> Self {
            let variants = set
                .variants
                .iter()
                .map(|v| {
                    let mut cfg = v.cfg.clone();
                    let f = 1.0 / cfg.counts.global_prior_mean;
                    convert_strengths(&mut cfg.counts, f);
                    VariantV1 {
                        counts: v.counts.clone().map(|m| m.with_config(cfg.counts)),
                        cfg,
                        ftrl: v.ftrl.clone(),
                        platt: v.platt,
                        metrics: v.metrics.clone(),
                        window: v.window.clone(),
                        slices: v.slices.clone(),
                    }
                })
                .collect();
            Self {
                variants,
                examples: set.examples,
            }
        }

        /// The same models in the current layout. Their FTRL weights were learned without an
        /// offset, so they keep none ([`Offset::None`]). The prior strengths become
        /// pseudo-clicks at the global prior's mean, where they weigh what they weighed.
        pub fn into_current(self) -> ModelSet {
            let variants = self
                .variants
                .into_iter()
                .map(|v| {
                    let mut cfg = v.cfg;
                    let f = cfg.counts.global_prior_mean;
                    convert_strengths(&mut cfg.counts, f);
                    let counts = v.counts.map(|m| m.with_config(cfg.counts));
                    Variant {
                        cfg,
                        counts,
                        ftrl: v.ftrl,
                        platt: v.platt,
                        metrics: v.metrics,
                        window: v.window,
                        slices: v.slices,
                        scratch: Vec::with_capacity(32),
                        offset: Offset::None,
                    }
                })
                .collect();
            ModelSet {
                variants,
                examples: self.examples,
            }
        }
    }

    /// Multiplies every level's prior strength by `f`.
    fn convert_strengths(c: &mut CountsConfig, f: f64) {
        for s in [
            &mut c.campaign_strength,
            &mut c.ad_strength,
            &mut c.field_strength,
            &mut c.context_strength,
            &mut c.position_strength,
        ] {
            *s *= f;
        }
    }

    /// A [`VariantDelta`] of format 1 (before the offset): from an owner whose variant has
    /// none, as is any variant restored from format 1.
    #[derive(Debug, Deserialize)]
    pub struct VariantDeltaV1 {
        counts: Option<CountsDelta>,
        ftrl: Option<FtrlDelta>,
        platt: Option<Platt>,
    }

    impl VariantDeltaV1 {
        /// The same delta in the current layout.
        pub fn into_current(self) -> VariantDelta {
            VariantDelta {
                counts: self.counts,
                ftrl: self.ftrl,
                platt: self.platt,
                offset: Offset::None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEOS: [&str; 5] = ["US", "DE", "FR", "JP", "BR"];
    const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];

    /// A deterministic pseudo-random sequence (xorshift64) from a non-zero seed.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// A small deterministic stream: (ad, campaign, position, geo, device, ts, clicked).
    fn stream(n: usize) -> Vec<(String, String, u32, usize, usize, i64, bool)> {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        (0..n)
            .map(|i| {
                let ad = next() % 40;
                let r = next();
                (
                    format!("ad-{ad}"),
                    format!("camp-{}", ad % 6),
                    1 + (r % 4) as u32,
                    (r >> 8) as usize % GEOS.len(),
                    (r >> 16) as usize % DEVICES.len(),
                    // 11 hours of event time: 666 half-lives of the decay below (its landmark
                    // moves twice) and long enough for the idle eviction.
                    i as i64 * 5_000,
                    (r >> 32) % 100 < 3 + ad % 7,
                )
            })
            .collect()
    }

    /// Calls `f` with each impression of [`stream`]`(n)` and its label.
    fn each_impression(n: usize, mut f: impl FnMut(&Impression<'_>, bool)) {
        for (ad, campaign, position, g, d, ts, clicked) in stream(n) {
            let ctx = [("geo", GEOS[g]), ("device", DEVICES[d])];
            let x = Impression {
                ad: &ad,
                campaign: &campaign,
                position,
                context: &ctx,
                ts_ms: ts,
            };
            f(&x, clicked);
        }
    }

    fn variant(kind: VariantKind, platt: bool) -> Variant {
        let mut cfg = VariantConfig::of(kind);
        cfg.platt_rate = platt.then_some(0.2);
        // Decay fast enough that counts fade within the stream, so eviction is exercised.
        cfg.counts.half_life_ms = Some(60_000.0);
        cfg.ftrl.admit_after = 2;
        Variant::new(cfg).unwrap()
    }

    #[test]
    fn a_replica_following_deltas_predicts_as_its_owner_for_any_impression() {
        for (kind, platt) in [
            (VariantKind::Counts, false),
            (VariantKind::Ftrl, false),
            (VariantKind::Combined, false),
            (VariantKind::Combined, true),
        ] {
            let mut owner = variant(kind, platt);
            let records = stream(8_000);
            let mut replica = None;
            let mut touched = Touched::default();
            let mut evicted = Evicted::default();
            let (mut deltas, mut dropped) = (0, 0);
            for (i, (ad, campaign, position, g, d, ts, clicked)) in records.iter().enumerate() {
                let ctx = [("geo", GEOS[*g]), ("device", DEVICES[*d])];
                let x = Impression {
                    ad,
                    campaign,
                    position: *position,
                    context: &ctx,
                    ts_ms: *ts,
                };
                owner.learn(&x, *clicked, 1.0).unwrap();
                owner.touch(&x, &mut touched);
                if i % 500 == 499 {
                    // Maintenance as the owner runs it, with an idle cut-off that drops.
                    let e = owner.maintain(*ts - 600_000);
                    dropped += e.len();
                    evicted.extend(e);
                }
                if i == 1_000 {
                    // The replica starts from the owner's state here (a checkpoint).
                    replica = Some(owner.clone());
                    touched.clear();
                    evicted = Evicted::default();
                } else if i % 97 == 0
                    && let Some(r) = &mut replica
                {
                    r.apply(&owner.delta(&touched, &evicted)).unwrap();
                    touched.clear();
                    evicted = Evicted::default();
                    deltas += 1;
                }
            }
            let mut replica = replica.unwrap();
            replica.apply(&owner.delta(&touched, &evicted)).unwrap();
            assert!(deltas > 50);
            assert!(
                dropped > 0,
                "{kind:?}: maintenance dropped nothing to replicate"
            );
            assert!(
                replica.same_parameters(&owner),
                "{kind:?} platt={platt}: parameters differ"
            );
            // Any impression, including ads and contexts never seen and positions never used.
            for ad in ["ad-3", "ad-17", "ad-new"] {
                for campaign in ["camp-3", "camp-none"] {
                    for geo in ["US", "JP", "XX"] {
                        let ctx = [("geo", geo), ("device", "tablet"), ("hour", "7")];
                        for position in [1, 3, 9] {
                            let x = Impression {
                                ad,
                                campaign,
                                position,
                                context: &ctx,
                                ts_ms: 0,
                            };
                            assert_eq!(replica.predict(&x), owner.predict(&x), "{kind:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_snapshot_of_format_1_restores_its_evidence_without_offsets() {
        let configs = [
            VariantKind::Counts,
            VariantKind::Ftrl,
            VariantKind::Combined,
        ]
        .map(VariantConfig::of)
        .to_vec();
        let mut set = ModelSet::new(configs).unwrap();
        each_impression(3_000, |x, clicked| {
            set.learn(x, clicked, 1.0).unwrap();
        });
        let v1 = snapshot::encode_version(&legacy::ModelSetV1::of(&set), 1);
        let restored = ModelSet::restore(&v1).unwrap();
        assert_eq!(restored.examples(), set.examples());
        for (old, new) in set.variants().iter().zip(restored.variants()) {
            // The evidence and the weights are the same; the strengths mean what they meant at
            // the prior's mean; FTRL keeps learning without an offset, as it learned.
            assert_eq!(
                old.counts().map(CountModel::config),
                new.counts().map(CountModel::config)
            );
            assert_eq!(old.ftrl(), new.ftrl());
            assert_eq!(old.metrics(), new.metrics());
            assert_eq!(new.offset, Offset::None);
            assert_eq!(
                old.counts().map(|c| c.position_bias(2)),
                new.counts().map(|c| c.position_bias(2))
            );
        }
        let future = snapshot::encode_version(&1u8, snapshot::FORMAT_VERSION + 1);
        assert!(ModelSet::restore(&future).is_err());
    }

    #[test]
    fn a_delta_of_format_1_applies_to_a_variant_restored_from_format_1() {
        // An owner still on format 1 (a counts variant: it has no offset either way) and its
        // replica; the owner's delta as format 1 laid it out (counts, FTRL, Platt).
        let mut owner = variant(VariantKind::Counts, false);
        let mut replica = owner.clone();
        let mut touched = Touched::default();
        each_impression(500, |x, clicked| {
            owner.learn(x, clicked, 1.0).unwrap();
            owner.touch(x, &mut touched);
        });
        let delta = owner.delta(&touched, &Evicted::default());
        let v1 = postcard::to_allocvec(&(&delta.counts, &delta.ftrl, &delta.platt)).unwrap();
        let read: legacy::VariantDeltaV1 = snapshot::decode_body(&v1).unwrap();
        replica.apply(&read.into_current()).unwrap();
        assert!(replica.same_parameters(&owner));
    }

    #[test]
    fn combined_weighs_a_real_fields_deviations_above_a_noise_fields() {
        // 100 ads, each 2.5x as clickable in its favourite of 8 query categories; geo changes
        // nothing. The count estimate averages the ad x category and ad x geo levels, so it
        // carries half of each level's noise from geo. Combined learns one weight per field's
        // deviation: geo's must come out below the category's (it takes geo's noise back out),
        // and that must show in the log loss.
        const CATEGORIES: usize = 8;
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let ads: Vec<String> = (0..100).map(|a| format!("ad-{a}")).collect();
        let cats: Vec<String> = (0..CATEGORIES).map(|c| format!("q{c}")).collect();
        let mut counts = Variant::new(VariantConfig::of(VariantKind::Counts)).unwrap();
        let mut combined = Variant::new(VariantConfig::of(VariantKind::Combined)).unwrap();
        for i in 0..120_000i64 {
            let (a, r) = (next() as usize % ads.len(), next());
            let cat = (r % CATEGORIES as u64) as usize;
            let lift = if cat == a % CATEGORIES { 2.5 } else { 1.0 };
            let clicked = ((r >> 16) % 100_000) as f64 / 100_000.0 < 0.02 * lift;
            let ctx = [
                ("query_category", cats[cat].as_str()),
                ("geo", GEOS[(r >> 40) as usize % GEOS.len()]),
            ];
            let x = Impression {
                ad: &ads[a],
                campaign: "c",
                position: 1,
                context: &ctx,
                // An hour of event time: the counts' decay (6 h half-life) barely acts.
                ts_ms: i * 30,
            };
            counts.learn(&x, clicked, 1.0).unwrap();
            combined.learn(&x, clicked, 1.0).unwrap();
        }
        let weight = |field: &str| {
            let key = crate::example::deviation_key(field);
            logit(
                combined
                    .ftrl()
                    .unwrap()
                    .predict(&[Feature { key, value: 1.0 }]),
            )
        };
        let (w_category, w_geo) = (weight("query_category"), weight("geo"));
        assert!(
            w_geo < -0.2 && w_geo < w_category - 0.2,
            "deviation weights: query_category {w_category:.3}, geo {w_geo:.3}"
        );
        let ne = |v: &Variant| v.metrics().normalized_entropy().unwrap();
        assert!(
            ne(&combined) < ne(&counts) - 0.001,
            "NE combined {:.5}, counts {:.5}",
            ne(&combined),
            ne(&counts)
        );
    }

    #[test]
    fn a_fresh_learner_starts_at_its_base_rate_not_at_one_half() {
        for kind in [VariantKind::Ftrl, VariantKind::Combined] {
            let mut v = Variant::new(VariantConfig::of(kind)).unwrap();
            let ctx = [("geo", "US")];
            let x = Impression {
                ad: "a",
                campaign: "c",
                position: 1,
                context: &ctx,
                ts_ms: 0,
            };
            // The global prior's mean (2%), then the observed rate as evidence accumulates.
            assert!((v.predict(&x).p - 0.02).abs() < 1e-9, "{kind:?}");
            for i in 0..2_000 {
                v.learn(&Impression { ts_ms: i, ..x }, i % 200 == 0, 1.0)
                    .unwrap();
            }
            // Near the observed 0.5% (FTRL's weights still carry what they learned while the
            // base rate was coming down from the prior's mean).
            let p = v.predict(&x).p;
            assert!((0.0025..0.01).contains(&p), "{kind:?}: {p}");
        }
    }

    #[test]
    fn a_delta_of_another_kind_is_refused_and_changes_nothing() {
        let mut counts = variant(VariantKind::Counts, false);
        let ftrl = variant(VariantKind::Ftrl, false);
        let before = counts.clone();
        let delta = ftrl.delta(&Touched::default(), &Evicted::default());
        assert!(counts.apply(&delta).is_err());
        assert_eq!(counts, before);
    }
}

//! Model variants and running several side by side on one stream.
//!
//! Three kinds:
//! - **Counts**: the hierarchical smoothed counts ([`crate::counts`]) alone.
//! - **Ftrl**: FTRL-Proximal on hashed features (ad, campaign, position, context fields, ad ×
//!   field crosses).
//! - **Combined**: FTRL with one more, real-valued feature: logit of the count model's estimate
//!   (computed before either learns from the example). The count model contributes what it is
//!   good at (fast, well-smoothed per-key rates, with back-off for new ads); FTRL learns how much
//!   to trust it and corrects it with context and crosses. This is the "counting features" idea
//!   of He et al. (ADKDD 2014) in its online form.
//!
//! Each variant may put online Platt scaling ([`crate::calibration::Platt`]) on top, and keeps
//! its own progressive-validation metrics: cumulative, over a sliding event-time window, and
//! sliced by ad and context field. [`ModelSet`] runs variants side by side: every example is
//! scored by every variant, recorded, and only then learned from.

use serde::{Deserialize, Serialize};

use crate::calibration::Platt;
use crate::counts::{CountModel, CountsConfig, Estimate, Level, Located};
use crate::error::{ModelError, Result, check_weight};
use crate::eval::{Metrics, Scored, SlicedMetrics, WindowedMetrics};
use crate::example::{COUNT_FEATURE_KEY, Feature, FeatureSpec, Impression, Keys, extract_keys};
use crate::ftrl::{Ftrl, FtrlConfig};
use crate::snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VariantKind {
    Counts,
    Ftrl,
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
    pub name: String,
    pub kind: VariantKind,
    pub counts: CountsConfig,
    pub ftrl: FtrlConfig,
    pub features: FeatureSpec,
    /// Online Platt scaling step size; `None` = no calibration layer.
    pub platt_rate: Option<f64>,
    /// Sliding-window metrics: bucket width (event-time ms) and number of buckets.
    pub window_bucket_ms: i64,
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
            features: FeatureSpec::default(),
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
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-9, 1.0 - 1e-9);
    (p / (1.0 - p)).ln()
}

impl Variant {
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
        Ok(Self {
            counts,
            ftrl,
            platt,
            metrics: Metrics::default(),
            window: WindowedMetrics::new(cfg.window_bucket_ms, cfg.window_buckets, 512),
            slices: SlicedMetrics::new(cfg.max_slices, 64),
            scratch: Vec::with_capacity(32),
            cfg,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &VariantConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn window(&self) -> &WindowedMetrics {
        &self.window
    }

    pub fn slices(&self) -> &SlicedMetrics {
        &self.slices
    }

    pub fn counts(&self) -> Option<&CountModel> {
        self.counts.as_ref()
    }

    pub fn ftrl(&self) -> Option<&Ftrl> {
        self.ftrl.as_ref()
    }

    /// Fills `features` with FTRL's features of an impression (and the count estimate `est` as
    /// one, for a combined variant).
    fn features(&self, keys: &Keys, est: Option<Estimate>, features: &mut Vec<Feature>) {
        if self.ftrl.is_some() {
            extract_keys(&self.cfg.features, keys, features);
            if let Some(e) = est {
                features.push(Feature {
                    key: COUNT_FEATURE_KEY,
                    value: logit(e.p),
                });
            }
        }
    }

    /// The variant's prediction for `x`, without learning.
    pub fn predict(&self, x: &Impression<'_>) -> Prediction {
        let mut features = Vec::with_capacity(32);
        let keys = Keys::of(x);
        let est = self.counts.as_ref().map(|c| c.predict_keys(x, &keys));
        self.features(&keys, est, &mut features);
        let raw = match &self.ftrl {
            Some(f) => f.predict(&features),
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
        let est = self.counts.as_mut().map(|c| {
            c.locate(keys, &mut at);
            c.predict_located(x, &at)
        });
        let mut features = std::mem::take(&mut self.scratch);
        self.features(keys, est, &mut features);
        let raw = match &mut self.ftrl {
            Some(f) => f.learn(&features, clicked, weight, x.ts_ms),
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
    /// after the attribution window. The count model adds the click; FTRL, whose past gradient
    /// steps cannot be revised, and the metrics (the prediction was already scored) do not
    /// change. A no-op for an FTRL-only variant.
    pub fn correct(&mut self, x: &Impression<'_>, weight: f64) -> Result<()> {
        match &mut self.counts {
            Some(c) => c.add_late_click(x, weight),
            None => {
                check_weight(weight)?;
                x.validate()
            }
        }
    }

    /// Bounds memory: drops FTRL coordinates idle since `cutoff_ms` and enforces the cap, and
    /// the count keys that have faded ([`crate::counts::CountModel::evict_faded`]). Returns
    /// how many entries were dropped.
    pub fn maintain(&mut self, cutoff_ms: i64) -> usize {
        let ftrl = self
            .ftrl
            .as_mut()
            .map_or(0, |f| f.evict_idle(cutoff_ms) + f.enforce_cap());
        ftrl + self.counts.as_mut().map_or(0, CountModel::evict_faded)
    }
}

/// Several variants learning side by side from the same stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSet {
    variants: Vec<Variant>,
    examples: u64,
}

impl ModelSet {
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
    pub fn learn(&mut self, x: &Impression<'_>, clicked: bool, weight: f64) -> Result<()> {
        check_weight(weight)?;
        x.validate()?;
        let keys = Keys::of(x);
        for v in &mut self.variants {
            v.learn_keys(x, &keys, clicked, weight)?;
        }
        self.examples += 1;
        Ok(())
    }

    /// Applies a late-click correction to every variant (see [`Variant::correct`]).
    pub fn correct(&mut self, x: &Impression<'_>, weight: f64) -> Result<()> {
        check_weight(weight)?;
        x.validate()?;
        for v in &mut self.variants {
            v.correct(x, weight)?;
        }
        Ok(())
    }

    pub fn variant_mut(&mut self, name: &str) -> Option<&mut Variant> {
        self.variants.iter_mut().find(|v| v.name() == name)
    }

    pub fn examples(&self) -> u64 {
        self.examples
    }

    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name() == name)
    }

    /// See [`Variant::maintain`].
    pub fn maintain(&mut self, cutoff_ms: i64) -> usize {
        self.variants
            .iter_mut()
            .map(|v| v.maintain(cutoff_ms))
            .sum()
    }

    /// The full state as a snapshot (see [`crate::snapshot`]).
    pub fn snapshot(&self) -> Vec<u8> {
        snapshot::encode(self)
    }

    /// Restores a snapshot; predictions and later updates are bit-identical to the original's.
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        let mut set: Self = snapshot::decode(bytes)?;
        for v in &mut set.variants {
            v.scratch = Vec::with_capacity(32);
        }
        Ok(set)
    }
}

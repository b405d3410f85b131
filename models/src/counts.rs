//! Smoothed, decayed counts per (ad, context) with hierarchical Bayesian back-off and position
//! normalization.
//!
//! Levels, coarse to fine: global → campaign → ad → ad × one context field → ad × full context.
//! Each level's estimate is a Beta posterior mean whose prior is centred on its parent's
//! estimate: `p = (clicks + s·p_parent) / (imps + s)`, with a configured strength `s` per level
//! (pseudo-impressions). A new ad or a rare context therefore starts at its parent's rate and
//! moves to its own as evidence accumulates. The full context's parent is the mean of the
//! ad × field estimates (each of which already backs off to the ad).
//!
//! Position. Clicks depend on where an ad was shown. The position bias b(k) = CTR(k) / CTR(1)
//! is estimated from global per-position counts, and impressions are counted in *examination
//! units*: an impression at position k adds b(k), not 1 (clicks over expected clicks, COEC). So
//! every level estimates the position-normalized CTR (the CTR the ad would have at the top), and
//! the CTR at position k is that times b(k). The global per-position estimate is confounded by
//! which ads get shown where; that is the usual caveat of COEC and is accepted here.
//!
//! Memory: each key is a `u64` hash mapped to a [`Counter`] (two `f64`): a 24-byte slot of a
//! [`KeyMap`], which is between 1/4 and 1/2 full, so 48–96 bytes per key (`bytes_per_key`
//! reports the live figure; docs/BENCHMARKS.md has measured values). An impression touches
//! 3 + (number of context fields) keys: campaign, ad, ad × each field, ad × the full context.
//!
//! Bounded memory: with decay on, [`CountModel::evict_faded`] (called at each maintenance
//! step, as FTRL's idle eviction is) drops the keys whose decayed impressions and clicks have
//! both fallen below [`FADED_UNITS`]. Such a key weighs under 1/50,000 of its level's prior
//! strength in its estimate, so dropping it moves that estimate by less than about 2·10⁻⁵ of
//! itself; what changes is the reported [`Level`] (a faded exact context reads as backed off,
//! which is what it has become). With the default 6 h half-life, one impression fades after
//! about 42 h without another, a key of a million after about 7.5 days. Without decay nothing
//! fades, and the tables grow with the distinct keys seen.

use serde::{Deserialize, Serialize};

use crate::decay::{Counter, DecayClock};
use crate::error::{Result, check_weight, config};
use crate::example::{Impression, Keys, MAX_CONTEXT_FIELDS, combine};
use crate::keymap::{Found, KeyMap, merge_keyed};
use crate::smoothing::BetaPrior;

/// Every count key of one impression (campaign, ad, ad × each context field, ad × the whole
/// context) and where each is in its table: found once, then read by the prediction and
/// written by the update of the same learning step ([`CountModel::locate`]). Filled in place,
/// so the arrays are never copied.
#[derive(Debug)]
pub struct Located {
    campaign: (u64, Found),
    ad: (u64, Found),
    fields: [(u64, Found); MAX_CONTEXT_FIELDS],
    len: usize,
    context: (u64, Found),
}

impl Default for Located {
    fn default() -> Self {
        Self {
            campaign: (0, Found::Absent),
            ad: (0, Found::Absent),
            fields: [(0, Found::Absent); MAX_CONTEXT_FIELDS],
            len: 0,
            context: (0, Found::Absent),
        }
    }
}

impl Located {
    fn fields(&self) -> &[(u64, Found)] {
        &self.fields[..self.len]
    }
}

/// Decayed examination units (and clicks) under which a key has faded and is dropped by
/// [`CountModel::evict_faded`].
pub const FADED_UNITS: f64 = 1e-3;

/// Most positions tracked separately; lower slots share the last one.
pub const MAX_POSITIONS: usize = 16;

/// The decay's half-life of [`CountsConfig::default`], event-time ms (6 h; the scorer's
/// `--half-life-ms` default).
pub const DEFAULT_HALF_LIFE_MS: u64 = 6 * 3_600_000;

/// Settings of the count model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CountsConfig {
    /// Half-life of the decay in event-time ms; `None` = counts never decay.
    pub half_life_ms: Option<f64>,
    /// Prior of the global rate.
    pub global_prior_mean: f64,
    /// Strength (pseudo-impressions) of the global rate's prior. Weak: with decay, the
    /// global rate's evidence is only the last few half-lives of traffic, against which a
    /// prior of 100 (2 pseudo-clicks at 2%) kept a real log of 0.48% CTR 9% over-predicted;
    /// 10 leaves 2% (docs/BENCHMARKS.md, issue 18).
    pub global_prior_strength: f64,
    /// Prior strength of a campaign's rate towards the global rate. This and the strengths
    /// below are in *pseudo-clicks*: a prior of `k` weighs `k / parent rate` impressions, the
    /// number at which `k` clicks are expected. So a level's rate moves off its parent's after
    /// a similar number of clicks whatever the click rate (at 2%, 4 pseudo-clicks are 200
    /// impressions; at 0.5%, 800). It is the Beta prior under which a level's keys vary
    /// around their parent with a coefficient of variation of about 1/√k. The defaults (8, 4,
    /// 4, 2) are twice a first guess: of 0.5×, 1×, 2× and 4× that guess, 2× was best on the
    /// real Open Bandit log, and 4× was 0.2% better on the synthetic stream of
    /// `scripts/compare-peers` (docs/BENCHMARKS.md, "Model quality where it is hard").
    pub campaign_strength: f64,
    /// Prior strength of an ad's rate towards its campaign's (pseudo-clicks).
    pub ad_strength: f64,
    /// Prior strength of an ad × context-field rate towards the ad's (pseudo-clicks).
    pub field_strength: f64,
    /// Prior strength of an ad × full-context rate towards its field levels (pseudo-clicks).
    pub context_strength: f64,
    /// Prior strength of each position's CTR towards the global CTR (pseudo-clicks).
    /// Weak on purpose: examination units are counted with the position bias known at the
    /// time, so an early bias pulled towards 1 by a strong prior stays in the counts (20
    /// pseudo-clicks left the count model 6% under-calibrated on 80k impressions; 2 leave 3%).
    pub position_strength: f64,
}

impl Default for CountsConfig {
    fn default() -> Self {
        Self {
            half_life_ms: Some(DEFAULT_HALF_LIFE_MS as f64),
            global_prior_mean: 0.02,
            global_prior_strength: 10.0,
            campaign_strength: 8.0,
            ad_strength: 4.0,
            field_strength: 4.0,
            context_strength: 2.0,
            position_strength: 2.0,
        }
    }
}

/// Where an estimate's evidence came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// The ad has been seen in exactly this context.
    Exact,
    /// The ad is known, but not in this full context.
    BackedOff,
    /// Nothing is known about the ad: campaign or global rate.
    Prior,
}

/// A click probability and how it was obtained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Probability of a click at the impression's position.
    pub p: f64,
    /// Position-normalized CTR (the estimate at position 1).
    pub normalized: f64,
    /// The finest level that had evidence.
    pub level: Level,
    /// Decayed examination-weighted impressions behind the finest level used.
    pub evidence: f64,
}

/// The running click rate of a stream: decayed impressions and clicks with the count model's
/// global prior and half-life. FTRL learns on top of its log-odds ([`crate::Variant`]), so a
/// fresh learner predicts the base rate from its first example instead of ½, and its weights
/// only ever learn departures from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BaseRate {
    clock: DecayClock,
    prior: BetaPrior,
    total: Counter,
}

impl BaseRate {
    /// No impression yet: the rate is the prior's mean.
    pub fn new(cfg: &CountsConfig) -> Result<Self> {
        Ok(Self {
            clock: DecayClock::new(cfg.half_life_ms)?,
            prior: global_prior(cfg)?,
            total: Counter::default(),
        })
    }

    /// The rate now: the prior's posterior mean given the decayed counts.
    pub fn rate(&self) -> f64 {
        let s = self.clock.read_scale();
        self.prior
            .posterior_mean(self.total.clicks * s, self.total.imps * s)
    }

    /// Adds `imps` impressions (0 or 1) and `clicks` clicks at event time `ts_ms`, with
    /// importance weight `weight` (checked by the caller).
    pub fn add(&mut self, ts_ms: i64, weight: f64, imps: f64, clicks: f64) {
        if let Some(f) = self.clock.observe(ts_ms) {
            self.total.scale(f);
        }
        self.total
            .add(self.clock.weight(ts_ms) * weight, imps, clicks);
    }
}

/// The count model's key tables (a key's table is part of its identity in a [`CountsDelta`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Table {
    /// Per campaign.
    Campaigns,
    /// Per ad.
    Ads,
    /// Per ad × one context field (name, value).
    Fields,
    /// Per ad × full context.
    Contexts,
}

impl Table {
    /// Every table, in the order of their discriminants.
    pub const ALL: [Table; 4] = [Table::Campaigns, Table::Ads, Table::Fields, Table::Contexts];
}

/// A count model as its owner holds it after a batch: the counters the batch touched, with
/// their absolute values, the keys maintenance dropped, and the clock, global and position
/// counters (a few hundred bytes, always sent). A replica holding the owner's model as of the
/// batch's start holds it as of its end after [`CountModel::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountsDelta {
    clock: DecayClock,
    global: Counter,
    positions: [Counter; MAX_POSITIONS],
    set: Vec<(Table, u64, Counter)>,
    removed: Vec<(Table, u64)>,
}

impl CountsDelta {
    /// This delta followed by `later` (a delta of the same model from where this one ends), as
    /// one: applied to a model as of this delta's start, it gives the model as of `later`'s
    /// end. (Applying the two in turn gives the same unless the decay landmark moved in
    /// `later`; the caller that merges checks it did not.)
    pub fn merge(&mut self, later: CountsDelta) {
        self.clock = later.clock;
        self.global = later.global;
        self.positions = later.positions;
        merge_keyed(
            &mut self.set,
            &mut self.removed,
            later.set.into_iter().map(|(t, k, c)| ((t, k), c)),
            later.removed,
            |(t, k, c)| ((*t, *k), *c),
            |((t, k), c)| (t, k, c),
        );
    }

    /// Counters set plus counters removed.
    pub fn len(&self) -> usize {
        self.set.len() + self.removed.len()
    }

    /// No counter set or removed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The count model's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountModel {
    cfg: CountsConfig,
    clock: DecayClock,
    global_prior: BetaPrior,
    global: Counter,
    positions: [Counter; MAX_POSITIONS],
    campaigns: KeyMap<Counter>,
    ads: KeyMap<Counter>,
    fields: KeyMap<Counter>,
    contexts: KeyMap<Counter>,
}

/// Smoothed rate and evidence of counter `c`, read with decay factor `scale`
/// ([`DecayClock::read_scale`], computed once per call site: it costs an `exp2`).
///
/// `strength` is in pseudo-clicks: the prior weighs as many impressions as it takes to expect
/// that many clicks at the parent's rate (see [`CountsConfig`]).
fn smooth(c: Counter, scale: f64, parent: f64, strength: f64) -> (f64, f64) {
    let (n, k) = (c.imps * scale, c.clicks * scale);
    let n = n.max(0.0);
    let s = strength / parent.max(MIN_PARENT_RATE);
    ((k.clamp(0.0, n) + s * parent) / (n + s), n)
}

/// `p / (1 - p)`, with `p` kept off 0 and 1 (its log is the logit the variants use).
pub(crate) fn odds(p: f64) -> f64 {
    let p = p.clamp(1e-9, 1.0 - 1e-9);
    p / (1.0 - p)
}

/// The global rate's prior from `cfg` (the count model's and [`BaseRate`]'s).
fn global_prior(cfg: &CountsConfig) -> Result<BetaPrior> {
    BetaPrior::from_mean(cfg.global_prior_mean, cfg.global_prior_strength).map_err(|_| {
        crate::ModelError::Config {
            name: "global_prior",
            problem: "mean must be in (0, 1) and strength > 0",
        }
    })
}

/// The least parent rate a prior strength is scaled by: below it, a prior of `k` pseudo-clicks
/// weighs `k / MIN_PARENT_RATE` impressions at most.
const MIN_PARENT_RATE: f64 = 1e-4;

impl CountModel {
    /// An empty model; `cfg` is checked first.
    pub fn new(cfg: CountsConfig) -> Result<Self> {
        for (name, s) in [
            ("campaign_strength", cfg.campaign_strength),
            ("ad_strength", cfg.ad_strength),
            ("field_strength", cfg.field_strength),
            ("context_strength", cfg.context_strength),
            ("position_strength", cfg.position_strength),
        ] {
            config(
                name,
                s.is_finite() && s > 0.0,
                "must be a finite number > 0",
            )?;
        }
        let global_prior = global_prior(&cfg)?;
        Ok(Self {
            cfg,
            clock: DecayClock::new(cfg.half_life_ms)?,
            global_prior,
            global: Counter::default(),
            positions: [Counter::default(); MAX_POSITIONS],
            campaigns: KeyMap::new(),
            ads: KeyMap::new(),
            fields: KeyMap::new(),
            contexts: KeyMap::new(),
        })
    }

    /// The settings it was built with.
    pub fn config(&self) -> &CountsConfig {
        &self.cfg
    }

    /// The same counts under settings converted from an older snapshot's (same meaning).
    pub(crate) fn with_config(self, cfg: CountsConfig) -> Self {
        Self { cfg, ..self }
    }

    fn global_rate(&self, scale: f64) -> f64 {
        self.global_prior
            .posterior_mean(self.global.clicks * scale, self.global.imps * scale)
    }

    /// Position bias b(k) = CTR(k) / CTR(1), each smoothed towards the global CTR.
    pub fn position_bias(&self, position: u32) -> f64 {
        let scale = self.clock.read_scale();
        self.position_bias_at(position, scale, self.global_rate(scale))
    }

    fn position_bias_at(&self, position: u32, scale: f64, global: f64) -> f64 {
        let idx = (position.clamp(1, MAX_POSITIONS as u32) - 1) as usize;
        if idx == 0 {
            return 1.0;
        }
        let s = self.cfg.position_strength;
        let (top, _) = smooth(self.positions[0], scale, global, s);
        let (here, _) = smooth(self.positions[idx], scale, global, s);
        (here / top).clamp(0.01, 1.0e3)
    }

    /// The estimate for `x`, without learning from it.
    pub fn predict(&self, x: &Impression<'_>) -> Estimate {
        self.predict_keys(x, &Keys::of(x), None)
    }

    /// [`CountModel::predict`] with `x`'s keys already computed (`deviations` as in
    /// [`CountModel::predict_located`]).
    pub fn predict_keys(
        &self,
        x: &Impression<'_>,
        keys: &Keys,
        deviations: Option<&mut [f64; MAX_CONTEXT_FIELDS]>,
    ) -> Estimate {
        let mut at = Located::default();
        self.find(keys, &mut at);
        self.predict_located(x, &at, deviations)
    }

    /// Finds where each of `keys`' count keys is, into `at`, after making room for all of them
    /// to be new, so the locations stay valid through [`CountModel::update_located`]'s
    /// inserts. Locating once serves the prediction and the update of one learning step.
    pub fn locate(&mut self, keys: &Keys, at: &mut Located) {
        self.campaigns.reserve(1);
        self.ads.reserve(1);
        self.fields.reserve(keys.fields().len());
        self.contexts.reserve(1);
        self.find(keys, at);
    }

    /// Every key is hashed before the first lookup, so the lookups' cache misses overlap.
    fn find(&self, keys: &Keys, at: &mut Located) {
        at.len = keys.fields().len();
        for (slot, f) in at.fields.iter_mut().zip(keys.fields()) {
            slot.0 = combine(keys.ad, *f);
        }
        at.context.0 = combine(keys.ad, keys.context);
        at.campaign = (keys.campaign, self.campaigns.find(keys.campaign));
        at.ad = (keys.ad, self.ads.find(keys.ad));
        for slot in &mut at.fields[..at.len] {
            slot.1 = self.fields.find(slot.0);
        }
        at.context.1 = self.contexts.find(at.context.0);
    }

    /// [`CountModel::predict`] at keys from [`CountModel::locate`] (nothing changed since).
    ///
    /// With `deviations`, also writes each context field's deviation from the ad into it (in
    /// the impression's field order): the logit of the ad × field estimate minus the ad's.
    /// Smoothing keeps it near 0 while the ad × field level has little evidence. A combined
    /// variant weighs these per field ([`crate::variants`]): the estimate averages the field
    /// levels with equal weights, where how much of a level's difference from the ad is real
    /// differs from field to field.
    pub fn predict_located(
        &self,
        x: &Impression<'_>,
        at: &Located,
        mut deviations: Option<&mut [f64; MAX_CONTEXT_FIELDS]>,
    ) -> Estimate {
        let scale = self.clock.read_scale();
        let global = self.global_rate(scale);
        let campaign = self.campaigns.at(at.campaign.1).copied();
        let ad_counter = self.ads.at(at.ad.1).copied();
        let ctx_counter = self.contexts.at(at.context.1).copied();

        let (p_campaign, _) = smooth(
            campaign.unwrap_or_default(),
            scale,
            global,
            self.cfg.campaign_strength,
        );
        let (p_ad, n_ad) = smooth(
            ad_counter.unwrap_or_default(),
            scale,
            p_campaign,
            self.cfg.ad_strength,
        );
        let fields = at.fields();
        let parent = if fields.is_empty() {
            p_ad
        } else {
            let mut sum = 0.0;
            for (i, (_, f)) in fields.iter().enumerate() {
                let c = self.fields.at(*f).copied().unwrap_or_default();
                let p = smooth(c, scale, p_ad, self.cfg.field_strength).0;
                if let Some(d) = deviations.as_deref_mut() {
                    d[i] = (odds(p) / odds(p_ad)).ln();
                }
                sum += p;
            }
            sum / fields.len() as f64
        };
        let (p_ctx, n_ctx) = smooth(
            ctx_counter.unwrap_or_default(),
            scale,
            parent,
            self.cfg.context_strength,
        );
        let (level, evidence) = match (ctx_counter, ad_counter) {
            (Some(_), _) => (Level::Exact, n_ctx),
            (None, Some(_)) => (Level::BackedOff, n_ad),
            (None, None) => (Level::Prior, 0.0),
        };
        let p = (p_ctx * self.position_bias_at(x.position, scale, global)).clamp(1e-9, 1.0 - 1e-9);
        Estimate {
            p,
            normalized: p_ctx,
            level,
            evidence,
        }
    }

    /// Learns from one labeled impression with importance weight `weight` (1 normally; 1/r for
    /// an event kept with probability r when sampling).
    pub fn update(&mut self, x: &Impression<'_>, clicked: bool, weight: f64) -> Result<()> {
        self.add(x, &Keys::of(x), weight, 1.0, f64::from(u8::from(clicked)))
    }

    /// [`CountModel::update`] at keys from [`CountModel::locate`] (nothing changed since).
    pub fn update_located(
        &mut self,
        x: &Impression<'_>,
        at: &Located,
        clicked: bool,
        weight: f64,
    ) -> Result<()> {
        self.add_located(x, at, weight, 1.0, f64::from(u8::from(clicked)))
    }

    /// Adds a click to an impression already learned as a negative (a late-click correction
    /// from the joiner): clicks grow at every level, impressions do not.
    pub fn add_late_click(&mut self, x: &Impression<'_>, weight: f64) -> Result<()> {
        self.add(x, &Keys::of(x), weight, 0.0, 1.0)
    }

    /// Adds `imps` impressions (0 or 1) and `y` clicks of `x` at every level.
    fn add(
        &mut self,
        x: &Impression<'_>,
        keys: &Keys,
        weight: f64,
        imps: f64,
        y: f64,
    ) -> Result<()> {
        check_weight(weight)?;
        x.validate()?;
        let mut at = Located::default();
        self.locate(keys, &mut at);
        self.add_located(x, &at, weight, imps, y)
    }

    /// [`CountModel::add`] at located keys. Rescaling (a landmark move) changes values in
    /// place, never locations.
    fn add_located(
        &mut self,
        x: &Impression<'_>,
        at: &Located,
        weight: f64,
        imps: f64,
        y: f64,
    ) -> Result<()> {
        check_weight(weight)?;
        x.validate()?;
        if let Some(f) = self.clock.observe(x.ts_ms) {
            self.rescale(f);
        }
        let g = self.clock.weight(x.ts_ms) * weight;
        let idx = (x.position.clamp(1, MAX_POSITIONS as u32) - 1) as usize;
        // Position counts use raw impressions: they define the bias.
        self.positions[idx].add(g, imps, y);
        // Every other level counts examination units (see module docs).
        let scale = self.clock.read_scale();
        let e = imps * self.position_bias_at(x.position, scale, self.global_rate(scale));
        self.global.add(g, e, y);
        // A key absent when located is inserted now (looked up again: an earlier level of
        // this impression may have inserted the same key); a present one is where it was found.
        fn slot(m: &mut KeyMap<Counter>, (key, found): (u64, Found)) -> &mut Counter {
            match found {
                Found::Absent => m.entry_or_default(key),
                found => m
                    .at_mut(found)
                    .expect("located, and the table has not grown since"),
            }
        }
        slot(&mut self.campaigns, at.campaign).add(g, e, y);
        slot(&mut self.ads, at.ad).add(g, e, y);
        for &f in at.fields() {
            slot(&mut self.fields, f).add(g, e, y);
        }
        slot(&mut self.contexts, at.context).add(g, e, y);
        Ok(())
    }

    fn rescale(&mut self, f: f64) {
        self.global.scale(f);
        self.positions.iter_mut().for_each(|c| c.scale(f));
        for m in [
            &mut self.campaigns,
            &mut self.ads,
            &mut self.fields,
            &mut self.contexts,
        ] {
            m.values_mut().for_each(|c| c.scale(f));
        }
    }

    /// Drops every campaign, ad, field and context key whose decayed impressions and clicks
    /// are both below [`FADED_UNITS`] at the clock's time (see the module docs); returns how
    /// many. Deterministic: depends only on the state. A no-op without decay. The global and
    /// per-position counters are never dropped.
    pub fn evict_faded(&mut self) -> usize {
        let mut dropped = Vec::new();
        self.evict_faded_into(&mut dropped);
        dropped.len()
    }

    /// [`CountModel::evict_faded`], adding each dropped key (with its table) to `dropped`.
    pub fn evict_faded_into(&mut self, dropped: &mut Vec<(Table, u64)>) {
        if self.cfg.half_life_ms.is_none() {
            return;
        }
        let scale = self.clock.read_scale();
        for table in Table::ALL {
            self.table_mut(table).retain(|k, c| {
                let keep = c.imps * scale >= FADED_UNITS || c.clicks * scale >= FADED_UNITS;
                if !keep {
                    dropped.push((table, k));
                }
                keep
            });
        }
    }

    fn table(&self, t: Table) -> &KeyMap<Counter> {
        match t {
            Table::Campaigns => &self.campaigns,
            Table::Ads => &self.ads,
            Table::Fields => &self.fields,
            Table::Contexts => &self.contexts,
        }
    }

    fn table_mut(&mut self, t: Table) -> &mut KeyMap<Counter> {
        match t {
            Table::Campaigns => &mut self.campaigns,
            Table::Ads => &mut self.ads,
            Table::Fields => &mut self.fields,
            Table::Contexts => &mut self.contexts,
        }
    }

    /// Adds the count keys of an impression with `keys` to `out`, each with its table: what a
    /// learning step or a late click on it changes (beside the global and position counters,
    /// which every delta carries).
    pub fn touched_keys(keys: &Keys, out: &mut impl Extend<(Table, u64)>) {
        out.extend([
            (Table::Campaigns, keys.campaign),
            (Table::Ads, keys.ad),
            (Table::Contexts, combine(keys.ad, keys.context)),
        ]);
        out.extend(
            keys.fields()
                .iter()
                .map(|f| (Table::Fields, combine(keys.ad, *f))),
        );
    }

    /// The model's counters at `keys` as they are now (absent ones left out), with the clock,
    /// the global and position counters, and the keys maintenance dropped: see [`CountsDelta`].
    pub fn delta(
        &self,
        keys: impl IntoIterator<Item = (Table, u64)>,
        evicted: &[(Table, u64)],
    ) -> CountsDelta {
        let set = keys
            .into_iter()
            .filter_map(|(t, k)| self.table(t).get(k).map(|c| (t, k, *c)))
            .collect();
        CountsDelta {
            clock: self.clock,
            global: self.global,
            positions: self.positions,
            set,
            removed: evicted.to_vec(),
        }
    }

    /// Applies a delta from [`CountModel::delta`] of a model with the same settings. When the
    /// owner's decay landmark moved, every counter here is first rescaled by the same factor
    /// (bit-identical to the owner's, unless the landmark moved twice within one delta:
    /// 512 half-lives of event time in one batch).
    pub fn apply(&mut self, delta: &CountsDelta) {
        if let Some(f) = self.clock.rescale_factor_to(&delta.clock) {
            self.rescale(f);
        }
        self.clock = delta.clock;
        self.global = delta.global;
        self.positions = delta.positions;
        if !delta.removed.is_empty() {
            for table in Table::ALL {
                let gone: std::collections::HashSet<u64> = delta
                    .removed
                    .iter()
                    .filter(|(t, _)| *t == table)
                    .map(|(_, k)| *k)
                    .collect();
                if !gone.is_empty() {
                    self.table_mut(table).retain(|k, _| !gone.contains(&k));
                }
            }
        }
        for &(t, k, c) in &delta.set {
            *self.table_mut(t).entry_or_default(k) = c;
        }
    }

    /// The decay clock counters are stored under.
    pub fn clock(&self) -> &DecayClock {
        &self.clock
    }

    /// Number of keys stored.
    pub fn keys(&self) -> usize {
        self.campaigns.len() + self.ads.len() + self.fields.len() + self.contexts.len()
    }

    /// Heap bytes of the key tables per stored key (slots × (key + value)).
    pub fn bytes_per_key(&self) -> f64 {
        let slot = KeyMap::<Counter>::slot_bytes();
        let slots: usize = [&self.campaigns, &self.ads, &self.fields, &self.contexts]
            .iter()
            .map(|m| m.capacity())
            .sum();
        (slots * slot) as f64 / self.keys().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp<'a>(ad: &'a str, pos: u32, ctx: &'a [(&'a str, &'a str)], ts: i64) -> Impression<'a> {
        Impression {
            ad,
            campaign: "c",
            position: pos,
            context: ctx,
            ts_ms: ts,
        }
    }

    fn no_decay() -> CountsConfig {
        CountsConfig {
            half_life_ms: None,
            ..CountsConfig::default()
        }
    }

    #[test]
    fn a_negative_plus_its_late_click_counts_as_a_positive() {
        let ctx = [("geo", "US"), ("device", "mobile")];
        let (mut corrected, mut direct) = (
            CountModel::new(no_decay()).unwrap(),
            CountModel::new(no_decay()).unwrap(),
        );
        for i in 0..500 {
            let x = imp(
                if i % 3 == 0 { "a" } else { "b" },
                1 + (i % 2) as u32,
                &ctx,
                i,
            );
            let clicked = i % 7 == 0;
            direct.update(&x, clicked, 1.0).unwrap();
            corrected.update(&x, false, 1.0).unwrap();
            if clicked {
                corrected.add_late_click(&x, 1.0).unwrap();
            }
        }
        for ad in ["a", "b", "new"] {
            let (c, d) = (
                corrected.predict(&imp(ad, 1, &ctx, 500)),
                direct.predict(&imp(ad, 1, &ctx, 500)),
            );
            // Position bias is estimated as it goes, so the two orders differ a little.
            assert!((c.p / d.p - 1.0).abs() < 0.02, "{ad}: {} vs {}", c.p, d.p);
        }
        assert!(
            corrected
                .add_late_click(&imp("a", 0, &ctx, 1), 1.0)
                .is_err()
        );
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn faded_keys_are_dropped_and_estimates_barely_move() {
        let mut m = CountModel::new(CountsConfig::default()).unwrap();
        let (old, busy) = ([("geo", "FR")], [("geo", "US")]);
        for i in 0..2_000 {
            m.update(&imp("a", 1, &old, i), i % 20 == 0, 1.0).unwrap();
        }
        let keys_with_old = m.keys();
        // Three days of the other context only: 12 half-lives for the old one.
        for i in 0..3_000 {
            m.update(&imp("a", 1, &busy, i * 24 * HOUR / 1_000), i % 25 == 0, 1.0)
                .unwrap();
        }
        let before = m.predict(&imp("a", 1, &old, 72 * HOUR));
        assert_eq!(before.level, Level::Exact);
        assert_eq!(
            m.evict_faded(),
            0,
            "2,000 impressions / 2^12 have not faded yet"
        );
        // Four more days (28 half-lives since the old context was seen): it has faded.
        m.update(&imp("a", 1, &busy, 168 * HOUR), false, 1.0)
            .unwrap();
        let before = m.predict(&imp("a", 1, &old, 168 * HOUR));
        let dropped = m.evict_faded();
        assert_eq!(
            dropped, 2,
            "the ad x geo=FR field key and its full-context key"
        );
        assert_eq!(m.keys(), keys_with_old);
        let after = m.predict(&imp("a", 1, &old, 168 * HOUR));
        assert_eq!(after.level, Level::BackedOff);
        assert!(
            (after.p / before.p - 1.0).abs() < 1e-4,
            "{} vs {}",
            after.p,
            before.p
        );
        // The busy context and the ad itself are untouched.
        assert_eq!(
            m.predict(&imp("a", 1, &busy, 168 * HOUR)).level,
            Level::Exact
        );
    }

    #[test]
    fn keys_stay_bounded_when_contexts_never_repeat() {
        let mut m = CountModel::new(CountsConfig::default()).unwrap();
        let mut most = 0;
        // A new context value every minute for 30 days, evicting hourly.
        for minute in 0..30 * 24 * 60 {
            let value = format!("q{minute}");
            let ctx = [("query_category", value.as_str())];
            m.update(&imp("a", 1, &ctx, minute * 60_000), minute % 9 == 0, 1.0)
                .unwrap();
            if minute % 60 == 59 {
                m.evict_faded();
                most = most.max(m.keys());
            }
        }
        // One impression fades after log2(1000) = 10 half-lives (60 h): about 3,600 contexts
        // of two keys each are alive at a time, against 86,400 seen.
        assert!(most < 2 * 3_700 + 10, "{most} keys");
        assert!(most > 2 * 3_500, "{most} keys: evicting too early");
    }

    #[test]
    fn nothing_fades_without_decay() {
        let mut m = CountModel::new(no_decay()).unwrap();
        m.update(&imp("a", 1, &[("geo", "US")], 0), false, 1.0)
            .unwrap();
        m.update(&imp("a", 1, &[("geo", "FR")], 365 * 24 * HOUR), false, 1.0)
            .unwrap();
        assert_eq!(m.evict_faded(), 0);
    }

    #[test]
    fn unknown_ad_gets_the_prior_then_learns() {
        let mut m = CountModel::new(no_decay()).unwrap();
        let ctx = [("geo", "US")];
        let e = m.predict(&imp("new", 1, &ctx, 0));
        assert_eq!(e.level, Level::Prior);
        assert!((e.p - 0.02).abs() < 1e-12);
        for i in 0..10_000 {
            m.update(&imp("a", 1, &ctx, i), i % 10 == 0, 1.0).unwrap();
        }
        let e = m.predict(&imp("a", 1, &ctx, 10_000));
        assert_eq!(e.level, Level::Exact);
        assert!((e.p - 0.1).abs() < 0.003, "{}", e.p);
        let other = [("geo", "DE")];
        let e = m.predict(&imp("a", 1, &other, 10_000));
        assert_eq!(e.level, Level::BackedOff);
        assert!((e.p - 0.1).abs() < 0.01, "backs off to the ad: {}", e.p);
    }

    #[test]
    fn position_bias_is_learned_and_normalized_ctr_is_position_free() {
        let mut m = CountModel::new(no_decay()).unwrap();
        let ctx = [("geo", "US")];
        // True CTR 10% at the top, 5% at position 2.
        for i in 0..200_000i64 {
            let pos = 1 + (i % 2) as u32;
            let clicked = if pos == 1 { i % 20 == 0 } else { i % 40 == 1 };
            m.update(&imp("a", pos, &ctx, i), clicked, 1.0).unwrap();
        }
        assert!(
            (m.position_bias(2) - 0.5).abs() < 0.03,
            "{}",
            m.position_bias(2)
        );
        let top = m.predict(&imp("a", 1, &ctx, 0));
        let second = m.predict(&imp("a", 2, &ctx, 0));
        assert!((top.normalized - 0.1).abs() < 0.005, "{}", top.normalized);
        assert!((second.p - 0.05).abs() < 0.004, "{}", second.p);
    }

    #[test]
    fn bad_weights_are_rejected_and_change_nothing() {
        let mut m = CountModel::new(no_decay()).unwrap();
        let before = m.clone();
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(m.update(&imp("a", 1, &[], 0), true, w).is_err());
        }
        assert!(
            m.update(&imp("a", 0, &[], 0), true, 1.0).is_err(),
            "position 0"
        );
        assert_eq!(m, before);
    }

    #[test]
    fn estimates_lie_between_child_rate_and_parent() {
        let mut m = CountModel::new(no_decay()).unwrap();
        let ctx = [("geo", "US"), ("device", "mobile")];
        for i in 0..500 {
            m.update(&imp("a", 1, &ctx, i), i % 4 == 0, 1.0).unwrap();
        }
        for i in 0..30 {
            m.update(
                &imp("a", 1, &[("geo", "FR"), ("device", "tablet")], i),
                i % 2 == 0,
                1.0,
            )
            .unwrap();
        }
        let e = m.predict(&imp("a", 1, &[("geo", "FR"), ("device", "tablet")], 0));
        let ad_rate = m.predict(&imp("a", 1, &[], 0)).normalized;
        // Child raw rate 0.5, parent (ad-level) well below: the estimate lies between.
        assert!(
            e.normalized < 0.5 && e.normalized > ad_rate,
            "{} vs ad {ad_rate}",
            e.normalized
        );
    }

    #[test]
    fn weighted_updates_equal_repeated_ones() {
        let mut a = CountModel::new(no_decay()).unwrap();
        let mut b = CountModel::new(no_decay()).unwrap();
        a.update(&imp("x", 1, &[], 5), false, 4.0).unwrap();
        for _ in 0..4 {
            b.update(&imp("x", 1, &[], 5), false, 1.0).unwrap();
        }
        let (pa, pb) = (
            a.predict(&imp("x", 1, &[], 5)).p,
            b.predict(&imp("x", 1, &[], 5)).p,
        );
        assert!((pa - pb).abs() < 1e-12);
    }
}

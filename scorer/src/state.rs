//! What the owner of one partition keeps, and what it does with one labeled impression.
//!
//! Pure: no I/O, no clock, no randomness. Given the same records in the same order (and the
//! same sampling rate and learning switch), two owners end in the same state. That is what
//! makes a hand-over exact: the next owner restores the last checkpoint and replays from its
//! offset.
//!
//! Four parts:
//! - the models ([`ModelSet`]: the variants learning side by side, one of them serving);
//! - exact totals (impressions, clicks) per ad and per ad in a full context, over distinct
//!   labels, shed or not: the numbers published beside each estimate (bounded: a key unchanged
//!   for a while leaves the hot state and is read back from Redis when it returns, see
//!   [`crate::retention`]);
//! - [`Dedupe`]: label IDs seen recently, so the labels a restarted joiner re-emits (same
//!   deterministic ID, new offset) are dropped;
//! - [`Sampler`]: which negatives to learn from while shedding load, with the importance weight
//!   that keeps the estimates unbiased.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasherDefault;

use ctr_models::example::hash_str;
use ctr_models::snapshot::{self, SnapshotError};
use ctr_models::variants::legacy::ModelSetV1;
use ctr_models::{Impression, ModelError, ModelSet, Variant};
use ctr_schemas::{LabelKind, LabeledImpression};

use crate::hold::Held;

mod increment;
use crate::retention::{Retention, RetiredKeys};
pub use increment::{Compaction, INCREMENT_FORMAT, Prepared};
use nohash_hasher::NoHashHasher;
use serde::{Deserialize, Serialize};

type HashSet64 = HashSet<u64, BuildHasherDefault<NoHashHasher<u64>>>;
type HashMap64<V> = HashMap<u64, V, BuildHasherDefault<NoHashHasher<u64>>>;

/// Namespaces of the hashes this module takes (distinct from the models' feature namespaces).
const LABEL_ID_NS: u64 = 0x05c0_1abe;
const SAMPLER_NS: u64 = 0x05c0_5a3f;
const TOTAL_AD_NS: u64 = 0x05c0_00ad;
const TOTAL_CTX_NS: u64 = 0x05c0_adc7;

// A context the contract accepts is one the models learn from (3 fixed fields + the extras).
const _: () = assert!(
    3 + ctr_schemas::events::MAX_EXTRA_CONTEXT_FIELDS == ctr_models::example::MAX_CONTEXT_FIELDS
);

/// Exact totals of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Total {
    /// Impressions (a late click adds none).
    pub imps: u64,
    /// Clicks, late clicks included.
    pub clicks: u64,
}

/// A hot key's totals, and the partition's event time when they last changed (for
/// retirement: [`crate::retention`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Kept {
    total: Total,
    changed_ms: i64,
}

/// Key of an ad's totals, or of the ad in one context (`context_key`), in [`PartitionState`].
/// Hashes, not strings: [`crate::retention::HOT_KEY_BYTES`] per key (plus the table's slack);
/// 64-bit collisions are negligible at the millions of keys one partition holds.
pub fn total_key(ad: &str, context_key: Option<&str>) -> u64 {
    let ad_hash = hash_str(TOTAL_AD_NS, ad);
    match context_key {
        None => ad_hash,
        Some(c) => ctr_models::example::combine(ad_hash, context_total_hash(c)),
    }
}

/// The context's part of [`total_key`], to compute once for many ads in one context.
pub fn context_total_hash(context_key: &str) -> u64 {
    hash_str(TOTAL_CTX_NS, context_key)
}

/// [`total_key`] of `ad` in the context whose [`context_total_hash`] is `context_hash`
/// (`None`: over all contexts).
pub fn total_key_in(ad: &str, context_hash: Option<u64>) -> u64 {
    let ad_hash = hash_str(TOTAL_AD_NS, ad);
    context_hash.map_or(ad_hash, |c| ctr_models::example::combine(ad_hash, c))
}

/// Memory of the label IDs seen in the last `horizon_ms` of event time.
///
/// A re-emitted label carries the same ID *and the same event time* (the serve's), so IDs are
/// kept in buckets by event time and a lookup touches one bucket. Buckets older than the
/// horizon (measured back from the newest event time seen) are dropped. A label older than the
/// horizon cannot be checked: it is accepted and counted as unchecked (see
/// [`Seen::Unchecked`]); the horizon must therefore exceed how far behind a restarted joiner
/// can re-emit: its attribution window + grace + late-click horizon + checkpoint interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dedupe {
    horizon_ms: i64,
    bucket_ms: i64,
    newest_ms: i64,
    buckets: BTreeMap<i64, HashSet64>,
}

/// The hash a label ID is remembered by.
pub fn label_id_hash(label_id: &str) -> u64 {
    hash_str(LABEL_ID_NS, label_id)
}

/// What [`Dedupe::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: remembered from now on.
    New,
    /// Seen before: drop it.
    Duplicate,
    /// Older than the horizon: cannot be checked; accepted.
    Unchecked,
}

impl Dedupe {
    /// `horizon_ms` > 0; buckets are a sixteenth of it (at least 1 s).
    pub fn new(horizon_ms: i64) -> Self {
        let horizon_ms = horizon_ms.max(1);
        Self {
            horizon_ms,
            bucket_ms: (horizon_ms / 16).max(1_000),
            newest_ms: i64::MIN,
            buckets: BTreeMap::new(),
        }
    }

    fn oldest_kept_bucket(&self) -> i64 {
        self.newest_ms
            .saturating_sub(self.horizon_ms)
            .div_euclid(self.bucket_ms)
    }

    /// Whether `label_id` (of a label with event time `ts_ms`) was seen; remembers it if not.
    pub fn check(&mut self, label_id: &str, ts_ms: i64) -> Seen {
        self.check_id(label_id_hash(label_id), ts_ms)
    }

    /// [`Dedupe::check`] of the label whose ID hashes to `id` ([`label_id_hash`]).
    pub fn check_id(&mut self, id: u64, ts_ms: i64) -> Seen {
        let bucket = ts_ms.div_euclid(self.bucket_ms);
        if self.newest_ms != i64::MIN && bucket < self.oldest_kept_bucket() {
            return Seen::Unchecked;
        }
        // A new bucket starts at the size of the newest one, so it does not grow by rehashing
        // through every power of two as it fills.
        let size_hint = self
            .buckets
            .last_key_value()
            .map_or(0, |(_, ids)| ids.len());
        let ids = self
            .buckets
            .entry(bucket)
            .or_insert_with(|| HashSet64::with_capacity_and_hasher(size_hint, Default::default()));
        if !ids.insert(id) {
            return Seen::Duplicate;
        }
        if ts_ms > self.newest_ms {
            self.newest_ms = ts_ms;
            let keep = self.oldest_kept_bucket();
            while let Some(entry) = self.buckets.first_entry() {
                if *entry.key() >= keep {
                    break;
                }
                entry.remove();
            }
        }
        Seen::New
    }

    /// IDs remembered.
    pub fn len(&self) -> usize {
        self.buckets.values().map(HashSet::len).sum()
    }

    /// No label ID remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// The group a negative is shed in, for both stages: its ad and the position it was shown
/// at. A kept negative stands for the dropped ones of its group, and it carries only its own
/// position (hence its examination units) into the models. Grouped by ad alone, one kept at
/// the top would stand for negatives at every slot, and an ad's position-normalized rate
/// would scatter by several percent under heavy shedding (measured by the `shedding_noise`
/// example: see docs/RELIABILITY.md §4). `position` 0: not known (a record without the
/// position header), grouped by ad alone.
fn shedding_group(ad: &[u8], position: u32) -> u64 {
    ctr_models::example::combine(
        ctr_models::example::hash_bytes(SAMPLER_NS, ad),
        u64::from(position),
    )
}

/// Sampling of negatives for learning, per ad and position ([`shedding_group`]), with
/// carried weights.
///
/// At keep-rate `r`, a group's negatives are skipped until `1/r` of them have accumulated;
/// the one that completes the group is learned with an importance weight equal to the number
/// of negatives it stands for (itself and the skipped ones): `1/r` at a steady rate, and
/// exact when the rate changes mid-group (a weight of `1/r_now` would over- or under-count
/// whenever the governor moves the rate). So an ad's weighted negatives at each position
/// equal its true ones but for the current group's unfinished tail (fewer than `1/r`), which
/// is far tighter than independent coin flips (error `sqrt(n(1−r)/r)`). Deterministic. At
/// `r = 1` every negative is learned with weight 1.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    skipped: HashMap64<f64>,
}

impl Sampler {
    /// `Some(weight)` to learn this negative of `ad` shown at `position`, which stands for
    /// `stands_for` negatives (more than 1 after stage-two thinning), `None` to shed it.
    pub fn keep_negative(
        &mut self,
        ad: &str,
        position: u32,
        stands_for: f64,
        rate: f64,
    ) -> Option<f64> {
        let group = 1.0 / rate.clamp(1e-6, 1.0);
        // No ad has a group open (always so at rate 1): this negative completes its own.
        if self.skipped.is_empty() && stands_for + 1e-9 >= group {
            return Some(stands_for);
        }
        let key = shedding_group(ad.as_bytes(), position);
        let pending = self.skipped.entry(key).or_insert(0.0);
        *pending += stands_for;
        if *pending + 1e-9 >= group {
            // A completed group leaves nothing open, so the map holds only open groups.
            self.skipped.remove(&key)
        } else {
            None
        }
    }
}

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A label the models learned from, with this importance weight.
    Learned {
        /// The importance weight it was learned with.
        weight: f64,
        /// Its label.
        clicked: bool,
    },
    /// A click, counted now and learned once the negatives of its time have arrived
    /// ([`crate::hold`]).
    Held,
    /// A negative not learned from, to shed load (still counted in the exact totals).
    Shed,
    /// Not learned from because the learning guard is on (the click stream stalled).
    Guarded {
        /// Its label.
        clicked: bool,
    },
    /// A late-click correction, applied to the count model.
    Corrected,
    /// A correction while the guard is on: counted, not learned.
    CorrectionGuarded,
    /// Same label ID as an earlier record: changes nothing.
    Duplicate,
}

impl Outcome {
    /// Change to the (impressions, clicks) totals published in Redis.
    pub fn count_delta(&self) -> Option<(u8, u8)> {
        match *self {
            Outcome::Learned { clicked, .. } | Outcome::Guarded { clicked } => {
                Some((1, u8::from(clicked)))
            }
            Outcome::Held => Some((1, 1)),
            Outcome::Shed => Some((1, 0)),
            Outcome::Corrected | Outcome::CorrectionGuarded => Some((0, 1)),
            Outcome::Duplicate => None,
        }
    }
}

/// How the owner is asked to treat a record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Keep-rate of negatives, in (0, 1].
    pub negative_rate: f64,
    /// False while the learning guard is on.
    pub learn: bool,
    /// This record stands for `thinned` negatives: under stage-two shedding the consumer
    /// drops all but one in `thinned` negatives of an ad before decoding ([`Thinning`]). 1
    /// normally; ignored for a click.
    pub thinned: u32,
}

impl Policy {
    /// No shedding, learning on.
    pub const NORMAL: Policy = Policy {
        negative_rate: 1.0,
        learn: true,
        thinned: 1,
    };
}

/// Stage-two load shedding, before decoding: drops negatives of each ad and position (the
/// message key, which is the ad ID, and the joiner's `ctr.position` header:
/// [`shedding_group`]) until `k` have accumulated, and keeps the one that completes the group,
/// standing for all of them.
///
/// Carried counts like [`Sampler`], so an ad's totals are exact but for its groups'
/// unfinished tails (fewer than `k` per position, and lost when the partition moves: the
/// consumer keeps one `Thinning` per partition and forgets it then), whatever the governor
/// does to `k`, and stay integers. Decided from the key and the headers alone, so a dropped record costs neither a
/// copy nor a decode.
#[derive(Debug, Clone, Default)]
pub struct Thinning {
    dropped: HashMap64<u32>,
}

impl Thinning {
    /// No ad has dropped negatives waiting for a kept one.
    fn is_idle(&self) -> bool {
        self.dropped.is_empty()
    }

    /// What becomes of a record of the ad keyed `ad_key` while the thinning factor is `k`:
    /// `Some(n)` to pass it on, standing for `n` negatives (1 for anything but a negative, and
    /// when nothing is thinned), `None` to drop it unread. `negative` says whether the record
    /// is a negative label, and its position if so (0 if not known); it is asked only while
    /// thinning is in effect or a group still carries dropped negatives (a negative after
    /// thinning ended carries them), so the normal path skips the header scan.
    pub fn admit(
        &mut self,
        ad_key: &[u8],
        k: u32,
        negative: impl FnOnce() -> Option<u32>,
    ) -> Option<u32> {
        if (k > 1 || !self.is_idle())
            && let Some(position) = negative()
        {
            return self.keep(ad_key, position, k);
        }
        Some(1)
    }

    /// `Some(n)`: keep this negative of the ad keyed `ad_key` shown at `position`, standing
    /// for `n` negatives; `None`: drop it.
    fn keep(&mut self, ad_key: &[u8], position: u32, k: u32) -> Option<u32> {
        let h = shedding_group(ad_key, position);
        if k <= 1 {
            return Some(self.dropped.remove(&h).unwrap_or(0) + 1);
        }
        let d = self.dropped.entry(h).or_insert(0);
        if *d + 1 >= k {
            Some(std::mem::take(d) + 1)
        } else {
            *d += 1;
            None
        }
    }
}

/// The whole state of one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionState {
    /// Next offset to read: every record below it is reflected in this state.
    pub next_offset: Option<i64>,
    models: ModelSet,
    dedupe: Dedupe,
    totals: HashMap64<Kept>,
    /// Event time of the newest label learned (for model maintenance).
    newest_ms: i64,
    #[serde(skip)]
    sampler: Sampler,
    /// What changed since the last checkpoint ([`increment`]).
    #[serde(skip)]
    changes: increment::Changes,
    /// Clicks waiting for the negatives of their time. After the fields of the checkpoint
    /// body of format 1, which is this layout without it and what follows.
    held: Held,
    /// Each ad's campaign (by [`ad_total_key`]), as its latest label named it: a serving
    /// replica asked about a known ad without its campaign uses it. Format 2 is this
    /// layout without it and what follows.
    campaigns: HashMap64<String>,
    /// Newest event time of a counted record: the clock keys retire by (format 5 added this
    /// field and those below; [`crate::retention`]).
    clock_ms: i64,
    /// The keys retired from `totals`, approximately.
    retired: RetiredKeys,
    /// Keys brought back from a Redis value as of a later offset than the record that brought
    /// them back (a replay below what was published): a record of the key at or below that
    /// offset is already in the value. Dropped once the partition reads past it.
    seeded: HashMap64<i64>,
}

/// The impression the models see for label `l`, whose context pairs are `pairs`.
fn impression<'a>(l: &'a LabeledImpression, pairs: &'a [(&'a str, &'a str)]) -> Impression<'a> {
    Impression {
        ad: &l.ad_id,
        campaign: &l.campaign_id,
        position: u32::try_from(l.position).unwrap_or(0),
        context: pairs,
        ts_ms: l.ts_ms,
    }
}

impl PartitionState {
    /// A fresh partition with `models`, remembering label IDs for `dedupe_horizon_ms`.
    pub fn new(models: ModelSet, dedupe_horizon_ms: i64) -> Self {
        Self {
            next_offset: None,
            models,
            dedupe: Dedupe::new(dedupe_horizon_ms),
            totals: HashMap64::default(),
            newest_ms: i64::MIN,
            sampler: Sampler::default(),
            changes: increment::Changes::default(),
            held: Held::default(),
            campaigns: HashMap64::default(),
            clock_ms: i64::MIN,
            retired: RetiredKeys::default(),
            seeded: HashMap64::default(),
        }
    }

    /// The partition's models.
    pub fn models(&self) -> &ModelSet {
        &self.models
    }

    /// The label IDs remembered.
    pub fn dedupe(&self) -> &Dedupe {
        &self.dedupe
    }

    /// Newest event time learned from (Unix ms; `i64::MIN` before the first).
    pub fn newest_ms(&self) -> i64 {
        self.newest_ms
    }

    /// Exact-total keys held (ads, and ads in full contexts).
    pub fn total_keys(&self) -> usize {
        self.totals.len()
    }

    /// Model parameters held, over every variant (count keys plus FTRL coordinates).
    pub fn parameters(&self) -> usize {
        self.models.variants().iter().map(Variant::parameters).sum()
    }

    /// Exact totals of `ad` (over all contexts when `context_key` is `None`).
    pub fn total(&self, ad: &str, context_key: Option<&str>) -> Total {
        self.total_at(total_key(ad, context_key))
    }

    /// Exact totals of the key [`total_key`] gives.
    pub fn total_at(&self, key: u64) -> Total {
        self.totals.get(&key).map(|k| k.total).unwrap_or_default()
    }

    /// The keys retired from the hot totals, approximately.
    pub fn retired(&self) -> &RetiredKeys {
        &self.retired
    }

    /// Whether a record of the key `key` ([`total_key`]) needs the key's value from Redis
    /// first: it is not hot, and it may have retired ([`crate::retention`]).
    pub fn needs_seed(&self, key: u64) -> bool {
        !self.totals.contains_key(&key) && self.retired.may_contain(key)
    }

    /// Brings `key` back into the hot totals with its value in Redis: totals `found.0` as of
    /// partition offset `found.1` (`None`: Redis holds none, and it starts from zero). Call it
    /// after setting `next_offset` past the record that brought it back: if that record is at
    /// or below the value's offset, it and the key's records up to that offset are already in
    /// the value, and [`PartitionState::apply`] does not add them again.
    /// Returns whether the value is ahead of the record (a replay below what was published).
    pub fn seed(&mut self, key: u64, found: Option<(Total, i64)>) -> bool {
        let (total, ver) = found.unwrap_or((Total::default(), -1));
        self.changes.key(key);
        self.totals.insert(
            key,
            Kept {
                total,
                changed_ms: self.clock_ms,
            },
        );
        if let Some(offset) = self.next_offset.map(|n| n - 1)
            && ver >= offset
        {
            self.seeded.insert(key, ver);
            return true;
        }
        false
    }

    /// Retires the keys unchanged for `retention.hot_ms` of event time, except those `busy`
    /// says were changed since they were last published (their values are not in Redis yet).
    /// Returns the keys retired: a replica of the partition drops them too.
    pub fn retire(&mut self, retention: Retention, busy: impl Fn(u64) -> bool) -> Vec<u64> {
        if let Some(next) = self.next_offset {
            self.seeded.retain(|_, ver| *ver >= next);
        }
        if retention.hot_ms <= 0 || self.clock_ms == i64::MIN {
            return Vec::new();
        }
        let cutoff = self.clock_ms.saturating_sub(retention.hot_ms);
        let mut out = Vec::new();
        self.totals.retain(|key, kept| {
            let keep = kept.changed_ms >= cutoff || busy(*key);
            if !keep {
                out.push(*key);
            }
            keep
        });
        self.changes.retired(&out, retention.remembered);
        for key in &out {
            self.retired.insert(*key, retention.remembered);
            // An ad's key: its campaign goes with it (its next label names it again).
            self.campaigns.remove(key);
            self.seeded.remove(key);
        }
        // A table emptied by a wave of retirements gives its memory back.
        if self.totals.capacity() > 4 * self.totals.len().max(1_024) {
            self.totals.shrink_to(2 * self.totals.len());
        }
        out
    }

    /// The campaign of `ad` as its latest label named it.
    pub fn campaign_of(&self, ad: &str) -> Option<&str> {
        self.campaigns.get(&total_key(ad, None)).map(String::as_str)
    }

    /// What a serving replica keeps of this state: the variant `model`, the exact totals and
    /// the ads' campaigns (`None` if no variant has that name).
    pub fn into_serving(self, model: &str) -> Option<crate::serving::ServingState> {
        let variant = self.models.take_variant(model)?;
        Some(crate::serving::ServingState::new(
            variant,
            self.totals
                .into_iter()
                .map(|(key, kept)| (key, kept.total))
                .collect(),
            self.campaigns,
            self.next_offset.map(|n| n - 1),
        ))
    }

    /// Applies one valid labeled impression whose context key is `context_key`. Positives
    /// learned because this record moved the negative frontier (see [`crate::hold`]) are
    /// pushed to `released`, so the caller can republish their ads. On an error (the models
    /// rejected the example) nothing has changed but the dedupe memory, and the caller treats
    /// the record as poison.
    pub fn apply(
        &mut self,
        l: &LabeledImpression,
        context_key: &str,
        policy: Policy,
        released: &mut Vec<LabeledImpression>,
    ) -> Result<Outcome, ModelError> {
        let outcome = self.learn(l, policy)?;
        if let Some((imps, clicks)) = outcome.count_delta() {
            let stands_for = if l.clicked { 1 } else { policy.thinned.max(1) };
            let ad_key = total_key(&l.ad_id, None);
            if self.campaigns.get(&ad_key) != Some(&l.campaign_id) {
                self.campaigns.insert(ad_key, l.campaign_id.clone());
            }
            self.clock_ms = self.clock_ms.max(l.ts_ms);
            let offset = self.next_offset.map(|n| n - 1);
            for key in [ad_key, total_key(&l.ad_id, Some(context_key))] {
                self.changes.key(key);
                let kept = self.totals.entry(key).or_default();
                kept.changed_ms = self.clock_ms;
                // Brought back from Redis with a value that already counts this record.
                if let (Some(offset), Some(&ver)) = (offset, self.seeded.get(&key))
                    && offset <= ver
                {
                    continue;
                }
                kept.total.imps += u64::from(imps) * u64::from(stands_for);
                kept.total.clicks += u64::from(clicks);
            }
        }
        if l.kind == LabelKind::Label && !l.clicked && outcome != Outcome::Duplicate {
            self.held.saw_negative(l.ts_ms);
        }
        while let Some(p) = self.held.pop_due() {
            // Validated when it was held, and the models reject only what validation rejects.
            let learned = {
                let pairs = p.context.pairs();
                self.models.learn(&impression(&p, &pairs), true, 1.0)
            };
            if let Ok(keys) = learned {
                self.newest_ms = self.newest_ms.max(p.ts_ms);
                self.changes.impression(&keys);
            }
            released.push(p);
        }
        Ok(outcome)
    }

    /// Clicks counted but not learned yet, waiting for the negatives of their time.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Learns from `l` as `policy` says.
    fn learn(&mut self, l: &LabeledImpression, policy: Policy) -> Result<Outcome, ModelError> {
        let id = label_id_hash(&l.label_id);
        match self.dedupe.check_id(id, l.ts_ms) {
            Seen::Duplicate => return Ok(Outcome::Duplicate),
            Seen::New => self.changes.remembered(l.ts_ms, id),
            Seen::Unchecked => {}
        }
        let pairs = l.context.pairs();
        let x = impression(l, &pairs);
        x.validate()?;
        let outcome = match l.kind {
            LabelKind::LateClick if !policy.learn => Outcome::CorrectionGuarded,
            LabelKind::LateClick => {
                let keys = self.models.correct(&x, 1.0)?;
                self.changes.impression(&keys);
                Outcome::Corrected
            }
            LabelKind::Label if !policy.learn => Outcome::Guarded { clicked: l.clicked },
            // Clicks are never shed: they are rare and carry most of the information. They
            // wait for the negatives of their time (see `hold`).
            LabelKind::Label if l.clicked => {
                self.held.hold(l.clone());
                Outcome::Held
            }
            LabelKind::Label => {
                match self.sampler.keep_negative(
                    &l.ad_id,
                    u32::try_from(l.position).unwrap_or(0),
                    f64::from(policy.thinned.max(1)),
                    policy.negative_rate,
                ) {
                    Some(weight) => {
                        let keys = self.models.learn(&x, false, weight)?;
                        self.changes.impression(&keys);
                        self.newest_ms = self.newest_ms.max(l.ts_ms);
                        Outcome::Learned {
                            weight,
                            clicked: false,
                        }
                    }
                    None => Outcome::Shed,
                }
            }
        };
        Ok(outcome)
    }

    /// Bounds model memory: FTRL coordinates idle for `idle_ms` of event time are dropped, and
    /// count keys that have decayed to nothing (`ctr_models::counts::FADED_UNITS`). Returns
    /// what each variant dropped, in order (a replica of a variant must drop it too).
    pub fn maintain(&mut self, idle_ms: i64) -> Vec<ctr_models::Evicted> {
        if self.newest_ms == i64::MIN {
            return Vec::new();
        }
        let evicted = self.models.maintain(self.newest_ms.saturating_sub(idle_ms));
        self.changes.evicted(&evicted);
        evicted
    }

    /// The state in the project's snapshot container, format [`CHECKPOINT_FORMAT`].
    pub fn snapshot(&self) -> Vec<u8> {
        snapshot::encode_version(self, CHECKPOINT_FORMAT)
    }

    /// Restores [`PartitionState::snapshot`]'s output, or a checkpoint of format 4 (no key
    /// retired yet), 3 (also models of
    /// their format 1, converted: `ctr_models::variants::legacy`), 2 (also before the ads'
    /// campaigns were kept: it restores with none known, and each ad's next label names it
    /// again) or 1 (also before clicks were held: none held either). The sampler restarts
    /// (it is load shedding's bookkeeping, not model state).
    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        match snapshot::open(bytes)? {
            (CHECKPOINT_FORMAT, body) => snapshot::decode_body(body),
            (4, body) => snapshot::decode_body::<StateV4>(body).map(StateV4::into_current),
            (3, body) => snapshot::decode_body::<StateV3>(body)
                .map(StateV3::into_v4)
                .map(StateV4::into_current),
            (2, body) => snapshot::decode_body::<StateV2>(body)
                .map(StateV2::into_v3)
                .map(StateV3::into_v4)
                .map(StateV4::into_current),
            (1, body) => snapshot::decode_body::<StateV1>(body)
                .map(StateV1::into_v2)
                .map(StateV2::into_v3)
                .map(StateV3::into_v4)
                .map(StateV4::into_current),
            (found, _) => Err(SnapshotError::UnsupportedVersion {
                found,
                supported: CHECKPOINT_FORMAT,
            }),
        }
    }
}

/// Format of the checkpoint body: 2 added the held clicks, 3 the ads' campaigns, 4 the models'
/// format 2 (each variant's offset; `ctr_models::snapshot::FORMAT_VERSION`), 5 the bounded
/// totals (when each key last changed, the retirement clock, the retired keys and the seeded
/// keys' offsets: [`crate::retention`]).
pub const CHECKPOINT_FORMAT: u16 = 5;

/// A checkpoint body of format 4: totals without retirement.
#[derive(Deserialize)]
struct StateV4 {
    next_offset: Option<i64>,
    models: ModelSet,
    dedupe: Dedupe,
    totals: HashMap64<Total>,
    newest_ms: i64,
    held: Held,
    campaigns: HashMap64<String>,
}

impl StateV4 {
    /// Every key counts as changed at the newest event time the state knows: none retires
    /// before a full retention period has passed.
    fn into_current(self) -> PartitionState {
        let clock_ms = self.newest_ms.max(self.dedupe.newest_ms);
        PartitionState {
            next_offset: self.next_offset,
            models: self.models,
            dedupe: self.dedupe,
            totals: self
                .totals
                .into_iter()
                .map(|(key, total)| {
                    let changed_ms = clock_ms;
                    (key, Kept { total, changed_ms })
                })
                .collect(),
            newest_ms: self.newest_ms,
            sampler: Sampler::default(),
            changes: increment::Changes::default(),
            held: self.held,
            campaigns: self.campaigns,
            clock_ms,
            retired: RetiredKeys::default(),
            seeded: HashMap64::default(),
        }
    }
}

/// A checkpoint body of format 3: the current layout with the models of format 1.
#[derive(Deserialize)]
struct StateV3 {
    next_offset: Option<i64>,
    models: ModelSetV1,
    dedupe: Dedupe,
    totals: HashMap64<Total>,
    newest_ms: i64,
    held: Held,
    campaigns: HashMap64<String>,
}

impl StateV3 {
    fn into_v4(self) -> StateV4 {
        StateV4 {
            next_offset: self.next_offset,
            models: self.models.into_current(),
            dedupe: self.dedupe,
            totals: self.totals,
            newest_ms: self.newest_ms,
            held: self.held,
            campaigns: self.campaigns,
        }
    }
}

/// A checkpoint body of format 2.
#[derive(Deserialize)]
struct StateV2 {
    next_offset: Option<i64>,
    models: ModelSetV1,
    dedupe: Dedupe,
    totals: HashMap64<Total>,
    newest_ms: i64,
    held: Held,
}

impl StateV2 {
    fn into_v3(self) -> StateV3 {
        StateV3 {
            next_offset: self.next_offset,
            models: self.models,
            dedupe: self.dedupe,
            totals: self.totals,
            newest_ms: self.newest_ms,
            held: self.held,
            campaigns: HashMap64::default(),
        }
    }
}

/// A checkpoint body of format 1.
#[derive(Deserialize)]
struct StateV1 {
    next_offset: Option<i64>,
    models: ModelSetV1,
    dedupe: Dedupe,
    totals: HashMap64<Total>,
    newest_ms: i64,
}

impl StateV1 {
    fn into_v2(self) -> StateV2 {
        StateV2 {
            next_offset: self.next_offset,
            models: self.models,
            dedupe: self.dedupe,
            totals: self.totals,
            newest_ms: self.newest_ms,
            held: Held::default(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ctr_models::{VariantConfig, VariantKind};
    use ctr_schemas::Context;

    pub(crate) fn label(id: &str, ad: &str, clicked: bool, ts: i64) -> LabeledImpression {
        LabeledImpression {
            label_id: id.into(),
            serve_id: 1,
            ad_id: ad.into(),
            campaign_id: "c1".into(),
            position: 1,
            context: Context {
                query_category: "travel".into(),
                geo: "US".into(),
                device: "mobile".into(),
                extra: Default::default(),
            },
            clicked,
            ts_ms: ts,
            click_ts_ms: None,
            kind: LabelKind::Label,
        }
    }

    fn state() -> PartitionState {
        let models = ModelSet::new(vec![
            VariantConfig::of(VariantKind::Counts),
            VariantConfig::of(VariantKind::Ftrl),
        ])
        .unwrap();
        PartitionState::new(models, 600_000)
    }

    #[test]
    fn dedupe_drops_a_repeat_within_the_horizon_only() {
        let mut d = Dedupe::new(60_000);
        assert_eq!(d.check("s1:a", 1_000), Seen::New);
        assert_eq!(d.check("s1:a", 1_000), Seen::Duplicate);
        assert_eq!(d.check("s1:a:late", 1_000), Seen::New);
        assert_eq!(d.check("s2:a", 500_000), Seen::New);
        // The first bucket is now beyond the horizon: forgotten, and reported as unchecked.
        assert_eq!(d.check("s1:a", 1_000), Seen::Unchecked);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_replayed_label_changes_nothing() {
        let mut st = state();
        let l = label("s1:a", "a", false, 10);
        assert!(matches!(
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap(),
            Outcome::Learned { .. }
        ));
        let before = st.models().clone();
        assert_eq!(
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap(),
            Outcome::Duplicate
        );
        assert_eq!(st.models(), &before);
    }

    #[test]
    fn clicks_are_never_shed_and_sampled_weight_matches_the_count() {
        let mut st = state();
        let policy = Policy {
            negative_rate: 0.1,
            ..Policy::NORMAL
        };
        let (mut kept_weight, mut shed, mut clicks) = (0.0, 0, 0);
        for i in 0..10_000 {
            let clicked = i % 50 == 0;
            let l = label(&format!("s{i}:a"), "a", clicked, i);
            match st
                .apply(&l, &l.context.key(), policy, &mut Vec::new())
                .unwrap()
            {
                Outcome::Held => clicks += 1,
                Outcome::Learned { weight, clicked } => {
                    assert!(!clicked, "clicks are held, then learned with weight 1");
                    kept_weight += weight;
                }
                Outcome::Shed => shed += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(clicks, 200);
        // Shed or not, every label is in the exact totals.
        let ctx = label("x", "a", false, 0).context.key();
        let whole = Total {
            imps: 10_000,
            clicks: 200,
        };
        assert_eq!(st.total("a", None), whole);
        assert_eq!(st.total("a", Some(&ctx)), whole);
        assert!((9_790.0..=9_800.0).contains(&kept_weight), "{kept_weight}");
        assert!((8_800..=8_830).contains(&shed), "{shed}");
    }

    #[test]
    fn negatives_are_sampled_per_ad_and_position() {
        // At a keep-rate of 1/4, negatives alternating between two slots: each slot's fourth
        // is kept, standing for four of its own slot (grouped by ad alone, the fourth overall
        // would stand for two of each).
        let mut s = Sampler::default();
        let kept: Vec<(usize, f64)> = (0..16)
            .filter_map(|i| {
                let position = 1 + (i % 2) as u32;
                s.keep_negative("a", position, 1.0, 0.25).map(|w| (i, w))
            })
            .collect();
        assert_eq!(kept, vec![(6, 4.0), (7, 4.0), (14, 4.0), (15, 4.0)]);
        // Another ad's groups are its own.
        assert_eq!(s.keep_negative("b", 1, 1.0, 0.25), None);
    }

    #[test]
    fn admission_thins_only_negatives_and_asks_only_while_thinning() {
        let mut t = Thinning::default();
        // Not thinning and nothing carried: passed on without asking what the record is.
        assert_eq!(
            t.admit(b"ad-1", 1, || unreachable!("no header scan")),
            Some(1)
        );
        // Thinning: clicks pass as themselves, negatives are thinned per ad and position.
        assert_eq!(t.admit(b"ad-1", 3, || None), Some(1));
        assert_eq!(t.admit(b"ad-1", 3, || Some(1)), None);
        assert_eq!(t.admit(b"ad-1", 3, || Some(2)), None);
        assert_eq!(t.admit(b"ad-1", 3, || Some(1)), None);
        // Thinning ended with negatives carried: the next negative of each group carries them.
        assert_eq!(t.admit(b"ad-1", 1, || Some(1)), Some(3));
        assert_eq!(t.admit(b"ad-1", 1, || Some(2)), Some(2));
        assert_eq!(
            t.admit(b"ad-1", 1, || unreachable!("nothing carried")),
            Some(1)
        );
    }

    #[test]
    fn thinning_keeps_one_in_k_per_ad_and_the_kept_one_stands_for_k() {
        let mut t = Thinning::default();
        let kept: Vec<u32> = (0..1_000).filter_map(|_| t.keep(b"ad-1", 1, 10)).collect();
        assert_eq!(kept.len(), 100);
        assert!(kept.iter().all(|&n| n == 10));
        // The factor changes mid-group: the kept one stands for exactly what was dropped.
        for _ in 0..4 {
            assert_eq!(t.keep(b"ad-1", 1, 10), None);
        }
        assert_eq!(t.keep(b"ad-1", 1, 3), Some(5));
        assert!((0..50).all(|_| t.keep(b"ad-1", 1, 1) == Some(1)));
        let mut st = state();
        let thinned = Policy {
            thinned: 10,
            ..Policy::NORMAL
        };
        let neg = label("s1:a", "a", false, 1);
        st.apply(&neg, &neg.context.key(), thinned, &mut Vec::new())
            .unwrap();
        let pos = label("s2:a", "a", true, 2);
        st.apply(&pos, &pos.context.key(), thinned, &mut Vec::new())
            .unwrap();
        assert_eq!(
            st.total("a", None),
            Total {
                imps: 11,
                clicks: 1
            }
        );
    }

    #[test]
    fn the_guard_stops_learning_but_not_counting() {
        let mut st = state();
        let off = Policy {
            learn: false,
            ..Policy::NORMAL
        };
        let before = st.models().clone();
        let l = label("s1:a", "a", true, 1);
        let o = st
            .apply(&l, &l.context.key(), off, &mut Vec::new())
            .unwrap();
        assert_eq!(o, Outcome::Guarded { clicked: true });
        assert_eq!(o.count_delta(), Some((1, 1)));
        assert_eq!(st.models(), &before);
    }

    #[test]
    fn a_late_click_adds_a_click_not_an_impression() {
        let mut st = state();
        let first = label("s1:a", "a", false, 1);
        st.apply(
            &first,
            &first.context.key(),
            Policy::NORMAL,
            &mut Vec::new(),
        )
        .unwrap();
        let mut late = label("s1:a:late", "a", true, 1);
        late.kind = LabelKind::LateClick;
        let o = st
            .apply(&late, &late.context.key(), Policy::NORMAL, &mut Vec::new())
            .unwrap();
        assert_eq!(o, Outcome::Corrected);
        assert_eq!(o.count_delta(), Some((0, 1)));
        assert_eq!(
            st.apply(&late, &late.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap(),
            Outcome::Duplicate
        );
    }

    #[test]
    fn snapshot_restores_the_same_state_and_future() {
        let mut a = state();
        for i in 0..2_000 {
            let l = label(&format!("s{i}:a"), "a", i % 9 == 0, i);
            a.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap();
        }
        a.next_offset = Some(2_000);
        let mut b = PartitionState::restore(&a.snapshot()).unwrap();
        assert_eq!(b.next_offset, Some(2_000));
        assert_eq!(b.models(), a.models());
        assert_eq!(b.dedupe(), a.dedupe());
        for i in 2_000..3_000 {
            let l = label(&format!("s{i}:a"), "a", i % 9 == 0, i);
            a.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap();
            b.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap();
        }
        assert_eq!(b.models(), a.models());
        // A label from before the snapshot is still known as a duplicate after it.
        let old = label("s5:a", "a", false, 5);
        assert_eq!(
            b.apply(&old, &old.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap(),
            Outcome::Duplicate
        );
        assert_eq!(b.total("a", None), a.total("a", None));
        assert_eq!(b.total("a", None).imps, 3_000);
    }

    #[test]
    fn a_click_is_counted_at_once_and_learned_with_the_negatives_of_its_time() {
        let mut st = state();
        let mut released = Vec::new();
        let click = label("s10:a", "a", true, 10_000);
        let o = st
            .apply(&click, &click.context.key(), Policy::NORMAL, &mut released)
            .unwrap();
        assert_eq!(o, Outcome::Held);
        assert_eq!(st.total("a", None), Total { imps: 1, clicks: 1 });
        // A negative of an earlier serve: the click's own time has not been covered yet.
        let early = label("s9:b", "b", false, 9_000);
        st.apply(&early, &early.context.key(), Policy::NORMAL, &mut released)
            .unwrap();
        assert!(released.is_empty());
        assert_eq!(st.held(), 1);
        assert_eq!(st.models().examples(), 1, "only the negative is learned");
        let covering = label("s11:c", "c", false, 11_000);
        st.apply(
            &covering,
            &covering.context.key(),
            Policy::NORMAL,
            &mut released,
        )
        .unwrap();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].label_id, "s10:a");
        assert_eq!(st.held(), 0);
        assert_eq!(st.models().examples(), 3);
    }

    #[test]
    fn a_checkpoint_of_format_1_restores_with_no_click_held() {
        #[derive(Serialize)]
        struct V1<'a> {
            next_offset: Option<i64>,
            models: &'a ModelSetV1,
            dedupe: &'a Dedupe,
            totals: &'a HashMap64<Total>,
            newest_ms: i64,
        }
        let mut st = state();
        for i in 0..500 {
            let l = label(&format!("s{i}:a"), "a", false, i);
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap();
        }
        st.next_offset = Some(500);
        let v1 = snapshot::encode_version(
            &V1 {
                next_offset: st.next_offset,
                models: &ModelSetV1::of(&st.models),
                dedupe: &st.dedupe,
                totals: &st.totals.iter().map(|(k, v)| (*k, v.total)).collect(),
                newest_ms: st.newest_ms,
            },
            1,
        );
        let restored = PartitionState::restore(&v1).unwrap();
        assert_eq!(restored.next_offset, Some(500));
        assert_eq!(
            restored.models(),
            &ModelSetV1::of(&st.models).into_current()
        );
        assert_eq!(restored.total("a", None), st.total("a", None));
        assert_eq!(restored.held(), 0);
        let future = snapshot::encode_version(&1u8, CHECKPOINT_FORMAT + 1);
        assert!(matches!(
            PartitionState::restore(&future),
            Err(SnapshotError::UnsupportedVersion {
                found: 6,
                supported: 5
            })
        ));
    }

    #[test]
    fn a_checkpoint_of_format_2_restores_with_no_campaign_known_until_the_next_label() {
        #[derive(Serialize)]
        struct V2<'a> {
            next_offset: Option<i64>,
            models: &'a ModelSetV1,
            dedupe: &'a Dedupe,
            totals: &'a HashMap64<Total>,
            newest_ms: i64,
            held: &'a Held,
        }
        let mut st = state();
        for i in 0..100 {
            let l = label(&format!("s{i}:a"), "a", i % 10 == 0, i);
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap();
        }
        assert_eq!(st.campaign_of("a"), Some("c1"));
        let v2 = snapshot::encode_version(
            &V2 {
                next_offset: Some(100),
                models: &ModelSetV1::of(&st.models),
                dedupe: &st.dedupe,
                totals: &st.totals.iter().map(|(k, v)| (*k, v.total)).collect(),
                newest_ms: st.newest_ms,
                held: &st.held,
            },
            2,
        );
        let mut restored = PartitionState::restore(&v2).unwrap();
        assert_eq!(
            restored.models(),
            &ModelSetV1::of(&st.models).into_current()
        );
        assert_eq!(restored.held(), st.held());
        assert_eq!(restored.campaign_of("a"), None);
        let l = label("s100:a", "a", false, 100);
        restored
            .apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
            .unwrap();
        assert_eq!(restored.campaign_of("a"), Some("c1"));
    }

    #[test]
    fn a_checkpoint_of_format_4_restores_with_every_key_hot_until_a_full_retention_passes() {
        #[derive(Serialize)]
        struct V4<'a> {
            next_offset: Option<i64>,
            models: &'a ModelSet,
            dedupe: &'a Dedupe,
            totals: &'a HashMap64<Total>,
            newest_ms: i64,
            held: &'a Held,
            campaigns: &'a HashMap64<String>,
        }
        let mut st = state();
        for i in 0..100 {
            let mut l = label(&format!("s{i}:a"), "a", false, 1_000 * i);
            l.context.geo = format!("g{}", i % 5);
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .unwrap();
        }
        let v4 = snapshot::encode_version(
            &V4 {
                next_offset: Some(100),
                models: &st.models,
                dedupe: &st.dedupe,
                totals: &st.totals.iter().map(|(k, v)| (*k, v.total)).collect(),
                newest_ms: st.newest_ms,
                held: &st.held,
                campaigns: &st.campaigns,
            },
            4,
        );
        let mut restored = PartitionState::restore(&v4).unwrap();
        assert_eq!(restored.models(), st.models());
        assert_eq!(restored.total_keys(), 6);
        assert_eq!(
            restored.total("a", None),
            Total {
                imps: 100,
                clicks: 0
            }
        );
        assert_eq!(restored.campaign_of("a"), Some("c1"));
        let retention = Retention {
            hot_ms: 5_000,
            remembered: 1_000,
        };
        // Every key counts as changed at the newest event time the checkpoint knew.
        assert!(restored.retire(retention, |_| false).is_empty());
        let l = label("s200:b", "b", false, 99_000 + 5_001);
        restored
            .apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
            .unwrap();
        let retired = restored.retire(retention, |_| false);
        assert_eq!(retired.len(), 6, "ad a and its five contexts");
        assert_eq!(restored.total_keys(), 2);
        assert_eq!(restored.campaign_of("a"), None);
        assert!(restored.needs_seed(total_key("a", None)));
        assert!(!restored.needs_seed(total_key("b", None)), "hot");
    }

    #[test]
    fn an_invalid_example_is_an_error_and_learns_nothing() {
        let mut st = state();
        let mut l = label("s1:a", "a", false, 1);
        l.position = 0;
        let before = st.models().clone();
        assert!(
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .is_err()
        );
        assert_eq!(st.models(), &before);
    }
}

//! Incremental checkpoints: what changed in a partition's state since its last checkpoint,
//! as one value whose size follows the change, not the state.
//!
//! A partition's checkpoint is a chain: a whole state (the base) and the increments appended
//! after it (`ctr_runtime::redis::FencedStore::append`). The state keeps [`Changes`] as it
//! applies records, and at a checkpoint turns them into an [`Increment`]:
//!
//! - **keyed parts, by the keys that changed**: every variant's parameters that learning from
//!   the interval's impressions may have changed, as absolute values, and what maintenance
//!   evicted (the same [`ctr_models::VariantDelta`] replicas apply); the exact totals and
//!   campaigns of the keys set, brought back or retired; the label IDs the dedupe remembered
//!   and the keys retired, in order, replayed into the dedupe and the retired-key filter;
//! - **bounded parts, as a byte patch**: the variants' metrics and admission filters, the held
//!   clicks and the seeded offsets, whose size the settings bound but whose bytes change a
//!   little everywhere, encoded together and diffed against the last checkpoint's encoding
//!   ([`crate::bytediff`]).
//!
//! Restoring applies the increments, merged into one, to the base: the result equals the
//! state that saved the last one (its sampler aside, which restarts as after any restore).
//!
//! A whole state is saved instead when there is no base to extend (a fresh partition, a
//! checkpoint from before chains), when a count model's decay landmark moved (every counter
//! was rescaled: the change is the whole model), and when the chain is due for compaction (the
//! caller's policy: [`PartitionState::increment`]).

use ctr_models::example::Keys;
use ctr_models::example::combine;
use ctr_models::snapshot::{self, SnapshotError};
use ctr_models::{Evicted, ModelSetExtras, ModelSetExtrasRef, Touched, VariantDelta};
use ctr_runtime::redis::Chain;
use serde::{Deserialize, Serialize};

use super::{HashMap64, HashSet64, Kept, PartitionState};
use crate::bytediff::{Patch, Version};
use crate::hold::Held;

/// Format of an increment, numbered apart from the whole state's formats
/// ([`super::CHECKPOINT_FORMAT`]) so neither is ever read as the other.
pub const INCREMENT_FORMAT: u16 = 101;

/// What changed since the last checkpoint, noted as records are applied.
///
/// Nothing is noted while there is no last checkpoint (no [`Mark`]): the next checkpoint is
/// then a whole state, which needs no changes. So a state that is never checkpointed (a
/// backtest's, a fresh partition's before its first checkpoint) does not pay for them: the
/// impressions' keys alone took about 1 KiB per distinct (ad, context), 1.8 GiB in a
/// backtest of a million of them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Changes {
    /// The keys of each impression learned from (or corrected), by a hash of its ad, context
    /// and campaign: the parameters its learning may have changed are found from them.
    impressions: HashMap64<Keys>,
    /// Total keys set, brought back or retired (an ad's key also stands for its campaign).
    keys: HashSet64,
    /// Per variant, what maintenance evicted.
    evicted: Vec<Evicted>,
    /// Keys retired into the filter, in order: each retirement's keys with the filter size
    /// setting they went in under.
    retired: Vec<Retired>,
    /// Label IDs the dedupe remembered, in order, with their event times.
    dedupe: Vec<(i64, u64)>,
    /// The last checkpoint, if this state knows it.
    mark: Option<Mark>,
}

/// The checkpoint a state's changes are counted from.
#[derive(Debug, Clone)]
struct Mark {
    chain: Chain,
    /// Bytes of the chain's base, and of its increments so far.
    base_bytes: usize,
    linked_bytes: usize,
    /// The count models' decay landmarks then.
    landmarks: Vec<Option<i64>>,
    /// The bounded parts' encoding then.
    extras: Version,
    /// The state's next offset then: where the next increment starts.
    from: Option<i64>,
}

impl Changes {
    /// Whether changes are noted: only when there is a checkpoint to count them from.
    fn noting(&self) -> bool {
        self.mark.is_some()
    }

    /// Notes that learning from an impression whose keys are `keys` may have changed
    /// parameters.
    pub(crate) fn impression(&mut self, keys: &Keys) {
        if !self.noting() {
            return;
        }
        let key = combine(combine(keys.ad, keys.context), keys.campaign);
        self.impressions.entry(key).or_insert(*keys);
    }

    /// Notes that the total (and, for an ad's key, the campaign) at `key` changed.
    pub(crate) fn key(&mut self, key: u64) {
        if self.noting() {
            self.keys.insert(key);
        }
    }

    /// Notes a label ID the dedupe remembered.
    pub(crate) fn remembered(&mut self, ts_ms: i64, id: u64) {
        if self.noting() {
            self.dedupe.push((ts_ms, id));
        }
    }

    /// Notes keys retired into a filter sized for `remembered` keys.
    pub(crate) fn retired(&mut self, keys: &[u64], remembered: usize) {
        if keys.is_empty() || !self.noting() {
            return;
        }
        self.retired.push(Retired {
            remembered: remembered as u64,
            keys: keys.to_vec(),
        });
        self.keys.extend(keys);
    }

    /// Notes what each variant's maintenance evicted.
    pub(crate) fn evicted(&mut self, evicted: &[Evicted]) {
        if !self.noting() {
            return;
        }
        self.evicted.resize_with(evicted.len(), Evicted::default);
        for (all, e) in self.evicted.iter_mut().zip(evicted) {
            all.extend(e.clone());
        }
    }

    /// Forgets every change: the state as it is now is checkpointed.
    fn clear(&mut self) {
        self.impressions.clear();
        self.keys.clear();
        self.evicted.clear();
        self.retired.clear();
        self.dedupe.clear();
    }
}

/// The bounded parts of a state, borrowed for encoding.
#[derive(Serialize)]
struct ExtrasRef<'a> {
    models: ModelSetExtrasRef<'a>,
    held: &'a Held,
    /// In key order, so equal maps encode to equal bytes.
    seeded: Vec<(u64, i64)>,
}

/// [`ExtrasRef`], decoded.
#[derive(Deserialize)]
struct Extras {
    models: ModelSetExtras,
    held: Held,
    seeded: Vec<(u64, i64)>,
}

/// The change from one checkpoint of a partition to the next.
#[derive(Debug, Serialize, Deserialize)]
struct Increment {
    /// The next offset of the state it applies to, and of the state it makes.
    from: Option<i64>,
    next_offset: Option<i64>,
    newest_ms: i64,
    clock_ms: i64,
    /// One per variant, in order.
    models: Vec<VariantDelta>,
    /// Totals and campaigns of the keys noted (`None`: not held any more).
    totals: Vec<(u64, Option<Kept>)>,
    campaigns: Vec<(u64, Option<String>)>,
    retired: Vec<Retired>,
    dedupe: Vec<(i64, u64)>,
    extras: Patch,
}

/// Keys retired together into the filter, sized for `remembered` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Retired {
    remembered: u64,
    keys: Vec<u64>,
}

impl Increment {
    /// `later` after this one, as one increment (its `extras` is the later one's: patches are
    /// applied in turn, not merged).
    fn merge(&mut self, later: Increment) {
        self.next_offset = later.next_offset;
        self.newest_ms = later.newest_ms;
        self.clock_ms = later.clock_ms;
        for (d, l) in self.models.iter_mut().zip(later.models) {
            d.merge(l);
        }
        let totals: HashMap64<Option<Kept>> = self.totals.drain(..).chain(later.totals).collect();
        self.totals = totals.into_iter().collect();
        let campaigns: HashMap64<Option<String>> =
            self.campaigns.drain(..).chain(later.campaigns).collect();
        self.campaigns = campaigns.into_iter().collect();
        self.retired.extend(later.retired);
        self.dedupe.extend(later.dedupe);
        self.extras = later.extras;
    }
}

/// An increment ready to append ([`PartitionState::increment`]).
#[derive(Debug)]
pub struct Prepared {
    /// The encoded increment.
    pub body: Vec<u8>,
    /// Bytes of its patch of the bounded parts (metrics, admission filters, held clicks,
    /// seeded offsets) that it carries.
    pub bounded_bytes: usize,
    extras: Version,
}

/// When to save a whole state rather than another increment: after `max_links` increments, or
/// once the increments would outweigh the base (so a restore reads at most about twice the
/// state, and the whole states written cost at most as much as the increments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Increments per base at most; 0: every checkpoint is a whole state.
    pub max_links: usize,
}

impl Compaction {
    /// The scorer's default (`--checkpoint-links`).
    pub const DEFAULT: Compaction = Compaction { max_links: 256 };
}

impl PartitionState {
    fn extras_bytes(&self) -> Vec<u8> {
        let mut seeded: Vec<(u64, i64)> = self.seeded.iter().map(|(k, v)| (*k, *v)).collect();
        seeded.sort_unstable();
        snapshot::encode_body(&ExtrasRef {
            models: self.models.extras(),
            held: &self.held,
            seeded,
        })
    }

    fn landmarks(&self) -> Vec<Option<i64>> {
        self.models
            .variants()
            .iter()
            .map(ctr_models::Variant::decay_landmark)
            .collect()
    }

    /// The increment from the last checkpoint to this state, or `None` when a whole state is
    /// to be saved instead (see the module docs; `compaction` is the chain's policy).
    pub fn increment(&self, compaction: Compaction) -> Option<Prepared> {
        let mark = self.changes.mark.as_ref()?;
        if mark.chain.links >= compaction.max_links || mark.landmarks != self.landmarks() {
            return None;
        }
        let c = &self.changes;
        let mut touched = vec![Touched::default(); self.models.variants().len()];
        for keys in c.impressions.values() {
            self.models.touch_keys(keys, &mut touched);
        }
        let no_eviction = Evicted::default();
        let models = self
            .models
            .variants()
            .iter()
            .enumerate()
            .map(|(i, v)| v.delta(&touched[i], c.evicted.get(i).unwrap_or(&no_eviction)))
            .collect();
        let (extras, version) = Patch::diff(&mark.extras, self.extras_bytes());
        let increment = Increment {
            from: mark.from,
            next_offset: self.next_offset,
            newest_ms: self.newest_ms,
            clock_ms: self.clock_ms,
            models,
            totals: c
                .keys
                .iter()
                .map(|k| (*k, self.totals.get(k).copied()))
                .collect(),
            campaigns: c
                .keys
                .iter()
                .map(|k| (*k, self.campaigns.get(k).cloned()))
                .collect(),
            retired: c.retired.clone(),
            dedupe: c.dedupe.clone(),
            extras,
        };
        let bounded_bytes = increment.extras.carried();
        let body = snapshot::encode_version(&increment, INCREMENT_FORMAT);
        if mark.linked_bytes + body.len() > mark.base_bytes {
            return None;
        }
        Some(Prepared {
            body,
            bounded_bytes,
            extras: version,
        })
    }

    /// The chain this state's changes are counted from (`None`: the next checkpoint is whole).
    pub fn chain(&self) -> Option<&Chain> {
        self.changes.mark.as_ref().map(|m| &m.chain)
    }

    /// The increment `prepared` was appended: `chain` is the chain it extends now.
    pub fn linked(&mut self, prepared: Prepared, chain: Chain) {
        let mark = self
            .changes
            .mark
            .as_mut()
            .expect("an increment is prepared from a mark");
        mark.chain = chain;
        mark.linked_bytes += prepared.body.len();
        mark.extras = prepared.extras;
        mark.from = self.next_offset;
        self.changes.clear();
    }

    /// This state was saved whole, `bytes` long, as the base of `chain` (or restored from
    /// `chain`, whose base is `bytes` long and its increments `linked_bytes`): changes are
    /// counted from here.
    pub fn based(&mut self, chain: Chain, bytes: usize, linked_bytes: usize) {
        self.changes.clear();
        self.changes.mark = Some(Mark {
            chain,
            base_bytes: bytes,
            linked_bytes,
            landmarks: self.landmarks(),
            extras: Version::of(self.extras_bytes()),
            from: self.next_offset,
        });
    }

    /// The state a chain holds: its base `base` ([`PartitionState::restore`]) with its
    /// `increments` applied, oldest first. An increment that does not follow the one before it
    /// (another offset, another set of variants, a patch of other bytes) is an error: the
    /// chain is corrupt.
    pub fn restore_chain(base: &[u8], increments: &[Vec<u8>]) -> Result<Self, SnapshotError> {
        let mut state = Self::restore(base)?;
        let Some((first, rest)) = increments.split_first() else {
            return Ok(state);
        };
        let corrupt = |what: String| SnapshotError::Body(format!("increment chain: {what}"));
        let mut extras = state.extras_bytes();
        let mut merged = decode(first)?;
        if merged.from != state.next_offset {
            return Err(corrupt(format!(
                "the first increment starts at offset {:?}, its base ends at {:?}",
                merged.from, state.next_offset
            )));
        }
        extras = merged.extras.apply(&extras).map_err(corrupt)?;
        for bytes in rest {
            let next = decode(bytes)?;
            if next.from != merged.next_offset {
                return Err(corrupt(format!(
                    "an increment starts at offset {:?}, the one before it ends at {:?}",
                    next.from, merged.next_offset
                )));
            }
            extras = next.extras.apply(&extras).map_err(corrupt)?;
            merged.merge(next);
        }
        let extras: Extras = snapshot::decode_body(&extras)?;
        state
            .models
            .apply(&merged.models)
            .map_err(|e| corrupt(e.to_string()))?;
        state
            .models
            .set_extras(extras.models)
            .map_err(|e| corrupt(e.to_string()))?;
        state.held = extras.held;
        state.seeded = extras.seeded.into_iter().collect();
        for (key, kept) in merged.totals {
            match kept {
                Some(kept) => state.totals.insert(key, kept),
                None => state.totals.remove(&key),
            };
        }
        for (key, campaign) in merged.campaigns {
            match campaign {
                Some(campaign) => state.campaigns.insert(key, campaign),
                None => state.campaigns.remove(&key),
            };
        }
        for retired in merged.retired {
            let remembered = usize::try_from(retired.remembered).unwrap_or(usize::MAX);
            for key in retired.keys {
                state.retired.insert(key, remembered);
            }
        }
        for (ts_ms, id) in merged.dedupe {
            state.dedupe.check_id(id, ts_ms);
        }
        state.next_offset = merged.next_offset;
        state.newest_ms = merged.newest_ms;
        state.clock_ms = merged.clock_ms;
        Ok(state)
    }
}

fn decode(bytes: &[u8]) -> Result<Increment, SnapshotError> {
    match snapshot::open(bytes)? {
        (INCREMENT_FORMAT, body) => snapshot::decode_body(body),
        (found, _) => Err(SnapshotError::UnsupportedVersion {
            found,
            supported: INCREMENT_FORMAT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use ctr_models::{ModelSet, VariantConfig, VariantKind};
    use ctr_schemas::LabelKind;

    use super::super::tests::label;
    use super::super::{Policy, Total, total_key};
    use super::*;
    use crate::retention::Retention;

    /// Every part of two states is the same (the sampler aside, which restarts on restore).
    fn assert_same(a: &PartitionState, b: &PartitionState) {
        assert_eq!(a.next_offset, b.next_offset);
        assert_eq!(a.models, b.models);
        assert_eq!(a.dedupe, b.dedupe);
        assert_eq!(a.totals, b.totals);
        assert_eq!(a.newest_ms, b.newest_ms);
        assert_eq!(a.held, b.held);
        assert_eq!(a.campaigns, b.campaigns);
        assert_eq!(a.clock_ms, b.clock_ms);
        assert_eq!(a.seeded, b.seeded);
        assert_eq!(
            snapshot::encode_body(&a.retired),
            snapshot::encode_body(&b.retired)
        );
    }

    fn state(half_life_ms: f64) -> PartitionState {
        let mut configs: Vec<VariantConfig> = [
            VariantKind::Counts,
            VariantKind::Ftrl,
            VariantKind::Combined,
        ]
        .into_iter()
        .map(VariantConfig::of)
        .collect();
        for c in &mut configs {
            c.counts.half_life_ms = Some(half_life_ms);
            c.ftrl.filter_bits = 12;
        }
        PartitionState::new(ModelSet::new(configs).unwrap(), 600_000)
    }

    /// Label `i` of a stream with many ads and contexts, clicks, late clicks and repeats.
    fn apply(st: &mut PartitionState, i: i64) {
        let t0 = 1_760_000_000_000;
        let id = if i % 50 == 49 { i - 7 } else { i }; // a repeat now and then
        let mut l = label(
            &format!("s{id}:a"),
            &format!("ad{}", i % 37),
            i % 11 == 0,
            t0 + i * 1_000,
        );
        l.campaign_id = format!("c{}", i % 5);
        l.context.geo = ["US", "DE", "FR", "IT", "ES", "NL", "PL"][(i % 7) as usize].into();
        l.context.device = ["mobile", "desktop", "tablet"][(i % 3) as usize].into();
        l.context.query_category = format!("q{}", (i / 100) % 13);
        if i % 97 == 0 {
            l.kind = LabelKind::LateClick;
            l.label_id.push_str(":late");
        }
        st.next_offset = Some(i + 1);
        st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
            .unwrap();
    }

    #[test]
    fn a_base_and_its_increments_restore_the_state_that_saved_the_last_one() {
        let mut st = state(6.0 * 3_600_000.0);
        let retention = Retention {
            hot_ms: 120_000,
            remembered: 10_000,
        };
        let mut base = Vec::new();
        let mut increments = Vec::new();
        for i in 0..4_000 {
            apply(&mut st, i);
            if i % 500 != 499 {
                continue;
            }
            // Maintenance as the worker runs it: eviction and retirement, and a retired key
            // brought back from Redis.
            st.maintain(60_000);
            // Not at every checkpoint: an increment without retirements follows one with.
            if i % 1_000 == 999 {
                st.retire(retention, |_| false);
            }
            let back = total_key("ad3", None);
            if st.needs_seed(back) {
                st.seed(back, Some((Total { imps: 7, clicks: 1 }, i)));
            }
            match st.increment(Compaction { max_links: 100 }) {
                Some(prepared) => {
                    increments.push(prepared.body.clone());
                    let mut chain = st.chain().unwrap().clone();
                    chain.links += 1;
                    st.linked(prepared, chain);
                }
                None => {
                    assert!(base.is_empty(), "only the first checkpoint is whole");
                    base = st.snapshot();
                    st.based(
                        Chain {
                            id: "c".into(),
                            links: 0,
                        },
                        // As if the base were large: no compaction by size here.
                        usize::MAX / 2,
                        0,
                    );
                }
            }
        }
        assert_eq!(increments.len(), 7);
        assert!(!st.retired.is_empty(), "keys retired along the way");
        let mut restored = PartitionState::restore_chain(&base, &increments).unwrap();
        assert_same(&restored, &st);
        // The same future, too.
        for i in 4_000..4_500 {
            apply(&mut st, i);
            apply(&mut restored, i);
        }
        assert_same(&restored, &st);

        // Each increment is far smaller than the state.
        let whole = st.snapshot().len();
        for inc in &increments {
            assert!(inc.len() * 3 < whole, "{} of {whole} bytes", inc.len());
        }
        // A chain with a link missing, or out of order, is refused.
        let mut gap = increments.clone();
        gap.remove(3);
        assert!(PartitionState::restore_chain(&base, &gap).is_err());
        increments.swap(1, 2);
        assert!(PartitionState::restore_chain(&base, &increments).is_err());
    }

    #[test]
    fn retirements_replay_under_their_own_filter_size_after_a_restore() {
        // One owner retires keys into a filter sized for 10,000; the next, restored from that
        // chain, retires none before its own increment: the chain must still rebuild the first
        // owner's filter as it was.
        let chain = |links| Chain {
            id: "c".into(),
            links,
        };
        let mut st = state(6.0 * 3_600_000.0);
        (0..500).for_each(|i| apply(&mut st, i));
        let base = st.snapshot();
        st.based(chain(0), usize::MAX / 2, 0);
        (500..1_000).for_each(|i| apply(&mut st, i));
        let retention = Retention {
            hot_ms: 60_000,
            remembered: 10_000,
        };
        assert!(!st.retire(retention, |_| false).is_empty());
        let first = st.increment(Compaction::DEFAULT).unwrap().body;
        let mut next = PartitionState::restore_chain(&base, std::slice::from_ref(&first)).unwrap();
        next.based(chain(1), usize::MAX / 2, first.len());
        (1_000..1_500).for_each(|i| apply(&mut next, i));
        let second = next.increment(Compaction::DEFAULT).unwrap().body;
        let restored = PartitionState::restore_chain(&base, &[first, second]).unwrap();
        assert_same(&restored, &next);
    }

    #[test]
    fn a_state_never_checkpointed_notes_no_changes_and_one_based_does() {
        let c = |st: &PartitionState| {
            let c = &st.changes;
            [
                c.impressions.len(),
                c.keys.len(),
                c.dedupe.len(),
                c.retired.len(),
                c.evicted.len(),
            ]
        };
        let retention = Retention {
            hot_ms: 60_000,
            remembered: 10_000,
        };
        let mut st = state(6.0 * 3_600_000.0);
        (0..1_000).for_each(|i| apply(&mut st, i));
        st.maintain(60_000);
        assert!(!st.retire(retention, |_| false).is_empty());
        assert_eq!(c(&st), [0; 5], "a backtest's state never checkpoints");
        st.based(
            Chain {
                id: "c".into(),
                links: 0,
            },
            usize::MAX / 2,
            0,
        );
        (1_000..2_000).for_each(|i| apply(&mut st, i));
        st.maintain(60_000);
        assert!(!st.retire(retention, |_| false).is_empty());
        assert!(c(&st).iter().all(|&n| n > 0), "{:?}", c(&st));
    }

    #[test]
    fn a_whole_state_is_due_without_a_base_past_the_link_limit_and_when_the_decay_landmark_moves() {
        // A half-life of 1 s: the landmark moves after 256 s of event time.
        let mut st = state(1_000.0);
        let compaction = Compaction { max_links: 2 };
        apply(&mut st, 0);
        assert!(st.increment(compaction).is_none(), "no base yet");
        let chain = Chain {
            id: "c".into(),
            links: 0,
        };
        st.based(chain.clone(), usize::MAX / 2, 0);
        for i in 1..3 {
            apply(&mut st, i);
            let prepared = st.increment(compaction).expect("an increment");
            let mut next = st.chain().unwrap().clone();
            next.links += 1;
            st.linked(prepared, next);
        }
        apply(&mut st, 3);
        assert!(st.increment(compaction).is_none(), "two links made");
        st.based(chain.clone(), usize::MAX / 2, 0);
        apply(&mut st, 4);
        assert!(st.increment(compaction).is_some());
        // 300 s later: every counter was rescaled.
        apply(&mut st, 300);
        assert!(st.increment(compaction).is_none(), "the landmark moved");
        // Increments outweighing the base.
        st.based(chain, 10, 0);
        apply(&mut st, 301);
        assert!(st.increment(compaction).is_none(), "larger than the base");
    }
}

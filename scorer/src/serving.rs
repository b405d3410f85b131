//! What a serving replica holds of one partition, how an owner's batch reaches it, and how it
//! answers for any ad in any context (pure: no I/O, no clock).
//!
//! The owner of a partition ([`crate::worker`]) learns with every variant; a replica keeps
//! only the serving variant's parameters, the exact totals and the ads' campaigns
//! ([`ServingState`]), restored from the owner's checkpoint and then kept current by the
//! owner's [`PartitionDelta`]s, one per published batch ([`crate::publish`] writes it in the
//! same fenced script as the Redis estimates). A delta carries absolute values of what the
//! batch changed, so a replica that applies every delta since its checkpoint holds exactly
//! the owner's serving variant as of the delta's offset, and [`ServingState::answer`] gives,
//! for any (ad, context), the prediction the owner would make: the count model's own back-off
//! levels, FTRL's crossed weights, a new ad's campaign, then the global rate.
//!
//! Versions. Every delta names the partition offset its batch ended at (`last`) and the one
//! the previous written batch ended at (`prev`). A replica at version `v` (its state reflects
//! every record up to offset `v`) can apply a delta exactly when `prev <= v < last`: every key
//! changed after `v` is in it. Anything else is a gap (the stream was trimmed past the
//! replica), and the replica restores the latest checkpoint instead.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use ctr_models::example::Keys;
use ctr_models::snapshot::{self, SnapshotError};
use ctr_models::variants::legacy::VariantDeltaV1;
use ctr_models::{Feature, Impression, ModelError, Variant, VariantDelta};
use nohash_hasher::NoHashHasher;
use serde::{Deserialize, Serialize};

use crate::state::{Total, context_total_hash, total_key_in};

type HashMap64<V> = HashMap<u64, V, BuildHasherDefault<NoHashHasher<u64>>>;

/// Format of an encoded [`PartitionDelta`] (in the project's snapshot container). 2 added the
/// variant's offset ([`ctr_models::Offset`]), 3 the retired totals; 1 and 2 are still read.
pub const DELTA_FORMAT: u16 = 3;

/// A [`PartitionDelta`] of format 2.
#[derive(Deserialize)]
struct PartitionDeltaV2 {
    model: VariantDelta,
    totals: Vec<(u64, Total)>,
    campaigns: Vec<(u64, String)>,
}

/// A [`PartitionDelta`] of format 1.
#[derive(Deserialize)]
struct PartitionDeltaV1 {
    model: VariantDeltaV1,
    totals: Vec<(u64, Total)>,
    campaigns: Vec<(u64, String)>,
}

/// One published batch of a partition, for replicas: the serving variant's changed
/// parameters, the changed exact totals and the campaigns of the batch's ads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionDelta {
    /// The serving variant's changed parameters.
    pub model: VariantDelta,
    /// The changed exact totals, by key.
    pub totals: Vec<(u64, Total)>,
    /// Campaigns of the batch's ads, by ad key.
    pub campaigns: Vec<(u64, String)>,
    /// Total keys that left the owner's hot state ([`crate::retention`]); an ad's key takes
    /// the ad's campaign with it. Applied before `totals`: a key may retire and come back
    /// between two written deltas.
    pub retired: Vec<u64>,
}

impl PartitionDelta {
    /// The delta in the snapshot container (format [`DELTA_FORMAT`]).
    pub fn encode(&self) -> Vec<u8> {
        snapshot::encode_version(self, DELTA_FORMAT)
    }

    /// Reads [`PartitionDelta::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        match snapshot::open(bytes)? {
            (DELTA_FORMAT, body) => snapshot::decode_body(body),
            (2, body) => snapshot::decode_body::<PartitionDeltaV2>(body).map(|d| Self {
                model: d.model,
                totals: d.totals,
                campaigns: d.campaigns,
                retired: Vec::new(),
            }),
            (1, body) => snapshot::decode_body::<PartitionDeltaV1>(body).map(|d| Self {
                model: d.model.into_current(),
                totals: d.totals,
                campaigns: d.campaigns,
                retired: Vec::new(),
            }),
            (found, _) => Err(SnapshotError::UnsupportedVersion {
                found,
                supported: DELTA_FORMAT,
            }),
        }
    }
}

/// How an answer was obtained, by the evidence behind it (the same for every variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// This ad has been seen in exactly this context.
    Exact,
    /// The ad is known, but not in this full context: the model's back-off for it.
    BackedOff,
    /// Nothing is known about the ad: its campaign's rate, else the global one.
    Prior,
}

/// The replica's answer for one ad in one context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// The serving variant's calibrated click probability at the top slot.
    pub pctr: f64,
    /// Which evidence the estimate rests on.
    pub evidence: Evidence,
    /// Exact totals behind the evidence (the ad in this context, the ad, or none).
    pub total: Total,
}

/// A request's context, hashed once for all its candidates.
#[derive(Debug)]
pub struct RequestContext<'a> {
    pairs: &'a [(&'a str, &'a str)],
    /// The impression keys of the context at the top slot (ad and campaign filled per
    /// candidate).
    keys: Keys,
    total_hash: u64,
}

impl<'a> RequestContext<'a> {
    /// The context with these `pairs`, whose [`ctr_schemas::Context::key`] is `context_key`.
    pub fn new(pairs: &'a [(&'a str, &'a str)], context_key: &str) -> Self {
        let keys = Keys::of(&Impression {
            ad: "",
            campaign: "",
            position: 1,
            context: pairs,
            ts_ms: 0,
        });
        Self {
            pairs,
            keys,
            total_hash: context_total_hash(context_key),
        }
    }
}

/// Why a delta was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The delta starts elsewhere than the state ends.
    #[error("delta ({prev}, {last}] does not continue version {version:?}")]
    Gap {
        /// The state's version.
        version: Option<i64>,
        /// The delta's fence before its batch.
        prev: i64,
        /// The delta's last offset.
        last: i64,
    },
    /// The delta does not fit the variant.
    #[error("delta does not fit the serving variant: {0}")]
    Model(#[from] ModelError),
}

/// What applying a delta did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The state now reflects every record up to the delta's `last`.
    Applied,
    /// The state is already at or past the delta's `last`: nothing changed.
    AlreadyCovered,
}

/// One partition as a replica holds it.
#[derive(Debug, Clone)]
pub struct ServingState {
    variant: Variant,
    totals: HashMap64<Total>,
    campaigns: HashMap64<String>,
    /// Last partition offset reflected; `None` before any record.
    version: Option<i64>,
}

impl ServingState {
    /// A partition's serving state as of offset `version`.
    pub fn new(
        variant: Variant,
        totals: HashMap64<Total>,
        campaigns: HashMap64<String>,
        version: Option<i64>,
    ) -> Self {
        Self {
            variant,
            totals,
            campaigns,
            version,
        }
    }

    /// A partition no record has reached yet.
    pub fn empty(variant: Variant) -> Self {
        Self::new(variant, HashMap64::default(), HashMap64::default(), None)
    }

    /// Last partition offset this state reflects.
    pub fn version(&self) -> Option<i64> {
        self.version
    }

    /// The serving variant.
    pub fn variant(&self) -> &Variant {
        &self.variant
    }

    /// Model parameters held: count keys plus FTRL coordinates.
    pub fn parameters(&self) -> usize {
        self.variant.parameters()
    }

    /// Exact-total keys held (ads and ads in full contexts).
    pub fn total_keys(&self) -> usize {
        self.totals.len()
    }

    /// Applies the owner's delta of the batch `(prev, last]` (see the module docs).
    pub fn apply(
        &mut self,
        prev: i64,
        last: i64,
        delta: &PartitionDelta,
    ) -> Result<Applied, ApplyError> {
        let v = self.version.unwrap_or(-1);
        if last <= v {
            return Ok(Applied::AlreadyCovered);
        }
        if prev > v {
            return Err(ApplyError::Gap {
                version: self.version,
                prev,
                last,
            });
        }
        self.variant.apply(&delta.model)?;
        for key in &delta.retired {
            self.totals.remove(key);
            self.campaigns.remove(key);
        }
        self.totals.extend(delta.totals.iter().copied());
        for (ad, campaign) in &delta.campaigns {
            if self.campaigns.get(ad) != Some(campaign) {
                self.campaigns.insert(*ad, campaign.clone());
            }
        }
        self.version = Some(last);
        Ok(Applied::Applied)
    }

    /// The serving variant's answer for `ad` in the request context `ctx`, at the top slot.
    /// `campaign` is the request's; without it the ad's known campaign is used (a new ad
    /// without one gets the global rate's back-off). `features` is scratch space.
    pub fn answer(
        &self,
        ad: &str,
        campaign: Option<&str>,
        ctx: &RequestContext<'_>,
        features: &mut Vec<Feature>,
    ) -> Answer {
        let ad_key = total_key_in(ad, None);
        let campaign = campaign
            .or_else(|| self.campaigns.get(&ad_key).map(String::as_str))
            .unwrap_or("");
        let x = Impression {
            ad,
            campaign,
            position: 1,
            context: ctx.pairs,
            ts_ms: 0,
        };
        let prediction = self
            .variant
            .predict_keys(&x, &ctx.keys.with_ad(ad, campaign), features);
        let exact = self.total_of(total_key_in(ad, Some(ctx.total_hash)));
        let whole = self.total_of(ad_key);
        let (evidence, total) = if exact.imps > 0 {
            (Evidence::Exact, exact)
        } else if whole.imps > 0 {
            (Evidence::BackedOff, whole)
        } else {
            (Evidence::Prior, Total::default())
        };
        Answer {
            pctr: prediction.p,
            evidence,
            total,
        }
    }

    fn total_of(&self, key: u64) -> Total {
        self.totals.get(&key).copied().unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{PartitionState, Policy, total_key};
    use ctr_models::{ModelSet, Touched, VariantConfig, VariantKind};
    use ctr_schemas::{Context, LabelKind, LabeledImpression};

    /// Label `i` of `ad` in `geo` (travel, mobile; a click every 13th; positions 1 to 3).
    pub(crate) fn label(i: i64, ad: &str, geo: &str) -> LabeledImpression {
        LabeledImpression {
            label_id: format!("s{i}:{ad}"),
            serve_id: i,
            ad_id: ad.into(),
            campaign_id: format!("camp-{}", ad.len() % 2),
            position: 1 + (i % 3) as i32,
            context: Context {
                query_category: "travel".into(),
                geo: geo.into(),
                device: "mobile".into(),
                extra: Default::default(),
            },
            clicked: i % 13 == 0,
            ts_ms: 1_000 * i,
            click_ts_ms: None,
            kind: LabelKind::Label,
        }
    }

    /// The delta of a batch, built as the worker builds it.
    fn delta_of(st: &PartitionState, batch: &[LabeledImpression]) -> PartitionDelta {
        let v = st.models().variant("combined").unwrap();
        let mut touched = Touched::default();
        let mut totals = Vec::new();
        let mut campaigns = Vec::new();
        for l in batch {
            let pairs = l.context.pairs();
            v.touch(
                &Impression {
                    ad: &l.ad_id,
                    campaign: &l.campaign_id,
                    position: 1,
                    context: &pairs,
                    ts_ms: l.ts_ms,
                },
                &mut touched,
            );
            for key in [
                total_key(&l.ad_id, None),
                total_key(&l.ad_id, Some(&l.context.key())),
            ] {
                totals.push((key, st.total_at(key)));
            }
            campaigns.push((total_key(&l.ad_id, None), l.campaign_id.clone()));
        }
        PartitionDelta {
            model: v.delta(&touched, &Default::default()),
            totals,
            campaigns,
            retired: Vec::new(),
        }
    }

    #[test]
    fn a_replica_answers_as_the_owner_and_refuses_a_gap() {
        let models = ModelSet::new(vec![
            VariantConfig::of(VariantKind::Counts),
            VariantConfig::of(VariantKind::Combined),
        ])
        .unwrap();
        let mut owner = PartitionState::new(models, 600_000);
        let ads = ["a", "bb", "c", "dd"];
        let geos = ["US", "DE", "FR"];
        let mut replica = None;
        let mut batch = Vec::new();
        let mut offset = 0i64;
        let mut prev = -1i64;
        for i in 0..3_000i64 {
            let l = label(i, ads[(i % 4) as usize], geos[(i % 3) as usize]);
            owner
                .apply(&l, &l.context.key(), Policy::NORMAL, &mut batch)
                .unwrap();
            batch.push(l);
            owner.next_offset = Some(offset + 1);
            if i == 500 {
                replica = PartitionState::restore(&owner.snapshot())
                    .unwrap()
                    .into_serving("combined");
                batch.clear();
                prev = offset;
            } else if i % 50 == 0
                && let Some(r) = &mut replica
            {
                let d = PartitionDelta::decode(&delta_of(&owner, &batch).encode()).unwrap();
                assert_eq!(r.apply(prev, offset, &d).unwrap(), Applied::Applied);
                assert_eq!(
                    r.apply(prev, offset, &d).unwrap(),
                    Applied::AlreadyCovered,
                    "a delta seen twice changes nothing"
                );
                batch.clear();
                prev = offset;
            }
            offset += 1;
        }
        let mut r = replica.unwrap();
        r.apply(prev, offset - 1, &delta_of(&owner, &batch))
            .unwrap();
        assert_eq!(r.version(), Some(offset - 1));
        // A delta that starts past the replica's version is a gap.
        assert!(matches!(
            r.apply(offset + 5, offset + 9, &delta_of(&owner, &[])),
            Err(ApplyError::Gap { .. })
        ));
        let owner_variant = owner.models().variant("combined").unwrap();
        assert!(r.variant().same_parameters(owner_variant));
        // Unseen pairs, a new ad of a known campaign, extra context fields.
        for (ad, campaign, geo) in [
            ("a", None, "JP"),
            ("bb", None, "US"),
            ("new", Some("camp-1"), "US"),
            ("new", None, "DE"),
        ] {
            let ctx = Context {
                query_category: "travel".into(),
                geo: geo.into(),
                device: "tablet".into(),
                extra: [("hour".to_string(), "7".to_string())]
                    .into_iter()
                    .collect(),
            };
            let pairs = ctx.pairs();
            let key = ctx.key();
            let got = r.answer(
                ad,
                campaign,
                &RequestContext::new(&pairs, &key),
                &mut Vec::new(),
            );
            let want = owner_variant.predict(&Impression {
                ad,
                campaign: campaign.or(owner.campaign_of(ad)).unwrap_or(""),
                position: 1,
                context: &pairs,
                ts_ms: 0,
            });
            assert_eq!(got.pctr, want.p, "{ad} {geo}");
            let expected = if ad == "new" {
                Evidence::Prior
            } else {
                Evidence::BackedOff
            };
            assert_eq!(got.evidence, expected, "{ad}");
        }
        let seen = label(1, "bb", "DE");
        let (pairs, key) = (seen.context.pairs(), seen.context.key());
        let a = r.answer(
            "bb",
            None,
            &RequestContext::new(&pairs, &key),
            &mut Vec::new(),
        );
        assert_eq!(a.evidence, Evidence::Exact);
        assert_eq!(a.total, owner.total("bb", Some(&seen.context.key())));

        // The owner retires every key (event time moved on): so does the replica, and the
        // context that was exact evidence no longer is. A key that came back in the same
        // delta is held again.
        let later = label(3_000 + 2_000_000, "c", "US");
        owner.next_offset = Some(offset + 1);
        owner
            .apply(
                &later,
                &later.context.key(),
                Policy::NORMAL,
                &mut Vec::new(),
            )
            .unwrap();
        let retention = crate::retention::Retention {
            hot_ms: 1_000,
            remembered: 10_000,
        };
        let retired = owner.retire(retention, |_| false);
        assert!(retired.len() >= 2 * ads.len(), "{retired:?}");
        let mut delta = delta_of(&owner, &[later]);
        delta.retired = retired;
        let total_keys = r.total_keys();
        r.apply(offset - 1, offset, &delta).unwrap();
        assert_eq!(r.total_keys(), owner.total_keys());
        assert!(r.total_keys() < total_keys);
        let a = r.answer(
            "bb",
            None,
            &RequestContext::new(&pairs, &key),
            &mut Vec::new(),
        );
        assert_eq!(a.evidence, Evidence::Prior, "{a:?}");
    }
}

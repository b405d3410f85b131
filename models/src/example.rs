//! What a learner sees of one impression, and the hashed features derived from it.
//!
//! Learners take borrowed strings, so callers (the scorer, a backtest) need no conversion or
//! allocation. Every key is a 64-bit XXH3 hash with a namespace seed; XXH3 is a specified,
//! stable function, which matters because hashes are stored in snapshots.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::error::{ModelError, Result};

/// One ad shown, as the learners see it.
#[derive(Debug, Clone, Copy)]
pub struct Impression<'a> {
    /// The ad shown.
    pub ad: &'a str,
    /// The ad's campaign (its parent in the count model and a feature of FTRL).
    pub campaign: &'a str,
    /// 1 = top slot.
    pub position: u32,
    /// Context fields as (name, value). Order does not matter: keys combine them
    /// order-independently.
    pub context: &'a [(&'a str, &'a str)],
    /// Event time, Unix ms.
    pub ts_ms: i64,
}

/// Most context fields an impression may carry; [`Impression::validate`] rejects more. (The
/// event contract allows a few extra fields beside the three required ones; 32 leaves room.)
pub const MAX_CONTEXT_FIELDS: usize = 32;

impl Impression<'_> {
    /// Rejects what no model may learn from: position 0, more than [`MAX_CONTEXT_FIELDS`] fields.
    pub fn validate(&self) -> Result<()> {
        if self.position == 0 {
            return Err(ModelError::Position(0));
        }
        if self.context.len() > MAX_CONTEXT_FIELDS {
            return Err(ModelError::ContextFields(self.context.len()));
        }
        Ok(())
    }
}

/// Namespaces keep equal strings in different roles apart.
mod ns {
    pub(super) const AD: u64 = 0x0a;
    pub(super) const CAMPAIGN: u64 = 0x0c;
    pub(super) const FIELD: u64 = 0x0f;
    pub(super) const POSITION: u64 = 0x05;
    pub(super) const BIAS: u64 = 0xb1;
    pub(super) const CROSS: u64 = 0xc7;
    pub(super) const CONTEXT: u64 = 0xcc;
    pub(super) const COUNT_FEATURE: u64 = 0xcf;
    /// Mixed into a field name's hash for the key of that field's deviation feature.
    pub(super) const FIELD_DEVIATION: u64 = 0xfd5a_3c1e_9b27_4d61;
}

/// Hash of `s` in `namespace` (namespaces keep equal strings in different roles apart).
pub fn hash_str(namespace: u64, s: &str) -> u64 {
    hash_bytes(namespace, s.as_bytes())
}

/// [`hash_str`] of raw bytes (equal to it for the bytes of a string).
pub fn hash_bytes(namespace: u64, b: &[u8]) -> u64 {
    xxh3_64_with_seed(b, namespace)
}

/// Hash of a pair of hashes (a cross, or a key under a parent).
pub fn combine(a: u64, b: u64) -> u64 {
    xxh3_64_with_seed(&b.to_le_bytes(), a)
}

/// The key of an ad (in the count model's ad table and as FTRL's ad feature).
pub fn ad_key(ad: &str) -> u64 {
    hash_str(ns::AD, ad)
}

/// The key of a campaign.
pub fn campaign_key(campaign: &str) -> u64 {
    hash_str(ns::CAMPAIGN, campaign)
}

/// Key of one context field's value, e.g. geo=US.
pub fn field_key(name: &str, value: &str) -> u64 {
    field_key_of(hash_str(ns::FIELD, name), value)
}

/// [`field_key`] with the name's hash already computed.
fn field_key_of(name: u64, value: &str) -> u64 {
    combine(name, hash_str(ns::FIELD, value))
}

/// Key of a whole context, independent of the order of its fields.
pub fn context_key(context: &[(&str, &str)]) -> u64 {
    context
        .iter()
        .fold(ns::CONTEXT, |acc, (n, v)| acc.wrapping_add(field_key(n, v)))
}

/// The hashed keys of one impression, computed once and shared by every learner that sees it
/// (the count model's levels and FTRL's features hash the same strings).
///
/// A context longer than [`MAX_CONTEXT_FIELDS`] is cut to its first fields here; learning
/// rejects such an impression ([`Impression::validate`]), so only predictions ever see the cut.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    /// [`ad_key`] of the ad.
    pub ad: u64,
    /// [`campaign_key`] of the campaign.
    pub campaign: u64,
    /// The position feature (positions beyond 16 share one).
    pub position: u64,
    /// The whole context ([`context_key`]).
    pub context: u64,
    fields: [u64; MAX_CONTEXT_FIELDS],
    /// The hash of each field's name, in the same order.
    names: [u64; MAX_CONTEXT_FIELDS],
    len: usize,
}

impl Keys {
    /// The keys of `x`, computed once for every model that needs them.
    pub fn of(x: &Impression<'_>) -> Self {
        let mut fields = [0; MAX_CONTEXT_FIELDS];
        let mut names = [0; MAX_CONTEXT_FIELDS];
        let len = x.context.len().min(MAX_CONTEXT_FIELDS);
        for ((slot, name_slot), (name, value)) in fields.iter_mut().zip(&mut names).zip(x.context) {
            *name_slot = hash_str(ns::FIELD, name);
            *slot = field_key_of(*name_slot, value);
        }
        Self {
            ad: ad_key(x.ad),
            campaign: campaign_key(x.campaign),
            position: combine(ns::POSITION, u64::from(x.position.min(16))),
            context: fields[..len]
                .iter()
                .fold(ns::CONTEXT, |acc, f| acc.wrapping_add(*f)),
            fields,
            names,
            len,
        }
    }

    /// These keys for another ad and campaign in the same context and position: the context's
    /// hashes are reused (a server ranking many candidates in one context hashes it once).
    pub fn with_ad(&self, ad: &str, campaign: &str) -> Self {
        Self {
            ad: ad_key(ad),
            campaign: campaign_key(campaign),
            ..*self
        }
    }

    /// [`field_key`] of each context field, in the impression's order.
    pub fn fields(&self) -> &[u64] {
        &self.fields[..self.len]
    }

    /// The key of each context field's deviation feature ([`deviation_key`]), in the
    /// impression's order.
    pub fn deviation_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.names[..self.len].iter().map(|&n| deviation_key_of(n))
    }
}

/// One hashed feature with its value (1.0 for indicator features).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feature {
    /// Hashed feature key.
    pub key: u64,
    /// Its value.
    pub value: f64,
}

/// Which features the FTRL model extracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeatureSpec {
    /// Cross the ad with each context field (ad × geo, ad × device, ...).
    pub ad_crosses: bool,
    /// Cross the position with the ad.
    pub ad_position_cross: bool,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        Self {
            ad_crosses: true,
            ad_position_cross: false,
        }
    }
}

/// Writes the features of `x` into `out` (cleared first): bias, ad, campaign, position, each
/// context field, and the configured crosses. About 4 + 2 × fields features.
pub fn extract(spec: &FeatureSpec, x: &Impression<'_>, out: &mut Vec<Feature>) {
    extract_keys(spec, &Keys::of(x), out);
}

/// [`extract`] from keys already computed.
pub fn extract_keys(spec: &FeatureSpec, keys: &Keys, out: &mut Vec<Feature>) {
    out.clear();
    let one = |key| Feature { key, value: 1.0 };
    let ad = keys.ad;
    out.push(one(ns::BIAS));
    out.push(one(ad));
    out.push(one(keys.campaign));
    out.push(one(keys.position));
    for &f in keys.fields() {
        out.push(one(f));
        if spec.ad_crosses {
            out.push(one(combine(ns::CROSS ^ ad, f)));
        }
    }
    if spec.ad_position_cross {
        out.push(one(combine(ns::CROSS ^ ad, keys.position)));
    }
}

/// The keys of the features [`extract_keys`] gives an impression with `keys` at any position,
/// except those every impression shares ([`shared_feature_keys`]): what learning from that ad
/// in that context may have changed, whatever slot it was shown in.
pub fn impression_feature_keys(spec: &FeatureSpec, keys: &Keys, out: &mut impl Extend<u64>) {
    let ad = keys.ad;
    out.extend([ad, keys.campaign]);
    for &f in keys.fields() {
        out.extend([f]);
        if spec.ad_crosses {
            out.extend([combine(ns::CROSS ^ ad, f)]);
        }
    }
    if spec.ad_position_cross {
        out.extend((1..=16u64).map(|p| combine(ns::CROSS ^ ad, combine(ns::POSITION, p))));
    }
}

/// The keys of the features every impression may have: the bias, each position (positions
/// past 16 share the last key) and the count feature of a combined variant.
pub fn shared_feature_keys() -> impl Iterator<Item = u64> {
    [ns::BIAS, ns::COUNT_FEATURE]
        .into_iter()
        .chain((1..=16u64).map(|p| combine(ns::POSITION, p)))
}

/// The key of the real-valued feature that carries the count model's deviation for the
/// context field `name` (one per field name, whatever its value; see [`crate::variants`]).
pub fn deviation_key(name: &str) -> u64 {
    deviation_key_of(hash_str(ns::FIELD, name))
}

/// [`deviation_key`] of the field name whose hash is `name`.
fn deviation_key_of(name: u64) -> u64 {
    name ^ ns::FIELD_DEVIATION
}

/// The key of the real-valued feature that carries another model's estimate (see
/// [`crate::variants`]).
pub const COUNT_FEATURE_KEY: u64 = ns::COUNT_FEATURE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_across_releases() {
        // Snapshots store these values: a change here breaks every stored model.
        assert_eq!(ad_key("ad-1"), hash_str(0x0a, "ad-1"));
        assert_eq!(
            hash_str(0, ""),
            0x2d06800538d394c2,
            "XXH3-64 of the empty string, seed 0"
        );
    }

    #[test]
    fn context_key_ignores_field_order() {
        let a = [("geo", "US"), ("device", "mobile")];
        let b = [("device", "mobile"), ("geo", "US")];
        assert_eq!(context_key(&a), context_key(&b));
        assert_ne!(
            context_key(&a),
            context_key(&[("geo", "US"), ("device", "desktop")])
        );
    }

    #[test]
    fn keys_hash_like_the_free_functions() {
        let ctx = [("geo", "US"), ("device", "mobile")];
        let x = Impression {
            ad: "a",
            campaign: "c",
            position: 20,
            context: &ctx,
            ts_ms: 0,
        };
        let k = Keys::of(&x);
        assert_eq!(k.ad, ad_key("a"));
        assert_eq!(k.campaign, campaign_key("c"));
        assert_eq!(k.context, context_key(&ctx));
        assert_eq!(
            k.fields(),
            [field_key("geo", "US"), field_key("device", "mobile")]
        );
        assert_eq!(
            k.position,
            combine(ns::POSITION, 16),
            "positions past 16 share a key"
        );
        let other = Impression {
            ad: "b",
            campaign: "d",
            ..x
        };
        let (a, b) = (k.with_ad("b", "d"), Keys::of(&other));
        assert_eq!(
            (a.ad, a.campaign, a.position, a.context),
            (b.ad, b.campaign, b.position, b.context)
        );
        assert_eq!(a.fields(), b.fields());
    }

    #[test]
    fn too_many_context_fields_are_rejected() {
        let ctx: Vec<(&str, &str)> = (0..=MAX_CONTEXT_FIELDS).map(|_| ("f", "v")).collect();
        let x = Impression {
            ad: "a",
            campaign: "c",
            position: 1,
            context: &ctx,
            ts_ms: 0,
        };
        assert_eq!(x.validate(), Err(ModelError::ContextFields(33)));
        assert_eq!(Keys::of(&x).fields().len(), MAX_CONTEXT_FIELDS);
    }

    #[test]
    fn the_keys_of_any_position_cover_every_position_s_features() {
        let ctx = [("geo", "US"), ("device", "mobile")];
        let spec = FeatureSpec {
            ad_crosses: true,
            ad_position_cross: true,
        };
        let mut any: std::collections::HashSet<u64> = shared_feature_keys().collect();
        let first = Impression {
            ad: "a",
            campaign: "c",
            position: 1,
            context: &ctx,
            ts_ms: 0,
        };
        impression_feature_keys(&spec, &Keys::of(&first), &mut any);
        for position in [1, 2, 7, 16, 40] {
            let x = Impression { position, ..first };
            let mut out = vec![];
            extract(&spec, &x, &mut out);
            assert!(
                out.iter().all(|f| any.contains(&f.key)),
                "position {position}"
            );
        }
    }

    #[test]
    fn extract_counts_features() {
        let ctx = [
            ("geo", "US"),
            ("device", "mobile"),
            ("query_category", "travel"),
        ];
        let x = Impression {
            ad: "a",
            campaign: "c",
            position: 2,
            context: &ctx,
            ts_ms: 0,
        };
        let mut out = vec![];
        extract(&FeatureSpec::default(), &x, &mut out);
        assert_eq!(out.len(), 4 + 2 * 3);
        let mut keys: Vec<u64> = out.iter().map(|f| f.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(
            keys.len(),
            out.len(),
            "no accidental collisions among one example's features"
        );
    }
}

//! Rust types for the Avro records, and the value rules Avro cannot express.
//!
//! Field names and types mirror `schemas/avro/*.avsc` exactly (serde maps them by name). Decoding
//! proves only that bytes have the right shape; [`Serve::validate`] and friends check the values
//! (non-empty IDs, positive positions, finite bids) so a consumer can dead-letter a record that
//! decodes but makes no sense, instead of learning from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Context fields held inline by [`Context::pairs`] before it spills to the heap.
pub const INLINE_PAIRS: usize = 8;

/// [`Context::pairs`]: `(name, value)` sorted by name.
pub type ContextPairs<'a> = smallvec::SmallVec<[(&'a str, &'a str); INLINE_PAIRS]>;

/// Where and how a page was shown. `extra` holds further free-form fields (schema v2+).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Context {
    /// Category of the query the page answered (a token, e.g. `travel`).
    pub query_category: String,
    /// Country or region of the user (a token, e.g. `US`).
    pub geo: String,
    /// Device class (a token, e.g. `mobile`).
    pub device: String,
    /// Absent in serve v1 data; decodes as empty.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

impl Context {
    /// Canonical text form used as a key (Redis, model state): `field=value` pairs sorted by
    /// field name, joined with `|`. The fixed fields always appear; `extra` fields follow in
    /// name order. Values are used as given; producers are expected not to put `|` or `=` in
    /// them, and [`Context::validate`] rejects those.
    pub fn key(&self) -> String {
        Self::key_of(&self.pairs())
    }

    /// [`Context::key`] of a context whose [`Context::pairs`] are `pairs` (a caller that needs
    /// both computes the pairs once).
    pub fn key_of(pairs: &[(&str, &str)]) -> String {
        let mut out = String::with_capacity(64);
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push('|');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        }
        out
    }

    /// Every field as `(name, value)`, sorted by name: the fixed fields and the extra ones.
    /// Inline up to [`INLINE_PAIRS`] fields (no allocation on the scoring path). A fixed field
    /// left empty (only [`Context::from_any_fields`] makes such a context) is not a field.
    pub fn pairs(&self) -> ContextPairs<'_> {
        // The fixed fields, in name order.
        let mut parts = ContextPairs::new();
        for pair in [
            ("device", self.device.as_str()),
            ("geo", self.geo.as_str()),
            ("query_category", self.query_category.as_str()),
        ] {
            if !pair.1.is_empty() {
                parts.push(pair);
            }
        }
        // The extra fields are in name order too: each goes in after the fixed fields named
        // before it. Merging instead of sorting the whole took a learning step's pairs from 741
        // to 642 instructions (eight fields). A name in both (which `validate` refuses) puts
        // the fixed field first.
        let mut at = 0;
        for (k, v) in &self.extra {
            while at < parts.len() && parts[at].0 <= k.as_str() {
                at += 1;
            }
            parts.insert(at, (k.as_str(), v.as_str()));
            at += 1;
        }
        parts
    }

    /// Builds a context from a flat `name → value` map, the shape JSON producers and the ranking
    /// API use: `query_category`, `geo` and `device` are required, every other entry becomes an
    /// `extra` field. The result is validated.
    pub fn from_fields(fields: BTreeMap<String, String>) -> Result<Self, ValidationError> {
        Self::from_field_pairs(fields)
    }

    /// [`Context::from_fields`] of `(name, value)` pairs in any order, owned or borrowed (the
    /// ranking API reads them from a request body without allocating the names). A name given
    /// twice keeps its last value, as a JSON object read into a map does.
    pub fn from_field_pairs<K, V>(
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ValidationError>
    where
        K: AsRef<str> + Into<String>,
        V: Into<String>,
    {
        let (mut query_category, mut geo, mut device) = (None, None, None);
        let mut extra = BTreeMap::new();
        for (name, value) in fields {
            let fixed = match name.as_ref() {
                "query_category" => &mut query_category,
                "geo" => &mut geo,
                "device" => &mut device,
                _ => {
                    extra.insert(name.into(), value.into());
                    continue;
                }
            };
            *fixed = Some(value.into());
        }
        let missing = |field| ValidationError::new(field, "missing");
        let ctx = Context {
            query_category: query_category.ok_or(missing("context.query_category"))?,
            geo: geo.ok_or(missing("context.geo"))?,
            device: device.ok_or(missing("context.device"))?,
            extra,
        };
        ctx.validate()?;
        Ok(ctx)
    }

    /// Builds a context from a flat `name → value` map of any fields: a recorded log that is
    /// not the live search-ad contract (the backtest's labeled JSONL). A search-ad field, when
    /// present, is held as the fixed field; one that is absent stays empty and is no field
    /// ([`Context::pairs`] and [`Context::key`] leave it out). Every name and value must be a
    /// token, and there may be at most 32 fields in all (what the models take).
    pub fn from_any_fields(mut fields: BTreeMap<String, String>) -> Result<Self, ValidationError> {
        if fields.len() > MAX_EXTRA_CONTEXT_FIELDS + 3 {
            return Err(ValidationError::new("context", "more than 32 fields"));
        }
        for (k, v) in &fields {
            check_token("context key", k)?;
            check_token("context value", v)?;
        }
        let mut take = |name: &str| fields.remove(name).unwrap_or_default();
        Ok(Context {
            query_category: take("query_category"),
            geo: take("geo"),
            device: take("device"),
            extra: fields,
        })
    }

    /// `Ok` when every field and extra field is a token of the allowed characters, no extra
    /// field repeats a search-ad field, and there are at most 32 fields in all.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_token("context.query_category", &self.query_category)?;
        check_token("context.geo", &self.geo)?;
        check_token("context.device", &self.device)?;
        if self.extra.len() > MAX_EXTRA_CONTEXT_FIELDS {
            return Err(ValidationError::new(
                "context.extra",
                "more than 29 extra fields (32 in all)",
            ));
        }
        for (k, v) in &self.extra {
            check_token("context.extra key", k)?;
            if matches!(k.as_str(), "device" | "geo" | "query_category") {
                return Err(ValidationError::new(
                    "context.extra",
                    "repeats a fixed context field",
                ));
            }
            check_token("context.extra value", v)?;
        }
        Ok(())
    }
}

/// One ad on a result page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdShown {
    /// The ad shown.
    pub ad_id: String,
    /// Its campaign (a new ad is estimated from its campaign).
    pub campaign_id: String,
    /// 1 = top slot.
    pub position: i32,
    /// Bid per click, in the account currency.
    pub bid: f64,
}

/// A result page with its ads. Kafka key: `serve_id` (decimal text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Serve {
    /// Globally unique ID of the page (the project's 64-bit ID; the Kafka key).
    pub serve_id: i64,
    /// When the page was shown, Unix ms.
    pub ts_ms: i64,
    /// Where and how it was shown.
    pub context: Context,
    /// The ads on it, with their slots and bids.
    pub ads: Vec<AdShown>,
}

/// A click on one ad of a serve. Kafka key: `serve_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Click {
    /// Globally unique ID of the click (a retried click keeps its ID).
    pub click_id: i64,
    /// The serve the click belongs to (the Kafka key).
    pub serve_id: i64,
    /// The ad clicked; it must be one the serve showed.
    pub ad_id: String,
    /// When the click happened, Unix ms.
    pub ts_ms: i64,
}

/// What a labeled impression record means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum LabelKind {
    /// The one label of this ad on this serve.
    #[default]
    #[serde(rename = "LABEL")]
    Label,
    /// A click that arrived after the serve's window closed and its negative label was emitted.
    #[serde(rename = "LATE_CLICK")]
    LateClick,
}

/// One ad shown, labeled clicked or not by the joiner. Kafka key: `ad_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabeledImpression {
    /// Deterministic ID: `serve_id:ad_id` (or `serve_id:ad_id:late` for a correction), so a
    /// re-emitted label is recognised.
    pub label_id: String,
    /// The serve the impression was on.
    pub serve_id: i64,
    /// The ad shown (the Kafka key).
    pub ad_id: String,
    /// Its campaign.
    pub campaign_id: String,
    /// Its slot, 1 = top.
    pub position: i32,
    /// The page's context.
    pub context: Context,
    /// Whether the ad was clicked within the attribution window.
    pub clicked: bool,
    /// When the ad was shown, Unix ms (the serve's time).
    pub ts_ms: i64,
    /// When it was clicked, Unix ms, if it was.
    pub click_ts_ms: Option<i64>,
    /// Absent in v1 data; decodes as [`LabelKind::Label`].
    #[serde(default)]
    pub kind: LabelKind,
}

/// A borrowed [`LabeledImpression`], for producers that build labels from data they already
/// hold (the joiner): it encodes to exactly the same bytes without cloning any string.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LabeledImpressionRef<'a> {
    /// See [`LabeledImpression::label_id`].
    pub label_id: &'a str,
    /// See [`LabeledImpression::serve_id`].
    pub serve_id: i64,
    /// See [`LabeledImpression::ad_id`].
    pub ad_id: &'a str,
    /// See [`LabeledImpression::campaign_id`].
    pub campaign_id: &'a str,
    /// See [`LabeledImpression::position`].
    pub position: i32,
    /// See [`LabeledImpression::context`].
    pub context: &'a Context,
    /// See [`LabeledImpression::clicked`].
    pub clicked: bool,
    /// See [`LabeledImpression::ts_ms`].
    pub ts_ms: i64,
    /// See [`LabeledImpression::click_ts_ms`].
    pub click_ts_ms: Option<i64>,
    /// See [`LabeledImpression::kind`].
    pub kind: LabelKind,
}

impl LabeledImpressionRef<'_> {
    /// An owned copy (clones the strings).
    pub fn to_owned(&self) -> LabeledImpression {
        LabeledImpression {
            label_id: self.label_id.to_string(),
            serve_id: self.serve_id,
            ad_id: self.ad_id.to_string(),
            campaign_id: self.campaign_id.to_string(),
            position: self.position,
            context: self.context.clone(),
            clicked: self.clicked,
            ts_ms: self.ts_ms,
            click_ts_ms: self.click_ts_ms,
            kind: self.kind,
        }
    }
}

/// Most extra context fields beside the three fixed ones: 32 fields in all, what the learners
/// accept (`ctr_models::example::MAX_CONTEXT_FIELDS`).
pub const MAX_EXTRA_CONTEXT_FIELDS: usize = 29;

/// Most ads a serve may carry; a page with more is not a search result page.
pub const MAX_ADS_PER_SERVE: usize = 64;
/// Longest ID or context value accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 128;

/// A record that decoded but whose values are unusable. Names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {problem}")]
pub struct ValidationError {
    /// The field, as a path (`ads[0].bid`, `context.geo`).
    pub field: &'static str,
    /// What is wrong with its value.
    pub problem: &'static str,
}

impl ValidationError {
    /// The error for `field`.
    pub fn new(field: &'static str, problem: &'static str) -> Self {
        Self { field, problem }
    }
}

/// The rule for every ID and context value: non-empty, at most 128 bytes, no `|`, `=`, `:` or
/// control characters (they delimit Redis keys and context keys). Public so that other entry
/// points (the HTTP APIs) apply exactly the contract's rule.
pub fn check_token(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(ValidationError::new(field, "longer than 128 bytes"));
    }
    if !token_bytes_allowed(value.as_bytes()) {
        return Err(ValidationError::new(
            field,
            "must not contain '|', '=', ':' or control characters",
        ));
    }
    Ok(())
}

/// Whether UTF-8 `bytes` hold none of `|`, `=`, `:` and no control character
/// ([`char::is_control`]: U+0000–U+001F and U+007F–U+009F), in one pass over the bytes. The
/// ASCII ones are single bytes; U+0080–U+009F are encoded as `C2 80`–`C2 9F`, and a `C2` never
/// appears inside another character's encoding. Decoding every character to test it cost the
/// ranking API about 2,200 instructions per request (21 tokens; docs/BENCHMARKS.md).
fn token_bytes_allowed(bytes: &[u8]) -> bool {
    let mut after_c2 = false;
    for &b in bytes {
        let forbidden = matches!(b, 0x00..=0x1F | 0x7F | b'|' | b'=' | b':')
            || (after_c2 && (0x80..=0x9F).contains(&b));
        if forbidden {
            return false;
        }
        after_c2 = b == 0xC2;
    }
    true
}

fn check_id(field: &'static str, id: i64) -> Result<(), ValidationError> {
    if id <= 0 {
        return Err(ValidationError::new(field, "must be a positive 64-bit ID"));
    }
    Ok(())
}

fn check_ts(field: &'static str, ts_ms: i64) -> Result<(), ValidationError> {
    if ts_ms <= 0 {
        return Err(ValidationError::new(
            field,
            "must be milliseconds since the Unix epoch",
        ));
    }
    Ok(())
}

impl Serve {
    /// `Ok` when the IDs, the time, the context and every ad's values are within the contract.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("serve_id", self.serve_id)?;
        check_ts("ts_ms", self.ts_ms)?;
        self.context.validate()?;
        if self.ads.is_empty() {
            return Err(ValidationError::new("ads", "must list at least one ad"));
        }
        if self.ads.len() > MAX_ADS_PER_SERVE {
            return Err(ValidationError::new("ads", "more than 64 ads"));
        }
        for (i, ad) in self.ads.iter().enumerate() {
            check_token("ads.ad_id", &ad.ad_id)?;
            check_token("ads.campaign_id", &ad.campaign_id)?;
            if ad.position < 1 {
                return Err(ValidationError::new("ads.position", "must be 1 or more"));
            }
            if !ad.bid.is_finite() || ad.bid < 0.0 {
                return Err(ValidationError::new(
                    "ads.bid",
                    "must be a finite number >= 0",
                ));
            }
            if self.ads[..i].iter().any(|a| a.ad_id == ad.ad_id) {
                return Err(ValidationError::new(
                    "ads.ad_id",
                    "appears twice in one serve",
                ));
            }
        }
        Ok(())
    }
}

impl Click {
    /// `Ok` when the IDs, the ad and the time are within the contract.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("click_id", self.click_id)?;
        check_id("serve_id", self.serve_id)?;
        check_token("ad_id", &self.ad_id)?;
        check_ts("ts_ms", self.ts_ms)
    }
}

impl LabeledImpression {
    /// The deterministic label ID: one ad on one serve has exactly one label, whoever emits it
    /// and however often, so downstream can drop re-emitted duplicates by this ID.
    pub fn label_id_for(serve_id: i64, ad_id: &str) -> String {
        format!("{serve_id}:{ad_id}")
    }

    /// The deterministic ID of a late-click correction (at most one per ad and serve).
    pub fn late_click_id_for(serve_id: i64, ad_id: &str) -> String {
        format!("{serve_id}:{ad_id}:late")
    }

    fn expected_id(&self) -> String {
        match self.kind {
            LabelKind::Label => Self::label_id_for(self.serve_id, &self.ad_id),
            LabelKind::LateClick => Self::late_click_id_for(self.serve_id, &self.ad_id),
        }
    }

    /// `Ok` when the IDs, the ad, the slot, the context and the times are within the contract
    /// and the click fields agree with `clicked` and `kind`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("serve_id", self.serve_id)?;
        check_token("ad_id", &self.ad_id)?;
        check_token("campaign_id", &self.campaign_id)?;
        if self.position < 1 {
            return Err(ValidationError::new("position", "must be 1 or more"));
        }
        check_ts("ts_ms", self.ts_ms)?;
        self.context.validate()?;
        if self.clicked != self.click_ts_ms.is_some() {
            return Err(ValidationError::new(
                "click_ts_ms",
                "must be set exactly when clicked is true",
            ));
        }
        if self.kind == LabelKind::LateClick && !self.clicked {
            return Err(ValidationError::new(
                "kind",
                "a LATE_CLICK correction must be clicked",
            ));
        }
        if self.label_id != self.expected_id() {
            return Err(ValidationError::new(
                "label_id",
                "must be serve_id:ad_id (serve_id:ad_id:late for a LATE_CLICK)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            query_category: "travel".into(),
            geo: "US".into(),
            device: "mobile".into(),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn any_fields_make_a_context_without_the_search_ad_fields() {
        let fields = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Context::from_any_fields(fields(&[("user_b", "x2"), ("user_a", "x1")])).unwrap();
        assert_eq!(c.key(), "user_a=x1|user_b=x2");
        assert_eq!(c.pairs().as_slice(), [("user_a", "x1"), ("user_b", "x2")]);
        // A search-ad field, when present, is the fixed field, in name order with the rest.
        let c = Context::from_any_fields(fields(&[("geo", "US"), ("a", "1")])).unwrap();
        assert_eq!((c.geo.as_str(), c.key().as_str()), ("US", "a=1|geo=US"));
        assert!(
            Context::from_any_fields(BTreeMap::new())
                .unwrap()
                .pairs()
                .is_empty()
        );
        let bad = Context::from_any_fields(fields(&[("a", "x|y")])).unwrap_err();
        assert_eq!(bad.field, "context value");
        let many = (0..33)
            .map(|i| (format!("f{i}"), "v".to_string()))
            .collect();
        assert_eq!(Context::from_any_fields(many).unwrap_err().field, "context");
    }

    #[test]
    fn context_key_is_sorted_and_includes_extra() {
        let mut c = ctx();
        assert_eq!(c.key(), "device=mobile|geo=US|query_category=travel");
        c.extra.insert("hour".into(), "13".into());
        assert_eq!(
            c.key(),
            "device=mobile|geo=US|hour=13|query_category=travel"
        );
    }

    #[test]
    fn pairs_are_in_name_order_whatever_the_extra_names() {
        // Extra names before, between and after the fixed ones; fixed ones empty or not.
        let names = ["a", "dz", "f", "hour", "r", "zz"];
        for mask in 0u32..(1 << (names.len() + 3)) {
            let mut c = ctx();
            for (i, n) in names.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    c.extra.insert((*n).into(), "v".into());
                }
            }
            let fixed = mask >> names.len();
            if fixed & 1 == 0 {
                c.device.clear();
            }
            if fixed & 2 == 0 {
                c.geo.clear();
            }
            if fixed & 4 == 0 {
                c.query_category.clear();
            }
            let pairs = c.pairs();
            let mut sorted = pairs.clone();
            sorted.sort_unstable();
            assert_eq!(pairs, sorted, "{c:?}");
            assert_eq!(pairs.len(), c.extra.len() + fixed.count_ones() as usize);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]
        /// The byte scan accepts exactly what the rule's definition accepts: any string, and
        /// strings made mostly of the characters at the rule's edges (C1 controls and their
        /// neighbours, `C2`-led characters, the delimiters).
        #[test]
        fn the_token_byte_scan_is_the_rule(
            any in ".{0,24}",
            edges in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::char::range('\u{0}', '\u{ff}'),
                    proptest::char::range('\u{100}', '\u{10ffff}'),
                ],
                0..12,
            ),
        ) {
            let defined = |v: &str| !(v.contains(['|', '=', ':']) || v.chars().any(char::is_control));
            let edges: String = edges.into_iter().collect();
            for v in [any.as_str(), edges.as_str()] {
                proptest::prop_assert_eq!(token_bytes_allowed(v.as_bytes()), defined(v), "{:?}", v);
            }
        }
    }

    #[test]
    fn too_many_context_fields_are_invalid() {
        let mut c = ctx();
        for i in 0..MAX_EXTRA_CONTEXT_FIELDS {
            c.extra.insert(format!("f{i}"), "v".into());
        }
        assert!(c.validate().is_ok());
        c.extra.insert("one_more".into(), "v".into());
        assert_eq!(c.validate().unwrap_err().field, "context.extra");
    }

    #[test]
    fn context_from_flat_fields() {
        let mut fields: BTreeMap<String, String> = [
            ("query_category", "travel"),
            ("geo", "US"),
            ("device", "mobile"),
            ("hour", "13"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Context::from_fields(fields.clone()).unwrap();
        assert_eq!(
            c.key(),
            "device=mobile|geo=US|hour=13|query_category=travel"
        );
        fields.remove("geo");
        let e = Context::from_fields(fields.clone()).unwrap_err();
        assert_eq!((e.field, e.problem), ("context.geo", "missing"));
        fields.insert("geo".into(), "U|S".into());
        assert_eq!(
            Context::from_fields(fields).unwrap_err().field,
            "context.geo"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = Serve {
            serve_id: 1,
            ts_ms: 1_700_000_000_000,
            context: ctx(),
            ads: vec![AdShown {
                ad_id: "a".into(),
                campaign_id: "c".into(),
                position: 1,
                bid: 1.0,
            }],
        };
        assert!(s.validate().is_ok());
        s.ads[0].bid = f64::NAN;
        assert_eq!(s.validate().unwrap_err().field, "ads.bid");
        s.ads[0].bid = 1.0;
        s.context.geo = "U|S".into();
        assert_eq!(s.validate().unwrap_err().field, "context.geo");
        s.context.geo = "US".into();
        s.ads.push(s.ads[0].clone());
        assert_eq!(s.validate().unwrap_err().field, "ads.ad_id");
        s.ads.clear();
        assert_eq!(s.validate().unwrap_err().field, "ads");
    }

    #[test]
    fn labeled_requires_consistent_click_fields() {
        let mut l = LabeledImpression {
            label_id: LabeledImpression::label_id_for(7, "ad1"),
            serve_id: 7,
            ad_id: "ad1".into(),
            campaign_id: "c1".into(),
            position: 2,
            context: ctx(),
            clicked: true,
            ts_ms: 1_700_000_000_000,
            click_ts_ms: None,
            kind: LabelKind::Label,
        };
        assert_eq!(l.validate().unwrap_err().field, "click_ts_ms");
        l.click_ts_ms = Some(1_700_000_000_500);
        assert!(l.validate().is_ok());
        l.label_id = "x".into();
        assert_eq!(l.validate().unwrap_err().field, "label_id");
        l.kind = LabelKind::LateClick;
        l.label_id = LabeledImpression::late_click_id_for(7, "ad1");
        assert!(l.validate().is_ok());
    }
}

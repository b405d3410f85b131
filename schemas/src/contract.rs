//! Contracts between the services other than the events themselves: Kafka header names and
//! the dead-letter headers, the joiner's signal to the scorer, and the Redis key layout. Each
//! is written once here and used by its writer and its readers, so they cannot drift apart.

/// Kafka header names.
pub mod headers {
    /// On every label the joiner emits: `1` clicked (a click or a late-click correction), `0`
    /// not clicked. An overloaded scorer drops negatives unread by it.
    pub const CLICKED: &str = "ctr.clicked";
    /// On every label the joiner emits: the position the ad was shown at (decimal, 1 = top).
    /// An overloaded scorer drops negatives unread per ad and position, so that a kept one
    /// stands for negatives of its own slot; a label without it is grouped by ad alone.
    pub const POSITION: &str = "ctr.position";
    /// On a dead letter: why the record was not used.
    pub const REASON: &str = "ctr.reason";
    /// On a dead letter: the topic the record came from.
    pub const SOURCE_TOPIC: &str = "ctr.source_topic";
    /// On a dead letter: the partition it came from.
    pub const SOURCE_PARTITION: &str = "ctr.source_partition";
    /// On a dead letter: its offset there (absent when the record was not read from a topic
    /// as it is, e.g. an orphan click the joiner gives up on after its window).
    pub const SOURCE_OFFSET: &str = "ctr.source_offset";

    /// The [`CLICKED`] value for a label.
    pub fn clicked_value(clicked: bool) -> &'static str {
        if clicked { "1" } else { "0" }
    }
}

/// Where a dead letter came from and why: the headers every service puts on one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter<'a> {
    /// The topic of the record.
    pub source_topic: &'a str,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset, when it was read as it is.
    pub source_offset: Option<i64>,
    /// Why it was not used (one line, for people).
    pub reason: &'a str,
}

impl DeadLetter<'_> {
    /// The headers, as (name, value) pairs in a fixed order.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            (headers::SOURCE_TOPIC, self.source_topic.to_string()),
            (headers::SOURCE_PARTITION, self.source_partition.to_string()),
        ];
        if let Some(offset) = self.source_offset {
            h.push((headers::SOURCE_OFFSET, offset.to_string()));
        }
        h.push((headers::REASON, self.reason.to_string()));
        h
    }
}

/// Counters of a joiner (per partition in its state; summed per process in its signal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinStats {
    /// Distinct serves.
    pub serves: u64,
    /// Serves seen again (same serve ID).
    pub duplicate_serves: u64,
    /// Clicks (duplicates included).
    pub clicks: u64,
    /// Positive labels emitted.
    pub positives: u64,
    /// Negative labels emitted.
    pub negatives: u64,
    /// Clicks on a (serve, ad) already clicked.
    pub duplicate_clicks: u64,
    /// Clicks after the window closed (a late-click correction, at most one per (serve, ad)).
    pub late_clicks: u64,
    /// Clicks whose serve the joiner never saw.
    pub orphan_clicks: u64,
    /// Clicks on an ad the serve did not show.
    pub invalid_clicks: u64,
    /// Pending serves closed early because the bound on pending serves was reached.
    pub evicted: u64,
}

impl JoinStats {
    /// Adds `o` to these counters.
    pub fn add(&mut self, o: &JoinStats) {
        self.serves += o.serves;
        self.duplicate_serves += o.duplicate_serves;
        self.clicks += o.clicks;
        self.positives += o.positives;
        self.negatives += o.negatives;
        self.duplicate_clicks += o.duplicate_clicks;
        self.late_clicks += o.late_clicks;
        self.orphan_clicks += o.orphan_clicks;
        self.invalid_clicks += o.invalid_clicks;
        self.evicted += o.evicted;
    }

    /// What happened since `earlier` (a previous reading of the same counters).
    pub fn since(&self, earlier: &JoinStats) -> JoinStats {
        JoinStats {
            serves: self.serves - earlier.serves,
            duplicate_serves: self.duplicate_serves - earlier.duplicate_serves,
            clicks: self.clicks - earlier.clicks,
            positives: self.positives - earlier.positives,
            negatives: self.negatives - earlier.negatives,
            duplicate_clicks: self.duplicate_clicks - earlier.duplicate_clicks,
            late_clicks: self.late_clicks - earlier.late_clicks,
            orphan_clicks: self.orphan_clicks - earlier.orphan_clicks,
            invalid_clicks: self.invalid_clicks - earlier.invalid_clicks,
            evicted: self.evicted - earlier.evicted,
        }
    }

    /// Share of clicks that matched a serve in time (positives), of all clicks that were not
    /// duplicates. `None` before any click.
    pub fn click_coverage(&self) -> Option<f64> {
        let judged = self.positives + self.late_clicks + self.orphan_clicks + self.invalid_clicks;
        (judged > 0).then(|| self.positives as f64 / judged as f64)
    }
}

/// What each joiner process publishes every second (JSON, one field per process in the hash
/// at [`keys::joiner_signal`]); the scorer's learning guard and dashboard read it. Every field
/// is required: a joiner and a scorer that disagree on it fail loudly (the scorer ignores an
/// unreadable signal, logging why), never by defaulting a missing field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JoinerSignal {
    /// Whether the click stream looks stalled (learning must pause).
    pub stalled: bool,
    /// Why, for people.
    pub reason: Option<String>,
    /// Share of recent clicks that matched a serve in time.
    pub click_coverage: Option<f64>,
    /// Serves in the detector's window.
    pub window_serves: u64,
    /// Clicks in the detector's window.
    pub window_clicks: u64,
    /// Clicks per serve in the window.
    pub clicks_per_serve: Option<f64>,
    /// The long-run clicks per serve of healthy windows.
    pub baseline_clicks_per_serve: Option<f64>,
    /// The joiner's wall clock when it wrote this (Unix ms); readers ignore old signals.
    pub updated_ms: i64,
    /// The process's counts since it started.
    pub totals: JoinStats,
}

/// A signal older than this (by its `updated_ms`) is ignored: its joiner is gone.
pub const JOINER_SIGNAL_FRESH_MS: i64 = 30_000;

/// The Redis key layout, `<prefix>` first (default `ctr:`). IDs and context values never
/// contain `:`, `|` or `=` (the event contract enforces it), so keys parse back unambiguously.
///
/// Hash tags (the part in braces) say which keys Redis Cluster keeps in one slot, as a
/// script or a multi-key command needs them: a labeled partition's write fence, model stream
/// and checkpoint share `{topic:partition}`; an ad's keys share `{ad}`; the scorers' health
/// reports share `{scorer}`. Redis takes the first `{...}` of a key as its tag, so braces in an
/// ID do not split an ad's keys (both start with `{` and the ID), and the prefix may not hold
/// braces. A single Redis ignores the braces: they are part of the name.
pub mod keys {
    /// Hash of the joiners' signals, one field per joiner process.
    pub fn joiner_signal(prefix: &str) -> String {
        format!("{prefix}signal:joiner")
    }

    /// A joiner group's checkpoint of a partition pair (serves and clicks partition `p`).
    pub fn joiner_checkpoint(prefix: &str, group: &str, serves_topic: &str, p: i32) -> String {
        format!("{prefix}feedback:ckpt:{group}:{serves_topic}:{p}")
    }

    /// The scorer's checkpoint of a labeled-topic partition.
    pub fn scorer_checkpoint(prefix: &str, topic: &str, p: i32) -> String {
        format!("{prefix}scorer:ckpt:{}", partition_tag(topic, p))
    }

    /// The last labeled offset of partition `p` applied to Redis (the write fence).
    pub fn offset_fence(prefix: &str, topic: &str, p: i32) -> String {
        format!("{prefix}offset:{}", partition_tag(topic, p))
    }

    /// The stream of the serving variant's deltas of partition `p`, for replicas.
    pub fn model_stream(prefix: &str, topic: &str, p: i32) -> String {
        format!("{prefix}model:{}", partition_tag(topic, p))
    }

    /// `{topic:p}`: the hash tag of a labeled partition's keys.
    fn partition_tag(topic: &str, p: i32) -> String {
        format!("{{{topic}:{p}}}")
    }

    /// A labeled partition's checkpoint, write fence and model stream, in that order (the
    /// keys that share its hash tag).
    pub fn partition_keys(prefix: &str, topic: &str, p: i32) -> [String; 3] {
        [
            scorer_checkpoint(prefix, topic, p),
            offset_fence(prefix, topic, p),
            model_stream(prefix, topic, p),
        ]
    }

    /// The names [`partition_keys`] had before the layout had hash tags
    /// (`<prefix>scorer:ckpt:<topic>:<p>`, ...), in the same order: an owner renames them on a
    /// single Redis before it first reads them.
    pub fn untagged_partition_keys(prefix: &str, topic: &str, p: i32) -> [String; 3] {
        [
            format!("{prefix}scorer:ckpt:{topic}:{p}"),
            format!("{prefix}offset:{topic}:{p}"),
            format!("{prefix}model:{topic}:{p}"),
        ]
    }

    /// An ad's estimate and totals over all contexts.
    pub fn ad(prefix: &str, ad_id: &str) -> String {
        format!("{prefix}ad:{{{ad_id}}}")
    }

    /// The ad of an [`ad`] key under `prefix` (`None` for any other key).
    pub fn ad_of_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(prefix)?
            .strip_prefix("ad:{")?
            .strip_suffix('}')
    }

    /// An ad's estimate and totals in one full context (`context_key` as
    /// [`crate::Context::key`] makes it).
    pub fn ad_context(prefix: &str, ad_id: &str, context_key: &str) -> String {
        format!("{prefix}adctx:{{{ad_id}}}:{context_key}")
    }

    /// One scorer process's health report.
    pub fn monitor_report(prefix: &str, instance: &str) -> String {
        format!("{prefix}monitor:{{scorer}}:{instance}")
    }

    /// The set of scorer processes that report (in the reports' slot: they are read together).
    pub fn monitor_set(prefix: &str) -> String {
        format!("{prefix}monitor:{{scorer}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_name_the_source_and_the_reason() {
        let dl = DeadLetter {
            source_topic: "ctr.labeled",
            source_partition: 3,
            source_offset: Some(17),
            reason: "undecodable: bad magic",
        };
        assert_eq!(
            dl.headers(),
            vec![
                ("ctr.source_topic", "ctr.labeled".to_string()),
                ("ctr.source_partition", "3".to_string()),
                ("ctr.source_offset", "17".to_string()),
                ("ctr.reason", "undecodable: bad magic".to_string()),
            ]
        );
        let orphan = DeadLetter {
            source_offset: None,
            ..dl
        };
        assert!(
            !orphan
                .headers()
                .iter()
                .any(|(k, _)| *k == headers::SOURCE_OFFSET)
        );
    }

    #[test]
    fn a_signal_missing_a_field_is_refused_not_defaulted() {
        let full = JoinerSignal {
            stalled: false,
            reason: None,
            click_coverage: Some(0.9),
            window_serves: 10,
            window_clicks: 1,
            clicks_per_serve: Some(0.1),
            baseline_clicks_per_serve: None,
            updated_ms: 5,
            totals: JoinStats::default(),
        };
        let json = serde_json::to_value(&full).unwrap();
        assert_eq!(
            serde_json::from_value::<JoinerSignal>(json.clone()).unwrap(),
            full
        );
        let mut partial = json;
        partial.as_object_mut().unwrap().remove("totals");
        assert!(serde_json::from_value::<JoinerSignal>(partial).is_err());
    }

    /// Redis Cluster's hash tag of `key`: between its first `{` and the next `}`, if not empty.
    fn hash_tag(key: &str) -> Option<&str> {
        let open = key.find('{')?;
        let close = key[open + 1..].find('}')?;
        Some(&key[open + 1..open + 1 + close]).filter(|t| !t.is_empty())
    }

    #[test]
    fn keys_written_together_share_a_hash_tag_and_an_ad_key_parses_back() {
        let p = "ctr:";
        // One partition's fence, model stream and checkpoint: the scripts name them together.
        let partition = keys::partition_keys(p, "ctr.labeled", 3);
        for k in &partition {
            assert_eq!(hash_tag(k), Some("ctr.labeled:3"), "{k}");
        }
        assert_eq!(partition[1], keys::offset_fence(p, "ctr.labeled", 3));
        assert_ne!(
            hash_tag(&keys::offset_fence(p, "ctr.labeled", 4)),
            hash_tag(&partition[0])
        );
        // An ad's keys, even with braces in its ID.
        for ad in ["ad-00017", "a{b", "a}b"] {
            let ad_key = keys::ad(p, ad);
            let tag = hash_tag(&ad_key);
            assert!(tag.is_some(), "{ad}");
            assert_eq!(
                hash_tag(&keys::ad_context(p, ad, "device=mobile|geo=US")),
                tag
            );
        }
        // The dashboard's reports and their set are read together.
        assert_eq!(
            hash_tag(&keys::monitor_report(p, "host-1")),
            hash_tag(&keys::monitor_set(p))
        );
        assert_eq!(
            keys::ad_of_key(p, &keys::ad(p, "ad-00017")),
            Some("ad-00017")
        );
        assert_eq!(
            keys::ad_of_key(p, &keys::ad_context(p, "ad-1", "geo=US")),
            None
        );
        assert_eq!(keys::ad_of_key("other:", &keys::ad(p, "ad-1")), None);
    }
}

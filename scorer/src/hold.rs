//! Clicks held until the negatives of their time have arrived (pure).
//!
//! The joiner emits a positive label as soon as its click arrives, but a serve's negatives
//! only once its attribution window and grace have closed, ~35 s of event time later. Learning
//! labels as they come would at every moment hold the clicks of the last 35 s without their
//! impressions, so every rise in traffic (the first minutes after a start, a new ad, a burst)
//! would look like a rise in CTR. Measured in the demo before this module existed: the serving
//! count model's calibration (Σp/Σy) was 5 over its first minute and 1.8–2.4 during the
//! simulator's traffic bursts.
//!
//! So a partition holds each positive until its *negative frontier*, the newest event time of
//! a negative label it has seen, reaches the positive's event time (its serve's time): by then
//! the joiner has emitted the negatives of the serves before it, and the positive is learned
//! together with them, in event-time order. The exact totals count the click at once (Redis
//! `clicks` moves within a second, see `state`); the estimates take it in once its impressions
//! are known. That is a deliberate trade of up to window + grace of pCTR freshness for
//! calibration.
//!
//! Bounds, so that no click waits for ever: a positive is released once it is more than
//! [`MAX_HOLD_MS`] of event time older than the newest positive (negatives stopped coming: a
//! stalled joiner partition, an ad alone in its partition clicked every time), and at most
//! [`MAX_HELD`] wait (the oldest go first). Everything is decided by the records in order, so
//! the held clicks are part of the checkpointed state and a restore continues exactly.

use std::collections::BTreeMap;

use ctr_schemas::LabeledImpression;
use serde::{Deserialize, Serialize};

/// Longest a click waits behind the newest click, in event time: well past the joiner's
/// default window + grace (35 s).
pub const MAX_HOLD_MS: i64 = 120_000;
/// Most clicks held at once per partition (about 400 bytes each).
pub const MAX_HELD: usize = 100_000;

/// The positives of one partition waiting for their negatives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// Newest event time of a negative label seen.
    frontier_ms: Option<i64>,
    /// Newest event time of a positive label held.
    newest_ms: Option<i64>,
    /// Waiting positives by (event time, arrival number): released oldest first.
    waiting: BTreeMap<(i64, u64), LabeledImpression>,
    arrivals: u64,
}

impl Held {
    /// Holds positive `l` until it is due.
    pub fn hold(&mut self, l: LabeledImpression) {
        self.newest_ms = Some(self.newest_ms.map_or(l.ts_ms, |n| n.max(l.ts_ms)));
        self.waiting.insert((l.ts_ms, self.arrivals), l);
        self.arrivals += 1;
    }

    /// A negative label of event time `ts_ms` was seen.
    pub fn saw_negative(&mut self, ts_ms: i64) {
        self.frontier_ms = Some(self.frontier_ms.map_or(ts_ms, |f| f.max(ts_ms)));
    }

    /// The oldest held positive, if it is due: its negatives' time has come, or a bound says
    /// it has waited enough.
    pub fn pop_due(&mut self) -> Option<LabeledImpression> {
        let (&(ts, _), _) = self.waiting.first_key_value()?;
        let covered = self.frontier_ms.is_some_and(|f| ts <= f);
        let too_old = self.newest_ms.is_some_and(|n| n - ts > MAX_HOLD_MS);
        if covered || too_old || self.waiting.len() > MAX_HELD {
            self.waiting.pop_first().map(|(_, l)| l)
        } else {
            None
        }
    }

    /// Positives waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// No click waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctr_schemas::{Context, LabelKind};

    fn click(ts: i64) -> LabeledImpression {
        LabeledImpression {
            label_id: format!("{ts}:a"),
            serve_id: ts,
            ad_id: "a".into(),
            campaign_id: "c".into(),
            position: 1,
            context: Context {
                query_category: "q".into(),
                geo: "US".into(),
                device: "mobile".into(),
                extra: Default::default(),
            },
            clicked: true,
            ts_ms: ts,
            click_ts_ms: Some(ts + 1_000),
            kind: LabelKind::Label,
        }
    }

    fn drain(h: &mut Held) -> Vec<i64> {
        std::iter::from_fn(|| h.pop_due())
            .map(|l| l.ts_ms)
            .collect()
    }

    #[test]
    fn a_click_waits_for_the_negatives_of_its_time_and_leaves_in_time_order() {
        let mut h = Held::default();
        for ts in [5_000, 1_000, 3_000] {
            h.hold(click(ts));
        }
        assert!(drain(&mut h).is_empty(), "no negative seen yet");
        h.saw_negative(2_000);
        assert_eq!(drain(&mut h), [1_000]);
        h.saw_negative(1_500);
        assert!(drain(&mut h).is_empty(), "the frontier never moves back");
        h.saw_negative(5_000);
        assert_eq!(drain(&mut h), [3_000, 5_000]);
        assert!(h.is_empty());
    }

    #[test]
    fn no_click_waits_for_ever() {
        let mut h = Held::default();
        h.hold(click(0));
        h.hold(click(MAX_HOLD_MS));
        assert!(drain(&mut h).is_empty());
        h.hold(click(MAX_HOLD_MS + 1));
        assert_eq!(
            drain(&mut h),
            [0],
            "older than the newest click by more than the bound"
        );
        let mut full = Held::default();
        for ts in 0..=MAX_HELD as i64 {
            full.hold(click(ts));
        }
        assert_eq!(
            drain(&mut full),
            [0],
            "beyond the count bound the oldest goes"
        );
        assert_eq!(full.len(), MAX_HELD);
    }
}

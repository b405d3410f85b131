//! The impression–click join as a pure state machine for one partition pair.
//!
//! Serves and clicks are both keyed by serve ID, so partition `p` of the serves topic and
//! partition `p` of the clicks topic hold everything one join needs; a [`PartitionJoin`] owns
//! that pair. It does no I/O and reads no clock: wall-clock time comes in as an argument, so the
//! live service and a backtest feed it the same events and get the same labels. It is
//! serializable: the service checkpoints it together with the input offsets.
//!
//! Rules (after Facebook's online joiner, ADKDD 2014):
//! - **Positive**: a click on an ad of a pending serve, no later than `window_ms` after the
//!   serve, emits a positive label at once (fresh learning).
//! - **Negative**: a serve stays pending until the watermark passes `ts + window_ms +
//!   grace_ms`; then every ad still unclicked gets its negative label. Never earlier.
//! - **Watermark**: the minimum over the two streams of the largest event time seen, minus
//!   `max_out_of_order_ms`. Only times strictly below it are complete.
//! - **Idle streams**: when a stream has had no events for `idle_ms` of wall-clock time, its
//!   event time is taken to advance with the wall clock from then on, so an idle partition (or
//!   the end of a finite stream) still closes windows. A stream that has never delivered
//!   counts as having delivered at the partition's first event and been idle since (a
//!   partition with serves but no clicks yet still closes its windows, at the pace of the
//!   wall clock; a stream whose first fetch comes seconds after the other's, as at the start
//!   of a replay, finds its partner still waiting). This is the only place wall-clock time
//!   enters; a replay that does not pause produces exactly the labels of the live run. After
//!   a restore from a checkpoint the idle timers restart ([`PartitionJoin::resume`]).
//! - **Duplicates**: a second click on an ad already labeled positive (same click ID or not)
//!   counts once; a serve delivered twice is joined once.
//! - **Late clicks**: a click on a known serve that can no longer make a positive (the serve
//!   has closed, or the click is more than `window_ms` after the serve) is *late*: counted, and
//!   emitted once per (serve, ad) as a `LATE_CLICK` correction (label ID `serve:ad:late`) that
//!   the scorer may apply or ignore. Closed serves are remembered for `late_horizon_ms` of
//!   event time for this.
//! - **Orphans**: a click whose serve is unknown (never arrived, or closed longer ago than the
//!   late horizon) is an orphan, returned for the dead-letter topic. A click that arrives before
//!   its serve waits until the watermark passes its own time; its serve, being earlier, would
//!   have arrived by then.
//! - **Bounded memory**: at most `max_pending` serves wait; beyond that the serve with the
//!   earliest close time is closed early (its negatives emitted now, counted as `evicted`); a
//!   click for it then becomes a late correction. Likewise at most `max_pending` serves' early
//!   clicks wait; beyond that the earliest are orphans now. Nothing is dropped.
//!
//! Memory per pending serve: the decoded [`Serve`] behind an `Arc` (labels share it instead of
//! copying its strings) plus a map slot and a heap entry: about 220 bytes resident for a serve
//! of three ads (docs/BENCHMARKS.md).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use ctr_schemas::{Click, LabelKind, LabeledImpression, LabeledImpressionRef, Serve};
use serde::{Deserialize, Serialize};

/// Join settings, all times in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinConfig {
    /// Attribution window: a click counts if it comes no later than this after its serve.
    pub window_ms: i64,
    /// Extra event time a serve stays open after its window, for clicks still in flight.
    pub grace_ms: i64,
    /// Bounded out-of-orderness of event times within and across the two streams.
    pub max_out_of_order_ms: i64,
    /// Wall-clock silence after which a stream counts as idle (see module docs).
    pub idle_ms: i64,
    /// How long a closed serve is remembered, for late-click corrections.
    pub late_horizon_ms: i64,
    /// Most pending serves before the earliest is closed early; also the most serves whose
    /// clicks came first may wait for them before the earliest clicks are orphans.
    pub max_pending: usize,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self {
            window_ms: 30_000,
            grace_ms: 5_000,
            max_out_of_order_ms: 2_000,
            idle_ms: 5_000,
            late_horizon_ms: 300_000,
            max_pending: 2_000_000,
        }
    }
}

/// What the join produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit {
    /// A positive or negative label (kind `LABEL`).
    Label(LabelRef),
    /// A late-click correction (kind `LATE_CLICK`).
    Correction(LabelRef),
    /// A click whose serve is unknown, for the dead-letter topic.
    Orphan(Click),
}

/// A label as the join emits it: its serve (shared, not copied), which ad, and the outcome.
/// Emitting one allocates nothing; [`LabelRef::view`] borrows it as a
/// [`LabeledImpressionRef`] for encoding, [`LabelRef::to_labeled`] makes an owned copy.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRef {
    serve: Arc<Serve>,
    index: u8,
    click_ts_ms: Option<i64>,
    kind: LabelKind,
}

impl LabelRef {
    /// The serve's ID.
    pub fn serve_id(&self) -> i64 {
        self.serve.serve_id
    }

    /// The ad shown.
    pub fn ad_id(&self) -> &str {
        &self.serve.ads[usize::from(self.index)].ad_id
    }

    /// The position the ad was shown at (1 = top).
    pub fn position(&self) -> i32 {
        self.serve.ads[usize::from(self.index)].position
    }

    /// Whether a click was joined.
    pub fn clicked(&self) -> bool {
        self.click_ts_ms.is_some()
    }

    /// A label, or a late-click correction.
    pub fn kind(&self) -> LabelKind {
        self.kind
    }

    /// Event time of the serve.
    pub fn ts_ms(&self) -> i64 {
        self.serve.ts_ms
    }

    /// Writes the deterministic label ID into `buf` (cleared first).
    pub fn write_label_id(&self, buf: &mut String) {
        use std::fmt::Write;
        buf.clear();
        let _ = write!(buf, "{}:{}", self.serve.serve_id, self.ad_id());
        if self.kind == LabelKind::LateClick {
            buf.push_str(":late");
        }
    }

    /// The label, borrowed; `label_id` must hold [`LabelRef::write_label_id`]'s output.
    pub fn view<'a>(&'a self, label_id: &'a str) -> LabeledImpressionRef<'a> {
        let ad = &self.serve.ads[usize::from(self.index)];
        LabeledImpressionRef {
            label_id,
            serve_id: self.serve.serve_id,
            ad_id: &ad.ad_id,
            campaign_id: &ad.campaign_id,
            position: ad.position,
            context: &self.serve.context,
            clicked: self.clicked(),
            ts_ms: self.serve.ts_ms,
            click_ts_ms: self.click_ts_ms,
            kind: self.kind,
        }
    }

    /// The labeled impression to produce.
    pub fn to_labeled(&self) -> LabeledImpression {
        let mut id = String::new();
        self.write_label_id(&mut id);
        self.view(&id).to_owned()
    }
}

/// Counters for one partition's join: the contract's type, because the joiner's signal
/// carries them to the scorer.
pub use ctr_schemas::contract::JoinStats;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tracked {
    serve: Arc<Serve>,
    /// Bit i: ads[i] has a positive label.
    clicked: u64,
    /// Bit i: ads[i] has a late-click correction.
    late: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamClock {
    max_ts: Option<i64>,
    last_arrival_wall: i64,
}

impl StreamClock {
    fn observe(&mut self, ts: i64, wall: i64) {
        self.max_ts = Some(self.max_ts.map_or(ts, |m| m.max(ts)));
        self.last_arrival_wall = wall;
    }

    /// Event time of this stream, advanced by wall-clock time spent idle beyond `idle_ms`.
    fn effective(&self, wall: i64, idle_ms: i64) -> Option<i64> {
        let idle_credit = (wall - self.last_arrival_wall - idle_ms).max(0);
        self.max_ts.map(|t| t.saturating_add(idle_credit))
    }
}

/// The join state of one serves/clicks partition pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionJoin {
    cfg: JoinConfig,
    pending: HashMap<i64, Tracked>,
    /// (close time, serve ID) of pending serves: which closes next. Ties break by ID.
    closing: BinaryHeap<Reverse<(i64, i64)>>,
    /// Recently closed serves, for late corrections; forgotten in close order.
    closed: HashMap<i64, Tracked>,
    forgetting: VecDeque<(i64, i64)>,
    /// Clicks that arrived before their serve, by serve ID, and when each expires.
    early: HashMap<i64, Vec<Click>>,
    early_expiry: BinaryHeap<Reverse<(i64, i64)>>,
    serves_clock: StreamClock,
    clicks_clock: StreamClock,
    /// When a stream that has never delivered counts as having gone idle: the partition's
    /// first event (or its creation or resume, until then).
    first_event_wall: i64,
    stats: JoinStats,
    /// Event time of the partition's first event: where a stream that has never delivered
    /// counts as having been. Last, so a checkpoint from before it existed decodes with
    /// `None` appended ([`crate::checkpoint`]).
    first_event_ts: Option<i64>,
}

impl PartitionJoin {
    /// An empty join of one partition, with its idle timers started at `now_wall_ms`.
    pub fn new(cfg: JoinConfig, now_wall_ms: i64) -> Self {
        Self {
            cfg,
            pending: HashMap::new(),
            closing: BinaryHeap::new(),
            closed: HashMap::new(),
            forgetting: VecDeque::new(),
            early: HashMap::new(),
            early_expiry: BinaryHeap::new(),
            serves_clock: StreamClock {
                max_ts: None,
                last_arrival_wall: now_wall_ms,
            },
            clicks_clock: StreamClock {
                max_ts: None,
                last_arrival_wall: now_wall_ms,
            },
            first_event_wall: now_wall_ms,
            stats: JoinStats::default(),
            first_event_ts: None,
        }
    }

    /// Call after restoring from a checkpoint: the time the process was down is not idleness
    /// of the streams (their events are still in Kafka), so the idle timers restart now.
    pub fn resume(&mut self, now_wall_ms: i64) {
        self.serves_clock.last_arrival_wall = now_wall_ms;
        self.clicks_clock.last_arrival_wall = now_wall_ms;
        self.first_event_wall = now_wall_ms;
        // A checkpoint from before the first event's time was kept: the stream that has
        // delivered stands in for it.
        if self.first_event_ts.is_none() {
            self.first_event_ts = self.serves_clock.max_ts.or(self.clicks_clock.max_ts);
        }
    }

    /// The join's counters so far.
    pub fn stats(&self) -> JoinStats {
        self.stats
    }

    /// Serves waiting for their window to close.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Closed serves remembered for late corrections.
    pub fn remembered(&self) -> usize {
        self.closed.len()
    }

    /// The current watermark, if both streams (or an idle one) allow one yet.
    pub fn watermark(&self, now_wall_ms: i64) -> Option<i64> {
        let idle = self.cfg.idle_ms;
        let s = self.serves_clock.effective(now_wall_ms, idle);
        let c = self.clicks_clock.effective(now_wall_ms, idle);
        let min = match (s, c) {
            (Some(s), Some(c)) => s.min(c),
            // A stream that has never delivered counts as having delivered the partition's
            // first event and been idle since: it holds the other back for `idle_ms`, then
            // lets the watermark move with the wall clock from there (a partition with serves
            // but no clicks yet still closes its windows).
            (Some(t), None) | (None, Some(t)) => {
                if now_wall_ms - self.first_event_wall < idle {
                    return None;
                }
                let quiet = StreamClock {
                    max_ts: self.first_event_ts,
                    last_arrival_wall: self.first_event_wall,
                };
                // The first event's time is known once a stream has delivered (set then, or
                // by `resume` for an older checkpoint); `t` only stands in for safety.
                t.min(quiet.effective(now_wall_ms, idle).unwrap_or(t))
            }
            (None, None) => return None,
        };
        Some(min - self.cfg.max_out_of_order_ms)
    }

    /// The partition's first event starts the wait for the stream that has not delivered
    /// yet, and is where that stream counts as having been. Timed from the partition's
    /// creation instead, a join started before its producers would take the first fetch of
    /// one stream for all there is; and once the wait was over, letting the delivered stream
    /// alone set the watermark did the same to a stream whose first fetch came later than
    /// `idle_ms` after the other's (a consumer does not start fetching a just-created topic's
    /// partitions all at once). With a backlog replayed, one fetch spans minutes of event
    /// time: the clicks whose serves were in a later fetch became orphans and their serves'
    /// labels negatives.
    fn note_first_event(&mut self, ts: i64, now_wall_ms: i64) {
        if self.serves_clock.max_ts.is_none() && self.clicks_clock.max_ts.is_none() {
            self.first_event_wall = now_wall_ms;
            self.first_event_ts = Some(ts);
        }
    }

    /// Accepts a validated serve.
    pub fn on_serve(&mut self, serve: Serve, now_wall_ms: i64, out: &mut Vec<Emit>) {
        self.stats.serves += 1;
        self.note_first_event(serve.ts_ms, now_wall_ms);
        self.serves_clock.observe(serve.ts_ms, now_wall_ms);
        let id = serve.serve_id;
        if self.pending.contains_key(&id) || self.closed.contains_key(&id) {
            // Re-delivered (producer retry, replay overlap): its labels are owed once.
            self.stats.duplicate_serves += 1;
            return;
        }
        let close_at = serve
            .ts_ms
            .saturating_add(self.cfg.window_ms + self.cfg.grace_ms);
        self.pending.insert(
            id,
            Tracked {
                serve: Arc::new(serve),
                clicked: 0,
                late: 0,
            },
        );
        self.closing.push(Reverse((close_at, id)));
        if let Some(clicks) = self.early.remove(&id) {
            for click in clicks {
                self.match_click(&click, out);
            }
        }
        while self.pending.len() > self.cfg.max_pending {
            let Some(Reverse((_, victim))) = self.closing.pop() else {
                break;
            };
            self.stats.evicted += 1;
            self.close(victim, out);
        }
        self.advance(now_wall_ms, out);
    }

    /// Accepts a validated click.
    pub fn on_click(&mut self, click: Click, now_wall_ms: i64, out: &mut Vec<Emit>) {
        self.stats.clicks += 1;
        self.note_first_event(click.ts_ms, now_wall_ms);
        self.clicks_clock.observe(click.ts_ms, now_wall_ms);
        if self.pending.contains_key(&click.serve_id) || self.closed.contains_key(&click.serve_id) {
            self.match_click(&click, out);
        } else if self
            .watermark(now_wall_ms)
            .is_some_and(|wm| click.ts_ms < wm)
        {
            self.stats.orphan_clicks += 1;
            out.push(Emit::Orphan(click));
        } else {
            self.early_expiry
                .push(Reverse((click.ts_ms, click.serve_id)));
            self.early.entry(click.serve_id).or_default().push(click);
            // Bounded like the pending serves: beyond `max_pending` serves' worth of early
            // clicks (clicks stamped far ahead of their serves' stream), the earliest go to
            // the dead letters now rather than waiting for a watermark that may never come.
            while self.early.len() > self.cfg.max_pending && self.orphan_earliest_early(out) {}
        }
        self.advance(now_wall_ms, out);
    }

    /// Joins a click to its serve, pending or recently closed.
    fn match_click(&mut self, click: &Click, out: &mut Vec<Emit>) {
        let window = self.cfg.window_ms;
        let (t, is_pending) = match self.pending.get_mut(&click.serve_id) {
            Some(t) => (t, true),
            None => (
                self.closed
                    .get_mut(&click.serve_id)
                    .expect("caller checked"),
                false,
            ),
        };
        let Some(i) = t.serve.ads.iter().position(|a| a.ad_id == click.ad_id) else {
            self.stats.invalid_clicks += 1;
            return;
        };
        let bit = 1u64 << i;
        if t.clicked & bit != 0 || t.late & bit != 0 {
            self.stats.duplicate_clicks += 1;
            return;
        }
        if is_pending && click.ts_ms - t.serve.ts_ms <= window {
            t.clicked |= bit;
            self.stats.positives += 1;
            out.push(Emit::Label(label(
                &t.serve,
                i,
                Some(click.ts_ms),
                LabelKind::Label,
            )));
        } else {
            t.late |= bit;
            self.stats.late_clicks += 1;
            out.push(Emit::Correction(label(
                &t.serve,
                i,
                Some(click.ts_ms),
                LabelKind::LateClick,
            )));
        }
    }

    /// Emits the negatives of a pending serve and moves it to the closed memory.
    fn close(&mut self, id: i64, out: &mut Vec<Emit>) {
        let Some(t) = self.pending.remove(&id) else {
            return;
        };
        for i in 0..t.serve.ads.len() {
            if t.clicked & (1 << i) == 0 {
                self.stats.negatives += 1;
                out.push(Emit::Label(label(&t.serve, i, None, LabelKind::Label)));
            }
        }
        let forget_at = t
            .serve
            .ts_ms
            .saturating_add(self.cfg.window_ms + self.cfg.grace_ms + self.cfg.late_horizon_ms);
        self.forgetting.push_back((forget_at, id));
        self.closed.insert(id, t);
        // The closed memory is bounded like the pending set.
        while self.closed.len() > self.cfg.max_pending {
            match self.forgetting.pop_front() {
                Some((_, old)) => {
                    self.closed.remove(&old);
                }
                None => break,
            }
        }
    }

    /// The early clicks of the serve whose earliest click is the earliest waiting become
    /// orphans (none if they have joined their serve since); false when none wait.
    fn orphan_earliest_early(&mut self, out: &mut Vec<Emit>) -> bool {
        let Some(Reverse((_, serve_id))) = self.early_expiry.pop() else {
            return false;
        };
        if let Some(clicks) = self.early.remove(&serve_id) {
            self.stats.orphan_clicks += clicks.len() as u64;
            out.extend(clicks.into_iter().map(Emit::Orphan));
        }
        true
    }

    /// Closes every window the watermark has passed, expires early clicks and forgets old
    /// closed serves. Call on a timer too, so idle partitions make progress.
    pub fn advance(&mut self, now_wall_ms: i64, out: &mut Vec<Emit>) {
        let Some(wm) = self.watermark(now_wall_ms) else {
            return;
        };
        while let Some(&Reverse((close_at, id))) = self.closing.peek() {
            if close_at >= wm {
                break;
            }
            self.closing.pop();
            self.close(id, out);
        }
        while self
            .early_expiry
            .peek()
            .is_some_and(|&Reverse((ts, _))| ts < wm)
        {
            self.orphan_earliest_early(out);
        }
        while let Some(&(forget_at, id)) = self.forgetting.front() {
            if forget_at >= wm {
                break;
            }
            self.forgetting.pop_front();
            self.closed.remove(&id);
        }
    }
}

fn label(serve: &Arc<Serve>, i: usize, click_ts_ms: Option<i64>, kind: LabelKind) -> LabelRef {
    // Serves hold at most 64 ads (validated), so the index fits.
    LabelRef {
        serve: Arc::clone(serve),
        index: i as u8,
        click_ts_ms,
        kind,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ctr_schemas::{AdShown, Context};

    const CFG: JoinConfig = JoinConfig {
        window_ms: 1_000,
        grace_ms: 0,
        max_out_of_order_ms: 100,
        idle_ms: 5_000,
        late_horizon_ms: 10_000,
        max_pending: 1_000,
    };

    pub(crate) fn serve(id: i64, ts: i64, ads: &[&str]) -> Serve {
        Serve {
            serve_id: id,
            ts_ms: ts,
            context: Context {
                query_category: "q".into(),
                geo: "g".into(),
                device: "d".into(),
                extra: Default::default(),
            },
            ads: ads
                .iter()
                .enumerate()
                .map(|(i, a)| AdShown {
                    ad_id: (*a).into(),
                    campaign_id: "c".into(),
                    position: i as i32 + 1,
                    bid: 1.0,
                })
                .collect(),
        }
    }

    pub(crate) fn click(id: i64, serve_id: i64, ad: &str, ts: i64) -> Click {
        Click {
            click_id: id,
            serve_id,
            ad_id: ad.into(),
            ts_ms: ts,
        }
    }

    /// (serve, ad, clicked, kind) of labels and corrections; "orphan" rows for orphans.
    fn rows(out: &[Emit]) -> Vec<(i64, String, bool, &'static str)> {
        out.iter()
            .map(|e| match e {
                Emit::Label(l) => (l.serve_id(), l.ad_id().to_string(), l.clicked(), "label"),
                Emit::Correction(l) => (l.serve_id(), l.ad_id().to_string(), l.clicked(), "late"),
                Emit::Orphan(c) => (c.serve_id, c.ad_id.clone(), true, "orphan"),
            })
            .collect()
    }

    fn row(
        s: i64,
        ad: &str,
        clicked: bool,
        kind: &'static str,
    ) -> (i64, String, bool, &'static str) {
        (s, ad.to_string(), clicked, kind)
    }

    #[test]
    fn positive_at_once_negative_only_after_window() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a", "b"]), 0, &mut out);
        j.on_click(click(9, 1, "b", 10_500), 0, &mut out);
        assert_eq!(rows(&out), vec![row(1, "b", true, "label")]);
        // Watermark exactly at the close time: an event at 11_000 could still come. Not yet.
        j.on_serve(serve(3, 11_100, &["c"]), 0, &mut out);
        j.on_click(click(11, 3, "zz", 11_100), 0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            j.stats().invalid_clicks,
            1,
            "click on an ad the serve did not show"
        );
        j.on_serve(serve(4, 11_101, &["c"]), 0, &mut out);
        j.on_click(click(12, 4, "c", 11_101), 0, &mut out);
        assert_eq!(
            rows(&out)[1..],
            [row(4, "c", true, "label"), row(1, "a", false, "label")]
        );
    }

    #[test]
    fn duplicate_clicks_count_once() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_click(click(1, 1, "a", 10_100), 0, &mut out);
        j.on_click(click(1, 1, "a", 10_100), 0, &mut out);
        j.on_click(click(2, 1, "a", 10_200), 0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(j.stats().duplicate_clicks, 2);
    }

    #[test]
    fn click_before_its_serve_still_matches() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_click(click(1, 2, "b", 10_300), 0, &mut out);
        j.on_serve(serve(2, 10_200, &["b"]), 0, &mut out);
        assert_eq!(rows(&out), vec![row(2, "b", true, "label")]);
    }

    #[test]
    fn late_clicks_become_one_correction_each() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a", "b"]), 0, &mut out);
        // Beyond the window while still pending: late at once.
        j.on_click(click(1, 1, "a", 11_050), 0, &mut out);
        assert_eq!(rows(&out), vec![row(1, "a", true, "late")]);
        // Close the serve: both negatives, then a click on b after close is a correction.
        j.on_serve(serve(2, 12_000, &["x"]), 0, &mut out);
        j.on_click(click(2, 2, "x", 12_000), 0, &mut out);
        assert_eq!(
            rows(&out)[1..],
            [
                row(2, "x", true, "label"),
                row(1, "a", false, "label"),
                row(1, "b", false, "label")
            ]
        );
        j.on_click(click(3, 1, "b", 10_900), 0, &mut out);
        j.on_click(click(4, 1, "b", 10_950), 0, &mut out);
        assert_eq!(rows(&out)[4..], [row(1, "b", true, "late")]);
        let s = j.stats();
        assert_eq!((s.late_clicks, s.duplicate_clicks), (2, 1));
        let Emit::Correction(c) = &out[4] else {
            panic!()
        };
        let c = c.to_labeled();
        assert_eq!(c.label_id, "1:b:late");
        c.validate().unwrap();
    }

    #[test]
    fn clicks_fetched_before_their_serves_wait_for_them_at_start() {
        // Up for longer than idle_ms with nothing (started before its producers), then a
        // fetch of clicks spanning 9 s of event time arrives just before the fetch of their
        // serves, as when a backlog is replayed.
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        let wall = 60_000;
        for i in 0..10 {
            j.on_click(click(i, 100 + i, "a", 20_000 + i * 1_000), wall, &mut out);
        }
        for i in 0..10 {
            j.on_serve(
                serve(100 + i, 19_900 + i * 1_000, &["a"]),
                wall + 5,
                &mut out,
            );
        }
        j.advance(wall + 10_000, &mut out);
        assert_eq!(j.stats().orphan_clicks, 0, "{:?}", rows(&out));
        let mut labels = rows(&out);
        labels.sort();
        let expected: Vec<_> = (0..10).map(|i| row(100 + i, "a", true, "label")).collect();
        assert_eq!(labels, expected, "every serve labeled positive, once");
        // The wait is bounded: a serve whose clicks never come still closes after idle_ms.
        j.on_serve(serve(200, 40_000, &["b"]), wall + 20_000, &mut out);
        j.advance(wall + 20_000 + 5_000 + 1_101, &mut out);
        assert!(rows(&out).contains(&row(200, "b", false, "label")));
    }

    /// A replayed backlog where one stream's first fetch comes `delay` ms of wall time after
    /// the other's: 60 serves 1 s of event time apart (a minute), each clicked 300 ms later,
    /// all of one stream delivered at once, then all of the other. Returns the rows emitted
    /// once both streams have gone idle.
    fn one_stream_fetched_late(
        clicks_first: bool,
        delay: i64,
    ) -> (Vec<(i64, String, bool, &'static str)>, JoinStats) {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        let serves = |j: &mut PartitionJoin, wall, out: &mut Vec<Emit>| {
            for i in 0..60 {
                j.on_serve(serve(100 + i, 10_000 + i * 1_000, &["a"]), wall, out);
            }
        };
        let clicks = |j: &mut PartitionJoin, wall, out: &mut Vec<Emit>| {
            for i in 0..60 {
                j.on_click(click(i, 100 + i, "a", 10_300 + i * 1_000), wall, out);
            }
        };
        let (first, then): (&dyn Fn(_, _, _), &dyn Fn(_, _, _)) = if clicks_first {
            (&clicks, &serves)
        } else {
            (&serves, &clicks)
        };
        let wall = 100_000;
        first(&mut j, wall, &mut out);
        for t in (wall..wall + delay).step_by(200) {
            j.advance(t, &mut out); // the service's ticker
        }
        then(&mut j, wall + delay, &mut out);
        j.advance(wall + delay + 100_000, &mut out);
        (rows(&out), j.stats())
    }

    #[test]
    fn a_stream_fetched_seconds_after_the_other_at_start_loses_no_click() {
        let expected: Vec<_> = (0..60).map(|i| row(100 + i, "a", true, "label")).collect();
        // Shorter than idle_ms (5 s), and just past it: the first fetch of a just-created
        // topic's partition can come seconds after the other topic's. Before, once idle_ms
        // had passed, the stream that had delivered set the watermark alone, and all of its
        // minute of event time was taken as complete: every click orphaned (clicks first), or
        // every serve closed as a negative and its click a late correction (serves first).
        for clicks_first in [true, false] {
            for delay in [1_000, 5_100] {
                let (mut labels, stats) = one_stream_fetched_late(clicks_first, delay);
                labels.sort();
                assert_eq!(
                    (stats.orphan_clicks, stats.late_clicks),
                    (0, 0),
                    "clicks first: {clicks_first}, delay {delay}: {labels:?}"
                );
                assert_eq!(
                    labels, expected,
                    "clicks first: {clicks_first}, delay {delay}"
                );
            }
        }
        // Later than that, the silent stream counts as idle since the first event, like any
        // stream silent for longer than idle_ms: 8 s credit it with 3 s of event time, so the
        // clicks of the first 2.9 s (three) are orphans; the rest of the minute waits.
        let (_, stats) = one_stream_fetched_late(true, 8_000);
        assert_eq!((stats.orphan_clicks, stats.positives), (3, 57));
    }

    #[test]
    fn early_clicks_are_bounded_like_pending_serves() {
        // Clicks stamped far in the future (a producer's broken clock) wait for a watermark
        // that will not pass them for years; at most max_pending serves' worth do.
        let cfg = JoinConfig {
            max_pending: 3,
            ..CFG
        };
        let mut j = PartitionJoin::new(cfg, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        let year_3000 = 32_503_680_000_000;
        for i in 0..5 {
            j.on_click(click(i, 100 + i, "a", year_3000 + i), 0, &mut out);
        }
        assert_eq!(
            rows(&out),
            [row(100, "a", true, "orphan"), row(101, "a", true, "orphan")]
        );
        assert_eq!(j.stats().orphan_clicks, 2);
        // The ones kept still join if their serves come.
        j.on_serve(serve(104, year_3000, &["a"]), 0, &mut out);
        assert!(rows(&out).contains(&row(104, "a", true, "label")));
    }

    #[test]
    fn unknown_serves_make_orphans() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_click(click(1, 1, "a", 10_000), 0, &mut out);
        // A click for serve 99 that never comes: waits, then is an orphan when the watermark
        // passes its time.
        j.on_click(click(2, 99, "a", 10_100), 0, &mut out);
        assert_eq!(out.len(), 1);
        j.on_serve(serve(3, 10_300, &["a"]), 0, &mut out);
        j.on_click(click(3, 3, "a", 10_300), 0, &mut out);
        assert!(rows(&out).contains(&row(99, "a", true, "orphan")));
        // Known long ago, forgotten after the late horizon: like any click without a serve, it
        // waits for the watermark to pass its time, then is an orphan.
        j.advance(100_000, &mut out);
        assert_eq!(j.remembered(), 0);
        j.on_click(click(5, 1, "a", 10_500), 100_000, &mut out);
        j.advance(200_000, &mut out);
        assert_eq!(j.stats().orphan_clicks, 2);
    }

    #[test]
    fn idle_streams_advance_with_the_wall_clock() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.advance(4_000, &mut out);
        assert!(
            out.is_empty(),
            "clicks never seen, not yet idle long enough"
        );
        // Idle 5 s, then 1.1 s more of wall time pushes the watermark past 11_000.
        j.advance(5_000 + 1_100, &mut out);
        assert!(out.is_empty());
        j.advance(5_000 + 1_101, &mut out);
        assert_eq!(rows(&out), vec![row(1, "a", false, "label")]);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn resume_restarts_idle_timers() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_click(click(1, 1, "a", 10_000), 0, &mut out);
        // Down for an hour: without resume the hour would count as idle time.
        j.resume(3_600_000);
        j.advance(3_600_000 + 1_000, &mut out);
        assert_eq!(j.pending(), 1, "downtime is not idleness");
    }

    #[test]
    fn redelivered_serve_is_labeled_once() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        // Closed (watermark 19_900 > 11_000) but still remembered (until 21_000).
        j.advance(15_000, &mut out);
        assert_eq!(j.remembered(), 1);
        j.on_serve(serve(1, 10_000, &["a"]), 15_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(j.stats().duplicate_serves, 2);
    }

    #[test]
    fn cap_closes_the_oldest_early_and_loses_nothing() {
        let mut j = PartitionJoin::new(
            JoinConfig {
                max_pending: 2,
                ..CFG
            },
            0,
        );
        let mut out = vec![];
        for i in 0..4 {
            j.on_serve(serve(i + 1, 10_000 + i, &["a"]), 0, &mut out);
        }
        assert_eq!(j.pending(), 2);
        assert_eq!(j.stats().evicted, 2);
        assert_eq!(
            rows(&out),
            vec![row(1, "a", false, "label"), row(2, "a", false, "label")]
        );
        // A click for an evicted serve is not lost: it becomes a correction.
        j.on_click(click(9, 1, "a", 10_050), 0, &mut out);
        assert_eq!(rows(&out)[2], row(1, "a", true, "late"));
    }
}

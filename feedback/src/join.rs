//! The impression–click join as a pure state machine for one partition pair.
//!
//! Serves and clicks are both keyed by serve ID, so partition `p` of the serves topic and
//! partition `p` of the clicks topic hold everything one join needs; a [`PartitionJoin`] owns
//! that pair. It does no I/O and reads no clock: wall-clock time comes in as an argument, so the
//! live service and a backtest feed it the same events and get the same labels.
//!
//! Rules (Facebook's online joiner, simplified for the walking skeleton):
//! - A click on an ad of a pending serve, no later than `window_ms` after the serve, emits a
//!   positive label at once (fresh learning); further clicks on that ad are duplicates.
//! - A serve's window closes when the watermark passes `serve.ts_ms + window_ms`; every ad
//!   still unclicked then gets its negative label. A negative is never emitted earlier.
//! - The watermark is the minimum over the two streams of the largest event time seen, minus
//!   `max_out_of_order_ms`: neither stream may close a window the other has not reached. An
//!   event *at* the watermark may still arrive; only times strictly below it are complete.
//! - Idleness: when a stream has had no events for `idle_ms` of wall-clock time, its event
//!   time is taken to advance with the wall clock from then on, so an idle partition (or the
//!   end of a finite stream) still closes windows. This is the only place wall-clock time
//!   enters; replays that do not pause produce exactly the labels of the live run.
//! - A click whose serve has not arrived waits until the watermark passes the click's own time
//!   (its serve, being earlier, would have arrived by then); then it is unmatched. A click after
//!   its serve's window is also unmatched. (Late-click corrections and orphan dead-lettering
//!   come with the full joiner.)

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use ctr_schemas::{Click, LabeledImpression, Serve};

/// Join settings, all in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinConfig {
    /// Attribution window: a click counts if it comes no later than this after its serve.
    pub window_ms: i64,
    /// Bounded out-of-orderness of event times within and across the two streams.
    pub max_out_of_order_ms: i64,
    /// Wall-clock silence after which a stream counts as idle (see module docs).
    pub idle_ms: i64,
}

/// Counters for one partition's join.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinStats {
    pub serves: u64,
    pub clicks: u64,
    pub positives: u64,
    pub negatives: u64,
    pub duplicate_clicks: u64,
    pub unmatched_clicks: u64,
}

#[derive(Debug)]
struct PendingServe {
    serve: Serve,
    /// Bit i set = ads[i] has its label (positive) already. Serves hold at most 64 ads.
    clicked: u64,
}

#[derive(Debug, Clone, Copy, Default)]
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
#[derive(Debug)]
pub struct PartitionJoin {
    cfg: JoinConfig,
    pending: HashMap<i64, PendingServe>,
    /// (close time, serve ID): which window closes next. Ties break by ID, deterministically.
    closing: BinaryHeap<Reverse<(i64, i64)>>,
    /// Clicks that arrived before their serve, by serve ID.
    early: HashMap<i64, Vec<Click>>,
    early_expiry: BinaryHeap<Reverse<(i64, i64)>>,
    serves_clock: StreamClock,
    clicks_clock: StreamClock,
    created_wall: i64,
    stats: JoinStats,
}

impl PartitionJoin {
    pub fn new(cfg: JoinConfig, now_wall_ms: i64) -> Self {
        Self {
            cfg,
            pending: HashMap::new(),
            closing: BinaryHeap::new(),
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
            created_wall: now_wall_ms,
            stats: JoinStats::default(),
        }
    }

    pub fn stats(&self) -> JoinStats {
        self.stats
    }

    /// Serves waiting for their window to close.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The current watermark, if both streams (or an idle one) allow one yet.
    pub fn watermark(&self, now_wall_ms: i64) -> Option<i64> {
        let idle = self.cfg.idle_ms;
        let s = self.serves_clock.effective(now_wall_ms, idle);
        let c = self.clicks_clock.effective(now_wall_ms, idle);
        let started_idle = now_wall_ms - self.created_wall >= idle;
        let min = match (s, c) {
            (Some(s), Some(c)) => s.min(c),
            // A stream that has never delivered anything does not hold the other back for
            // longer than the idle timeout (a partition with serves but no clicks yet).
            (Some(t), None) | (None, Some(t)) if started_idle => t,
            _ => return None,
        };
        Some(min - self.cfg.max_out_of_order_ms)
    }

    /// Accepts a validated serve. Labels for its ads come from later calls.
    pub fn on_serve(&mut self, serve: Serve, now_wall_ms: i64, out: &mut Vec<LabeledImpression>) {
        self.stats.serves += 1;
        self.serves_clock.observe(serve.ts_ms, now_wall_ms);
        let id = serve.serve_id;
        if self.pending.contains_key(&id) {
            // A re-delivered serve (producer retry, replay overlap): its labels are already
            // owed once; keep the first.
            return;
        }
        let close_at = serve.ts_ms.saturating_add(self.cfg.window_ms);
        self.pending.insert(id, PendingServe { serve, clicked: 0 });
        self.closing.push(Reverse((close_at, id)));
        if let Some(clicks) = self.early.remove(&id) {
            for click in clicks {
                self.match_click(&click, out);
            }
        }
        self.advance(now_wall_ms, out);
    }

    /// Accepts a validated click.
    pub fn on_click(&mut self, click: Click, now_wall_ms: i64, out: &mut Vec<LabeledImpression>) {
        self.stats.clicks += 1;
        self.clicks_clock.observe(click.ts_ms, now_wall_ms);
        if self.pending.contains_key(&click.serve_id) {
            self.match_click(&click, out);
        } else if self
            .watermark(now_wall_ms)
            .is_some_and(|wm| click.ts_ms < wm)
        {
            self.stats.unmatched_clicks += 1;
        } else {
            self.early_expiry
                .push(Reverse((click.ts_ms, click.serve_id)));
            self.early.entry(click.serve_id).or_default().push(click);
        }
        self.advance(now_wall_ms, out);
    }

    fn match_click(&mut self, click: &Click, out: &mut Vec<LabeledImpression>) {
        let p = self
            .pending
            .get_mut(&click.serve_id)
            .expect("caller checked");
        let Some(i) = p.serve.ads.iter().position(|a| a.ad_id == click.ad_id) else {
            self.stats.unmatched_clicks += 1;
            return;
        };
        if click.ts_ms - p.serve.ts_ms > self.cfg.window_ms {
            self.stats.unmatched_clicks += 1;
            return;
        }
        if p.clicked & (1 << i) != 0 {
            self.stats.duplicate_clicks += 1;
            return;
        }
        p.clicked |= 1 << i;
        self.stats.positives += 1;
        out.push(label(&p.serve, i, Some(click.ts_ms)));
    }

    /// Closes every window the watermark has passed and expires early clicks; call on a timer
    /// too, so idle partitions make progress.
    pub fn advance(&mut self, now_wall_ms: i64, out: &mut Vec<LabeledImpression>) {
        let Some(wm) = self.watermark(now_wall_ms) else {
            return;
        };
        while let Some(&Reverse((close_at, id))) = self.closing.peek() {
            if close_at >= wm {
                break;
            }
            self.closing.pop();
            if let Some(p) = self.pending.remove(&id) {
                for i in 0..p.serve.ads.len() {
                    if p.clicked & (1 << i) == 0 {
                        self.stats.negatives += 1;
                        out.push(label(&p.serve, i, None));
                    }
                }
            }
        }
        while let Some(&Reverse((ts, serve_id))) = self.early_expiry.peek() {
            if ts >= wm {
                break;
            }
            self.early_expiry.pop();
            if let Some(clicks) = self.early.remove(&serve_id) {
                self.stats.unmatched_clicks += clicks.len() as u64;
            }
        }
    }
}

fn label(serve: &Serve, i: usize, click_ts_ms: Option<i64>) -> LabeledImpression {
    let ad = &serve.ads[i];
    LabeledImpression {
        label_id: LabeledImpression::label_id_for(serve.serve_id, &ad.ad_id),
        serve_id: serve.serve_id,
        ad_id: ad.ad_id.clone(),
        campaign_id: ad.campaign_id.clone(),
        position: ad.position,
        context: serve.context.clone(),
        clicked: click_ts_ms.is_some(),
        ts_ms: serve.ts_ms,
        click_ts_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctr_schemas::{AdShown, Context};

    const CFG: JoinConfig = JoinConfig {
        window_ms: 1_000,
        max_out_of_order_ms: 100,
        idle_ms: 5_000,
    };

    fn serve(id: i64, ts: i64, ads: &[&str]) -> Serve {
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

    fn click(id: i64, serve_id: i64, ad: &str, ts: i64) -> Click {
        Click {
            click_id: id,
            serve_id,
            ad_id: ad.into(),
            ts_ms: ts,
        }
    }

    fn labels(out: &[LabeledImpression]) -> Vec<(i64, &str, bool)> {
        out.iter()
            .map(|l| (l.serve_id, l.ad_id.as_str(), l.clicked))
            .collect()
    }

    #[test]
    fn positive_at_once_negative_only_after_window() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a", "b"]), 0, &mut out);
        j.on_click(click(9, 1, "b", 10_500), 0, &mut out);
        assert_eq!(labels(&out), vec![(1, "b", true)]);
        // Both streams at 11_050: watermark 10_950 < close at 11_000: no negative yet.
        j.on_serve(serve(2, 11_050, &["c"]), 0, &mut out);
        j.on_click(click(10, 2, "c", 11_050), 0, &mut out);
        assert_eq!(out.len(), 2);
        // Watermark exactly at the close time: an event at 11_000 could still come. Not yet.
        j.on_serve(serve(3, 11_100, &["c"]), 0, &mut out);
        j.on_click(click(11, 3, "zz", 11_100), 0, &mut out);
        assert_eq!(out.len(), 2);
        j.on_serve(serve(4, 11_101, &["c"]), 0, &mut out);
        j.on_click(click(12, 4, "c", 11_101), 0, &mut out);
        assert_eq!(labels(&out)[2..], [(4, "c", true), (1, "a", false)]);
        assert_eq!(
            j.stats().unmatched_clicks,
            1,
            "click on an ad the serve did not show"
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
        assert_eq!(labels(&out), vec![(2, "b", true)]);
    }

    #[test]
    fn click_after_window_is_unmatched_and_serve_is_negative() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_click(click(1, 1, "a", 11_001), 0, &mut out);
        assert!(out.is_empty());
        assert_eq!(j.stats().unmatched_clicks, 1);
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
        assert_eq!(labels(&out), vec![(1, "a", false)]);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn redelivered_serve_is_labeled_once() {
        let mut j = PartitionJoin::new(CFG, 0);
        let mut out = vec![];
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.on_serve(serve(1, 10_000, &["a"]), 0, &mut out);
        j.advance(100_000, &mut out);
        assert_eq!(out.len(), 1);
    }
}

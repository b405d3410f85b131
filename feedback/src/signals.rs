//! Signals for the scorer: click coverage and a click-stream stall detector.
//!
//! Facebook's joiner lesson: if clicks stop arriving (a broken click logger, a stuck
//! partition) while serves keep flowing, every impression turns into a negative and the models
//! learn that nobody clicks. The detector watches a sliding wall-clock window of the joiner's
//! own counters and declares a stall when at least `min_serves` serves arrived in it and either
//! no click arrived, or clicks per serve fell below `collapse_ratio` × the long-run rate (an
//! exponentially weighted mean over healthy windows).
//!
//! Published every second, two ways:
//! - Redis hash `<prefix>signal:joiner`, one field per joiner process, value the JSON of
//!   [`JoinerSignal`] (the contract in `ctr-schemas`). The scorer treats the click stream as
//!   stalled when any entry updated in the last 30 s says so.
//! - Prometheus gauges `ctr_feedback_click_stream_stalled` and `ctr_feedback_click_coverage`.

use std::collections::VecDeque;
use std::time::Instant;

pub use ctr_schemas::contract::JoinerSignal;

use crate::config::StallConfig;
use crate::join::JoinStats;

/// Sliding-window stall detector over monotonic counters.
#[derive(Debug)]
pub struct StallDetector {
    cfg: StallConfig,
    samples: VecDeque<(Instant, u64, u64)>,
    baseline: Option<f64>,
}

impl StallDetector {
    /// A detector with no samples yet.
    pub fn new(cfg: StallConfig) -> Self {
        Self {
            cfg,
            samples: VecDeque::new(),
            baseline: None,
        }
    }

    /// Takes the lifetime totals at `now` and returns the current signal.
    pub fn observe(&mut self, now: Instant, now_ms: i64, totals: &JoinStats) -> JoinerSignal {
        self.samples.push_back((now, totals.serves, totals.clicks));
        while self.samples.len() > 1 && now.duration_since(self.samples[0].0) > self.cfg.window {
            self.samples.pop_front();
        }
        let (_, s0, c0) = self.samples[0];
        let (serves, clicks) = (totals.serves - s0, totals.clicks - c0);
        let rate = (serves > 0).then(|| clicks as f64 / serves as f64);
        let judged = serves >= self.cfg.min_serves;
        let reason = match (judged, rate, self.baseline) {
            (true, _, _) if clicks == 0 => Some(format!(
                "no clicks in the last {} s while {serves} serves arrived",
                self.cfg.window.as_secs()
            )),
            (true, Some(r), Some(b)) if r < self.cfg.collapse_ratio * b => {
                Some(format!("clicks per serve fell to {r:.5} (long-run {b:.5})"))
            }
            _ => None,
        };
        // Learn the baseline only from healthy, judged windows.
        if let (true, None, Some(r)) = (judged, &reason, rate) {
            self.baseline = Some(self.baseline.map_or(r, |b| 0.95 * b + 0.05 * r));
        }
        JoinerSignal {
            stalled: reason.is_some(),
            reason,
            click_coverage: totals.click_coverage(),
            window_serves: serves,
            window_clicks: clicks,
            clicks_per_serve: rate,
            baseline_clicks_per_serve: self.baseline,
            updated_ms: now_ms,
            totals: *totals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> StallConfig {
        StallConfig {
            window: Duration::from_secs(10),
            min_serves: 100,
            collapse_ratio: 0.2,
        }
    }

    fn totals(serves: u64, clicks: u64) -> JoinStats {
        JoinStats {
            serves,
            clicks,
            ..JoinStats::default()
        }
    }

    #[test]
    fn healthy_then_silent_clicks_then_recovery() {
        let mut d = StallDetector::new(cfg());
        let t0 = Instant::now();
        let (mut s, mut c) = (0, 0);
        for sec in 0..30 {
            s += 100;
            c += 5;
            let sig = d.observe(t0 + Duration::from_secs(sec), 0, &totals(s, c));
            assert!(!sig.stalled, "healthy at {sec}: {sig:?}");
        }
        // Clicks stop, serves go on: first the rate collapses (the window still holds a few
        // old clicks), then the window holds none.
        let mut stalled_at = None;
        let mut last = None;
        for sec in 30..50 {
            s += 100;
            let sig = d.observe(t0 + Duration::from_secs(sec), 0, &totals(s, c));
            if sig.stalled && stalled_at.is_none() {
                stalled_at = Some(sec);
            }
            last = Some(sig);
        }
        assert!(matches!(stalled_at, Some(38..=41)), "{stalled_at:?}");
        assert!(last.unwrap().reason.unwrap().contains("no clicks"));
        for sec in 50..62 {
            s += 100;
            c += 5;
            let sig = d.observe(t0 + Duration::from_secs(sec), 0, &totals(s, c));
            if sec >= 51 {
                assert!(!sig.stalled, "recovered at {sec}");
            }
        }
    }

    #[test]
    fn collapse_is_detected_and_quiet_traffic_is_not_judged() {
        let mut d = StallDetector::new(cfg());
        let t0 = Instant::now();
        let (mut s, mut c) = (0, 0);
        for sec in 0..30 {
            s += 100;
            c += 5;
            d.observe(t0 + Duration::from_secs(sec), 0, &totals(s, c));
        }
        let mut last = None;
        for sec in 30..45 {
            s += 100;
            c += u64::from(sec % 5 == 0); // a fifth of a click per second: 0.002 per serve
            last = Some(d.observe(t0 + Duration::from_secs(sec), 0, &totals(s, c)));
        }
        let last = last.unwrap();
        assert!(
            last.stalled && last.reason.as_deref().unwrap().contains("fell"),
            "{last:?}"
        );

        let mut quiet = StallDetector::new(cfg());
        let sig = quiet.observe(t0, 0, &totals(50, 0));
        assert!(!sig.stalled, "50 serves is too few to judge");
    }
}

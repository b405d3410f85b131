//! Load shedding: the governor that sets the keep-rate of negatives and the thinning factor
//! every worker reads per record ([`crate::load::Control`]).
//!
//! Overload is judged from two signals against configured bounds: how full the workers'
//! queues are (the input outruns the workers) and the consumer lag per partition (the input
//! is piling up in the broker). The queues decide: at 80% full the scorer is overloaded; a lag
//! above its bound makes it overloaded from 50% full. A lag with near-empty queues is not
//! overload the workers cause (a slow broker, a backlog still being fetched), and learning
//! less would not reduce it. The [`Governor`] turns this into the keep-rate of negatives:
//! multiplicative decrease while overloaded, multiplicative increase once the queues are
//! below half full and the lag below half its bound (a drained queue with a backlog still in
//! the broker is not recovery), and exactly 1 (nothing shed) when there is no overload. The
//! lag is the high watermark minus the position handed to the scorer, per partition. The rate
//! and every shed record are exported (`ctr_scorer_negative_keep_rate`,
//! `ctr_scorer_records_total{outcome="shed"}`).
//!
//! Two stages, and only negatives are ever shed: clicks are always learned and counted.
//! 1. **Learning**: negatives are sampled before learning, each kept one carrying the
//!    importance weight 1/rate ([`crate::state::Sampler`]). Every record is still decoded,
//!    deduplicated and counted, so the published totals stay exact.
//! 2. **Whole events**: when the keep-rate is at its floor and the scorer is still
//!    overloaded, the consumer keeps one in `k` negatives of each ad and position and drops
//!    the others before decoding ([`crate::state::Thinning`], decided from the message key
//!    and the `ctr.clicked` and `ctr.position` headers the joiner sets); the kept one stands
//!    for `k` in the totals and in learning. Totals are then exact but for each ad's
//!    unfinished groups (fewer than `k` negatives per position; forgotten when a partition
//!    moves, since its dropped records after the last commit are read again), and dropped
//!    records escape dedupe. `k` doubles per step up to `--max-thinning` (`ctr_scorer_thinning_factor`);
//!    on recovery stage two is undone first. Records without `ctr.clicked` are never
//!    dropped.
//!
//! Both stages group negatives by ad *and position*: a kept negative carries its own
//! position into the models, so it must stand for negatives of that position only (see
//! `state::shedding_group`).
//!

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::load::{Control, next_tick};

/// The two-stage controller (pure): the keep-rate of negatives for learning, then the
/// thinning factor of whole negative events.
#[derive(Debug, Clone)]
pub struct Governor {
    rate: f64,
    min_rate: f64,
    thinning: u32,
    max_thinning: u32,
    lag_bound: i64,
}

impl Governor {
    /// Queue fill at or above this is overload.
    pub const QUEUE_HIGH: f64 = 0.8;
    /// Below this (and lag below half its bound) the rate recovers.
    pub const QUEUE_LOW: f64 = 0.5;

    /// A governor at full rate, shedding nothing, until the load says otherwise.
    pub fn new(min_rate: f64, max_thinning: u32, lag_bound: i64) -> Self {
        Self {
            rate: 1.0,
            min_rate,
            thinning: 1,
            max_thinning: max_thinning.max(1),
            lag_bound,
        }
    }

    /// The keep-rate of negatives it set last (stage one).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The thinning factor it set last (stage two).
    pub fn thinning(&self) -> u32 {
        self.thinning
    }

    /// One control step from the fullest queue's fill (0..=1) and the largest lag; returns
    /// the keep-rate of negatives.
    pub fn step(&mut self, queue_fill: f64, max_lag: i64) -> f64 {
        let lagging = max_lag > self.lag_bound;
        if queue_fill >= Self::QUEUE_HIGH || (lagging && queue_fill >= Self::QUEUE_LOW) {
            if self.rate > self.min_rate {
                self.rate = (self.rate * 0.5).max(self.min_rate);
            } else {
                self.thinning = (self.thinning * 2).min(self.max_thinning);
            }
        } else if queue_fill < Self::QUEUE_LOW && max_lag <= self.lag_bound / 2 {
            if self.thinning > 1 {
                self.thinning = (f64::from(self.thinning) / 1.5).floor().max(1.0) as u32;
            } else {
                self.rate = (self.rate * 1.25).min(1.0);
                if self.rate > 0.99 {
                    self.rate = 1.0;
                }
            }
        }
        self.rate
    }
}

/// Runs the governor every 250 ms until `stop`: `fill` reports the fullest worker queue.
pub async fn govern(
    control: std::sync::Arc<Control>,
    mut governor: Governor,
    fill: impl Fn() -> f64,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while next_tick(&mut tick, &mut stop).await {
        let (f, lag) = (fill(), control.max_lag());
        let before = governor.rate();
        let rate = governor.step(f, lag);
        control.set_rate(rate);
        control.set_thinning(governor.thinning());
        metrics::gauge!("ctr_scorer_negative_keep_rate").set(rate);
        metrics::gauge!("ctr_scorer_thinning_factor").set(f64::from(governor.thinning()));
        metrics::gauge!("ctr_scorer_queue_fill").set(f);
        if (before == 1.0) != (rate == 1.0) {
            if rate < 1.0 {
                warn!(
                    queue_fill = f,
                    lag, rate, "overloaded: shedding negatives (importance-weighted)"
                );
            } else {
                info!("load back to normal: nothing shed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_overload_sheds_nothing() {
        let mut g = Governor::new(0.01, 20, 1_000);
        for _ in 0..100 {
            assert_eq!(g.step(0.79, 1_000), 1.0);
        }
    }

    #[test]
    fn overload_lowers_the_rate_to_the_floor_then_it_recovers_to_exactly_one() {
        let mut g = Governor::new(0.05, 20, 1_000);
        let mut last = 1.0;
        for _ in 0..50 {
            let r = g.step(0.95, 0);
            assert!(r <= last);
            last = r;
        }
        assert_eq!(last, 0.05);
        assert_eq!(
            g.thinning(),
            20,
            "stage two took over at the floor, up to max_thinning"
        );
        // Between the bounds the rate holds, unless the lag is over its bound.
        assert_eq!(g.step(0.6, 0), 0.05);
        let mut g2 = Governor::new(0.05, 20, 1_000);
        assert_eq!(g2.step(0.6, 500), 1.0);
        assert!(
            g2.step(0.6, 5_000) < 1.0,
            "lag with filling queues is overload"
        );
        let mut g3 = Governor::new(0.05, 20, 1_000);
        assert_eq!(
            g3.step(0.1, 1_000_000),
            1.0,
            "lag the workers do not cause is not"
        );
        g.step(0.1, 100);
        assert!(
            g.thinning() < 20 && g.rate() == 0.05,
            "stage two is undone first"
        );
        for _ in 0..50 {
            g.step(0.1, 100);
        }
        assert_eq!((g.rate(), g.thinning()), (1.0, 1));
    }
}

//! A simulated ad marketplace, deterministic by seed.
//!
//! Ads belong to campaigns; each has a base click-through rate, a favourite query category and a
//! device lean. A serve draws a context (query category, geo, device) and 1..=`max_ads` distinct
//! ads with Zipf-skewed popularity, shown at positions 1, 2, .... The true click probability of
//! an impression is
//!
//! ```text
//! base(ad) × category(ad, ctx) × device(ad, ctx) × position_bias(position)
//! ```
//!
//! and a click, if drawn, follows its serve after a delay within `[click_delay_min_ms,
//! click_delay_max_ms]`. Events come out in event-time order; the simulator runs on its own
//! clock, so the same seed and settings always give the same events, IDs included.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use ctr_schemas::{AdShown, Click, Context, IdGenerator, Serve};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Zipf};
use rand_pcg::Pcg64Mcg;

pub const CATEGORIES: &[&str] = &[
    "travel",
    "electronics",
    "finance",
    "fashion",
    "autos",
    "health",
    "food",
    "sports",
];
pub const GEOS: &[&str] = &["US", "DE", "FR", "JP", "BR", "IN"];
pub const DEVICES: &[&str] = &["mobile", "desktop", "tablet"];

/// Multiplier on the click probability by position (1 = top).
pub fn position_bias(position: i32) -> f64 {
    match position {
        1 => 1.0,
        2 => 0.7,
        3 => 0.5,
        4 => 0.4,
        _ => 0.3,
    }
}

/// Settings of one simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Number of distinct ads.
    pub ads: usize,
    /// Number of campaigns the ads are spread over.
    pub campaigns: usize,
    /// Most ads on one serve (each serve shows 1..=max_ads).
    pub max_ads: usize,
    /// Event time of the first serve, Unix ms.
    pub start_ms: i64,
    /// Serves per second of event time.
    pub serves_per_sec: f64,
    pub click_delay_min_ms: i64,
    pub click_delay_max_ms: i64,
    /// Shard of the ID generator (0..=1023); distinct simulators must use distinct shards.
    pub shard: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            ads: 200,
            campaigns: 40,
            max_ads: 4,
            start_ms: 1_760_000_000_000,
            serves_per_sec: 1_000.0,
            click_delay_min_ms: 500,
            click_delay_max_ms: 20_000,
            shard: 1,
        }
    }
}

#[derive(Debug, Clone)]
struct SimAd {
    ad_id: String,
    campaign_id: String,
    base_ctr: f64,
    favourite_category: usize,
    device_lean: [f64; 3],
    bid: f64,
}

/// An event in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum SimEvent {
    Serve(Serve),
    Click(Click),
}

/// What the simulator emitted, per ad: the ground truth an exact pipeline must reproduce.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmittedCounts {
    pub serves: u64,
    pub clicks: u64,
    /// ad_id → (impressions, clicked impressions).
    pub ads: BTreeMap<String, AdCounts>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdCounts {
    pub impressions: u64,
    pub clicks: u64,
}

/// A settings value the simulator cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Config(&'static str),
    #[error(transparent)]
    Shard(#[from] ctr_schemas::id::ShardOutOfRange),
}

/// The marketplace. An iterator of events in event-time order, endless unless limited.
#[derive(Debug)]
pub struct Simulator {
    cfg: SimConfig,
    rng: Pcg64Mcg,
    ads: Vec<SimAd>,
    popularity: Zipf<f64>,
    ids: IdGenerator,
    serves_emitted: u64,
    max_serves: Option<u64>,
    /// Clicks waiting for their event time, ordered by (ts, id).
    pending_clicks: BinaryHeap<Reverse<(i64, i64, String, i64)>>,
    counts: EmittedCounts,
}

impl Simulator {
    pub fn new(cfg: SimConfig, max_serves: Option<u64>) -> Result<Self, SimError> {
        if cfg.ads == 0 || cfg.campaigns == 0 || cfg.max_ads == 0 {
            return Err(SimError::Config(
                "ads, campaigns and max_ads must be at least 1",
            ));
        }
        if cfg.max_ads > cfg.ads {
            return Err(SimError::Config("max_ads must not exceed ads"));
        }
        if !(cfg.serves_per_sec.is_finite() && cfg.serves_per_sec > 0.0) {
            return Err(SimError::Config("serves_per_sec must be > 0"));
        }
        if cfg.click_delay_min_ms < 0 || cfg.click_delay_max_ms < cfg.click_delay_min_ms {
            return Err(SimError::Config(
                "need 0 <= click_delay_min_ms <= click_delay_max_ms",
            ));
        }
        let ids = IdGenerator::new(cfg.shard)?;
        let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed);
        // Base CTRs: log-normal around 2%, a realistic spread for search ads.
        let base = LogNormal::new((0.02f64).ln(), 0.5).expect("valid log-normal");
        let ads = (0..cfg.ads)
            .map(|i| SimAd {
                ad_id: format!("ad-{i:05}"),
                campaign_id: format!("camp-{:04}", i % cfg.campaigns),
                base_ctr: base.sample(&mut rng).min(0.2),
                favourite_category: rng.random_range(0..CATEGORIES.len()),
                device_lean: [
                    rng.random_range(0.7..1.3),
                    rng.random_range(0.7..1.3),
                    rng.random_range(0.7..1.3),
                ],
                bid: (rng.random_range(0.1f64..3.0) * 100.0).round() / 100.0,
            })
            .collect();
        let popularity = Zipf::new(cfg.ads as f64, 1.0).expect("valid Zipf");
        Ok(Self {
            cfg,
            rng,
            ads,
            popularity,
            ids,
            serves_emitted: 0,
            max_serves,
            pending_clicks: BinaryHeap::new(),
            counts: EmittedCounts::default(),
        })
    }

    /// Stops issuing serves; clicks already owed still come out, then the iterator ends.
    pub fn stop_serving(&mut self) {
        self.max_serves = Some(self.serves_emitted);
    }

    /// Counts of everything emitted so far.
    pub fn counts(&self) -> &EmittedCounts {
        &self.counts
    }

    /// The true click probability of `ad_index` at `position` in `ctx`.
    pub fn true_ctr(&self, ad_index: usize, ctx: &Context, position: i32) -> f64 {
        let ad = &self.ads[ad_index];
        let cat = if CATEGORIES[ad.favourite_category] == ctx.query_category {
            2.0
        } else {
            0.8
        };
        let dev = DEVICES
            .iter()
            .position(|d| *d == ctx.device)
            .map_or(1.0, |i| ad.device_lean[i]);
        (ad.base_ctr * cat * dev * position_bias(position)).min(0.9)
    }

    fn next_serve_ts(&self) -> i64 {
        self.cfg.start_ms + (self.serves_emitted as f64 * 1000.0 / self.cfg.serves_per_sec) as i64
    }

    fn make_serve(&mut self) -> Serve {
        let ts = self.next_serve_ts();
        let context = Context {
            query_category: CATEGORIES[self.rng.random_range(0..CATEGORIES.len())].to_string(),
            geo: GEOS[self.rng.random_range(0..GEOS.len())].to_string(),
            device: DEVICES[self.rng.random_range(0..DEVICES.len())].to_string(),
            extra: BTreeMap::new(),
        };
        let k = self.rng.random_range(1..=self.cfg.max_ads);
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        while chosen.len() < k {
            let idx = self.popularity.sample(&mut self.rng) as usize - 1;
            if !chosen.contains(&idx) {
                chosen.push(idx);
            }
        }
        let serve_id = self.ids.next_at(ts as u64);
        let mut ads = Vec::with_capacity(k);
        for (slot, &idx) in chosen.iter().enumerate() {
            let position = slot as i32 + 1;
            let p = self.true_ctr(idx, &context, position);
            let ad = &self.ads[idx];
            let entry = self.counts.ads.entry(ad.ad_id.clone()).or_default();
            entry.impressions += 1;
            if self.rng.random_bool(p) {
                entry.clicks += 1;
                let delay = self
                    .rng
                    .random_range(self.cfg.click_delay_min_ms..=self.cfg.click_delay_max_ms);
                let click_ts = ts + delay;
                let click_id = self.ids.next_at(click_ts as u64);
                self.pending_clicks
                    .push(Reverse((click_ts, click_id, ad.ad_id.clone(), serve_id)));
            }
            ads.push(AdShown {
                ad_id: ad.ad_id.clone(),
                campaign_id: ad.campaign_id.clone(),
                position,
                bid: ad.bid,
            });
        }
        self.serves_emitted += 1;
        self.counts.serves += 1;
        Serve {
            serve_id,
            ts_ms: ts,
            context,
            ads,
        }
    }

    fn pop_click(&mut self) -> SimEvent {
        let Reverse((ts_ms, click_id, ad_id, serve_id)) =
            self.pending_clicks.pop().expect("caller checked");
        self.counts.clicks += 1;
        SimEvent::Click(Click {
            click_id,
            serve_id,
            ad_id,
            ts_ms,
        })
    }
}

impl Iterator for Simulator {
    type Item = SimEvent;

    fn next(&mut self) -> Option<SimEvent> {
        let more_serves = self.max_serves.is_none_or(|m| self.serves_emitted < m);
        match self.pending_clicks.peek() {
            Some(Reverse((click_ts, ..))) if !more_serves || *click_ts <= self.next_serve_ts() => {
                Some(self.pop_click())
            }
            _ if more_serves => Some(SimEvent::Serve(self.make_serve())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, n: u64) -> (Vec<SimEvent>, EmittedCounts) {
        let mut sim = Simulator::new(
            SimConfig {
                seed,
                ..SimConfig::default()
            },
            Some(n),
        )
        .unwrap();
        let events: Vec<SimEvent> = sim.by_ref().collect();
        (events, sim.counts().clone())
    }

    fn ts(e: &SimEvent) -> i64 {
        match e {
            SimEvent::Serve(s) => s.ts_ms,
            SimEvent::Click(c) => c.ts_ms,
        }
    }

    #[test]
    fn same_seed_same_events() {
        assert_eq!(run(7, 500), run(7, 500));
        assert_ne!(run(7, 500).0, run(8, 500).0);
    }

    #[test]
    fn events_are_in_event_time_order_and_valid() {
        let (events, _) = run(1, 2_000);
        assert!(events.windows(2).all(|w| ts(&w[0]) <= ts(&w[1])));
        for e in &events {
            match e {
                SimEvent::Serve(s) => s.validate().unwrap(),
                SimEvent::Click(c) => c.validate().unwrap(),
            }
        }
    }

    #[test]
    fn counts_match_the_events() {
        let (events, counts) = run(3, 5_000);
        let mut impressions = 0;
        let mut clicks = 0;
        for e in &events {
            match e {
                SimEvent::Serve(s) => impressions += s.ads.len() as u64,
                SimEvent::Click(_) => clicks += 1,
            }
        }
        assert_eq!(counts.serves, 5_000);
        assert_eq!(counts.clicks, clicks);
        assert_eq!(
            counts.ads.values().map(|a| a.impressions).sum::<u64>(),
            impressions
        );
        assert_eq!(counts.ads.values().map(|a| a.clicks).sum::<u64>(), clicks);
        // Plausible marketplace: a CTR of a few percent overall.
        let ctr = clicks as f64 / impressions as f64;
        assert!((0.005..0.06).contains(&ctr), "overall CTR {ctr}");
    }

    #[test]
    fn bad_settings_are_errors() {
        let bad = SimConfig {
            serves_per_sec: 0.0,
            ..SimConfig::default()
        };
        assert!(Simulator::new(bad, None).is_err());
        let bad = SimConfig {
            max_ads: 500,
            ..SimConfig::default()
        };
        assert!(Simulator::new(bad, None).is_err());
        let bad = SimConfig {
            shard: 5000,
            ..SimConfig::default()
        };
        assert!(matches!(Simulator::new(bad, None), Err(SimError::Shard(_))));
    }
}

//! A simulated ad marketplace, deterministic by seed.
//!
//! Ads belong to campaigns; each has a base click-through rate, a favourite query category and a
//! device lean. A serve draws a context (query category, geo, device, and the hour of day of its
//! event time as the extra field `hour`) and 1..=`max_ads` distinct ads with Zipf-skewed
//! popularity, shown at positions 1, 2, .... The true click probability of an impression at
//! event time `t` is
//!
//! ```text
//! base(ad) × drift(ad, t) × daily(t) × category(ad, ctx) × device(ad, ctx) × position_bias(position)
//! ```
//!
//! - `drift`: each ad's CTR wanders, a mean-reverting random walk of its logarithm stepped once
//!   per simulated minute (`drift_per_hour` is the standard deviation per hour);
//! - `daily`: `1 + daily_amplitude × cos(2π (hour − 20) / 24)`, clicks peak in the evening;
//! - click delays are log-normal (median `click_delay_median_ms`, clamped to `[min, max]`), so
//!   most clicks come within seconds and a tail within minutes, some after the joiner's window;
//! - a share of clicks is sent twice (`duplicate_click_rate`, same click ID, up to 2 s apart),
//!   and some clicks name a serve that never existed (`orphan_click_rate` per serve);
//! - bursts: every `burst_every_ms` of event time, for `burst_len_ms`, serves come
//!   `burst_factor` times faster.
//!
//! Events come out in event-time order; the simulator runs on its own clock, so the same seed
//! and settings always give the same events, IDs included. The truth is available: the exact
//! click probability of every impression ([`Simulator::last_serve_truth`]) and what was emitted
//! per ad ([`EmittedCounts`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use ctr_schemas::{AdShown, Click, Context, IdGenerator, Serve};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal, Zipf};
use rand_pcg::Pcg64Mcg;

/// The query categories the simulator draws contexts from.
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
/// The geos it draws from.
pub const GEOS: &[&str] = &["US", "DE", "FR", "JP", "BR", "IN"];
/// The devices it draws from.
pub const DEVICES: &[&str] = &["mobile", "desktop", "tablet"];

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// Mean reversion of the drift per simulated minute: a deviation halves in about 4 hours.
const DRIFT_REVERSION: f64 = 1.0 / 360.0;

/// Ads' base click rates are log-normal with this median (capped at 0.2)...
pub const BASE_CTR_MEDIAN: f64 = 0.02;
/// ... and this standard deviation of their logarithm: a realistic spread for search ads.
pub const BASE_CTR_SIGMA: f64 = 0.5;
/// The `category` factor of the truth in the ad's favourite query category...
const FAVOURITE_CATEGORY_LIFT: f64 = 2.0;
/// ... and in every other category.
const OTHER_CATEGORY_LIFT: f64 = 0.8;

/// The `category` factor of the truth: the lift of the ad's favourite category, or of the
/// others.
pub fn category_lift(favourite: bool) -> f64 {
    if favourite {
        FAVOURITE_CATEGORY_LIFT
    } else {
        OTHER_CATEGORY_LIFT
    }
}

/// The ad index of a rank drawn from the popularity (Zipf ranks start at 1).
fn ad_of_rank(rank: f64) -> usize {
    rank as usize - 1
}

/// The `daily` factor of the truth at event time `ts_ms`: clicks peak at 20:00.
fn daily_factor(amplitude: f64, ts_ms: i64) -> f64 {
    let hour = ts_ms.rem_euclid(DAY_MS) as f64 / HOUR_MS as f64;
    1.0 + amplitude * (std::f64::consts::TAU * (hour - 20.0) / 24.0).cos()
}

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
    /// Seed of the marketplace; the same seed gives the same events.
    pub seed: u64,
    /// Number of distinct ads.
    pub ads: usize,
    /// Number of campaigns the ads are spread over.
    pub campaigns: usize,
    /// Most ads on one serve (each serve shows 1..=max_ads).
    pub max_ads: usize,
    /// Event time of the first serve, Unix ms.
    pub start_ms: i64,
    /// Serves per second of event time (outside bursts).
    pub serves_per_sec: f64,
    /// Shortest click delay, ms.
    pub click_delay_min_ms: i64,
    /// Median click delay, ms; capped at the geometric mean of min and max when larger.
    pub click_delay_median_ms: i64,
    /// Longest click delay, ms; beyond the joiner's window a click becomes a late correction.
    pub click_delay_max_ms: i64,
    /// Share of clicks sent twice (same click ID).
    pub duplicate_click_rate: f64,
    /// Clicks naming a serve that never existed, per serve.
    pub orphan_click_rate: f64,
    /// Amplitude of the daily CTR cycle (0 = none).
    pub daily_amplitude: f64,
    /// Standard deviation per hour of the log-CTR drift of each ad (0 = none).
    pub drift_per_hour: f64,
    /// Whether serves carry the hour of day as the context field `hour`.
    pub hour_context: bool,
    /// Event time between burst starts, ms (0 = no bursts).
    pub burst_every_ms: i64,
    /// Length of a burst, ms of event time.
    pub burst_len_ms: i64,
    /// Serve rate multiplier during a burst.
    pub burst_factor: f64,
    /// Shard of the ID generator (0..=1023); distinct simulators must use distinct shards.
    pub shard: u32,
}

impl Default for SimConfig {
    /// A plain marketplace: no drift, cycle, duplicates, orphans or bursts; tests switch on what
    /// they exercise, and `ctr-ingest simulate` switches on all of it by default.
    fn default() -> Self {
        Self {
            seed: 42,
            ads: 200,
            campaigns: 40,
            max_ads: 4,
            start_ms: 1_760_000_000_000,
            serves_per_sec: 1_000.0,
            click_delay_min_ms: 500,
            click_delay_median_ms: 4_000,
            click_delay_max_ms: 20_000,
            duplicate_click_rate: 0.0,
            orphan_click_rate: 0.0,
            daily_amplitude: 0.0,
            drift_per_hour: 0.0,
            hour_context: false,
            burst_every_ms: 0,
            burst_len_ms: 0,
            burst_factor: 1.0,
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
    /// A serve.
    Serve(Serve),
    /// A click.
    Click(Click),
}

/// What the simulator emitted, per ad: the ground truth an exact pipeline must reproduce.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmittedCounts {
    /// Serves emitted.
    pub serves: u64,
    /// Distinct clicks on shown ads (duplicates and orphans not included).
    pub clicks: u64,
    /// Second sends of a click (same click ID).
    #[serde(default)]
    pub duplicate_clicks: u64,
    /// Clicks on serves that never existed.
    #[serde(default)]
    pub orphan_clicks: u64,
    /// ad_id → (impressions, clicked impressions).
    pub ads: BTreeMap<String, AdCounts>,
}

/// One ad's emitted impressions and clicks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdCounts {
    /// Impressions (ads shown on serves).
    pub impressions: u64,
    /// Distinct clicks on them.
    pub clicks: u64,
}

/// A settings value the simulator cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A setting out of range.
    #[error("{0}")]
    Config(&'static str),
    /// An ID generator shard above 1023.
    #[error(transparent)]
    Shard(#[from] ctr_schemas::id::ShardOutOfRange),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClickKind {
    True,
    Duplicate,
    Orphan,
}

/// A click waiting for its event time; ordered by (time, issue order).
#[derive(Debug, PartialEq, Eq)]
struct Pending {
    ts_ms: i64,
    seq: u64,
    kind: ClickKind,
    click: Click,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.ts_ms, self.seq).cmp(&(other.ts_ms, other.seq))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The marketplace. An iterator of events in event-time order, endless unless limited.
#[derive(Debug)]
pub struct Simulator {
    cfg: SimConfig,
    rng: Pcg64Mcg,
    ads: Vec<SimAd>,
    popularity: Zipf<f64>,
    delay: LogNormal<f64>,
    /// Per-ad log-multiplier of the drift, and the minute it was last stepped to.
    drift: Vec<f64>,
    drift_minute: i64,
    drift_step: Normal<f64>,
    ids: IdGenerator,
    serves_emitted: u64,
    max_serves: Option<u64>,
    /// Event time of the next serve (fractional ms, so any rate is exact on average).
    next_serve_ms: f64,
    pending_clicks: BinaryHeap<Reverse<Pending>>,
    pending_seq: u64,
    last_truth: Vec<f64>,
    counts: EmittedCounts,
}

impl Simulator {
    /// A marketplace from `cfg`; `max_serves` ends the run (`None` = endless).
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
        if cfg.click_delay_min_ms < 0
            || cfg.click_delay_max_ms < cfg.click_delay_min_ms
            || cfg.click_delay_median_ms <= 0
        {
            return Err(SimError::Config(
                "need 0 <= click_delay_min_ms <= click_delay_max_ms and click_delay_median_ms > 0",
            ));
        }
        let rate_ok = |r: f64| r.is_finite() && (0.0..=1.0).contains(&r);
        if !rate_ok(cfg.duplicate_click_rate) || !rate_ok(cfg.orphan_click_rate) {
            return Err(SimError::Config(
                "duplicate and orphan click rates must be within [0, 1]",
            ));
        }
        if !(rate_ok(cfg.daily_amplitude) && cfg.daily_amplitude < 1.0) {
            return Err(SimError::Config("daily_amplitude must be within [0, 1)"));
        }
        if !(cfg.drift_per_hour.is_finite() && cfg.drift_per_hour >= 0.0) {
            return Err(SimError::Config("drift_per_hour must be >= 0"));
        }
        if cfg.burst_every_ms < 0
            || cfg.burst_len_ms < 0
            || (cfg.burst_every_ms > 0 && cfg.burst_len_ms > cfg.burst_every_ms)
            || !(cfg.burst_factor.is_finite() && cfg.burst_factor >= 1.0)
        {
            return Err(SimError::Config(
                "bursts need 0 <= burst_len_ms <= burst_every_ms and burst_factor >= 1",
            ));
        }
        let ids = IdGenerator::new(cfg.shard)?;
        let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed);
        let base = LogNormal::new(BASE_CTR_MEDIAN.ln(), BASE_CTR_SIGMA).expect("valid log-normal");
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
        let geometric_mean = ((cfg.click_delay_min_ms.max(1) as f64)
            * (cfg.click_delay_max_ms.max(1) as f64))
            .sqrt();
        let median = (cfg.click_delay_median_ms as f64).min(geometric_mean);
        let delay = LogNormal::new(median.ln(), 1.0).expect("valid log-normal");
        let drift_step = Normal::new(0.0, cfg.drift_per_hour / 60f64.sqrt()).expect("sigma >= 0");
        Ok(Self {
            drift: vec![0.0; cfg.ads],
            drift_minute: cfg.start_ms.div_euclid(MINUTE_MS),
            next_serve_ms: cfg.start_ms as f64,
            cfg,
            rng,
            ads,
            popularity,
            delay,
            drift_step,
            ids,
            serves_emitted: 0,
            max_serves,
            pending_clicks: BinaryHeap::new(),
            pending_seq: 0,
            last_truth: Vec::new(),
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

    /// The true click probability of each ad of the last serve, in the serve's order.
    pub fn last_serve_truth(&self) -> &[f64] {
        &self.last_truth
    }

    /// Number of ads in the market.
    pub fn ads(&self) -> usize {
        self.ads.len()
    }

    /// The ID, campaign and bid of ad `ad_index` (0..[`Simulator::ads`]).
    pub fn ad(&self, ad_index: usize) -> (&str, &str, f64) {
        let ad = &self.ads[ad_index];
        (&ad.ad_id, &ad.campaign_id, ad.bid)
    }

    /// How a serve draws its ads: an ad index, with the market's Zipf popularity. For benches
    /// that draw candidates as the traffic draws the ads it shows.
    pub fn popularity(&self) -> impl Distribution<usize> + '_ {
        (&self.popularity).map(ad_of_rank)
    }

    /// The parts of the truth that are ad `ad_index`'s alone: its base click rate and its
    /// favourite query category (an index into [`CATEGORIES`]). For benches that bound what a
    /// learner could recover from the traffic.
    pub fn ad_truth(&self, ad_index: usize) -> (f64, usize) {
        let ad = &self.ads[ad_index];
        (ad.base_ctr, ad.favourite_category)
    }

    /// The true click probability of `ad_index` at `position` in `ctx` at event time `ts_ms`.
    pub fn true_ctr(&self, ad_index: usize, ctx: &Context, position: i32, ts_ms: i64) -> f64 {
        let ad = &self.ads[ad_index];
        let cat = category_lift(CATEGORIES[ad.favourite_category] == ctx.query_category);
        let dev = DEVICES
            .iter()
            .position(|d| *d == ctx.device)
            .map_or(1.0, |i| ad.device_lean[i]);
        let daily = daily_factor(self.cfg.daily_amplitude, ts_ms);
        let drift = self.drift[ad_index].exp();
        (ad.base_ctr * drift * daily * cat * dev * position_bias(position)).min(0.9)
    }

    /// Steps every ad's drift up to the minute of `ts_ms`.
    fn advance_drift(&mut self, ts_ms: i64) {
        if self.cfg.drift_per_hour == 0.0 {
            return;
        }
        let minute = ts_ms.div_euclid(MINUTE_MS);
        while self.drift_minute < minute {
            self.drift_minute += 1;
            for d in &mut self.drift {
                *d = *d * (1.0 - DRIFT_REVERSION) + self.drift_step.sample(&mut self.rng);
            }
        }
    }

    fn in_burst(&self, ts_ms: i64) -> bool {
        let every = self.cfg.burst_every_ms;
        if every == 0 || self.cfg.burst_len_ms == 0 {
            return false;
        }
        // Bursts start at a seed-dependent phase, so runs with different seeds differ.
        let phase = (self.cfg.seed % every as u64) as i64;
        (ts_ms - self.cfg.start_ms - phase).rem_euclid(every) < self.cfg.burst_len_ms
    }

    fn next_serve_ts(&self) -> i64 {
        self.next_serve_ms as i64
    }

    fn schedule(&mut self, ts_ms: i64, kind: ClickKind, click: Click) {
        self.pending_seq += 1;
        self.pending_clicks.push(Reverse(Pending {
            ts_ms,
            seq: self.pending_seq,
            kind,
            click,
        }));
    }

    fn make_serve(&mut self) -> Serve {
        let ts = self.next_serve_ts();
        self.advance_drift(ts);
        let mut extra = BTreeMap::new();
        if self.cfg.hour_context {
            extra.insert(
                "hour".to_string(),
                format!("{:02}", ts.rem_euclid(DAY_MS) / HOUR_MS),
            );
        }
        let context = Context {
            query_category: CATEGORIES[self.rng.random_range(0..CATEGORIES.len())].to_string(),
            geo: GEOS[self.rng.random_range(0..GEOS.len())].to_string(),
            device: DEVICES[self.rng.random_range(0..DEVICES.len())].to_string(),
            extra,
        };
        let k = self.rng.random_range(1..=self.cfg.max_ads);
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        while chosen.len() < k {
            let idx = ad_of_rank(self.popularity.sample(&mut self.rng));
            if !chosen.contains(&idx) {
                chosen.push(idx);
            }
        }
        let serve_id = self.ids.next_at(ts as u64);
        let mut ads = Vec::with_capacity(k);
        self.last_truth.clear();
        for (slot, &idx) in chosen.iter().enumerate() {
            let position = slot as i32 + 1;
            let p = self.true_ctr(idx, &context, position, ts);
            self.last_truth.push(p);
            let ad_id = self.ads[idx].ad_id.clone();
            let entry = self.counts.ads.entry(ad_id.clone()).or_default();
            entry.impressions += 1;
            if self.rng.random_bool(p) {
                entry.clicks += 1;
                let delay = (self.delay.sample(&mut self.rng) as i64)
                    .clamp(self.cfg.click_delay_min_ms, self.cfg.click_delay_max_ms);
                let click_ts = ts + delay;
                let click = Click {
                    click_id: self.ids.next_at(click_ts as u64),
                    serve_id,
                    ad_id: ad_id.clone(),
                    ts_ms: click_ts,
                };
                if self.rng.random_bool(self.cfg.duplicate_click_rate) {
                    let again = click_ts + self.rng.random_range(0..=2_000);
                    self.schedule(again, ClickKind::Duplicate, click.clone());
                }
                self.schedule(click_ts, ClickKind::True, click);
            }
            let ad = &self.ads[idx];
            ads.push(AdShown {
                ad_id,
                campaign_id: ad.campaign_id.clone(),
                position,
                bid: ad.bid,
            });
        }
        if self.rng.random_bool(self.cfg.orphan_click_rate) {
            // A click whose serve was never sent (a lost serve, a forged click): a fresh ID is
            // distinct from every serve ID.
            let click_ts = ts + self.cfg.click_delay_min_ms;
            let orphan = Click {
                click_id: self.ids.next_at(click_ts as u64),
                serve_id: self.ids.next_at(ts as u64),
                ad_id: ads[0].ad_id.clone(),
                ts_ms: click_ts,
            };
            self.schedule(click_ts, ClickKind::Orphan, orphan);
        }
        self.serves_emitted += 1;
        self.counts.serves += 1;
        let factor = if self.in_burst(ts) {
            self.cfg.burst_factor
        } else {
            1.0
        };
        self.next_serve_ms += 1000.0 / (self.cfg.serves_per_sec * factor);
        Serve {
            serve_id,
            ts_ms: ts,
            context,
            ads,
        }
    }

    fn pop_click(&mut self) -> SimEvent {
        let Reverse(p) = self.pending_clicks.pop().expect("caller checked");
        match p.kind {
            ClickKind::True => self.counts.clicks += 1,
            ClickKind::Duplicate => self.counts.duplicate_clicks += 1,
            ClickKind::Orphan => self.counts.orphan_clicks += 1,
        }
        SimEvent::Click(p.click)
    }
}

impl Iterator for Simulator {
    type Item = SimEvent;

    fn next(&mut self) -> Option<SimEvent> {
        let more_serves = self.max_serves.is_none_or(|m| self.serves_emitted < m);
        match self.pending_clicks.peek() {
            Some(Reverse(p)) if !more_serves || p.ts_ms <= self.next_serve_ts() => {
                Some(self.pop_click())
            }
            _ if more_serves => Some(SimEvent::Serve(self.make_serve())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    /// Everything switched on, as `ctr-ingest simulate` runs by default.
    fn realistic(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            click_delay_max_ms: 120_000,
            duplicate_click_rate: 0.05,
            orphan_click_rate: 0.01,
            daily_amplitude: 0.3,
            drift_per_hour: 0.2,
            hour_context: true,
            burst_every_ms: 60_000,
            burst_len_ms: 10_000,
            burst_factor: 4.0,
            ..SimConfig::default()
        }
    }

    fn run_with(cfg: SimConfig, n: u64) -> (Vec<SimEvent>, EmittedCounts) {
        let mut sim = Simulator::new(cfg, Some(n)).unwrap();
        let events: Vec<SimEvent> = sim.by_ref().collect();
        (events, sim.counts().clone())
    }

    fn run(seed: u64, n: u64) -> (Vec<SimEvent>, EmittedCounts) {
        run_with(realistic(seed), n)
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
                SimEvent::Serve(s) => {
                    s.validate().unwrap();
                    let hour = (s.ts_ms.rem_euclid(DAY_MS) / HOUR_MS) as u32;
                    assert_eq!(s.context.extra["hour"], format!("{hour:02}"));
                }
                SimEvent::Click(c) => c.validate().unwrap(),
            }
        }
    }

    #[test]
    fn counts_match_the_events_with_duplicates_and_orphans_apart() {
        let (events, counts) = run(3, 20_000);
        let mut served: HashMap<i64, BTreeSet<String>> = HashMap::new();
        let mut impressions = 0;
        let (mut clicks, mut duplicates, mut orphans) = (0, 0, 0);
        let mut seen_clicks = BTreeSet::new();
        for e in &events {
            match e {
                SimEvent::Serve(s) => {
                    impressions += s.ads.len() as u64;
                    served.insert(s.serve_id, s.ads.iter().map(|a| a.ad_id.clone()).collect());
                }
                SimEvent::Click(c) => match served.get(&c.serve_id) {
                    None => orphans += 1,
                    Some(ads) => {
                        assert!(ads.contains(&c.ad_id), "a click names an ad of its serve");
                        if seen_clicks.insert(c.click_id) {
                            clicks += 1;
                        } else {
                            duplicates += 1;
                        }
                    }
                },
            }
        }
        assert_eq!(counts.serves, 20_000);
        assert_eq!(
            (counts.clicks, counts.duplicate_clicks, counts.orphan_clicks),
            (clicks, duplicates, orphans)
        );
        assert!(duplicates > 0 && orphans > 0);
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
    fn the_exported_truth_is_calibrated_against_the_clicks_drawn() {
        let mut sim = Simulator::new(realistic(11), Some(200_000)).unwrap();
        let mut sum_p = 0.0;
        while let Some(e) = sim.next() {
            if matches!(e, SimEvent::Serve(_)) {
                sum_p += sim.last_serve_truth().iter().sum::<f64>();
            }
        }
        let clicks = sim.counts().clicks as f64;
        assert!(
            (sum_p / clicks - 1.0).abs() < 0.03,
            "Σp {sum_p:.0} vs clicks {clicks}"
        );
    }

    #[test]
    fn click_delays_reach_minutes_and_bursts_speed_serves_up() {
        let cfg = SimConfig {
            serves_per_sec: 100.0,
            ..realistic(5)
        };
        let (events, _) = run_with(cfg.clone(), 30_000);
        let mut serve_ts = HashMap::new();
        let mut delays = Vec::new();
        let (mut in_burst, mut outside) = (0u64, 0u64);
        let sim = Simulator::new(cfg.clone(), None).unwrap();
        for e in &events {
            match e {
                SimEvent::Serve(s) => {
                    serve_ts.insert(s.serve_id, s.ts_ms);
                    if sim.in_burst(s.ts_ms) {
                        in_burst += 1;
                    } else {
                        outside += 1;
                    }
                }
                SimEvent::Click(c) => {
                    if let Some(t) = serve_ts.get(&c.serve_id) {
                        delays.push(c.ts_ms - t);
                    }
                }
            }
        }
        delays.sort_unstable();
        let median = delays[delays.len() / 2];
        assert!((2_000..8_000).contains(&median), "median delay {median} ms");
        assert!(*delays.last().unwrap() > 60_000, "a tail of minutes");
        // A sixth of the time in bursts at 4x the rate: 4/9 of the serves.
        let share = in_burst as f64 / (in_burst + outside) as f64;
        assert!((0.38..0.5).contains(&share), "burst share {share}");
    }

    #[test]
    fn ctr_follows_the_daily_cycle_and_drifts() {
        let cfg = realistic(9);
        let mut sim = Simulator::new(cfg.clone(), None).unwrap();
        let ctx = Context {
            query_category: "travel".into(),
            geo: "US".into(),
            device: "mobile".into(),
            extra: BTreeMap::new(),
        };
        let day = cfg.start_ms - cfg.start_ms.rem_euclid(DAY_MS);
        let evening = sim.true_ctr(0, &ctx, 1, day + 20 * HOUR_MS);
        let morning = sim.true_ctr(0, &ctx, 1, day + 8 * HOUR_MS);
        assert!((evening / morning - 1.3 / 0.7).abs() < 1e-9);
        let before = sim.true_ctr(0, &ctx, 1, day + 20 * HOUR_MS);
        sim.advance_drift(cfg.start_ms + 6 * HOUR_MS);
        let after = sim.true_ctr(0, &ctx, 1, day + 20 * HOUR_MS);
        assert_ne!(before, after, "the ad's CTR drifted");
        // Without drift and cycle the CTR is the ad's fixed one.
        let plain = Simulator::new(SimConfig::default(), None).unwrap();
        assert_eq!(
            plain.true_ctr(0, &ctx, 1, day),
            plain.true_ctr(0, &ctx, 1, day + 12 * HOUR_MS)
        );
    }

    #[test]
    fn bad_settings_are_errors() {
        for bad in [
            SimConfig {
                serves_per_sec: 0.0,
                ..SimConfig::default()
            },
            SimConfig {
                max_ads: 500,
                ..SimConfig::default()
            },
            SimConfig {
                duplicate_click_rate: 1.5,
                ..SimConfig::default()
            },
            SimConfig {
                daily_amplitude: 1.0,
                ..SimConfig::default()
            },
            SimConfig {
                burst_every_ms: 10,
                burst_len_ms: 20,
                ..SimConfig::default()
            },
        ] {
            assert!(matches!(
                Simulator::new(bad, None),
                Err(SimError::Config(_))
            ));
        }
        let bad = SimConfig {
            shard: 5000,
            ..SimConfig::default()
        };
        assert!(matches!(Simulator::new(bad, None), Err(SimError::Shard(_))));
    }
}

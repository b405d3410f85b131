//! Scorer settings: command-line flags, each overridable by an environment variable, checked
//! once at start-up into a [`ScorerConfig`].

use std::net::SocketAddr;

use std::time::Duration;

use ctr_models::{BetaPrior, VariantConfig, VariantKind};
use ctr_runtime::flags::{Service, ServiceFlags};

use crate::retention::Retention;
use crate::state::Compaction;

/// Settings as given: the command line of `ctr-scorer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ctr-scorer",
    about = "Learn CTR from labeled impressions; publish to Redis and HTTP"
)]
pub struct ScorerArgs {
    /// Kafka, Redis (estimates, the model streams, checkpoints, monitoring reports: keys under
    /// the prefix, see `publish`) and the outage policy.
    #[command(flatten)]
    pub service: ServiceFlags,
    /// Topic of labeled impressions (keyed by ad).
    #[arg(long, env = "CTR_LABELED_TOPIC", default_value = "ctr.labeled")]
    pub labeled_topic: String,
    /// Topic poison labeled impressions go to, with the reason in the `ctr.reason` header.
    #[arg(long, env = "CTR_DEADLETTER_TOPIC", default_value = "ctr.deadletter")]
    pub deadletter_topic: String,
    /// Consumer group shared by all scorer processes.
    #[arg(long, env = "CTR_SCORER_GROUP", default_value = "ctr-scorer")]
    pub group: String,
    /// HTTP listen address of the API.
    #[arg(long, env = "CTR_SCORER_HTTP", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Most labeled impressions applied to Redis in one atomic batch.
    #[arg(long, env = "CTR_SCORER_BATCH", default_value_t = 1000)]
    pub batch_size: usize,
    /// Longest a batch waits to fill, ms (bounds publish latency under light load).
    #[arg(long, env = "CTR_SCORER_BATCH_MS", default_value_t = 20)]
    pub batch_ms: u64,
    /// Prior mean CTR of the count model's global rate (what an ad nothing is known about
    /// starts from). Part of a partition's state: it applies to partitions started afresh.
    #[arg(long, env = "CTR_PRIOR_MEAN", default_value_t = 0.02)]
    pub prior_mean: f64,
    /// Weight of that prior, in pseudo-impressions (weak: the data's own rate takes over within
    /// a few dozen impressions; `CountsConfig::global_prior_strength` says why).
    #[arg(long, env = "CTR_PRIOR_STRENGTH", default_value_t = 10.0)]
    pub prior_strength: f64,
    /// How long the models remember, ms of event time: the count model's counts and the running
    /// base rates decay by half over this. Shorter follows a drifting click rate sooner and
    /// keeps less evidence of each key; the tables stay bounded because faded keys are dropped
    /// (`CountModel::evict_faded`). Part of a partition's state: it applies to partitions
    /// started afresh.
    #[arg(long, env = "CTR_HALF_LIFE_MS", default_value_t = ctr_models::counts::DEFAULT_HALF_LIFE_MS)]
    pub half_life_ms: u64,
    /// Model variants learning side by side: comma-separated kinds (counts, ftrl, combined),
    /// each optionally followed by `+platt` for the online calibration layer.
    #[arg(
        long,
        env = "CTR_SCORER_MODELS",
        default_value = "counts,ftrl,combined"
    )]
    pub models: String,
    /// The variant that serves: the API evaluates it, and its estimates are published to
    /// Redis. Any of `models`; `combined` leads every backtest (docs/BENCHMARKS.md).
    #[arg(long, env = "CTR_SCORER_SERVE_MODEL", default_value = "combined")]
    pub serve_model: String,
    /// Serve only: run the model replica and the HTTP API, learn nothing (no consumer group,
    /// no writes). For a fleet of API processes beside the learning scorers; give it the
    /// learners' --redis-prefix, --labeled-topic, --models and --serve-model.
    #[arg(long, env = "CTR_SCORER_SERVE_ONLY", default_value_t = false)]
    pub serve_only: bool,
    /// Worker tasks; partition p is owned by worker p mod workers.
    #[arg(long, env = "CTR_SCORER_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Records each worker's queue holds; a full queue is a sign of overload.
    #[arg(long, env = "CTR_SCORER_QUEUE", default_value_t = 10_000)]
    pub queue_capacity: usize,
    /// Checkpoint interval, ms.
    #[arg(long, env = "CTR_SCORER_CHECKPOINT_MS", default_value_t = 10_000)]
    pub checkpoint_ms: u64,
    /// Increments appended to a partition's checkpoint before a whole state is saved again
    /// (sooner once they outweigh it); 0: every checkpoint saves the whole state.
    #[arg(long, env = "CTR_SCORER_CHECKPOINT_LINKS", default_value_t = 256)]
    pub checkpoint_links: usize,
    /// How far back in event time label IDs are remembered for dedupe, ms. Must exceed the
    /// joiner's window + grace + late horizon + checkpoint interval.
    #[arg(long, env = "CTR_SCORER_DEDUPE_HORIZON_MS", default_value_t = DEFAULT_DEDUPE_HORIZON_MS)]
    pub dedupe_horizon_ms: i64,
    /// FTRL coordinates idle this long in event time are evicted, ms.
    #[arg(long, env = "CTR_SCORER_IDLE_MS", default_value_t = 3_600_000)]
    pub idle_ms: i64,
    /// Exact totals of a key (an ad, or an ad in one context) unchanged this long in event
    /// time leave the hot state, ms (their values stay in Redis and are read back when the key
    /// returns; see the `retention` module). 0: keep every key hot forever.
    #[arg(long, env = "CTR_SCORER_TOTALS_HOT_MS", default_value_t = 86_400_000)]
    pub totals_hot_ms: i64,
    /// Retired keys each partition remembers (its filter takes 12 bits per key): one that
    /// returns after more have retired since it did starts again from zero.
    #[arg(
        long,
        env = "CTR_SCORER_TOTALS_REMEMBERED",
        default_value_t = 1_000_000
    )]
    pub totals_remembered: usize,
    /// Shed load (sample negatives) when overloaded.
    #[arg(long, env = "CTR_SCORER_SHEDDING", default_value_t = true, action = clap::ArgAction::Set)]
    pub shedding: bool,
    /// Consumer lag (records, any partition) above which the scorer counts as overloaded.
    #[arg(long, env = "CTR_SCORER_LAG_BOUND", default_value_t = 50_000)]
    pub lag_bound: i64,
    /// Lowest keep-rate of negatives for learning under overload (stage one). Each kept
    /// negative stands for up to 1/min_rate, so this bounds how coarse an ad's counts get.
    #[arg(long, env = "CTR_SCORER_MIN_RATE", default_value_t = 0.2)]
    pub min_rate: f64,
    /// Largest stage-two thinning factor: at most this many negatives of an ad are dropped
    /// unread per kept one. min_rate and this together bound the error an ad's estimate can
    /// take from shedding (a group of 1/min_rate × max_thinning negatives).
    #[arg(long, env = "CTR_SCORER_MAX_THINNING", default_value_t = 10)]
    pub max_thinning: u32,
    /// Ranking API: most requests in progress; beyond it requests get 503 at once.
    #[arg(long, env = "CTR_API_MAX_CONCURRENCY", default_value_t = 512)]
    pub api_max_concurrency: usize,
    /// Ranking API: deadline of one request, ms.
    #[arg(long, env = "CTR_API_TIMEOUT_MS", default_value_t = 250)]
    pub api_timeout_ms: u64,
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct ScorerConfig {
    /// Kafka, Redis and the outage policy.
    pub service: Service,
    /// `--labeled-topic`.
    pub labeled_topic: String,
    /// `--deadletter-topic`.
    pub deadletter_topic: String,
    /// `--group`: the consumer group.
    pub group: String,
    /// `--http`: the API's listen address.
    pub http_addr: SocketAddr,
    /// `--batch-size`: most labels in one Redis batch.
    pub batch_size: usize,
    /// `--batch-ms`: longest a batch waits to fill.
    pub batch_ms: u64,
    /// The count model's global prior (`--prior-mean`, `--prior-strength`).
    pub prior: BetaPrior,
    /// The variants learning side by side (`--models`).
    pub models: Vec<VariantConfig>,
    /// `--serve-model`: the variant the API evaluates and Redis gets.
    pub serve_model: String,
    /// `--serve-only`: replica and API only, no learning.
    pub serve_only: bool,
    /// `--workers`: worker tasks.
    pub workers: usize,
    /// `--queue-capacity`: records each worker's queue holds.
    pub queue_capacity: usize,
    /// `--checkpoint-ms`: checkpoint interval.
    pub checkpoint_every: Duration,
    /// `--checkpoint-links`: how a partition's checkpoint chain is compacted.
    pub compaction: Compaction,
    /// `--dedupe-horizon-ms`.
    pub dedupe_horizon_ms: i64,
    /// `--idle-ms`: FTRL coordinates idle this long (event time) are evicted.
    pub idle_ms: i64,
    /// `--totals-hot-ms`, `--totals-remembered`: how the exact totals stay bounded.
    pub retention: Retention,
    /// `--shedding`: shed load when overloaded.
    pub shedding: bool,
    /// `--lag-bound`: consumer lag that counts as overload.
    pub lag_bound: i64,
    /// `--min-rate`: lowest keep-rate of negatives (stage one).
    pub min_rate: f64,
    /// `--max-thinning`: largest stage-two thinning factor.
    pub max_thinning: u32,
    /// `--api-max-concurrency`: requests in progress before 503s.
    pub api_max_concurrency: usize,
    /// `--api-timeout-ms`: deadline of one API request.
    pub api_timeout: Duration,
}

fn check(ok: bool, name: &str, problem: &str) -> Result<(), crate::Error> {
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Config(format!("{name} {problem}")))
    }
}

/// How far back in event time a scorer remembers label IDs for dedupe by default, ms (15
/// minutes: the joiner's window, grace and late horizon plus a checkpoint interval fit in it).
pub const DEFAULT_DEDUPE_HORIZON_MS: i64 = 900_000;

/// Step size of the calibration layer a `+platt` variant gets (measured in
/// `models/tests/learning.rs`: it repairs a shrunk model and leaves a calibrated one alone).
pub const PLATT_RATE: f64 = 0.2;

/// Parses `counts,ftrl,combined` into variant settings, each named as written. A kind followed
/// by `+platt` (`combined+platt`) gets the online calibration layer on top, so the same kind can
/// run with and without it side by side.
pub fn parse_models(list: &str) -> Result<Vec<VariantConfig>, crate::Error> {
    let mut out: Vec<VariantConfig> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (kind, platt) = match name.strip_suffix("+platt") {
            Some(kind) => (kind, true),
            None => (name, false),
        };
        let kind: VariantKind = kind.parse().map_err(|e| {
            crate::Error::Config(format!(
                "models: `{name}`: {e} (optionally followed by +platt)"
            ))
        })?;
        if out.iter().any(|v| v.name == name) {
            return Err(crate::Error::Config(format!(
                "models: `{name}` given twice"
            )));
        }
        let mut v = VariantConfig::of(kind);
        v.name = name.to_string();
        v.platt_rate = platt.then_some(PLATT_RATE);
        out.push(v);
    }
    check(!out.is_empty(), "models", "must name at least one variant")?;
    Ok(out)
}

impl TryFrom<ScorerArgs> for ScorerConfig {
    type Error = crate::Error;

    fn try_from(a: ScorerArgs) -> Result<Self, Self::Error> {
        let prior = BetaPrior::from_mean(a.prior_mean, a.prior_strength)
            .map_err(|e| crate::Error::Config(e.to_string()))?;
        check(
            (1..=10_000).contains(&a.batch_size),
            "batch_size",
            "must be 1..=10000",
        )?;

        check(
            a.half_life_ms >= 1_000,
            "half_life_ms",
            "must be >= 1000 (counts that never decay would grow without bound)",
        )?;
        let mut models = parse_models(&a.models)?;
        for m in &mut models {
            m.counts.global_prior_mean = prior.mean();
            m.counts.global_prior_strength = a.prior_strength;
            m.counts.half_life_ms = Some(a.half_life_ms as f64);
        }
        check(
            models.iter().any(|m| m.name == a.serve_model),
            "serve_model",
            "must be one of the variants in `models`",
        )?;
        check((1..=64).contains(&a.workers), "workers", "must be 1..=64")?;
        check(
            a.queue_capacity >= a.batch_size,
            "queue_capacity",
            "must be at least batch_size",
        )?;
        check(a.checkpoint_ms >= 100, "checkpoint_ms", "must be >= 100")?;
        check(
            a.dedupe_horizon_ms >= 1_000,
            "dedupe_horizon_ms",
            "must be >= 1000",
        )?;
        check(a.idle_ms > 0, "idle_ms", "must be > 0")?;
        check(a.totals_hot_ms >= 0, "totals_hot_ms", "must be >= 0")?;
        check(
            a.totals_hot_ms == 0 || a.totals_remembered > 0,
            "totals_remembered",
            "must be > 0 while keys retire (totals_hot_ms > 0)",
        )?;
        check(a.lag_bound > 0, "lag_bound", "must be > 0")?;
        check(
            a.min_rate > 0.0 && a.min_rate <= 1.0,
            "min_rate",
            "must be in (0, 1]",
        )?;
        check(
            (1..=1_000).contains(&a.max_thinning),
            "max_thinning",
            "must be 1..=1000",
        )?;
        check(
            a.api_max_concurrency > 0,
            "api_max_concurrency",
            "must be > 0",
        )?;
        check(a.api_timeout_ms > 0, "api_timeout_ms", "must be > 0")?;
        Ok(Self {
            service: a.service.check().map_err(crate::Error::Config)?,
            labeled_topic: a.labeled_topic,
            deadletter_topic: a.deadletter_topic,
            group: a.group,
            http_addr: a.http_addr,
            batch_size: a.batch_size,
            batch_ms: a.batch_ms,
            prior,
            models,
            serve_model: a.serve_model,
            serve_only: a.serve_only,
            workers: a.workers,
            queue_capacity: a.queue_capacity,
            checkpoint_every: Duration::from_millis(a.checkpoint_ms),
            compaction: Compaction {
                max_links: a.checkpoint_links,
            },
            dedupe_horizon_ms: a.dedupe_horizon_ms,
            idle_ms: a.idle_ms,
            retention: Retention {
                hot_ms: a.totals_hot_ms,
                remembered: a.totals_remembered,
            },
            shedding: a.shedding,
            lag_bound: a.lag_bound,
            min_rate: a.min_rate,
            max_thinning: a.max_thinning,
            api_max_concurrency: a.api_max_concurrency,
            api_timeout: Duration::from_millis(a.api_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_parse_with_and_without_the_calibration_layer() {
        let v = parse_models("counts, combined,combined+platt").unwrap();
        let names: Vec<&str> = v.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["counts", "combined", "combined+platt"]);
        assert_eq!(v[1].kind, v[2].kind);
        assert_eq!((v[1].platt_rate, v[2].platt_rate), (None, Some(PLATT_RATE)));
        for bad in ["", "counts,counts", "lasso", "counts+isotonic"] {
            assert!(parse_models(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_half_life_reaches_every_variant_and_a_too_short_one_is_refused() {
        use clap::Parser;
        let cfg = |half_life: &str| {
            ScorerConfig::try_from(ScorerArgs::parse_from([
                "ctr-scorer",
                &format!("--half-life-ms={half_life}"),
            ]))
        };
        let two_hours = cfg("7200000").unwrap();
        assert_eq!(two_hours.models.len(), 3);
        for m in &two_hours.models {
            assert_eq!(m.counts.half_life_ms, Some(7_200_000.0), "{}", m.name);
        }
        let err = cfg("0").unwrap_err().to_string();
        assert!(err.contains("half_life_ms must be >= 1000"), "{err}");
    }
}

//! Scorer settings: command-line flags, each overridable by an environment variable, checked
//! once at start-up into a [`ScorerConfig`].

use std::net::SocketAddr;

use ctr_models::BetaPrior;

/// Settings as given.
#[derive(Debug, Clone, clap::Args)]
pub struct ScorerArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CTR_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Topic of labeled impressions (keyed by ad).
    #[arg(long, env = "CTR_LABELED_TOPIC", default_value = "ctr.labeled")]
    pub labeled_topic: String,
    /// Consumer group shared by all scorer processes.
    #[arg(long, env = "CTR_SCORER_GROUP", default_value = "ctr-scorer")]
    pub group: String,
    /// Redis URL, e.g. redis://127.0.0.1:16379/
    #[arg(
        long,
        env = "CTR_REDIS_URL",
        default_value = "redis://127.0.0.1:16379/"
    )]
    pub redis_url: String,
    /// Prefix of every Redis key this scorer writes (lets deployments share a Redis).
    #[arg(long, env = "CTR_REDIS_PREFIX", default_value = "ctr:")]
    pub redis_prefix: String,
    /// HTTP listen address of the API.
    #[arg(long, env = "CTR_SCORER_HTTP", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Most labeled impressions applied to Redis in one atomic batch.
    #[arg(long, env = "CTR_SCORER_BATCH", default_value_t = 1000)]
    pub batch_size: usize,
    /// Longest a batch waits to fill, ms (bounds publish latency under light load).
    #[arg(long, env = "CTR_SCORER_BATCH_MS", default_value_t = 20)]
    pub batch_ms: u64,
    /// Prior mean CTR for ads and contexts with no data.
    #[arg(long, env = "CTR_PRIOR_MEAN", default_value_t = 0.02)]
    pub prior_mean: f64,
    /// Prior weight, in pseudo-impressions.
    #[arg(long, env = "CTR_PRIOR_STRENGTH", default_value_t = 100.0)]
    pub prior_strength: f64,
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct ScorerConfig {
    pub brokers: String,
    pub labeled_topic: String,
    pub group: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub http_addr: SocketAddr,
    pub batch_size: usize,
    pub batch_ms: u64,
    pub prior: BetaPrior,
}

impl TryFrom<ScorerArgs> for ScorerConfig {
    type Error = crate::Error;

    fn try_from(a: ScorerArgs) -> Result<Self, Self::Error> {
        let prior = BetaPrior::from_mean(a.prior_mean, a.prior_strength)
            .map_err(|e| crate::Error::Config(e.to_string()))?;
        if a.batch_size == 0 || a.batch_size > 10_000 {
            return Err(crate::Error::Config("batch_size must be 1..=10000".into()));
        }
        if a.redis_prefix.is_empty() {
            return Err(crate::Error::Config(
                "redis_prefix must not be empty".into(),
            ));
        }
        Ok(Self {
            brokers: a.brokers,
            labeled_topic: a.labeled_topic,
            group: a.group,
            redis_url: a.redis_url,
            redis_prefix: a.redis_prefix,
            http_addr: a.http_addr,
            batch_size: a.batch_size,
            batch_ms: a.batch_ms,
            prior,
        })
    }
}

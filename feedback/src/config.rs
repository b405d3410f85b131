//! Joiner settings: flags with environment-variable overrides, checked once at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use ctr_runtime::flags::{Service, ServiceFlags};

use crate::join::JoinConfig;

/// Settings as given: the command line of `ctr-feedback`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ctr-feedback",
    about = "Join serves and clicks into labeled impressions"
)]
pub struct FeedbackArgs {
    /// Kafka, Redis (checkpoints of the join state under `<prefix>feedback:`, the signal for the
    /// scorer at `<prefix>signal:joiner`) and the outage policy.
    #[command(flatten)]
    pub service: ServiceFlags,
    /// Topic of serve events (keyed by serve ID).
    #[arg(long, env = "CTR_SERVES_TOPIC", default_value = "ctr.serves")]
    pub serves_topic: String,
    /// Topic of click events (keyed by serve ID, partitioned like the serves).
    #[arg(long, env = "CTR_CLICKS_TOPIC", default_value = "ctr.clicks")]
    pub clicks_topic: String,
    /// Topic the labeled impressions go to (keyed by ad).
    #[arg(long, env = "CTR_LABELED_TOPIC", default_value = "ctr.labeled")]
    pub labeled_topic: String,
    /// Topic unusable serves and clicks go to, with the reason in the `ctr.reason` header.
    #[arg(long, env = "CTR_DEADLETTER_TOPIC", default_value = "ctr.deadletter")]
    pub deadletter_topic: String,
    /// Consumer group of the joiner processes.
    #[arg(long, env = "CTR_FEEDBACK_GROUP", default_value = "ctr-feedback")]
    pub group: String,
    /// HTTP address of /metrics and /healthz.
    #[arg(long, env = "CTR_FEEDBACK_HTTP", default_value = "127.0.0.1:8081")]
    pub http_addr: SocketAddr,
    /// Attribution window, ms: a click counts if no later than this after its serve.
    #[arg(long, env = "CTR_JOIN_WINDOW_MS", default_value_t = 30_000)]
    pub window_ms: i64,
    /// Extra event time a serve stays open after its window, ms.
    #[arg(long, env = "CTR_JOIN_GRACE_MS", default_value_t = 5_000)]
    pub grace_ms: i64,
    /// Bounded out-of-orderness of event times, ms.
    #[arg(long, env = "CTR_JOIN_MAX_OUT_OF_ORDER_MS", default_value_t = 2_000)]
    pub max_out_of_order_ms: i64,
    /// Wall-clock silence after which a stream counts as idle, ms.
    #[arg(long, env = "CTR_JOIN_IDLE_MS", default_value_t = 5_000)]
    pub idle_ms: i64,
    /// How long closed serves are remembered for late-click corrections, event-time ms.
    #[arg(long, env = "CTR_JOIN_LATE_HORIZON_MS", default_value_t = 300_000)]
    pub late_horizon_ms: i64,
    /// Most pending serves per partition before the earliest is closed early; also the most
    /// serves whose clicks came first may wait for them before the earliest are orphans.
    #[arg(long, env = "CTR_JOIN_MAX_PENDING", default_value_t = 2_000_000)]
    pub max_pending: usize,
    /// Checkpoint interval, ms.
    #[arg(long, env = "CTR_JOIN_CHECKPOINT_MS", default_value_t = 5_000)]
    pub checkpoint_ms: u64,
    /// Stall detector: wall-clock window it looks at, ms.
    #[arg(long, env = "CTR_STALL_WINDOW_MS", default_value_t = 30_000)]
    pub stall_window_ms: u64,
    /// Stall detector: fewest serves in the window before it judges at all.
    #[arg(long, env = "CTR_STALL_MIN_SERVES", default_value_t = 500)]
    pub stall_min_serves: u64,
    /// Stall detector: the window's CTR below this fraction of the long-run CTR is a collapse.
    #[arg(long, env = "CTR_STALL_COLLAPSE_RATIO", default_value_t = 0.2)]
    pub stall_collapse_ratio: f64,
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct FeedbackConfig {
    /// Kafka, Redis and the outage policy.
    pub service: Service,
    /// `--serves-topic`.
    pub serves_topic: String,
    /// `--clicks-topic`.
    pub clicks_topic: String,
    /// `--labeled-topic`.
    pub labeled_topic: String,
    /// `--deadletter-topic`.
    pub deadletter_topic: String,
    /// `--group`: the consumer group.
    pub group: String,
    /// `--http`: the listen address of `/healthz` and `/metrics`.
    pub http_addr: SocketAddr,
    /// The join's windows and bounds.
    pub join: JoinConfig,
    /// `--checkpoint-ms`: checkpoint interval.
    pub checkpoint_every: Duration,
    /// The stall detector's settings.
    pub stall: StallConfig,
}

/// Settings of the stall detector (see [`crate::signals`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallConfig {
    /// Wall-clock window it looks at.
    pub window: Duration,
    /// Fewest serves in the window before it judges at all.
    pub min_serves: u64,
    /// The window's CTR below this fraction of the long-run CTR is a collapse.
    pub collapse_ratio: f64,
}

/// A setting that cannot work, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{0}`: {1}")]
pub struct ConfigError(pub &'static str, pub String);

impl TryFrom<FeedbackArgs> for FeedbackConfig {
    type Error = ConfigError;

    fn try_from(a: FeedbackArgs) -> Result<Self, ConfigError> {
        let check = |ok: bool, name, why| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError(name, String::from(why)))
            }
        };
        check(a.window_ms > 0, "window_ms", "must be > 0")?;
        check(a.grace_ms >= 0, "grace_ms", "must be >= 0")?;
        check(
            a.max_out_of_order_ms >= 0,
            "max_out_of_order_ms",
            "must be >= 0",
        )?;
        check(a.idle_ms > 0, "idle_ms", "must be > 0")?;
        check(a.late_horizon_ms >= 0, "late_horizon_ms", "must be >= 0")?;
        check(a.max_pending > 0, "max_pending", "must be > 0")?;
        check(a.checkpoint_ms >= 100, "checkpoint_ms", "must be >= 100")?;
        let service = a.service.check().map_err(|e| ConfigError("service", e))?;
        check(
            a.serves_topic != a.clicks_topic,
            "clicks_topic",
            "must differ from serves_topic",
        )?;
        check(
            a.stall_collapse_ratio > 0.0 && a.stall_collapse_ratio < 1.0,
            "stall_collapse_ratio",
            "must be in (0, 1)",
        )?;
        Ok(Self {
            join: JoinConfig {
                window_ms: a.window_ms,
                grace_ms: a.grace_ms,
                max_out_of_order_ms: a.max_out_of_order_ms,
                idle_ms: a.idle_ms,
                late_horizon_ms: a.late_horizon_ms,
                max_pending: a.max_pending,
            },
            checkpoint_every: Duration::from_millis(a.checkpoint_ms),
            stall: StallConfig {
                window: Duration::from_millis(a.stall_window_ms.max(1_000)),
                min_serves: a.stall_min_serves,
                collapse_ratio: a.stall_collapse_ratio,
            },
            service,
            serves_topic: a.serves_topic,
            clicks_topic: a.clicks_topic,
            labeled_topic: a.labeled_topic,
            deadletter_topic: a.deadletter_topic,
            group: a.group,
            http_addr: a.http_addr,
        })
    }
}

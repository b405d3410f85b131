//! `ctr-scorer`: learns CTR from labeled impressions and publishes it.
//!
//! - [`config`]: the service's settings.
//! - [`state`]: one partition's state (models, dedupe, sampling) and what a record does to it.
//! - [`retention`]: bounded exact totals: keys leave the hot state and come back from Redis.
//! - [`hold`]: clicks held until the negatives of their time have arrived.
//! - [`worker`]: keyed workers, each the single owner of its partitions' state.
//! - [`consumer`]: the Kafka consumer-group loop that feeds the workers.
//! - [`publish`]: the Redis key layout and the atomic, offset-fenced apply of a batch.
//! - [`checkpoint`]: durable per-partition snapshots with their offsets.
//! - [`deadletter`]: poison records to the dead-letter topic, delivered before checkpoints.
//! - [`effects`]: a worker's effects on Redis and Kafka behind one narrow trait (the order
//!   publish → checkpoint → commit is unit-tested with a fake).
//! - [`load`]: the switches and counters the consumer, workers and monitoring share.
//! - [`governor`]: load shedding (the keep-rate of negatives, the thinning factor).
//! - [`guard`]: the learning guard (pauses learning while the click stream stalls).
//! - [`serving`]: what a serving replica holds of a partition, the owners' deltas that keep it
//!   current, and its answer for any ad in any context (pure).
//! - [`replica`]: the model replica of every API process: checkpoints, then the model streams.
//! - [`api`]: the HTTP API (`POST /v1/rank`, `GET /v1/ctr`, OpenAPI, health, metrics),
//!   answered from the replica.
//! - [`monitor`]: model health reports and the system-wide view of them.
//! - [`dashboard`]: the monitoring page and `GET /v1/monitor`.
//! - [`run`]: wires them together; `main.rs` only parses settings and calls it.

pub mod api;
pub mod bytediff;
pub mod checkpoint;
pub mod config;
pub mod consumer;
pub mod dashboard;
pub mod deadletter;
pub mod effects;
pub mod governor;
pub mod guard;
pub mod hold;
pub mod load;
pub mod monitor;
pub mod publish;
pub mod replica;
pub mod retention;
pub mod serving;
pub mod state;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ctr_runtime::{Liveness, Supervisor};
use ctr_schemas::contract::keys;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::info;

pub use config::{ScorerArgs, ScorerConfig};

/// Why the scorer stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A Kafka client could not be created or configured.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Redis refused the connection or a start-up call.
    #[error(transparent)]
    Redis(#[from] ctr_runtime::redis::RedisError),
    /// The HTTP server could not bind or serve.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// A worker failed (its error in words).
    #[error("worker: {0}")]
    Worker(String),
    /// No broker or no group membership for longer than the outage budget.
    #[error(transparent)]
    Outage(#[from] ctr_runtime::kafka::Outage),
    /// A supervised task failed, panicked or ended early.
    #[error(transparent)]
    Task(#[from] ctr_runtime::TaskFailed),
    /// The topic's metadata could not be read within the policy.
    #[error(transparent)]
    Metadata(ctr_runtime::DependencyError<rdkafka::error::KafkaError>),
}

/// `Result` with the scorer's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the consumer, the workers, the guard, the model replica and the HTTP API under a
/// supervisor until `shutdown` resolves or one of them fails (then the others drain and this
/// returns the failure); with `serve_only`, just the replica and the API.
pub async fn run(
    config: ScorerConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = Arc::new(config);
    let policy = config.service.policy;
    let redis = ctr_runtime::redis::Redis::connect(
        &config.service.redis_url,
        config.service.redis_ca_file.as_deref(),
        config.service.redis_cluster,
        policy,
    )
    .await?;
    let conn = redis.manager().await?;
    let partitions = labeled_partitions(&config).await?;
    // Draining is the final publish and checkpoint: it may have to ride out an outage.
    let mut tasks = Supervisor::new(policy.drain_time());
    let liveness = Liveness::default();
    let bound = policy.longest_step();
    let replica = Arc::new(replica::Replica::new(
        &config.models,
        &config.serve_model,
        partitions,
    ));
    // The replica's blocking stream reads get a connection of their own: on a shared
    // multiplexed connection they would hold up every command queued behind them.
    tasks.spawn_infallible(
        "model replica",
        replica::follow(
            Arc::clone(&replica),
            redis.blocking_manager(replica::BLOCK).await?,
            checkpoint::CheckpointStore::new(
                conn.clone(),
                policy,
                &config.service.redis_prefix,
                &config.labeled_topic,
            ),
            config.service.redis_prefix.clone(),
            config.labeled_topic.clone(),
            liveness.register("model replica", bound + replica::BLOCK),
            tasks.stop_signal(),
        ),
    );
    let view = Arc::new(monitor::Monitor::default());
    tasks.spawn_infallible(
        "monitoring view",
        monitor::collect(
            Arc::clone(&config),
            Arc::clone(&view),
            conn.clone(),
            tasks.stop_signal(),
        ),
    );
    info!(addr = %listener.local_addr()?, partitions, model = %config.serve_model,
          serve_only = config.serve_only, "HTTP API listening (dashboard at /dashboard/)");
    let control = (!config.serve_only).then(|| Arc::new(load::Control::default()));
    tasks.spawn(
        "HTTP API",
        api::serve(
            listener,
            api::ApiState::new(
                api::Limits::of(&config),
                Arc::clone(&replica),
                metrics,
                control.clone(),
                view,
                liveness.clone(),
            ),
            tasks.stop_signal(),
        ),
    );
    if let Some(control) = control {
        tasks.spawn(
            "learning guard",
            guard::guard(
                Arc::clone(&control),
                conn.clone(),
                policy,
                keys::joiner_signal(&config.service.redis_prefix),
                tasks.stop_signal(),
            ),
        );
        tasks.spawn_infallible(
            "model metrics",
            report_models(Arc::clone(&control), tasks.stop_signal()),
        );
        let instance = format!("{}-{}", config.group, std::process::id());
        tasks.spawn_infallible(
            "monitoring report",
            monitor::report(
                Arc::clone(&config),
                Arc::clone(&control),
                conn.clone(),
                instance,
                tasks.stop_signal(),
            ),
        );
        tasks.spawn(
            "consumer",
            consumer::run(
                Arc::clone(&config),
                conn,
                control,
                liveness,
                tasks.stop_signal(),
            ),
        );
    }
    tasks.run(shutdown).await?;
    Ok(())
}

/// Partitions of the labeled topic, from the broker's metadata: the replica holds each.
async fn labeled_partitions(config: &ScorerConfig) -> Result<usize> {
    let counts = ctr_runtime::kafka::partition_counts(
        &config.service.kafka,
        &config.service.policy,
        &[&config.labeled_topic],
    )
    .await
    .map_err(Error::Metadata)?;
    if counts[0] == 0 {
        return Err(Error::Config(format!(
            "labeled topic `{}` not found on the broker (or it has no partitions)",
            config.labeled_topic
        )));
    }
    Ok(counts[0])
}

/// The wall clock, Unix ms (ages and freshness; never part of the models' state).
pub use ctr_runtime::wall_ms;

/// Exports progressive-validation metrics per model, merged over the owned partitions.
async fn report_models(control: Arc<load::Control>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while load::next_tick(&mut tick, &mut stop).await {
        for (name, cumulative, window) in load::merged_models(&control) {
            for (scope, m) in [("cumulative", &cumulative), ("window", &window)] {
                let labels = [("model", name.clone()), ("scope", scope.to_string())];
                let set = |metric: &'static str, v: Option<f64>| {
                    if let Some(v) = v {
                        metrics::gauge!(metric, &labels).set(v);
                    }
                };
                set("ctr_scorer_model_log_loss", m.log_loss());
                set("ctr_scorer_model_ne", m.normalized_entropy());
                set("ctr_scorer_model_auc", m.auc());
                set("ctr_scorer_model_calibration", m.calibration());
                set("ctr_scorer_model_examples", Some(m.weight()));
            }
        }
    }
}

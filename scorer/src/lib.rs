//! `ctr-scorer`: learns CTR from labeled impressions and publishes it.
//!
//! - [`config`]: the service's settings.
//! - [`state`]: one partition's state (models, dedupe, sampling) and what a record does to it.
//! - [`hold`]: clicks held until the negatives of their time have arrived.
//! - [`worker`]: keyed workers, each the single owner of its partitions' state.
//! - [`consumer`]: the Kafka consumer-group loop that feeds the workers.
//! - [`publish`]: the Redis key layout and the atomic, offset-fenced apply of a batch.
//! - [`checkpoint`]: durable per-partition snapshots with their offsets.
//! - [`deadletter`]: poison records to the dead-letter topic, delivered before checkpoints.
//! - [`load`]: load shedding and the learning guard.
//! - [`serving`]: what a serving replica holds of a partition, the owners' deltas that keep it
//!   current, and its answer for any ad in any context (pure).
//! - [`replica`]: the model replica of every API process: checkpoints, then the model streams.
//! - [`api`]: the HTTP API (`POST /v1/rank`, `GET /v1/ctr`, OpenAPI, health, metrics),
//!   answered from the replica.
//! - [`monitor`]: model health reports and the system-wide view of them.
//! - [`dashboard`]: the monitoring page and `GET /v1/monitor`.
//! - [`run`]: wires them together; `main.rs` only parses settings and calls it.

pub mod api;
pub mod checkpoint;
pub mod config;
pub mod consumer;
pub mod dashboard;
pub mod deadletter;
pub mod hold;
pub mod load;
pub mod monitor;
pub mod publish;
pub mod replica;
pub mod serving;
pub mod state;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::info;

pub use config::{ScorerArgs, ScorerConfig};

/// Why the scorer stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("worker: {0}")]
    Worker(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the consumer, the workers, the guard, the model replica and the HTTP API until
/// `shutdown` resolves or one of them fails; with `serve_only`, just the replica and the API.
pub async fn run(
    config: ScorerConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = Arc::new(config);
    let redis = redis_client(&config.redis_url, config.redis_ca_file.as_deref())?;
    // One plain connection first: refused credentials or an unreachable Redis are an error at
    // start, where the reconnecting manager below would retry them silently.
    let _: String = redis::cmd("PING")
        .query_async(&mut redis.get_multiplexed_async_connection().await?)
        .await?;
    // Checkpoints are megabytes: allow them more than redis-rs's default 500 ms response
    // timeout, which a busy Redis writing its append-only file can exceed.
    let manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)));
    let conn = redis
        .get_connection_manager_with_config(manager_config.clone())
        .await?;
    let partitions = labeled_partitions(&config).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let replica = Arc::new(replica::Replica::new(
        &config.models,
        &config.serve_model,
        partitions,
    ));
    // The replica's blocking stream reads get a connection of their own: on a shared
    // multiplexed connection they would hold up every command queued behind them.
    let following = tokio::spawn(replica::follow(
        Arc::clone(&replica),
        redis
            .get_connection_manager_with_config(manager_config)
            .await?,
        checkpoint::CheckpointStore::new(conn.clone(), &config.redis_prefix, &config.labeled_topic),
        config.redis_prefix.clone(),
        config.labeled_topic.clone(),
        stop_rx.clone(),
    ));
    let view = Arc::new(monitor::Monitor::default());
    tokio::spawn(monitor::collect(
        Arc::clone(&config),
        Arc::clone(&view),
        conn.clone(),
        stop_rx.clone(),
    ));
    info!(addr = %listener.local_addr()?, partitions, model = %config.serve_model,
          serve_only = config.serve_only, "HTTP API listening (dashboard at /dashboard/)");
    if config.serve_only {
        let api = api::serve(
            listener,
            api::ApiState::new(&config, Arc::clone(&replica), metrics, None, view),
            stop_rx.clone(),
        );
        let (a, f) = tokio::join!(api, following);
        f.map_err(|e| Error::Worker(format!("the model replica stopped: {e}")))?;
        return a;
    }
    let control = Arc::new(load::Control::default());
    tokio::spawn(load::guard(
        Arc::clone(&control),
        conn.clone(),
        format!("{}signal:joiner", config.redis_prefix),
        stop_rx.clone(),
    ));
    tokio::spawn(report_models(Arc::clone(&control), stop_rx.clone()));
    let instance = format!("{}-{}", config.group, std::process::id());
    let reporting = tokio::spawn(monitor::report(
        Arc::clone(&config),
        Arc::clone(&control),
        conn.clone(),
        instance,
        stop_rx.clone(),
    ));
    let api = api::serve(
        listener,
        api::ApiState::new(
            &config,
            Arc::clone(&replica),
            metrics,
            Some(Arc::clone(&control)),
            view,
        ),
        stop_rx.clone(),
    );
    let consume = consumer::run(Arc::clone(&config), conn, control, stop_rx);
    let (a, c) = tokio::join!(api, consume);
    // The report leaves the dashboard's view as the process stops.
    let _ = reporting.await;
    let _ = following.await;
    a?;
    c
}

/// Partitions of the labeled topic, from the broker's metadata: the replica holds each.
async fn labeled_partitions(config: &ScorerConfig) -> Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()?;
    let topic = config.labeled_topic.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        consumer.fetch_metadata(Some(&topic), Duration::from_secs(30))
    })
    .await
    .map_err(|e| Error::Worker(format!("reading the topic's metadata: {e}")))??;
    let partitions = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        return Err(Error::Config(format!(
            "labeled topic `{}` not found on the broker (or it has no partitions)",
            config.labeled_topic
        )));
    }
    Ok(partitions)
}

/// The wall clock, Unix ms (ages and freshness; never part of the models' state).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The Redis client for `url`: a `rediss://` URL is verified against `ca_file` (PEM) if given,
/// else against the system's trusted roots.
fn redis_client(url: &str, ca_file: Option<&std::path::Path>) -> Result<redis::Client> {
    // rustls needs a process-wide crypto provider; a second install is refused, harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(path) = ca_file else {
        return Ok(redis::Client::open(url)?);
    };
    let pem = std::fs::read(path)
        .map_err(|e| Error::Config(format!("redis_ca_file {}: {e}", path.display())))?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    Ok(redis::Client::build_with_tls(url, certs)?)
}

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

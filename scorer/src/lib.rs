//! `ctr-scorer`: learns CTR from labeled impressions and publishes it.
//!
//! - [`config`]: the service's settings.
//! - [`publish`]: the Redis key layout and the atomic, offset-fenced apply of a batch.
//! - [`consumer`]: the Kafka consumer-group loop (one owner per partition, hence per ad).
//! - [`api`]: the HTTP API (`GET /v1/ctr`, health, metrics).
//! - [`run`]: wires them together; `main.rs` only parses settings and calls it.

pub mod api;
pub mod config;
pub mod consumer;
pub mod publish;
pub mod state;

use std::future::Future;

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs the consumer loop and the HTTP API until `shutdown` resolves or either fails.
pub async fn run(
    config: ScorerConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let redis = redis::Client::open(config.redis_url.as_str())?;
    let conn = redis.get_connection_manager().await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    info!(addr = %listener.local_addr()?, "HTTP API listening");
    let api = api::serve(
        listener,
        api::ApiState::new(&config, conn.clone(), metrics),
        stop_rx.clone(),
    );
    let consume = consumer::run(&config, conn, stop_rx);
    let (a, c) = tokio::join!(api, consume);
    a?;
    c
}

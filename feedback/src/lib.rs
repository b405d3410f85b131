//! `ctr-feedback`: the impression–click joiner.
//!
//! - [`join`]: the pure state machine of one partition pair (no I/O; a backtest may use it).
//! - [`config`]: settings. [`checkpoint`]: durable join state with input offsets.
//! - [`signals`]: click coverage and the stall detector the scorer acts on.
//! - [`service`]: Kafka around it all. [`run`] adds the HTTP endpoint for metrics.

pub mod checkpoint;
pub mod config;
pub mod join;
pub mod service;
pub mod signals;

use std::future::Future;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

pub use config::{FeedbackArgs, FeedbackConfig};
pub use service::FeedbackError;

/// Runs the joiner and its `/metrics` + `/healthz` endpoint until `shutdown` resolves.
pub async fn run(
    cfg: FeedbackConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FeedbackError> {
    let client = redis::Client::open(cfg.redis_url.as_str())?;
    // One plain connection first: refused credentials or an unreachable Redis are an error at
    // start, where the reconnecting manager below would retry them silently.
    let _: String = redis::cmd("PING")
        .query_async(&mut client.get_multiplexed_async_connection().await?)
        .await?;
    // Checkpoints can be large: allow them more than redis-rs's default 500 ms response
    // timeout, which a busy Redis writing its append-only file can exceed.
    let redis = client
        .get_connection_manager_with_config(
            redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(std::time::Duration::from_secs(10))),
        )
        .await?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let page = metrics
                    .as_ref()
                    .map(PrometheusHandle::render)
                    .unwrap_or_default();
                async move { page }
            }),
        );
    let mut http_stop = stop_rx.clone();
    let http = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = http_stop.wait_for(|s| *s).await;
    });
    let joiner = service::run_joiner(cfg, redis, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    });
    let (h, j) = tokio::join!(http, joiner);
    h?;
    j
}

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
/// The Redis client for `url`: a `rediss://` URL is verified against `ca_file` (PEM) if given,
/// else against the system's trusted roots.
fn redis_client(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<redis::Client, FeedbackError> {
    // rustls needs a process-wide crypto provider; a second install is refused, harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(path) = ca_file else {
        return Ok(redis::Client::open(url)?);
    };
    let pem = std::fs::read(path).map_err(|source| FeedbackError::RedisCa {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    Ok(redis::Client::build_with_tls(url, certs)?)
}

pub async fn run(
    cfg: FeedbackConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FeedbackError> {
    let client = redis_client(&cfg.redis_url, cfg.redis_ca_file.as_deref())?;
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

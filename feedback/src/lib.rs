//! `ctr-feedback`: the impression–click joiner.
//!
//! - [`join`]: the pure state machine of one partition pair (no I/O; a backtest may use it).
//! - [`config`]: settings. [`checkpoint`]: durable join state with input offsets.
//! - [`signals`]: click coverage and the stall detector the scorer acts on.
//! - [`service`]: Kafka around it all. [`run`] supervises it beside the HTTP endpoint.

pub mod checkpoint;
pub mod config;
pub mod join;
pub mod service;
pub mod signals;

use std::future::Future;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use ctr_runtime::{Liveness, Supervisor};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

pub use config::{FeedbackArgs, FeedbackConfig};
pub use service::FeedbackError;

/// Why the joiner process stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Start-up failed: a setting, a dependency or the topics.
    #[error(transparent)]
    Start(#[from] FeedbackError),
    /// A supervised task (the join loop or HTTP) failed, panicked or ended early.
    #[error(transparent)]
    Task(#[from] ctr_runtime::TaskFailed),
}

/// Runs the joiner and its `/metrics` + `/healthz` endpoint under a supervisor until
/// `shutdown` resolves or either fails; the joiner checkpoints everything on the way out.
pub async fn run(
    cfg: FeedbackConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let redis = ctr_runtime::redis::Redis::connect(
        &cfg.service.redis_url,
        cfg.service.redis_ca_file.as_deref(),
        cfg.service.redis_cluster,
        cfg.service.policy,
    )
    .await
    .map_err(FeedbackError::from)?;
    let conn = redis.manager().await.map_err(FeedbackError::from)?;
    // Draining is the final checkpoint: it may have to ride out an outage of its own.
    let mut supervisor = Supervisor::new(cfg.service.policy.drain_time());
    let liveness = Liveness::default();
    let heartbeat = liveness.register("joiner", cfg.service.policy.longest_step());
    let app = Router::new()
        .route(
            "/healthz",
            get(move || {
                let health = liveness.check();
                async move {
                    match health {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(stale) => (StatusCode::SERVICE_UNAVAILABLE, stale),
                    }
                }
            }),
        )
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
    let mut http_stop = supervisor.stop_signal();
    supervisor.spawn("HTTP endpoint", async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                ctr_runtime::process::stopped(&mut http_stop).await;
            })
            .await
    });
    let stop = supervisor.stop_signal();
    supervisor.spawn("joiner", service::run_joiner(cfg, conn, heartbeat, stop));
    supervisor.run(shutdown).await?;
    Ok(())
}

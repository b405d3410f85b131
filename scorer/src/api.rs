//! The HTTP API: `GET /v1/ctr`, `/healthz`, `/metrics`.
//!
//! Reads come from Redis (the scorer's own writes), so any number of API processes can serve
//! reads while partition owners write. Errors are JSON `{"error": "..."}` naming the problem;
//! internal detail (a Redis error) goes to the log, and the client gets a 503.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ctr_models::BetaPrior;
use ctr_schemas::Context;
use ctr_schemas::events::check_token;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::config::ScorerConfig;
use crate::publish::{ad_context_key, ad_key};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    redis: ConnectionManager,
    prefix: String,
    prior: BetaPrior,
    metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl ApiState {
    pub fn new(
        cfg: &ScorerConfig,
        redis: ConnectionManager,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            redis,
            prefix: cfg.redis_prefix.clone(),
            prior: cfg.prior,
            metrics,
        }
    }
}

/// How an estimate was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// From this ad in exactly this context.
    Exact,
    /// This context is unseen for the ad: the ad's totals over all contexts.
    BackedOff,
    /// Nothing known about the ad: the prior.
    Prior,
}

/// Answer of `GET /v1/ctr`.
#[derive(Debug, Serialize)]
pub struct CtrResponse {
    pub ad_id: String,
    pub context_key: String,
    pub pctr: f64,
    pub impressions: u64,
    pub clicks: u64,
    pub source: Source,
}

/// A client error: status plus a message that names the problem.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/ctr", get(get_ctr))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    mut stop: watch::Receiver<bool>,
) -> crate::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

async fn metrics(State(s): State<ApiState>) -> Response {
    match &s.metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics not enabled").into_response(),
    }
}

/// Builds the context from query parameters: the three fixed fields are required; any other
/// parameter except `ad_id` is an extra context field.
fn context_from_query(q: &HashMap<String, String>) -> Result<Context, ApiError> {
    let field = |name: &str| {
        q.get(name).cloned().ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("missing query parameter `{name}`"),
            )
        })
    };
    let extra: BTreeMap<String, String> = q
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "ad_id" | "query_category" | "geo" | "device"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let ctx = Context {
        query_category: field("query_category")?,
        geo: field("geo")?,
        device: field("device")?,
        extra,
    };
    ctx.validate()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(ctx)
}

async fn get_ctr(
    State(mut s): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<CtrResponse>, ApiError> {
    let ad_id = q.get("ad_id").cloned().ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "missing query parameter `ad_id`".into(),
        )
    })?;
    check_token("ad_id", &ad_id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let ctx = context_from_query(&q)?;
    let context_key = ctx.key();
    let unavailable = |e: redis::RedisError| {
        warn!(error = %e, "Redis read failed");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "estimate store unavailable; retry".into(),
        )
    };
    for (key, source) in [
        (
            ad_context_key(&s.prefix, &ad_id, &context_key),
            Source::Exact,
        ),
        (ad_key(&s.prefix, &ad_id), Source::BackedOff),
    ] {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut s.redis)
            .await
            .map_err(unavailable)?;
        let num = |f: &str| h.get(f).and_then(|v| v.parse::<u64>().ok());
        if let (Some(impressions), Some(clicks)) = (num("imps"), num("clicks")) {
            let pctr = s.prior.posterior_mean(clicks as f64, impressions as f64);
            return Ok(Json(CtrResponse {
                ad_id,
                context_key,
                pctr,
                impressions,
                clicks,
                source,
            }));
        }
    }
    Ok(Json(CtrResponse {
        ad_id,
        context_key,
        pctr: s.prior.mean(),
        impressions: 0,
        clicks: 0,
        source: Source::Prior,
    }))
}

//! The HTTP API the search frontend calls: `POST /v1/rank`, `GET /v1/ctr`, the OpenAPI
//! document at `/openapi.json`, `/healthz`, `/readyz`, `/metrics`.
//!
//! Reads come from Redis (the partition owners' writes, [`crate::publish`]) through a local
//! cache that keeps each answer for `api_cache_ms`, so any number of API processes can serve
//! reads while the owners write (Dada's split of reads from writes). The `/v1` routes share
//! one concurrency limit: a request beyond it gets `503` with `Retry-After: 1` at once instead
//! of waiting in a queue, and a request over its deadline gets `503` too. Errors are JSON
//! `{"error": "..."}` naming the problem (the JSON path of a bad field); internal detail (a
//! Redis error) goes to the log, and the client gets a 503.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Json, Router};
use ctr_schemas::Context;
use ctr_schemas::events::check_token;
use metrics_exporter_prometheus::PrometheusHandle;
use moka::sync::Cache;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tracing::warn;
use utoipa::{OpenApi, ToSchema};

use crate::config::ScorerConfig;
use crate::load::Control;
use crate::publish::{ad_context_key, ad_key};

/// Most candidates in one ranking request.
pub const MAX_CANDIDATES: usize = 1_000;
/// Largest request body, bytes.
pub const MAX_BODY: usize = 1 << 20;

/// What Redis holds for one key (the fields the API uses).
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    pctr: f64,
    source: Source,
    model_version: String,
    impressions: u64,
    clicks: u64,
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    redis: ConnectionManager,
    prefix: String,
    prior_mean: f64,
    metrics: Option<PrometheusHandle>,
    control: Arc<Control>,
    /// Key → what Redis held (`None`: nothing), kept for the cache TTL.
    cache: Option<Cache<String, Option<Arc<Stored>>>>,
    limits: (usize, Duration),
    monitor: Arc<crate::monitor::Monitor>,
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
        control: Arc<Control>,
        monitor: Arc<crate::monitor::Monitor>,
    ) -> Self {
        let cache = (!cfg.api_cache_ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(cfg.api_cache_ttl)
                .build()
        });
        Self {
            redis,
            prefix: cfg.redis_prefix.clone(),
            prior_mean: cfg.prior.mean(),
            metrics,
            control,
            cache,
            limits: (cfg.api_max_concurrency, cfg.api_timeout),
            monitor,
        }
    }
}

/// How an estimate was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// From this ad in exactly this context.
    Exact,
    /// This context is unseen for the ad: the ad's evidence over all contexts.
    BackedOff,
    /// Nothing known about the ad: the prior.
    Prior,
}

impl Source {
    fn parse(s: &str) -> Self {
        match s {
            "exact" => Source::Exact,
            "backed_off" => Source::BackedOff,
            _ => Source::Prior,
        }
    }
}

/// Answer of `GET /v1/ctr`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CtrResponse {
    pub ad_id: String,
    pub context_key: String,
    /// Calibrated click probability at the top slot.
    pub pctr: f64,
    /// Exact totals behind the key that answered (0 for the prior).
    pub impressions: u64,
    pub clicks: u64,
    pub source: Source,
    /// `model@offset` of the estimate; absent for the prior.
    pub model_version: Option<String>,
}

/// One ad the frontend may show.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub ad_id: String,
    /// Bid per click, any currency unit; finite and >= 0.
    pub bid: f64,
    #[serde(default)]
    pub campaign_id: Option<String>,
}

/// Body of `POST /v1/rank`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RankRequest {
    /// The query context: `query_category`, `geo` and `device` are required; any other field
    /// is an extra context field.
    pub context: BTreeMap<String, String>,
    /// 1 to 1000 candidates with distinct ad IDs.
    pub candidates: Vec<Candidate>,
    /// How many to return (default: all).
    #[serde(default)]
    pub k: Option<usize>,
}

/// One ranked ad.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ranked {
    pub ad_id: String,
    pub bid: f64,
    pub pctr: f64,
    /// `bid × pctr`: the expected value of showing the ad, the ranking key.
    pub score: f64,
    pub source: Source,
    pub model_version: Option<String>,
}

/// Answer of `POST /v1/rank`: candidates by descending score (ties by ad ID).
#[derive(Debug, Serialize, ToSchema)]
pub struct RankResponse {
    pub context_key: String,
    pub ranked: Vec<Ranked>,
}

/// Every error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// A client or availability error: status plus a message that names the problem.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }

    fn unavailable(msg: &str) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ctr-scorer ranking API",
        description = "Calibrated pCTR per ad and context, and ranking of candidate ads by bid × pCTR."
    ),
    paths(rank, get_ctr),
    components(schemas(
        RankRequest,
        Candidate,
        RankResponse,
        Ranked,
        CtrResponse,
        Source,
        ErrorBody
    ))
)]
struct ApiDoc;

/// The OpenAPI document.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

async fn overloaded(err: BoxError) -> ApiError {
    if err.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("ctr_api_rejected_total", "reason" => "overload").increment(1);
        ApiError::unavailable("overloaded; retry shortly")
    } else if err.is::<tower::timeout::error::Elapsed>() {
        metrics::counter!("ctr_api_rejected_total", "reason" => "timeout").increment(1);
        ApiError::unavailable("deadline exceeded; retry shortly")
    } else {
        warn!(error = %err, "request failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

pub fn router(state: ApiState) -> Router {
    let (max_concurrency, timeout) = state.limits;
    let dashboard = crate::dashboard::router(Arc::clone(&state.monitor));
    let v1 = Router::new()
        .route("/v1/rank", post(rank))
        .route("/v1/ctr", get(get_ctr))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    max_concurrency,
                ))
                .timeout(timeout),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY));
    Router::new()
        .merge(v1)
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(dashboard)
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

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    match &s.metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics not enabled").into_response(),
    }
}

/// Ready when the estimate store answers. Also says whether learning is paused.
async fn readyz(State(mut s): State<ApiState>) -> Response {
    let ping: redis::RedisResult<String> = tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("PING").query_async(&mut s.redis),
    )
    .await
    .unwrap_or_else(|_| Err(redis::RedisError::from(std::io::Error::other("timeout"))));
    let learning = s.control.learning();
    match ping {
        Ok(_) => Json(serde_json::json!({ "ready": true, "learning": learning })).into_response(),
        Err(e) => {
            warn!(error = %e, "readiness: Redis unreachable");
            ApiError::unavailable("estimate store unreachable").into_response()
        }
    }
}

/// Builds a context from `name → value` fields (`ad_id` excluded: it names the ad, as a query
/// parameter of `GET /v1/ctr`): the three fixed ones are required.
fn context_from(fields: &BTreeMap<String, String>, path: &str) -> Result<Context, ApiError> {
    let mut fields = fields.clone();
    fields.remove("ad_id");
    Context::from_fields(fields).map_err(|e| {
        let field = e.field.strip_prefix("context").unwrap_or(e.field);
        ApiError::bad(format!("{path}{field}: {}", e.problem))
    })
}

impl ApiState {
    /// What Redis holds for `keys`, through the cache; one pipelined round trip for misses.
    async fn lookup(&mut self, keys: &[String]) -> Result<Vec<Option<Arc<Stored>>>, ApiError> {
        let mut out: Vec<Option<Option<Arc<Stored>>>> = keys
            .iter()
            .map(|k| self.cache.as_ref().and_then(|c| c.get(k)))
            .collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
        metrics::counter!("ctr_api_cache_hits_total")
            .increment((keys.len() - missing.len()) as u64);
        metrics::counter!("ctr_api_cache_misses_total").increment(missing.len() as u64);
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &missing {
                pipe.cmd("HMGET")
                    .arg(&keys[i])
                    .arg(&["pctr", "src", "model", "ver", "imps", "clicks"]);
            }
            type Fields = Vec<Option<String>>;
            let rows: Vec<Fields> = pipe.query_async(&mut self.redis).await.map_err(|e| {
                warn!(error = %e, "Redis read failed");
                ApiError::unavailable("estimate store unavailable; retry")
            })?;
            for (&i, row) in missing.iter().zip(rows) {
                let stored = parse_stored(&row).map(Arc::new);
                if let Some(c) = &self.cache {
                    c.insert(keys[i].clone(), stored.clone());
                }
                out[i] = Some(stored);
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }

    /// The estimate for `ad` in `ctx_key`: the exact key, else the ad's, else the prior.
    fn answer(
        &self,
        exact: Option<&Arc<Stored>>,
        whole: Option<&Arc<Stored>>,
    ) -> (f64, Source, Option<String>, u64, u64) {
        match (exact, whole) {
            (Some(s), _) => (
                s.pctr,
                s.source,
                Some(s.model_version.clone()),
                s.impressions,
                s.clicks,
            ),
            (None, Some(s)) => (
                s.pctr,
                Source::BackedOff,
                Some(s.model_version.clone()),
                s.impressions,
                s.clicks,
            ),
            (None, None) => (self.prior_mean, Source::Prior, None, 0, 0),
        }
    }
}

/// Parses an HMGET row; `None` when the key holds no estimate yet.
fn parse_stored(row: &[Option<String>]) -> Option<Stored> {
    let get = |i: usize| row.get(i).and_then(|v| v.as_deref());
    let pctr = get(0)?.parse::<f64>().ok().filter(|p| p.is_finite())?;
    let num = |i: usize| get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(Stored {
        pctr,
        source: Source::parse(get(1).unwrap_or("")),
        model_version: format!("{}@{}", get(2).unwrap_or("unknown"), get(3).unwrap_or("0")),
        impressions: num(4),
        clicks: num(5),
    })
}

/// Parses a JSON body; the error names the path of the offending field.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path == "?" {
            ApiError::bad(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Parses and checks a `POST /v1/rank` body: the request and its context, or the error the
/// client gets (the handler's whole input handling, pure, so it can be fuzzed).
pub fn parse_rank(body: &[u8]) -> Result<(RankRequest, Context), ApiError> {
    let req: RankRequest = parse_json(body)?;
    let ctx = check_rank(&req)?;
    Ok((req, ctx))
}

/// Checks a ranking request; returns its context.
fn check_rank(req: &RankRequest) -> Result<Context, ApiError> {
    let ctx = context_from(&req.context, "context")?;
    if req.candidates.is_empty() || req.candidates.len() > MAX_CANDIDATES {
        return Err(ApiError::bad(format!(
            "candidates: need 1 to {MAX_CANDIDATES}, got {}",
            req.candidates.len()
        )));
    }
    let mut seen = HashSet::new();
    for (i, c) in req.candidates.iter().enumerate() {
        check_token("ad_id", &c.ad_id)
            .map_err(|e| ApiError::bad(format!("candidates[{i}]: {e}")))?;
        if !seen.insert(c.ad_id.as_str()) {
            return Err(ApiError::bad(format!(
                "candidates[{i}].ad_id: `{}` appears twice",
                c.ad_id
            )));
        }
        if !(c.bid.is_finite() && c.bid >= 0.0) {
            return Err(ApiError::bad(format!(
                "candidates[{i}].bid: must be a finite number >= 0"
            )));
        }
        if let Some(campaign) = &c.campaign_id {
            check_token("campaign_id", campaign)
                .map_err(|e| ApiError::bad(format!("candidates[{i}]: {e}")))?;
        }
    }
    if req.k == Some(0) {
        return Err(ApiError::bad("k: must be >= 1"));
    }
    Ok(ctx)
}

#[utoipa::path(
    post,
    path = "/v1/rank",
    request_body = RankRequest,
    responses(
        (status = 200, description = "Candidates by descending bid × pCTR", body = RankResponse),
        (status = 400, description = "Malformed request; the message names the field", body = ErrorBody),
        (status = 413, description = "Body larger than 1 MiB"),
        (status = 503, description = "Overloaded or estimate store unavailable; see Retry-After", body = ErrorBody)
    )
)]
async fn rank(State(mut s): State<ApiState>, body: Bytes) -> Result<Json<RankResponse>, ApiError> {
    let started = Instant::now();
    let (req, ctx) = parse_rank(&body)?;
    let context_key = ctx.key();
    let mut keys = Vec::with_capacity(2 * req.candidates.len());
    for c in &req.candidates {
        keys.push(ad_context_key(&s.prefix, &c.ad_id, &context_key));
        keys.push(ad_key(&s.prefix, &c.ad_id));
    }
    let found = s.lookup(&keys).await?;
    let mut ranked: Vec<Ranked> = req
        .candidates
        .into_iter()
        .zip(found.chunks(2))
        .map(|(c, f)| {
            let (pctr, source, model_version, _, _) = s.answer(f[0].as_ref(), f[1].as_ref());
            Ranked {
                score: c.bid * pctr,
                ad_id: c.ad_id,
                bid: c.bid,
                pctr,
                source,
                model_version,
            }
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.ad_id.cmp(&b.ad_id))
    });
    ranked.truncate(req.k.unwrap_or(usize::MAX));
    metrics::histogram!("ctr_api_request_seconds", "route" => "rank")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(RankResponse {
        context_key,
        ranked,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/ctr",
    params(
        ("ad_id" = String, Query, description = "The ad"),
        ("query_category" = String, Query, description = "Context field"),
        ("geo" = String, Query, description = "Context field"),
        ("device" = String, Query, description = "Context field"),
    ),
    responses(
        (status = 200, description = "The estimate; other query parameters are extra context fields", body = CtrResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 503, description = "Overloaded or estimate store unavailable", body = ErrorBody)
    )
)]
async fn get_ctr(
    State(mut s): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<CtrResponse>, ApiError> {
    let started = Instant::now();
    let ad_id = q
        .get("ad_id")
        .cloned()
        .ok_or_else(|| ApiError::bad("missing query parameter `ad_id`"))?;
    check_token("ad_id", &ad_id).map_err(|e| ApiError::bad(e.to_string()))?;
    let fields: BTreeMap<String, String> = q.into_iter().collect();
    let ctx = context_from(&fields, "query")?;
    let context_key = ctx.key();
    let keys = [
        ad_context_key(&s.prefix, &ad_id, &context_key),
        ad_key(&s.prefix, &ad_id),
    ];
    let found = s.lookup(&keys).await?;
    let (pctr, source, model_version, impressions, clicks) =
        s.answer(found[0].as_ref(), found[1].as_ref());
    metrics::histogram!("ctr_api_request_seconds", "route" => "ctr")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(CtrResponse {
        ad_id,
        context_key,
        pctr,
        impressions,
        clicks,
        source,
        model_version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<Context, ApiError> {
        let r: RankRequest = parse_json(json.as_bytes())?;
        check_rank(&r)
    }

    const CTX: &str = r#""context":{"query_category":"travel","geo":"US","device":"mobile"}"#;

    #[test]
    fn a_good_request_passes() {
        let ctx = req(&format!(
            r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":1.5}},{{"ad_id":"b","bid":0,"campaign_id":"c"}}],"k":1}}"#
        ))
        .unwrap();
        assert_eq!(ctx.key(), "device=mobile|geo=US|query_category=travel");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":"x"}}]}}"#),
                "candidates[0].bid",
            ),
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a"}}]}}"#),
                "candidates[0]: missing field `bid`",
            ),
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":1,"x":1}}]}}"#),
                "unknown field `x`",
            ),
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":-1}}]}}"#),
                "candidates[0].bid: must be",
            ),
            (
                format!(
                    r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":1}},{{"ad_id":"a","bid":2}}]}}"#
                ),
                "candidates[1].ad_id",
            ),
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a:b","bid":1}}]}}"#),
                "candidates[0]: invalid field `ad_id`",
            ),
            (format!(r#"{{{CTX},"candidates":[]}}"#), "candidates: need"),
            (
                r#"{"context":{"geo":"US","device":"m"},"candidates":[{"ad_id":"a","bid":1}]}"#
                    .into(),
                "context.query_category: missing",
            ),
            ("{".into(), "invalid JSON body"),
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":1}}]}} trailing"#),
                "invalid JSON body",
            ),
            (
                format!(r#"{{{CTX},"candidates":[{{"ad_id":"a","bid":1}}],"k":0}}"#),
                "k: must be",
            ),
        ];
        for (body, expected) in cases {
            let err = req(&body).unwrap_err();
            assert_eq!(err.0, StatusCode::BAD_REQUEST, "{body}");
            assert!(err.1.contains(expected), "{body}: got `{}`", err.1);
        }
        let bytes = [0xff, 0xfe, b'{'];
        assert!(parse_json::<RankRequest>(&bytes).is_err());
    }

    #[test]
    fn stored_rows_parse_or_are_absent() {
        let row = |v: &[Option<&str>]| v.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
        let s = parse_stored(&row(&[
            Some("0.05"),
            Some("exact"),
            Some("counts"),
            Some("42"),
            Some("100"),
            Some("5"),
        ]))
        .unwrap();
        assert_eq!(s.model_version, "counts@42");
        assert_eq!(s.source, Source::Exact);
        assert!(parse_stored(&row(&[None, None, None, None, Some("3"), Some("1")])).is_none());
        assert!(parse_stored(&row(&[Some("NaN"), None, None, None, None, None])).is_none());
    }

    #[test]
    fn the_openapi_document_lists_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(doc["paths"]["/v1/rank"]["post"].is_object());
        assert!(doc["paths"]["/v1/ctr"]["get"].is_object());
        assert!(doc["components"]["schemas"]["RankRequest"].is_object());
    }
}

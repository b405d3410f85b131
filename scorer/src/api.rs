//! The HTTP API the search frontend calls: `POST /v1/rank`, `GET /v1/ctr`, the OpenAPI
//! document at `/openapi.json`, `/healthz`, `/readyz`, `/metrics`.
//!
//! Answers come from the process's model replica ([`crate::replica`]): the serving variant of
//! every partition, evaluated per candidate for the request's context, so any context and any
//! ad get the model's answer (the count model's back-off levels, FTRL's crossed weights, a new
//! ad's campaign), with no Redis round trip per request. The `/v1` routes share one
//! concurrency limit: a request beyond it gets `503` with `Retry-After: 1` at once instead of
//! waiting in a queue, and a request over its deadline gets `503` too; until the replica has
//! caught up with the owners they answer `503` as well. Errors are JSON `{"error": "..."}`
//! naming the problem (the JSON path of a bad field).

use std::collections::{BTreeMap, HashMap};
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
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tracing::warn;
use utoipa::{OpenApi, ToSchema};

use crate::config::ScorerConfig;
use crate::load::Control;
use crate::replica::Replica;
use crate::serving::{Answer, Evidence, RequestContext};

/// Most candidates in one ranking request.
pub const MAX_CANDIDATES: usize = 1_000;
/// Largest request body, bytes.
pub const MAX_BODY: usize = 1 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    replica: Arc<Replica>,
    metrics: Option<PrometheusHandle>,
    /// The learning side's switches; `None` in a serving-only process.
    control: Option<Arc<Control>>,
    limits: (usize, Duration),
    monitor: Arc<crate::monitor::Monitor>,
    /// The process's work loops, for `/healthz`.
    liveness: ctr_runtime::Liveness,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("model", &self.replica.model())
            .finish()
    }
}

impl ApiState {
    /// The handlers' state: the replica that answers, and the limits from `cfg`.
    pub fn new(
        cfg: &ScorerConfig,
        replica: Arc<Replica>,
        metrics: Option<PrometheusHandle>,
        control: Option<Arc<Control>>,
        monitor: Arc<crate::monitor::Monitor>,
        liveness: ctr_runtime::Liveness,
    ) -> Self {
        Self {
            replica,
            metrics,
            control,
            limits: (cfg.api_max_concurrency, cfg.api_timeout),
            monitor,
            liveness,
        }
    }
}

/// The evidence behind an estimate (the serving model evaluates every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// This ad has been seen in exactly this context.
    Exact,
    /// The ad is known, but not in this full context: the model's back-off (the count
    /// model's ad × field levels, FTRL's ad and crossed weights).
    BackedOff,
    /// Nothing is known about the ad: its campaign's rate (if the request or the model knows
    /// the campaign), else the global rate.
    Prior,
}

impl From<Evidence> for Source {
    fn from(e: Evidence) -> Self {
        match e {
            Evidence::Exact => Source::Exact,
            Evidence::BackedOff => Source::BackedOff,
            Evidence::Prior => Source::Prior,
        }
    }
}

/// Answer of `GET /v1/ctr`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CtrResponse {
    /// The ad asked about.
    pub ad_id: String,
    /// The context as [`ctr_schemas::Context::key`] writes it (fields sorted by name).
    pub context_key: String,
    /// Calibrated click probability at the top slot.
    pub pctr: f64,
    /// Exact totals behind the evidence: the ad in this context, else the ad over all
    /// contexts (0 for an unknown ad).
    pub impressions: u64,
    /// Clicks behind the evidence, as `impressions`.
    pub clicks: u64,
    /// How the model obtained the estimate.
    pub source: Source,
    /// `model@offset`: the serving variant and the last offset of the ad's partition the
    /// replica reflects; absent before the partition's first record.
    pub model_version: Option<String>,
}

/// One ad the frontend may show.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// The ad's ID (unique among the candidates).
    pub ad_id: String,
    /// Bid per click, any currency unit; finite and >= 0.
    pub bid: f64,
    /// The ad's campaign: a new ad is estimated from it. Without it the campaign the model
    /// last saw for the ad is used.
    #[serde(default)]
    pub campaign_id: Option<String>,
}

/// Body of `POST /v1/rank`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RankRequest {
    /// The query context: `query_category`, `geo` and `device` are required; any other field
    /// is an extra context field, evaluated as the model learned it (a field it never saw
    /// adds nothing).
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
    /// The candidate's ad ID.
    pub ad_id: String,
    /// Its bid, as given.
    pub bid: f64,
    /// Calibrated click probability at the top slot.
    pub pctr: f64,
    /// `bid × pctr`: the expected value of showing the ad, the ranking key.
    pub score: f64,
    /// How the model obtained `pctr`.
    pub source: Source,
    /// `model@offset` of the ad's partition (see [`CtrResponse::model_version`]).
    pub model_version: Option<String>,
}

/// Answer of `POST /v1/rank`: candidates by descending score (ties by ad ID).
#[derive(Debug, Serialize, ToSchema)]
pub struct RankResponse {
    /// The request's context as [`ctr_schemas::Context::key`] writes it.
    pub context_key: String,
    /// The first `k` candidates by descending score.
    pub ranked: Vec<Ranked>,
}

/// Every error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong, in words.
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

/// The ranking API's routes (`/v1/ctr`, `/v1/rank`, the OpenAPI document) with their limits.
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
        .route("/healthz", get(healthz))
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
            ctr_runtime::process::stopped(&mut stop).await;
        })
        .await?;
    Ok(())
}

/// `200 ok` while every work loop of the process (consumer, workers, replica) steps within its
/// bound; else `503` naming the stale ones. The HTTP server answering is not enough: a process
/// whose loops are wedged is not alive.
async fn healthz(State(s): State<ApiState>) -> Response {
    match s.liveness.check() {
        Ok(()) => "ok".into_response(),
        Err(stale) => (StatusCode::SERVICE_UNAVAILABLE, stale).into_response(),
    }
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

/// Ready when the replica has caught up with the owners (see [`crate::replica`]); says how
/// far behind and how old its model is, and whether this process's learning is paused.
async fn readyz(State(s): State<ApiState>) -> Response {
    let status = s.replica.status();
    let learning = s.control.as_ref().map(|c| c.learning());
    let body = serde_json::json!({
        "ready": status.ready,
        "learning": learning,
        "replica": status,
    });
    let code = if body["ready"] == true {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// `503` until the replica has caught up: an answer from a half-restored model is wrong.
fn check_ready(s: &ApiState) -> Result<(), ApiError> {
    if s.replica.ready() {
        Ok(())
    } else {
        Err(ApiError::unavailable(
            "the model replica is catching up; retry shortly",
        ))
    }
}

/// Builds a context from `name → value` fields (`ad_id` excluded: it names the ad, as a query
/// parameter of `GET /v1/ctr`): the three fixed ones are required.
fn context_from(mut fields: BTreeMap<String, String>, path: &str) -> Result<Context, ApiError> {
    fields.remove("ad_id");
    Context::from_fields(fields).map_err(|e| {
        let field = e.field.strip_prefix("context").unwrap_or(e.field);
        ApiError::bad(format!("{path}{field}: {}", e.problem))
    })
}

/// Parses a JSON body; the error names the path of the offending field. A body that parses
/// is parsed once, untracked (path tracking wraps every value the parser visits); only a
/// failing one is parsed again to find where it failed.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
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
/// The request's `context` map is moved into the returned [`Context`].
pub fn parse_rank(body: &[u8]) -> Result<(RankRequest, Context), ApiError> {
    let mut req: RankRequest = parse_json(body)?;
    let ctx = check_rank(&mut req)?;
    Ok((req, ctx))
}

/// Checks a ranking request; moves its context out, checked.
fn check_rank(req: &mut RankRequest) -> Result<Context, ApiError> {
    let ctx = context_from(std::mem::take(&mut req.context), "context")?;
    if req.candidates.is_empty() || req.candidates.len() > MAX_CANDIDATES {
        return Err(ApiError::bad(format!(
            "candidates: need 1 to {MAX_CANDIDATES}, got {}",
            req.candidates.len()
        )));
    }
    // The first candidate whose ad an earlier one named: sorted by (ad, position), it is the
    // smallest position that follows an equal ad.
    let mut order: Vec<(&str, usize)> = req
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.ad_id.as_str(), i))
        .collect();
    order.sort_unstable();
    if let Some(i) = order
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .min()
    {
        return Err(ApiError::bad(format!(
            "candidates[{i}].ad_id: `{}` appears twice",
            req.candidates[i].ad_id
        )));
    }
    for (i, c) in req.candidates.iter().enumerate() {
        check_token("ad_id", &c.ad_id)
            .map_err(|e| ApiError::bad(format!("candidates[{i}]: {e}")))?;
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
        (status = 503, description = "Overloaded, or the model replica is catching up; see Retry-After", body = ErrorBody)
    )
)]
async fn rank(State(s): State<ApiState>, body: Bytes) -> Result<Json<RankResponse>, ApiError> {
    let started = Instant::now();
    let (req, ctx) = parse_rank(&body)?;
    check_ready(&s)?;
    let response = rank_with(&s.replica, req, &ctx);
    metrics::histogram!("ctr_api_request_seconds", "route" => "rank")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(response))
}

/// Ranks a checked request's candidates with `replica`: by descending bid × pCTR (ties by
/// ad ID), the top `k`. Pure but for reading the replica.
pub fn rank_with(replica: &Replica, req: RankRequest, ctx: &Context) -> RankResponse {
    let context_key = ctx.key();
    let pairs = ctx.pairs();
    let request_ctx = RequestContext::new(&pairs, &context_key);
    let mut features = Vec::with_capacity(64);
    let mut scored: Vec<(Candidate, Answer, Option<i64>)> = req
        .candidates
        .into_iter()
        .map(|c| {
            let (a, version) = replica.answer(
                &c.ad_id,
                c.campaign_id.as_deref(),
                &request_ctx,
                &mut features,
            );
            (c, a, version)
        })
        .collect();
    let score = |(c, a, _): &(Candidate, Answer, Option<i64>)| c.bid * a.pctr;
    scored.sort_by(|a, b| {
        score(b)
            .total_cmp(&score(a))
            .then_with(|| a.0.ad_id.cmp(&b.0.ad_id))
    });
    scored.truncate(req.k.unwrap_or(usize::MAX));
    let ranked = scored
        .into_iter()
        .map(|(c, a, version)| Ranked {
            score: c.bid * a.pctr,
            ad_id: c.ad_id,
            bid: c.bid,
            pctr: a.pctr,
            source: a.evidence.into(),
            model_version: model_version(replica, version),
        })
        .collect();
    RankResponse {
        context_key,
        ranked,
    }
}

/// `model@version` of an answer.
fn model_version(replica: &Replica, version: Option<i64>) -> Option<String> {
    version.map(|v| format!("{}@{v}", replica.model()))
}

#[utoipa::path(
    get,
    path = "/v1/ctr",
    params(
        ("ad_id" = String, Query, description = "The ad"),
        ("query_category" = String, Query, description = "Context field"),
        ("geo" = String, Query, description = "Context field"),
        ("device" = String, Query, description = "Context field"),
        ("campaign_id" = Option<String>, Query, description = "The ad's campaign (a new ad is estimated from it)"),
    ),
    responses(
        (status = 200, description = "The estimate; other query parameters are extra context fields", body = CtrResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 503, description = "Overloaded, or the model replica is catching up", body = ErrorBody)
    )
)]
async fn get_ctr(
    State(s): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<CtrResponse>, ApiError> {
    let started = Instant::now();
    let ad_id = q
        .get("ad_id")
        .cloned()
        .ok_or_else(|| ApiError::bad("missing query parameter `ad_id`"))?;
    check_token("ad_id", &ad_id).map_err(|e| ApiError::bad(e.to_string()))?;
    let campaign = q.get("campaign_id").cloned();
    if let Some(c) = &campaign {
        check_token("campaign_id", c).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    let mut fields: BTreeMap<String, String> = q.into_iter().collect();
    fields.remove("campaign_id");
    let ctx = context_from(fields, "query")?;
    check_ready(&s)?;
    let context_key = ctx.key();
    let pairs = ctx.pairs();
    let (a, version) = s.replica.answer(
        &ad_id,
        campaign.as_deref(),
        &RequestContext::new(&pairs, &context_key),
        &mut Vec::new(),
    );
    let model_version = model_version(&s.replica, version);
    metrics::histogram!("ctr_api_request_seconds", "route" => "ctr")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(CtrResponse {
        ad_id,
        context_key,
        pctr: a.pctr,
        impressions: a.total.imps,
        clicks: a.total.clicks,
        source: a.evidence.into(),
        model_version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<Context, ApiError> {
        let mut r: RankRequest = parse_json(json.as_bytes())?;
        check_rank(&mut r)
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
    fn the_openapi_document_lists_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(doc["paths"]["/v1/rank"]["post"].is_object());
        assert!(doc["paths"]["/v1/ctr"]["get"].is_object());
        assert!(doc["components"]["schemas"]["RankRequest"].is_object());
    }
}

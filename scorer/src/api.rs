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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Json, Router};
use ctr_runtime::http::TimedLayer;
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

/// What the handlers share. Cloned for every request (axum's `State`), so it is one `Arc`:
/// one reference count to move, not one per field.
#[derive(Clone)]
pub struct ApiState(Arc<Shared>);

/// The fields of [`ApiState`].
struct Shared {
    replica: Arc<Replica>,
    metrics: Option<PrometheusHandle>,
    /// The learning side's switches; `None` in a serving-only process.
    control: Option<Arc<Control>>,
    limits: Limits,
    monitor: Arc<crate::monitor::Monitor>,
    /// The process's work loops, for `/healthz`.
    liveness: ctr_runtime::Liveness,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("model", &self.0.replica.model())
            .finish()
    }
}

/// How much the `/v1` routes take on: requests in progress at once (beyond it, `503` at once)
/// and one request's deadline.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in progress at once.
    pub max_concurrency: usize,
    /// One request's deadline.
    pub timeout: Duration,
}

impl Limits {
    /// `--api-max-concurrency` and `--api-timeout-ms`.
    pub fn of(cfg: &ScorerConfig) -> Self {
        Self {
            max_concurrency: cfg.api_max_concurrency,
            timeout: cfg.api_timeout,
        }
    }
}

impl ApiState {
    /// The handlers' state: the replica that answers, and the `/v1` routes' limits.
    pub fn new(
        limits: Limits,
        replica: Arc<Replica>,
        metrics: Option<PrometheusHandle>,
        control: Option<Arc<Control>>,
        monitor: Arc<crate::monitor::Monitor>,
        liveness: ctr_runtime::Liveness,
    ) -> Self {
        Self(Arc::new(Shared {
            replica,
            metrics,
            control,
            limits,
            monitor,
            liveness,
        }))
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

/// One ad the frontend may show. Its strings borrow from the request body where they can
/// (an ID without JSON escapes): the handler allocates nothing per candidate to read it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Candidate<'a> {
    /// The ad's ID (unique among the candidates).
    #[serde(borrow)]
    #[schema(value_type = String)]
    pub ad_id: Cow<'a, str>,
    /// Bid per click, any currency unit; finite and >= 0.
    pub bid: f64,
    /// The ad's campaign: a new ad is estimated from it. Without it the campaign the model
    /// last saw for the ad is used.
    #[serde(default, borrow)]
    #[schema(value_type = Option<String>)]
    pub campaign_id: Option<Cow<'a, str>>,
}

/// Body of `POST /v1/rank`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RankRequest<'a> {
    /// The query context: `query_category`, `geo` and `device` are required; any other field
    /// is an extra context field, evaluated as the model learned it (a field it never saw
    /// adds nothing).
    #[serde(borrow)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub context: ContextFields<'a>,
    /// 1 to 1000 candidates with distinct ad IDs.
    #[serde(borrow, deserialize_with = "presized")]
    pub candidates: Vec<Candidate<'a>>,
    /// How many to return (default: all).
    #[serde(default)]
    pub k: Option<usize>,
}

/// A request's context fields in the body's order, each name and value borrowed from the body
/// unless it has JSON escapes. Read into a `BTreeMap<String, String>` and then moved into a
/// [`Context`], they cost a ranking request two allocations per field and the map's inserts
/// and removes (docs/BENCHMARKS.md); only the [`Context`] allocates now.
#[derive(Debug, Clone, Default)]
pub struct ContextFields<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for ContextFields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = ContextFields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8).min(8));
                while let Some((name, value)) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    fields.push((name.0, value.0));
                }
                Ok(ContextFields(fields))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// A JSON string, borrowed from the body when it has no escapes (serde's own `Cow<str>`
/// always allocates outside a `#[serde(borrow)]` field).
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// The candidates, read into a vector that starts with room for [`PRESIZED`]: serde's own
/// starts empty (JSON does not say how long an array is) and grows three times to hold ten.
fn presized<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Candidate<'de>>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<Candidate<'de>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of candidates")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(PRESIZED).min(PRESIZED));
            while let Some(c) = seq.next_element()? {
                out.push(c);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Visitor)
}

/// Room for this many candidates is made before the first is read: a ranking request names
/// about ten (a larger one grows the vector as usual).
const PRESIZED: usize = 16;

/// One ranked ad.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ranked<'a> {
    /// The candidate's ad ID.
    #[schema(value_type = String)]
    pub ad_id: Cow<'a, str>,
    /// Its bid, as given.
    pub bid: f64,
    /// Calibrated click probability at the top slot.
    pub pctr: f64,
    /// `bid × pctr`: the expected value of showing the ad, the ranking key.
    pub score: f64,
    /// How the model obtained `pctr`.
    pub source: Source,
    /// `model@offset` of the ad's partition (see [`CtrResponse::model_version`]).
    #[schema(value_type = Option<String>)]
    pub model_version: Option<ModelVersion<'a>>,
}

/// `model@offset`: the serving variant and the last offset of a partition an answer
/// reflects. Serialized as that string, written straight into the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelVersion<'a> {
    /// The serving variant.
    pub model: &'a str,
    /// The last offset of the ad's partition the replica reflects.
    pub offset: i64,
}

impl std::fmt::Display for ModelVersion<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.model, self.offset)
    }
}

impl Serialize for ModelVersion<'_> {
    /// Written into a stack buffer and serialized as one string: `collect_str` goes through
    /// `fmt` and an escaping writer, which cost about 2k of the router's 80k instructions per
    /// ten-candidate request (docs/BENCHMARKS.md).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut offset = itoa::Buffer::new();
        let offset = offset.format(self.offset).as_bytes();
        let model = self.model.as_bytes();
        let mut buf = [0u8; 96];
        let len = model.len() + 1 + offset.len();
        if len > buf.len() {
            return s.collect_str(self);
        }
        buf[..model.len()].copy_from_slice(model);
        buf[model.len()] = b'@';
        buf[model.len() + 1..len].copy_from_slice(offset);
        // Both parts are UTF-8 (a `str` and ASCII digits), so the whole is.
        match std::str::from_utf8(&buf[..len]) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_str(self),
        }
    }
}

/// Answer of `POST /v1/rank`: candidates by descending score (ties by ad ID).
#[derive(Debug, Serialize, ToSchema)]
pub struct RankResponse<'a> {
    /// The request's context as [`ctr_schemas::Context::key`] writes it.
    pub context_key: String,
    /// The first `k` candidates by descending score.
    pub ranked: Vec<Ranked<'a>>,
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
        RankRequest<'_>,
        Candidate<'_>,
        RankResponse<'_>,
        Ranked<'_>,
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
    let Limits {
        max_concurrency,
        timeout,
    } = state.0.limits;
    let dashboard = crate::dashboard::router(Arc::clone(&state.0.monitor));
    // One concurrency limit for both routes (its clones share the semaphore), and each
    // route's every answer timed outside it, the limit's `503`s included.
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            max_concurrency,
        ))
        .timeout(timeout);
    let timed = |route| {
        ServiceBuilder::new()
            .layer(TimedLayer::new("ctr_api_request_seconds", route))
            .layer(limits.clone())
    };
    let v1 = Router::new()
        .route("/v1/rank", post(rank).layer(timed("rank")))
        .route("/v1/ctr", get(get_ctr).layer(timed("ctr")))
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
    match s.0.liveness.check() {
        Ok(()) => "ok".into_response(),
        Err(stale) => (StatusCode::SERVICE_UNAVAILABLE, stale).into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    match &s.0.metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics not enabled").into_response(),
    }
}

/// Ready when the replica has caught up with the owners (see [`crate::replica`]); says how
/// far behind and how old its model is, and whether this process's learning is paused.
async fn readyz(State(s): State<ApiState>) -> Response {
    let status = s.0.replica.status();
    let learning = s.0.control.as_ref().map(|c| c.learning());
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
    if s.0.replica.ready() {
        Ok(())
    } else {
        Err(ApiError::unavailable(
            "the model replica is catching up; retry shortly",
        ))
    }
}

/// Builds a context from `name → value` fields (`ad_id` excluded: it names the ad, as a query
/// parameter of `GET /v1/ctr`): the three fixed ones are required.
fn context_from<K, V>(
    fields: impl IntoIterator<Item = (K, V)>,
    path: &str,
) -> Result<Context, ApiError>
where
    K: AsRef<str> + Into<String>,
    V: Into<String>,
{
    let fields = fields
        .into_iter()
        .filter(|(name, _)| name.as_ref() != "ad_id");
    Context::from_field_pairs(fields).map_err(|e| {
        let field = e.field.strip_prefix("context").unwrap_or(e.field);
        ApiError::bad(format!("{path}{field}: {}", e.problem))
    })
}

/// Parses a JSON body; the error names the path of the offending field. A body that parses
/// is parsed once, untracked (path tracking wraps every value the parser visits); only a
/// failing one is parsed again to find where it failed.
///
/// The body's UTF-8 is checked once, whole, and then parsed as text: parsing bytes checks
/// every string on its own, which cost a ranking request about 3,000 instructions. A body
/// that is not UTF-8 goes to the second parse, whose error says where.
fn parse_json<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, ApiError> {
    if let Some(value) = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str(text).ok())
    {
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
/// The request's `context` fields are moved into the returned [`Context`].
pub fn parse_rank(body: &[u8]) -> Result<(RankRequest<'_>, Context), ApiError> {
    let mut req: RankRequest<'_> = parse_json(body)?;
    let ctx = check_rank(&mut req)?;
    Ok((req, ctx))
}

/// Checks a ranking request; moves its context out, checked.
fn check_rank(req: &mut RankRequest<'_>) -> Result<Context, ApiError> {
    let ctx = context_from(std::mem::take(&mut req.context.0), "context")?;
    if req.candidates.is_empty() || req.candidates.len() > MAX_CANDIDATES {
        return Err(ApiError::bad(format!(
            "candidates: need 1 to {MAX_CANDIDATES}, got {}",
            req.candidates.len()
        )));
    }
    if let Some(i) = first_repeat(&req.candidates) {
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

/// The first candidate whose ad an earlier one named. A request of a few dozen candidates
/// compares each with those before it (no allocation: a sort cost a ten-candidate request about
/// 1,600 instructions); a larger one sorts.
fn first_repeat(candidates: &[Candidate<'_>]) -> Option<usize> {
    if candidates.len() <= COMPARE_ALL_UP_TO {
        first_repeat_by_comparing(candidates)
    } else {
        first_repeat_by_sorting(candidates)
    }
}

/// Up to this many candidates, [`first_repeat`] compares every pair.
const COMPARE_ALL_UP_TO: usize = 32;

fn first_repeat_by_comparing(candidates: &[Candidate<'_>]) -> Option<usize> {
    (1..candidates.len()).find(|&i| {
        candidates[..i]
            .iter()
            .any(|earlier| earlier.ad_id == candidates[i].ad_id)
    })
}

/// Sorted by (ad, position), the first repeat is the smallest position that follows an equal
/// ad.
fn first_repeat_by_sorting(candidates: &[Candidate<'_>]) -> Option<usize> {
    let mut order: Vec<(&str, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.ad_id.as_ref(), i))
        .collect();
    order.sort_unstable();
    order
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .min()
}

#[utoipa::path(
    post,
    path = "/v1/rank",
    request_body = RankRequest<'_>,
    responses(
        (status = 200, description = "Candidates by descending bid × pCTR", body = RankResponse<'_>),
        (status = 400, description = "Malformed request; the message names the field", body = ErrorBody),
        (status = 413, description = "Body larger than 1 MiB"),
        (status = 503, description = "Overloaded, or the model replica is catching up; see Retry-After", body = ErrorBody)
    )
)]
async fn rank(State(s): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let (req, ctx) = parse_rank(&body)?;
    check_ready(&s)?;
    let response = rank_with(&s.0.replica, req, &ctx);
    Ok(to_json(&response, 64 + 192 * response.ranked.len()))
}

/// `value` as a JSON response, serialized into a buffer of `capacity` bytes to start with
/// (axum's `Json` starts from 128 and grows: a ranking answer would be copied four times).
fn to_json(value: &impl Serialize, capacity: usize) -> Response {
    let mut buf = Vec::with_capacity(capacity);
    match serde_json::to_writer(&mut buf, value) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            buf,
        )
            .into_response(),
        // Unreachable for the API's own types (no maps with non-string keys, no failing
        // `Serialize`), answered as axum's `Json` would.
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Ranks a checked request's candidates with `replica`: by descending bid × pCTR (ties by
/// ad ID), the top `k`. Pure but for reading the replica.
pub fn rank_with<'a>(
    replica: &'a Replica,
    req: RankRequest<'a>,
    ctx: &Context,
) -> RankResponse<'a> {
    let pairs = ctx.pairs();
    let context_key = Context::key_of(&pairs);
    let request_ctx = RequestContext::new(&pairs, &context_key);
    let answers = replica.answer_all(
        &req.candidates,
        |c| (c.ad_id.as_ref(), c.campaign_id.as_deref()),
        &request_ctx,
        &mut Vec::with_capacity(64),
    );
    let mut scored: Vec<(Candidate<'a>, Answer, Option<i64>)> = req
        .candidates
        .into_iter()
        .zip(answers)
        .map(|(c, (a, version))| (c, a, version))
        .collect();
    let score = |(c, a, _): &(Candidate<'a>, Answer, Option<i64>)| c.bid * a.pctr;
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

/// `model@offset` of an answer.
fn model_version(replica: &Replica, offset: Option<i64>) -> Option<ModelVersion<'_>> {
    offset.map(|offset| ModelVersion {
        model: replica.model(),
        offset,
    })
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
    let ad_id = q
        .get("ad_id")
        .cloned()
        .ok_or_else(|| ApiError::bad("missing query parameter `ad_id`"))?;
    check_token("ad_id", &ad_id).map_err(|e| ApiError::bad(e.to_string()))?;
    let campaign = q.get("campaign_id").cloned();
    if let Some(c) = &campaign {
        check_token("campaign_id", c).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    // Every other query parameter is a context field (`context_from` takes them in any order).
    let fields = q.into_iter().filter(|(name, _)| name != "campaign_id");
    let ctx = context_from(fields, "query")?;
    check_ready(&s)?;
    let pairs = ctx.pairs();
    let context_key = Context::key_of(&pairs);
    let (a, version) = s.0.replica.answer(
        &ad_id,
        campaign.as_deref(),
        &RequestContext::new(&pairs, &context_key),
        &mut Vec::new(),
    );
    let model_version = model_version(&s.0.replica, version).map(|v| v.to_string());
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
        let mut r: RankRequest<'_> = parse_json(json.as_bytes())?;
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
    fn context_fields_with_escapes_or_given_twice() {
        // A name or value with JSON escapes is read as its text; a name given twice keeps its
        // last value, as a map would; `ad_id` is not a context field.
        let ctx = req(concat!(
            r#"{"context":{"query_category":"tr\u0061vel","ge\u006f":"DE","geo":"US","#,
            r#""device":"mobile","hour":"1\u0033","ad_id":"x"},"#,
            r#""candidates":[{"ad_id":"a","bid":1}]}"#
        ))
        .unwrap();
        assert_eq!(
            ctx.key(),
            "device=mobile|geo=US|hour=13|query_category=travel"
        );
    }

    #[test]
    fn the_first_repeated_ad_is_found_both_ways() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
        for _ in 0..2_000 {
            let n = rng.random_range(1..=80);
            let ads = rng.random_range(1..=2 * n);
            let candidates: Vec<Candidate<'_>> = (0..n)
                .map(|_| Candidate {
                    ad_id: Cow::Owned(format!("ad-{}", rng.random_range(0..ads))),
                    bid: 1.0,
                    campaign_id: None,
                })
                .collect();
            let want = first_repeat_by_comparing(&candidates);
            assert_eq!(first_repeat_by_sorting(&candidates), want, "{candidates:?}");
            assert_eq!(first_repeat(&candidates), want);
        }
    }

    #[test]
    fn more_candidates_than_presized_all_arrive_in_order() {
        let candidates: Vec<String> = (0..PRESIZED * 3 + 1)
            .map(|i| format!(r#"{{"ad_id":"ad-{i}","bid":{i}}}"#))
            .collect();
        let body = format!(r#"{{{CTX},"candidates":[{}]}}"#, candidates.join(","));
        let (r, _) = parse_rank(body.as_bytes()).unwrap();
        assert_eq!(r.candidates.len(), PRESIZED * 3 + 1);
        for (i, c) in r.candidates.iter().enumerate() {
            assert_eq!(
                (c.ad_id.as_ref(), c.bid),
                (format!("ad-{i}").as_str(), i as f64)
            );
        }
    }

    #[test]
    fn the_model_version_serializes_as_model_at_offset() {
        for (model, offset) in [("combined", 0), ("ftrl", i64::MAX), ("counts", -1)] {
            let v = ModelVersion { model, offset };
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{model}@{offset}\"")
            );
        }
        // A name too long for the stack buffer takes the `fmt` path, with the same result.
        let model = "m".repeat(200);
        let v = ModelVersion {
            model: &model,
            offset: 7,
        };
        assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{model}@7\""));
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
                format!(r#"{{{CTX},"candidates":{{"ad_id":"a","bid":1}}}}"#),
                "candidates: invalid type: map, expected an array of candidates",
            ),
            (
                r#"{"context":{"geo":"US","device":"m"},"candidates":[{"ad_id":"a","bid":1}]}"#
                    .into(),
                "context.query_category: missing",
            ),
            (
                r#"{"context":{"query_category":"t","geo":5,"device":"m"},"candidates":[{"ad_id":"a","bid":1}]}"#
                    .into(),
                "context.geo: invalid type: integer `5`, expected a string",
            ),
            (
                r#"{"context":"US","candidates":[{"ad_id":"a","bid":1}]}"#.into(),
                "context: invalid type: string \"US\", expected a map",
            ),
            (
                r#"{"context":{"query_category":"t","geo":"U|S","device":"m"},"candidates":[{"ad_id":"a","bid":1}]}"#
                    .into(),
                "context.geo: ",
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
        assert!(parse_json::<RankRequest<'_>>(&bytes).is_err());
        // Bytes that are not UTF-8 inside a string: the error still says where.
        let mut body = format!(r#"{{{CTX},"candidates":[{{"ad_id":"a?","bid":1}}]}}"#).into_bytes();
        let at = body.iter().position(|&b| b == b'?').unwrap();
        body[at] = 0xff;
        let err = parse_rank(&body).unwrap_err();
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert!(
            err.1.starts_with("candidates[0].ad_id: "),
            "got `{}`",
            err.1
        );
    }

    #[test]
    fn the_openapi_document_lists_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(doc["paths"]["/v1/rank"]["post"].is_object());
        assert!(doc["paths"]["/v1/ctr"]["get"].is_object());
        assert!(doc["components"]["schemas"]["RankRequest"].is_object());
    }
}

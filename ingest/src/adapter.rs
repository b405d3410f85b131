//! `ctr-ingest http`: the HTTP/JSON adapter, S4's "client adapter" for producers in any language.
//!
//! `POST /v1/events` takes one event, a JSON array of events, or NDJSON (the format is in
//! [`crate::json`]). The contract:
//!
//! - **All or nothing before Kafka**: the whole body is parsed, validated and encoded first; if
//!   any event is wrong the answer is `400` listing every bad event by index and field, and
//!   nothing of the body is produced.
//! - **202 means acknowledged**: events go to an idempotent producer with `acks=all`, and `202`
//!   is answered only after the broker acknowledged every event of the request. The answer
//!   lists each event's ID (assigned if absent), partition and offset.
//! - **Partial failure is reported per event**: if some deliveries fail (broker unreachable past
//!   the delivery timeout), the answer is `207` with `status: accepted | failed` per event, so a
//!   client resends exactly the failed ones, with the IDs the answer gave them. If none was
//!   delivered it is `503`.
//! - **Bounded memory**: at most `max_in_flight_events` events are between the request and the
//!   broker's acknowledgement; a request that does not fit is answered `503` with
//!   `Retry-After` at once instead of queueing. Bodies are limited in bytes and in events
//!   (`413`).
//! - **API keys**: `Authorization: Bearer <key>` or `X-API-Key: <key>`, checked before the body
//!   is read, against SHA-256 digests of the configured keys in constant time (`subtle`), so
//!   neither a key's content nor its length leaks through timing. Keys are never logged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ctr_schemas::IdGenerator;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::json::{BodyError, EventError, Framing, Kind, Prepared, Preparer, TimeBounds};
use crate::now_ms;
use crate::producer::KafkaArgs;
use ctr_runtime::{Policy, Supervisor};

/// Settings of `ctr-ingest http`, as given.
#[derive(Debug, Clone, clap::Args)]
pub struct AdapterArgs {
    /// The broker, the topics and the outage policy.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Listen address.
    #[arg(long, env = "CTR_INGEST_HTTP", default_value = "127.0.0.1:8082")]
    pub http_addr: SocketAddr,
    /// Accepted API keys, comma-separated. Prefer `--api-keys-file` outside tests: the
    /// environment of a process is readable by its user.
    #[arg(long, env = "CTR_INGEST_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// File with one accepted API key per line (blank lines and `#` comments skipped).
    #[arg(long, env = "CTR_INGEST_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Accept requests without an API key. Only for a closed network; off by default.
    #[arg(long, env = "CTR_INGEST_ALLOW_ANONYMOUS", default_value_t = false)]
    pub allow_anonymous: bool,
    /// Largest request body, bytes.
    #[arg(long, env = "CTR_INGEST_MAX_BODY", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most events in one request.
    #[arg(long, env = "CTR_INGEST_MAX_EVENTS", default_value_t = 10_000)]
    pub max_events: usize,
    /// Most events awaiting the broker's acknowledgement, over all requests; beyond it
    /// requests get 503 + Retry-After.
    #[arg(long, env = "CTR_INGEST_MAX_IN_FLIGHT", default_value_t = 50_000)]
    pub max_in_flight_events: usize,
    /// How long the producer keeps retrying one event before it counts as failed, ms.
    #[arg(long, env = "CTR_INGEST_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    pub delivery_timeout_ms: u64,
    /// How long the producer waits to fill a batch, ms (latency against throughput).
    #[arg(long, env = "CTR_INGEST_LINGER_MS", default_value_t = 2)]
    pub linger_ms: u64,
    /// Most an event time may lie in the future, ms.
    #[arg(long, env = "CTR_INGEST_MAX_FUTURE_MS", default_value_t = 300_000)]
    pub max_future_ms: i64,
    /// Most an event time may lie in the past, ms.
    #[arg(long, env = "CTR_INGEST_MAX_AGE_MS", default_value_t = 86_400_000)]
    pub max_age_ms: i64,
    /// ID generator shard (0..=1023) for IDs this adapter assigns; distinct per adapter process.
    #[arg(long, env = "CTR_INGEST_SHARD", default_value_t = 2)]
    pub shard: u32,
}

/// Checked settings.
#[derive(Clone)]
pub struct AdapterConfig {
    /// The brokers and how to reach them.
    pub kafka: ctr_runtime::kafka::KafkaConnection,
    /// The broker's outage budget: past it without a broker, the adapter exits non-zero.
    pub policy: Policy,
    /// Topic of serve events.
    pub serves_topic: String,
    /// Topic of click events.
    pub clicks_topic: String,
    /// `--http`: listen address.
    pub http_addr: SocketAddr,
    keys: ApiKeys,
    /// `--max-body-bytes`: largest request body.
    pub max_body_bytes: usize,
    /// `--max-events`: most events in one request.
    pub max_events: usize,
    /// `--max-in-flight-events`: most events awaiting acknowledgement, over all requests.
    pub max_in_flight_events: usize,
    /// How long the producer retries one event before it counts as failed.
    pub delivery_timeout: Duration,
    /// `--linger-ms`: how long the producer waits to fill a batch.
    pub linger_ms: u64,
    /// How far an event time may lie in the future and in the past.
    pub bounds: TimeBounds,
    /// ID generator shard for IDs this adapter assigns.
    pub shard: u32,
}

impl std::fmt::Debug for AdapterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: only their number is shown.
        f.debug_struct("AdapterConfig")
            .field("kafka", &self.kafka)
            .field("http_addr", &self.http_addr)
            .field("api_keys", &self.keys.digests.len())
            .field("anonymous", &self.keys.anonymous)
            .field("max_in_flight_events", &self.max_in_flight_events)
            .finish_non_exhaustive()
    }
}

/// A setting the adapter cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither keys nor `--allow-anonymous`.
    #[error(
        "no API keys: give --api-keys or --api-keys-file, or --allow-anonymous on a closed network"
    )]
    NoKeys,
    /// The keys file could not be read.
    #[error("reading the API keys file {path}: {source}")]
    KeysFile {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// A setting out of range (the problem in words).
    #[error("{0}")]
    Invalid(&'static str),
    /// A setting that does not parse (the problem in words).
    #[error("{0}")]
    Setting(String),
    /// An ID generator shard above 1023.
    #[error(transparent)]
    Shard(#[from] ctr_schemas::id::ShardOutOfRange),
}

impl TryFrom<AdapterArgs> for AdapterConfig {
    type Error = ConfigError;

    fn try_from(a: AdapterArgs) -> Result<Self, ConfigError> {
        let mut keys: Vec<String> = a
            .api_keys
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect();
        if let Some(path) = &a.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::KeysFile {
                path: path.clone(),
                source,
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if keys.is_empty() && !a.allow_anonymous {
            return Err(ConfigError::NoKeys);
        }
        if a.max_events == 0 || a.max_in_flight_events < a.max_events {
            return Err(ConfigError::Invalid(
                "need 1 <= max_events <= max_in_flight_events",
            ));
        }
        if a.max_future_ms < 0 || a.max_age_ms < 0 {
            return Err(ConfigError::Invalid(
                "max_future_ms and max_age_ms must be >= 0",
            ));
        }
        IdGenerator::new(a.shard)?;
        Ok(Self {
            policy: a
                .kafka
                .dependencies
                .policy()
                .map_err(ConfigError::Setting)?,
            kafka: a.kafka.kafka.check().map_err(ConfigError::Setting)?,
            serves_topic: a.kafka.serves_topic,
            clicks_topic: a.kafka.clicks_topic,
            http_addr: a.http_addr,
            keys: ApiKeys::new(&keys, a.allow_anonymous),
            max_body_bytes: a.max_body_bytes,
            max_events: a.max_events,
            max_in_flight_events: a.max_in_flight_events,
            delivery_timeout: Duration::from_millis(a.delivery_timeout_ms.max(1)),
            linger_ms: a.linger_ms,
            bounds: TimeBounds {
                max_future_ms: a.max_future_ms,
                max_age_ms: a.max_age_ms,
            },
            shard: a.shard,
        })
    }
}

/// The accepted keys, kept only as SHA-256 digests.
#[derive(Clone)]
struct ApiKeys {
    digests: Vec<[u8; 32]>,
    anonymous: bool,
}

impl ApiKeys {
    fn new(keys: &[String], anonymous: bool) -> Self {
        Self {
            digests: keys.iter().map(|k| Sha256::digest(k).into()).collect(),
            anonymous,
        }
    }

    /// Whether `presented` is one of the keys. Compares against every key, each in constant
    /// time, so the time taken says nothing about which key or how much of it matched.
    fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = subtle::Choice::from(0);
        for k in &self.digests {
            found |= k.ct_eq(&digest);
        }
        found.into()
    }
}

/// Why the adapter stopped.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The Kafka producer could not be created.
    #[error("creating the Kafka producer: {0}")]
    Producer(KafkaError),
    /// The HTTP server could not bind or serve.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// No broker reachable for longer than the outage budget (how long it was).
    #[error(
        "no Kafka broker has been reachable for {0:?}, longer than the outage budget: exiting so that a supervisor restarts the adapter"
    )]
    BrokerOutage(Duration),
    /// A supervised task (HTTP or the broker probe) failed, panicked or ended early.
    #[error(transparent)]
    Task(#[from] ctr_runtime::TaskFailed),
}

struct AppState {
    cfg: AdapterConfig,
    producer: FutureProducer,
    preparer: Mutex<Preparer>,
    in_flight: Arc<Semaphore>,
    metrics: Option<PrometheusHandle>,
}

type Shared = Arc<AppState>;

/// Runs the adapter on `listener` until `shutdown` resolves; then finishes the requests in
/// progress (each still gets its answer) and flushes the producer. Beside the HTTP server, a
/// supervised watch ends the process (non-zero) once no broker has been reachable for longer
/// than the outage budget: an adapter that can only answer 503 is better restarted.
pub async fn run(
    cfg: AdapterConfig,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdapterError> {
    // The adapter's own delivery timeout (its answer to a client is bounded by it), not the
    // outage budget.
    let mut pc = ctr_runtime::kafka::producer_config(&cfg.kafka, &cfg.policy, cfg.delivery_timeout);
    pc.set("linger.ms", cfg.linger_ms.to_string())
        .set("compression.type", "none")
        // librdkafka's own queue must hold everything the semaphore lets in, so a send never
        // fails for lack of room halfway through a request.
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight_events + 1_000).to_string(),
        );
    let producer: FutureProducer = pc.create().map_err(AdapterError::Producer)?;
    let ids = IdGenerator::new(cfg.shard).expect("shard checked in the config");
    let state = Arc::new(AppState {
        preparer: Mutex::new(Preparer::new(ids, Some(cfg.bounds), cfg.max_events)),
        in_flight: Arc::new(Semaphore::new(cfg.max_in_flight_events)),
        producer,
        metrics,
        cfg,
    });
    info!(addr = %listener.local_addr()?, config = ?state.cfg, "ingest adapter listening");
    let mut tasks = Supervisor::new(state.cfg.delivery_timeout + Duration::from_secs(10));
    let mut stop = tasks.stop_signal();
    let app = router(state.clone());
    tasks.spawn("HTTP adapter", async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { ctr_runtime::process::stopped(&mut stop).await })
            .await
    });
    tasks.spawn(
        "broker watch",
        watch_broker(state.clone(), tasks.stop_signal()),
    );
    tasks.run(shutdown).await?;
    // Every answered request already waited for its deliveries; nothing should be left.
    if let Err(e) = state.producer.flush(Duration::from_secs(10)) {
        warn!(error = %e, "flushing the producer at shutdown");
    }
    info!("ingest adapter stopped");
    Ok(())
}

/// Asks the broker for the serves topic's metadata every second (what `/readyz` asks), each
/// within the call deadline, until `stop`; an error once no answer has come for longer than
/// the outage budget. An idle producer would not notice a broker that stopped answering: it
/// sends nothing that could time out.
async fn watch_broker(
    state: Shared,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), AdapterError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_answer = Instant::now();
    loop {
        tokio::select! {
            () = ctr_runtime::process::stopped(&mut stop) => return Ok(()),
            _ = tick.tick() => {}
        }
        if broker_answers(&state, state.cfg.policy.call_timeout).await {
            last_answer = Instant::now();
        } else if last_answer.elapsed() > state.cfg.policy.outage_budget {
            return Err(AdapterError::BrokerOutage(last_answer.elapsed()));
        }
    }
}

/// Whether the broker answers a metadata request for the serves topic within `timeout`.
async fn broker_answers(state: &Shared, timeout: Duration) -> bool {
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        st.producer
            .client()
            .fetch_metadata(Some(&st.cfg.serves_topic), timeout)
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

fn router(state: Shared) -> Router {
    let events = Router::new()
        .route("/v1/events", post(post_events))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        // Every answer of the route timed, refusals (401, 413, 400) and `503`s included (a
        // route layer: an unknown path's 404 is not this route's).
        .route_layer(ctr_runtime::http::TimedLayer::new(
            "ctr_ingest_request_seconds",
            "events",
        ));
    Router::new()
        .merge(events)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// An answer with a JSON body; `503` carries `Retry-After`.
fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    metrics::counter!("ctr_ingest_requests_total", "status" => status.as_str().to_string())
        .increment(1);
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    answer(status, json!({ "error": msg.into() }))
}

/// Checks the API key before the body is read.
async fn authenticate(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if s.cfg.keys.anonymous && s.cfg.keys.digests.is_empty() {
        return next.run(req).await;
    }
    let presented = presented_key(req.headers());
    match presented {
        Some(k) if s.cfg.keys.accepts(k) => next.run(req).await,
        Some(_) => unauthorized("invalid API key"),
        None if s.cfg.keys.anonymous => next.run(req).await,
        None => unauthorized(
            "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
        ),
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key") {
        return v.to_str().ok();
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(msg: &str) -> Response {
    metrics::counter!("ctr_ingest_unauthorized_total").increment(1);
    let mut r = error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The framing a content type asks for; an error names the type refused.
fn framing(headers: &HeaderMap) -> Result<Framing, String> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Framing::Json);
    };
    let mime = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" | "" => Ok(Framing::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => Ok(Framing::Ndjson),
        other => Err(format!(
            "content type {other:?} not accepted: use application/json (one event or an array) or application/x-ndjson"
        )),
    }
}

/// One event's outcome in a `202`/`207`/`503` answer.
#[derive(Debug, Serialize)]
struct EventResult {
    index: usize,
    #[serde(rename = "type")]
    kind: Kind,
    /// Decimal string: IDs exceed JavaScript's exact integers.
    id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn post_events(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let framing = match framing(&headers) {
        Ok(f) => f,
        Err(msg) => return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg),
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "body larger than {} bytes; split it into several requests",
                    s.cfg.max_body_bytes
                )
            } else {
                format!("reading the body: {}", rejection.body_text())
            };
            return error(status, msg);
        }
    };
    let prepared = {
        let mut p = s.preparer.lock().unwrap_or_else(|e| e.into_inner());
        p.prepare(&body, framing, now_ms())
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    let n = prepared.len();
    // Admission: the whole request fits in the in-flight budget, or none of it goes.
    let Ok(permits) = s.in_flight.clone().try_acquire_many_owned(n as u32) else {
        metrics::counter!("ctr_ingest_events_total", "outcome" => "overloaded").increment(n as u64);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ingest queue full; retry shortly",
        );
    };
    let in_flight = |s: &AppState| {
        metrics::gauge!("ctr_ingest_in_flight_events")
            .set((s.cfg.max_in_flight_events - s.in_flight.available_permits()) as f64);
    };
    in_flight(&s);
    // The deliveries are awaited in a task of their own that holds the permits until the last
    // report, so a client hanging up mid-request cannot make the budget forget events that are
    // still in the producer's queue.
    let task = {
        let s = s.clone();
        tokio::spawn(async move {
            let results = produce(&s, &prepared).await;
            drop(permits);
            results
        })
    };
    let Ok(results) = task.await else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    };
    in_flight(&s);
    let accepted = results.iter().filter(|r| r.status == "accepted").count();
    let failed = n - accepted;
    metrics::counter!("ctr_ingest_events_total", "outcome" => "accepted")
        .increment(accepted as u64);
    metrics::counter!("ctr_ingest_events_total", "outcome" => "failed").increment(failed as u64);
    let status = match (accepted, failed) {
        (_, 0) => StatusCode::ACCEPTED,
        (0, _) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::MULTI_STATUS,
    };
    answer(
        status,
        json!({ "accepted": accepted, "failed": failed, "events": results }),
    )
}

/// Sends every event, then waits for every acknowledgement.
async fn produce(s: &AppState, prepared: &[Prepared]) -> Vec<EventResult> {
    let mut pending = Vec::with_capacity(prepared.len());
    for p in prepared {
        let topic = match p.kind {
            Kind::Serve => &s.cfg.serves_topic,
            Kind::Click => &s.cfg.clicks_topic,
        };
        let record = FutureRecord::to(topic).key(&p.key).payload(&p.payload);
        pending.push(s.producer.send_result(record).map_err(|(e, _)| e));
    }
    let mut results = Vec::with_capacity(prepared.len());
    for (index, (p, sent)) in prepared.iter().zip(pending).enumerate() {
        let outcome = match sent {
            Ok(fut) => match fut.await {
                Ok(Ok(d)) => Ok((d.partition, d.offset)),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_) => Err("producer shut down before the delivery report".to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &outcome {
            warn!(index, error = %e, "event not delivered");
        }
        results.push(EventResult {
            index,
            kind: p.kind,
            id: p.id.to_string(),
            status: if outcome.is_ok() {
                "accepted"
            } else {
                "failed"
            },
            partition: outcome.as_ref().ok().map(|d| d.0),
            offset: outcome.as_ref().ok().map(|d| d.1),
            error: outcome.err(),
        });
    }
    results
}

fn refused(e: BodyError) -> Response {
    metrics::counter!("ctr_ingest_rejected_requests_total").increment(1);
    match e {
        BodyError::TooManyEvents { .. } => error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        BodyError::Invalid {
            events,
            total,
            ref errors,
        } => answer(
            StatusCode::BAD_REQUEST,
            json!({
                "error": format!("{e}; nothing was accepted"),
                "events": events,
                "invalid": total,
                "errors": errors as &Vec<EventError>,
            }),
        ),
        other => error(StatusCode::BAD_REQUEST, other.to_string()),
    }
}

async fn readyz(State(s): State<Shared>) -> Response {
    if broker_answers(&s, Duration::from_secs(2)).await {
        (StatusCode::OK, "ready").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "Kafka unreachable")
    }
}

async fn render_metrics(State(s): State<Shared>) -> Response {
    match &s.metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics not enabled").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new(&["alpha-key".into(), "beta".into()], false);
        assert!(keys.accepts("alpha-key"));
        assert!(keys.accepts("beta"));
        assert!(!keys.accepts("alpha"));
        assert!(!keys.accepts("alpha-key "));
        assert!(!keys.accepts(""));
    }

    #[test]
    fn keys_come_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(presented_key(&h), Some("k1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k1"));
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Some("k2"));
    }

    fn args() -> AdapterArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct A {
            #[command(flatten)]
            a: AdapterArgs,
        }
        A::parse_from(["x"]).a
    }

    #[test]
    fn starting_without_keys_is_refused() {
        assert!(matches!(
            AdapterConfig::try_from(args()),
            Err(ConfigError::NoKeys)
        ));
        let ok = AdapterConfig::try_from(AdapterArgs {
            api_keys: Some("secret-one, ".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(ok.keys.digests.len(), 1);
        assert!(
            !format!("{ok:?}").contains("secret-one"),
            "keys never printed"
        );
        let bad = AdapterConfig::try_from(AdapterArgs {
            allow_anonymous: true,
            max_events: 100,
            max_in_flight_events: 10,
            ..args()
        });
        assert!(matches!(bad, Err(ConfigError::Invalid(_))));
    }
}

//! The serving replica: every process that answers `/v1/rank` and `/v1/ctr` holds the serving
//! variant of every partition in memory and evaluates it per candidate, with the code the
//! owners learn with ([`crate::serving`]).
//!
//! How it stays current (design (b) of issue 16: the owners emit their parameters; replicas
//! apply them). For each partition of the labeled topic the replica
//! 1. restores the owner's latest checkpoint ([`crate::checkpoint`]), keeping only the serving
//!    variant, the exact totals and the ads' campaigns;
//! 2. reads the partition's model stream ([`crate::publish`]) from the checkpoint's offset on,
//!    blocking on Redis so an entry is applied as soon as the owner writes it (on a Redis
//!    Cluster, polling every 10 ms: the streams are in different slots), and applies
//!    each delta; a delta that does not continue its version (the stream was trimmed past
//!    it) makes it restore the checkpoint again.
//!
//! Why this design rather than a follower that relearns from the labeled topic: the owners'
//! learning is not a function of the topic alone (load shedding samples negatives by the
//! governor's rate, the learning guard pauses on the joiner's signal, maintenance runs on the
//! owner's clock), so a follower would drift from what the owners hold; a delta is the owner's
//! state itself, written in the same fenced script as the Redis estimates, so a replica is
//! exact to the owners at every version, under shedding too (it serves the owners' unbiased,
//! importance-weighted estimates), and costs a key lookup per changed parameter rather than a
//! learning step per record.
//!
//! Freshness: an owner publishes a batch every `batch_ms` (20 ms) or `batch_size` records; the
//! replica's blocking read returns when the entry is written. So an answer reflects the owners'
//! state as of at most one batch interval plus a Redis round trip earlier (measured in
//! docs/BENCHMARKS.md); on a cluster, plus up to the 10 ms poll. Every answer carries its
//! partition's version (`model@offset`).
//!
//! Readiness: ready once every partition was restored and the stream read to its end (caught
//! up), and none is broken. If the owners stop, the replica keeps serving the last model it
//! has; `/readyz` and `ctr_scorer_replica_age_seconds` say how old it is. If Redis fails, the
//! replica keeps serving too and retries with backoff; the error is in `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ctr_models::{Feature, Variant, VariantConfig};
use ctr_runtime::redis::RedisConn;
use ctr_schemas::partition::partition_of;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{FromRedisValue, Value};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::checkpoint::CheckpointStore;
use crate::serving::{Answer, ApplyError, PartitionDelta, RequestContext, ServingState};
use ctr_schemas::contract::keys;

/// Entries read per partition per round trip.
const READ_COUNT: usize = 64;
/// How long one read waits for a new entry, ms.
const BLOCK_MS: usize = 500;
/// On a Redis Cluster, how long a round of stream reads that found nothing waits before the
/// next (the freshness it costs: up to this much).
const CLUSTER_POLL: Duration = Duration::from_millis(10);
/// Longest a read of the model streams blocks waiting for an entry.
pub const BLOCK: Duration = Duration::from_millis(BLOCK_MS as u64);

/// One partition as the replica holds it, with what `/readyz` reports of it.
#[derive(Debug)]
struct Part {
    state: RwLock<ServingState>,
    /// Restored from its checkpoint (or found to have none).
    loaded: AtomicBool,
    /// The last read found no more entries.
    caught_up: AtomicBool,
    /// The owners' write fence as last read (-1: none yet).
    owners: AtomicI64,
    /// The owner's wall clock when it wrote what this state reflects (0: unknown).
    updated_ms: AtomicI64,
    /// Why the partition cannot follow, while it cannot.
    broken: Mutex<Option<String>>,
    /// `broken` is set: read by every request ([`Replica::ready`]) without taking the lock.
    is_broken: AtomicBool,
}

impl Part {
    /// Records why the partition cannot follow (`None`: it can again).
    fn set_broken(&self, why: Option<String>) {
        let mut broken = self.broken.lock().expect("broken");
        self.is_broken.store(why.is_some(), Ordering::Release);
        *broken = why;
    }

    fn is_broken(&self) -> bool {
        self.is_broken.load(Ordering::Acquire)
    }
}

/// The serving variant of every partition of the labeled topic.
#[derive(Debug)]
pub struct Replica {
    model: String,
    variant: VariantConfig,
    parts: Vec<Part>,
    /// Every partition was loaded and caught up at least once.
    ready_once: AtomicBool,
    /// The last error of the follow loop, until a read succeeds again.
    error: Mutex<Option<String>>,
}

/// A partition's line in `/readyz`.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: usize,
    /// Last partition offset the replica reflects.
    pub version: Option<i64>,
    /// Records the owners have applied that the replica has not (their fence − version).
    pub lag: Option<i64>,
    /// Seconds since the owner wrote what the replica reflects.
    pub age_s: Option<f64>,
    /// Whether the replica has read the partition's stream up to the owners' fence.
    pub caught_up: bool,
    /// Why the partition is not being followed, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `/readyz` says of the replica.
#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    /// Whether every partition is caught up (the API answers only then).
    pub ready: bool,
    /// The serving variant.
    pub model: String,
    /// The oldest partition's age, s.
    pub age_s: Option<f64>,
    /// The largest partition lag, records.
    pub lag: Option<i64>,
    /// Why the replica is not following, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per partition.
    pub partitions: Vec<PartitionStatus>,
}

impl Replica {
    /// An empty replica of the variant `serving` (one of `models`) over `partitions`
    /// partitions; [`follow`] fills it.
    pub fn new(models: &[VariantConfig], serving: &str, partitions: usize) -> Self {
        let variant = models
            .iter()
            .find(|m| m.name == serving)
            .expect("the serving variant is one of the models (checked at start-up)")
            .clone();
        let parts = (0..partitions.max(1))
            .map(|_| Part {
                state: RwLock::new(ServingState::empty(new_variant(&variant))),
                loaded: AtomicBool::new(false),
                caught_up: AtomicBool::new(false),
                owners: AtomicI64::new(-1),
                updated_ms: AtomicI64::new(0),
                broken: Mutex::new(None),
                is_broken: AtomicBool::new(false),
            })
            .collect();
        Self {
            model: serving.to_string(),
            variant,
            parts,
            ready_once: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    /// The serving variant it holds.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// The partition an ad is learned in (the producers' partitioner).
    pub fn partition_of(&self, ad: &str) -> usize {
        partition_of(ad, self.parts.len() as u32) as usize
    }

    /// The serving variant's answer for `ad` in a request's context, and the version it
    /// reflects (see [`ServingState::answer`]).
    pub fn answer(
        &self,
        ad: &str,
        campaign: Option<&str>,
        ctx: &RequestContext<'_>,
        features: &mut Vec<Feature>,
    ) -> (Answer, Option<i64>) {
        let part = &self.parts[self.partition_of(ad)];
        let state = part.state.read().expect("replica state lock");
        (state.answer(ad, campaign, ctx, features), state.version())
    }

    /// [`Replica::answer`] for every item of `items` (whose ad and campaign `ask` gives), in
    /// their order, taking each partition's lock once rather than once per ad: a ranking
    /// request's candidates share a handful of partitions, and every lock taken is a write to
    /// a cache line the process's other threads read too.
    pub fn answer_all<T>(
        &self,
        items: &[T],
        ask: impl Fn(&T) -> (&str, Option<&str>),
        ctx: &RequestContext<'_>,
        features: &mut Vec<Feature>,
    ) -> Vec<(Answer, Option<i64>)> {
        let mut order: Vec<(usize, usize)> = items
            .iter()
            .enumerate()
            .map(|(i, item)| (self.partition_of(ask(item).0), i))
            .collect();
        order.sort_unstable();
        let mut answers = vec![None; items.len()];
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let state = self.parts[group[0].0]
                .state
                .read()
                .expect("replica state lock");
            for &(_, i) in group {
                let (ad, campaign) = ask(&items[i]);
                answers[i] = Some((state.answer(ad, campaign, ctx, features), state.version()));
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every item is in one partition's group"))
            .collect()
    }

    /// Puts `state` in place as partition `p`'s, loaded and caught up, as [`follow`] would
    /// after restoring and reading (for tests and benchmarks that build states in process).
    pub fn install(&self, p: usize, state: ServingState) {
        let part = &self.parts[p];
        *part.state.write().expect("replica state lock") = state;
        part.loaded.store(true, Ordering::Release);
        part.caught_up.store(true, Ordering::Release);
    }

    /// A replica of `serving` (one of `models`) over `partitions` partitions whose states
    /// learned `labels` in process, each label in its ad's partition at that partition's next
    /// offset, as the owners would (for tests and benchmarks).
    pub fn learned(
        models: &[VariantConfig],
        serving: &str,
        partitions: usize,
        labels: impl IntoIterator<Item = ctr_schemas::LabeledImpression>,
    ) -> Self {
        use crate::state::{PartitionState, Policy};
        let mut states: Vec<PartitionState> = (0..partitions)
            .map(|_| {
                let set = ctr_models::ModelSet::new(models.to_vec()).expect("valid models");
                PartitionState::new(set, crate::config::DEFAULT_DEDUPE_HORIZON_MS)
            })
            .collect();
        for l in labels {
            let st = &mut states[partition_of(&l.ad_id, partitions as u32) as usize];
            st.apply(&l, &l.context.key(), Policy::NORMAL, &mut Vec::new())
                .expect("a label the state can learn");
            st.next_offset = Some(st.next_offset.unwrap_or(0) + 1);
        }
        let replica = Replica::new(models, serving, partitions);
        for (p, st) in states.into_iter().enumerate() {
            replica.install(p, st.into_serving(serving).expect("the serving variant"));
        }
        replica
    }

    /// Ready: every partition loaded and caught up once, none broken.
    pub fn ready(&self) -> bool {
        if !self.ready_once.load(Ordering::Acquire) {
            let all = self
                .parts
                .iter()
                .all(|p| p.loaded.load(Ordering::Acquire) && p.caught_up.load(Ordering::Acquire));
            if !all {
                return false;
            }
            self.ready_once.store(true, Ordering::Release);
            info!(partitions = self.parts.len(), "replica caught up: ready");
        }
        self.parts.iter().all(|p| !p.is_broken())
    }

    /// Readiness, lag and age per partition, for `/readyz`.
    pub fn status(&self) -> ReplicaStatus {
        let now = crate::wall_ms();
        let partitions: Vec<PartitionStatus> = self
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let version = p.state.read().expect("replica state lock").version();
                let owners = p.owners.load(Ordering::Acquire);
                let updated = p.updated_ms.load(Ordering::Acquire);
                PartitionStatus {
                    partition: i,
                    version,
                    lag: (owners >= 0).then(|| (owners - version.unwrap_or(-1)).max(0)),
                    age_s: (updated > 0).then(|| (now - updated).max(0) as f64 / 1e3),
                    caught_up: p.caught_up.load(Ordering::Acquire),
                    error: p.broken.lock().expect("broken").clone(),
                }
            })
            .collect();
        ReplicaStatus {
            ready: self.ready(),
            model: self.model.clone(),
            age_s: partitions
                .iter()
                .filter_map(|p| p.age_s)
                .max_by(f64::total_cmp),
            lag: partitions.iter().filter_map(|p| p.lag).max(),
            error: self.error.lock().expect("error").clone(),
            partitions,
        }
    }

    /// Replaces partition `p` with its latest checkpoint (or an empty state if it has none).
    async fn restore(&self, p: usize, store: &mut CheckpointStore) {
        let part = &self.parts[p];
        let loaded = match store.load_saved(p as i32).await {
            Ok(Some((state, saved_ms))) => match state.into_serving(&self.model) {
                Some(s) => Ok((s, saved_ms.unwrap_or(0))),
                None => Err(format!(
                    "the checkpoint of partition {p} has no variant `{}`: the owners learn other variants",
                    self.model
                )),
            },
            Ok(None) => Ok((ServingState::empty(new_variant(&self.variant)), 0)),
            Err(e) => Err(e.to_string()),
        };
        match loaded {
            Ok((s, saved_ms)) => {
                info!(partition = p, version = ?s.version(), "replica restored the partition's checkpoint");
                *part.state.write().expect("replica state lock") = s;
                part.updated_ms.store(saved_ms, Ordering::Release);
                part.set_broken(None);
                part.loaded.store(true, Ordering::Release);
                metrics::counter!("ctr_scorer_replica_restores_total").increment(1);
            }
            Err(e) => {
                warn!(partition = p, error = %e, "replica cannot load the partition");
                part.set_broken(Some(e));
            }
        }
    }

    /// Applies one stream entry of partition `p`; `false` if the partition must be restored.
    fn apply_entry(&self, p: usize, fields: &redis::streams::StreamId) -> bool {
        let part = &self.parts[p];
        let entry = match Entry::parse(fields) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!("ctr_scorer_replica_errors_total", "reason" => "unreadable")
                    .increment(1);
                warn!(partition = p, id = %fields.id, error = %e, "unreadable model stream entry");
                part.set_broken(Some(format!("model stream entry {}: {e}", fields.id)));
                return false;
            }
        };
        if entry.model != self.model {
            part.set_broken(Some(format!(
                "the owners serve `{}`, this replica `{}`: give both the same --serve-model",
                entry.model, self.model
            )));
            return true;
        }
        let result = part.state.write().expect("replica state lock").apply(
            entry.prev,
            entry.last,
            &entry.delta,
        );
        match result {
            Ok(_) => {
                part.updated_ms.store(entry.wall_ms, Ordering::Release);
                metrics::counter!("ctr_scorer_replica_deltas_total").increment(1);
                true
            }
            Err(ApplyError::Gap { .. }) => {
                metrics::counter!("ctr_scorer_replica_errors_total", "reason" => "gap")
                    .increment(1);
                false
            }
            Err(e) => {
                metrics::counter!("ctr_scorer_replica_errors_total", "reason" => "model")
                    .increment(1);
                part.set_broken(Some(e.to_string()));
                false
            }
        }
    }
}

fn new_variant(cfg: &VariantConfig) -> Variant {
    Variant::new(cfg.clone()).expect("variant settings were checked at start-up")
}

/// A model stream entry (fields written by [`crate::publish`]'s script).
struct Entry {
    prev: i64,
    last: i64,
    model: String,
    wall_ms: i64,
    delta: PartitionDelta,
}

impl Entry {
    fn parse(id: &redis::streams::StreamId) -> Result<Self, String> {
        fn field<T: FromRedisValue>(
            id: &redis::streams::StreamId,
            name: &str,
        ) -> Result<T, String> {
            let v: &Value = id
                .map
                .get(name)
                .ok_or_else(|| format!("no field `{name}`"))?;
            T::from_redis_value(v.clone()).map_err(|e| format!("field `{name}`: {e}"))
        }
        let bytes: Vec<u8> = field(id, "d")?;
        Ok(Self {
            prev: field(id, "prev")?,
            last: field(id, "last")?,
            model: field(id, "m")?,
            wall_ms: field(id, "t")?,
            delta: PartitionDelta::decode(&bytes).map_err(|e| e.to_string())?,
        })
    }
}

/// Fills `replica` from the checkpoints and keeps it current from the model streams until
/// `stop` turns true. Never returns an error: a failing Redis is retried with backoff while
/// the replica serves what it has (see the module docs).
pub async fn follow(
    replica: Arc<Replica>,
    mut conn: RedisConn,
    mut store: CheckpointStore,
    prefix: String,
    topic: String,
    heartbeat: ctr_runtime::Heartbeat,
    mut stop: watch::Receiver<bool>,
) {
    let n = replica.partitions();
    let streams: Vec<String> = (0..n)
        .map(|p| keys::model_stream(&prefix, &topic, p as i32))
        .collect();
    let fences: Vec<String> = (0..n)
        .map(|p| keys::offset_fence(&prefix, &topic, p as i32))
        .collect();
    let mut backoff = Duration::from_millis(100);
    let mut last_fence_read = std::time::Instant::now() - Duration::from_secs(10);
    while !*stop.borrow() {
        heartbeat.beat();
        // (Re)load every partition that needs it.
        for p in 0..n {
            // A restore waits out a Redis outage for up to the budget: a step per partition.
            heartbeat.beat();
            let part = &replica.parts[p];
            let broken = part.is_broken();
            if !part.loaded.load(Ordering::Acquire) || broken {
                replica.restore(p, &mut store).await;
            }
        }
        // Once a second, not per read: under load the reads return every few milliseconds.
        if last_fence_read.elapsed() >= Duration::from_secs(1) {
            last_fence_read = std::time::Instant::now();
            read_fences(&replica, &mut conn, &fences).await;
            report_metrics(&replica);
        }
        let ids: Vec<String> = replica
            .parts
            .iter()
            .map(|p| {
                let v = p.state.read().expect("replica state lock").version();
                format!("{}-0", v.unwrap_or(-1) + 1)
            })
            .collect();
        let read: redis::RedisResult<StreamReadReply> = tokio::select! {
            r = read_streams(&mut conn, &streams, &ids) => r,
            _ = stop.changed() => break,
        };
        let reply = match read {
            Ok(r) => {
                backoff = Duration::from_millis(100);
                *replica.error.lock().expect("error") = None;
                r
            }
            Err(e) => {
                warn!(error = %e, "replica: reading the model streams failed; serving the last model");
                *replica.error.lock().expect("error") = Some(format!("Redis: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut entries = vec![0usize; n];
        for key in &reply.keys {
            let Some(p) = streams.iter().position(|s| *s == key.key) else {
                continue;
            };
            entries[p] = key.ids.len();
            for id in &key.ids {
                if !replica.apply_entry(p, id) {
                    // A gap or a bad entry: restore this partition before reading on.
                    replica.parts[p].loaded.store(false, Ordering::Release);
                    break;
                }
            }
        }
        for (p, part) in replica.parts.iter().enumerate() {
            part.caught_up
                .store(entries[p] < READ_COUNT, Ordering::Release);
        }
        if replica.parts.iter().any(|p| p.is_broken()) {
            // Retried at the top of the loop; do not spin on a broken partition.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Reads the model streams after `ids`, at most [`READ_COUNT`] entries of each. On a single
/// Redis one read names every stream and blocks up to [`BLOCK`] for an entry. On a cluster the
/// streams are in different slots: each is read on its own, all at once, and a round that
/// finds nothing waits [`CLUSTER_POLL`] before returning (a blocking read per stream would
/// hold up the node's shared connection).
async fn read_streams(
    conn: &mut RedisConn,
    streams: &[String],
    ids: &[String],
) -> redis::RedisResult<StreamReadReply> {
    if !conn.is_cluster() {
        let opts = StreamReadOptions::default()
            .count(READ_COUNT)
            .block(BLOCK_MS);
        return redis::AsyncCommands::xread_options(conn, streams, ids, &opts).await;
    }
    let reads = streams.iter().zip(ids).map(|(stream, id)| {
        let mut c = conn.clone();
        let opts = StreamReadOptions::default().count(READ_COUNT);
        async move {
            redis::AsyncCommands::xread_options::<_, _, StreamReadReply>(
                &mut c,
                &[stream],
                &[id],
                &opts,
            )
            .await
        }
    });
    let mut reply = StreamReadReply::default();
    for r in futures::future::try_join_all(reads).await? {
        reply.keys.extend(r.keys);
    }
    if reply.keys.iter().all(|k| k.ids.is_empty()) {
        tokio::time::sleep(CLUSTER_POLL).await;
    }
    Ok(reply)
}

/// Reads the owners' write fences, for the lag `/readyz` reports.
async fn read_fences(replica: &Replica, conn: &mut RedisConn, fences: &[String]) {
    let gets: Vec<redis::Cmd> = fences
        .iter()
        .map(|f| redis::cmd("GET").arg(f).clone())
        .collect();
    let got: redis::RedisResult<Vec<Option<i64>>> = conn.query_each(&gets).await;
    if let Ok(values) = got {
        for (part, v) in replica.parts.iter().zip(values) {
            part.owners.store(v.unwrap_or(-1), Ordering::Release);
        }
    }
}

fn report_metrics(replica: &Replica) {
    let now = crate::wall_ms();
    let (mut parameters, mut totals) = (0, 0);
    for (p, part) in replica.parts.iter().enumerate() {
        let label = p.to_string();
        let version = {
            let state = part.state.read().expect("replica state lock");
            parameters += state.parameters();
            totals += state.total_keys();
            state.version().unwrap_or(-1)
        };
        metrics::gauge!("ctr_scorer_replica_version", "partition" => label.clone())
            .set(version as f64);
        let owners = part.owners.load(Ordering::Acquire);
        if owners >= 0 {
            metrics::gauge!("ctr_scorer_replica_lag_records", "partition" => label.clone())
                .set((owners - version).max(0) as f64);
        }
        let updated = part.updated_ms.load(Ordering::Acquire);
        if updated > 0 {
            metrics::gauge!("ctr_scorer_replica_age_seconds", "partition" => label)
                .set((now - updated).max(0) as f64 / 1e3);
        }
    }
    metrics::gauge!("ctr_scorer_replica_parameters").set(parameters as f64);
    metrics::gauge!("ctr_scorer_replica_total_keys").set(totals as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctr_schemas::Context;

    /// A replica of `combined` over 4 partitions, learned from 4,000 labels over 40 ads.
    fn learned() -> Replica {
        let models = crate::config::parse_models("counts,ftrl,combined").unwrap();
        let labels = (0..4_000i64).map(|i| {
            let geo = ["US", "DE", "FR"][(i % 3) as usize];
            crate::serving::tests::label(i, &format!("ad-{}", i % 40), geo)
        });
        Replica::learned(&models, "combined", 4, labels)
    }

    /// Grouping by partition changes neither an answer nor its place: every item gets what
    /// `answer` gives it alone, in the items' order (ads of all partitions interleaved, known
    /// and new, with and without a campaign).
    #[test]
    fn answering_all_at_once_is_answering_each() {
        let replica = learned();
        let mut items: Vec<(String, Option<&str>)> = (0..40)
            .rev()
            .map(|ad| (format!("ad-{ad}"), (ad % 4 == 0).then_some("camp-2")))
            .collect();
        items.push(("new".into(), Some("camp-1")));
        items.push(("other-new".into(), None));
        let parts: std::collections::BTreeSet<usize> = items
            .iter()
            .map(|(ad, _)| replica.partition_of(ad))
            .collect();
        assert_eq!(parts.len(), 4, "the items span every partition");
        let ctx = Context {
            query_category: "travel".into(),
            geo: "JP".into(),
            device: "mobile".into(),
            extra: Default::default(),
        };
        let (pairs, key) = (ctx.pairs(), ctx.key());
        let request = RequestContext::new(&pairs, &key);
        let all = replica.answer_all(
            &items,
            |(ad, campaign)| (ad.as_str(), *campaign),
            &request,
            &mut Vec::new(),
        );
        assert_eq!(all.len(), items.len());
        for ((ad, campaign), got) in items.iter().zip(&all) {
            let want = replica.answer(ad, *campaign, &request, &mut Vec::new());
            assert_eq!(*got, want, "{ad}");
        }
    }
}

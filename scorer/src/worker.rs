//! A keyed worker: the single owner of the state of its partitions (S4's processing element).
//!
//! Partition `p` belongs to worker `p mod workers`, and an ad to exactly one partition (labels
//! are keyed by ad), so every ad's state has one owner and the hot path takes no lock. A
//! worker receives [`Work`] in order through a bounded queue: records, and ownership changes
//! from the consumer. Per record it decodes, drops duplicates, learns (or sheds, or holds off
//! under the learning guard) and notes the record's effect on the exact totals and which
//! estimates changed. Every `batch_ms` or `batch_size` records it publishes each partition's
//! batch atomically ([`crate::publish`]), with the serving variant's delta for replicas
//! ([`crate::serving`]); every `checkpoint_every` it runs each partition's maintenance
//! (eviction) before its next publish, so replicas drop what the owner dropped, checkpoints
//! each partition ([`crate::checkpoint`]) and only then commits the offsets to Kafka.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctr_models::{Evicted, Impression, Level, ModelError, Touched};
use ctr_runtime::kafka::ProduceError;
use ctr_runtime::{DependencyError, Heartbeat};
use ctr_schemas::contract::{DeadLetter, keys};
use ctr_schemas::{Context, LabeledImpression, Unusable, decode_valid};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info, info_span, warn};

use crate::checkpoint::CheckpointError;
use crate::config::ScorerConfig;
use crate::effects::{Batch, Effects, Live};
use crate::load::{AdHealth, Control, Counted, PartitionReport};
use crate::publish::Published;
use crate::serving::PartitionDelta;
use crate::state::{Outcome, PartitionState, Policy, total_key};

/// What the consumer sends a worker.
#[derive(Debug)]
pub enum Work {
    /// One record of an owned partition.
    Record {
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// Its bytes (`None` for a record without a value).
        payload: Option<Vec<u8>>,
        /// Negatives this record stands for (stage-two shedding; 1 normally).
        thinned: u32,
        /// Records of the partition dropped by stage-two shedding right before this one.
        dropped_before: u32,
    },
    /// The partition was assigned to this process: restore its checkpoint now.
    Assign(i32),
    /// The partition was revoked: publish, checkpoint and commit it, drop it, then answer.
    Revoke(i32, oneshot::Sender<()>),
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A checkpoint could not be saved or restored.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Estimates could not be written within the policy.
    #[error("{source}")]
    Publish {
        /// The partition.
        partition: i32,
        /// The last error.
        source: DependencyError<redis::RedisError>,
    },
    /// A retired key's totals could not be read back within the policy.
    #[error("{source}")]
    ReadTotal {
        /// The partition.
        partition: i32,
        /// The last error.
        source: DependencyError<redis::RedisError>,
    },
    /// The dead-letter topic did not acknowledge a poison record.
    #[error("dead-lettering: {0}")]
    DeadLetter(#[from] ProduceError),
    /// A checkpoint made with other variants than the one to serve.
    #[error(
        "the checkpoint of partition {partition} holds the variants {found:?}, not the serving variant `{serving}`: serve one of those (--serve-model), or delete the partition's checkpoint to start it afresh"
    )]
    ServingVariantMissing {
        /// The partition.
        partition: i32,
        /// The variants the checkpoint holds.
        found: Vec<String>,
        /// The serving variant configured.
        serving: String,
    },
}

/// A record that is not used: unusable by the contract, or rejected by the models.
#[derive(Debug, thiserror::Error)]
enum Poison {
    #[error(transparent)]
    Unusable(#[from] Unusable),
    #[error("rejected by the models: {0}")]
    Model(#[from] ModelError),
}

impl Poison {
    fn label(&self) -> &'static str {
        match self {
            Poison::Unusable(u) => u.label(),
            Poison::Model(_) => "rejected",
        }
    }
}

/// Ads whose estimates changed since the last publish, with the contexts they were seen in.
#[derive(Debug, Default)]
struct Dirty {
    ads: HashMap<String, (String, HashMap<String, Context>)>,
}

impl Dirty {
    fn mark(&mut self, l: LabeledImpression) {
        let key = l.context.key();
        self.mark_keyed(l, key);
    }

    /// [`Dirty::mark`] of a label whose context key is known.
    fn mark_keyed(&mut self, l: LabeledImpression, context_key: String) {
        self.ads
            .entry(l.ad_id)
            .or_insert_with(|| (l.campaign_id, HashMap::new()))
            .1
            .entry(context_key)
            .or_insert(l.context);
    }
}

struct Owned {
    state: PartitionState,
    /// Maintenance (eviction) is due before the next publish: it runs only there, so what it
    /// drops reaches replicas with the batch (see [`Worker::publish`]).
    maintain_due: bool,
    /// What the serving variant's maintenance dropped and no written delta has carried yet.
    evicted: Evicted,
    /// Total keys retired from the hot state that no written delta has carried yet.
    retired: Vec<u64>,
    /// Records consumed since the last publish, and the last one's offset.
    pending: usize,
    last_offset: Option<i64>,
    dirty: Dirty,
    /// Records seen since the last checkpoint (a clean partition is not re-saved).
    changed: bool,
}

/// A worker: owns partitions, applies their records, publishes, checkpoints and commits.
pub struct Worker<E: Effects = Live> {
    id: usize,
    cfg: Arc<ScorerConfig>,
    control: Arc<Control>,
    /// Redis and Kafka, in the service ([`Live`]); a fake in the unit tests.
    effects: E,
    parts: HashMap<i32, Owned>,
    pending: usize,
    /// Records per outcome since the counters were last exported (a registry lookup per
    /// record would cost as much as decoding it).
    tally: [u64; Counted::ALL.len()],
}

impl<E: Effects> std::fmt::Debug for Worker<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("partitions", &self.parts.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn counted_as(o: &Outcome) -> Counted {
    match o {
        // A held click is learned once the negatives of its time arrive.
        Outcome::Learned { .. } | Outcome::Held => Counted::Learned,
        Outcome::Shed => Counted::Shed,
        Outcome::Guarded { .. } | Outcome::CorrectionGuarded => Counted::Guarded,
        Outcome::Corrected => Counted::Corrected,
        Outcome::Duplicate => Counted::Duplicate,
    }
}

impl<E: Effects> Worker<E> {
    /// A worker with the id `id` (partition p belongs to worker p mod workers).
    pub fn new(id: usize, cfg: Arc<ScorerConfig>, control: Arc<Control>, effects: E) -> Self {
        Self {
            id,
            cfg,
            control,
            effects,
            parts: HashMap::new(),
            pending: 0,
            tally: [0; Counted::ALL.len()],
        }
    }

    /// Processes work until the queue closes; then publishes, checkpoints and commits all.
    /// Beats `heartbeat` at every step (at least every half second when idle).
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Work>,
        heartbeat: Heartbeat,
    ) -> Result<(), WorkerError> {
        let span = info_span!("worker", id = self.id);
        async move {
            let mut buf = Vec::with_capacity(self.cfg.batch_size);
            let batch_wait = Duration::from_millis(self.cfg.batch_ms);
            let mut batch_started = Instant::now();
            let mut last_checkpoint = Instant::now();
            let mut last_report = Instant::now();
            loop {
                heartbeat.beat();
                let received = if self.pending == 0 {
                    // Idle: wake up now and then for checkpoints and reports.
                    tokio::time::timeout(
                        Duration::from_millis(500),
                        rx.recv_many(&mut buf, self.cfg.batch_size),
                    )
                    .await
                } else {
                    let left = batch_wait.saturating_sub(batch_started.elapsed());
                    tokio::time::timeout(left, rx.recv_many(&mut buf, self.cfg.batch_size)).await
                };
                let closed = matches!(received, Ok(0));
                let was_empty = self.pending == 0;
                for work in buf.drain(..) {
                    self.handle(work).await?;
                }
                if was_empty && self.pending > 0 {
                    batch_started = Instant::now();
                }
                if self.pending >= self.cfg.batch_size
                    || (self.pending > 0 && batch_started.elapsed() >= batch_wait)
                    || closed
                {
                    self.publish_all().await?;
                }
                if closed {
                    self.checkpoint_all().await?;
                    break;
                }
                if last_checkpoint.elapsed() >= self.cfg.checkpoint_every {
                    for own in self.parts.values_mut() {
                        own.maintain_due = true;
                    }
                    self.publish_all().await?;
                    self.checkpoint_all().await?;
                    last_checkpoint = Instant::now();
                }
                if last_report.elapsed() >= Duration::from_secs(1) {
                    self.report();
                    last_report = Instant::now();
                }
            }
            info!("worker stopped; state checkpointed");
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn handle(&mut self, work: Work) -> Result<(), WorkerError> {
        match work {
            Work::Record {
                partition,
                offset,
                payload,
                thinned,
                dropped_before,
            } => {
                let policy = self.control.policy(thinned);
                self.record(
                    partition,
                    offset,
                    payload.as_deref(),
                    policy,
                    dropped_before,
                )
                .await
            }
            Work::Assign(p) => self.owned(p).await.map(|_| ()),
            Work::Revoke(p, done) => {
                if let Some(own) = self.parts.get_mut(&p) {
                    own.maintain_due = true;
                    self.publish(p).await?;
                    self.checkpoint(&[p]).await?;
                    self.parts.remove(&p);
                    self.control.reports.lock().expect("reports").remove(&p);
                    info!(partition = p, "partition handed over");
                }
                let _ = done.send(());
                Ok(())
            }
        }
    }

    /// The state of `p`, restored from its checkpoint if this worker does not hold it yet.
    async fn owned(&mut self, p: i32) -> Result<&mut Owned, WorkerError> {
        if !self.parts.contains_key(&p) {
            let state = match self.effects.load(p).await? {
                Some(st) => {
                    if st.models().variant(&self.cfg.serve_model).is_none() {
                        return Err(WorkerError::ServingVariantMissing {
                            partition: p,
                            found: st
                                .models()
                                .variants()
                                .iter()
                                .map(|v| v.name().to_string())
                                .collect(),
                            serving: self.cfg.serve_model.clone(),
                        });
                    }
                    let increments = st.chain().map_or(0, |c| c.links);
                    info!(partition = p, next_offset = ?st.next_offset, examples = st.models().examples(),
                          increments, "restored partition state from checkpoint");
                    metrics::counter!("ctr_scorer_restores_total").increment(1);
                    metrics::counter!("ctr_scorer_restored_increments_total")
                        .increment(increments as u64);
                    st
                }
                None => {
                    let models = ctr_models::ModelSet::new(self.cfg.models.clone())
                        .expect("variant settings were checked at start-up");
                    PartitionState::new(models, self.cfg.dedupe_horizon_ms)
                }
            };
            self.parts.insert(
                p,
                Owned {
                    state,
                    maintain_due: false,
                    evicted: Evicted::default(),
                    retired: Vec::new(),
                    pending: 0,
                    last_offset: None,
                    dirty: Dirty::default(),
                    changed: false,
                },
            );
        }
        Ok(self.parts.get_mut(&p).expect("inserted above"))
    }

    async fn record(
        &mut self,
        p: i32,
        offset: i64,
        payload: Option<&[u8]>,
        policy: Policy,
        dropped_before: u32,
    ) -> Result<(), WorkerError> {
        let own = self.owned(p).await?;
        match own.state.next_offset {
            Some(next) if offset < next => return Ok(()), // already in the restored state
            Some(next) if offset > next + i64::from(dropped_before) => warn!(
                partition = p,
                expected = next,
                got = offset,
                "gap in the partition (retention?): records in between were never seen"
            ),
            _ => {}
        }
        own.state.next_offset = Some(offset + 1);
        own.changed = true;
        let started = Instant::now();
        let mut released = Vec::new();
        let decoded = decode_valid::<LabeledImpression>(payload).map(|l| {
            let ctx_key = l.context.key();
            (l, ctx_key)
        });
        if let Ok((l, ctx_key)) = &decoded {
            self.bring_back(p, l, ctx_key).await?;
        }
        let own = self.parts.get_mut(&p).expect("owned above");
        let result = decoded.map_err(Poison::from).and_then(|(l, ctx_key)| {
            own.state
                .apply(&l, &ctx_key, policy, &mut released)
                .map(|o| (l, ctx_key, o))
                .map_err(Poison::from)
        });
        // Clicks learned now that their negatives arrived: their ads' estimates changed.
        for l in released {
            own.dirty.mark(l);
        }
        let counted = match result {
            Ok((l, ctx_key, outcome)) => {
                if offset % 64 == 0 {
                    metrics::histogram!("ctr_scorer_update_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
                if outcome.count_delta().is_some() {
                    own.dirty.mark_keyed(l, ctx_key);
                }
                counted_as(&outcome)
            }
            Err(reason) => {
                metrics::counter!("ctr_scorer_poison_total", "reason" => reason.label())
                    .increment(1);
                warn!(partition = p, offset, %reason, "dead-lettering a poison labeled impression");
                let reason = reason.to_string();
                let letter = DeadLetter {
                    source_topic: &self.cfg.labeled_topic,
                    source_partition: p,
                    source_offset: Some(offset),
                    reason: &reason,
                };
                self.effects.dead_letter(&letter, payload).await?;
                Counted::Poison
            }
        };
        let own = self.parts.get_mut(&p).expect("owned above");
        own.pending += 1;
        own.last_offset = Some(offset);
        self.pending += 1;
        self.tally[counted as usize] += 1;
        Ok(())
    }

    /// Brings the keys of `l` (its ad, and the ad in its context `ctx_key`) that retired from
    /// partition `p`'s hot totals back, with their values in Redis ([`crate::retention`]).
    async fn bring_back(
        &mut self,
        p: i32,
        l: &LabeledImpression,
        ctx_key: &str,
    ) -> Result<(), WorkerError> {
        // Until a key has retired, no record pays for hashing its keys here.
        if self.parts[&p].state.retired().is_empty() {
            return Ok(());
        }
        let prefix = &self.cfg.service.redis_prefix;
        for context in [None, Some(ctx_key)] {
            let key = total_key(&l.ad_id, context);
            let own = self.parts.get(&p).expect("owned by the caller");
            if !own.state.needs_seed(key) {
                continue;
            }
            let redis_key = match context {
                None => keys::ad(prefix, &l.ad_id),
                Some(c) => keys::ad_context(prefix, &l.ad_id, c),
            };
            let found = self
                .effects
                .read_total(&redis_key)
                .await
                .map_err(|source| WorkerError::ReadTotal {
                    partition: p,
                    source,
                })?;
            let own = self.parts.get_mut(&p).expect("owned by the caller");
            let found_label = match (found.is_some(), own.state.seed(key, found)) {
                (false, _) => "absent",
                (true, false) => "found",
                // A replay below what was published: records up to the value's offset are
                // in it already.
                (true, true) => "found_ahead",
            };
            metrics::counter!("ctr_scorer_totals_returned_total", "in_redis" => found_label)
                .increment(1);
        }
        Ok(())
    }

    /// The encoded [`PartitionDelta`] of `own`'s batch for replicas: the serving variant's
    /// parameters that the dirty ads' learning may have changed, their exact totals and
    /// campaigns, and what maintenance dropped.
    fn delta(&self, own: &Owned) -> Vec<u8> {
        let state = &own.state;
        let model = state.models().variant(&self.cfg.serve_model).expect(
            "a partition's state has the serving variant (checked at start-up and restore)",
        );
        let mut touched = Touched::default();
        let mut totals = Vec::new();
        let mut campaigns = Vec::new();
        for (ad, (campaign, contexts)) in &own.dirty.ads {
            let ad_key = total_key(ad, None);
            let campaign = state.campaign_of(ad).unwrap_or(campaign);
            totals.push((ad_key, state.total_at(ad_key)));
            campaigns.push((ad_key, campaign.to_string()));
            for (ctx_key, ctx) in contexts {
                let pairs = ctx.pairs();
                model.touch(
                    &Impression {
                        ad,
                        campaign,
                        position: 1,
                        context: &pairs,
                        ts_ms: 0,
                    },
                    &mut touched,
                );
                let key = total_key(ad, Some(ctx_key));
                totals.push((key, state.total_at(key)));
            }
        }
        PartitionDelta {
            model: model.delta(&touched, &own.evicted),
            totals,
            campaigns,
            retired: own.retired.clone(),
        }
        .encode()
    }

    /// The serving variant's estimates for every dirty key of `own`.
    fn estimates(&self, own: &mut Owned) -> Vec<Published> {
        let prefix = &self.cfg.service.redis_prefix;
        let Some(model) = own.state.models().variant(&self.cfg.serve_model) else {
            return Vec::new();
        };
        let ts_ms = own.state.newest_ms().max(0);
        let mut out = Vec::new();
        let state = &own.state;
        for (ad, (campaign, contexts)) in own.dirty.ads.drain() {
            let predict = |context: &[(&str, &str)]| {
                model.predict(&Impression {
                    ad: &ad,
                    campaign: &campaign,
                    position: 1,
                    context,
                    ts_ms,
                })
            };
            // The ad over all contexts: the count model's ad level where the variant has one
            // (FTRL evaluated with no context fields is not an average over contexts: it
            // leaves out every field's weight).
            let whole = match model.counts() {
                Some(c) => {
                    let e = c.predict(&Impression {
                        ad: &ad,
                        campaign: &campaign,
                        position: 1,
                        context: &[],
                        ts_ms,
                    });
                    (e.p, e.level)
                }
                None => {
                    let p = predict(&[]);
                    (p.p, p.level.unwrap_or(Level::BackedOff))
                }
            };
            out.push(Published {
                key: keys::ad(prefix, &ad),
                pctr: whole.0,
                level: whole.1,
                total: state.total(&ad, None),
            });
            for (ctx_key, ctx) in contexts {
                let e = predict(&ctx.pairs());
                out.push(Published {
                    pctr: e.p,
                    level: e.level.unwrap_or(Level::Exact),
                    total: state.total(&ad, Some(&ctx_key)),
                    key: keys::ad_context(prefix, &ad, &ctx_key),
                });
            }
        }
        out
    }

    async fn publish_all(&mut self) -> Result<(), WorkerError> {
        let parts: Vec<i32> = self.parts.keys().copied().collect();
        for p in parts {
            self.publish(p).await?;
        }
        for (n, what) in self.tally.iter_mut().zip(Counted::ALL) {
            self.control.count(what, std::mem::take(n));
        }
        Ok(())
    }

    /// Writes partition `p`'s changed keys to Redis, fenced by the batch's last offset (under
    /// the dependency policy: an outage past its budget stops the worker, and the process
    /// restarts from the last checkpoint; the records behind the batch are never dropped).
    async fn publish(&mut self, p: i32) -> Result<(), WorkerError> {
        let Some(mut own) = self.parts.remove(&p) else {
            return Ok(());
        };
        let Some(last_offset) = own.last_offset.filter(|_| own.pending > 0) else {
            self.parts.insert(p, own);
            return Ok(());
        };
        let started = Instant::now();
        if own.maintain_due {
            own.maintain_due = false;
            let serving = own
                .state
                .models()
                .variants()
                .iter()
                .position(|v| v.name() == self.cfg.serve_model);
            let evicted = own.state.maintain(self.cfg.idle_ms);
            if let Some(e) = serving.and_then(|i| evicted.into_iter().nth(i)) {
                own.evicted.extend(e);
            }
            // Keys changed in this batch are published by it: they stay.
            let busy: std::collections::HashSet<u64> = own
                .dirty
                .ads
                .iter()
                .flat_map(|(ad, (_, contexts))| {
                    std::iter::once(total_key(ad, None))
                        .chain(contexts.keys().map(|c| total_key(ad, Some(c))))
                })
                .collect();
            let retired = own
                .state
                .retire(self.cfg.retention, |key| busy.contains(&key));
            metrics::counter!("ctr_scorer_totals_retired_total").increment(retired.len() as u64);
            own.retired.extend(retired);
        }
        let delta = self.delta(&own);
        let estimates = self.estimates(&mut own);
        let batch = Batch {
            partition: p,
            last_offset,
            estimates: &estimates,
            model: &self.cfg.serve_model,
            delta: &delta,
        };
        let result = self
            .effects
            .publish(batch)
            .instrument(info_span!("publish", partition = p))
            .await
            .map_err(|source| WorkerError::Publish {
                partition: p,
                source,
            });
        let records = own.pending;
        own.pending = 0;
        self.pending -= records;
        self.parts.insert(p, own);
        let applied = result?;
        self.control.published_now();
        if applied {
            if let Some(own) = self.parts.get_mut(&p) {
                own.evicted = Evicted::default();
                own.retired.clear();
            }
            metrics::counter!("ctr_scorer_applied_total").increment(records as u64);
        } else {
            metrics::counter!("ctr_scorer_replayed_total").increment(records as u64);
        }
        metrics::histogram!("ctr_scorer_publish_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("ctr_scorer_publish_batch_records").record(records as f64);
        metrics::histogram!("ctr_scorer_publish_batch_estimates").record(estimates.len() as f64);
        metrics::histogram!("ctr_scorer_publish_delta_bytes").record(delta.len() as f64);
        Ok(())
    }

    async fn checkpoint_all(&mut self) -> Result<(), WorkerError> {
        let parts: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, o)| o.changed)
            .map(|(p, _)| *p)
            .collect();
        self.checkpoint(&parts).await
    }

    /// Checkpoints `parts` (already published), then commits their offsets. Every dead letter
    /// is delivered first: the checkpoint moves past the poison records behind them. The
    /// commit is asynchronous, always: it is only where a new owner starts reading (the
    /// checkpoint decides what it skips), and a synchronous commit would block a runtime
    /// thread for as long as the broker does not answer.
    async fn checkpoint(&mut self, parts: &[i32]) -> Result<(), WorkerError> {
        self.effects.flush_dead_letters().await?;
        let mut offsets = Vec::with_capacity(parts.len());
        for &p in parts {
            let Some(own) = self.parts.get_mut(&p) else {
                continue;
            };
            debug_assert!(own.pending == 0, "checkpoint before publish");
            let started = Instant::now();
            let saved = self.effects.save(p, &mut own.state).await?;
            own.changed = false;
            if let Some(saved) = saved {
                let kind = saved.kind.label();
                metrics::histogram!("ctr_scorer_checkpoint_seconds", "kind" => kind)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("ctr_scorer_checkpoint_bytes", "kind" => kind)
                    .record(saved.bytes as f64);
            }
            if saved.is_none() {
                warn!(
                    partition = p,
                    "a newer checkpoint exists (partition moved to another scorer); not overwriting it"
                );
                continue;
            }
            if let Some(next) = own.state.next_offset {
                offsets.push((p, next));
            }
        }
        self.effects.commit(&offsets);
        Ok(())
    }

    /// Publishes this worker's partitions' model health for the monitoring side.
    fn report(&self) {
        let mut reports = self.control.reports.lock().expect("reports");
        for (&p, own) in &self.parts {
            let variants = own.state.models().variants();
            let models = variants
                .iter()
                .map(|v| {
                    (
                        v.name().to_string(),
                        v.metrics().clone(),
                        v.window().window(),
                    )
                })
                .collect();
            let ads = own
                .state
                .models()
                .variant(&self.cfg.serve_model)
                .map(|v| {
                    v.slices()
                        .busiest_ads(ADS_REPORTED)
                        .into_iter()
                        .map(|(ad, m)| {
                            let total = own.state.total(ad, None);
                            AdHealth {
                                ad_id: ad.to_string(),
                                impressions: total.imps,
                                clicks: total.clicks,
                                mean_pctr: m.mean_prediction(),
                                observed_ctr: m.observed_ctr(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let partition = p.to_string();
            metrics::gauge!("ctr_scorer_hot_total_keys", "partition" => partition.clone())
                .set(own.state.total_keys() as f64);
            metrics::gauge!("ctr_scorer_retired_filter_bytes", "partition" => partition)
                .set(own.state.retired().bytes() as f64);
            let newest = own.state.newest_ms();
            reports.insert(
                p,
                PartitionReport {
                    models,
                    ads,
                    newest_event_ms: (newest > 0).then_some(newest),
                },
            );
        }
    }
}

/// Busiest ads each partition reports to the dashboard.
const ADS_REPORTED: usize = 10;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::Parser;
    use ctr_schemas::Encoder;

    use super::*;
    use crate::checkpoint::{Kind, Saved};

    /// What the fake saw, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Publish(i32, i64),
        DeadLetter(i32, i64),
        FlushDeadLetters,
        Save(i32, Option<i64>),
        Commit(Vec<(i32, i64)>),
    }

    /// Effects that record themselves; a save can be refused (a newer checkpoint exists).
    /// Published totals go to a fake Redis, fenced per key by offset as the scripts do, and
    /// checkpoints to a fake chain (a base and increments, as the fenced store keeps them).
    #[derive(Debug, Default)]
    struct Recorder {
        seen: Arc<Mutex<Vec<Seen>>>,
        refuse_saves: bool,
        redis: Arc<Mutex<HashMap<String, (crate::state::Total, i64)>>>,
        checkpoint: Arc<Mutex<FakeChain>>,
    }

    /// One partition's checkpoint chain.
    #[derive(Debug, Default)]
    struct FakeChain {
        base: Option<Vec<u8>>,
        increments: Vec<Vec<u8>>,
        chain: Option<ctr_runtime::redis::Chain>,
        bases: usize,
    }

    impl Recorder {
        fn note(&self, s: Seen) {
            self.seen.lock().unwrap().push(s);
        }
    }

    impl Effects for Recorder {
        async fn load(
            &mut self,
            _partition: i32,
        ) -> Result<Option<PartitionState>, CheckpointError> {
            let stored = self.checkpoint.lock().unwrap();
            Ok(stored.base.as_ref().map(|base| {
                let mut state = PartitionState::restore_chain(base, &stored.increments).unwrap();
                let linked = stored.increments.iter().map(Vec::len).sum();
                state.based(stored.chain.clone().unwrap(), base.len(), linked);
                state
            }))
        }

        fn publish(
            &mut self,
            b: Batch<'_>,
        ) -> impl Future<Output = Result<bool, DependencyError<redis::RedisError>>> + Send {
            self.note(Seen::Publish(b.partition, b.last_offset));
            let mut redis = self.redis.lock().unwrap();
            for e in b.estimates {
                if redis
                    .get(&e.key)
                    .is_none_or(|(_, ver)| *ver < b.last_offset)
                {
                    redis.insert(e.key.clone(), (e.total, b.last_offset));
                }
            }
            async { Ok(true) }
        }

        fn read_total(
            &mut self,
            key: &str,
        ) -> impl Future<
            Output = Result<Option<(crate::state::Total, i64)>, DependencyError<redis::RedisError>>,
        > + Send {
            let found = self.redis.lock().unwrap().get(key).copied();
            async move { Ok(found) }
        }

        fn save(
            &mut self,
            partition: i32,
            state: &mut PartitionState,
        ) -> impl Future<Output = Result<Option<Saved>, CheckpointError>> + Send {
            self.note(Seen::Save(partition, state.next_offset));
            let saved = (!self.refuse_saves).then(|| {
                let mut stored = self.checkpoint.lock().unwrap();
                let prepared = state
                    .increment(crate::state::Compaction::DEFAULT)
                    .filter(|_| stored.chain.as_ref() == state.chain());
                if let Some(prepared) = prepared {
                    let bytes = prepared.body.len();
                    let chain = stored.chain.as_mut().unwrap();
                    chain.links += 1;
                    stored.increments.push(prepared.body.clone());
                    state.linked(prepared, stored.chain.clone().unwrap());
                    return Saved {
                        kind: Kind::Increment,
                        bytes,
                        bounded_bytes: 0,
                    };
                }
                let base = state.snapshot();
                stored.bases += 1;
                let chain = ctr_runtime::redis::Chain {
                    id: stored.bases.to_string(),
                    links: 0,
                };
                state.based(chain.clone(), base.len(), 0);
                let bytes = base.len();
                *stored = FakeChain {
                    base: Some(base),
                    increments: Vec::new(),
                    chain: Some(chain),
                    bases: stored.bases,
                };
                Saved {
                    kind: Kind::Whole,
                    bytes,
                    bounded_bytes: 0,
                }
            });
            async move { Ok(saved) }
        }

        fn dead_letter(
            &mut self,
            letter: &DeadLetter<'_>,
            _payload: Option<&[u8]>,
        ) -> impl Future<Output = Result<(), ProduceError>> + Send {
            let offset = letter.source_offset.expect("a poison record's offset");
            self.note(Seen::DeadLetter(letter.source_partition, offset));
            async { Ok(()) }
        }

        fn flush_dead_letters(&mut self) -> impl Future<Output = Result<(), ProduceError>> + Send {
            self.note(Seen::FlushDeadLetters);
            async { Ok(()) }
        }

        fn commit(&mut self, offsets: &[(i32, i64)]) {
            let mut offsets = offsets.to_vec();
            offsets.sort_unstable();
            self.note(Seen::Commit(offsets));
        }
    }

    fn config() -> Arc<ScorerConfig> {
        let args = crate::ScorerArgs::parse_from([
            "ctr-scorer",
            "--models=counts",
            "--serve-model=counts",
        ]);
        Arc::new(ScorerConfig::try_from(args).unwrap())
    }

    fn record(partition: i32, offset: i64) -> Work {
        let label = crate::state::tests::label(
            &format!("{partition}:{offset}"),
            &format!("ad-{partition}"),
            false,
            1_760_000_000_000 + offset,
        );
        let mut payload = Vec::new();
        Encoder::<LabeledImpression>::new()
            .encode_into(&label, &mut payload)
            .unwrap();
        Work::Record {
            partition,
            offset,
            payload: Some(payload),
            thinned: 1,
            dropped_before: 0,
        }
    }

    /// Runs a worker over records of partitions 0 and 2 (offsets 0..5) and a poison record at
    /// partition 0, offset 5, then closes its queue; what the effects saw, in order.
    async fn run(refuse_saves: bool) -> Vec<Seen> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let effects = Recorder {
            seen: Arc::clone(&seen),
            refuse_saves,
            ..Recorder::default()
        };
        let worker = Worker::new(0, config(), Arc::new(Control::default()), effects);
        let (tx, rx) = mpsc::channel(64);
        let heartbeat = ctr_runtime::Liveness::default().register("worker", Duration::MAX);
        let running = tokio::spawn(worker.run(rx, heartbeat));
        for p in [0, 2] {
            tx.send(Work::Assign(p)).await.unwrap();
        }
        for offset in 0..5 {
            for p in [0, 2] {
                tx.send(record(p, offset)).await.unwrap();
            }
        }
        tx.send(Work::Record {
            partition: 0,
            offset: 5,
            payload: Some(b"not an Avro record".to_vec()),
            thinned: 1,
            dropped_before: 0,
        })
        .await
        .unwrap();
        drop(tx);
        running.await.unwrap().unwrap();
        seen.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_batch_is_published_before_its_checkpoint_and_committed_after_it() {
        let seen = run(false).await;
        let at = |s: &Seen| {
            seen.iter()
                .rposition(|x| x == s)
                .unwrap_or_else(|| panic!("{s:?} not in {seen:?}"))
        };
        // Partition 0 ends at the poison record: it is dead-lettered, and delivered before
        // the checkpoint that moves past it.
        assert!(
            at(&Seen::DeadLetter(0, 5)) < at(&Seen::FlushDeadLetters),
            "{seen:?}"
        );
        assert!(
            at(&Seen::FlushDeadLetters) < at(&Seen::Save(0, Some(6))),
            "{seen:?}"
        );
        // Each partition's last batch is written before the checkpoint that covers it, which
        // resumes right after it.
        assert!(
            at(&Seen::Publish(0, 5)) < at(&Seen::Save(0, Some(6))),
            "{seen:?}"
        );
        assert!(
            at(&Seen::Publish(2, 4)) < at(&Seen::Save(2, Some(5))),
            "{seen:?}"
        );
        // Offsets are committed after both checkpoints, at the checkpoints' offsets.
        let commit = at(&Seen::Commit(vec![(0, 6), (2, 5)]));
        assert!(at(&Seen::Save(0, Some(6))) < commit, "{seen:?}");
        assert!(at(&Seen::Save(2, Some(5))) < commit, "{seen:?}");
    }

    #[tokio::test]
    async fn a_checkpoint_that_was_not_written_is_not_committed() {
        // A newer checkpoint exists (the partitions moved on): nothing may be committed.
        let seen = run(true).await;
        assert!(seen.contains(&Seen::Save(0, Some(6))), "{seen:?}");
        for s in &seen {
            if let Seen::Commit(offsets) = s {
                assert!(offsets.is_empty(), "committed {offsets:?}: {seen:?}");
            }
        }
    }

    /// A labeled impression of `ad` in the context with geo `geo`, at `ts_ms`, as a record of
    /// partition 0 at `offset`.
    fn record_in(ad: &str, geo: &str, offset: i64, ts_ms: i64) -> Work {
        let serve_id = offset + 1;
        let id = LabeledImpression::label_id_for(serve_id, ad);
        let mut label = crate::state::tests::label(&id, ad, offset % 7 == 0, ts_ms);
        label.serve_id = serve_id;
        label.click_ts_ms = label.clicked.then_some(ts_ms + 500);
        label.context.geo = geo.into();
        let mut payload = Vec::new();
        Encoder::<LabeledImpression>::new()
            .encode_into(&label, &mut payload)
            .unwrap();
        Work::Record {
            partition: 0,
            offset,
            payload: Some(payload),
            thinned: 1,
            dropped_before: 0,
        }
    }

    /// Feeds copies of `records` (all of partition 0) to `worker` in batches of 10, each
    /// published, with maintenance (retirement) before every third batch's publish.
    async fn feed(worker: &mut Worker<Recorder>, records: &[Work]) {
        for (i, batch) in records.chunks(10).enumerate() {
            for r in batch {
                let Work::Record {
                    offset, payload, ..
                } = r
                else {
                    unreachable!()
                };
                worker
                    .handle(Work::Record {
                        partition: 0,
                        offset: *offset,
                        payload: payload.clone(),
                        thinned: 1,
                        dropped_before: 0,
                    })
                    .await
                    .unwrap();
            }
            if i % 3 == 2 {
                worker.parts.get_mut(&0).unwrap().maintain_due = true;
            }
            worker.publish(0).await.unwrap();
        }
    }

    #[tokio::test]
    async fn retired_keys_come_back_from_redis_exact_also_when_a_replay_passes_them_again() {
        let cfg = {
            let args = crate::ScorerArgs::parse_from([
                "ctr-scorer",
                "--models=counts",
                "--serve-model=counts",
                "--totals-hot-ms=1000",
            ]);
            Arc::new(ScorerConfig::try_from(args).unwrap())
        };
        // Two ads in six contexts; every context goes quiet for seconds of event time and
        // comes back, so keys retire and return again and again.
        let geos = ["US", "DE", "FR", "IT", "ES", "NL"];
        let t0 = 1_760_000_000_000;
        let records: Vec<Work> = (0..600)
            .map(|i: i64| {
                let phase = (i / 50) as usize;
                let geo = geos[(phase + (i as usize % 2)) % geos.len()];
                let ad = if i % 5 == 0 { "ad-b" } else { "ad-a" };
                record_in(ad, geo, i, t0 + i * 100)
            })
            .collect();
        let redis = Arc::new(Mutex::new(HashMap::new()));
        let checkpoint = Arc::new(Mutex::new(FakeChain::default()));
        let recorder = || Recorder {
            redis: Arc::clone(&redis),
            checkpoint: Arc::clone(&checkpoint),
            ..Recorder::default()
        };

        // The first owner: checkpoints every 100 records up to offset 300 (a whole state, then
        // increments), goes on to 450, and dies unannounced.
        let mut first = Worker::new(
            0,
            Arc::clone(&cfg),
            Arc::new(Control::default()),
            recorder(),
        );
        first.handle(Work::Assign(0)).await.unwrap();
        for part in records[..300].chunks(100) {
            feed(&mut first, part).await;
            first.checkpoint_all().await.unwrap();
        }
        let own = &first.parts[&0];
        assert!(
            !own.state.retired().is_empty(),
            "keys retired in the first half"
        );
        assert_eq!(checkpoint.lock().unwrap().increments.len(), 2);
        feed(&mut first, &records[300..450]).await;
        let hot_keys = first.parts[&0].state.total_keys();
        drop(first);

        // The next owner restores the checkpoint and replays from 300, through keys the first
        // owner brought back and published past where the replay is.
        let mut next = Worker::new(0, cfg, Arc::new(Control::default()), recorder());
        next.handle(Work::Assign(0)).await.unwrap();
        feed(&mut next, &records[300..]).await;

        // Every key in Redis holds the totals of every record, counted once.
        let mut want: HashMap<String, (u64, u64)> = HashMap::new();
        for w in &records {
            let Work::Record { payload, .. } = w else {
                unreachable!()
            };
            let l = decode_valid::<LabeledImpression>(payload.as_deref()).unwrap();
            for key in [
                keys::ad("ctr:", &l.ad_id),
                keys::ad_context("ctr:", &l.ad_id, &l.context.key()),
            ] {
                let e = want.entry(key).or_default();
                e.0 += 1;
                e.1 += u64::from(l.clicked);
            }
        }
        let got: HashMap<String, (u64, u64)> = redis
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (t, _))| (k.clone(), (t.imps, t.clicks)))
            .collect();
        assert_eq!(got, want);
        assert!(
            hot_keys < want.len(),
            "retired keys left the hot state: {hot_keys} of {}",
            want.len()
        );
    }
}

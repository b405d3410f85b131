//! The consumer-group loop: reads labeled impressions and hands each to the worker that owns
//! its partition.
//!
//! Labeled impressions are keyed by ad, so a partition owns a fixed set of ads, and the group
//! protocol gives each partition to exactly one scorer process: any number of identical
//! scorers share the work (S4's symmetric cluster). Within a process, partition `p` goes to
//! worker `p mod workers` ([`crate::worker`]). Ownership changes reach the workers in order
//! with the records: an assigned partition is restored from its checkpoint before its first
//! record; a revoked one is published, checkpointed and committed before the loop goes on.
//! The worker queues are bounded: when workers fall behind, the loop waits (and the shedding
//! governor, [`crate::load`], sees the queues fill).

use std::sync::Arc;
use std::time::Duration;

use ctr_runtime::Liveness;
use ctr_runtime::kafka::{GroupContext, Membership};
use ctr_schemas::contract::headers;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::Result;
use crate::checkpoint::CheckpointStore;
use crate::config::ScorerConfig;
use crate::deadletter::DeadLetters;
use crate::effects::Live;
use crate::load::{Control, Counted};
use crate::publish::Publisher;
use crate::state::Thinning;
use crate::worker::{Work, Worker};

/// `Some(position)` if the joiner marked the label not clicked (the contract's `ctr.clicked`
/// header), with the position its `ctr.position` header names (0 if none): stage-two
/// shedding drops only those, per ad and position. A record without `ctr.clicked` is never
/// dropped.
fn negative_at<M: Message>(m: &M) -> Option<u32> {
    let h = m.headers()?;
    let mut negative = false;
    let mut position = 0;
    for h in h.iter() {
        if h.key == headers::CLICKED {
            negative = h.value == Some(headers::clicked_value(false).as_bytes());
        } else if h.key == headers::POSITION {
            position = h
                .value
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0);
        }
    }
    negative.then_some(position)
}

/// Stage-two shedding's state of one partition, in the consumer.
#[derive(Debug, Default)]
struct PartitionShedding {
    /// Its open groups of dropped negatives.
    groups: Thinning,
    /// Records dropped unread since the last one passed on (for the worker's gap check).
    dropped_before: u32,
}

/// The consumer's context: the runtime's group context, with a hook that records the consumer
/// lag per partition for the shedding governor and /metrics.
fn context(control: Arc<Control>, topic: String) -> GroupContext {
    GroupContext::new("scorer").with_stats(move |statistics| {
        let Some(topic) = statistics.topics.get(&topic) else {
            return;
        };
        let mut lag = control.lag.lock().expect("lag map");
        lag.clear();
        for (&p, part) in &topic.partitions {
            // Lag behind the high watermark from the position handed to this process
            // (`app_offset`), not from the committed offset, which only moves at checkpoints.
            // -1 = unknown; librdkafka also lists the internal partition -1.
            if p >= 0 && part.hi_offset >= 0 && part.app_offset >= 0 {
                let l = (part.hi_offset - part.app_offset).max(0);
                lag.insert(p, l);
                metrics::gauge!("ctr_scorer_consumer_lag", "partition" => p.to_string())
                    .set(l as f64);
            }
        }
    })
}

/// The workers' queues, indexed by worker.
struct Router {
    queues: Vec<mpsc::Sender<Work>>,
}

impl Router {
    fn queue(&self, partition: i32) -> &mpsc::Sender<Work> {
        &self.queues[partition.unsigned_abs() as usize % self.queues.len()]
    }

    /// Fill of the fullest queue, 0..=1.
    fn fill(queues: &[mpsc::Sender<Work>]) -> f64 {
        queues
            .iter()
            .map(|q| 1.0 - q.capacity() as f64 / q.max_capacity() as f64)
            .fold(0.0, f64::max)
    }

    /// Passes ownership changes to the workers; waits until revoked partitions are handed
    /// over (published, checkpointed, committed). Returns the partitions that moved (revoked
    /// or assigned).
    async fn apply(&self, ctx: &GroupContext) -> Vec<i32> {
        let mut moved = Vec::new();
        for change in ctx.take_changes() {
            match change {
                Membership::Revoked(parts) => {
                    moved.extend_from_slice(&parts);
                    let mut acks = Vec::new();
                    for p in parts {
                        let (tx, rx) = oneshot::channel();
                        if self.queue(p).send(Work::Revoke(p, tx)).await.is_ok() {
                            acks.push(rx);
                        }
                    }
                    for ack in acks {
                        // A dropped ack means the worker failed; its error surfaces on join.
                        let _ = ack.await;
                    }
                }
                Membership::Assigned(parts) => {
                    moved.extend_from_slice(&parts);
                    for p in parts {
                        let _ = self.queue(p).send(Work::Assign(p)).await;
                    }
                }
            }
        }
        moved
    }
}

/// Consumes until `stop` turns true (or a worker fails); the workers then publish,
/// checkpoint and commit everything before this returns. The shedding governor runs beside
/// the loop (it must act while the loop waits on a full queue), until `stop`.
pub async fn run(
    cfg: Arc<ScorerConfig>,
    redis: ctr_runtime::redis::RedisConn,
    control: Arc<Control>,
    liveness: Liveness,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let consumer: Arc<StreamConsumer<GroupContext>> = Arc::new(
        ctr_runtime::kafka::consumer_config(&cfg.service.kafka, &cfg.group, &cfg.service.policy)
            // Freshness: the broker answers an empty fetch after at most 20 ms (default
            // 500 ms), so a record produced into a quiet partition is seen within a batch
            // interval.
            .set("fetch.wait.max.ms", "20")
            .create_with_context(context(Arc::clone(&control), cfg.labeled_topic.clone()))?,
    );
    consumer.subscribe(&[&cfg.labeled_topic])?;
    let mut queues = Vec::new();
    let mut workers = tokio::task::JoinSet::new();
    let dead_letters: rdkafka::producer::FutureProducer = ctr_runtime::kafka::producer_config(
        &cfg.service.kafka,
        &cfg.service.policy,
        cfg.service.policy.outage_budget,
    )
    .create()?;
    let bound = cfg.service.policy.longest_step();
    for id in 0..cfg.workers {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        queues.push(tx);
        let effects = Live {
            publisher: Publisher::new(redis.clone(), cfg.service.policy, &cfg.service.redis_prefix),
            store: CheckpointStore::new(
                redis.clone(),
                cfg.service.policy,
                &cfg.service.redis_prefix,
                &cfg.labeled_topic,
            )
            .with_compaction(cfg.compaction),
            dead_letters: DeadLetters::new(dead_letters.clone(), &cfg.deadletter_topic),
            consumer: Arc::clone(&consumer),
            topic: cfg.labeled_topic.clone(),
        };
        let worker = Worker::new(id, Arc::clone(&cfg), Arc::clone(&control), effects);
        workers.spawn(worker.run(rx, liveness.register(format!("worker {id}"), bound)));
    }
    let router = Router { queues };
    // The governor stops with the loop (whether it stopped on the signal or on a failure), and
    // must, before the workers can: it holds senders of their queues.
    let (loop_done, governor_stop) = watch::channel(false);
    let governor = {
        let queues = router.queues.clone();
        let (control, stop) = (Arc::clone(&control), governor_stop);
        let governor =
            crate::governor::Governor::new(cfg.min_rate, cfg.max_thinning, cfg.lag_bound);
        let shedding = cfg.shedding;
        async move {
            if shedding {
                crate::governor::govern(control, governor, move || Router::fill(&queues), stop)
                    .await;
            }
        }
    };
    let heartbeat = liveness.register("consumer", bound);
    info!(group = %cfg.group, topic = %cfg.labeled_topic, workers = cfg.workers, "scorer consuming");
    let consume = async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut failed = None;
        let mut gone = None;
        // Stage two's state per partition. A partition that moves forgets it: its next owner
        // (this process again, or another) reads on from the last committed offset, so
        // negatives dropped after it are read again, and carrying their count too would count
        // them twice. An unfinished group is lost instead, as at the end of a run.
        let mut shedding: std::collections::HashMap<i32, PartitionShedding> = Default::default();
        let mut dropped_total = 0u64;
        loop {
            heartbeat.beat();
            tokio::select! {
                () = ctr_runtime::process::stopped(&mut stop) => break,
                Some(done) = workers.join_next() => {
                    failed = Some(done);
                    break;
                }
                msg = consumer.recv() => {
                    for p in router.apply(consumer.context()).await {
                        shedding.remove(&p);
                    }
                    match msg {
                        Ok(m) => {
                            let (partition, offset) = (m.partition(), m.offset());
                            let key = m.key().unwrap_or_default();
                            let shed = shedding.entry(partition).or_default();
                            let thinned = match shed.groups.admit(key, control.thinning(), || {
                                negative_at(&m)
                            }) {
                                Some(n) => n,
                                None => {
                                    shed.dropped_before += 1;
                                    dropped_total += 1;
                                    continue;
                                }
                            };
                            let work = Work::Record {
                                partition,
                                offset,
                                payload: m.payload().map(<[u8]>::to_vec),
                                thinned,
                                dropped_before: std::mem::take(&mut shed.dropped_before),
                            };
                            drop(m);
                            if router.queue(partition).send(work).await.is_err() {
                                break; // a worker stopped; its error is collected below
                            }
                        }
                        // Broker hiccups are transient: librdkafka reconnects; keep polling (a
                        // broker gone for longer than the budget is caught at the tick).
                        Err(e) => warn!(error = %e, "consumer error"),
                    }
                }
                _ = tick.tick() => {
                    for p in router.apply(consumer.context()).await {
                        shedding.remove(&p);
                    }
                    control.count(Counted::Dropped, std::mem::take(&mut dropped_total));
                    if let Err(outage) = consumer.context().check(cfg.service.policy.outage_budget) {
                        gone = Some(outage);
                        break;
                    }
                }
            }
        }
        // The governor holds senders of the worker queues: it stops first, then closing the
        // queues lets every worker publish, checkpoint and commit, then stop.
        let _ = loop_done.send(true);
        drop(router);
        // The workers hold the consumer too: it closes when the last of them is done.
        let mut result = match gone {
            Some(outage) => Err(crate::Error::Outage(outage)),
            None => Ok(()),
        };
        let mut outcome = failed;
        loop {
            let done = match outcome.take() {
                Some(d) => d,
                None => match workers.join_next().await {
                    Some(d) => d,
                    None => break,
                },
            };
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "worker failed");
                    result = Err(crate::Error::Worker(e.to_string()));
                }
                Err(e) => result = Err(crate::Error::Worker(format!("worker panicked: {e}"))),
            }
        }
        ctr_runtime::kafka::close_in_background(consumer);
        result
    };
    let (result, ()) = tokio::join!(consume, governor);
    result
}

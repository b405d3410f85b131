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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::Result;
use crate::checkpoint::CheckpointStore;
use crate::config::ScorerConfig;
use crate::deadletter::DeadLetters;
use crate::load::{Control, Counted};
use crate::publish::Publisher;
use crate::state::Thinning;
use crate::worker::{Work, Worker};

/// Header the joiner sets on every label: `1` clicked (a click or a late-click correction),
/// `0` not clicked. Stage-two shedding drops only records that carry `0`.
pub const CLICKED_HEADER: &str = "ctr.clicked";

fn is_negative<M: Message>(m: &M) -> bool {
    m.headers().is_some_and(|h| {
        h.iter()
            .any(|h| h.key == CLICKED_HEADER && h.value == Some(b"0".as_slice()))
    })
}

fn consumer_config(cfg: &ScorerConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Freshness: the broker answers an empty fetch after at most 20 ms (default 500 ms),
        // so a record produced into a quiet partition is seen within a batch interval.
        .set("fetch.wait.max.ms", "20")
        // Consumer lag per partition, for the shedding governor and /metrics.
        .set("statistics.interval.ms", "1000")
        // Short group timeouts: a dead member's partitions move after 6 s (Kafka's smallest
        // session), and Tansu needs them to form a group at all (docs/STACK.md).
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    c
}

/// A change of partition ownership, queued for the main loop: the callbacks run inside `recv`,
/// which cannot wait for the workers.
#[derive(Debug)]
enum Membership {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer's context: queues ownership changes and records consumer lag.
#[derive(Debug)]
pub struct ScorerContext {
    membership: Mutex<Vec<Membership>>,
    control: Arc<Control>,
    topic: String,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

impl ClientContext for ScorerContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut lag = self.control.lag.lock().expect("lag map");
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
    }
}

impl ConsumerContext for ScorerContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            info!(parts = ?partitions(tpl), "partitions revoked");
            self.membership
                .lock()
                .expect("membership queue")
                .push(Membership::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                metrics::gauge!("ctr_scorer_assigned_partitions").set(parts.len() as f64);
                info!(?parts, "partitions assigned");
                self.membership
                    .lock()
                    .expect("membership queue")
                    .push(Membership::Assigned(parts));
            }
            Rebalance::Revoke(_) => {
                metrics::gauge!("ctr_scorer_assigned_partitions").set(0.0);
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
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
    /// over (published, checkpointed, committed).
    async fn apply(&self, ctx: &ScorerContext) {
        let changes = std::mem::take(&mut *ctx.membership.lock().expect("membership queue"));
        for change in changes {
            match change {
                Membership::Revoked(parts) => {
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
                    for p in parts {
                        let _ = self.queue(p).send(Work::Assign(p)).await;
                    }
                }
            }
        }
    }
}

/// Consumes until `stop` turns true (or a worker fails); the workers then publish,
/// checkpoint and commit everything before this returns.
pub async fn run(
    cfg: Arc<ScorerConfig>,
    redis: redis::aio::ConnectionManager,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let ctx = ScorerContext {
        membership: Mutex::new(Vec::new()),
        control: Arc::clone(&control),
        topic: cfg.labeled_topic.clone(),
    };
    let consumer: Arc<StreamConsumer<ScorerContext>> =
        Arc::new(consumer_config(&cfg).create_with_context(ctx)?);
    consumer.subscribe(&[&cfg.labeled_topic])?;
    let mut queues = Vec::new();
    let mut workers = tokio::task::JoinSet::new();
    let dead_letters = crate::deadletter::producer(&cfg.brokers)?;
    for id in 0..cfg.workers {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        queues.push(tx);
        let worker = Worker::new(
            id,
            Arc::clone(&cfg),
            Arc::clone(&consumer),
            Arc::clone(&control),
            Publisher::new(redis.clone(), &cfg.redis_prefix),
            CheckpointStore::new(redis.clone(), &cfg.redis_prefix, &cfg.labeled_topic),
            DeadLetters::new(dead_letters.clone(), &cfg.deadletter_topic),
        );
        workers.spawn(worker.run(rx));
    }
    let router = Router { queues };
    if cfg.shedding {
        let queues = router.queues.clone();
        tokio::spawn(crate::load::govern(
            Arc::clone(&control),
            crate::load::Governor::new(cfg.min_rate, cfg.max_thinning, cfg.lag_bound),
            move || Router::fill(&queues),
            stop.clone(),
        ));
    }
    info!(group = %cfg.group, topic = %cfg.labeled_topic, workers = cfg.workers, "scorer consuming");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut failed = None;
    let mut thinning = Thinning::default();
    let mut dropped_before: std::collections::HashMap<i32, u32> = Default::default();
    let mut dropped_total = 0u64;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(done) = workers.join_next() => {
                failed = Some(done);
                break;
            }
            msg = consumer.recv() => {
                router.apply(consumer.context()).await;
                match msg {
                    Ok(m) => {
                        let (partition, offset) = (m.partition(), m.offset());
                        let k = control.thinning();
                        // A negative after thinning ended still carries what its ad had dropped.
                        let thinned = if (k > 1 || !thinning.is_idle()) && is_negative(&m) {
                            match thinning.keep(m.key().unwrap_or_default(), k) {
                                Some(n) => n,
                                None => {
                                    *dropped_before.entry(partition).or_default() += 1;
                                    dropped_total += 1;
                                    continue;
                                }
                            }
                        } else {
                            1
                        };
                        let work = Work::Record {
                            partition,
                            offset,
                            payload: m.payload().map(<[u8]>::to_vec),
                            thinned,
                            dropped_before: dropped_before.remove(&partition).unwrap_or(0),
                        };
                        drop(m);
                        if router.queue(partition).send(work).await.is_err() {
                            break; // a worker stopped; its error is collected below
                        }
                    }
                    // Broker hiccups are transient: librdkafka reconnects; keep polling.
                    Err(e) => warn!(error = %e, "consumer error"),
                }
            }
            _ = tick.tick() => {
                router.apply(consumer.context()).await;
                control.count(Counted::Dropped, std::mem::take(&mut dropped_total));
            }
        }
    }
    // Closing the queues lets every worker publish, checkpoint and commit, then stop.
    drop(router);
    let mut result = Ok(());
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
    result
}

//! The consumer-group loop: labeled impressions in, Redis batches out.
//!
//! Labeled impressions are keyed by ad, so a partition owns a fixed set of ads and the group
//! protocol gives each partition to exactly one scorer process: any number of identical
//! scorers share the work (S4's symmetric cluster). Records are batched for up to `batch_ms`
//! or `batch_size`, applied per partition atomically (see [`crate::publish`]), and only then is
//! the Kafka offset stored and committed. A poison record (undecodable, invalid) is counted,
//! logged and skipped, and its offset is consumed with the batch.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ctr_schemas::{LabelKind, LabeledImpression, decode};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::Result;
use crate::config::ScorerConfig;
use crate::publish::{Applied, Publisher};

fn consumer_config(cfg: &ScorerConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Tansu needs short group timeouts (see docs/STACK.md).
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    c
}

/// Logs and exports partition assignments, so operators (and tests) see who owns what.
struct Assignments;

impl ClientContext for Assignments {}

impl ConsumerContext for Assignments {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                metrics::gauge!("ctr_scorer_assigned_partitions").set(parts.len() as f64);
                info!(?parts, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                metrics::gauge!("ctr_scorer_assigned_partitions").set(0.0);
                info!(count = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// Consumes until `stop` turns true; commits what was applied before returning.
pub async fn run(
    cfg: &ScorerConfig,
    conn: ConnectionManager,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let consumer: StreamConsumer<Assignments> =
        consumer_config(cfg).create_with_context(Assignments)?;
    consumer.subscribe(&[&cfg.labeled_topic])?;
    let mut publisher = Publisher::new(conn, &cfg.redis_prefix, cfg.prior);
    info!(group = %cfg.group, topic = %cfg.labeled_topic, "scorer consuming");
    let mut batch: BTreeMap<i32, Vec<Applied>> = BTreeMap::new();
    let mut batched = 0usize;
    let mut applied_total = 0u64;
    loop {
        // Wait for the first record of a batch, then fill it for at most batch_ms.
        let deadline = Instant::now() + Duration::from_millis(cfg.batch_ms);
        let mut stopping = false;
        while batched < cfg.batch_size {
            let wait = if batched == 0 {
                Duration::from_millis(500)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            if batched > 0 && wait.is_zero() {
                break;
            }
            tokio::select! {
                _ = stop.changed() => { stopping = true; break; }
                r = tokio::time::timeout(wait, consumer.recv()) => match r {
                    Err(_) => if batched > 0 { break },
                    Ok(Err(e)) => warn!(error = %e, "consumer error"),
                    Ok(Ok(msg)) => {
                        let record = match msg.payload().map(decode::<LabeledImpression>) {
                            Some(Ok(l)) => match l.validate() {
                                // Late-click corrections are not applied yet (issue #5 decides
                                // how); they are counted and their offsets consumed.
                                Ok(()) if l.kind == LabelKind::LateClick => {
                                    metrics::counter!("ctr_scorer_corrections_skipped_total").increment(1);
                                    Publisher::skip(msg.offset())
                                }
                                Ok(()) => publisher.record(msg.offset(), &l),
                                Err(e) => { poison(msg.partition(), msg.offset(), &e); Publisher::skip(msg.offset()) }
                            },
                            Some(Err(e)) => { poison(msg.partition(), msg.offset(), &e); Publisher::skip(msg.offset()) }
                            None => { poison(msg.partition(), msg.offset(), &"no payload"); Publisher::skip(msg.offset()) }
                        };
                        batch.entry(msg.partition()).or_default().push(record);
                        batched += 1;
                    }
                }
            }
        }
        let stopping = stopping || *stop.borrow();
        if batched > 0 {
            // On the way out, commit synchronously so a successor starts right after us.
            let mode = if stopping {
                CommitMode::Sync
            } else {
                CommitMode::Async
            };
            applied_total += flush(cfg, &consumer, &mut publisher, &mut batch, mode).await?;
            batched = 0;
        }
        if stopping {
            break;
        }
    }
    info!(applied = applied_total, "scorer stopped");
    Ok(())
}

fn poison(partition: i32, offset: i64, reason: &dyn std::fmt::Display) {
    metrics::counter!("ctr_scorer_poison_total").increment(1);
    warn!(partition, offset, %reason, "skipping a poison labeled impression");
}

/// Applies each partition's records to Redis, then stores and commits the offsets.
async fn flush(
    cfg: &ScorerConfig,
    consumer: &StreamConsumer<Assignments>,
    publisher: &mut Publisher,
    batch: &mut BTreeMap<i32, Vec<Applied>>,
    mode: CommitMode,
) -> Result<u64> {
    let started = Instant::now();
    let mut new = 0;
    let mut offsets = TopicPartitionList::new();
    for (&partition, records) in batch.iter() {
        let Some(last) = records.last().map(|r| r.offset) else {
            continue;
        };
        new += apply_with_retry(publisher, &cfg.labeled_topic, partition, records).await?;
        offsets.add_partition_offset(&cfg.labeled_topic, partition, Offset::Offset(last + 1))?;
    }
    batch.clear();
    // The effect is in Redis; only now may Kafka learn the position. A failed commit is
    // harmless (Redis fences replays), so it is logged, not fatal.
    if let Err(e) = consumer.commit(&offsets, mode) {
        debug!(error = %e, "offset commit failed; Redis offsets still fence replays");
    }
    metrics::counter!("ctr_scorer_applied_total").increment(new);
    metrics::histogram!("ctr_scorer_publish_seconds").record(started.elapsed().as_secs_f64());
    Ok(new)
}

/// Redis errors here are transient (restart, failover): retry with backoff, because the
/// records are already consumed and must not be dropped.
async fn apply_with_retry(
    publisher: &mut Publisher,
    topic: &str,
    partition: i32,
    records: &[Applied],
) -> Result<u64> {
    const ATTEMPTS: u32 = 20;
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match publisher.apply(topic, partition, records).await {
            Ok(n) => return Ok(n),
            Err(e) if attempt < ATTEMPTS => {
                warn!(error = %e, attempt, "Redis apply failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

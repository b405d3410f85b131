//! The joiner as a Kafka service.
//!
//! One consumer subscribes to both input topics with the range assignor, which hands a member
//! partition `p` of *both* topics together (they have equal partition counts), so each
//! [`PartitionJoin`] sees all serves and clicks of its serve IDs. Labels go out through an
//! idempotent producer keyed by ad ID. Undecodable or invalid input goes to the dead-letter
//! topic with the reason in a header, and is counted.
//!
//! Offsets: the walking skeleton commits no input offsets, so a restarted joiner re-reads the
//! retained topics from the beginning; exact restarts come with checkpointed join state
//! (issue #4).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ctr_schemas::{Click, DecodeError, Encoder, LabeledImpression, Serve, ValidationError, decode};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tracing::{info, warn};

use crate::join::{JoinConfig, JoinStats, PartitionJoin};

/// Settings of the joiner service.
#[derive(Debug, Clone, clap::Args)]
pub struct FeedbackArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CTR_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    #[arg(long, env = "CTR_SERVES_TOPIC", default_value = "ctr.serves")]
    pub serves_topic: String,
    #[arg(long, env = "CTR_CLICKS_TOPIC", default_value = "ctr.clicks")]
    pub clicks_topic: String,
    #[arg(long, env = "CTR_LABELED_TOPIC", default_value = "ctr.labeled")]
    pub labeled_topic: String,
    #[arg(long, env = "CTR_DEADLETTER_TOPIC", default_value = "ctr.deadletter")]
    pub deadletter_topic: String,
    /// Consumer group of the joiner processes.
    #[arg(long, env = "CTR_FEEDBACK_GROUP", default_value = "ctr-feedback")]
    pub group: String,
    /// Attribution window, ms: a click counts if no later than this after its serve.
    #[arg(long, env = "CTR_JOIN_WINDOW_MS", default_value_t = 30_000)]
    pub window_ms: i64,
    /// Bounded out-of-orderness of event times, ms.
    #[arg(long, env = "CTR_JOIN_MAX_OUT_OF_ORDER_MS", default_value_t = 2_000)]
    pub max_out_of_order_ms: i64,
    /// Wall-clock silence after which a stream counts as idle, ms.
    #[arg(long, env = "CTR_JOIN_IDLE_MS", default_value_t = 5_000)]
    pub idle_ms: i64,
}

/// Why the joiner stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("invalid setting: {0}")]
    Config(&'static str),
    #[error("producing to {topic} failed: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error(transparent)]
    Encode(#[from] ctr_schemas::EncodeError),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A record the joiner will not use.
#[derive(Debug, thiserror::Error)]
enum Poison {
    #[error("undecodable: {0}")]
    Decode(#[from] DecodeError),
    #[error("invalid: {0}")]
    Invalid(#[from] ValidationError),
    #[error("message has no payload")]
    Empty,
}

fn consumer_config(args: &FeedbackArgs) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // The range assignor co-partitions the two topics (see module docs).
        .set("partition.assignment.strategy", "range")
        // Tansu needs short group timeouts: with librdkafka's 300 s default a second member's
        // JoinGroup waits minutes (measured; see docs/STACK.md).
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    cfg
}

fn producer_config(brokers: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    cfg
}

struct Joiner {
    args: FeedbackArgs,
    cfg: JoinConfig,
    producer: FutureProducer,
    joins: HashMap<i32, PartitionJoin>,
    labels: Encoder<LabeledImpression>,
    out: Vec<LabeledImpression>,
    buf: Vec<u8>,
    deadlettered: u64,
}

impl Joiner {
    fn join_for(&mut self, partition: i32, now: i64) -> &mut PartitionJoin {
        let cfg = self.cfg;
        self.joins
            .entry(partition)
            .or_insert_with(|| PartitionJoin::new(cfg, now))
    }

    fn handle(
        &mut self,
        topic: &str,
        partition: i32,
        payload: Option<&[u8]>,
    ) -> Result<(), Poison> {
        let bytes = payload.ok_or(Poison::Empty)?;
        let now = now_ms();
        let mut out = std::mem::take(&mut self.out);
        if topic == self.args.serves_topic {
            let serve: Serve = decode(bytes)?;
            serve.validate()?;
            self.join_for(partition, now).on_serve(serve, now, &mut out);
        } else {
            let click: Click = decode(bytes)?;
            click.validate()?;
            self.join_for(partition, now).on_click(click, now, &mut out);
        }
        self.out = out;
        Ok(())
    }

    fn tick(&mut self) {
        let now = now_ms();
        for join in self.joins.values_mut() {
            join.advance(now, &mut self.out);
        }
    }

    /// Enqueues all labels produced so far. Enqueue is synchronous and ordered; librdkafka's
    /// queue is large, and a full queue is waited out rather than dropped.
    async fn emit(&mut self) -> Result<(), FeedbackError> {
        let labels = std::mem::take(&mut self.out);
        for l in &labels {
            self.buf.clear();
            self.labels.encode_into(l, &mut self.buf)?;
            send(
                &self.producer,
                &self.args.labeled_topic,
                l.ad_id.as_bytes(),
                &self.buf,
                None,
            )
            .await?;
        }
        metrics::counter!("ctr_feedback_labels_total").increment(labels.len() as u64);
        self.out = labels;
        self.out.clear();
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        source_topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        reason: &Poison,
    ) -> Result<(), FeedbackError> {
        self.deadlettered += 1;
        metrics::counter!("ctr_feedback_deadletter_total").increment(1);
        warn!(topic = source_topic, %reason, "dead-lettering a poison message");
        let reason = reason.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ctr.source_topic",
                value: Some(source_topic),
            })
            .insert(Header {
                key: "ctr.reason",
                value: Some(&reason),
            });
        let topic = self.args.deadletter_topic.clone();
        send(
            &self.producer,
            &topic,
            key.unwrap_or_default(),
            payload,
            Some(headers),
        )
        .await
    }

    fn stats(&self) -> JoinStats {
        self.joins
            .values()
            .fold(JoinStats::default(), |mut acc, j| {
                let s = j.stats();
                acc.serves += s.serves;
                acc.clicks += s.clicks;
                acc.positives += s.positives;
                acc.negatives += s.negatives;
                acc.duplicate_clicks += s.duplicate_clicks;
                acc.unmatched_clicks += s.unmatched_clicks;
                acc
            })
    }
}

async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: Option<OwnedHeaders>,
) -> Result<(), FeedbackError> {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(h) = headers {
        record = record.headers(h);
    }
    loop {
        match producer.send_result(record) {
            // Delivery is checked at flush; librdkafka retries internally and an idempotent
            // producer keeps order.
            Ok(_delivery) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((source, _)) => {
                return Err(FeedbackError::Produce {
                    topic: topic.into(),
                    source,
                });
            }
        }
    }
}

/// Runs the joiner until `shutdown` resolves.
pub async fn run(
    args: FeedbackArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FeedbackError> {
    if args.window_ms <= 0 || args.max_out_of_order_ms < 0 || args.idle_ms <= 0 {
        return Err(FeedbackError::Config(
            "window_ms and idle_ms must be > 0, max_out_of_order_ms >= 0",
        ));
    }
    let cfg = JoinConfig {
        window_ms: args.window_ms,
        max_out_of_order_ms: args.max_out_of_order_ms,
        idle_ms: args.idle_ms,
    };
    let consumer: StreamConsumer = consumer_config(&args).create()?;
    consumer.subscribe(&[&args.serves_topic, &args.clicks_topic])?;
    let producer: FutureProducer = producer_config(&args.brokers).create()?;
    let mut joiner = Joiner {
        args,
        cfg,
        producer,
        joins: HashMap::new(),
        labels: Encoder::new(),
        out: Vec::new(),
        buf: Vec::with_capacity(256),
        deadlettered: 0,
    };
    info!(group = %joiner.args.group, "joiner started");
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut last_report = std::time::Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        // Broker hiccups are transient: librdkafka reconnects; keep polling.
                        warn!(error = %e, "consumer error");
                        continue;
                    }
                };
                let topic = msg.topic().to_string();
                if let Err(reason) = joiner.handle(&topic, msg.partition(), msg.payload()) {
                    joiner.dead_letter(&topic, msg.key(), msg.payload().unwrap_or_default(), &reason).await?;
                }
            }
            _ = ticker.tick() => joiner.tick(),
        }
        if !joiner.out.is_empty() {
            joiner.emit().await?;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = std::time::Instant::now();
            let s = joiner.stats();
            let pending: usize = joiner.joins.values().map(PartitionJoin::pending).sum();
            metrics::gauge!("ctr_feedback_pending_serves").set(pending as f64);
            info!(
                serves = s.serves,
                clicks = s.clicks,
                positives = s.positives,
                negatives = s.negatives,
                duplicates = s.duplicate_clicks,
                unmatched = s.unmatched_clicks,
                deadlettered = joiner.deadlettered,
                pending,
                "join progress"
            );
        }
    }
    joiner.producer.flush(Duration::from_secs(30))?;
    info!("joiner stopped; labels flushed");
    Ok(())
}

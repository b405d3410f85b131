//! The joiner as a Kafka service.
//!
//! One consumer subscribes to both input topics with the range assignor, which hands a member
//! partition `p` of *both* topics together (their partition counts must be equal, checked at
//! start), so each [`PartitionJoin`] sees all serves and clicks of its serve IDs. Labels and
//! corrections go out through an idempotent producer keyed by ad ID; orphan clicks and poison
//! input go to the dead-letter topic with the reason in the `ctr.reason` header.
//!
//! Exactly-once in effect (see [`crate::checkpoint`]): every few seconds all outstanding
//! deliveries are awaited, then each partition's state is checkpointed with the next offsets
//! of both inputs, then those offsets are committed to Kafka (for lag monitoring and as a
//! resume hint). On a partition's first message the checkpoint is loaded, and input below its
//! offsets is skipped. A delivery failure stops the process (non-zero exit): restarting from
//! the last checkpoint re-derives everything after it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ctr_schemas::{
    Click, DecodeError, Encoder, LabelKind, LabeledImpression, Serve, ValidationError, decode,
};
use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use tracing::{info, warn};

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use crate::config::FeedbackConfig;
use crate::join::{Emit, JoinStats, PartitionJoin};
use crate::signals::StallDetector;

/// Why the joiner stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("reading the Redis CA file {path}: {source}")]
    RedisCa {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("producing to {topic} failed: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("the producer dropped a delivery report")]
    DeliveryCanceled,
    #[error(
        "topics {serves} ({serves_parts} partitions) and {clicks} ({clicks_parts}) must have equal partition counts: serves and their clicks meet by partition number"
    )]
    Partitions {
        serves: String,
        serves_parts: usize,
        clicks: String,
        clicks_parts: usize,
    },
    #[error(transparent)]
    Encode(#[from] ctr_schemas::EncodeError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
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

impl Poison {
    fn label(&self) -> &'static str {
        match self {
            Poison::Decode(_) | Poison::Empty => "undecodable",
            Poison::Invalid(_) => "invalid",
        }
    }
}

/// A change of partition ownership, for the main loop.
#[derive(Debug)]
enum Membership {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Queues ownership changes for the main loop: the callbacks run inside `recv`, which cannot do
/// async work (loading or writing a checkpoint).
struct Rebalances(Arc<Mutex<Vec<Membership>>>);

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            info!(parts = ?partitions(tpl), "partitions revoked");
            self.0
                .lock()
                .expect("membership queue")
                .push(Membership::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                metrics::gauge!("ctr_feedback_assigned_partitions").set(parts.len() as f64);
                info!(?parts, "partitions assigned");
                self.0
                    .lock()
                    .expect("membership queue")
                    .push(Membership::Assigned(parts));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

fn consumer_config(cfg: &FeedbackConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // The range assignor co-partitions the two topics (see module docs).
        .set("partition.assignment.strategy", "range")
        // Short group timeouts: a dead member's partitions move after 6 s (Kafka's smallest
        // session), and Tansu needs them to form a group at all (docs/STACK.md).
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    c
}

fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    c
}

/// Where an enqueued record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Labeled,
    DeadLetter,
}

impl Output {
    fn topic(self, cfg: &FeedbackConfig) -> &str {
        match self {
            Output::Labeled => &cfg.labeled_topic,
            Output::DeadLetter => &cfg.deadletter_topic,
        }
    }
}

struct PartitionState {
    join: PartitionJoin,
    serves_next: Option<i64>,
    clicks_next: Option<i64>,
    /// Stats already added to the process totals (the join's stats include history from before
    /// a restore, which this process must not count again).
    reported: JoinStats,
}

struct Joiner {
    cfg: FeedbackConfig,
    producer: FutureProducer,
    store: CheckpointStore,
    parts: HashMap<i32, PartitionState>,
    labels: Encoder<LabeledImpression>,
    clicks: Encoder<Click>,
    out: Vec<Emit>,
    buf: Vec<u8>,
    label_id: String,
    in_flight: VecDeque<(Output, DeliveryFuture)>,
    totals: JoinStats,
    membership: Arc<Mutex<Vec<Membership>>>,
    emitted: u64,
}

impl Joiner {
    /// Applies queued ownership changes: a revoked partition is checkpointed and let go (commit
    /// on revoke); an assigned one has its checkpoint restored *now*, not on its first message,
    /// because a partition with nothing left to read may still hold pending serves whose
    /// windows must close.
    async fn apply_membership<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
    ) -> Result<(), FeedbackError> {
        let changes = std::mem::take(&mut *self.membership.lock().expect("membership queue"));
        for change in changes {
            match change {
                Membership::Revoked(parts) => {
                    let held: Vec<i32> = parts
                        .into_iter()
                        .filter(|p| self.parts.contains_key(p))
                        .collect();
                    if held.is_empty() {
                        continue;
                    }
                    self.checkpoint(consumer, Some(&held)).await?;
                    self.account();
                    for p in held {
                        self.parts.remove(&p);
                    }
                }
                Membership::Assigned(parts) => {
                    for p in parts {
                        self.state(p, 0).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The state of partition `p`, restoring its checkpoint when it is not held yet.
    async fn state(
        &mut self,
        p: i32,
        first_offset: i64,
    ) -> Result<&mut PartitionState, FeedbackError> {
        if !self.parts.contains_key(&p) {
            let now = now_ms();
            let st = match self.store.load(p).await? {
                Some(ck) => {
                    let mut join = ck.join;
                    join.resume(now);
                    info!(partition = p, serves_next = ?ck.serves_next, clicks_next = ?ck.clicks_next,
                          pending = join.pending(), "restored join state from checkpoint");
                    let reported = join.stats();
                    PartitionState {
                        join,
                        serves_next: ck.serves_next,
                        clicks_next: ck.clicks_next,
                        reported,
                    }
                }
                None => {
                    if first_offset > 0 {
                        // Only reachable for a message of a partition whose assignment was not
                        // seen (the assignment path passes 0).
                        warn!(
                            partition = p,
                            first_offset,
                            "no checkpoint, but consumption starts mid-topic: serves before this offset get no labels"
                        );
                    }
                    PartitionState {
                        join: PartitionJoin::new(self.cfg.join, now),
                        serves_next: None,
                        clicks_next: None,
                        reported: JoinStats::default(),
                    }
                }
            };
            self.parts.insert(p, st);
        }
        Ok(self.parts.get_mut(&p).expect("inserted above"))
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), FeedbackError> {
        let (p, offset) = (msg.partition(), msg.offset());
        let is_serve = msg.topic() == self.cfg.serves_topic;
        let mut out = std::mem::take(&mut self.out);
        let st = self.state(p, offset).await?;
        let next = if is_serve {
            &mut st.serves_next
        } else {
            &mut st.clicks_next
        };
        if next.is_some_and(|n| offset < n) {
            self.out = out;
            return Ok(()); // already reflected in the restored state
        }
        *next = Some(offset + 1);
        let now = now_ms();
        let result = match msg.payload() {
            None => Err(Poison::Empty),
            Some(bytes) if is_serve => decode::<Serve>(bytes)
                .map_err(Poison::from)
                .and_then(|s| s.validate().map(|()| s).map_err(Poison::from))
                .map(|s| st.join.on_serve(s, now, &mut out)),
            Some(bytes) => decode::<Click>(bytes)
                .map_err(Poison::from)
                .and_then(|c| c.validate().map(|()| c).map_err(Poison::from))
                .map(|c| st.join.on_click(c, now, &mut out)),
        };
        self.out = out;
        if let Err(reason) = result {
            let topic = msg.topic().to_string();
            warn!(%topic, partition = p, offset, %reason, "dead-lettering a poison message");
            metrics::counter!("ctr_feedback_deadletter_total", "reason" => reason.label())
                .increment(1);
            let reason = reason.to_string();
            self.dead_letter(
                &topic,
                msg.key().unwrap_or_default(),
                msg.payload().unwrap_or_default(),
                &reason,
            )
            .await?;
        }
        Ok(())
    }

    fn tick(&mut self) {
        let now = now_ms();
        for st in self.parts.values_mut() {
            st.join.advance(now, &mut self.out);
        }
    }

    /// Enqueues `self.buf` in call order. When librdkafka's queue is full, waits for the
    /// oldest delivery instead of dropping or buffering without bound.
    async fn enqueue(
        &mut self,
        output: Output,
        key: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), FeedbackError> {
        loop {
            let dest = output.topic(&self.cfg);
            let mut record = FutureRecord::to(dest).key(key).payload(&self.buf);
            if let Some(h) = headers.clone() {
                record = record.headers(h);
            }
            match self.producer.send_result(record) {
                Ok(f) => {
                    self.in_flight.push_back((output, f));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match self.in_flight.pop_front() {
                        Some((o, f)) => Self::check_delivery(o.topic(&self.cfg), f.await)?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((source, _)) => {
                    return Err(FeedbackError::Produce {
                        topic: dest.to_string(),
                        source,
                    });
                }
            }
        }
    }

    async fn dead_letter(
        &mut self,
        source_topic: &str,
        key: &[u8],
        payload: &[u8],
        reason: &str,
    ) -> Result<(), FeedbackError> {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ctr.source_topic",
                value: Some(source_topic),
            })
            .insert(Header {
                key: "ctr.reason",
                value: Some(reason),
            });
        self.buf.clear();
        self.buf.extend_from_slice(payload);
        self.enqueue(Output::DeadLetter, key, Some(headers)).await
    }

    /// Enqueues everything the joins produced.
    async fn emit(&mut self) -> Result<(), FeedbackError> {
        let out = std::mem::take(&mut self.out);
        let now = now_ms();
        let (mut pos, mut neg, mut late, mut orphans) = (0u64, 0u64, 0u64, 0u64);
        for e in &out {
            match e {
                Emit::Label(l) | Emit::Correction(l) => {
                    match (l.kind(), l.clicked()) {
                        (LabelKind::LateClick, _) => late += 1,
                        (_, true) => pos += 1,
                        (_, false) => neg += 1,
                    }
                    // One sample in 64 keeps the hot path cheap and the histogram honest.
                    if self.emitted.is_multiple_of(64) {
                        metrics::histogram!("ctr_feedback_label_delay_seconds")
                            .record((now - l.ts_ms()) as f64 / 1e3);
                    }
                    self.emitted += 1;
                    self.buf.clear();
                    l.write_label_id(&mut self.label_id);
                    self.labels
                        .encode_ref_into(&l.view(&self.label_id), &mut self.buf)?;
                    // The scorer may drop negatives unread when overloaded; it tells them by
                    // this header (its `consumer::CLICKED_HEADER`).
                    let clicked = OwnedHeaders::new_with_capacity(1).insert(Header {
                        key: "ctr.clicked",
                        value: Some(if l.clicked() { "1" } else { "0" }),
                    });
                    self.enqueue(Output::Labeled, l.ad_id().as_bytes(), Some(clicked))
                        .await?;
                }
                Emit::Orphan(c) => {
                    orphans += 1;
                    let mut bytes = Vec::with_capacity(64);
                    self.clicks.encode_into(c, &mut bytes)?;
                    let reason =
                        format!("orphan click: serve {} unknown to the joiner", c.serve_id);
                    let topic = self.cfg.clicks_topic.clone();
                    self.dead_letter(&topic, c.serve_id.to_string().as_bytes(), &bytes, &reason)
                        .await?;
                }
            }
        }
        metrics::counter!("ctr_feedback_labels_total", "kind" => "positive").increment(pos);
        metrics::counter!("ctr_feedback_labels_total", "kind" => "negative").increment(neg);
        metrics::counter!("ctr_feedback_labels_total", "kind" => "late_click").increment(late);
        metrics::counter!("ctr_feedback_deadletter_total", "reason" => "orphan").increment(orphans);
        self.out = out;
        self.out.clear();
        Ok(())
    }

    fn check_delivery(
        topic: &str,
        r: Result<
            rdkafka::producer::future_producer::OwnedDeliveryResult,
            futures::channel::oneshot::Canceled,
        >,
    ) -> Result<(), FeedbackError> {
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((source, _))) => Err(FeedbackError::Produce {
                topic: topic.to_string(),
                source,
            }),
            Err(_) => Err(FeedbackError::DeliveryCanceled),
        }
    }

    /// Settles deliveries that have completed, without waiting.
    fn reap(&mut self) -> Result<(), FeedbackError> {
        while let Some((_, f)) = self.in_flight.front_mut() {
            let Some(r) = f.now_or_never() else { break };
            let (output, _) = self.in_flight.pop_front().expect("front exists");
            Self::check_delivery(output.topic(&self.cfg), r)?;
        }
        Ok(())
    }

    /// Waits for every outstanding delivery.
    async fn settle(&mut self) -> Result<(), FeedbackError> {
        while let Some((output, f)) = self.in_flight.pop_front() {
            Self::check_delivery(output.topic(&self.cfg), f.await)?;
        }
        Ok(())
    }

    /// Adds each partition's new stats to the process totals (monotonic counters).
    fn account(&mut self) {
        for st in self.parts.values_mut() {
            let s = st.join.stats();
            self.totals.add(&s.since(&st.reported));
            st.reported = s;
        }
    }

    /// Checkpoints `partitions` (all when `None`): settle deliveries, save, commit offsets.
    async fn checkpoint<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
        only: Option<&[i32]>,
    ) -> Result<(), FeedbackError> {
        let started = Instant::now();
        self.emit().await?;
        self.settle().await?;
        let mut offsets = TopicPartitionList::new();
        let mut ids: Vec<i32> = self
            .parts
            .keys()
            .copied()
            .filter(|p| only.is_none_or(|o| o.contains(p)))
            .collect();
        ids.sort_unstable();
        for p in ids {
            let st = &self.parts[&p];
            let ck = Checkpoint {
                serves_next: st.serves_next,
                clicks_next: st.clicks_next,
                join: &st.join,
            };
            if !self.store.save(p, &ck).await? {
                warn!(
                    partition = p,
                    "a newer checkpoint exists (partition moved to another joiner); not overwriting it"
                );
                continue;
            }
            if let Some(n) = st.serves_next {
                offsets.add_partition_offset(&self.cfg.serves_topic, p, Offset::Offset(n))?;
            }
            if let Some(n) = st.clicks_next {
                offsets.add_partition_offset(&self.cfg.clicks_topic, p, Offset::Offset(n))?;
            }
        }
        if offsets.count() > 0
            && let Err(e) = consumer.commit(&offsets, CommitMode::Async)
        {
            // Harmless: the checkpoint, not Kafka, decides where a restart resumes.
            warn!(error = %e, "offset commit failed");
        }
        metrics::histogram!("ctr_feedback_checkpoint_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn report(&mut self, detector: &mut StallDetector) -> crate::signals::Signal {
        self.account();
        let pending: usize = self.parts.values().map(|s| s.join.pending()).sum();
        let remembered: usize = self.parts.values().map(|s| s.join.remembered()).sum();
        metrics::gauge!("ctr_feedback_pending_serves").set(pending as f64);
        metrics::gauge!("ctr_feedback_closed_serves_remembered").set(remembered as f64);
        let t = self.totals;
        for (name, v) in [
            ("serves", t.serves),
            ("clicks", t.clicks),
            ("duplicate_serves", t.duplicate_serves),
            ("duplicate_clicks", t.duplicate_clicks),
            ("late_clicks", t.late_clicks),
            ("orphan_clicks", t.orphan_clicks),
            ("invalid_clicks", t.invalid_clicks),
            ("evicted_serves", t.evicted),
        ] {
            metrics::gauge!("ctr_feedback_events", "kind" => name).set(v as f64);
        }
        let signal = detector.observe(Instant::now(), now_ms(), &t);
        metrics::gauge!("ctr_feedback_click_stream_stalled")
            .set(f64::from(u8::from(signal.stalled)));
        if let Some(c) = signal.click_coverage {
            metrics::gauge!("ctr_feedback_click_coverage").set(c);
        }
        signal
    }
}

fn check_partitions<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    cfg: &FeedbackConfig,
) -> Result<(), FeedbackError> {
    let count = |topic: &str| -> Result<usize, FeedbackError> {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
    };
    let (s, c) = (count(&cfg.serves_topic)?, count(&cfg.clicks_topic)?);
    if s != c || s == 0 {
        return Err(FeedbackError::Partitions {
            serves: cfg.serves_topic.clone(),
            serves_parts: s,
            clicks: cfg.clicks_topic.clone(),
            clicks_parts: c,
        });
    }
    Ok(())
}

/// Runs the joiner until `shutdown` resolves; checkpoints everything on the way out.
pub async fn run_joiner(
    cfg: FeedbackConfig,
    redis: ConnectionManager,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FeedbackError> {
    let membership = Arc::new(Mutex::new(Vec::new()));
    let consumer: StreamConsumer<Rebalances> =
        consumer_config(&cfg).create_with_context(Rebalances(Arc::clone(&membership)))?;
    check_partitions(&consumer, &cfg)?;
    consumer.subscribe(&[&cfg.serves_topic, &cfg.clicks_topic])?;
    let producer: FutureProducer = producer_config(&cfg.brokers).create()?;
    let store = CheckpointStore::new(
        redis.clone(),
        &cfg.redis_prefix,
        &cfg.group,
        &cfg.serves_topic,
    );
    let signal_key = format!("{}signal:joiner", cfg.redis_prefix);
    let instance = format!("{}-{}", cfg.group, std::process::id());
    let mut detector = StallDetector::new(cfg.stall);
    let checkpoint_every = cfg.checkpoint_every;
    let mut joiner = Joiner {
        cfg,
        producer,
        store,
        parts: HashMap::new(),
        labels: Encoder::new(),
        clicks: Encoder::new(),
        out: Vec::new(),
        buf: Vec::with_capacity(256),
        label_id: String::with_capacity(64),
        in_flight: VecDeque::new(),
        totals: JoinStats::default(),
        membership,
        emitted: 0,
    };
    info!(group = %joiner.cfg.group, "joiner started");
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut last_checkpoint = Instant::now();
    let mut last_report = Instant::now();
    let mut last_progress = Instant::now();
    let mut redis = redis;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            msg = consumer.recv() => {
                joiner.apply_membership(&consumer).await?;
                match msg {
                    Ok(m) => joiner.handle(&m).await?,
                    // Broker hiccups are transient: librdkafka reconnects; keep polling.
                    Err(e) => warn!(error = %e, "consumer error"),
                }
            }
            _ = ticker.tick() => {
                joiner.apply_membership(&consumer).await?;
                joiner.tick();
            }
        }
        if !joiner.out.is_empty() {
            joiner.emit().await?;
        }
        joiner.reap()?;
        if last_checkpoint.elapsed() >= checkpoint_every {
            joiner.checkpoint(&consumer, None).await?;
            last_checkpoint = Instant::now();
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let signal = joiner.report(&mut detector);
            let json = serde_json::to_string(&signal).expect("signal serializes");
            let r: redis::RedisResult<()> = redis::pipe()
                .hset(&signal_key, &instance, json)
                .expire(&signal_key, 120)
                .query_async(&mut redis)
                .await;
            if let Err(e) = r {
                warn!(error = %e, "publishing the joiner signal failed");
            }
            if signal.stalled {
                warn!(
                    reason = signal.reason.as_deref().unwrap_or(""),
                    "click stream stalled"
                );
            }
            if last_progress.elapsed() >= Duration::from_secs(5) {
                last_progress = Instant::now();
                let t = joiner.totals;
                let pending: usize = joiner.parts.values().map(|s| s.join.pending()).sum();
                info!(
                    serves = t.serves,
                    clicks = t.clicks,
                    positives = t.positives,
                    negatives = t.negatives,
                    late = t.late_clicks,
                    orphans = t.orphan_clicks,
                    duplicates = t.duplicate_clicks,
                    pending,
                    "join progress"
                );
            }
        }
    }
    joiner.tick();
    joiner.checkpoint(&consumer, None).await?;
    let t = joiner.totals;
    info!(
        serves = t.serves,
        clicks = t.clicks,
        positives = t.positives,
        negatives = t.negatives,
        late = t.late_clicks,
        orphans = t.orphan_clicks,
        "joiner stopped; labels delivered and checkpointed"
    );
    Ok(())
}

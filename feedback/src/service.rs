//! The joiner as a Kafka service.
//!
//! One consumer subscribes to both input topics with the range assignor, which hands a member
//! partition `p` of *both* topics together (their partition counts must be equal, checked at
//! start), so each [`PartitionJoin`] sees all serves and clicks of its serve IDs. Labels and
//! corrections go out through an idempotent producer keyed by ad ID; orphan clicks and poison
//! input go to the dead-letter topic with the contract's dead-letter headers (source topic,
//! partition, offset when read as it is, reason).
//!
//! Exactly-once in effect (see [`crate::checkpoint`]): every few seconds all outstanding
//! deliveries are awaited, then each partition's state is checkpointed with the next offsets
//! of both inputs, then those offsets are committed to Kafka (for lag monitoring and as a
//! resume hint). On a partition's first message the checkpoint is loaded, and input below its
//! offsets is skipped. A delivery failure stops the process (non-zero exit): restarting from
//! the last checkpoint re-derives everything after it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ctr_runtime::kafka::{GroupContext, Membership, ProduceError, TrackedProducer};
use ctr_runtime::redis::RedisConn;
use ctr_runtime::{DependencyError, Heartbeat, Policy};
use ctr_schemas::contract::{DeadLetter, headers, keys};
use ctr_schemas::{Click, Encoder, LabelKind, LabeledImpression, Serve, decode_valid};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use crate::config::FeedbackConfig;
use crate::join::{Emit, JoinStats, PartitionJoin};
use crate::signals::StallDetector;

/// Why the joiner stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// A Kafka client could not be created or configured.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Redis refused the connection or a start-up call.
    #[error(transparent)]
    Redis(#[from] ctr_runtime::redis::RedisError),
    /// The joiner signal could not be written within the policy.
    #[error(transparent)]
    Signal(DependencyError<redis::RedisError>),
    /// The topics' metadata could not be read within the policy.
    #[error(transparent)]
    Metadata(DependencyError<KafkaError>),
    /// A checkpoint could not be saved or restored.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The broker did not acknowledge a label or a dead letter.
    #[error(transparent)]
    Produce(#[from] ProduceError),
    /// No broker or no group membership for longer than the outage budget.
    #[error(transparent)]
    Outage(#[from] ctr_runtime::kafka::Outage),
    /// Serves and clicks topics with different partition counts.
    #[error(
        "topics {serves} ({serves_parts} partitions) and {clicks} ({clicks_parts}) must have equal partition counts: serves and their clicks meet by partition number"
    )]
    Partitions {
        /// The serves topic.
        serves: String,
        /// Its partition count.
        serves_parts: usize,
        /// The clicks topic.
        clicks: String,
        /// Its partition count.
        clicks_parts: usize,
    },
    /// A label could not be encoded.
    #[error(transparent)]
    Encode(#[from] ctr_schemas::EncodeError),
    /// The HTTP server could not bind or serve.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

use ctr_runtime::wall_ms as now_ms;

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
    /// Labels and dead letters awaiting the broker; settled before every checkpoint.
    producer: TrackedProducer,
    store: CheckpointStore,
    parts: HashMap<i32, PartitionState>,
    labels: Encoder<LabeledImpression>,
    clicks: Encoder<Click>,
    out: Vec<Emit>,
    /// Where each partition's run of `out` starts: (index, partition), in order. Orphan clicks
    /// are dead-lettered with their partition.
    out_parts: Vec<(usize, i32)>,
    buf: Vec<u8>,
    label_id: String,
    /// The `ctr.position` header's value of the label being emitted.
    position: String,
    totals: JoinStats,
    emitted: u64,
}

impl Joiner {
    /// Applies queued ownership changes: a revoked partition is checkpointed and let go (commit
    /// on revoke); an assigned one has its checkpoint restored *now*, not on its first message,
    /// because a partition with nothing left to read may still hold pending serves whose
    /// windows must close.
    async fn apply_membership(
        &mut self,
        consumer: &StreamConsumer<GroupContext>,
    ) -> Result<(), FeedbackError> {
        for change in consumer.context().take_changes() {
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
        mark_partition(&mut self.out_parts, out.len(), p);
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
        let result = if is_serve {
            decode_valid::<Serve>(msg.payload()).map(|s| st.join.on_serve(s, now, &mut out))
        } else {
            decode_valid::<Click>(msg.payload()).map(|c| st.join.on_click(c, now, &mut out))
        };
        self.out = out;
        if let Err(reason) = result {
            let topic = msg.topic().to_string();
            warn!(%topic, partition = p, offset, %reason, "dead-lettering a poison message");
            metrics::counter!("ctr_feedback_deadletter_total", "reason" => reason.label())
                .increment(1);
            let reason = reason.to_string();
            let letter = DeadLetter {
                source_topic: &topic,
                source_partition: p,
                source_offset: Some(offset),
                reason: &reason,
            };
            self.dead_letter(
                &letter,
                msg.key().unwrap_or_default(),
                msg.payload().unwrap_or_default(),
            )
            .await?;
        }
        Ok(())
    }

    fn tick(&mut self) {
        let now = now_ms();
        for (&p, st) in &mut self.parts {
            mark_partition(&mut self.out_parts, self.out.len(), p);
            st.join.advance(now, &mut self.out);
        }
    }

    /// Sends a record the joiner will not use to the dead-letter topic, unchanged, with where
    /// it came from and why.
    async fn dead_letter(
        &mut self,
        letter: &DeadLetter<'_>,
        key: &[u8],
        payload: &[u8],
    ) -> Result<(), FeedbackError> {
        let pairs = letter.headers();
        let record = FutureRecord::to(&self.cfg.deadletter_topic)
            .key(key)
            .payload(payload)
            .headers(ctr_runtime::kafka::headers(
                pairs.iter().map(|(k, v)| (*k, v.as_str())),
            ));
        Ok(self.producer.send(record).await?)
    }

    /// Enqueues everything the joins produced.
    async fn emit(&mut self) -> Result<(), FeedbackError> {
        let out = std::mem::take(&mut self.out);
        let out_parts = std::mem::take(&mut self.out_parts);
        let mut runs = out_parts.iter().peekable();
        let mut partition = -1;
        let now = now_ms();
        let (mut pos, mut neg, mut late, mut orphans) = (0u64, 0u64, 0u64, 0u64);
        for (i, e) in out.iter().enumerate() {
            while let Some(&&(start, p)) = runs.peek() {
                if start > i {
                    break;
                }
                partition = p;
                runs.next();
            }
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
                    // The scorer may drop negatives unread when overloaded; it tells them, and
                    // groups them by position, by these headers.
                    self.position.clear();
                    let _ = write!(self.position, "{}", l.position());
                    let label_headers = ctr_runtime::kafka::headers([
                        (headers::CLICKED, headers::clicked_value(l.clicked())),
                        (headers::POSITION, self.position.as_str()),
                    ]);
                    let record = FutureRecord::to(&self.cfg.labeled_topic)
                        .key(l.ad_id().as_bytes())
                        .payload(&self.buf)
                        .headers(label_headers);
                    self.producer.send(record).await?;
                }
                Emit::Orphan(c) => {
                    orphans += 1;
                    let mut bytes = Vec::with_capacity(64);
                    self.clicks.encode_into(c, &mut bytes)?;
                    let reason =
                        format!("orphan click: serve {} unknown to the joiner", c.serve_id);
                    let topic = self.cfg.clicks_topic.clone();
                    let letter = DeadLetter {
                        source_topic: &topic,
                        source_partition: partition,
                        source_offset: None,
                        reason: &reason,
                    };
                    self.dead_letter(&letter, c.serve_id.to_string().as_bytes(), &bytes)
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
        self.out_parts = out_parts;
        self.out_parts.clear();
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
    async fn checkpoint(
        &mut self,
        consumer: &StreamConsumer<GroupContext>,
        only: Option<&[i32]>,
    ) -> Result<(), FeedbackError> {
        let started = Instant::now();
        self.emit().await?;
        self.producer.settle().await?;
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

    fn report(&mut self, detector: &mut StallDetector) -> crate::signals::JoinerSignal {
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

/// Notes that what the joins emit from `out_len` on belongs to `partition`.
fn mark_partition(out_parts: &mut Vec<(usize, i32)>, out_len: usize, partition: i32) {
    match out_parts.last_mut() {
        Some((_, p)) if *p == partition => {}
        // Nothing was emitted since the last mark: it names the partition now.
        Some((start, p)) if *start == out_len => *p = partition,
        _ => out_parts.push((out_len, partition)),
    }
}

/// Checks that the serves and clicks topics have equal partition counts (a serve and its
/// clicks meet by partition number).
async fn check_partitions(cfg: &FeedbackConfig) -> Result<(), FeedbackError> {
    let counts = ctr_runtime::kafka::partition_counts(
        &cfg.service.kafka,
        &cfg.service.policy,
        &[&cfg.serves_topic, &cfg.clicks_topic],
    )
    .await
    .map_err(FeedbackError::Metadata)?;
    let (s, c) = (counts[0], counts[1]);
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

/// Runs the joiner until `stop` turns true; checkpoints everything on the way out.
///
/// The loop, one step at a time: take a record (or a 200 ms tick that advances the joins'
/// clocks), apply any ownership change first, emit what the joins produced, settle the
/// deliveries already acknowledged; every `checkpoint_every`, [`Joiner::checkpoint`]; every
/// second, [`publish_signal`] and check that a broker is up. Every call to Redis follows the
/// dependency policy (`cfg.service.policy`): an outage shorter than the budget is ridden out (the
/// consumer rejoins its group and restores what a rebalance took), a longer one is an error
/// that ends the process.
pub async fn run_joiner(
    cfg: FeedbackConfig,
    redis: RedisConn,
    heartbeat: Heartbeat,
    stop: watch::Receiver<bool>,
) -> Result<(), FeedbackError> {
    let consumer: StreamConsumer<GroupContext> =
        ctr_runtime::kafka::consumer_config(&cfg.service.kafka, &cfg.group, &cfg.service.policy)
            // The range assignor co-partitions the two topics (see module docs).
            .set("partition.assignment.strategy", "range")
            .create_with_context(GroupContext::new("feedback"))?;
    let result = join(&consumer, cfg, redis, heartbeat, stop).await;
    ctr_runtime::kafka::close_in_background(consumer);
    result
}

/// [`run_joiner`]'s work, with its consumer (closed by the caller, however this ends).
async fn join(
    consumer: &StreamConsumer<GroupContext>,
    cfg: FeedbackConfig,
    redis: RedisConn,
    heartbeat: Heartbeat,
    mut stop: watch::Receiver<bool>,
) -> Result<(), FeedbackError> {
    check_partitions(&cfg).await?;
    consumer.subscribe(&[&cfg.serves_topic, &cfg.clicks_topic])?;
    let producer = ctr_runtime::kafka::producer_config(
        &cfg.service.kafka,
        &cfg.service.policy,
        cfg.service.policy.outage_budget,
    )
    .create()?;
    let store = CheckpointStore::new(
        redis.clone(),
        cfg.service.policy,
        &cfg.service.redis_prefix,
        &cfg.group,
        &cfg.serves_topic,
    );
    let mut signal = SignalBoard {
        key: keys::joiner_signal(&cfg.service.redis_prefix),
        instance: format!("{}-{}", cfg.group, std::process::id()),
        redis,
        policy: cfg.service.policy,
        detector: StallDetector::new(cfg.stall),
    };
    let checkpoint_every = cfg.checkpoint_every;
    let mut joiner = Joiner {
        cfg,
        // The window is librdkafka's queue: a full queue waits for the oldest delivery.
        producer: TrackedProducer::new(producer, usize::MAX),
        store,
        parts: HashMap::new(),
        labels: Encoder::new(),
        clicks: Encoder::new(),
        out: Vec::new(),
        out_parts: Vec::new(),
        buf: Vec::with_capacity(256),
        label_id: String::with_capacity(64),
        position: String::with_capacity(8),
        totals: JoinStats::default(),
        emitted: 0,
    };
    info!(group = %joiner.cfg.group, "joiner started");
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut last_checkpoint = Instant::now();
    let mut last_report = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        heartbeat.beat();
        tokio::select! {
            () = ctr_runtime::process::stopped(&mut stop) => break,
            msg = consumer.recv() => {
                joiner.apply_membership(consumer).await?;
                match msg {
                    Ok(m) => joiner.handle(&m).await?,
                    // Broker hiccups are transient: librdkafka reconnects; keep polling (a
                    // broker gone for longer than the budget is caught below).
                    Err(e) => warn!(error = %e, "consumer error"),
                }
            }
            _ = ticker.tick() => {
                joiner.apply_membership(consumer).await?;
                joiner.tick();
            }
        }
        if !joiner.out.is_empty() {
            joiner.emit().await?;
        }
        joiner.producer.reap()?;
        if last_checkpoint.elapsed() >= checkpoint_every {
            joiner.checkpoint(consumer, None).await?;
            last_checkpoint = Instant::now();
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            consumer
                .context()
                .check(joiner.cfg.service.policy.outage_budget)?;
            publish_signal(&mut joiner, &mut signal).await?;
            if last_progress.elapsed() >= Duration::from_secs(5) {
                last_progress = Instant::now();
                log_progress(&joiner);
            }
        }
    }
    joiner.tick();
    joiner.checkpoint(consumer, None).await?;
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

/// Where the joiner's signal for the scorer goes, and the detector behind it.
struct SignalBoard {
    key: String,
    instance: String,
    redis: RedisConn,
    policy: Policy,
    detector: StallDetector,
}

/// Writes this process's signal (the click stream's health and its counts) to its field of
/// the signal hash, which expires two minutes after the last joiner wrote it.
async fn publish_signal(joiner: &mut Joiner, board: &mut SignalBoard) -> Result<(), FeedbackError> {
    let signal = joiner.report(&mut board.detector);
    let json = serde_json::to_string(&signal).expect("a signal of numbers and strings serializes");
    let mut pipe = redis::pipe();
    pipe.hset(&board.key, &board.instance, json)
        .expire(&board.key, 120);
    let conn = &board.redis;
    board
        .policy
        .retry("publishing the joiner signal", || {
            let mut c = conn.clone();
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
        .map_err(FeedbackError::Signal)?;
    if signal.stalled {
        warn!(
            reason = signal.reason.as_deref().unwrap_or(""),
            "click stream stalled"
        );
    }
    Ok(())
}

fn log_progress(joiner: &Joiner) {
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

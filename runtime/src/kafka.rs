//! Kafka for a service: the common client settings, a consumer-group context that queues
//! ownership changes and watches the brokers, and a producer that tracks every delivery.
//!
//! Rebalance callbacks run inside `recv`, where a service cannot do async work (restore a
//! partition's checkpoint, publish and checkpoint a revoked one); [`GroupContext`] queues them
//! as [`Membership`] changes for the service's loop to apply in order with the records.
//!
//! The broker side of the dependency policy ([`crate::policy`]): a delivery that the broker
//! has not acknowledged within the outage budget fails (`message.timeout.ms`), which ends the
//! process; a consumer's loop asks [`GroupContext::check`] and gives up once no broker
//! has been up, or it has held no settled place in its group, for longer than the budget.
//! Shorter outages are ridden out by librdkafka
//! (reconnects, idempotent retries), and a consumer that stalled past `max.poll.interval.ms`
//! rejoins its group on its next poll; its loop restores what the rebalance took away.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, TopicPartitionList};
use tracing::{info, warn};

use crate::{DependencyError, Policy};

/// How a client reaches the brokers: where they are, and the security of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    /// Bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// librdkafka's `security.protocol`.
    pub protocol: SecurityProtocol,
    /// PEM file of the CA that signs the brokers' certificates (TLS); `None`: the system's
    /// trusted roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// SASL credentials, for the `sasl_*` protocols.
    pub sasl: Option<SaslCredentials>,
}

/// The security of the connection to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// Neither TLS nor authentication: a closed network only.
    Plaintext,
    /// TLS; the brokers' certificate is verified (host name included).
    Ssl,
    /// SASL authentication without TLS: the password crosses the network in clear with PLAIN.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn name(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the connection is TLS.
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether the client authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// A SASL user: its mechanism, name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslCredentials {
    /// `SCRAM-SHA-256`, `SCRAM-SHA-512` or `PLAIN`.
    pub mechanism: String,
    /// The user.
    pub username: String,
    /// Its password (never shown by `Debug`).
    pub password: String,
}

impl std::fmt::Debug for SaslCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslCredentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

impl KafkaConnection {
    /// A client configuration with the brokers and the connection's security set.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("security.protocol", self.protocol.name());
        if let Some(ca) = &self.ca_file {
            c.set("ssl.ca.location", ca.to_string_lossy());
        }
        if let Some(s) = &self.sasl {
            c.set("sasl.mechanism", &s.mechanism)
                .set("sasl.username", &s.username)
                .set("sasl.password", &s.password);
        }
        c
    }
}

/// Settings every client shares: the connection, and the policy's call deadline as the deadline
/// of a request to a broker (`socket.timeout.ms`; librdkafka's default is 60 s), so a frozen
/// broker is seen down after one deadline, not a minute.
fn client_config(kafka: &KafkaConnection, policy: &Policy) -> ClientConfig {
    let mut c = kafka.client();
    c.set(
        "socket.timeout.ms",
        policy
            .call_timeout
            .as_millis()
            .clamp(10, 300_000)
            .to_string(),
    );
    c
}

/// Settings of a consumer in group `group` that commits its own offsets (after the effect is
/// durable), reads from the beginning when nothing is committed, and reports statistics every
/// second (consumer lag, broker state).
pub fn consumer_config(kafka: &KafkaConnection, group: &str, policy: &Policy) -> ClientConfig {
    let mut c = client_config(kafka, policy);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "1000")
        // Short group timeouts: a dead member's partitions move after 6 s (Kafka's smallest
        // session), and Tansu needs them to form a group at all (docs/STACK.md). A member
        // that stalls longer than max.poll.interval (a dependency outage being ridden out)
        // leaves the group and rejoins on its next poll.
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    c
}

/// Settings of every producer: idempotent (`acks=all`, ordered retries, no duplicates), the
/// Java-compatible `murmur2_random` partitioner (a record lands in the partition producers in
/// other languages would choose), 5 ms linger, and `delivery_timeout` for the broker to
/// acknowledge a record before its delivery fails (a service gives it the outage budget).
pub fn producer_config(
    kafka: &KafkaConnection,
    policy: &Policy,
    delivery_timeout: Duration,
) -> ClientConfig {
    let mut c = client_config(kafka, policy);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().max(1).to_string(),
        );
    c
}

/// A change of partition ownership, queued for the service's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// These partitions were assigned to this member.
    Assigned(Vec<i32>),
    /// These partitions were taken away (or lost) and must be handed over.
    Revoked(Vec<i32>),
}

/// Whether any broker is up, from librdkafka's statistics reports (the client needs
/// `statistics.interval.ms`, which [`consumer_config`] sets).
#[derive(Debug)]
struct BrokerWatch {
    origin: Instant,
    /// Milliseconds since `origin` when a broker was last seen up (0: at creation).
    broker_up_ms: AtomicU64,
}

impl Default for BrokerWatch {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            broker_up_ms: AtomicU64::new(0),
        }
    }
}

impl BrokerWatch {
    /// How long no broker has been up, judged from the statistics reports (about a second
    /// behind); zero while one is.
    fn outage(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.broker_up_ms.load(Ordering::Relaxed)))
            .saturating_sub(Duration::from_millis(1500))
    }

    fn observe(&self, statistics: &Statistics) {
        // Real brokers only: librdkafka also lists logical ones (the group coordinator), whose
        // state is not a connection's.
        let up = statistics
            .brokers
            .values()
            .any(|b| b.state == "UP" && matches!(b.source.as_str(), "learned" | "configured"));
        if up {
            self.broker_up_ms
                .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

type StatsHook = Box<dyn Fn(&Statistics) + Send + Sync>;

/// A consumer that has gone without a broker, or without its place in its group, for longer
/// than the outage budget: the process should exit for its supervisor to restart it.
#[derive(Debug, thiserror::Error)]
pub enum Outage {
    /// No broker has been up.
    #[error(
        "no Kafka broker has been reachable for {0:?}, longer than the outage budget: exiting so that a supervisor restarts the service (it resumes from its checkpoints)"
    )]
    Broker(Duration),
    /// The consumer has not been a settled member of its group (a known librdkafka failure
    /// after the group coordinator moves: it stops trying to join).
    #[error(
        "not a member of the consumer group for {0:?} (group state: {1}), longer than the outage budget: exiting so that a supervisor restarts the service (it resumes from its checkpoints)"
    )]
    Group(Duration, String),
}

/// A consumer context that queues [`Membership`] changes and watches whether any broker is
/// up and whether the consumer holds its place in its group; a service may add its own
/// statistics hook (consumer lag).
pub struct GroupContext {
    service: &'static str,
    queue: Mutex<Vec<Membership>>,
    on_stats: Option<StatsHook>,
    broker: BrokerWatch,
    /// Milliseconds since the broker watch's origin when the group was last seen settled
    /// (state `up`, join state `steady`), and the last state seen.
    group_settled_ms: AtomicU64,
    group_state: Mutex<String>,
}

impl std::fmt::Debug for GroupContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupContext")
            .field("service", &self.service)
            .field("broker_outage", &self.broker.outage())
            .finish_non_exhaustive()
    }
}

impl GroupContext {
    /// A context for `service` (it names the `ctr_<service>_assigned_partitions` gauge).
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            queue: Mutex::new(Vec::new()),
            on_stats: None,
            broker: BrokerWatch::default(),
            group_settled_ms: AtomicU64::new(0),
            group_state: Mutex::new("not reported yet".into()),
        }
    }

    /// Calls `hook` with every statistics report (every second).
    pub fn with_stats(mut self, hook: impl Fn(&Statistics) + Send + Sync + 'static) -> Self {
        self.on_stats = Some(Box::new(hook));
        self
    }

    /// The ownership changes queued since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<Membership> {
        std::mem::take(
            &mut *self
                .queue
                .lock()
                .expect("membership queue lock never poisoned"),
        )
    }

    /// An [`Outage`] if no broker has been up, or the consumer has not been a settled member
    /// of its group, for longer than `budget` (judged from the statistics, about a second
    /// behind; a consumer counts from its creation, so `budget` must allow a first join: a
    /// group waits up to its session timeout, 6 s, for a member that left without a word).
    pub fn check(&self, budget: Duration) -> Result<(), Outage> {
        let broker = self.broker.outage();
        if broker > budget {
            return Err(Outage::Broker(broker));
        }
        let now = self.broker.origin.elapsed().as_millis() as u64;
        let unsettled = Duration::from_millis(
            now.saturating_sub(self.group_settled_ms.load(Ordering::Relaxed)),
        )
        .saturating_sub(Duration::from_millis(1500));
        if unsettled > budget {
            let state = self
                .group_state
                .lock()
                .expect("group state lock never poisoned")
                .clone();
            return Err(Outage::Group(unsettled, state));
        }
        Ok(())
    }

    fn push(&self, change: Membership) {
        self.queue
            .lock()
            .expect("membership queue lock never poisoned")
            .push(change);
    }
}

/// The sorted, distinct partitions of a list.
pub fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        self.broker.observe(&statistics);
        if let Some(cgrp) = &statistics.cgrp {
            if cgrp.state == "up" && cgrp.join_state == "steady" {
                self.group_settled_ms.store(
                    self.broker.origin.elapsed().as_millis() as u64,
                    Ordering::Relaxed,
                );
            }
            *self
                .group_state
                .lock()
                .expect("group state lock never poisoned") =
                format!("{}, join {}", cgrp.state, cgrp.join_state);
        }
        if let Some(hook) = &self.on_stats {
            hook(&statistics);
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            info!(parts = ?partitions(tpl), "partitions revoked");
            self.push(Membership::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let gauge = || metrics::gauge!(format!("ctr_{}_assigned_partitions", self.service));
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                gauge().set(parts.len() as f64);
                info!(?parts, "partitions assigned");
                self.push(Membership::Assigned(parts));
            }
            Rebalance::Revoke(_) => gauge().set(0.0),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// A client context that remembers why the brokers refused the connection itself (bad
/// credentials, a certificate that does not verify): librdkafka reports those only to the
/// context and then retries, so a caller would see "transport failure" until its budget ran
/// out. A refusal is permanent: it fails the call at once, naming the cause.
#[derive(Debug, Default)]
struct Refusals {
    last: std::sync::Mutex<Option<String>>,
}

impl Refusals {
    /// The refusal seen, as a permanent error.
    fn refusal(&self) -> Option<KafkaError> {
        let reason = self.last.lock().expect("refusals").clone()?;
        Some(KafkaError::ClientCreation(format!(
            "the brokers refused the connection: {reason} (check --kafka-security-protocol, the SASL user and password, and --kafka-ca-file)"
        )))
    }
}

impl ClientContext for Refusals {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        warn!(error = %error, reason, "librdkafka");
        if matches!(
            error.rdkafka_error_code(),
            Some(Code::Authentication | Code::SaslAuthenticationFailed | Code::SSL)
        ) {
            *self.last.lock().expect("refusals") = Some(reason.to_string());
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Refusals {}

/// The partition count of each of `topics` (0 for a topic the broker does not know), asked of
/// the broker under the dependency policy: a broker that is restarting or not answering yet is
/// waited for up to the outage budget.
pub async fn partition_counts(
    kafka: &KafkaConnection,
    policy: &Policy,
    topics: &[&str],
) -> Result<Vec<usize>, DependencyError<KafkaError>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer<Refusals> = client_config(kafka, policy)
        .create_with_context(Refusals::default())
        .map_err(DependencyError::Failed)?;
    let client = Arc::new(client);
    let mut counts = Vec::with_capacity(topics.len());
    for topic in topics {
        let count = policy
            .retry(&format!("reading the metadata of topic {topic}"), || {
                let (client, topic) = (Arc::clone(&client), topic.to_string());
                let deadline = policy.call_timeout;
                async move {
                    tokio::task::spawn_blocking(move || {
                        // In short slices, each followed by serving the client's events: a
                        // refusal is reported only to the context, and a fetch would otherwise
                        // wait out its whole deadline first. (Nothing is subscribed: polling
                        // consumes no message.) The slices end before the policy's own timer.
                        let until = Instant::now() + deadline.mul_f64(0.9);
                        let md = loop {
                            let slice = until
                                .saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(500));
                            match client.fetch_metadata(Some(&topic), slice) {
                                Ok(md) => break md,
                                Err(e) => {
                                    let _ = client.poll(Duration::ZERO);
                                    if let Some(refused) = client.context().refusal() {
                                        return Err(refused);
                                    }
                                    if Instant::now() >= until {
                                        return Err(e);
                                    }
                                }
                            }
                        };
                        Ok(md
                            .topics()
                            .first()
                            .filter(|t| t.error().is_none())
                            .map_or(0, |t| t.partitions().len()))
                    })
                    .await
                    .unwrap_or(Err(KafkaError::Canceled))
                }
            })
            .await?;
        counts.push(count);
    }
    Ok(counts)
}

/// Closes `consumer` on a blocking thread, not waited for. Closing leaves the group and
/// commits what is pending, which with a broker that does not answer blocks for as long as
/// librdkafka's timeouts allow; on an async worker thread that would stall the process's
/// shutdown. A clean exit still waits for it (the runtime joins its blocking threads); an exit
/// after a failure does not (see `process::exit_code`).
pub fn close_in_background<C: ConsumerContext + 'static>(
    consumer: impl Into<Arc<rdkafka::consumer::StreamConsumer<C>>>,
) {
    let consumer = consumer.into();
    drop(tokio::task::spawn_blocking(move || drop(consumer)));
}

/// Kafka record headers from name–value pairs (the contracts' header builders produce those).
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// Why a record was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The broker did not acknowledge a record (within the delivery timeout, or refused it).
    #[error("delivery to {topic} failed: {source}")]
    Delivery {
        /// Where the record was going.
        topic: String,
        /// librdkafka's reason.
        source: KafkaError,
    },
    /// The broker did not acknowledge a record within the delivery timeout
    /// (`message.timeout.ms`): for a service, the broker has been out for its outage budget.
    #[error(
        "delivery to {topic} timed out: the broker did not acknowledge it within the delivery timeout (a service's outage budget)"
    )]
    TimedOut {
        /// Where the record was going.
        topic: String,
    },
    /// The producer was shut down before it reported a delivery.
    #[error("the producer shut down before reporting a delivery to {topic}")]
    Canceled {
        /// Where the record was going.
        topic: String,
    },
}

/// A producer with a bounded window of deliveries awaiting the broker's acknowledgement.
///
/// Records are enqueued in call order (`send_result` is synchronous), so per-partition order is
/// the caller's. When the window or librdkafka's queue is full, `send` waits for the oldest
/// delivery instead of dropping or buffering without bound; every delivery report is checked,
/// and a failed one is an error, never a log line. A service settles its deliveries
/// ([`TrackedProducer::settle`]) before it checkpoints the input offsets behind them.
pub struct TrackedProducer<C: ClientContext + 'static = rdkafka::client::DefaultClientContext> {
    producer: FutureProducer<C>,
    in_flight: VecDeque<(u8, DeliveryFuture)>,
    /// Topics sent to, indexed by the tag kept beside each delivery (no String per record).
    topics: Vec<String>,
    max_in_flight: usize,
    delivered: u64,
}

impl<C: ClientContext + 'static> std::fmt::Debug for TrackedProducer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedProducer")
            .field("in_flight", &self.in_flight.len())
            .field("max_in_flight", &self.max_in_flight)
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl<C: ClientContext + 'static> TrackedProducer<C> {
    /// Tracks the deliveries of `producer` (which may be shared with other trackers), at most
    /// `max_in_flight` at once.
    pub fn new(producer: FutureProducer<C>, max_in_flight: usize) -> Self {
        Self {
            producer,
            in_flight: VecDeque::new(),
            topics: Vec::new(),
            max_in_flight: max_in_flight.max(1),
            delivered: 0,
        }
    }

    /// The underlying producer.
    pub fn producer(&self) -> &FutureProducer<C> {
        &self.producer
    }

    /// Records acknowledged so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Records awaiting acknowledgement.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn tag(&mut self, topic: &str) -> u8 {
        match self.topics.iter().position(|t| t == topic) {
            Some(i) => i as u8,
            None => {
                assert!(
                    self.topics.len() < usize::from(u8::MAX),
                    "a tracked producer sends to a handful of topics"
                );
                self.topics.push(topic.to_string());
                (self.topics.len() - 1) as u8
            }
        }
    }

    /// Enqueues `record`; waits for the oldest delivery when the window or librdkafka's queue
    /// is full. Fails as soon as a delivery it waited for has failed.
    pub async fn send<K, P>(&mut self, record: FutureRecord<'_, K, P>) -> Result<(), ProduceError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        if self.in_flight.len() >= self.max_in_flight {
            self.settle_one().await?;
        }
        let tag = self.tag(record.topic);
        let mut record = record;
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back((tag, delivery));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if self.in_flight.is_empty() {
                        // Another tracker's records fill the shared queue: let them drain.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        self.settle_one().await?;
                    }
                }
                Err((source, _)) => {
                    return Err(ProduceError::Delivery {
                        topic: self.topics[usize::from(tag)].clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Settles the deliveries already reported, oldest first, without waiting.
    pub fn reap(&mut self) -> Result<(), ProduceError> {
        while let Some((_, delivery)) = self.in_flight.front_mut() {
            let Some(result) = delivery.now_or_never() else {
                break;
            };
            let (tag, _) = self.in_flight.pop_front().expect("front exists");
            self.check(tag, result)?;
        }
        Ok(())
    }

    /// Waits until every record sent so far is acknowledged; returns the total delivered.
    pub async fn settle(&mut self) -> Result<u64, ProduceError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(self.delivered)
    }

    async fn settle_one(&mut self) -> Result<(), ProduceError> {
        let Some((tag, delivery)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let result = delivery.await;
        self.check(tag, result)
    }

    fn check(
        &mut self,
        tag: u8,
        result: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
    ) -> Result<(), ProduceError> {
        let topic = || self.topics[usize::from(tag)].clone();
        match result {
            Ok(Ok(_)) => {
                self.delivered += 1;
                Ok(())
            }
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                Err(ProduceError::TimedOut { topic: topic() })
            }
            Ok(Err((source, _))) => Err(ProduceError::Delivery {
                topic: topic(),
                source,
            }),
            Err(_) => Err(ProduceError::Canceled { topic: topic() }),
        }
    }
}

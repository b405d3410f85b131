//! The event producer of `simulate` and `replay`: the runtime's tracked producer
//! ([`ctr_runtime::kafka::TrackedProducer`]) with the common settings (idempotent, acks=all,
//! the Java-compatible `murmur2_random` partitioner, so that producers in other languages put a
//! serve and its clicks into the same partition number as we do). Records are enqueued in call
//! order, so per-partition order is the caller's order; every delivery report is awaited and a
//! failed one is an error, not a log line. The broker has the outage budget
//! (`--outage-budget-ms`) to acknowledge a record; past it the command fails.

use std::time::Duration;

use ctr_runtime::flags::{DependencyFlags, KafkaFlags};
use ctr_runtime::kafka::TrackedProducer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureRecord, Producer};

/// Why events could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The Kafka producer could not be created.
    #[error("creating the Kafka producer: {0}")]
    Create(KafkaError),
    /// The broker did not acknowledge an event.
    #[error(transparent)]
    Delivery(#[from] ctr_runtime::kafka::ProduceError),
    /// A setting out of range.
    #[error("{0}")]
    Settings(String),
    /// Flushing the producer failed.
    #[error("flushing the producer: {0}")]
    Flush(KafkaError),
}

/// Where events go: the broker and the two input topics, the same flags for every command.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// The broker (bootstrap servers).
    #[command(flatten)]
    pub kafka: KafkaFlags,
    /// The outage policy.
    #[command(flatten)]
    pub dependencies: DependencyFlags,
    /// Topic of serve events (keyed by serve ID).
    #[arg(long, env = "CTR_SERVES_TOPIC", default_value = "ctr.serves")]
    pub serves_topic: String,
    /// Topic of click events (keyed by serve ID, partitioned like the serves).
    #[arg(long, env = "CTR_CLICKS_TOPIC", default_value = "ctr.clicks")]
    pub clicks_topic: String,
}

/// A producer of events with at most `max_in_flight` awaiting acknowledgement.
#[derive(Debug)]
pub struct EventProducer {
    inner: TrackedProducer,
}

impl EventProducer {
    /// A producer with the common client settings, at most `max_in_flight` events unacknowledged.
    pub fn new(args: &KafkaArgs, max_in_flight: usize) -> Result<Self, ProduceError> {
        let policy = args.dependencies.policy().map_err(ProduceError::Settings)?;
        let kafka = args.kafka.clone().check().map_err(ProduceError::Settings)?;
        let producer = ctr_runtime::kafka::producer_config(&kafka, &policy, policy.outage_budget)
            .set("compression.type", "none")
            .create()
            .map_err(ProduceError::Create)?;
        Ok(Self {
            inner: TrackedProducer::new(producer, max_in_flight),
        })
    }

    /// Enqueues one event; waits for the oldest delivery when the window is full. Fails as
    /// soon as a delivery it waited for has failed.
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<(), ProduceError> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        Ok(self.inner.send(record).await?)
    }

    /// Waits until every enqueued event is acknowledged by the broker; returns how many were.
    pub async fn flush(&mut self) -> Result<u64, ProduceError> {
        let delivered = self.inner.settle().await?;
        // Nothing is in flight from our side; make sure librdkafka holds nothing either.
        self.inner
            .producer()
            .flush(Duration::from_secs(30))
            .map_err(ProduceError::Flush)?;
        Ok(delivered)
    }

    /// Events the broker has acknowledged.
    pub fn delivered(&self) -> u64 {
        self.inner.delivered()
    }
}

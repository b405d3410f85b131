//! An event producer that never loses an accepted event silently.
//!
//! Settings: idempotent (`enable.idempotence=true`, which implies acks=all and ordered retries),
//! and the Java-compatible `murmur2_random` partitioner so that producers in other languages
//! (Java's default, or librdkafka configured the same way as our Python example) put a serve and
//! its clicks into the same partition number as we do. Records are enqueued in call order
//! (`send_result` is synchronous), so per-partition order is the caller's order; every delivery
//! report is awaited and a failed one is an error, not a log line.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

/// Why events could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("creating the Kafka producer: {0}")]
    Create(KafkaError),
    #[error("delivery to {topic} failed: {source}")]
    Delivery { topic: String, source: KafkaError },
    #[error("the producer shut down before reporting a delivery")]
    Canceled,
}

/// Where events go: the broker and the two input topics, the same flags for every command.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CTR_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    #[arg(long, env = "CTR_SERVES_TOPIC", default_value = "ctr.serves")]
    pub serves_topic: String,
    #[arg(long, env = "CTR_CLICKS_TOPIC", default_value = "ctr.clicks")]
    pub clicks_topic: String,
}

/// Builds the producer configuration shared by every ingest path.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("compression.type", "none")
        .set("message.timeout.ms", "30000");
    cfg
}

/// A producer with a bounded window of unacknowledged deliveries.
pub struct TrackedProducer {
    producer: FutureProducer,
    in_flight: VecDeque<(String, DeliveryFuture)>,
    max_in_flight: usize,
    delivered: u64,
}

impl std::fmt::Debug for TrackedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedProducer")
            .field("in_flight", &self.in_flight.len())
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl TrackedProducer {
    pub fn new(brokers: &str, max_in_flight: usize) -> Result<Self, ProduceError> {
        let producer = producer_config(brokers)
            .create()
            .map_err(ProduceError::Create)?;
        Ok(Self {
            producer,
            in_flight: VecDeque::new(),
            max_in_flight,
            delivered: 0,
        })
    }

    /// Enqueues one record; waits for the oldest delivery when the window or librdkafka's
    /// queue is full. Returns an error as soon as any delivery has failed.
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<(), ProduceError> {
        if self.in_flight.len() >= self.max_in_flight {
            self.settle_one().await?;
        }
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        loop {
            match self.producer.send_result(record) {
                Ok(fut) => {
                    self.in_flight.push_back((topic.to_string(), fut));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if self.in_flight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        self.settle_one().await?;
                    }
                }
                Err((e, _)) => {
                    return Err(ProduceError::Delivery {
                        topic: topic.to_string(),
                        source: e,
                    });
                }
            }
        }
    }

    async fn settle_one(&mut self) -> Result<(), ProduceError> {
        let Some((topic, fut)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        match fut.await {
            Ok(Ok(_)) => {
                self.delivered += 1;
                Ok(())
            }
            Ok(Err((source, _))) => Err(ProduceError::Delivery { topic, source }),
            Err(_) => Err(ProduceError::Canceled),
        }
    }

    /// Waits until every enqueued record is acknowledged by the broker.
    pub async fn flush(&mut self) -> Result<u64, ProduceError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        // Nothing is in flight from our side; make sure librdkafka holds nothing either.
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(ProduceError::Create)?;
        Ok(self.delivered)
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}

//! Poison labeled impressions to the dead-letter topic, as the joiner does with its inputs.
//!
//! A record the scorer cannot use (no payload, undecodable, invalid values, rejected by the
//! models) is produced unchanged to the dead-letter topic with the contract's dead-letter
//! headers ([`ctr_schemas::contract::DeadLetter`]: source topic, partition, offset, reason),
//! counted by reason, and skipped. Nothing is lost: a worker awaits every dead letter's
//! delivery before it checkpoints the offsets behind it, so after a crash the poison is
//! dead-lettered again (at least once; a dead letter says which offset it is, so duplicates
//! are recognisable).

use ctr_runtime::kafka::{ProduceError, TrackedProducer};
use ctr_schemas::contract::DeadLetter;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// One worker's dead letters awaiting the broker's acknowledgement (the producer is shared by
/// the workers).
#[derive(Debug)]
pub struct DeadLetters {
    producer: TrackedProducer,
    topic: String,
}

impl DeadLetters {
    /// Dead letters to `topic` through `producer`.
    pub fn new(producer: FutureProducer, topic: &str) -> Self {
        Self {
            // The window is librdkafka's queue: a full queue waits for the oldest delivery.
            producer: TrackedProducer::new(producer, usize::MAX),
            topic: topic.to_string(),
        }
    }

    /// Sends a poison record (key and payload as they came) with where it came from and why.
    pub async fn send(
        &mut self,
        letter: &DeadLetter<'_>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Result<(), ProduceError> {
        let pairs = letter.headers();
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(
            ctr_runtime::kafka::headers(pairs.iter().map(|(k, v)| (*k, v.as_str()))),
        );
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer.send(record).await
    }

    /// Waits until the broker acknowledged every dead letter sent.
    pub async fn flush(&mut self) -> Result<(), ProduceError> {
        self.producer.settle().await.map(|_| ())
    }
}

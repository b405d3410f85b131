//! Poison labeled impressions to the dead-letter topic, as the joiner does with its inputs.
//!
//! A record the scorer cannot use (no payload, undecodable, invalid values, rejected by the
//! models) is produced unchanged to the dead-letter topic with headers saying where it came from
//! and why (`ctr.source_topic`, `ctr.source_partition`, `ctr.source_offset`, `ctr.reason`),
//! counted by reason, and skipped. Nothing is lost: a worker awaits every dead letter's delivery
//! before it checkpoints the offsets behind it, so after a crash the poison is dead-lettered
//! again (at least once; a dead letter says which offset it is, so duplicates are recognisable).

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

/// Why a dead letter could not be delivered (the worker stops; a restart replays the poison).
#[derive(Debug, thiserror::Error)]
#[error("dead-lettering to {topic}: {source}")]
pub struct DeadLetterError {
    topic: String,
    source: KafkaError,
}

/// An idempotent, acks=all producer to the dead-letter topic, shared by the workers.
pub fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
}

/// One worker's dead letters awaiting the broker's acknowledgement.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    in_flight: VecDeque<DeliveryFuture>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: &str) -> Self {
        Self {
            producer,
            topic: topic.to_string(),
            in_flight: VecDeque::new(),
        }
    }

    /// Sends a poison record (key and payload as they came) with where it came from and why.
    pub async fn send(
        &mut self,
        source: (&str, i32, i64),
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        reason: &str,
    ) -> Result<(), DeadLetterError> {
        let (topic, partition, offset) = source;
        let (partition, offset) = (partition.to_string(), offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ctr.source_topic",
                value: Some(topic),
            })
            .insert(Header {
                key: "ctr.source_partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "ctr.source_offset",
                value: Some(&offset),
            })
            .insert(Header {
                key: "ctr.reason",
                value: Some(reason),
            });
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers.clone());
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back(delivery);
                    return Ok(());
                }
                // librdkafka's queue is full: wait for the oldest, never drop.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match self.in_flight.pop_front() {
                        Some(d) => self.check(d.await)?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((source, _)) => return Err(self.error(source)),
            }
        }
    }

    /// Waits until the broker acknowledged every dead letter sent.
    pub async fn flush(&mut self) -> Result<(), DeadLetterError> {
        while let Some(d) = self.in_flight.pop_front() {
            self.check(d.await)?;
        }
        Ok(())
    }

    fn check(
        &self,
        delivered: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
    ) -> Result<(), DeadLetterError> {
        match delivered {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((source, _))) => Err(self.error(source)),
            Err(_) => Err(self.error(KafkaError::Canceled)),
        }
    }

    fn error(&self, source: KafkaError) -> DeadLetterError {
        DeadLetterError {
            topic: self.topic.clone(),
            source,
        }
    }
}

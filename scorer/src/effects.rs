//! A worker's effects on the world behind one narrow trait, [`Effects`]: restoring a
//! partition, publishing a batch, reading back a retired key's totals, saving a checkpoint,
//! dead-lettering, committing offsets.
//!
//! The exactly-once protocol is an order of these effects (a batch is published before the
//! checkpoint that covers it, every dead letter is delivered before the checkpoint that moves
//! past it, and offsets are committed only after their checkpoint was written), so the worker
//! takes its effects as a type parameter: [`Live`] in the service, a recording fake in the
//! worker's unit tests, which check that order.

use std::future::Future;
use std::sync::Arc;

use ctr_runtime::DependencyError;
use ctr_runtime::kafka::{GroupContext, ProduceError};
use ctr_schemas::contract::DeadLetter;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::checkpoint::{CheckpointError, CheckpointStore, Saved};
use crate::deadletter::DeadLetters;
use crate::publish::{Published, Publisher};
use crate::state::{PartitionState, Total};

/// One partition's batch as written to Redis.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The partition written.
    pub partition: i32,
    /// The batch covers the partition's records up to this offset.
    pub last_offset: i64,
    /// The serving variant's estimates of the keys the batch changed.
    pub estimates: &'a [Published],
    /// The serving variant's name and its encoded delta, for replicas.
    pub model: &'a str,
    /// The encoded [`crate::serving::PartitionDelta`].
    pub delta: &'a [u8],
}

/// What a worker does to the world. Each call follows the dependency policy (retries within
/// the outage budget, then an error that stops the worker).
pub trait Effects: Send + 'static {
    /// The partition's checkpoint, if it has one.
    fn load(
        &mut self,
        partition: i32,
    ) -> impl Future<Output = Result<Option<PartitionState>, CheckpointError>> + Send;

    /// Writes a batch, fenced by its last offset; whether it was written (not: a write at or
    /// past that offset happened already).
    fn publish(
        &mut self,
        batch: Batch<'_>,
    ) -> impl Future<Output = Result<bool, DependencyError<redis::RedisError>>> + Send;

    /// The totals published under the estimate key `key` and the offset they are exact as of
    /// ([`Publisher::read_total`]).
    fn read_total(
        &mut self,
        key: &str,
    ) -> impl Future<Output = Result<Option<(Total, i64)>, DependencyError<redis::RedisError>>> + Send;

    /// Saves the partition's state (whole, or the increment since its last checkpoint) unless a
    /// newer checkpoint is stored; what was written (`None`: nothing).
    fn save(
        &mut self,
        partition: i32,
        state: &mut PartitionState,
    ) -> impl Future<Output = Result<Option<Saved>, CheckpointError>> + Send;

    /// Sends a poison record to the dead-letter topic (not yet acknowledged).
    fn dead_letter(
        &mut self,
        letter: &DeadLetter<'_>,
        payload: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), ProduceError>> + Send;

    /// Waits until every dead letter sent is acknowledged.
    fn flush_dead_letters(&mut self) -> impl Future<Output = Result<(), ProduceError>> + Send;

    /// Commits where each partition's next reading starts: (partition, next offset).
    fn commit(&mut self, offsets: &[(i32, i64)]);
}

/// The service's effects: Redis (estimates, model streams, checkpoints) and Kafka (dead
/// letters, offset commits).
pub struct Live {
    /// Writes estimates and model deltas.
    pub publisher: Publisher,
    /// Saves checkpoints.
    pub store: CheckpointStore,
    /// Sends poison records to the dead-letter topic.
    pub dead_letters: DeadLetters,
    /// The consumer whose offsets are committed.
    pub consumer: Arc<StreamConsumer<GroupContext>>,
    /// The labeled topic (for commits).
    pub topic: String,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("topic", &self.topic)
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

impl Effects for Live {
    fn load(
        &mut self,
        partition: i32,
    ) -> impl Future<Output = Result<Option<PartitionState>, CheckpointError>> + Send {
        self.store.load(partition)
    }

    fn publish(
        &mut self,
        b: Batch<'_>,
    ) -> impl Future<Output = Result<bool, DependencyError<redis::RedisError>>> + Send {
        self.publisher.apply(
            &self.topic,
            b.partition,
            b.last_offset,
            b.estimates,
            b.model,
            b.delta,
        )
    }

    fn read_total(
        &mut self,
        key: &str,
    ) -> impl Future<Output = Result<Option<(Total, i64)>, DependencyError<redis::RedisError>>> + Send
    {
        self.publisher.read_total(key)
    }

    fn save(
        &mut self,
        partition: i32,
        state: &mut PartitionState,
    ) -> impl Future<Output = Result<Option<Saved>, CheckpointError>> + Send {
        self.store.save(partition, state)
    }

    fn dead_letter(
        &mut self,
        letter: &DeadLetter<'_>,
        payload: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), ProduceError>> + Send {
        self.dead_letters.send(letter, None, payload)
    }

    fn flush_dead_letters(&mut self) -> impl Future<Output = Result<(), ProduceError>> + Send {
        self.dead_letters.flush()
    }

    /// Asynchronous, always: the commit is only where a new owner starts reading (the
    /// checkpoint decides what it skips), and a synchronous commit would block a runtime
    /// thread for as long as the broker does not answer.
    fn commit(&mut self, offsets: &[(i32, i64)]) {
        let mut list = TopicPartitionList::new();
        for &(p, next) in offsets {
            if let Err(e) = list.add_partition_offset(&self.topic, p, Offset::Offset(next)) {
                warn!(partition = p, error = %e, "cannot build the offset commit");
            }
        }
        if list.count() > 0
            && let Err(e) = self.consumer.commit(&list, CommitMode::Async)
        {
            // Harmless: the checkpoint, not Kafka, decides where a new owner resumes.
            debug!(error = %e, "offset commit failed");
        }
    }
}

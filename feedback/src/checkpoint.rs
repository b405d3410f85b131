//! Durable checkpoints of the join state, with the input offsets they reflect.
//!
//! Where: Redis (the stack's durable store: append-only file, fsync every second), one key per
//! (group, serves topic, partition): [`ctr_schemas::contract::keys::joiner_checkpoint`], a hash
//! with `serves` and `clicks` (the next offsets to read, the fence), `state` (the
//! [`Checkpoint`] in the project's snapshot container, `ctr_models::snapshot`) and `t` (when it
//! was written). Redis rather than a local file because a partition may move to another joiner
//! process on another host; rather than a Kafka topic because a lookup by key must not scan a
//! topic. The store itself is the runtime's fenced store ([`ctr_runtime::redis::FencedStore`]):
//! a checkpoint whose offsets are behind the stored ones (a joiner that lost the partition in a
//! rebalance and has not noticed yet) is not written.
//!
//! The protocol (issue #4): every label emitted from the state is acknowledged by the broker
//! *before* the checkpoint that covers it is written, so a crash at any point loses nothing:
//! the restarted joiner restores the last checkpoint and replays both topics from its offsets,
//! re-emitting some labels with the same deterministic IDs, which the scorer drops.

use ctr_runtime::Policy;
pub use ctr_runtime::redis::CheckpointError;
use ctr_runtime::redis::FencedStore;
use ctr_runtime::redis::RedisConn;
use ctr_schemas::contract::keys;
use serde::{Deserialize, Serialize};

use crate::join::PartitionJoin;

/// What is stored for one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint<J = PartitionJoin> {
    /// Next offset to read in the serves partition; `None` = nothing consumed yet.
    pub serves_next: Option<i64>,
    /// Next offset to read in the clicks partition.
    pub clicks_next: Option<i64>,
    /// The join state: owned when loaded, borrowed (`&PartitionJoin`) when saved; both
    /// serialize identically.
    pub join: J,
}

/// Reads and writes checkpoints of one joiner group.
#[derive(Debug)]
pub struct CheckpointStore {
    store: FencedStore,
}

impl CheckpointStore {
    /// A store of the join checkpoints of `group`'s partitions under `redis_prefix`.
    pub fn new(
        conn: RedisConn,
        policy: Policy,
        redis_prefix: &str,
        group: &str,
        serves_topic: &str,
    ) -> Self {
        let (prefix, group, topic) = (
            redis_prefix.to_string(),
            group.to_string(),
            serves_topic.to_string(),
        );
        Self {
            store: FencedStore::new(
                conn,
                policy,
                move |p| keys::joiner_checkpoint(&prefix, &group, &topic, p),
                &["serves", "clicks"],
            ),
        }
    }

    /// The checkpoint of `partition`, if one was saved.
    pub async fn load(&mut self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        let loaded = self
            .store
            .load_with(partition, ctr_models::snapshot::decode::<Checkpoint>)
            .await?;
        Ok(loaded.map(|(ckpt, _)| ckpt))
    }

    /// Writes `ckpt` unless a newer one is stored; returns whether it was written.
    pub async fn save(
        &mut self,
        partition: i32,
        ckpt: &Checkpoint<&PartitionJoin>,
    ) -> Result<bool, CheckpointError> {
        let body = ctr_models::snapshot::encode(ckpt);
        let fence = [
            ckpt.serves_next.unwrap_or(-1),
            ckpt.clicks_next.unwrap_or(-1),
        ];
        Ok(self
            .store
            .save(partition, &fence, &body, None, ctr_runtime::wall_ms())
            .await?
            .is_some())
    }
}

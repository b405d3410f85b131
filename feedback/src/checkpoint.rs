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

use ctr_models::snapshot::{self, SnapshotError};
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

/// The format version of join checkpoints this build writes, in the project's snapshot
/// container (`ctr_models::snapshot`). 3 added the partition's first event time, last in the
/// body; 2 (the number of the models' format then, which the joiner used until it numbered its
/// own) is read by appending it as absent.
pub const FORMAT_VERSION: u16 = 3;

impl Checkpoint {
    /// Decodes a checkpoint of this format or the one before it.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        match snapshot::open(bytes)? {
            (FORMAT_VERSION, body) => snapshot::decode_body(body),
            (2, body) => {
                // The one field version 3 added is the body's last, an `Option`: postcard
                // writes `None` as a single 0 byte.
                let mut body = body.to_vec();
                body.push(0);
                snapshot::decode_body(&body)
            }
            (found, _) => Err(SnapshotError::UnsupportedVersion {
                found,
                supported: FORMAT_VERSION,
            }),
        }
    }
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
        let loaded = self.store.load_with(partition, Checkpoint::decode).await?;
        Ok(loaded.map(|(ckpt, _)| ckpt))
    }

    /// Writes `ckpt` unless a newer one is stored; returns whether it was written.
    pub async fn save(
        &mut self,
        partition: i32,
        ckpt: &Checkpoint<&PartitionJoin>,
    ) -> Result<bool, CheckpointError> {
        let body = snapshot::encode_version(ckpt, FORMAT_VERSION);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::tests::{click, serve};
    use crate::join::{Emit, JoinConfig};

    fn state() -> PartitionJoin {
        let mut join = PartitionJoin::new(JoinConfig::default(), 1_000);
        let mut out: Vec<Emit> = Vec::new();
        join.on_serve(serve(7, 50_000, &["a"]), 2_000, &mut out);
        join.on_click(click(1, 7, "a", 50_300), 2_100, &mut out);
        join
    }

    #[test]
    fn a_checkpoint_round_trips_and_one_of_version_2_still_decodes() {
        let join = state();
        let ckpt = Checkpoint {
            serves_next: Some(1),
            clicks_next: Some(1),
            join: &join,
        };
        let bytes = snapshot::encode_version(&ckpt, FORMAT_VERSION);
        let back = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(snapshot::encode_version(&back, FORMAT_VERSION), bytes);

        // Version 2's body: the same without the first event's time (`Some(50_000)`, last).
        let body = snapshot::encode_body(&ckpt);
        let added = snapshot::encode_body(&Some(50_000i64));
        assert!(body.ends_with(&added));
        let old = snapshot::frame(&body[..body.len() - added.len()], 2);
        let mut restored = Checkpoint::decode(&old).unwrap().join;
        // Restored and resumed, it counts the newest event seen as the first (it was the
        // serve at 50,000, the same here).
        restored.resume(3_000);
        let mut resumed = Checkpoint::decode(&bytes).unwrap().join;
        resumed.resume(3_000);
        assert_eq!(
            snapshot::encode_body(&restored),
            snapshot::encode_body(&resumed)
        );

        assert!(matches!(
            Checkpoint::decode(&snapshot::frame(&body, 4)),
            Err(SnapshotError::UnsupportedVersion {
                found: 4,
                supported: 3
            })
        ));
    }
}

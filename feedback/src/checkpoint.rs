//! Durable checkpoints of the join state, with the input offsets they reflect.
//!
//! Where: Redis (the stack's durable store: append-only file, fsync every second), one key per
//! (group, serves topic, partition): `<prefix>feedback:ckpt:<group>:<serves topic>:<partition>`,
//! a hash with `serves` and `clicks` (the next offsets to read) and `state` (the
//! [`PartitionJoin`] in the project's snapshot container, `ctr_models::snapshot`). Redis rather
//! than a local file because a partition may move to another joiner process on another host;
//! rather than a Kafka topic because the local broker keeps no compaction and a lookup by key
//! must not scan a topic.
//!
//! The protocol (issue #4): every label emitted from the state is acknowledged by the broker
//! *before* the checkpoint that covers it is written, so a crash at any point loses nothing:
//! the restarted joiner restores the last checkpoint and replays both topics from its offsets,
//! re-emitting some labels with the same deterministic IDs, which the scorer drops.
//!
//! Writes are fenced: a checkpoint whose offsets are behind the stored ones (a joiner that lost
//! the partition in a rebalance and has not noticed yet) is not written.

use redis::Script;
use redis::aio::ConnectionManager;
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

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "checkpoint {key} is unreadable ({reason}); refusing to start from scratch, which could lose labels: inspect or delete the key"
    )]
    Corrupt { key: String, reason: String },
}

const SAVE_LUA: &str = r#"
-- KEYS[1] checkpoint key; ARGV: serves_next, clicks_next (-1 = none), state bytes.
local old_s = tonumber(redis.call('HGET', KEYS[1], 'serves') or '-1')
local old_c = tonumber(redis.call('HGET', KEYS[1], 'clicks') or '-1')
local s, c = tonumber(ARGV[1]), tonumber(ARGV[2])
if s < old_s or c < old_c then return 0 end
redis.call('HSET', KEYS[1], 'serves', s, 'clicks', c, 'state', ARGV[3])
return 1
"#;

/// Reads and writes checkpoints of one joiner group.
pub struct CheckpointStore {
    conn: ConnectionManager,
    key_prefix: String,
    save: Script,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl CheckpointStore {
    pub fn new(
        conn: ConnectionManager,
        redis_prefix: &str,
        group: &str,
        serves_topic: &str,
    ) -> Self {
        Self {
            conn,
            key_prefix: format!("{redis_prefix}feedback:ckpt:{group}:{serves_topic}:"),
            save: Script::new(SAVE_LUA),
        }
    }

    fn key(&self, partition: i32) -> String {
        format!("{}{partition}", self.key_prefix)
    }

    pub async fn load(&mut self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        let key = self.key(partition);
        let state: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&key)
            .arg("state")
            .query_async(&mut self.conn)
            .await?;
        let Some(bytes) = state else { return Ok(None) };
        ctr_models::snapshot::decode(&bytes)
            .map(Some)
            .map_err(|e| CheckpointError::Corrupt {
                key,
                reason: e.to_string(),
            })
    }

    /// Writes `ckpt` unless a newer one is stored; returns whether it was written.
    pub async fn save(
        &mut self,
        partition: i32,
        ckpt: &Checkpoint<&PartitionJoin>,
    ) -> Result<bool, CheckpointError> {
        let bytes = ctr_models::snapshot::encode(ckpt);
        let written: i32 = self
            .save
            .key(self.key(partition))
            .arg(ckpt.serves_next.unwrap_or(-1))
            .arg(ckpt.clicks_next.unwrap_or(-1))
            .arg(bytes)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(written == 1)
    }
}

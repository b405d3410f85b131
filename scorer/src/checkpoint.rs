//! Durable checkpoints of each partition's state ([`PartitionState`]: models, dedupe memory,
//! next offset).
//!
//! Where: Redis, key `<prefix>scorer:ckpt:<topic>:<partition>`, a hash with `next` (the next
//! offset to read) and `state` (the state in the project's snapshot container: magic, version,
//! length, checksum). Redis because it is already the scorer's durable store (append-only file,
//! fsync every second), because a partition may move to a scorer on another host (a local file
//! would not follow it), and because the partition's applied offset (`<prefix>offset:...`)
//! lives there too.
//!
//! Order of effects, which makes a hand-over exact:
//! 1. a batch's totals and estimates are applied to Redis, fenced by offset
//!    ([`crate::publish`]);
//! 2. only then is a checkpoint written, so its `next` never runs ahead of what Redis holds;
//! 3. only then is `next` committed to Kafka.
//!
//! A new owner restores the checkpoint and replays from `next`: the models relearn what came
//! after it, and the Redis fence skips the totals already applied. Writes are fenced too: a
//! checkpoint behind the stored one (from an owner that lost the partition and has not noticed)
//! is not written.
//!
//! A checkpoint also trims the partition's model stream (the deltas replicas follow,
//! [`crate::publish`]) to the entries after the previous checkpoint, so the stream holds at
//! most two checkpoint intervals of deltas, and a replica that restores the latest checkpoint
//! finds every delta after it.

use redis::Script;
use redis::aio::ConnectionManager;

use crate::state::PartitionState;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "checkpoint {key} is unreadable ({reason}); refusing to start the partition from scratch: inspect or delete the key"
    )]
    Corrupt { key: String, reason: String },
}

const SAVE_LUA: &str = r#"
-- KEYS[1] checkpoint key, KEYS[2] the partition's model stream; ARGV[1] next offset,
-- ARGV[2] state bytes, ARGV[3] the owner's wall clock (Unix ms).
local old = tonumber(redis.call('HGET', KEYS[1], 'next') or '-1')
if tonumber(ARGV[1]) < old then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[1], 'state', ARGV[2], 't', ARGV[3])
-- Stream entries below ID `old` end before the previous checkpoint: no replica that restores
-- this checkpoint or follows from the previous one needs them.
if old > 0 then redis.call('XTRIM', KEYS[2], 'MINID', old) end
return 1
"#;

/// Reads and writes the checkpoints of one topic's partitions.
pub struct CheckpointStore {
    conn: ConnectionManager,
    key_prefix: String,
    redis_prefix: String,
    topic: String,
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
    pub fn new(conn: ConnectionManager, redis_prefix: &str, topic: &str) -> Self {
        Self {
            conn,
            key_prefix: format!("{redis_prefix}scorer:ckpt:{topic}:"),
            redis_prefix: redis_prefix.to_string(),
            topic: topic.to_string(),
            save: Script::new(SAVE_LUA),
        }
    }

    pub fn key(&self, partition: i32) -> String {
        format!("{}{partition}", self.key_prefix)
    }

    pub async fn load(
        &mut self,
        partition: i32,
    ) -> Result<Option<PartitionState>, CheckpointError> {
        Ok(self.load_saved(partition).await?.map(|(state, _)| state))
    }

    /// [`CheckpointStore::load`], with the owner's wall clock when it was saved (Unix ms;
    /// `None` for a checkpoint written before the time was recorded).
    pub async fn load_saved(
        &mut self,
        partition: i32,
    ) -> Result<Option<(PartitionState, Option<i64>)>, CheckpointError> {
        let key = self.key(partition);
        let (state, saved): (Option<Vec<u8>>, Option<i64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("state")
            .arg("t")
            .query_async(&mut self.conn)
            .await?;
        let Some(bytes) = state else { return Ok(None) };
        PartitionState::restore(&bytes)
            .map(|st| Some((st, saved)))
            .map_err(|e| CheckpointError::Corrupt {
                key,
                reason: e.to_string(),
            })
    }

    /// Writes `state` unless a newer checkpoint is stored; returns whether it was written and
    /// the snapshot's size in bytes.
    pub async fn save(
        &mut self,
        partition: i32,
        state: &PartitionState,
    ) -> Result<(bool, usize), CheckpointError> {
        let bytes = state.snapshot();
        let written: i32 = self
            .save
            .key(self.key(partition))
            .key(crate::publish::model_stream_key(
                &self.redis_prefix,
                &self.topic,
                partition,
            ))
            .arg(state.next_offset.unwrap_or(-1))
            .arg(&bytes)
            .arg(crate::wall_ms())
            .invoke_async(&mut self.conn)
            .await?;
        Ok((written == 1, bytes.len()))
    }
}

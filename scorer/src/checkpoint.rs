//! Durable checkpoints of each partition's state ([`PartitionState`]: models, dedupe memory,
//! next offset).
//!
//! Where: Redis, key `<prefix>scorer:ckpt:{<topic>:<partition>}`, a hash with `next` (the next
//! offset to read), `state` (a whole state in the project's snapshot container: magic,
//! version, length, checksum) and `t` (the owner's wall clock when written), kept by the
//! runtime's fenced store (`ctr_runtime::redis::FencedStore`). A state over 8 MiB is not in
//! `state` but in chunks `<key>:<gen>:<i>` (`gen` and `chunks` fields), staged and then
//! committed by the same fenced script. Redis because it is already the scorer's durable store
//! (append-only file, fsync every second), because a partition may move to a scorer on another
//! host (a local file would not follow it), and because the partition's applied offset
//! (`<prefix>offset:...`) lives there too.
//!
//! A checkpoint is a chain ([`crate::state`]'s `increment` module): the whole state, then
//! increments, each what changed since the checkpoint before it, in the hash's fields
//! `inc:<i>` under `chain` and `links`. A save appends an increment onto the chain this state
//! was restored from or last saved as; it saves the whole state when there is none, when the
//! chain is due for compaction ([`Compaction`]), and when the append is refused because
//! another owner wrote since (the chain or its link count is not the one the increment was
//! computed from). A load restores the whole state and applies the increments.
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

use ctr_runtime::Policy;
pub use ctr_runtime::redis::CheckpointError;
use ctr_runtime::redis::{Appended, FencedStore, RedisConn, run_script};
use ctr_schemas::contract::keys;
use redis::Script;

use crate::state::{Compaction, PartitionState};

const ADOPT_LUA: &str = r#"
-- KEYS[1..3]: the untagged names; KEYS[4..6]: the tagged ones, in the same order.
local moved = 0
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('EXISTS', KEYS[i + 3]) == 0 then
    redis.call('RENAME', KEYS[i], KEYS[i + 3])
    moved = moved + 1
  end
end
return moved
"#;

/// Reads and writes the checkpoints of one topic's partitions (the runtime's fenced store,
/// fenced by `next`; each save trims the partition's model stream in the same script).
#[derive(Debug)]
pub struct CheckpointStore {
    store: FencedStore,
    conn: RedisConn,
    policy: Policy,
    adopt: Script,
    redis_prefix: String,
    topic: String,
    compaction: Compaction,
}

impl CheckpointStore {
    /// A store of the checkpoints of `topic`'s partitions under `redis_prefix`, chained as
    /// [`Compaction::DEFAULT`] says.
    pub fn new(conn: RedisConn, policy: Policy, redis_prefix: &str, topic: &str) -> Self {
        let (prefix, t) = (redis_prefix.to_string(), topic.to_string());
        Self {
            store: FencedStore::new(
                conn.clone(),
                policy,
                move |p| keys::scorer_checkpoint(&prefix, &t, p),
                &["next"],
            ),
            conn,
            policy,
            adopt: Script::new(ADOPT_LUA),
            redis_prefix: redis_prefix.to_string(),
            topic: topic.to_string(),
            compaction: Compaction::DEFAULT,
        }
    }

    /// The same store chaining checkpoints as `compaction` says.
    pub fn with_compaction(mut self, compaction: Compaction) -> Self {
        self.compaction = compaction;
        self
    }

    /// The same store writing bodies over `bytes` in chunks of `bytes` instead of
    /// [`ctr_runtime::redis::MAX_VALUE_BYTES`] (the checkpoint bench compares with one value).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.store = self.store.with_chunk_bytes(bytes);
        self
    }

    /// The Redis key of `partition`'s checkpoint.
    pub fn key(&self, partition: i32) -> String {
        self.store.key(partition)
    }

    /// The checkpoint of `partition`, if one was saved.
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
        self.adopt_untagged(partition).await?;
        let Some(saved) = self.store.load(partition).await? else {
            return Ok(None);
        };
        let mut state =
            PartitionState::restore_chain(&saved.body, &saved.increments).map_err(|e| {
                CheckpointError::Corrupt {
                    key: self.key(partition),
                    reason: e.to_string(),
                }
            })?;
        if let Some(chain) = saved.chain {
            let linked = saved.increments.iter().map(Vec::len).sum();
            state.based(chain, saved.body.len(), linked);
        }
        Ok(Some((state, saved.saved_ms)))
    }

    /// On a single Redis, renames the partition's checkpoint, write fence and model stream
    /// from their names before the key layout had hash tags, where the tagged ones do not
    /// exist yet: a scorer upgraded over a running deployment resumes where the old one left
    /// off. (A cluster never held the old names: the services could not use one before.)
    async fn adopt_untagged(&self, partition: i32) -> Result<(), CheckpointError> {
        if self.conn.is_cluster() {
            return Ok(());
        }
        let old = keys::untagged_partition_keys(&self.redis_prefix, &self.topic, partition);
        let new = keys::partition_keys(&self.redis_prefix, &self.topic, partition);
        let mut invocation = self.adopt.prepare_invoke();
        for key in old.iter().chain(&new) {
            invocation.key(key);
        }
        let moved: i64 = run_script(
            &self.policy,
            &self.conn,
            &format!("renaming partition {partition}'s keys to the tagged layout"),
            &invocation,
        )
        .await?;
        if moved > 0 {
            tracing::info!(
                partition,
                moved,
                "adopted the partition's keys from the untagged layout"
            );
        }
        Ok(())
    }

    /// Writes `state` unless a newer checkpoint is stored: as an increment on the chain it was
    /// restored from or last saved as, or whole when there is none, when the chain is due for
    /// compaction, when another writer extended or replaced the chain since, or when the
    /// increment is over the largest value the store writes ([`crate::state::Compaction`],
    /// `FencedStore::append`). Returns what was written (`None`: refused).
    pub async fn save(
        &mut self,
        partition: i32,
        state: &mut PartitionState,
    ) -> Result<Option<Saved>, CheckpointError> {
        let stream = keys::model_stream(&self.redis_prefix, &self.topic, partition);
        let fence = [state.next_offset.unwrap_or(-1)];
        if let Some(prepared) = state.increment(self.compaction) {
            let chain = state.chain().expect("an increment extends a chain").clone();
            let appended = self
                .store
                .append(
                    partition,
                    &fence,
                    &chain,
                    &prepared.body,
                    Some(&stream),
                    ctr_runtime::wall_ms(),
                )
                .await?;
            match appended {
                Appended::Linked(chain) => {
                    let saved = Saved {
                        kind: Kind::Increment,
                        bytes: prepared.body.len(),
                        bounded_bytes: prepared.bounded_bytes,
                    };
                    state.linked(prepared, chain);
                    return Ok(Some(saved));
                }
                Appended::Refused => return Ok(None),
                Appended::Diverged => {}
            }
        }
        let bytes = state.snapshot();
        let chain = self
            .store
            .save(
                partition,
                &fence,
                &bytes,
                Some(&stream),
                ctr_runtime::wall_ms(),
            )
            .await?;
        Ok(chain.map(|chain| {
            state.based(chain, bytes.len(), 0);
            Saved {
                kind: Kind::Whole,
                bytes: bytes.len(),
                bounded_bytes: 0,
            }
        }))
    }
}

/// What [`CheckpointStore::save`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// A whole state or an increment.
    pub kind: Kind,
    /// Its size.
    pub bytes: usize,
    /// Of an increment, the bytes of its patch of the bounded parts (metrics, filters, held
    /// clicks: [`crate::state::Prepared`]); 0 for a whole state.
    pub bounded_bytes: usize,
}

/// The kinds of checkpoint written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole state: a chain's base.
    Whole,
    /// The change since the chain's last link.
    Increment,
}

impl Kind {
    /// Its label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Whole => "whole",
            Kind::Increment => "increment",
        }
    }
}

//! The Redis side: key layout, and the fenced apply of one partition's batch.
//!
//! Key layout (prefix `P`, default `ctr:`; IDs and context values never contain `:`, `|` or
//! `=`, which the event contract enforces; braces are Redis Cluster hash tags, part of the
//! name on a single Redis too):
//!
//! | key | type | fields |
//! |-----|------|--------|
//! | `P` `ad:{` ad_id `}` | hash | `imps`, `clicks`: exact totals over distinct labels (a late click adds a click); `pctr`: the ad's rate over all contexts (the serving variant's count model at the ad level; an FTRL-only variant's prediction with no context fields); `src`; `model`; `ver` |
//! | `P` `adctx:{` ad_id `}:` context_key | hash | the same for the ad in one full context: the serving variant's prediction, written when the key sees an impression |
//! | `P` `offset:{` topic `:` partition `}` | string | last Kafka offset applied to Redis |
//! | `P` `scorer:ckpt:{` topic `:` partition `}` | hash | the partition's checkpoint (see [`crate::checkpoint`]) |
//! | `P` `model:{` topic `:` partition `}` | stream | the serving variant's deltas, for replicas (below) |
//!
//! `pctr` is calibrated and position-normalized: the click probability at the top slot (a
//! frontend ranks by `bid × pctr`; the position effect is common to all candidates of a slot).
//! `src` is how the model obtained it: `exact` (this ad seen in this full context),
//! `backed_off` (the ad's other evidence) or `prior` (campaign or global rate). `model` is the
//! serving variant's name and `ver` the partition offset the estimate reflects; the model
//! version reported by the API is `model@ver`. `context_key` is [`ctr_schemas::Context::key`],
//! e.g. `device=mobile|geo=US|query_category=travel`. A frontend reads with
//! `HGET ctr:adctx:{ad-00017}:device=mobile|geo=US|query_category=travel pctr`.
//!
//! Exactly-once effect. The partition owner keeps the exact totals in its state
//! ([`crate::state::PartitionState`]), which is checkpointed and replayed like the models, so a
//! write carries *absolute* values: the state of its keys as of the batch's last offset. A
//! batch is written by one Lua script, which Redis runs atomically: if the batch's last offset
//! is above the partition's stored offset, it sets every changed key and stores the new
//! offset; otherwise it changes nothing. So a replayed or older write never overwrites a newer
//! one (a new owner replaying from a checkpoint, or a scorer that lost the partition and has
//! not noticed yet), and nothing is counted twice: replaying a record recomputes the same
//! totals, it does not add to them. An ad belongs to one partition (labels are keyed by ad),
//! so the partition offset orders every write of its keys. Kafka's committed offset is only
//! where reading resumes.
//!
//! A key's `imps`, `clicks` and `ver` are also where its totals live once it has retired from
//! the owner's hot state: a record of the key that comes back reads them, and counts on from
//! them ([`crate::retention`]).
//!
//! Why every key ends right: the batches that are written cover the partition's offsets
//! without a gap (an owner starts from a checkpoint at or below the stored offset, and only
//! skips batches that end at or below it), and a key's value in a written batch is its value
//! after its last change up to that batch's end.
//!
//! The model stream. The same script appends the batch's [`crate::serving::PartitionDelta`] of
//! the serving variant to the partition's stream, with entry ID `last + 1` (stream IDs must
//! be above 0-0) and fields `prev` (the fence before this batch), `last`, `m` (the variant),
//! `t` (the owner's wall clock, ms) and `d` (the delta in the project's snapshot container).
//! So the stream is fenced exactly as the estimates are: an entry is written only with the
//! batch it describes, IDs increase, and consecutive entries chain (`prev` of one is `last` of
//! the one before). Replicas restore a checkpoint and read the stream from its offset
//! ([`crate::replica`]); each checkpoint trims the entries the checkpoint before it covered
//! ([`crate::checkpoint`]). The fence and the stream belong together: deleting the offset key
//! but not the stream makes the next batch's entry ID too low, and the script then refuses the
//! batch (an error the worker reports) rather than write estimates replicas would not see.
//!
//! On a single Redis the script names the estimate keys in its arguments. On a Redis Cluster
//! a batch's keys are in many slots (an ad's keys share one; the fence and the stream share
//! their partition's), so the batch is written in two steps: one script per slot writes each
//! estimate key only if its own `ver` is below the batch's last offset, then the script above,
//! with no estimate keys, moves the fence and appends the delta. ARCHITECTURE.md (decisions)
//! says why this is as exact as the single script.

use std::collections::HashMap;

use ctr_models::Level;
use ctr_runtime::redis::{RedisConn, slot_of};
use ctr_runtime::{DependencyError, Policy};
use ctr_schemas::contract::keys;
use redis::cluster_routing::Slot;
use redis::{Script, ScriptInvocation};

use crate::state::Total;

const APPLY_LUA: &str = r#"
-- KEYS[1]: offset key of the partition; KEYS[2]: its model stream. ARGV[1]: the batch's last
-- offset; ARGV[2]: model name; ARGV[3]: the encoded model delta; ARGV[4]: the owner's wall
-- clock, Unix ms. Then 5 per key: key, pctr, source, impressions, clicks.
local applied = tonumber(redis.call('GET', KEYS[1]) or '-1')
local last = tonumber(ARGV[1])
if last <= applied then return 0 end
-- First, so that a refused entry (a stream whose newest ID is not below this batch's: see
-- the module docs) fails the script before anything is written.
redis.call('XADD', KEYS[2], (last + 1) .. '-0', 'prev', applied, 'last', last, 'm', ARGV[2],
           't', ARGV[4], 'd', ARGV[3])
for i = 5, #ARGV, 5 do
  redis.call('HSET', ARGV[i], 'pctr', ARGV[i + 1], 'src', ARGV[i + 2], 'imps', ARGV[i + 3],
             'clicks', ARGV[i + 4], 'model', ARGV[2], 'ver', last)
end
redis.call('SET', KEYS[1], last)
return 1
"#;

const VALUES_LUA: &str = r#"
-- A Redis Cluster's share of a batch in one slot. KEYS: the slot's estimate keys. ARGV[1]:
-- the batch's last offset; ARGV[2]: model name; then 4 per key: pctr, source, impressions,
-- clicks. Each key is fenced by its own `ver`: a value as of an offset at or below the one
-- it holds is not written.
local last = tonumber(ARGV[1])
local written = 0
for i = 1, #KEYS do
  local ver = tonumber(redis.call('HGET', KEYS[i], 'ver') or '-1')
  if ver < last then
    local a = 3 + (i - 1) * 4
    redis.call('HSET', KEYS[i], 'pctr', ARGV[a], 'src', ARGV[a + 1], 'imps', ARGV[a + 2],
               'clicks', ARGV[a + 3], 'model', ARGV[2], 'ver', last)
    written = written + 1
  end
end
return written
"#;

/// The current estimate and totals of one key.
#[derive(Debug, Clone)]
pub struct Published {
    /// The Redis key.
    pub key: String,
    /// The serving variant's calibrated estimate at the top slot.
    pub pctr: f64,
    /// How the model obtained it (the `src` field).
    pub level: Level,
    /// Exact totals of the key.
    pub total: Total,
}

/// The `src` field for a model level.
pub fn source_name(level: Level) -> &'static str {
    match level {
        Level::Exact => "exact",
        Level::BackedOff => "backed_off",
        Level::Prior => "prior",
    }
}

/// Adds an estimate's values to a script's arguments: pctr, source, impressions, clicks (the
/// order both scripts read them in).
fn value_args(inv: &mut ScriptInvocation<'_>, e: &Published) {
    inv.arg(format!("{:.8}", e.pctr))
        .arg(source_name(e.level))
        .arg(e.total.imps)
        .arg(e.total.clicks);
}

/// Writes batches to Redis.
#[derive(Clone)]
pub struct Publisher {
    conn: RedisConn,
    policy: Policy,
    script: Script,
    values_script: Script,
    prefix: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Publisher {
    /// A publisher under `prefix` that calls Redis under `policy`.
    pub fn new(conn: RedisConn, policy: Policy, prefix: &str) -> Self {
        Self {
            conn,
            policy,
            script: Script::new(APPLY_LUA),
            values_script: Script::new(VALUES_LUA),
            prefix: prefix.to_string(),
        }
    }

    /// Writes one partition's batch (everything up to `last_offset`) atomically, with the
    /// serving variant's `delta` for replicas, unless a write at or beyond `last_offset`
    /// happened already; returns whether it was written. Follows the dependency policy: the
    /// write is fenced, so a retry of one that did land changes nothing (and says so).
    pub async fn apply(
        &mut self,
        topic: &str,
        partition: i32,
        last_offset: i64,
        estimates: &[Published],
        model: &str,
        delta: &[u8],
    ) -> Result<bool, DependencyError<redis::RedisError>> {
        if self.conn.is_cluster() {
            self.apply_values_per_slot(partition, last_offset, estimates, model)
                .await?;
        }
        let mut inv = self
            .script
            .key(keys::offset_fence(&self.prefix, topic, partition));
        inv.key(keys::model_stream(&self.prefix, topic, partition));
        inv.arg(last_offset)
            .arg(model)
            .arg(delta)
            .arg(ctr_runtime::wall_ms());
        // On a cluster the values went first, slot by slot; this script then moves the
        // partition's fence and appends to its stream.
        let in_script = if self.conn.is_cluster() {
            &[][..]
        } else {
            estimates
        };
        for e in in_script {
            inv.arg(&e.key);
            value_args(&mut inv, e);
        }
        let written: i32 = ctr_runtime::redis::run_script(
            &self.policy,
            &self.conn,
            &format!("publishing partition {partition}"),
            &inv,
        )
        .await?;
        Ok(written == 1)
    }

    /// The totals of one estimate key as last published, with the partition offset they are
    /// exact as of (`ver`), for a key coming back into a partition's hot state
    /// ([`crate::retention`]); `None` if Redis has no totals under it. Follows the dependency
    /// policy.
    pub async fn read_total(
        &self,
        key: &str,
    ) -> Result<Option<(Total, i64)>, DependencyError<redis::RedisError>> {
        let (imps, clicks, ver): (Option<u64>, Option<u64>, Option<i64>) = self
            .policy
            .retry(&format!("reading the totals at {key}"), || {
                let mut c = self.conn.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg("imps")
                        .arg("clicks")
                        .arg("ver")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(match (imps, clicks, ver) {
            (Some(imps), Some(clicks), Some(ver)) => Some((Total { imps, clicks }, ver)),
            _ => None,
        })
    }

    /// On a Redis Cluster: writes the batch's estimates, one script per slot (an ad's keys
    /// share one), all slots at once, each key only if its `ver` is below `last_offset`.
    async fn apply_values_per_slot(
        &self,
        partition: i32,
        last_offset: i64,
        estimates: &[Published],
        model: &str,
    ) -> Result<(), DependencyError<redis::RedisError>> {
        let mut slots: HashMap<Slot, Vec<&Published>> = HashMap::new();
        for e in estimates {
            slots.entry(slot_of(&e.key)).or_default().push(e);
        }
        let what = format!("publishing partition {partition}'s estimates");
        let writes = slots.into_values().map(|group| {
            let mut inv = self.values_script.prepare_invoke();
            inv.arg(last_offset).arg(model);
            for e in group {
                inv.key(&e.key);
                value_args(&mut inv, e);
            }
            let what = &what;
            async move {
                ctr_runtime::redis::run_script::<i64>(&self.policy, &self.conn, what, &inv).await
            }
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
    }
}

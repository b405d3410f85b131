//! The Redis side: key layout, and the atomic apply of one partition's batch.
//!
//! Key layout (prefix `P`, default `ctr:`; IDs and context values never contain `:`, `|` or
//! `=`, which the event contract enforces):
//!
//! | key | type | fields |
//! |-----|------|--------|
//! | `P` `ad:` ad_id | hash | `imps`, `clicks`: exact totals of distinct labels; `pctr`: the serving model's estimate over all contexts; `src`; `model`; `ver` |
//! | `P` `adctx:` ad_id `:` context_key | hash | the same for the ad in one full context |
//! | `P` `offset:` topic `:` partition | string | last Kafka offset applied to Redis |
//! | `P` `scorer:ckpt:` topic `:` partition | hash | the partition's checkpoint (see [`crate::checkpoint`]) |
//!
//! `pctr` is calibrated and position-normalized: the click probability at the top slot (a
//! frontend ranks by `bid × pctr`; the position effect is common to all candidates of a slot).
//! `src` is how the model obtained it: `exact` (this ad seen in this full context),
//! `backed_off` (the ad's other evidence) or `prior` (campaign or global rate). `model` is the
//! serving variant's name and `ver` the partition offset the estimate reflects; the model
//! version reported by the API is `model@ver`. `context_key` is [`ctr_schemas::Context::key`],
//! e.g. `device=mobile|geo=US|query_category=travel`. A frontend reads with
//! `HGET ctr:adctx:ad-00017:device=mobile|geo=US|query_category=travel pctr`.
//!
//! Exactly-once effect: a batch is applied by one Lua script, which Redis runs atomically. The
//! script skips every record whose offset is not above the partition's stored offset, adds the
//! rest to the totals, stores the new offset, and writes the batch's estimates, all in the same
//! step. A record redelivered after a crash or a rebalance (or applied concurrently by a
//! scorer that lost the partition but has not noticed yet) therefore changes nothing, and an
//! estimate is only written with an offset newer than every earlier write of its partition:
//! a replayed or older write never overwrites a newer one. An ad belongs to one partition
//! (labels are keyed by ad), so the partition offset orders every write of its keys. Kafka's
//! committed offset is only where reading resumes.
//!
//! The script names keys in its arguments rather than `KEYS`, so it needs a single Redis
//! (or a cluster with the keys of a partition in one slot); the stack runs a single Redis.

use ctr_models::Level;
use redis::Script;
use redis::aio::ConnectionManager;

const APPLY_LUA: &str = r#"
-- KEYS[1]: offset key of the partition. ARGV[1]: number of records n; ARGV[2]: model name.
-- Then 5 per record: offset, ad key, ad-in-context key, impressions, clicks (an empty ad key
-- marks a record that changes no total but whose offset counts as applied). Then 3 per
-- estimate: key, pctr, source.
local applied = tonumber(redis.call('GET', KEYS[1]) or '-1')
local n = tonumber(ARGV[1])
local last, new = applied, 0
for i = 3, 2 + 5 * n, 5 do
  local off = tonumber(ARGV[i])
  if off > applied then
    if ARGV[i + 1] ~= '' then
      for _, key in ipairs({ARGV[i + 1], ARGV[i + 2]}) do
        redis.call('HINCRBY', key, 'imps', ARGV[i + 3])
        redis.call('HINCRBY', key, 'clicks', ARGV[i + 4])
      end
      new = new + 1
    end
    if off > last then last = off end
  end
end
if last > applied then
  redis.call('SET', KEYS[1], last)
  for i = 3 + 5 * n, #ARGV, 3 do
    redis.call('HSET', ARGV[i], 'pctr', ARGV[i + 1], 'src', ARGV[i + 2], 'model', ARGV[2], 'ver', last)
  end
end
return new
"#;

/// One consumed record, reduced to what the apply needs: its offset and, unless it changes no
/// total (poison, a duplicate), the two keys it counts towards and the amounts.
#[derive(Debug, Clone)]
pub struct Applied {
    pub offset: i64,
    pub counted: Option<Counted>,
}

/// Amounts a record adds to an ad's totals and to the ad-in-context totals.
#[derive(Debug, Clone)]
pub struct Counted {
    pub ad_key: String,
    pub ad_context_key: String,
    pub imps: u8,
    pub clicks: u8,
}

/// A fresh estimate for one key.
#[derive(Debug, Clone)]
pub struct Published {
    pub key: String,
    pub pctr: f64,
    pub level: Level,
}

/// The `src` field for a model level.
pub fn source_name(level: Level) -> &'static str {
    match level {
        Level::Exact => "exact",
        Level::BackedOff => "backed_off",
        Level::Prior => "prior",
    }
}

/// Writes batches to Redis.
#[derive(Clone)]
pub struct Publisher {
    conn: ConnectionManager,
    script: Script,
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
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            script: Script::new(APPLY_LUA),
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn offset_key(&self, topic: &str, partition: i32) -> String {
        format!("{}offset:{topic}:{partition}", self.prefix)
    }

    /// Applies one partition's records and estimates atomically; returns how many records
    /// were new.
    pub async fn apply(
        &mut self,
        topic: &str,
        partition: i32,
        records: &[Applied],
        estimates: &[Published],
        model: &str,
    ) -> redis::RedisResult<u64> {
        let mut inv = self.script.key(self.offset_key(topic, partition));
        inv.arg(records.len()).arg(model);
        for r in records {
            inv.arg(r.offset);
            match &r.counted {
                Some(c) => inv
                    .arg(&c.ad_key)
                    .arg(&c.ad_context_key)
                    .arg(c.imps)
                    .arg(c.clicks),
                None => inv.arg("").arg("").arg(0).arg(0),
            };
        }
        for e in estimates {
            inv.arg(&e.key)
                .arg(format!("{:.8}", e.pctr))
                .arg(source_name(e.level));
        }
        inv.invoke_async(&mut self.conn).await
    }
}

/// Key of an ad's totals.
pub fn ad_key(prefix: &str, ad_id: &str) -> String {
    format!("{prefix}ad:{ad_id}")
}

/// Key of an ad in one full context.
pub fn ad_context_key(prefix: &str, ad_id: &str, context_key: &str) -> String {
    format!("{prefix}adctx:{ad_id}:{context_key}")
}

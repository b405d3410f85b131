//! The Redis side: key layout, and the atomic apply of one partition's batch.
//!
//! Key layout (prefix `P`, default `ctr:`; IDs and context values never contain `:`, `|` or
//! `=`, which the event contract enforces):
//!
//! | key | type | fields |
//! |-----|------|--------|
//! | `P` `ad:` ad_id | hash | `imps`, `clicks` (integers), `pctr` (decimal text) |
//! | `P` `adctx:` ad_id `:` context_key | hash | same, for the ad in one full context |
//! | `P` `offset:` topic `:` partition | string | last Kafka offset applied to Redis |
//!
//! `context_key` is [`ctr_schemas::Context::key`], e.g.
//! `device=mobile|geo=US|query_category=travel`. A frontend reads with
//! `HGET ctr:adctx:ad-00017:device=mobile|geo=US|query_category=travel pctr`.
//!
//! Exactly-once effect: a batch is applied by one Lua script, which Redis runs atomically. The
//! script skips every record whose offset is not above the partition's stored offset, applies
//! the rest, and stores the new offset in the same step. A record redelivered after a crash or
//! a rebalance (or applied concurrently by a scorer that lost the partition but has not noticed
//! yet) therefore changes nothing. Kafka's committed offset is only where reading resumes.

use ctr_models::BetaPrior;
use ctr_schemas::LabeledImpression;
use redis::Script;
use redis::aio::ConnectionManager;

const APPLY_LUA: &str = r#"
-- KEYS[1]: offset key of the partition. ARGV[1]: alpha, ARGV[2]: beta of the prior.
-- Then one group of 4 per record: offset, ad key, ad-in-context key, clicked (0/1). An empty
-- ad key marks a record that is skipped (poison) but whose offset still counts as applied.
local applied = tonumber(redis.call('GET', KEYS[1]) or '-1')
local a, b = tonumber(ARGV[1]), tonumber(ARGV[2])
local last, n = applied, 0
for i = 3, #ARGV, 4 do
  local off = tonumber(ARGV[i])
  if off > applied then
    if ARGV[i + 1] ~= '' then
      local clicked = tonumber(ARGV[i + 3])
      for _, key in ipairs({ARGV[i + 1], ARGV[i + 2]}) do
        local imps = redis.call('HINCRBY', key, 'imps', 1)
        local clicks = redis.call('HINCRBY', key, 'clicks', clicked)
        redis.call('HSET', key, 'pctr', string.format('%.8f', (clicks + a) / (imps + a + b)))
      end
      n = n + 1
    end
    if off > last then last = off end
  end
end
if last > applied then redis.call('SET', KEYS[1], last) end
return n
"#;

/// One consumed record, reduced to what the apply needs: its offset and, unless it was poison,
/// the two keys it counts towards and its label.
#[derive(Debug, Clone)]
pub struct Applied {
    pub offset: i64,
    pub record: Option<(String, String, bool)>,
}

/// Writes batches to Redis.
#[derive(Clone)]
pub struct Publisher {
    conn: ConnectionManager,
    script: Script,
    prefix: String,
    prior: BetaPrior,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Publisher {
    pub fn new(conn: ConnectionManager, prefix: &str, prior: BetaPrior) -> Self {
        Self {
            conn,
            script: Script::new(APPLY_LUA),
            prefix: prefix.to_string(),
            prior,
        }
    }

    pub fn offset_key(&self, topic: &str, partition: i32) -> String {
        format!("{}offset:{topic}:{partition}", self.prefix)
    }

    /// The record for a labeled impression at `offset`.
    pub fn record(&self, offset: i64, l: &LabeledImpression) -> Applied {
        let keys = (
            ad_key(&self.prefix, &l.ad_id),
            ad_context_key(&self.prefix, &l.ad_id, &l.context.key()),
        );
        Applied {
            offset,
            record: Some((keys.0, keys.1, l.clicked)),
        }
    }

    /// The record for a message at `offset` that changes no count (unusable, or a correction
    /// not applied): skipped, but its offset is consumed.
    pub fn skip(offset: i64) -> Applied {
        Applied {
            offset,
            record: None,
        }
    }

    /// Applies one partition's records atomically; returns how many were new.
    pub async fn apply(
        &mut self,
        topic: &str,
        partition: i32,
        records: &[Applied],
    ) -> redis::RedisResult<u64> {
        let mut inv = self.script.key(self.offset_key(topic, partition));
        inv.arg(self.prior.alpha()).arg(self.prior.beta());
        for r in records {
            inv.arg(r.offset);
            match &r.record {
                Some((ad_key, adctx_key, clicked)) => {
                    inv.arg(ad_key).arg(adctx_key).arg(u8::from(*clicked))
                }
                None => inv.arg("").arg("").arg(0),
            };
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

//! Redis for a service: the connection (ACL user and TLS from the URL, checked at start; a
//! single server or a Redis Cluster), and the fenced checkpoint store every service keeps its
//! partition state in.
//!
//! A single Redis is reached through redis-rs `ConnectionManager`s (multiplexed,
//! reconnecting), a cluster through its `ClusterConnection` (one multiplexed connection per
//! node, routed by key slot, following the cluster's redirections); both are a [`RedisConn`].
//! Their response timeout is the [`Policy`]'s call deadline, so a frozen Redis is a timed-out
//! call; calls that must survive an outage go through [`Policy::retry`].
//!
//! On a cluster every command and script must name keys of one slot: the key layout's hash
//! tags (`ctr_schemas::contract::keys`) keep what is written together in one slot, and a
//! caller that reads keys of many slots asks per key ([`RedisConn::query_each`]).

use std::path::Path;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, FromRedisValue, Pipeline, RedisFuture, Script, ScriptInvocation, Value};

use crate::policy::{DependencyError, Policy};

/// A connection to a single Redis or to a Redis Cluster. Cheap to clone: clones share the
/// underlying multiplexed connections.
#[derive(Clone)]
pub enum RedisConn {
    /// A single Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster: commands are routed to the master of their keys' slot.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether this is a cluster: commands must name keys of one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmds` (each naming keys of one slot) and returns their answers in order: on a
    /// single Redis as one pipeline, on a cluster each on its own, all at once (a pipeline is
    /// routed as one unit, to one slot's node).
    pub async fn query_each<T: FromRedisValue>(&self, cmds: &[Cmd]) -> redis::RedisResult<Vec<T>> {
        match self {
            Self::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(&mut c.clone()).await
            }
            Self::Cluster(c) => {
                let each = cmds.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<T>(&mut c).await }
                });
                futures::future::try_join_all(each).await
            }
        }
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The cluster slot of `key` (what its hash tag, else the whole key, hashes to): keys of one
/// slot may be named by one command or script.
pub fn slot_of(key: &str) -> redis::cluster_routing::Slot {
    redis::cluster_routing::Slot::for_key(key)
}

/// Why Redis could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The Redis CA file could not be read.
    #[error("reading the Redis CA file {path}: {source}")]
    CaFile {
        /// The file named by the settings.
        path: std::path::PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// Redis refused the connection or the credentials, or did not answer at start.
    #[error("Redis at start: {0}")]
    Start(String),
    /// A call failed under the dependency policy.
    #[error(transparent)]
    Call(#[from] DependencyError<redis::RedisError>),
    /// The client could not be built from the URL.
    #[error("Redis: {0}")]
    Client(#[from] redis::RedisError),
}

/// How a service reaches its Redis. (Created once per process: its size does not matter.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Clients {
    Single(Client),
    Cluster(ClusterClient),
}

/// A Redis deployment as a service reaches it: the client and the policy for its calls.
#[derive(Debug, Clone)]
pub struct Redis {
    client: Clients,
    policy: Policy,
}

impl Redis {
    /// The client for `url` (`redis://[user:password@]host:port/`, `rediss://` for TLS,
    /// verified against `ca_file` if given, else the system's trusted roots), checked with one
    /// `PING` on a plain connection: refused credentials or an unreachable Redis are an error
    /// at start, where a reconnecting connection would retry them silently. With `cluster`,
    /// `url` names one or more of the cluster's nodes, comma-separated (the others are found
    /// from them), and the check asks the cluster for its slots.
    pub async fn connect(
        url: &str,
        ca_file: Option<&Path>,
        cluster: bool,
        policy: Policy,
    ) -> Result<Self, RedisError> {
        // rustls needs a process-wide crypto provider; a second install is refused, harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = match ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| RedisError::CaFile {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
            }
        };
        let client = if cluster {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let mut builder = ClusterClientBuilder::new(nodes)
                .connection_timeout(policy.call_timeout)
                .response_timeout(policy.call_timeout)
                .overall_response_timeout(Some(policy.call_timeout));
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            Clients::Cluster(builder.build()?)
        } else {
            Clients::Single(match certs {
                None => Client::open(url)?,
                Some(certs) => Client::build_with_tls(url, certs)?,
            })
        };
        let redis = Self { client, policy };
        let ping = async {
            let ping = redis::cmd("PING");
            match &redis.client {
                Clients::Single(c) => {
                    let mut conn = c.get_multiplexed_async_connection().await?;
                    ping.query_async::<String>(&mut conn).await
                }
                Clients::Cluster(c) => {
                    // Connecting reads the cluster's slots from the nodes named.
                    let mut conn = c.get_async_connection().await?;
                    ping.query_async::<String>(&mut conn).await
                }
            }
        };
        match tokio::time::timeout(policy.call_timeout, ping).await {
            Ok(Ok(_)) => Ok(redis),
            Ok(Err(e)) => Err(RedisError::Start(e.to_string())),
            Err(_) => Err(RedisError::Start(format!(
                "no answer to PING within {:?}",
                policy.call_timeout
            ))),
        }
    }

    /// The policy calls to this Redis follow.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// A reconnecting, multiplexed connection whose calls time out after the policy's deadline.
    pub async fn manager(&self) -> Result<RedisConn, RedisError> {
        self.manager_with_timeout(self.policy.call_timeout).await
    }

    /// A connection of its own for blocking reads (`XREAD BLOCK`): on a shared multiplexed
    /// connection they would hold up every command queued behind them. Its deadline is the
    /// policy's plus the longest block.
    pub async fn blocking_manager(&self, block: Duration) -> Result<RedisConn, RedisError> {
        self.manager_with_timeout(self.policy.call_timeout + block)
            .await
    }

    async fn manager_with_timeout(&self, timeout: Duration) -> Result<RedisConn, RedisError> {
        let connect = async {
            match &self.client {
                Clients::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_response_timeout(Some(timeout))
                        .set_connection_timeout(Some(self.policy.call_timeout));
                    client
                        .get_connection_manager_with_config(config)
                        .await
                        .map(RedisConn::Single)
                }
                Clients::Cluster(client) => {
                    let config = redis::cluster::ClusterConfig::new()
                        .set_response_timeout(timeout)
                        .set_connection_timeout(self.policy.call_timeout);
                    client
                        .get_async_connection_with_config(config)
                        .await
                        .map(RedisConn::Cluster)
                }
            }
        };
        match tokio::time::timeout(self.policy.call_timeout, connect).await {
            Ok(conn) => Ok(conn?),
            Err(_) => Err(RedisError::Start(format!(
                "no connection within {:?}",
                self.policy.call_timeout
            ))),
        }
    }
}

/// Runs a Lua script under the policy (`what` names it in errors and logs). The script must be
/// safe to repeat: a call that timed out may have run.
pub async fn run_script<T: FromRedisValue>(
    policy: &Policy,
    conn: &RedisConn,
    what: &str,
    invocation: &ScriptInvocation<'_>,
) -> Result<T, DependencyError<redis::RedisError>> {
    policy
        .retry(what, || {
            let mut c = conn.clone();
            async move { invocation.invoke_async(&mut c).await }
        })
        .await
}

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Redis failed under the dependency policy.
    #[error("Redis: {0}")]
    Redis(#[from] DependencyError<redis::RedisError>),
    /// The stored body does not decode: starting afresh would lose or double-count what it
    /// holds, so the owner refuses to.
    #[error(
        "checkpoint {key} is unreadable ({reason}); refusing to start the partition from scratch: inspect or delete the key (and its chunks, `<key>:<gen>:<i>`, or `{{<key>}}:<gen>:<i>` for a key without a hash tag, if its `gen` field names some)"
    )]
    Corrupt {
        /// The checkpoint's key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
}

const SAVE_LUA: &str = r#"
-- KEYS[1]: the checkpoint hash; KEYS[2] (if ARGV[5] is 1): a stream that follows the
-- checkpoints; then the staged chunks of the body, in order. ARGV[1]: the writer's wall
-- clock (Unix ms); ARGV[2]: the body when it is stored inline, else empty; ARGV[3]: the
-- chunks' generation, empty when inline; ARGV[4]: the number of chunks; ARGV[5]: 1 with a
-- stream; ARGV[6]: what a chunk's name starts with (`chunk_key`); ARGV[7]: the new chain's
-- id; then pairs fence field, value.
local hash = KEYS[1]
local first_chunk = tonumber(ARGV[5]) == 1 and 3 or 2
local gen = ARGV[3]
local old_gen = redis.call('HGET', hash, 'gen')
local first_old = nil
for i = 8, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', hash, ARGV[i]) or '-1')
  if first_old == nil then first_old = old end
  if tonumber(ARGV[i + 1]) < old then
    -- Refused: the staged chunks will never be read (unless this is a retry of a save that
    -- was committed, and so is the stored generation).
    if gen ~= old_gen then
      for j = first_chunk, #KEYS do redis.call('UNLINK', KEYS[j]) end
    end
    return 0
  end
end
-- A staged chunk that expired (a save slower than the staging lifetime) must not be committed.
for j = first_chunk, #KEYS do
  if redis.call('EXISTS', KEYS[j]) == 0 then return -1 end
end
local old_chunks = tonumber(redis.call('HGET', hash, 'chunks') or '0')
local fields = {'t', ARGV[1]}
if gen == '' then
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = ARGV[2]
  redis.call('HDEL', hash, 'gen', 'chunks')
else
  fields[#fields + 1] = 'gen'
  fields[#fields + 1] = gen
  fields[#fields + 1] = 'chunks'
  fields[#fields + 1] = ARGV[4]
  redis.call('HDEL', hash, 'state')
  for j = first_chunk, #KEYS do redis.call('PERSIST', KEYS[j]) end
end
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
-- A new chain starts at this body: the previous one's increments describe older states.
local old_links = tonumber(redis.call('HGET', hash, 'links') or '0')
for i = 0, old_links - 1 do redis.call('HDEL', hash, 'inc:' .. i) end
fields[#fields + 1] = 'chain'
fields[#fields + 1] = ARGV[7]
fields[#fields + 1] = 'links'
fields[#fields + 1] = 0
redis.call('HSET', hash, unpack(fields))
-- The previous generation's chunks (same slot: their names carry the hash's tag).
if old_gen and old_gen ~= gen then
  for i = 0, old_chunks - 1 do
    redis.call('UNLINK', ARGV[6] .. old_gen .. ':' .. i)
  end
end
-- Entries of the stream below the previous checkpoint's first fence value describe what that
-- checkpoint already holds: nobody who restores it, or this one, needs them.
if first_chunk == 3 and first_old and first_old > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', first_old)
end
return 1
"#;

const APPEND_LUA: &str = r#"
-- KEYS[1]: the checkpoint hash; KEYS[2] (if ARGV[5] is 1): a stream that follows the
-- checkpoints. ARGV[1]: the writer's wall clock (Unix ms); ARGV[2]: the increment; ARGV[3]:
-- the chain it extends; ARGV[4]: the links that chain has in the writer's view; ARGV[5]: 1
-- with a stream; then pairs fence field, value. Returns 1 (appended), 0 (refused: the stored
-- fence is ahead) or 2 (diverged: the stored checkpoint is not the state the increment
-- starts from).
local hash = KEYS[1]
local first_old = nil
for i = 6, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', hash, ARGV[i]) or '-1')
  if first_old == nil then first_old = old end
  if tonumber(ARGV[i + 1]) < old then return 0 end
end
local links = tonumber(ARGV[4])
local stored = tonumber(redis.call('HGET', hash, 'links') or '-1')
if redis.call('HGET', hash, 'chain') ~= ARGV[3] then return 2 end
-- A retry of an append that was committed.
if stored == links + 1 and redis.call('HGET', hash, 'inc:' .. links) == ARGV[2] then return 1 end
if stored ~= links then return 2 end
local fields = {'t', ARGV[1], 'inc:' .. links, ARGV[2], 'links', links + 1}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', hash, unpack(fields))
if tonumber(ARGV[5]) == 1 and first_old and first_old > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', first_old)
end
return 1
"#;

/// The largest single Redis value a checkpoint writes: a larger body is stored in chunks of
/// this size. Redis refuses any value over `proto-max-bulk-len` (512 MB by default), and it
/// runs a command, a script and the freeing of a value without serving anyone else: a 500 MB
/// body in one script stopped Redis for 16 s (docs/BENCHMARKS.md, "Past one box").
pub const MAX_VALUE_BYTES: usize = 8 << 20;

/// How long a staged chunk lives before its checkpoint is committed: a writer that dies
/// between staging and committing leaves nothing behind for longer.
const STAGING_TTL_MS: u64 = 10 * 60 * 1000;

/// Loads retried when the checkpoint was replaced between reading its hash and its chunks.
const LOAD_ATTEMPTS: usize = 5;

/// The key of chunk `i` of generation `generation` of the checkpoint at `key`, in `key`'s
/// Redis Cluster slot: `key:generation:i` when `key` has a hash tag, `{key}:generation:i`
/// (the whole key as the tag) when it has no brace at all. (A key with braces that do not
/// make a tag has no such name; on a cluster its chunked save fails with Redis's CROSSSLOT
/// error. The project's keys are of the first two kinds.)
pub fn chunk_key(key: &str, generation: &str, i: usize) -> String {
    format!("{}{generation}:{i}", chunk_prefix(key))
}

fn chunk_prefix(key: &str) -> String {
    if hash_tag(key).is_some() || key.contains(['{', '}']) {
        format!("{key}:")
    } else {
        format!("{{{key}}}:")
    }
}

/// The part of `key` Redis Cluster hashes when it is not the whole key: between the first `{`
/// and the first `}` after it, if not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// The fence values in the store's field order (`None`: not stored, or stored as -1).
    pub fence: Vec<Option<i64>>,
    /// The state, as its owner encoded it: the chain's base.
    pub body: Vec<u8>,
    /// The increments appended to the base since ([`FencedStore::append`]), oldest first.
    pub increments: Vec<Vec<u8>>,
    /// The chain the base and its increments form (`None`: saved before chains existed; the
    /// next save starts one).
    pub chain: Option<Chain>,
    /// The writer's wall clock when it was saved (Unix ms; `None` if not recorded).
    pub saved_ms: Option<i64>,
}

/// A base checkpoint and the increments appended to it: an append names the chain and how many
/// links it has in the writer's view, so an increment is only ever applied on top of the state
/// it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Unique per base saved.
    pub id: String,
    /// Increments appended to the base.
    pub links: usize,
}

/// What [`FencedStore::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The increment is the chain's newest link.
    Linked(Chain),
    /// A stored fence value is ahead: nothing written (as [`FencedStore::save`] refuses).
    Refused,
    /// The stored checkpoint is not the one the increment starts from (another writer saved
    /// since, or the chain was replaced): nothing written; save a whole state instead.
    Diverged,
}

/// Durable per-partition checkpoints in Redis, fenced: a save whose fence values are behind
/// the stored ones (an owner that lost its partition and has not noticed yet) writes nothing.
///
/// Layout: one hash per partition at `key(partition)`, with `t` (the writer's wall clock, Unix
/// ms), one field per fence value (input offsets, `-1` = none), and the body: inline in
/// `state` when it is at most [`MAX_VALUE_BYTES`], else in chunks of that size at
/// [`chunk_key`]`(key, gen, 0..chunks)`, named by the fields `gen` and `chunks`. Which offsets
/// fence a checkpoint is the owner's business (the joiner: the next offsets of both its
/// inputs; the scorer: the next labeled offset); the store only compares them.
///
/// A store can also keep a partition's state as a chain: a base (what [`FencedStore::save`]
/// writes) and increments appended to it ([`FencedStore::append`]), each in a hash field
/// `inc:<i>` of at most [`MAX_VALUE_BYTES`] (a larger one is refused), named by the fields
/// `chain` (an id unique per base) and `links` (increments appended). An append is written
/// only on top of the chain and link count its writer started from, so a reader applies every
/// increment to exactly the state it was computed from; a save starts a new chain and deletes
/// the old one's increments in the same script. A load returns the base and the increments.
///
/// A chunked save stages its chunks first (each its own `SET`, expiring after ten minutes),
/// then commits in one script: checks the fence, makes the chunks permanent, points the hash
/// at them and deletes the previous generation's. So a reader sees a whole checkpoint, old or
/// new, and Redis is never held by more than one chunk's write; while a checkpoint is being
/// replaced, Redis holds both. A load that finds a chunk gone (replaced meanwhile) reads the
/// hash again. Loads and saves follow the [`Policy`]: each step is idempotent, so a retried one
/// is harmless.
pub struct FencedStore {
    conn: RedisConn,
    policy: Policy,
    key: Box<dyn Fn(i32) -> String + Send + Sync>,
    fence: &'static [&'static str],
    save: Script,
    append: Script,
    chunk_bytes: usize,
}

impl std::fmt::Debug for FencedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedStore")
            .field("example_key", &(self.key)(0))
            .field("fence", &self.fence)
            .field("chunk_bytes", &self.chunk_bytes)
            .finish()
    }
}

impl FencedStore {
    /// A store whose partition `p` lives at `key(p)`, fenced by the hash fields `fence`.
    pub fn new(
        conn: RedisConn,
        policy: Policy,
        key: impl Fn(i32) -> String + Send + Sync + 'static,
        fence: &'static [&'static str],
    ) -> Self {
        Self {
            conn,
            policy,
            key: Box::new(key),
            fence,
            save: Script::new(SAVE_LUA),
            append: Script::new(APPEND_LUA),
            chunk_bytes: MAX_VALUE_BYTES,
        }
    }

    /// The same store with bodies over `bytes` (at least 1) written in chunks of `bytes`
    /// instead of [`MAX_VALUE_BYTES`] (tests exercise chunking with small bodies).
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.max(1);
        self
    }

    /// The key of partition `partition`'s checkpoint.
    pub fn key(&self, partition: i32) -> String {
        (self.key)(partition)
    }

    /// The stored checkpoint of `partition`, if any.
    pub async fn load(
        &mut self,
        partition: i32,
    ) -> Result<Option<Saved>, DependencyError<redis::RedisError>> {
        let key = self.key(partition);
        for _ in 0..LOAD_ATTEMPTS {
            let Some(head) = self.load_head(&key).await? else {
                return Ok(None);
            };
            let body = match head.body {
                Body::Inline(body) => Some(body),
                Body::Chunks { generation, chunks } => {
                    self.load_chunks(&key, &generation, chunks).await?
                }
            };
            let increments = match (&body, &head.chain) {
                (Some(_), Some(chain)) => self.load_increments(&key, chain).await?,
                (Some(_), None) => Some(Vec::new()),
                (None, _) => None,
            };
            if let (Some(body), Some(increments)) = (body, increments) {
                return Ok(Some(Saved {
                    fence: head.fence,
                    body,
                    increments,
                    chain: head.chain,
                    saved_ms: head.saved_ms,
                }));
            }
            tracing::debug!(
                key,
                "checkpoint replaced while it was read; reading it again"
            );
        }
        Err(DependencyError::Failed(redis::RedisError::from((
            redis::ErrorKind::Client,
            "checkpoint replaced on every read",
            format!("{key}: its chunks changed under {LOAD_ATTEMPTS} reads in a row"),
        ))))
    }

    /// The hash of the checkpoint at `key` (`None` if it holds no body).
    async fn load_head(
        &self,
        key: &str,
    ) -> Result<Option<Head>, DependencyError<redis::RedisError>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key)
            .arg("state")
            .arg("t")
            .arg("gen")
            .arg("chunks")
            .arg("chain")
            .arg("links")
            .arg(self.fence);
        let conn = &self.conn;
        let got: Vec<redis::Value> = self
            .policy
            .retry(&format!("loading checkpoint {key}"), || {
                let mut c = conn.clone();
                let cmd = cmd.clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        let mut values = got.into_iter();
        let mut next = || values.next().unwrap_or(redis::Value::Nil);
        let body_inline: Option<Vec<u8>> = from_value(next(), key)?;
        let saved_ms: Option<i64> = from_value(next(), key)?;
        let generation: Option<String> = from_value(next(), key)?;
        let chunks: Option<usize> = from_value(next(), key)?;
        let chain: Option<String> = from_value(next(), key)?;
        let links: Option<usize> = from_value(next(), key)?;
        let mut fence = Vec::with_capacity(self.fence.len());
        for _ in self.fence {
            let v: Option<i64> = from_value(next(), key)?;
            fence.push(v.filter(|&v| v >= 0));
        }
        let body = match (body_inline, generation.zip(chunks)) {
            (Some(body), _) => Body::Inline(body),
            (None, Some((generation, chunks))) => Body::Chunks { generation, chunks },
            (None, None) => return Ok(None),
        };
        Ok(Some(Head {
            body,
            saved_ms,
            fence,
            chain: chain.map(|id| Chain {
                id,
                links: links.unwrap_or(0),
            }),
        }))
    }

    /// The increments of `chain` at `key`, or `None` if the chain was replaced since its hash
    /// was read (each read names the chain in the same command as the increments it reads).
    async fn load_increments(
        &self,
        key: &str,
        chain: &Chain,
    ) -> Result<Option<Vec<Vec<u8>>>, DependencyError<redis::RedisError>> {
        // A few at a time: each is at most MAX_VALUE_BYTES.
        const PER_READ: usize = 4;
        let mut out = Vec::with_capacity(chain.links);
        let conn = &self.conn;
        for first in (0..chain.links).step_by(PER_READ) {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(key).arg("chain");
            for i in first..(first + PER_READ).min(chain.links) {
                cmd.arg(format!("inc:{i}"));
            }
            let got: Vec<Option<Vec<u8>>> = self
                .policy
                .retry(&format!("loading increments of checkpoint {key}"), || {
                    let mut c = conn.clone();
                    let cmd = cmd.clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            let mut got = got.into_iter();
            if got.next().flatten().as_deref() != Some(chain.id.as_bytes()) {
                return Ok(None);
            }
            for increment in got {
                let Some(increment) = increment else {
                    return Ok(None);
                };
                out.push(increment);
            }
        }
        Ok(Some(out))
    }

    /// The body in `chunks` chunks of `generation`, or `None` if one is gone (the checkpoint
    /// was replaced since its hash was read).
    async fn load_chunks(
        &self,
        key: &str,
        generation: &str,
        chunks: usize,
    ) -> Result<Option<Vec<u8>>, DependencyError<redis::RedisError>> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        // A few chunks in flight: the next is on its way while one is copied.
        let mut parts = stream::iter(0..chunks)
            .map(|i| {
                let chunk = chunk_key(key, generation, i);
                let conn = self.conn.clone();
                let policy = self.policy;
                async move {
                    policy
                        .retry(&format!("loading checkpoint chunk {chunk}"), || {
                            let mut c = conn.clone();
                            let mut cmd = redis::cmd("GET");
                            cmd.arg(&chunk);
                            async move { cmd.query_async::<Option<Vec<u8>>>(&mut c).await }
                        })
                        .await
                }
            })
            .buffered(4);
        let mut body = Vec::new();
        while let Some(part) = parts.try_next().await? {
            let Some(part) = part else {
                return Ok(None);
            };
            if body.is_empty() {
                // Every chunk but the last is as long as the first.
                body.reserve_exact(part.len().saturating_mul(chunks));
            }
            body.extend_from_slice(&part);
        }
        Ok(Some(body))
    }

    /// The stored checkpoint of `partition` decoded by `decode`, with its writer's wall clock
    /// (Unix ms, if recorded); a body that does not decode is [`CheckpointError::Corrupt`].
    pub async fn load_with<T, E: std::fmt::Display>(
        &mut self,
        partition: i32,
        decode: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Option<(T, Option<i64>)>, CheckpointError> {
        let Some(saved) = self.load(partition).await? else {
            return Ok(None);
        };
        if !saved.increments.is_empty() {
            return Err(CheckpointError::Corrupt {
                key: self.key(partition),
                reason: format!(
                    "it has {} increments, and this owner restores whole states only",
                    saved.increments.len()
                ),
            });
        }
        match decode(&saved.body) {
            Ok(state) => Ok(Some((state, saved.saved_ms))),
            Err(e) => Err(CheckpointError::Corrupt {
                key: self.key(partition),
                reason: e.to_string(),
            }),
        }
    }

    /// Writes `body` as `partition`'s checkpoint with `fence` (one value per fence field, -1
    /// for none) unless a stored checkpoint is ahead of it; returns the chain it starts (`None`:
    /// not written). With `trim`, the stream at that key loses the entries below the previous
    /// checkpoint's first fence value (in the same atomic script).
    pub async fn save(
        &mut self,
        partition: i32,
        fence: &[i64],
        body: &[u8],
        trim: Option<&str>,
        wall_ms: i64,
    ) -> Result<Option<Chain>, DependencyError<redis::RedisError>> {
        assert_eq!(
            fence.len(),
            self.fence.len(),
            "a checkpoint is saved with one value per fence field"
        );
        let key = self.key(partition);
        let chunked = body.len() > self.chunk_bytes;
        // The chunks' generation is the chain's id: both unique per save.
        let chain = unique_id(wall_ms);
        let generation = if chunked {
            chain.clone()
        } else {
            String::new()
        };
        let mut chunk_keys = Vec::new();
        if chunked {
            for (i, part) in body.chunks(self.chunk_bytes).enumerate() {
                let chunk = chunk_key(&key, &generation, i);
                self.stage(&chunk, part).await?;
                chunk_keys.push(chunk);
            }
        }
        let mut invocation = self.save.key(&key);
        if let Some(stream) = trim {
            invocation.key(stream);
        }
        for chunk in &chunk_keys {
            invocation.key(chunk);
        }
        let inline: &[u8] = if chunked { &[] } else { body };
        invocation
            .arg(wall_ms)
            .arg(inline)
            .arg(&generation)
            .arg(chunk_keys.len())
            .arg(u8::from(trim.is_some()))
            .arg(chunk_prefix(&key))
            .arg(&chain);
        for (field, value) in self.fence.iter().zip(fence) {
            invocation.arg(*field).arg(*value);
        }
        let written: i32 = run_script(
            &self.policy,
            &self.conn,
            &format!("saving checkpoint {key}"),
            &invocation,
        )
        .await?;
        if written < 0 {
            return Err(DependencyError::Failed(redis::RedisError::from((
                redis::ErrorKind::Client,
                "checkpoint chunks expired before the commit",
                format!(
                    "{key}: a staged chunk of generation {generation} was gone after {STAGING_TTL_MS} ms"
                ),
            ))));
        }
        Ok((written == 1).then_some(Chain {
            id: chain,
            links: 0,
        }))
    }

    /// Appends `increment` to `partition`'s chain `chain` (as its writer last saw it) with
    /// `fence`, unless a stored fence value is ahead or the stored checkpoint is not that chain
    /// with that many links ([`Appended`]). With `trim`, as [`FencedStore::save`]. An increment
    /// over [`MAX_VALUE_BYTES`] (or this store's chunk size) is not written: the caller saves
    /// a whole state instead.
    pub async fn append(
        &mut self,
        partition: i32,
        fence: &[i64],
        chain: &Chain,
        increment: &[u8],
        trim: Option<&str>,
        wall_ms: i64,
    ) -> Result<Appended, DependencyError<redis::RedisError>> {
        assert_eq!(
            fence.len(),
            self.fence.len(),
            "a checkpoint is appended with one value per fence field"
        );
        if increment.len() > self.chunk_bytes {
            return Ok(Appended::Diverged);
        }
        let key = self.key(partition);
        let mut invocation = self.append.key(&key);
        if let Some(stream) = trim {
            invocation.key(stream);
        }
        invocation
            .arg(wall_ms)
            .arg(increment)
            .arg(&chain.id)
            .arg(chain.links)
            .arg(u8::from(trim.is_some()));
        for (field, value) in self.fence.iter().zip(fence) {
            invocation.arg(*field).arg(*value);
        }
        let outcome: i32 = run_script(
            &self.policy,
            &self.conn,
            &format!("appending to checkpoint {key}"),
            &invocation,
        )
        .await?;
        Ok(match outcome {
            1 => Appended::Linked(Chain {
                id: chain.id.clone(),
                links: chain.links + 1,
            }),
            0 => Appended::Refused,
            _ => Appended::Diverged,
        })
    }

    /// Writes one chunk of a body being saved, expiring unless a commit makes it permanent.
    async fn stage(
        &self,
        chunk: &str,
        part: &[u8],
    ) -> Result<(), DependencyError<redis::RedisError>> {
        let conn = &self.conn;
        self.policy
            .retry(&format!("staging checkpoint chunk {chunk}"), || {
                let mut c = conn.clone();
                let mut cmd = redis::cmd("SET");
                cmd.arg(chunk).arg(part).arg("PX").arg(STAGING_TTL_MS);
                async move { cmd.query_async::<()>(&mut c).await }
            })
            .await
    }
}

/// An id no other save makes: staging must never overwrite the chunks of a committed
/// checkpoint, which readers may be reading (two saves in one millisecond, two hosts' processes
/// with the same pid), and an increment must never land on a chain it was not computed from.
fn unique_id(wall_ms: i64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{wall_ms}-{random:016x}")
}

/// A checkpoint hash's fields, as [`FencedStore::load`] reads them.
struct Head {
    body: Body,
    saved_ms: Option<i64>,
    fence: Vec<Option<i64>>,
    chain: Option<Chain>,
}

/// Where a checkpoint's body is.
enum Body {
    /// In the hash's `state` field.
    Inline(Vec<u8>),
    /// In `chunks` chunks of `generation` ([`chunk_key`]).
    Chunks { generation: String, chunks: usize },
}

fn from_value<T: redis::FromRedisValue>(
    v: redis::Value,
    key: &str,
) -> Result<T, DependencyError<redis::RedisError>> {
    redis::from_redis_value(v).map_err(|e| {
        DependencyError::Failed(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected value in a checkpoint hash",
            format!("{key}: {}", redis::RedisError::from(e)),
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_in_its_checkpoints_cluster_slot() {
        for key in [
            "ctr:scorer:ckpt:{ctr.labeled:3}",
            "ctr:feedback:ckpt:ctr-joiner:ctr.serves:7",
        ] {
            for i in [0, 1, 200] {
                let chunk = chunk_key(key, "1764816000000-42", i);
                assert_eq!(slot_of(&chunk), slot_of(key), "{chunk} and {key}");
            }
        }
        assert_eq!(hash_tag("a{b}c{d}"), Some("b"));
        assert_eq!(hash_tag("a{}b{c}"), None);
        assert_eq!(hash_tag("a{b"), None);
    }
}

//! Redis read models: the key layout, the atomic apply step, and read-your-writes.
//!
//! # Key layout
//!
//! Every key of projection `P` carries the hash tag `{P}`, so all of them live in one Redis
//! Cluster hash slot and every atomic step (one Lua script) is valid on a cluster:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{P}:active` | string | the live version (generation) number `G` |
//! | `{P}:g<G>:<key>` | any | the projection's own keys, e.g. `{account-balances}:g1:account:alice` |
//! | `{P}:g<G>:checkpoint` | hash | `p0`..`p<n-1>`: last applied stream sequence per partition; `partitions`: n |
//! | `{P}:g<G>:changes` | stream | change feed: one entry per applied event (`seq`, `id`, `type`) |
//! | `{P}:g<G>:replayed` | set | stream sequences applied by a dead-letter replay |
//!
//! Frontends read `{P}:active` first, then the keys of that version. A rebuild writes version
//! `G+1` beside the live one, flips `{P}:active` in one step when it has caught up, and deletes
//! version `G` after a grace period, so a reader that saw the old pointer still finds its keys.
//!
//! # Freshness
//!
//! A command reply's `seq` is a consistency token: the read model reflects that command once
//! every partition's checkpoint (`p0`..`p<n-1>` of `{P}:g<G>:checkpoint`, with n in its
//! `partitions` field) is at least `seq`. [`ReadModel::wait_for`] does that for Rust code.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use std::fmt::Display;
use std::time::{Duration, Instant};

/// Why a read-model operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    /// Redis is unreachable or answered with an error.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// The read model did not reach the sequence in time.
    #[error(
        "read model {projection} did not reach sequence {seq} within {timeout:?} (at {reached})"
    )]
    Timeout {
        /// The projection.
        projection: String,
        /// The awaited sequence.
        seq: u64,
        /// The least checkpoint seen last.
        reached: u64,
        /// How long it waited.
        timeout: Duration,
    },
    /// A projection wrote a key of one type and then used it as another.
    #[error("read model write refused before any change: {0}")]
    WrongType(String),
}

/// The keys of one projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    projection: String,
}

impl Keys {
    /// The keys of projection `name`.
    pub fn new(name: &str) -> Self {
        Keys {
            projection: name.to_owned(),
        }
    }

    /// `{P}:active`: the live version number.
    pub fn active(&self) -> String {
        format!("{{{}}}:active", self.projection)
    }

    /// `{P}:g<G>:`: the prefix of version `generation`.
    pub fn prefix(&self, generation: u64) -> String {
        format!("{{{}}}:g{generation}:", self.projection)
    }

    /// A projection key of version `generation`, e.g. `{account-balances}:g1:account:alice`.
    pub fn key(&self, generation: u64, key: &str) -> String {
        format!("{}{key}", self.prefix(generation))
    }

    /// The checkpoint hash of version `generation`.
    pub fn checkpoint(&self, generation: u64) -> String {
        self.key(generation, "checkpoint")
    }

    /// The change feed of version `generation`.
    pub fn changes(&self, generation: u64) -> String {
        self.key(generation, "changes")
    }

    /// The set of replayed dead letters of version `generation`.
    pub fn replayed(&self, generation: u64) -> String {
        self.key(generation, "replayed")
    }
}

/// The Redis writes one event causes, with keys relative to the projection's version prefix.
///
/// Only commands that cannot fail on keys of the right type are offered; the apply script checks
/// the types of all keys before its first write, so a batch is applied whole or not at all.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RedisWrites {
    ops: Vec<Op>,
}

/// One write: a command, a relative key and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Op {
    pub command: &'static str,
    pub key: String,
    pub args: Vec<String>,
}

impl RedisWrites {
    fn push(&mut self, command: &'static str, key: &str, args: Vec<String>) -> &mut Self {
        self.ops.push(Op {
            command,
            key: key.to_owned(),
            args,
        });
        self
    }

    /// `HSET key field value`.
    pub fn hset(&mut self, key: &str, field: &str, value: impl Display) -> &mut Self {
        self.push("HSET", key, vec![field.to_owned(), value.to_string()])
    }

    /// `HINCRBY key field by`.
    pub fn hincr(&mut self, key: &str, field: &str, by: i64) -> &mut Self {
        self.push("HINCRBY", key, vec![field.to_owned(), by.to_string()])
    }

    /// `HDEL key field`.
    pub fn hdel(&mut self, key: &str, field: &str) -> &mut Self {
        self.push("HDEL", key, vec![field.to_owned()])
    }

    /// `ZADD key score member`.
    pub fn zadd(&mut self, key: &str, member: &str, score: i64) -> &mut Self {
        self.push("ZADD", key, vec![score.to_string(), member.to_owned()])
    }

    /// `ZINCRBY key by member`.
    pub fn zincr(&mut self, key: &str, member: &str, by: i64) -> &mut Self {
        self.push("ZINCRBY", key, vec![by.to_string(), member.to_owned()])
    }

    /// `ZREM key member`.
    pub fn zrem(&mut self, key: &str, member: &str) -> &mut Self {
        self.push("ZREM", key, vec![member.to_owned()])
    }

    /// `SADD key member`.
    pub fn sadd(&mut self, key: &str, member: &str) -> &mut Self {
        self.push("SADD", key, vec![member.to_owned()])
    }

    /// `SREM key member`.
    pub fn srem(&mut self, key: &str, member: &str) -> &mut Self {
        self.push("SREM", key, vec![member.to_owned()])
    }

    /// `SET key value`.
    pub fn set(&mut self, key: &str, value: impl Display) -> &mut Self {
        self.push("SET", key, vec![value.to_string()])
    }

    /// `DEL key`.
    pub fn del(&mut self, key: &str) -> &mut Self {
        self.push("DEL", key, vec![])
    }

    /// The writes so far, for tests of projections.
    pub fn commands(&self) -> Vec<String> {
        self.ops
            .iter()
            .map(|op| {
                let mut parts = vec![op.command.to_owned(), op.key.clone()];
                parts.extend(op.args.iter().cloned());
                parts.join(" ")
            })
            .collect()
    }

    pub(crate) fn into_ops(self) -> Vec<Op> {
        self.ops
    }
}

/// The Redis type a command needs its key to have (or `none`: absent).
fn key_type(command: &str) -> &'static str {
    match command {
        "HSET" | "HINCRBY" | "HDEL" => "hash",
        "ZADD" | "ZINCRBY" | "ZREM" => "zset",
        "SADD" | "SREM" => "set",
        "SET" => "string",
        _ => "any",
    }
}

/// One event's writes in an apply batch.
#[derive(Debug, Clone)]
pub(crate) struct AppliedEvent {
    pub seq: u64,
    pub aggregate_id: String,
    pub event_type: String,
    pub ops: Vec<Op>,
    /// Events of other partitions and dead letters advance the checkpoint but write nothing and
    /// are not in the change feed.
    pub write: bool,
}

/// Settings of one apply step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    /// Change feed length.
    pub feed_len: u64,
    /// The projection's partition count, recorded beside the checkpoints.
    pub partitions: u32,
    /// Accept a hole before the first event (the stream really has one).
    pub accept_hole: bool,
}

/// Who is applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A live worker: writes only while its version is the active one.
    Live,
    /// A rebuild worker: writes a version that is not active yet.
    Build,
    /// A dead-letter replay: each stream sequence at most once per version.
    Replay,
}

/// What the apply script reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Committed; the checkpoint is now this sequence (in replay mode: how many were new).
    Committed(u64),
    /// The batch does not continue the checkpoint, which is this sequence; nothing was written.
    Gap(u64),
    /// The checkpoint vanished (Redis lost its data): start again from the first event.
    Reset,
    /// The live version is now this one; nothing was written.
    Moved(u64),
}

/// The atomic step: checks the version pointer and the checkpoint, checks key types, applies the
/// writes of every event above the checkpoint in order, appends the change feed, and advances the
/// checkpoint. Events must continue the checkpoint without a hole (unless the caller accepts
/// one). In replay mode the gate is membership in the replayed set instead, and the checkpoint
/// stays. KEYS: active, checkpoint (or replayed set), changes, then the projection keys. ARGV:
/// partition field, generation, mode, expected checkpoint, feed length, event count, partition
/// count, hole accepted, then per event: seq, id, type, write flag, op count, then per op:
/// command, key index, arg count, args, wanted key type.
const APPLY_SCRIPT: &str = r#"
local mode = ARGV[3]
local active = redis.call('GET', KEYS[1])
if mode == 'live' and active and active ~= ARGV[2] then
  return {'moved', active}
end
local checkpoint = 0
if mode ~= 'replay' then
  checkpoint = redis.call('HGET', KEYS[2], ARGV[1])
  if not checkpoint then
    if ARGV[4] ~= '0' then return {'reset', '0'} end
    checkpoint = 0
  else
    checkpoint = tonumber(checkpoint)
  end
end
-- Check every key's type before the first write: a script is not rolled back on error.
local i = 9
local events = {}
for e = 1, tonumber(ARGV[6]) do
  local event = {seq = tonumber(ARGV[i]), id = ARGV[i + 1], type = ARGV[i + 2], write = ARGV[i + 3], ops = {}}
  local n = tonumber(ARGV[i + 4])
  i = i + 5
  for o = 1, n do
    local nargs = tonumber(ARGV[i + 2])
    local op = {cmd = ARGV[i], key = KEYS[tonumber(ARGV[i + 1])], first = i + 3, last = i + 2 + nargs, want = ARGV[i + 3 + nargs]}
    local have = redis.call('TYPE', op.key)['ok']
    if op.want ~= 'any' and have ~= 'none' and have ~= op.want then
      return redis.error_reply('WRONGTYPE ' .. op.key .. ' is a ' .. have .. ', ' .. op.cmd .. ' needs a ' .. op.want)
    end
    table.insert(event.ops, op)
    i = i + 4 + nargs
  end
  table.insert(events, event)
end
-- Events must continue the checkpoint without a hole: a hole means messages another worker
-- held were never applied, and they must come first.
if mode ~= 'replay' and ARGV[8] ~= '1' then
  local expect = checkpoint + 1
  for _, event in ipairs(events) do
    if event.seq >= expect then
      if event.seq ~= expect then return {'gap', tostring(checkpoint)} end
      expect = expect + 1
    end
  end
end
local last = checkpoint
local fresh_count = 0
for _, event in ipairs(events) do
  local fresh
  if mode == 'replay' then
    fresh = redis.call('SADD', KEYS[2], event.seq) == 1
  else
    fresh = event.seq > last
  end
  if fresh then
    fresh_count = fresh_count + 1
    if event.write == '1' then
      for _, op in ipairs(event.ops) do
        redis.call(op.cmd, op.key, unpack(ARGV, op.first, op.last))
      end
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'seq', event.seq, 'id', event.id, 'type', event.type)
    end
    if mode ~= 'replay' then last = event.seq end
  end
end
if mode == 'replay' then return {'ok', tostring(fresh_count)} end
if active == false and mode == 'live' then redis.call('SET', KEYS[1], ARGV[2]) end
redis.call('HSET', KEYS[2], ARGV[1], last, 'partitions', ARGV[7])
return {'ok', tostring(last)}
"#;

/// A projection's read model in Redis, as the runtime and frontends see it.
#[derive(Clone)]
pub struct ReadModel {
    connection: ConnectionManager,
    keys: Keys,
    apply: std::sync::Arc<redis::Script>,
}

impl std::fmt::Debug for ReadModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadModel")
            .field("keys", &self.keys)
            .finish()
    }
}

impl ReadModel {
    /// Connects to Redis (reconnecting automatically) for projection `name`.
    pub async fn connect(redis_url: &str, name: &str) -> Result<ReadModel, ReadModelError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let connection = client.get_connection_manager_with_config(config).await?;
        Ok(ReadModel {
            connection,
            keys: Keys::new(name),
            apply: std::sync::Arc::new(redis::Script::new(APPLY_SCRIPT)),
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection for direct reads and writes.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The live version, if any.
    pub async fn active_generation(&self) -> Result<Option<u64>, ReadModelError> {
        let mut connection = self.connection.clone();
        let value: Option<u64> = connection.get(self.keys.active()).await?;
        Ok(value)
    }

    /// Makes `generation` live if no version is; returns the live version.
    pub async fn activate_if_none(&self, generation: u64) -> Result<u64, ReadModelError> {
        let mut connection = self.connection.clone();
        let _: bool = connection.set_nx(self.keys.active(), generation).await?;
        Ok(self.active_generation().await?.unwrap_or(generation))
    }

    /// Makes `generation` the live version.
    pub async fn activate(&self, generation: u64) -> Result<(), ReadModelError> {
        let mut connection = self.connection.clone();
        let _: () = connection.set(self.keys.active(), generation).await?;
        Ok(())
    }

    /// The checkpoints of version `generation`, by partition; missing partitions are absent.
    pub async fn checkpoints(&self, generation: u64) -> Result<Vec<(u32, u64)>, ReadModelError> {
        let mut connection = self.connection.clone();
        let fields: Vec<(String, u64)> =
            connection.hgetall(self.keys.checkpoint(generation)).await?;
        let mut checkpoints: Vec<(u32, u64)> = fields
            .into_iter()
            .filter_map(|(field, seq)| Some((field.strip_prefix('p')?.parse().ok()?, seq)))
            .collect();
        checkpoints.sort_unstable();
        Ok(checkpoints)
    }

    /// The sequence up to which the live version reflects every event: the least checkpoint over
    /// all partitions (0 while any partition has none).
    pub async fn applied_through(&self) -> Result<u64, ReadModelError> {
        let Some(generation) = self.active_generation().await? else {
            return Ok(0);
        };
        let mut connection = self.connection.clone();
        let fields: std::collections::HashMap<String, u64> =
            connection.hgetall(self.keys.checkpoint(generation)).await?;
        let partitions = fields.get("partitions").copied().unwrap_or(1);
        let mut least = u64::MAX;
        for partition in 0..partitions {
            match fields.get(&format!("p{partition}")) {
                Some(seq) => least = least.min(*seq),
                None => return Ok(0),
            }
        }
        Ok(if least == u64::MAX { 0 } else { least })
    }

    /// Waits until the live read model reflects stream sequence `seq` (a command reply's `seq`),
    /// or fails with [`ReadModelError::Timeout`].
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> Result<(), ReadModelError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let reached = self.applied_through().await?;
            if reached >= seq {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(ReadModelError::Timeout {
                    projection: self.keys.projection.clone(),
                    seq,
                    reached,
                    timeout,
                });
            }
            tokio::time::sleep(pause.min(timeout.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Runs the atomic apply step for one partition of one version.
    pub(crate) async fn apply(
        &self,
        partition: u32,
        generation: u64,
        mode: Mode,
        expected_checkpoint: u64,
        batch: &Batch,
        events: &[AppliedEvent],
    ) -> Result<Applied, ReadModelError> {
        let mut invocation = self.apply.prepare_invoke();
        let (gate, mode) = match mode {
            Mode::Live => (self.keys.checkpoint(generation), "live"),
            Mode::Build => (self.keys.checkpoint(generation), "build"),
            Mode::Replay => (self.keys.replayed(generation), "replay"),
        };
        invocation
            .key(self.keys.active())
            .key(gate)
            .key(self.keys.changes(generation));
        invocation
            .arg(format!("p{partition}"))
            .arg(generation)
            .arg(mode)
            .arg(expected_checkpoint)
            .arg(batch.feed_len)
            .arg(events.len())
            .arg(batch.partitions)
            .arg(if batch.accept_hole { "1" } else { "0" });
        let mut key_index = 3;
        for event in events {
            invocation
                .arg(event.seq)
                .arg(&event.aggregate_id)
                .arg(&event.event_type)
                .arg(if event.write { "1" } else { "0" })
                .arg(event.ops.len());
            for op in &event.ops {
                key_index += 1;
                invocation
                    .key(self.keys.key(generation, &op.key))
                    .arg(op.command)
                    .arg(key_index)
                    .arg(op.args.len());
                for arg in &op.args {
                    invocation.arg(arg);
                }
                invocation.arg(key_type(op.command));
            }
        }
        let mut connection = self.connection.clone();
        let reply: Result<(String, String), redis::RedisError> =
            invocation.invoke_async(&mut connection).await;
        match reply {
            Ok((status, value)) => match status.as_str() {
                "ok" => Ok(Applied::Committed(value.parse().unwrap_or(0))),
                "reset" => Ok(Applied::Reset),
                "gap" => Ok(Applied::Gap(value.parse().unwrap_or(0))),
                "moved" => Ok(Applied::Moved(value.parse().unwrap_or(0))),
                other => Err(ReadModelError::WrongType(format!(
                    "unexpected reply {other}"
                ))),
            },
            Err(err) if err.code() == Some("WRONGTYPE") => {
                Err(ReadModelError::WrongType(err.to_string()))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Deletes every key of version `generation` (after a rebuild replaced it).
    pub async fn delete_generation(&self, generation: u64) -> Result<u64, ReadModelError> {
        let mut connection = self.connection.clone();
        let pattern = format!("{}*", redis_glob_escape(&self.keys.prefix(generation)));
        let mut deleted = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

/// Escapes glob metacharacters (the hash tag's braces are literal in SCAN patterns, but `[`,
/// `*`, `?` and `\` are not).
fn redis_glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_projection_shares_one_hash_tag() {
        let keys = Keys::new("account-balances");
        assert_eq!(keys.active(), "{account-balances}:active");
        assert_eq!(
            keys.key(3, "account:alice"),
            "{account-balances}:g3:account:alice"
        );
        assert_eq!(keys.checkpoint(3), "{account-balances}:g3:checkpoint");
        assert_eq!(keys.changes(3), "{account-balances}:g3:changes");
    }

    #[test]
    fn writes_read_as_redis_commands() {
        let mut writes = RedisWrites::default();
        writes
            .hset("account:a", "owner", "Ann")
            .hincr("totals", "open", 1)
            .zrem("open", "a");
        assert_eq!(
            writes.commands(),
            [
                "HSET account:a owner Ann",
                "HINCRBY totals open 1",
                "ZREM open a"
            ]
        );
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(redis_glob_escape("{a*b}:g1:"), "{a\\*b}:g1:");
    }
}

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
//! | `{P}:g<G>:progress` | stream | one entry per commit that moved a checkpoint (`p`, `seq`) |
//! | `{P}:g<G>:cursor` | hash | for partitions of a partitioned view: `p<k>` `<consumer tag>:<delivery seq>` and `v<k>` the view's sequence of the last message committed |
//! | `{P}:g<G>:replayed` | set | stream sequences applied by a dead-letter replay |
//! | `{P}:g<G>:failed` | string | only if a write failed half-way through a batch: why (rebuild) |
//!
//! `checkpoint`, `changes`, `progress`, `cursor`, `replayed` and `failed` belong to the runtime: [`RedisWrites`] refuses
//! them.
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
use std::collections::HashMap;
use std::fmt::Display;
use std::time::{Duration, Instant};

/// The largest magnitude a sorted-set score holds exactly (`2^53 - 1`, JavaScript's
/// `Number.MAX_SAFE_INTEGER`): scores are doubles.
pub const MAX_EXACT_SCORE: i128 = (1 << 53) - 1;

/// How long one attempt to connect to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis may take to answer one command or apply step.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest [`ReadModel::wait_for`] blocks on the progress stream before looking again.
const FOLLOW_AT_MOST: Duration = Duration::from_secs(1);

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
    /// The Redis user lacks a command the projection needs.
    #[error(
        "the Redis user may not run {command} on the keys of projection {projection}; grant it \
         (for example `ACL SETUSER <user> +{lowercase} ~{{{projection}}}:*`)",
        lowercase = command.to_ascii_lowercase()
    )]
    MissingPermission {
        /// The projection.
        projection: String,
        /// The refused command, e.g. `EVALSHA`.
        command: String,
    },
    /// The apply step answered something the runtime does not understand.
    #[error("the apply step answered {0:?}, which is not a known reply")]
    UnexpectedReply(String),
    /// The first write of the apply step failed, so it wrote nothing (for example: Redis is out
    /// of memory).
    #[error("redis refused the first write of the apply step, which wrote nothing: {message}")]
    NotWritten {
        /// The write's error, as Redis reported it (`OOM command not allowed ...`).
        message: String,
    },
    /// A Redis write failed after the apply step had started writing, so this version of the
    /// read model holds part of a batch. It refuses further batches until it is rebuilt.
    #[error(
        "version {generation} of read model {projection} is inconsistent: {message}; rebuild it \
         (`--rebuild`)"
    )]
    Inconsistent {
        /// The projection.
        projection: String,
        /// The read-model version.
        generation: u64,
        /// The failed write, as Redis reported it.
        message: String,
    },
}

/// Redis error codes that waiting can cure: loading, busy, out of memory, failing over.
const TRANSIENT_CODES: [&str; 7] = [
    "LOADING",
    "BUSY",
    "OOM",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "READONLY",
];

impl ReadModelError {
    /// Whether trying again later can help: Redis unreachable, timing out, loading, busy or out
    /// of memory. Script, permission and consistency errors are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            ReadModelError::Redis(err) => {
                err.is_io_error()
                    || err.is_timeout()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal()
                    || err
                        .code()
                        .is_some_and(|code| TRANSIENT_CODES.contains(&code))
            }
            ReadModelError::Timeout { .. } => true,
            ReadModelError::NotWritten { message } => message
                .split_whitespace()
                .next()
                .is_some_and(|code| TRANSIENT_CODES.contains(&code)),
            ReadModelError::MissingPermission { .. }
            | ReadModelError::UnexpectedReply(_)
            | ReadModelError::Inconsistent { .. } => false,
        }
    }
}

/// The keys of one projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    projection: String,
}

/// Relative keys the runtime keeps inside each version; projections may not write them.
const RESERVED_KEYS: [&str; 6] = [
    "checkpoint",
    "changes",
    "progress",
    "cursor",
    "replayed",
    "failed",
];

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

    /// The progress stream of version `generation`: one entry per commit that moved a
    /// partition's checkpoint (`p`: the partition field, `seq`: its new checkpoint).
    pub fn progress(&self, generation: u64) -> String {
        self.key(generation, "progress")
    }

    /// The delivery cursor of version `generation`: per partition field `p<k>`, the consumer
    /// incarnation and delivery sequence of the last delivery it committed (`<tag>:<seq>`), for
    /// partitions that read only their own events.
    pub fn cursor(&self, generation: u64) -> String {
        self.key(generation, "cursor")
    }

    /// The set of replayed dead letters of version `generation`.
    pub fn replayed(&self, generation: u64) -> String {
        self.key(generation, "replayed")
    }

    /// Set when a write of version `generation` failed half-way: why (the version needs a
    /// rebuild).
    pub fn failed(&self, generation: u64) -> String {
        self.key(generation, "failed")
    }

    /// A scratch key the start-up permission check writes and deletes in one step.
    fn probe(&self) -> String {
        format!("{{{}}}:permission-probe", self.projection)
    }
}

/// Why [`RedisWrites`] refused a write: the event is dead-lettered with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The key is one the runtime keeps (checkpoint, change feed, replayed set, failure mark).
    #[error("key {0:?} belongs to the jetfn runtime; projections may not write it")]
    ReservedKey(String),
    /// The value does not fit a Redis integer (signed 64 bit).
    #[error("{command} {key}: {value} is outside Redis's 64-bit integer range")]
    OutOfRange {
        /// The command.
        command: &'static str,
        /// The relative key.
        key: String,
        /// The value.
        value: i128,
    },
    /// The value is beyond what a sorted-set score (a double) holds exactly.
    #[error(
        "{command} {key}: {value} is beyond 2^53 - 1, the largest integer a sorted-set score \
         holds exactly"
    )]
    InexactScore {
        /// The command.
        command: &'static str,
        /// The relative key.
        key: String,
        /// The value.
        value: i128,
    },
}

/// The Redis writes one event causes, with keys relative to the projection's version prefix.
///
/// Only commands whose effect the apply step can check before its first write are offered: it
/// checks every key's type, that every counter stays within 64-bit integers and every sorted-set
/// score within 2^53 - 1, so a batch is applied whole or not at all. A write the read model
/// cannot hold (a value out of range, a key of the runtime's) is refused: the first refusal is
/// kept ([`RedisWrites::refusal`]) and the event is dead-lettered with it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RedisWrites {
    ops: Vec<Op>,
    refused: Option<WriteError>,
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
        if self.refused.is_some() {
            return self;
        }
        if RESERVED_KEYS.contains(&key) {
            self.refused = Some(WriteError::ReservedKey(key.to_owned()));
            return self;
        }
        self.ops.push(Op {
            command,
            key: key.to_owned(),
            args,
        });
        self
    }

    /// Checks `value` for `command`: within i64, and for scores within 2^53 - 1.
    fn number(&mut self, command: &'static str, key: &str, value: i128, score: bool) -> bool {
        let refusal = if i64::try_from(value).is_err() {
            Some(WriteError::OutOfRange {
                command,
                key: key.to_owned(),
                value,
            })
        } else if score && value.abs() > MAX_EXACT_SCORE {
            Some(WriteError::InexactScore {
                command,
                key: key.to_owned(),
                value,
            })
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.refused.get_or_insert(refusal);
            return false;
        }
        true
    }

    /// `HSET key field value`.
    pub fn hset(&mut self, key: &str, field: &str, value: impl Display) -> &mut Self {
        self.push("HSET", key, vec![field.to_owned(), value.to_string()])
    }

    /// `HINCRBY key field by`. `by` must fit in 64 bits, and so must the result (the apply
    /// step checks that before writing).
    pub fn hincr(&mut self, key: &str, field: &str, by: impl Into<i128>) -> &mut Self {
        let by = by.into();
        if !self.number("HINCRBY", key, by, false) {
            return self;
        }
        self.push("HINCRBY", key, vec![field.to_owned(), by.to_string()])
    }

    /// `HDEL key field`.
    pub fn hdel(&mut self, key: &str, field: &str) -> &mut Self {
        self.push("HDEL", key, vec![field.to_owned()])
    }

    /// `ZADD key score member`; `score` at most 2^53 - 1 in magnitude.
    pub fn zadd(&mut self, key: &str, member: &str, score: impl Into<i128>) -> &mut Self {
        let score = score.into();
        if !self.number("ZADD", key, score, true) {
            return self;
        }
        self.push("ZADD", key, vec![score.to_string(), member.to_owned()])
    }

    /// `ZINCRBY key by member`; `by` and the resulting score at most 2^53 - 1 in magnitude (the
    /// apply step checks the result before writing).
    pub fn zincr(&mut self, key: &str, member: &str, by: impl Into<i128>) -> &mut Self {
        let by = by.into();
        if !self.number("ZINCRBY", key, by, true) {
            return self;
        }
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

    /// The writes so far, for tests of projections: each one command line, its arguments
    /// joined by spaces (`HINCRBY account:alice balance 5`).
    pub fn commands(&self) -> Vec<String> {
        self.argv().map(|argv| argv.join(" ")).collect()
    }

    /// The writes so far, each as its command's arguments (`["HINCRBY", "account:alice",
    /// "balance", "5"]`). Keys are relative to the read model's version prefix.
    pub fn argv(&self) -> impl Iterator<Item = Vec<&str>> {
        self.ops.iter().map(|op| {
            let mut argv = vec![op.command, op.key.as_str()];
            argv.extend(op.args.iter().map(String::as_str));
            argv
        })
    }

    /// The first write refused, if any: the event will be dead-lettered with it.
    pub fn refusal(&self) -> Option<&WriteError> {
        self.refused.as_ref()
    }

    /// The writes, or the first refusal.
    pub(crate) fn into_ops(self) -> Result<Vec<Op>, WriteError> {
        match self.refused {
            Some(refusal) => Err(refusal),
            None => Ok(self.ops),
        }
    }
}

/// One event's writes in an apply batch.
#[derive(Debug, Clone)]
pub(crate) struct AppliedEvent {
    pub seq: u64,
    pub aggregate_id: String,
    pub event_type: String,
    /// Shared with the pulled message it came from: a batch sent ahead copies no write.
    pub ops: std::sync::Arc<[Op]>,
    /// Events of other partitions and dead letters advance the checkpoint but write nothing and
    /// are not in the change feed.
    pub write: bool,
}

/// Settings of one apply step.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    /// Change feed length.
    pub feed_len: u64,
    /// The projection's partition count, recorded beside the checkpoints.
    pub partitions: u32,
    /// How the step knows that the batch misses nothing after the checkpoint.
    pub order: Order,
    /// A stream sequence up to which the partition is known to have nothing else to apply (0:
    /// none): the checkpoint advances to it after the batch (see `projection::worker`'s claims).
    pub floor: u64,
}

/// How an apply step checks that a batch continues its partition without a hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Order {
    /// The partition reads the whole stream: the batch's sequences continue the checkpoint one
    /// by one.
    Contiguous,
    /// As [`Order::Contiguous`], but the stream itself has a hole right after the checkpoint.
    HoleAccepted,
    /// The partition reads only its own events (a partitioned view), so sequences have gaps:
    /// the batch must hold every delivery of the consumer after the last one committed. The
    /// cursor `<tag>:<delivery>` records it; `tag` names the consumer's incarnation (its creation
    /// time), since a recreated consumer numbers its deliveries from 1 again.
    Deliveries {
        /// The incarnation of the consumer that delivered the batch.
        tag: String,
        /// The consumer sequence of the batch's first delivery (0: the step has no deliveries).
        first: u64,
        /// The consumer sequence of its last delivery.
        last: u64,
        /// The view's own sequence of the batch's last message: where a recreated consumer
        /// starts again.
        position: u64,
    },
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
    /// The batch does not continue the partition's deliveries (another instance or an earlier
    /// worker holds some, or the consumer was recreated); nothing was written. The checkpoint is
    /// this sequence.
    Stale(u64),
}

/// What one run of the apply script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// It ran to an outcome.
    Done(Applied),
    /// The read model cannot hold the writes of the event at `seq` (a key of another type, a
    /// counter that would overflow); nothing was written.
    Refused {
        /// The event's stream sequence.
        seq: u64,
        /// Why, naming the key and the write.
        reason: String,
    },
}

/// The atomic step. It checks the failure mark, the version pointer and the checkpoint; then,
/// before its first write, every write of every event above the checkpoint: key types, counters
/// that must stay 64-bit integers and scores that must stay within 2^53 - 1, simulating the
/// batch in order (each key's type and each touched field read once). If an event fails, nothing
/// is written and the event is named. Otherwise it applies the writes in order, appends the
/// change feed and advances the checkpoint. Should a write fail anyway, the version is marked
/// failed (it holds part of a batch) and refuses every later step.
///
/// Events must continue the checkpoint without a hole (unless the caller accepts one). In replay
/// mode the gate is membership in the replayed set instead, and the checkpoint stays. A partition
/// that reads only its own events proves the same with its consumer's delivery sequences instead
/// (the cursor, see [`Order::Deliveries`]). A floor advances the checkpoint past events the
/// partition is known not to have. A commit that moves the checkpoint appends the progress
/// stream. KEYS: active, checkpoint (or replayed set), changes, failure mark, progress, cursor,
/// then the projection keys (each once). ARGV: partition field, generation, mode, expected
/// checkpoint, feed length, event count, partition count, order (`seq`, `hole` or `cursor`),
/// cursor tag, first delivery, the delivery before it, last delivery, floor, view position (the
/// cursor's `v<k>`), then the events packed in one argument ([`batch_events`]). The script starts
/// with the table `COMMANDS` ([`apply_script`]).
const APPLY_SCRIPT: &str = r#"
local mode = ARGV[3]
local failed = redis.call('GET', KEYS[4])
if failed then return {'failed', failed} end
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
local order = ARGV[8]
-- A partition reading its own events: the batch must hold every delivery after the cursor, or be
-- the first deliveries of a consumer (incarnation) the cursor does not know yet, which start at
-- the checkpoint it was created at or before.
if mode ~= 'replay' and order == 'cursor' and ARGV[10] ~= '0' then
  local cursor = redis.call('HGET', KEYS[6], ARGV[1])
  local tag = ARGV[9] .. ':'
  local continues = cursor == tag .. ARGV[11]
  local starts = ARGV[10] == '1' and (not cursor or string.sub(cursor, 1, #tag) ~= tag)
  if not continues and not starts then return {'stale', tostring(checkpoint)} end
end
-- The events, one MessagePack array (unpacked in C: Redis makes no object of each element, and
-- numbers arrive as numbers): per event its seq as a number and as text, id, type, layout, then
-- its writes' arguments. Per event e: eseq[e], etext[e], eid[e], etype[e], ewrite[e] and its ops
-- eo1[e] .. eo1[e] + eon[e] - 1, in flat arrays: a table per event or op costs more than it holds.
local B = cmsgpack.unpack(ARGV[15])
local count = tonumber(ARGV[6])
local i = 1
local eseq, etext, eid, etype, ewrite, eo1, eon, efresh = {}, {}, {}, {}, {}, {}, {}, {}
-- The writes, op j of the batch in ocmd[j], okey[j] and its arguments B[ofirst[j]..olast[j]].
-- An event's layout is bytes (string.byte reads them without parsing a number): its write flag,
-- then per op the command's code and its key's index, 4 bytes big-endian.
local ocmd, okey, ofirst, olast = {}, {}, {}, {}
local j = 0
for e = 1, count do
  local layout = B[i + 4]
  eseq[e], etext[e], eid[e], etype[e] = B[i], B[i + 1], B[i + 2], B[i + 3]
  ewrite[e], eo1[e], eon[e] = string.byte(layout, 1) == 1, j + 1, (#layout - 1) / 5
  i = i + 5
  for p = 2, #layout, 5 do
    local c, k1, k2, k3, k4 = string.byte(layout, p, p + 4)
    local command = COMMANDS[c] or {'?', 0}
    j = j + 1
    ocmd[j], okey[j], ofirst[j] = command[1], KEYS[((k1 * 256 + k2) * 256 + k3) * 256 + k4], i
    i = i + command[2]
    olast[j] = i - 1
  end
end
-- Events must continue the checkpoint without a hole: a hole means messages another worker
-- held were never applied, and they must come first.
if mode ~= 'replay' and order == 'seq' then
  local expect = checkpoint + 1
  for e = 1, count do
    if eseq[e] >= expect then
      if eseq[e] ~= expect then return {'gap', tostring(checkpoint)} end
      expect = expect + 1
    end
  end
end
local last = checkpoint
for e = 1, count do
  if mode == 'replay' then
    efresh[e] = redis.call('SISMEMBER', KEYS[2], etext[e]) == 0
  else
    efresh[e] = eseq[e] > last
    if efresh[e] then last = eseq[e] end
  end
end
if mode ~= 'replay' and tonumber(ARGV[13]) > last then last = tonumber(ARGV[13]) end

-- Signed decimal integers as Redis reads them (no '+', no leading zeros, 64 bit), exactly:
-- Lua numbers are doubles.
local function digits_of(s)
  if s == '0' then return false, '0' end
  local neg, d = false, s
  if string.sub(s, 1, 1) == '-' then neg, d = true, string.sub(s, 2) end
  if not string.find(d, '^[1-9]%d*$') then return nil end
  if #d > 19 or (#d == 19 and d > (neg and '9223372036854775808' or '9223372036854775807')) then return nil end
  return neg, d
end
local function magnitude_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function magnitude_op(a, b, sign)
  local out, carry, la, lb = {}, 0, #a, #b
  for k = 0, math.max(la, lb) - 1 do
    local da = k < la and string.byte(a, la - k) - 48 or 0
    local db = k < lb and string.byte(b, lb - k) - 48 or 0
    local s = da + sign * db + carry
    carry = 0
    if s >= 10 then s, carry = s - 10, 1 elseif s < 0 then s, carry = s + 10, -1 end
    table.insert(out, 1, string.char(48 + s))
  end
  if carry > 0 then table.insert(out, 1, '1') end
  local r = string.gsub(table.concat(out), '^0+', '')
  if r == '' then r = '0' end
  return r
end
local function add_integers(x, y)
  -- Both below 10^15 in magnitude: doubles add them exactly, and the sum fits.
  if #x <= 15 and #y <= 15 then return string.format('%d', tonumber(x) + tonumber(y)) end
  local xn, xd = digits_of(x)
  local yn, yd = digits_of(y)
  local neg, m
  if xn == yn then
    neg, m = xn, magnitude_op(xd, yd, 1)
  else
    local c = magnitude_cmp(xd, yd)
    if c == 0 then return '0' end
    if c > 0 then neg, m = xn, magnitude_op(xd, yd, -1) else neg, m = yn, magnitude_op(yd, xd, -1) end
  end
  local s = (neg and '-' or '') .. m
  if digits_of(s) == nil then return nil end
  return s
end

local WANT = {HSET = 'hash', HINCRBY = 'hash', HDEL = 'hash', ZADD = 'zset', ZINCRBY = 'zset',
  ZREM = 'zset', SADD = 'set', SREM = 'set', SET = 'string', DEL = 'any'}
local SAFE = 9007199254740991
local types, values, cleared = {}, {}, {}
-- The value of one field or member as the batch has left it so far, read once (`cmd`: HGET or
-- ZSCORE; no closure per call, which costs more than the read).
local function value(key, name, cmd)
  local v = values[key][name]
  if v == nil then
    if cleared[key] then v = false else v = redis.call(cmd, key, name) or false end
    values[key][name] = v
  end
  return v
end
-- Text Redis reads as an integer, as a number if it lies within 2^53 - 1 (exact as a double:
-- rounding never carries a larger one inside); nil otherwise.
local function small(s)
  if #s > 17 or not (s == '0' or string.find(s, '^%-?[1-9]%d*$')) then return nil end
  local n = tonumber(s)
  if n >= -SAFE and n <= SAFE then return n end
  return nil
end
local function short(s)
  if #s > 40 then return string.sub(s, 1, 40) .. '...' end
  return s
end
-- A key's first touch by an increment reads the value it needs, and that read tells the type:
-- it fails on a key of another type, and finds a hash (or sorted set) or no key at all, which
-- the increment makes one. Other first touches ask TYPE.
local PROBE = {HINCRBY = 'HGET', ZINCRBY = 'ZSCORE'}
local function first_touch(key, cmd, want, name)
  values[key] = {}
  local probe = PROBE[cmd]
  if probe then
    local v = redis.pcall(probe, key, name)
    if not (type(v) == 'table' and v.err) then
      types[key], values[key][name] = want, v
      return
    end
  end
  types[key] = redis.call('TYPE', key)['ok']
end
-- Simulates one write on what the batch has done so far; returns why it would fail, or nil.
local function check(op)
  local cmd, key, first = ocmd[op], okey[op], ofirst[op]
  local want = WANT[cmd]
  if want == nil then return 'unknown command ' .. cmd end
  local a, b = B[first], B[first + 1]
  if types[key] == nil then first_touch(key, cmd, want, cmd == 'HINCRBY' and a or b) end
  local have = types[key]
  if want ~= 'any' and have ~= 'none' and have ~= want then
    return 'WRONGTYPE ' .. key .. ' is a ' .. have .. ', ' .. cmd .. ' needs a ' .. want
  end
  if cmd == 'DEL' or cmd == 'SET' then
    types[key] = (cmd == 'SET') and 'string' or 'none'
    values[key], cleared[key] = {}, true
  elseif cmd == 'HSET' then
    values[key][a] = b
  elseif cmd == 'HDEL' or cmd == 'ZREM' then
    values[key][a] = false
  elseif cmd == 'HINCRBY' then
    local now = value(key, a, 'HGET')
    -- Most counters stay far below 2^53: kept as numbers, they add without a string in between.
    local n = (now == false and 0) or (type(now) == 'number' and now) or small(now)
    -- The increment is a canonical integer (RedisWrites made it): only its size is in doubt.
    local by = tonumber(b)
    local sum = n and by and by >= -SAFE and by <= SAFE and n + by
    if sum and sum >= -SAFE and sum <= SAFE then
      values[key][a] = sum
    else
      if now == false then now = '0' elseif type(now) == 'number' then now = string.format('%d', now) end
      if digits_of(now) == nil then
        return 'HINCRBY ' .. key .. ' ' .. a .. ': the field holds ' .. short(now) .. ', not a 64-bit integer'
      end
      sum = add_integers(now, b)
      if sum == nil then
        return 'HINCRBY ' .. key .. ' ' .. a .. ' ' .. b .. ' would overflow 64-bit integers (the field holds ' .. now .. ')'
      end
      values[key][a] = sum
    end
  elseif cmd == 'ZADD' then
    values[key][b] = tonumber(a)
  elseif cmd == 'ZINCRBY' then
    local now = value(key, b, 'ZSCORE')
    now = (now == false) and 0 or tonumber(now)
    local sum = now and (now + tonumber(a))
    if sum == nil or sum ~= sum or math.abs(sum) > SAFE then
      return 'ZINCRBY ' .. key .. ' ' .. a .. ' ' .. b .. ' would leave a score beyond 2^53 - 1, which a sorted set cannot hold exactly'
    end
    values[key][b] = sum
  end
  if want ~= 'any' and cmd ~= 'HDEL' and cmd ~= 'ZREM' and cmd ~= 'SREM' then
    types[key] = want
  end
  return nil
end
for e = 1, count do
  if efresh[e] and ewrite[e] then
    for op = eo1[e], eo1[e] + eon[e] - 1 do
      local why = check(op)
      if why then return {'refused', etext[e], why} end
    end
  end
end

-- Nothing below may fail. If the first write does (out of memory: Redis checks that only before
-- a script's first write), nothing was written and the step may run again. If a later write
-- fails, mark the version so that no later step builds on a half-applied batch. `begun` counts
-- the writes begun, so that a failure knows whether one went before it (a redis.call of its own
-- rather than a checked redis.pcall per write: the writes are most of the script's work).
local begun = 0
local fresh_count = 0
local ok, err = pcall(function()
  local feed = false
  for e = 1, count do
    if efresh[e] then
      fresh_count = fresh_count + 1
      if mode == 'replay' then
        begun = begun + 1
        redis.call('SADD', KEYS[2], etext[e])
      end
      if ewrite[e] then
        for op = eo1[e], eo1[e] + eon[e] - 1 do
          begun = begun + 1
          redis.call(ocmd[op], okey[op], unpack(B, ofirst[op], olast[op]))
        end
        begun, feed = begun + 1, true
        redis.call('XADD', KEYS[3], '*', 'seq', etext[e], 'id', eid[e], 'type', etype[e])
      end
    end
  end
  -- Trimmed once per step, not per entry: the same length, and nobody sees the step half done.
  if feed then
    begun = begun + 1
    redis.call('XTRIM', KEYS[3], 'MAXLEN', '~', ARGV[5])
  end
  if mode ~= 'replay' then
    local function write(...)
      begun = begun + 1
      redis.call(...)
    end
    if active == false and mode == 'live' then write('SET', KEYS[1], ARGV[2]) end
    write('HSET', KEYS[2], ARGV[1], last, 'partitions', ARGV[7])
    if order == 'cursor' and ARGV[10] ~= '0' then
      write('HSET', KEYS[6], ARGV[1], ARGV[9] .. ':' .. ARGV[12], 'v' .. string.sub(ARGV[1], 2), ARGV[14])
    end
    if last ~= checkpoint then
      write('XADD', KEYS[5], 'MAXLEN', '~', '1000', '*', 'p', ARGV[1], 'seq', last)
    end
  end
end)
if not ok then
  local message = type(err) == 'table' and err.err or tostring(err)
  if begun <= 1 then return {'untouched', message} end
  local why = 'a write failed half-way through a batch: ' .. message
  redis.pcall('SET', KEYS[4], why)
  return {'failed', why}
end
if mode == 'replay' then return {'ok', tostring(fresh_count)} end
return {'ok', tostring(last)}
"#;

/// The commands a batch may write, with their argument counts. An event's layout names each
/// of its writes' commands by its position here, from 1.
const WRITE_COMMANDS: [(&str, usize); 10] = [
    ("HSET", 2),
    ("HINCRBY", 2),
    ("HDEL", 1),
    ("ZADD", 2),
    ("ZINCRBY", 2),
    ("ZREM", 1),
    ("SADD", 1),
    ("SREM", 1),
    ("SET", 1),
    ("DEL", 0),
];

/// The apply script, its table of write commands made from [`WRITE_COMMANDS`].
fn apply_script() -> String {
    let commands: Vec<String> = WRITE_COMMANDS
        .iter()
        .map(|(command, args)| format!("{{'{command}', {args}}}"))
        .collect();
    format!(
        "local COMMANDS = {{{}}}\n{APPLY_SCRIPT}",
        commands.join(", ")
    )
}

/// An event's layout in an apply batch: a byte for whether it writes, then per write its
/// command's position in [`WRITE_COMMANDS`] (from 1) and its key's index in `KEYS` (4 bytes,
/// big-endian). Numbers the script reads with `string.byte` cost far less than numbers it
/// parses from strings, one argument each.
fn event_layout(event: &AppliedEvent, key_index: impl Fn(&str) -> usize) -> Vec<u8> {
    let mut layout = Vec::with_capacity(1 + 5 * event.ops.len());
    layout.push(u8::from(event.write));
    for op in event.ops.iter() {
        let code = WRITE_COMMANDS
            .iter()
            .position(|(command, _)| *command == op.command)
            .map_or(0, |position| position + 1);
        layout.push(u8::try_from(code).unwrap_or(0));
        let index = u32::try_from(key_index(&op.key)).unwrap_or(0);
        layout.extend_from_slice(&index.to_be_bytes());
    }
    layout
}

/// A batch's events as the apply script takes them: one MessagePack array holding, per event,
/// its seq (as a number and as text: the script compares the one and writes the other), aggregate
/// id, type, [`event_layout`] and its writes' arguments.
fn batch_events(events: &[AppliedEvent], key_index: impl Fn(&str) -> usize) -> Vec<u8> {
    let elements: usize = events
        .iter()
        .map(|e| 5 + e.ops.iter().map(|op| op.args.len()).sum::<usize>())
        .sum();
    let mut packed = Vec::with_capacity(16 * elements);
    msgpack::array_len(&mut packed, elements);
    for event in events {
        msgpack::uint(&mut packed, event.seq);
        msgpack::str(&mut packed, event.seq.to_string().as_bytes());
        msgpack::str(&mut packed, event.aggregate_id.as_bytes());
        msgpack::str(&mut packed, event.event_type.as_bytes());
        msgpack::str(&mut packed, &event_layout(event, &key_index));
        for arg in event.ops.iter().flat_map(|op| &op.args) {
            msgpack::str(&mut packed, arg.as_bytes());
        }
    }
    packed
}

/// The little of MessagePack the apply batch needs: arrays, strings (any bytes: Redis's
/// `cmsgpack` takes them as Lua strings) and unsigned integers.
mod msgpack {
    /// The markers of one kind of sized value: the fix form (`fix | n`) for `n` below
    /// `fix_below`, then the 8-bit length form if the kind has one, the 16-bit and the 32-bit.
    struct Sized {
        fix: u8,
        fix_below: usize,
        len8: Option<u8>,
        len16: u8,
        len32: u8,
    }

    const ARRAY: Sized = Sized {
        fix: 0x90,
        fix_below: 16,
        len8: None,
        len16: 0xdc,
        len32: 0xdd,
    };
    const STR: Sized = Sized {
        fix: 0xa0,
        fix_below: 32,
        len8: Some(0xd9),
        len16: 0xda,
        len32: 0xdb,
    };

    /// The head of a value of kind `kind` and size `n`. Sizes above `u32::MAX` cannot reach
    /// Redis (its bulk strings end at 512 MB).
    fn head(out: &mut Vec<u8>, kind: &Sized, n: usize) {
        match (n, kind.len8) {
            (n, _) if n < kind.fix_below => out.push(kind.fix | n as u8),
            (0..=0xff, Some(len8)) => out.extend_from_slice(&[len8, n as u8]),
            (0..=0xffff, _) => {
                out.push(kind.len16);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(kind.len32);
                out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
            }
        }
    }

    /// The head of an array of `n` elements.
    pub(super) fn array_len(out: &mut Vec<u8>, n: usize) {
        head(out, &ARRAY, n);
    }

    /// A string of any bytes.
    pub(super) fn str(out: &mut Vec<u8>, s: &[u8]) {
        head(out, &STR, s.len());
        out.extend_from_slice(s);
    }

    /// An unsigned integer, in the fewest bytes.
    pub(super) fn uint(out: &mut Vec<u8>, v: u64) {
        match v {
            0..128 => out.push(v as u8),
            128..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
            0x100..=0xffff => {
                out.push(0xcd);
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(0xce);
                out.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                out.push(0xcf);
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
}

/// Commands the start-up check tries on a scratch key of the projection: everything the apply
/// step and the runtime's reads and writes use.
const PROBE_SCRIPT: &str = r#"
local key = KEYS[1]
local denied = {}
local function try(...)
  local reply = redis.pcall(...)
  -- Redis 7.2 and later say NOPERM; 7.0 says the user executing the script can't run or access.
  if type(reply) == 'table' and reply.err and (string.find(reply.err, 'NOPERM', 1, true)
      or string.find(reply.err, 'The user executing the script', 1, true)) then
    table.insert(denied, (select(1, ...)))
  end
end
try('GET', key)
try('SET', key, '1')
try('SETNX', key, '1')
try('TYPE', key)
try('DEL', key)
try('HSET', key, 'f', '1')
try('HGET', key, 'f')
try('HGETALL', key)
try('HINCRBY', key, 'f', '1')
try('HDEL', key, 'f')
try('DEL', key)
try('ZADD', key, '1', 'm')
try('ZINCRBY', key, '1', 'm')
try('ZSCORE', key, 'm')
try('ZREM', key, 'm')
try('SADD', key, 'm')
try('SISMEMBER', key, 'm')
try('SREM', key, 'm')
try('XADD', key, '*', 'f', 'v')
try('XTRIM', key, 'MAXLEN', '~', '1')
try('UNLINK', key)
redis.pcall('DEL', key)
return denied
"#;

/// At most this many idle connections for [`ReadModel::wait_for`] are kept.
const IDLE_FOLLOWERS: usize = 8;

/// A connection of its own for one waiter's blocking reads (one would hold up a shared
/// connection, and other waiters on it), taken from the read model's idle ones or opened.
struct Follower(redis::aio::MultiplexedConnection);

impl Follower {
    async fn take(model: &ReadModel) -> Result<Follower, ReadModelError> {
        let idle = model.followers.lock().ok().and_then(|mut idle| idle.pop());
        if let Some(connection) = idle {
            return Ok(Follower(connection));
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(FOLLOW_AT_MOST + RESPONSE_TIMEOUT));
        let connection = model
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Follower(connection))
    }

    /// Keeps the connection for the next waiter (a failed one is dropped instead: the `?` in
    /// [`ReadModel::wait_for`] never gives it back).
    fn give_back(self, model: &ReadModel) {
        if let Ok(mut idle) = model.followers.lock()
            && idle.len() < IDLE_FOLLOWERS
        {
            idle.push(self.0);
        }
    }
}

/// The runtime's follower of one version's progress stream: the highest checkpoint any partition
/// (of any instance) committed. Partitions that read only their own events learn from it how far
/// the stream reaches, so an idle one can advance its checkpoint (see `projection::worker`).
pub(crate) struct ProgressFeed {
    connection: redis::aio::MultiplexedConnection,
    generation: u64,
    last_id: String,
}

impl ProgressFeed {
    /// Opens a connection of its own for the blocking reads.
    pub(crate) async fn open(model: &ReadModel) -> Result<ProgressFeed, ReadModelError> {
        let Follower(connection) = Follower::take(model).await?;
        Ok(ProgressFeed {
            connection,
            generation: 0,
            last_id: "0-0".to_owned(),
        })
    }

    /// Waits up to `block` for progress entries of version `generation` after the last one read
    /// (from the first one kept after a version change), and returns the highest `seq` among
    /// them, if any arrived.
    pub(crate) async fn next(
        &mut self,
        model: &ReadModel,
        generation: u64,
        block: Duration,
    ) -> Result<Option<u64>, ReadModelError> {
        if generation != self.generation {
            self.generation = generation;
            self.last_id = "0-0".to_owned();
        }
        type Entries = Vec<(String, Vec<(String, Vec<String>)>)>;
        let reply: Option<Entries> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(model.keys.progress(generation))
            .arg(&self.last_id)
            .query_async(&mut self.connection)
            .await?;
        let mut highest = None;
        for (_, entries) in reply.unwrap_or_default() {
            for (id, fields) in entries {
                let seq = fields
                    .chunks(2)
                    .find(|pair| pair.first().map(String::as_str) == Some("seq"))
                    .and_then(|pair| pair.get(1)?.parse::<u64>().ok());
                if let Some(seq) = seq {
                    highest = highest.max(Some(seq));
                }
                self.last_id = id;
            }
        }
        Ok(highest)
    }
}

/// A projection's read model in Redis, as the runtime and frontends see it.
#[derive(Clone)]
pub struct ReadModel {
    client: redis::Client,
    connection: ConnectionManager,
    followers: std::sync::Arc<std::sync::Mutex<Vec<redis::aio::MultiplexedConnection>>>,
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
    ///
    /// Each connection attempt gives up after 1 s and each command after 5 s, and the client
    /// does not retry by itself, so a caller's own backoff decides how soon it tries again.
    pub async fn connect(redis_url: &str, name: &str) -> Result<ReadModel, ReadModelError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(0);
        let connection = client
            .clone()
            .get_connection_manager_with_config(config)
            .await?;
        Ok(ReadModel {
            client,
            connection,
            followers: std::sync::Arc::default(),
            keys: Keys::new(name),
            apply: std::sync::Arc::new(redis::Script::new(&apply_script())),
        })
    }

    /// Checks that the Redis user may run everything the projection needs (`EVALSHA`, `EVAL`,
    /// and inside scripts the commands of the apply step) on the projection's keys, by trying
    /// them on a scratch key. Fails with [`ReadModelError::MissingPermission`] naming the first
    /// refused command.
    pub async fn check_permissions(&self) -> Result<(), ReadModelError> {
        let missing = |command: &str| ReadModelError::MissingPermission {
            projection: self.keys.projection.clone(),
            command: command.to_owned(),
        };
        let mut connection = self.connection.clone();
        // No script has this digest: NOSCRIPT means EVALSHA itself is allowed.
        let evalsha: Result<redis::Value, _> = redis::cmd("EVALSHA")
            .arg("0000000000000000000000000000000000000000")
            .arg(0)
            .query_async(&mut connection)
            .await;
        match evalsha {
            Err(err) if err.code() == Some("NOPERM") => return Err(missing("EVALSHA")),
            Err(err) if err.code() == Some("NOSCRIPT") => {}
            Err(err) => return Err(err.into()),
            Ok(_) => {}
        }
        let denied: Result<Vec<String>, _> = redis::cmd("EVAL")
            .arg(PROBE_SCRIPT)
            .arg(1)
            .arg(self.keys.probe())
            .query_async(&mut connection)
            .await;
        match denied {
            Err(err) if err.code() == Some("NOPERM") => Err(missing("EVAL")),
            Err(err) => Err(err.into()),
            Ok(denied) => match denied.first() {
                Some(command) => Err(missing(command)),
                None => Ok(()),
            },
        }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection for direct reads and writes.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// Where partition `partition` of version `generation` stands in its partitioned view: the
    /// view's sequence of the last message it committed (0: none yet).
    pub(crate) async fn view_position(
        &self,
        generation: u64,
        partition: u32,
    ) -> Result<u64, ReadModelError> {
        let mut connection = self.connection.clone();
        let position: Option<u64> = connection
            .hget(self.keys.cursor(generation), format!("v{partition}"))
            .await?;
        Ok(position.unwrap_or(0))
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
    ///
    /// It is told rather than polling: when the read model is not there yet, it blocks
    /// (`XREAD BLOCK`, on a connection of its own, kept for later waits) on the version's
    /// progress stream, which every commit that moves a checkpoint appends to. It looks again at
    /// least every second, for a version switch.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> Result<(), ReadModelError> {
        let started = Instant::now();
        if self.applied_through().await? >= seq {
            return Ok(());
        }
        let mut follower = Follower::take(self).await?;
        loop {
            let generation = self.active_generation().await?;
            // Where the progress stream ends before looking: any later commit wakes the XREAD.
            let since = match generation {
                Some(generation) => Some(self.last_progress(generation).await?),
                None => None,
            };
            let reached = self.applied_through().await?;
            if reached >= seq {
                follower.give_back(self);
                return Ok(());
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                follower.give_back(self);
                return Err(ReadModelError::Timeout {
                    projection: self.keys.projection.clone(),
                    seq,
                    reached,
                    timeout,
                });
            }
            let block = left.min(FOLLOW_AT_MOST);
            let (Some(generation), Some(since)) = (generation, since) else {
                // No version yet: nothing to follow.
                tokio::time::sleep(block.min(Duration::from_millis(50))).await;
                continue;
            };
            let _: redis::Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(block.as_millis().max(1) as u64)
                .arg("STREAMS")
                .arg(self.keys.progress(generation))
                .arg(since)
                .query_async(&mut follower.0)
                .await?;
        }
    }

    /// The id of the last entry of the progress stream of `generation` (`0-0` when empty).
    async fn last_progress(&self, generation: u64) -> Result<String, ReadModelError> {
        let mut connection = self.connection.clone();
        let last: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(self.keys.progress(generation))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await?;
        Ok(last
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
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
    ) -> Result<Step, ReadModelError> {
        let (gate, mode) = match mode {
            Mode::Live => (self.keys.checkpoint(generation), "live"),
            Mode::Build => (self.keys.checkpoint(generation), "build"),
            Mode::Replay => (self.keys.replayed(generation), "replay"),
        };
        // One EVALSHA built in place: a script invocation would hold each of a batch's
        // thousands of arguments in an allocation of its own, then copy them all.
        let mut keys = vec![
            self.keys.active(),
            gate,
            self.keys.changes(generation),
            self.keys.failed(generation),
            self.keys.progress(generation),
            self.keys.cursor(generation),
        ];
        // Each key is passed once, however many writes touch it.
        let mut key_indexes: HashMap<&str, usize> = HashMap::with_capacity(events.len() + 8);
        for op in events.iter().flat_map(|event| event.ops.iter()) {
            key_indexes.entry(op.key.as_str()).or_insert_with(|| {
                keys.push(self.keys.key(generation, &op.key));
                keys.len()
            });
        }
        let mut invocation = redis::cmd("EVALSHA");
        invocation.arg(self.apply.get_hash()).arg(keys.len());
        for key in &keys {
            invocation.arg(key);
        }
        invocation
            .arg(format!("p{partition}"))
            .arg(generation)
            .arg(mode)
            .arg(expected_checkpoint)
            .arg(batch.feed_len)
            .arg(events.len())
            .arg(batch.partitions);
        match &batch.order {
            Order::Contiguous | Order::HoleAccepted => {
                let order = if batch.order == Order::Contiguous {
                    "seq"
                } else {
                    "hole"
                };
                invocation.arg(order).arg("").arg(0).arg(0).arg(0);
                invocation.arg(batch.floor).arg(0);
            }
            Order::Deliveries {
                tag,
                first,
                last,
                position,
            } => {
                invocation
                    .arg("cursor")
                    .arg(tag)
                    .arg(*first)
                    .arg(first.saturating_sub(1))
                    .arg(*last);
                invocation.arg(batch.floor).arg(*position);
            }
        }
        let key_index = |key: &str| key_indexes.get(key).copied().unwrap_or(0);
        invocation.arg(batch_events(events, key_index));
        let mut connection = self.connection.clone();
        let reply: Vec<String> = match invocation.query_async(&mut connection).await {
            // Redis lost its scripts (a restart): load it, and run the same invocation again.
            Err(error)
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let _: String = self
                    .apply
                    .prepare_invoke()
                    .load_async(&mut connection)
                    .await?;
                invocation.query_async(&mut connection).await?
            }
            answer => answer?,
        };
        self.parse_reply(generation, reply)
    }

    /// Reads the apply step's reply; anything unexpected is an error, never a success.
    fn parse_reply(&self, generation: u64, reply: Vec<String>) -> Result<Step, ReadModelError> {
        let number = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| ReadModelError::UnexpectedReply(reply.join(" ")))
        };
        match reply.as_slice() {
            [status, value] if status == "ok" => Ok(Step::Done(Applied::Committed(number(value)?))),
            [status, _] if status == "reset" => Ok(Step::Done(Applied::Reset)),
            [status, value] if status == "gap" => Ok(Step::Done(Applied::Gap(number(value)?))),
            [status, value] if status == "moved" => Ok(Step::Done(Applied::Moved(number(value)?))),
            [status, value] if status == "stale" => Ok(Step::Done(Applied::Stale(number(value)?))),
            [status, seq, reason] if status == "refused" => Ok(Step::Refused {
                seq: number(seq)?,
                reason: reason.clone(),
            }),
            [status, message] if status == "untouched" => Err(ReadModelError::NotWritten {
                message: message.clone(),
            }),
            [status, message] if status == "failed" => Err(ReadModelError::Inconsistent {
                projection: self.keys.projection.clone(),
                generation,
                message: message.clone(),
            }),
            _ => Err(ReadModelError::UnexpectedReply(reply.join(" "))),
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
    fn writes_keep_each_argument_whole() {
        let mut writes = RedisWrites::default();
        writes
            .hset("account:a", "owner", "Ann Lee")
            .zincr("open", "a", -3);
        let argv: Vec<Vec<&str>> = writes.argv().collect();
        assert_eq!(
            argv,
            [
                vec!["HSET", "account:a", "owner", "Ann Lee"],
                vec!["ZINCRBY", "open", "-3", "a"]
            ]
        );
    }

    #[test]
    fn every_write_carries_the_argument_count_the_apply_step_reads() {
        let mut writes = RedisWrites::default();
        writes
            .hset("h", "f", "v")
            .hincr("h", "f", 1)
            .hdel("h", "f")
            .zadd("z", "m", 1)
            .zincr("z", "m", 1)
            .zrem("z", "m")
            .sadd("s", "m")
            .srem("s", "m")
            .set("k", "v")
            .del("k");
        let ops = writes.into_ops().unwrap();
        assert_eq!(ops.len(), WRITE_COMMANDS.len(), "one write of each command");
        for op in ops {
            let (_, args) = WRITE_COMMANDS
                .iter()
                .find(|(command, _)| *command == op.command)
                .expect("a command of the apply step");
            assert_eq!(op.args.len(), *args, "{}", op.command);
        }
    }

    /// Event `event_type` of aggregate `a` at `seq`, with `writes`.
    fn written_event(seq: u64, event_type: &str, writes: RedisWrites) -> AppliedEvent {
        AppliedEvent {
            seq,
            aggregate_id: "a".into(),
            event_type: event_type.into(),
            ops: writes.into_ops().unwrap().into(),
            write: true,
        }
    }

    #[test]
    fn an_event_layout_names_each_write_by_command_and_key_index() {
        let mut writes = RedisWrites::default();
        writes.hincr("h", "f", 1).zrem("z", "m");
        let event = written_event(9, "Added", writes);
        let index = |key: &str| if key == "h" { 7 } else { 0x0102_0304 };
        assert_eq!(
            event_layout(&event, index),
            [1, 2, 0, 0, 0, 7, 6, 1, 2, 3, 4],
            "write flag, then HINCRBY (2) on key 7 and ZREM (6) on key 0x01020304"
        );
        assert!(apply_script().starts_with("local COMMANDS = {{'HSET', 2}, {'HINCRBY', 2}, "));
    }

    #[test]
    fn a_batch_is_packed_as_one_messagepack_array_per_the_spec() {
        let mut writes = RedisWrites::default();
        writes.hset("h", "f", "v");
        let event = written_event(300, "T", writes);
        let packed = batch_events(&[event], |_| 7);
        let expected: &[u8] = &[
            0x97, // 7 elements: seq, its text, id, type, layout, then HSET's field and value
            0xcd, 0x01, 0x2c, // 300
            0xa3, b'3', b'0', b'0', // "300"
            0xa1, b'a', 0xa1, b'T', // id, type
            0xa6, 1, 1, 0, 0, 0, 7, // written; HSET on key 7
            0xa1, b'f', 0xa1, b'v',
        ];
        assert_eq!(packed, expected);
    }

    #[test]
    fn messagepack_sizes_switch_at_the_spec_boundaries() {
        let mut out = Vec::new();
        for n in [15, 16, 65_535, 65_536] {
            msgpack::array_len(&mut out, n);
        }
        let arrays: &[u8] = &[0x9f, 0xdc, 0, 16, 0xdc, 0xff, 0xff, 0xdd, 0, 1, 0, 0];
        assert_eq!(out, arrays);

        let mut out = Vec::new();
        for v in [127, 128, 255, 256, 65_535, 65_536, 1 << 32] {
            msgpack::uint(&mut out, v);
        }
        let uints: &[u8] = &[
            0x7f, 0xcc, 0x80, 0xcc, 0xff, 0xcd, 1, 0, 0xcd, 0xff, 0xff, 0xce, 0, 1, 0, 0, 0xcf, 0,
            0, 0, 1, 0, 0, 0, 0,
        ];
        assert_eq!(out, uints);

        for (len, head) in [
            (31, vec![0xbf]),
            (32, vec![0xd9, 32]),
            (255, vec![0xd9, 0xff]),
            (256, vec![0xda, 1, 0]),
            (65_535, vec![0xda, 0xff, 0xff]),
            (65_536, vec![0xdb, 0, 1, 0, 0]),
        ] {
            let mut out = Vec::new();
            msgpack::str(&mut out, &vec![b'x'; len]);
            assert_eq!(
                &out[..head.len()],
                head.as_slice(),
                "a string of {len} bytes"
            );
            assert_eq!(out.len(), head.len() + len);
        }
    }

    #[test]
    fn only_errors_that_waiting_can_cure_are_transient() {
        let not_written = |message: &str| ReadModelError::NotWritten {
            message: message.into(),
        };
        assert!(
            not_written("OOM command not allowed when used memory > 'maxmemory'.").is_transient()
        );
        assert!(!not_written("NOPERM this user has no permissions").is_transient());
        let down = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down");
        assert!(ReadModelError::Redis(down.into()).is_transient());
        assert!(!ReadModelError::UnexpectedReply("ok x".into()).is_transient());
        let inconsistent = ReadModelError::Inconsistent {
            projection: "p".into(),
            generation: 1,
            message: "m".into(),
        };
        assert!(!inconsistent.is_transient());
    }

    #[test]
    fn writes_refuse_runtime_keys_and_values_redis_cannot_hold_exactly() {
        let mut writes = RedisWrites::default();
        writes.del("checkpoint").hset("account:a", "owner", "Ann");
        assert_eq!(
            writes.refusal(),
            Some(&WriteError::ReservedKey("checkpoint".into()))
        );
        assert!(writes.commands().is_empty(), "nothing after a refusal");

        let mut writes = RedisWrites::default();
        writes.zadd("rank", "a", MAX_EXACT_SCORE);
        assert_eq!(writes.refusal(), None);
        writes.zincr("rank", "a", MAX_EXACT_SCORE + 1);
        assert!(matches!(
            writes.refusal(),
            Some(WriteError::InexactScore {
                command: "ZINCRBY",
                ..
            })
        ));

        let mut writes = RedisWrites::default();
        writes.hincr("totals", "sum", i128::from(i64::MIN) - 1);
        assert!(matches!(
            writes.refusal(),
            Some(WriteError::OutOfRange {
                command: "HINCRBY",
                ..
            })
        ));
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(redis_glob_escape("{a*b}:g1:"), "{a\\*b}:g1:");
    }
}

//! A projection's batch is one atomic Lua step that simulates every write before the first one
//! (to refuse what Redis would refuse) and then writes. These tests check that a batch leaves
//! exactly what its writes one at a time would, against real nats-server and redis-server:
//! events of a small aggregate whose projection mixes every write the runtime offers on a few
//! shared keys (so one batch sets, increments, deletes and clears the same fields and keys many
//! times), caught up in large batches, then compared key by key with the same writes sent one at
//! a time as plain Redis commands. Any change to how the step batches its writes (coalescing
//! them per key was tried) must keep it passing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use jetfn::readmodel::{Keys, ReadModel};
use jetfn::{Aggregate, Projection, Recorded, RedisWrites, Refusal, Rejection};
use jetfn_tests::commands::send_raw;
use jetfn_tests::readmodels::projection_config;
use jetfn_tests::workload::Rng;
use jetfn_tests::{NatsServer, RedisServer};
use redis::AsyncCommands;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Default)]
struct Mix;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Step {},
}

#[derive(Serialize, Deserialize, JsonSchema)]
enum Event {
    Stepped {},
}

impl Aggregate for Mix {
    const NAME: &'static str = "mix";
    type Command = Command;
    type Event = Event;

    fn decide(&self, _: Command) -> Result<Vec<Event>, Rejection> {
        Ok(vec![Event::Stepped {}])
    }

    fn evolve(self, _: &Event) -> Self {
        self
    }
}

/// One write on the shared keys.
#[derive(Debug)]
enum Write {
    Hset(&'static str, String, i64),
    Hincr(&'static str, String, i64),
    Hdel(&'static str, String),
    Zadd(&'static str, String, i64),
    Zincr(&'static str, String, i64),
    Zrem(&'static str, String),
    Sadd(&'static str, String),
    Srem(&'static str, String),
    Set(&'static str, i64),
    Del(&'static str),
}

const HASHES: [&str; 3] = ["h0", "h1", "h2"];
const ZSETS: [&str; 2] = ["z0", "z1"];
const SETS: [&str; 2] = ["s0", "s1"];
const STRINGS: [&str; 1] = ["str0"];

/// Every key the writes touch. Each keeps one kind (hash, sorted set, set, string), so no write
/// is refused and every event applies.
fn all_keys() -> Vec<&'static str> {
    [&HASHES[..], &ZSETS[..], &SETS[..], &STRINGS[..]].concat()
}

/// The writes of the event at stream sequence `seq`: one to four, drawn from `seq`.
fn writes_of(seq: u64) -> Vec<Write> {
    let mut rng = Rng::new(seq);
    let mut pick = |n: usize| rng.below(n);
    let count = 1 + pick(4);
    (0..count)
        .map(|_| {
            let (h, z, s) = (HASHES[pick(3)], ZSETS[pick(2)], SETS[pick(2)]);
            let (name, n) = (format!("f{}", pick(6)), pick(21) as i64 - 10);
            // Clearing a key is rare, so fields and members live through many batches.
            match pick(24) {
                0 | 1 => Write::Hset(h, name, n),
                2..=4 | 21 | 22 => Write::Hincr(h, name, n),
                5..=7 => Write::Hdel(h, name),
                8 => Write::Zadd(z, name, n),
                9..=11 => Write::Zincr(z, name, n),
                12 | 13 => Write::Zrem(z, name),
                14..=16 => Write::Sadd(s, name),
                17 | 18 => Write::Srem(s, name),
                19 | 20 => Write::Set(STRINGS[0], n),
                _ => Write::Del(all_keys()[pick(8)]),
            }
        })
        .collect()
}

struct Mixed;

const MIXED: &str = "mixed";

impl Projection for Mixed {
    const NAME: &'static str = MIXED;
    type Source = Mix;

    fn apply(&self, event: &Recorded<Event>, writes: &mut RedisWrites) -> Result<(), Refusal> {
        for write in writes_of(event.seq) {
            match write {
                Write::Hset(key, field, n) => writes.hset(key, &field, n),
                Write::Hincr(key, field, n) => writes.hincr(key, &field, n),
                Write::Hdel(key, field) => writes.hdel(key, &field),
                Write::Zadd(key, member, n) => writes.zadd(key, &member, n),
                Write::Zincr(key, member, n) => writes.zincr(key, &member, n),
                Write::Zrem(key, member) => writes.zrem(key, &member),
                Write::Sadd(key, member) => writes.sadd(key, &member),
                Write::Srem(key, member) => writes.srem(key, &member),
                Write::Set(key, n) => writes.set(key, n),
                Write::Del(key) => writes.del(key),
            };
        }
        Ok(())
    }
}

/// Sends the writes of the events at `1..=last` one at a time, as plain Redis commands, to the
/// keys `oracle:<key>`.
async fn one_at_a_time(connection: &mut redis::aio::MultiplexedConnection, last: u64) {
    for seq in 1..=last {
        for write in writes_of(seq) {
            let command = |name: &str, key: &str| {
                let mut command = redis::cmd(name);
                command.arg(format!("oracle:{key}"));
                command
            };
            let command = match write {
                Write::Hset(key, field, n) => command("HSET", key).arg(field).arg(n).clone(),
                Write::Hincr(key, field, n) => command("HINCRBY", key).arg(field).arg(n).clone(),
                Write::Hdel(key, field) => command("HDEL", key).arg(field).clone(),
                Write::Zadd(key, member, n) => command("ZADD", key).arg(n).arg(member).clone(),
                Write::Zincr(key, member, n) => command("ZINCRBY", key).arg(n).arg(member).clone(),
                Write::Zrem(key, member) => command("ZREM", key).arg(member).clone(),
                Write::Sadd(key, member) => command("SADD", key).arg(member).clone(),
                Write::Srem(key, member) => command("SREM", key).arg(member).clone(),
                Write::Set(key, n) => command("SET", key).arg(n).clone(),
                Write::Del(key) => command("DEL", key).clone(),
            };
            let _: redis::Value = command
                .query_async(connection)
                .await
                .unwrap_or_else(|e| panic!("the write one at a time of event {seq}: {e}"));
        }
    }
}

/// What a key holds, as a frontend reads it: its type and contents.
async fn contents(connection: &mut redis::aio::MultiplexedConnection, key: &str) -> String {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap();
    let held = match kind.as_str() {
        "hash" => format!(
            "{:?}",
            connection
                .hgetall::<_, BTreeMap<String, String>>(key)
                .await
                .unwrap()
        ),
        "zset" => format!(
            "{:?}",
            connection
                .zrange_withscores::<_, Vec<(String, String)>>(key, 0, -1)
                .await
                .unwrap()
        ),
        "set" => {
            let mut members: Vec<String> = connection.smembers(key).await.unwrap();
            members.sort();
            format!("{members:?}")
        }
        "string" => connection.get::<_, String>(key).await.unwrap(),
        _ => String::new(),
    };
    format!("{kind} {held}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_leaves_every_key_as_its_writes_one_at_a_time_would() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let config = projection_config(&nats, &redis);
    let function = jetfn::command_function::<Mix>()
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    // The events first, so the projection catches up on them in batches of hundreds.
    const EVENTS: u64 = 2000;
    for chunk in 0..EVENTS / 200 {
        let sends = (0..200).map(|n| {
            let client = client.clone();
            let id = format!("m{}", chunk * 200 + n);
            async move { send_raw(&client, &format!("cmd.mix.{id}.step"), "{}", None).await }
        });
        for sent in join_all(sends).await {
            assert!(sent.unwrap().reply.error_kind().is_none());
        }
    }
    let projection = jetfn::projection_function(Mixed)
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    ReadModel::connect(&redis.url(), MIXED)
        .await
        .unwrap()
        .wait_for(EVENTS, Duration::from_secs(60))
        .await
        .unwrap();

    let mut connection = redis.connect().await.unwrap();
    one_at_a_time(&mut connection, EVENTS).await;
    let keys = Keys::new(MIXED);
    let mut differences = Vec::new();
    for key in all_keys() {
        let batched = contents(&mut connection, &keys.key(1, key)).await;
        let single = contents(&mut connection, &format!("oracle:{key}")).await;
        if batched != single {
            differences.push(format!("{key}: batched {batched}, one at a time {single}"));
        }
    }
    assert!(differences.is_empty(), "{differences:#?}");
    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

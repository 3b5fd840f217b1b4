//! What a projection does with events its read model cannot hold, against real nats-server and
//! redis-server: a counter that would leave 64 bits, a value beyond Redis's integers, a write to a
//! key of the runtime. Each such event is dead-lettered whole (nothing of it is written, nothing
//! is written twice), the dead letter is stored even though the event carried JetStream's
//! optimistic-concurrency or atomic-batch headers, and later events still apply.
//!
//! The events come from a real command function of a small test aggregate, `tally`, whose commands
//! take any u64 (the account example limits amounts to 10^15, so it cannot produce them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn::projection::{DeadLetter, DeadLetters, RunningProjection};
use jetfn::readmodel::{Keys, ReadModel};
use jetfn::{Aggregate, Projection, Recorded, RedisWrites, Refusal, Rejection};
use jetfn_tests::commands::{send, send_raw, start_account};
use jetfn_tests::readmodels::{PROJECTION, projection_config, start_projection};
use jetfn_tests::workload::poll;
use jetfn_tests::{NatsServer, RedisServer};
use redis::AsyncCommands;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// A tally per id: the test's command side.
#[derive(Default)]
struct Tally;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    /// One event.
    Add { by: u64 },
    /// One event that takes away.
    Sub { by: u64 },
    /// Two events in one atomic batch.
    AddPair { first: u64, second: u64 },
    /// Raises the id's rank score.
    Rank { by: u64 },
    /// Notes a text of any length.
    Note { text: String },
}

#[derive(Serialize, Deserialize, JsonSchema)]
enum Event {
    Added { by: u64 },
    Subtracted { by: u64 },
    Ranked { by: u64 },
    Noted { text: String },
}

impl Aggregate for Tally {
    const NAME: &'static str = "tally";
    type Command = Command;
    type Event = Event;

    fn decide(&self, command: Command) -> Result<Vec<Event>, Rejection> {
        Ok(match command {
            Command::Add { by } => vec![Event::Added { by }],
            Command::Sub { by } => vec![Event::Subtracted { by }],
            Command::AddPair { first, second } => {
                vec![Event::Added { by: first }, Event::Added { by: second }]
            }
            Command::Rank { by } => vec![Event::Ranked { by }],
            Command::Note { text } => vec![Event::Noted { text }],
        })
    }

    fn evolve(self, _event: &Event) -> Self {
        self
    }
}

/// The read side: `tally:<id>` counts `sum` and `events`, `totals` sums every tally, the sorted
/// set `ranks` scores ids by their rankings, the hash `notes` holds each id's last note. Two
/// projection bugs on purpose: adding 0 deletes the
/// runtime's checkpoint, and ranking by 0 writes `ranks` as a hash.
struct Totals;

const TOTALS_PROJECTION: &str = "tally-totals";

impl Projection for Totals {
    const NAME: &'static str = TOTALS_PROJECTION;
    type Source = Tally;

    fn apply(&self, event: &Recorded<Event>, writes: &mut RedisWrites) -> Result<(), Refusal> {
        let key = format!("tally:{}", event.aggregate_id);
        let by = match event.event {
            Event::Added { by: 0 } => {
                writes.del("checkpoint");
                return Ok(());
            }
            Event::Added { by } => i128::from(by),
            Event::Subtracted { by } => -i128::from(by),
            Event::Ranked { by: 0 } => {
                writes.hset("ranks", &event.aggregate_id, 0);
                return Ok(());
            }
            Event::Ranked { by } => {
                writes.zincr("ranks", &event.aggregate_id, by);
                return Ok(());
            }
            Event::Noted { ref text } => {
                writes.hset("notes", &event.aggregate_id, text);
                return Ok(());
            }
        };
        writes
            .hincr(&key, "sum", by)
            .hincr(&key, "events", 1)
            .hincr("totals", "sum", by);
        Ok(())
    }
}

/// Both servers, the tally function and projection, a client and the dead-letter stream.
struct Side {
    _nats: NatsServer,
    redis: RedisServer,
    client: async_nats::Client,
    config: jetfn::Config,
    function: jetfn::command::RunningFunction,
    projection: RunningProjection,
}

impl Side {
    async fn start() -> Side {
        Side::start_after(0, |_| async {}).await
    }

    /// Starts, and waits until `ok` has one event applied, so that the version's keys exist;
    /// returns the event's sequence too.
    async fn start_with_one_applied() -> (Side, u64) {
        let side = Side::start().await;
        let ready = side.send("ok", "add", json!({"by": 1})).await;
        side.wait_for(ready).await;
        (side, ready)
    }

    /// Starts the servers and the tally function, lets `backlog` send what it likes, then
    /// starts the projection with batches of `batch` events (0: the default).
    async fn start_after<F: Future<Output = ()>>(
        batch: usize,
        backlog: impl FnOnce(async_nats::Client) -> F,
    ) -> Side {
        jetfn_tests::init_tracing();
        let nats = NatsServer::start().await.unwrap();
        let redis = RedisServer::start().await.unwrap();
        let mut config = projection_config(&nats, &redis);
        if batch > 0 {
            config.projection.batch = batch;
        }
        let function = jetfn::command_function::<Tally>()
            .with_config(config.clone())
            .start()
            .await
            .unwrap();
        let client = nats.connect().await.unwrap();
        backlog(client.clone()).await;
        let projection = jetfn::projection_function(Totals)
            .with_config(config.clone())
            .start()
            .await
            .unwrap();
        Side {
            _nats: nats,
            redis,
            client,
            config,
            function,
            projection,
        }
    }

    /// Sends a tally command and returns its reply's consistency token.
    async fn send(&self, id: &str, command: &str, body: serde_json::Value) -> u64 {
        let sent = send_raw(
            &self.client,
            &format!("cmd.tally.{id}.{command}"),
            body.to_string(),
            None,
        )
        .await
        .unwrap();
        sent.accepted().seq
    }

    /// Waits until the read model reflects `seq`: every event up to it applied or dead-lettered.
    async fn wait_for(&self, seq: u64) {
        ReadModel::connect(&self.redis.url(), TOTALS_PROJECTION)
            .await
            .unwrap()
            .wait_for(seq, Duration::from_secs(20))
            .await
            .unwrap();
    }

    /// The fields of a hash of the live version.
    async fn hash(&self, key: &str) -> BTreeMap<String, String> {
        let mut connection = self.redis.connect().await.unwrap();
        connection
            .hgetall(Keys::new(TOTALS_PROJECTION).key(1, key))
            .await
            .unwrap()
    }

    /// Checks that the dead letters are exactly the events at these sequences, in order, each
    /// error saying all of its fragments; returns them.
    async fn expect_dead_letters(&self, expected: &[(u64, &[&str])]) -> Vec<DeadLetter> {
        let letters = DeadLetters::connect(&self.config)
            .await
            .unwrap()
            .list(TOTALS_PROJECTION)
            .await
            .unwrap();
        // Filed in the order they were refused: one refused while its batch was prepared goes
        // before an earlier one refused by the apply step of the same batch.
        let mut letters = letters;
        letters.sort_by_key(|l| l.seq);
        let seqs: Vec<u64> = letters.iter().map(|l| l.seq).collect();
        let want: Vec<u64> = expected.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, want, "{letters:?}");
        for (letter, (_, fragments)) in letters.iter().zip(expected) {
            for fragment in *fragments {
                assert!(
                    letter.error.contains(fragment),
                    "the dead letter of {} should say {fragment:?}: {}",
                    letter.seq,
                    letter.error
                );
            }
        }
        letters
    }

    async fn stop(self) {
        self.projection.stop().await.unwrap();
        self.function.stop().await.unwrap();
    }
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn header(letter: &DeadLetter, name: &str) -> Option<String> {
    letter.headers.get(name).map(|v| v.as_str().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_would_overflow_a_counter_is_dead_lettered_whole_and_never_half_applied() {
    let side = Side::start().await;
    side.send("rich", "add", json!({"by": 9_223_372_036_854_775_707_u64}))
        .await;
    // `tally:poor` could take 1000, but `totals` cannot: nothing of this event may stay.
    let refused = side.send("poor", "add", json!({"by": 1000})).await;
    side.wait_for(refused).await;
    // Retried or half-applied writes would show up here while we wait for later events.
    side.send("rich", "sub", json!({"by": 9_223_372_036_854_775_707_u64}))
        .await;
    let last = side.send("poor", "add", json!({"by": 7})).await;
    side.wait_for(last).await;

    assert_eq!(
        side.hash("tally:poor").await,
        fields(&[("sum", "7"), ("events", "1")])
    );
    assert_eq!(
        side.hash("tally:rich").await,
        fields(&[("sum", "0"), ("events", "2")])
    );
    assert_eq!(side.hash("totals").await, fields(&[("sum", "7")]));
    side.expect_dead_letters(&[(refused, &["overflow", "totals"])])
        .await;
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_beyond_64_bits_are_dead_lettered_with_their_headers_and_later_events_apply() {
    let side = Side::start().await;
    side.send("x", "add", json!({"by": 10})).await;
    // The sum would leave 64 bits: refused inside the apply step.
    let overflow = side.send("x", "add", json!({"by": i64::MAX})).await;
    // Beyond i64 itself: refused by the write helper.
    let too_big = side
        .send("x", "add", json!({"by": 9_223_372_036_854_775_808_u64}))
        .await;
    let last = side.send("x", "add", json!({"by": 5})).await;
    side.wait_for(last).await;

    assert_eq!(
        side.hash("tally:x").await,
        fields(&[("sum", "15"), ("events", "2")])
    );
    let letters = side
        .expect_dead_letters(&[
            (overflow, &["overflow"]),
            (too_big, &["9223372036854775808", "64-bit integer range"]),
        ])
        .await;
    for letter in &letters {
        // Written by the command function with optimistic concurrency: the precondition is kept
        // under another name, so the dead-letter stream does not check it again.
        assert_eq!(header(letter, "Nats-Expected-Last-Subject-Sequence"), None);
        assert!(
            header(letter, "jetfn-dlq-orig-Nats-Expected-Last-Subject-Sequence").is_some(),
            "{:?}",
            letter.headers
        );
        assert_eq!(header(letter, "ce-type").as_deref(), Some("Added"));
        assert_eq!(letter.event_type, "Added");
    }
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_reach_both_ends_of_64_bits_exactly_and_no_further() {
    let side = Side::start().await;
    let max = i64::MAX as u64;
    let mut refused = Vec::new();
    side.send("b", "add", json!({"by": max})).await; // i64::MAX
    refused.push(side.send("b", "add", json!({"by": 1})).await);
    side.send("b", "sub", json!({"by": max})).await; // 0
    side.send("b", "sub", json!({"by": max})).await; // -i64::MAX
    side.send("b", "sub", json!({"by": 1})).await; // i64::MIN
    refused.push(side.send("b", "sub", json!({"by": 1})).await);
    side.send("b", "add", json!({"by": max})).await; // -1
    let last = side.send("b", "add", json!({"by": 1})).await; // 0
    side.wait_for(last).await;

    assert_eq!(
        side.hash("tally:b").await,
        fields(&[("sum", "0"), ("events", "6")])
    );
    assert_eq!(side.hash("totals").await, fields(&[("sum", "0")]));
    side.expect_dead_letters(&[
        (refused[0], &["holds 9223372036854775807"]),
        (refused[1], &["holds -9223372036854775808"]),
    ])
    .await;
    side.stop().await;
}

/// The apply step adds counters below 2^53 as doubles and larger ones digit by digit: a counter
/// that crosses 2^53 and comes back, in a backlog applied in as few batches as it takes, stays
/// exact on both sides of the line, and still stops at 2^63 - 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_crossing_2_to_the_53_in_a_backlog_stay_exact() {
    const SAFE: u64 = (1 << 53) - 1;
    let max = i64::MAX as u64;
    let steps = [
        ("add", SAFE - 1),
        ("add", 1), // 2^53 - 1: the largest a double holds exactly with all below it
        ("add", 1), // 2^53
        ("add", 1), // 2^53 + 1, which no double holds
        ("sub", SAFE + 2), // 0
        ("add", 3),
        ("add", max - 3), // 2^63 - 1
        ("add", 1),       // would overflow: refused
        ("sub", 1),
    ];
    let side = Side::start_after(0, |client| async move {
        for (command, by) in steps {
            let subject = format!("cmd.tally.big.{command}");
            let body = json!({ "by": by }).to_string();
            send_raw(&client, &subject, body, None).await.unwrap();
        }
    })
    .await;
    side.wait_for(steps.len() as u64).await;

    let end = (max - 1).to_string();
    assert_eq!(
        side.hash("tally:big").await,
        fields(&[("sum", &end), ("events", "8")])
    );
    assert_eq!(side.hash("totals").await, fields(&[("sum", &end)]));
    side.expect_dead_letters(&[(8, &["holds 9223372036854775807"])])
        .await;
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_past_2_to_the_53_and_writes_of_the_wrong_type_are_dead_lettered() {
    let side = Side::start().await;
    let safe = (1_u64 << 53) - 1;
    side.send("top", "rank", json!({"by": safe - 1})).await;
    side.send("top", "rank", json!({"by": 1})).await; // 2^53 - 1: the largest exact score
    let refused = side.send("top", "rank", json!({"by": 1})).await;
    let wrong_type = side.send("bad", "rank", json!({"by": 0})).await;
    let last = side.send("low", "rank", json!({"by": 5})).await;
    side.wait_for(last).await;

    let mut connection = side.redis.connect().await.unwrap();
    let ranks: Vec<(String, u64)> = connection
        .zrange_withscores(Keys::new(TOTALS_PROJECTION).key(1, "ranks"), 0, -1)
        .await
        .unwrap();
    assert_eq!(ranks, [("low".to_owned(), 5), ("top".to_owned(), safe)]);
    side.expect_dead_letters(&[
        (refused, &["ZINCRBY", "2^53"]),
        (wrong_type, &["WRONGTYPE", "HSET needs a hash"]),
    ])
    .await;
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_on_keys_another_client_gave_another_type_are_dead_lettered() {
    let (side, _) = Side::start_with_one_applied().await;
    // Someone with write access turns the counter hash into a string and the sorted set into
    // a hash: the increments' own reads (HGET, ZSCORE) meet keys of the wrong type.
    let keys = Keys::new(TOTALS_PROJECTION);
    let mut connection = side.redis.connect().await.unwrap();
    let () = connection
        .set(keys.key(1, "tally:bad"), "not a hash")
        .await
        .unwrap();
    let () = connection
        .hset(keys.key(1, "ranks"), "x", "1")
        .await
        .unwrap();
    let counter = side.send("bad", "add", json!({"by": 2})).await;
    let rank = side.send("top", "rank", json!({"by": 3})).await;
    let last = side.send("ok", "add", json!({"by": 4})).await;
    side.wait_for(last).await;

    assert_eq!(
        side.hash("tally:ok").await,
        fields(&[("sum", "5"), ("events", "2")])
    );
    assert_eq!(side.hash("totals").await, fields(&[("sum", "5")]));
    side.expect_dead_letters(&[
        (
            counter,
            &["WRONGTYPE", "tally:bad is a string", "HINCRBY needs a hash"],
        ),
        (
            rank,
            &["WRONGTYPE", "ranks is a hash", "ZINCRBY needs a zset"],
        ),
    ])
    .await;
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_after_the_checks_marks_the_version_and_stops_the_projection() {
    let (side, ready) = Side::start_with_one_applied().await;
    // The change feed is no read model key of the projection's, so the checks leave it alone;
    // turned into a string behind the projection's back, its XADD fails after the event's
    // counters were written.
    let keys = Keys::new(TOTALS_PROJECTION);
    let mut connection = side.redis.connect().await.unwrap();
    let () = connection
        .set(keys.changes(1), "not a stream")
        .await
        .unwrap();
    side.send("ok", "add", json!({"by": 2})).await;

    let mark: String = poll("the failure mark", Duration::from_secs(20), || {
        let mut connection = connection.clone();
        let key = keys.failed(1);
        async move { Ok(connection.get(key).await?) }
    })
    .await
    .unwrap();
    assert!(
        mark.contains("a write failed half-way through a batch"),
        "{mark}"
    );
    assert!(mark.contains("WRONGTYPE"), "{mark}");
    let checkpoint: String = connection.hget(keys.checkpoint(1), "p0").await.unwrap();
    assert_eq!(
        checkpoint,
        ready.to_string(),
        "the failed batch is not committed"
    );
    let stopped = side.projection.stop().await;
    let error = stopped
        .expect_err("the projection ends with the failure")
        .to_string();
    assert!(error.contains("half-way"), "{error}");
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_every_length_reach_the_read_model_whole() {
    let side = Side::start().await;
    // Each length on both sides of a size class of the apply step's packed batch (MessagePack
    // strings of up to 31 and 255 bytes, and up to 65,535: a command body is at most 65,536
    // bytes), in bytes of a two-byte character.
    let lengths = [0, 1, 31, 32, 255, 256, 65_500];
    let text = |len: usize| "é".repeat(len / 2) + &"o".repeat(len % 2);
    let mut last = 0;
    for (k, len) in lengths.iter().enumerate() {
        last = side
            .send(&format!("n{k}"), "note", json!({"text": text(*len)}))
            .await;
    }
    side.wait_for(last).await;
    let notes = side.hash("notes").await;
    for (k, len) in lengths.iter().enumerate() {
        let note = &notes[&format!("n{k}")];
        assert_eq!(note.len(), *len, "the note of n{k}");
        assert_eq!(*note, text(*len));
    }
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_of_an_atomic_batch_is_dead_lettered_and_its_sibling_applies() {
    let side = Side::start().await;
    let last = side
        .send(
            "pair",
            "add_pair",
            json!({"first": 3, "second": 18_446_744_073_709_551_615_u64}),
        )
        .await;
    side.wait_for(last).await;

    assert_eq!(
        side.hash("tally:pair").await,
        fields(&[("sum", "3"), ("events", "1")])
    );
    let letters = side
        .expect_dead_letters(&[(last, &["64-bit integer range"])])
        .await;
    let letter = &letters[0];
    for name in ["Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit"] {
        assert_eq!(header(letter, name), None, "{name} was copied");
    }
    assert!(
        header(letter, "jetfn-dlq-orig-Nats-Batch-Id").is_some(),
        "the batch id should be kept: {:?}",
        letter.headers
    );
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_writing_the_runtimes_checkpoint_is_dead_lettered_and_the_checkpoint_stays() {
    let side = Side::start().await;
    side.send("c", "add", json!({"by": 2})).await;
    let vandal = side.send("c", "add", json!({"by": 0})).await;
    let last = side.send("c", "add", json!({"by": 3})).await;
    side.wait_for(last).await;

    assert_eq!(side.hash("checkpoint").await["p0"], last.to_string());
    assert_eq!(
        side.hash("tally:c").await,
        fields(&[("sum", "5"), ("events", "2")])
    );
    side.expect_dead_letters(&[(vandal, &["\"checkpoint\"", "runtime"])])
        .await;
    side.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_example_refuses_amounts_its_read_model_could_not_hold() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let config = projection_config(&nats, &redis);
    let function = start_account(config.clone()).await.unwrap();
    let projection = start_projection(config.clone()).await.unwrap();
    let client = nats.connect().await.unwrap();

    let rich = send(
        &client,
        "rich",
        "open",
        json!({"owner": "Rich", "initial_deposit": 9_223_372_036_854_775_707_u64}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(rich.error_code.as_deref(), Some("400"), "{:?}", rich.body);
    assert!(
        rich.body.to_string().contains("/initial_deposit"),
        "{}",
        rich.body
    );
    send(&client, "poor", "open", json!({"owner": "Poor"}), None)
        .await
        .unwrap()
        .accepted();
    let deposit = send(&client, "poor", "deposit", json!({"amount": 1000}), None)
        .await
        .unwrap();
    let too_much = send(
        &client,
        "poor",
        "deposit",
        json!({"amount": 999_999_999_999_001_u64}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        too_much.error_code.as_deref(),
        Some("422"),
        "{:?}",
        too_much.body
    );

    let model = ReadModel::connect(&redis.url(), PROJECTION).await.unwrap();
    model
        .wait_for(deposit.accepted().seq, Duration::from_secs(20))
        .await
        .unwrap();
    let mut connection = redis.connect().await.unwrap();
    let balance: i64 = connection
        .hget(Keys::new(PROJECTION).key(1, "account:poor"), "balance")
        .await
        .unwrap();
    assert_eq!(balance, 1000);
    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

/// Catching up, a batch goes to Redis while the one before it is still being applied. When that
/// one is refused an event, the batch behind it must not commit past it: every refused event is
/// dead-lettered once, and every other event applies exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_in_a_backlog_of_small_batches_leave_every_other_event_applied_once() {
    const EVENTS: u64 = 240;
    let poisoned = |i: u64| i % 17 == 5;
    let side = Side::start_after(8, |client| async move {
        for i in 0..EVENTS {
            let id = format!("r{}", i % 7);
            let by = if poisoned(i) { 0 } else { 1 };
            let subject = format!("cmd.tally.{id}.rank");
            let body = json!({ "by": by }).to_string();
            send_raw(&client, &subject, body, None).await.unwrap();
        }
    })
    .await;
    side.wait_for(EVENTS).await;

    // Event i is at sequence i + 1; a poisoned one writes `ranks` as a hash: refused.
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for i in (0..EVENTS).filter(|i| !poisoned(*i)) {
        *expected.entry(format!("r{}", i % 7)).or_default() += 1;
    }
    let mut connection = side.redis.connect().await.unwrap();
    let ranks: Vec<(String, u64)> = connection
        .zrange_withscores(Keys::new(TOTALS_PROJECTION).key(1, "ranks"), 0, -1)
        .await
        .unwrap();
    let ranks: BTreeMap<String, u64> = ranks.into_iter().collect();
    assert_eq!(ranks, expected);
    let refused: Vec<(u64, &[&str])> = (0..EVENTS)
        .filter(|i| poisoned(*i))
        .map(|i| (i + 1, &["WRONGTYPE"][..]))
        .collect();
    side.expect_dead_letters(&refused).await;
    side.stop().await;
}

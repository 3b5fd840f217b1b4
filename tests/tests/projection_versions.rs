//! Read-model versions, dead letters, partitions and stats of the account projection, against
//! real nats-server and redis-server.
//!
//! Every wait here is a bounded poll: no test asserts how fast something happens, only that it
//! happens within a generous limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Result, ensure};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jetfn::projection::RunningProjection;
use jetfn::readmodel::Keys;
use jetfn::{Aggregate, Projection, Recorded, RedisWrites, Refusal, Rejection};
use jetfn_tests::RedisServer;
use jetfn_tests::commands::{ACCOUNT_STREAM, send, stored_messages, stream};
use jetfn_tests::readmodels::{
    FeedOrder, PROJECTION, ReadSide, check_read_model, check_read_side, start_projection,
    wait_until_caught_up,
};
use jetfn_tests::workload::{Rng, poll, stream_last_seq};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The fields every account hash of the account projection has.
const ACCOUNT_FIELDS: [&str; 5] = ["owner", "balance", "status", "version", "seq"];

/// FNV-1a (32 bit) modulo `partitions`: the partition the runtime routes an aggregate id to.
fn partition_of(id: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions
}

/// Opens `ids` with an initial deposit, 32 at a time.
async fn open_accounts(client: &async_nats::Client, ids: &[String], deposit: u64) -> Result<()> {
    let mut opened = futures::stream::iter(ids.iter().map(|id| {
        let body = json!({"owner": format!("Owner of {id}"), "initial_deposit": deposit});
        accepted(client, id, "open", body)
    }))
    .buffer_unordered(32);
    while let Some(result) = opened.next().await {
        result?;
    }
    Ok(())
}

/// Sends a command that must be accepted.
async fn accepted(
    client: &async_nats::Client,
    id: &str,
    command: &str,
    body: Value,
) -> Result<u64> {
    let sent = send(client, id, command, body, None).await?;
    ensure!(
        sent.body["ok"] == json!(true),
        "{command} on {id}: {}",
        sent.body
    );
    Ok(sent.accepted().seq)
}

/// Every key of `pattern`, by SCAN.
async fn scan_keys(
    connection: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await?;
        found.extend(keys);
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

/// Rebuilds the read model of `side` (at most 30 s) and returns the new version.
async fn rebuild(side: &ReadSide) -> u64 {
    tokio::time::timeout(
        Duration::from_secs(30),
        jetfn::projection_function(account_projection::AccountBalances)
            .with_config(side.config.clone())
            .rebuild(),
    )
    .await
    .expect("rebuild did not finish within 30 s")
    .unwrap()
}

/// The names of the account stream's consumers.
async fn consumer_names(client: &async_nats::Client) -> Result<BTreeSet<String>> {
    let stream = stream(client, ACCOUNT_STREAM).await?;
    let mut names = stream.consumer_names();
    let mut found = BTreeSet::new();
    while let Some(name) = names.next().await {
        found.insert(name?);
    }
    Ok(found)
}

// --- 1. rebuild under readers -------------------------------------------------------------------

/// What one reader saw while a rebuild ran.
#[derive(Debug, Default)]
struct ReaderReport {
    reads: u64,
    violations: Vec<String>,
    /// The distinct values of the active pointer, in the order seen.
    actives: Vec<u64>,
}

/// Reads like a frontend until `stop`: the active pointer, then a random account in that version.
async fn read_like_a_frontend(
    mut connection: redis::aio::MultiplexedConnection,
    ids: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Result<ReaderReport> {
    let keys = Keys::new(PROJECTION);
    let mut rng = Rng::new(seed);
    let mut report = ReaderReport::default();
    while !stop.load(Ordering::Relaxed) {
        let active: Option<u64> = connection.get(keys.active()).await?;
        let Some(active) = active else {
            if report.violations.len() < 20 {
                report.violations.push("no active version".into());
            }
            continue;
        };
        if report.actives.last() != Some(&active) {
            report.actives.push(active);
        }
        let id = &ids[rng.below(ids.len())];
        let key = keys.key(active, &account_projection::account_key(id));
        let hash: HashMap<String, String> = connection.hgetall(&key).await?;
        report.reads += 1;
        let missing: Vec<&str> = ACCOUNT_FIELDS
            .iter()
            .copied()
            .filter(|field| !hash.contains_key(*field))
            .collect();
        if !missing.is_empty() && report.violations.len() < 20 {
            report
                .violations
                .push(format!("{key} lacks {missing:?}: {hash:?}"));
        }
    }
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_while_readers_poll_never_shows_a_missing_or_partial_account() {
    let side = ReadSide::start_with(|config| {
        config.projection.rebuild_grace = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let (client, redis) = (&side.client, &side.redis);

    let ids: Vec<String> = (0..200).map(|n| format!("acc-{n:03}")).collect();
    open_accounts(client, &ids, 100).await.unwrap();
    for (n, id) in ids.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
        accepted(client, id, "deposit", json!({"amount": n + 1}))
            .await
            .unwrap();
    }
    wait_until_caught_up(client, redis, 1, Duration::from_secs(20))
        .await
        .unwrap();
    let mut connection = redis.connect().await.unwrap();
    let keys = Keys::new(PROJECTION);
    let active: Option<u64> = connection.get(keys.active()).await.unwrap();
    assert_eq!(active, Some(1));

    let ids = Arc::new(ids);
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for seed in 1..=4 {
        readers.push(tokio::spawn(read_like_a_frontend(
            redis.connect().await.unwrap(),
            ids.clone(),
            stop.clone(),
            seed,
        )));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for seed in 0..3 {
        let (client, ids, stop, sent) = (client.clone(), ids.clone(), stop.clone(), sent.clone());
        senders.push(tokio::spawn(async move {
            let mut rng = Rng::new(100 + seed);
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[rng.below(ids.len())];
                accepted(&client, id, "deposit", json!({"amount": 1})).await?;
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(())
        }));
    }
    // Let the readers and the senders get going against version 1 first.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let version = rebuild(&side).await;
    assert_eq!(version, 2, "the rebuild reports the new version");

    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap().unwrap();
    }
    assert!(
        sent.load(Ordering::Relaxed) > 0,
        "commands kept coming during the rebuild"
    );
    for (n, reader) in readers.into_iter().enumerate() {
        let report = reader.await.unwrap().unwrap();
        assert!(report.reads > 0, "reader {n} read nothing");
        assert!(
            report.violations.is_empty(),
            "reader {n} saw missing or partial accounts: {:?}",
            report.violations
        );
        assert_eq!(
            report.actives,
            [1, 2],
            "reader {n}: the active pointer must flip once, from 1 to 2"
        );
    }

    let leftovers = scan_keys(&mut connection, &format!("{}*", keys.prefix(1)))
        .await
        .unwrap();
    assert!(
        leftovers.is_empty(),
        "version 1 keys remain after the rebuild returned: {leftovers:?}"
    );
    let consumers = consumer_names(client).await.unwrap();
    assert!(
        !consumers
            .iter()
            .any(|c| c.starts_with("account-balances-g")),
        "build consumers remain: {consumers:?}"
    );

    // The live projection follows version 2.
    accepted(client, &ids[7], "withdraw", json!({"amount": 1}))
        .await
        .unwrap();
    accepted(client, "late-account", "open", json!({"owner": "Late"}))
        .await
        .unwrap();
    wait_until_caught_up(client, redis, 1, Duration::from_secs(20))
        .await
        .unwrap();
    let active: Option<u64> = connection.get(keys.active()).await.unwrap();
    assert_eq!(active, Some(2));
    // Version 2 was built from the first event: its change feed holds every event once.
    check_read_side(client, redis, 2, 1, FeedOrder::PerAccount)
        .await
        .unwrap();

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

// --- 2. dead letters -----------------------------------------------------------------------------

/// The account aggregate as a later release knows it: one more event type. Same name, so it reads
/// the same stream.
#[derive(Default)]
struct TeleportingAccount;

#[derive(Deserialize, schemars::JsonSchema)]
enum NoCommand {}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
enum TeleportingEvent {
    AccountOpened { owner: String },
    MoneyDeposited { amount: u64 },
    MoneyWithdrawn { amount: u64 },
    AccountClosed {},
    MoneyTeleported { amount: u64 },
}

impl Aggregate for TeleportingAccount {
    const NAME: &'static str = "account";
    type Command = NoCommand;
    type Event = TeleportingEvent;

    fn decide(&self, command: NoCommand) -> Result<Vec<TeleportingEvent>, Rejection> {
        match command {}
    }

    fn evolve(self, _event: &TeleportingEvent) -> Self {
        self
    }
}

/// The account projection, fixed to handle `MoneyTeleported`.
struct FixedBalances;

impl Projection for FixedBalances {
    const NAME: &'static str = "account-balances";
    type Source = TeleportingAccount;

    fn apply(
        &self,
        event: &Recorded<TeleportingEvent>,
        writes: &mut RedisWrites,
    ) -> Result<(), Refusal> {
        let known = match &event.event {
            TeleportingEvent::MoneyTeleported { amount } => {
                let amount = i64::try_from(*amount).map_err(|_| Refusal::from("too much"))?;
                writes.hincr(
                    &account_projection::account_key(&event.aggregate_id),
                    "teleported",
                    amount,
                );
                return Ok(());
            }
            TeleportingEvent::AccountOpened { owner } => account::Event::AccountOpened {
                owner: owner.clone(),
            },
            TeleportingEvent::MoneyDeposited { amount } => {
                account::Event::MoneyDeposited { amount: *amount }
            }
            TeleportingEvent::MoneyWithdrawn { amount } => {
                account::Event::MoneyWithdrawn { amount: *amount }
            }
            TeleportingEvent::AccountClosed {} => account::Event::AccountClosed {},
        };
        account_projection::AccountBalances.apply(&event.with_event(known), writes)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_a_scaler_watches_keeps_its_name_across_a_rebuild() {
    let side = ReadSide::start_with(|config| {
        config.projection.rebuild_grace = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let (client, redis) = (&side.client, &side.redis);
    let live = jetfn::wire::names::live_projection_consumer(PROJECTION, 0);
    let ids: Vec<String> = (0..20).map(|n| format!("keda-{n:02}")).collect();
    open_accounts(client, &ids, 10).await.unwrap();
    wait_until_caught_up(client, redis, 1, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        consumer_names(client).await.unwrap(),
        BTreeSet::from([live.clone()]),
        "before the rebuild"
    );

    let version = rebuild(&side).await;
    assert_eq!(version, 2);
    let last = accepted(client, &ids[0], "deposit", json!({"amount": 5}))
        .await
        .unwrap();
    // The live instance reads version 2 through the consumer of the same name: its ack floor
    // reaches the command sent after the rebuild.
    let url = redis.url();
    poll(
        "the live consumer past the new command",
        Duration::from_secs(20),
        || {
            let (client, live, url) = (client.clone(), live.clone(), url.clone());
            async move {
                let floor = jetfn_tests::readmodels::consumer_ack_floor(&client, &live).await?;
                let at = jetfn_tests::readmodels::read_model_checkpoint(&url, 1).await?;
                Ok((floor >= last && at == Some((2, last))).then_some(()))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        consumer_names(client).await.unwrap(),
        BTreeSet::from([live]),
        "after the rebuild: the build consumers are gone, the live one stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_with_its_metadata_and_later_events_still_apply() {
    let side = ReadSide::start().await.unwrap();
    let (client, redis, config) = (&side.client, &side.redis, &side.config);

    accepted(
        client,
        "tele",
        "open",
        json!({"owner": "Scotty", "initial_deposit": 10}),
    )
    .await
    .unwrap();
    accepted(client, "other", "open", json!({"owner": "Other"}))
        .await
        .unwrap();

    // An event type this projection's code does not know, as a newer release would store it.
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-type", "MoneyTeleported");
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-subject", "tele");
    let poison_seq = js
        .publish_with_headers(
            "evt.account.tele",
            headers,
            bytes::Bytes::from_static(br#"{"amount":5}"#),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;

    // Later events, of other accounts, keep flowing.
    accepted(client, "other", "deposit", json!({"amount": 40}))
        .await
        .unwrap();
    accepted(client, "after", "open", json!({"owner": "After"}))
        .await
        .unwrap();
    let last = accepted(client, "other", "withdraw", json!({"amount": 15}))
        .await
        .unwrap();
    assert!(last > poison_seq);
    wait_until_caught_up(client, redis, 1, Duration::from_secs(20))
        .await
        .unwrap();
    check_read_model(client, redis, 1).await.unwrap();
    // check_read_model saw every checkpoint at the stream's end; the instance reports it too.
    let end = stream_last_seq(client).await.unwrap();
    poll(
        "the running projection reports its checkpoint past the poison event",
        Duration::from_secs(10),
        || async { Ok((side.projection.checkpoint() == end).then_some(())) },
    )
    .await
    .unwrap();

    let dead_letters = jetfn::projection::DeadLetters::connect(config)
        .await
        .unwrap();
    let letters = dead_letters.list(PROJECTION).await.unwrap();
    assert_eq!(letters.len(), 1, "exactly one dead letter: {letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.subject, "evt.account.tele");
    assert_eq!(letter.seq, poison_seq);
    assert_eq!(letter.event_type, "MoneyTeleported");
    assert_eq!(letter.projection, PROJECTION);
    assert_eq!(letter.stream, ACCOUNT_STREAM);
    assert!(
        letter.error.contains("MoneyTeleported"),
        "the error names the type: {:?}",
        letter.error
    );
    assert!(letter.deliveries >= 1, "deliveries: {}", letter.deliveries);
    assert_eq!(
        serde_json::from_slice::<Value>(&letter.payload).unwrap(),
        json!({"amount": 5})
    );

    // Replay with code that knows the type, while the real projection keeps running.
    let mut connection = redis.connect().await.unwrap();
    let tele_key = Keys::new(PROJECTION).key(1, &account_projection::account_key("tele"));
    let replay = || {
        jetfn::projection_function(FixedBalances)
            .with_config(config.clone())
            .replay_dead_letters()
    };
    assert_eq!(replay().await.unwrap(), 1, "one dead letter applied");
    let teleported: Option<i64> = connection.hget(&tele_key, "teleported").await.unwrap();
    assert_eq!(teleported, Some(5));
    assert!(
        dead_letters.list(PROJECTION).await.unwrap().is_empty(),
        "an applied dead letter is removed"
    );
    assert_eq!(replay().await.unwrap(), 0, "nothing left to replay");
    let teleported: Option<i64> = connection.hget(&tele_key, "teleported").await.unwrap();
    assert_eq!(teleported, Some(5), "applied once");

    // A copy of the letter (as after a crash between the apply and the removal) changes nothing.
    let mut copy = letter.headers.clone();
    copy.insert("Nats-Msg-Id", "a-copy-of-the-dead-letter");
    js.publish_with_headers(
        format!("jetfn.dlq.{PROJECTION}"),
        copy,
        letter.payload.clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(dead_letters.list(PROJECTION).await.unwrap().len(), 1);
    replay().await.unwrap();
    let teleported: Option<i64> = connection.hget(&tele_key, "teleported").await.unwrap();
    assert_eq!(
        teleported,
        Some(5),
        "a dead letter applies once per version"
    );
    assert!(dead_letters.list(PROJECTION).await.unwrap().is_empty());

    // The account keeps what the live projection wrote, plus the replayed field.
    let hash: BTreeMap<String, String> = connection.hgetall(&tele_key).await.unwrap();
    let tele_open_seq = stored_messages(client, ACCOUNT_STREAM, Some("evt.account.tele"))
        .await
        .unwrap()
        .iter()
        .filter(|m| m.header("ce-type") == "MoneyDeposited")
        .map(|m| m.seq)
        .max()
        .unwrap();
    let want: BTreeMap<String, String> = [
        ("owner", "Scotty".to_owned()),
        ("balance", "10".to_owned()),
        ("status", "open".to_owned()),
        ("version", "2".to_owned()),
        ("seq", tele_open_seq.to_string()),
        ("teleported", "5".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(hash, want);

    // The live projection still applies new events.
    accepted(client, "other", "deposit", json!({"amount": 1}))
        .await
        .unwrap();
    wait_until_caught_up(client, redis, 1, Duration::from_secs(20))
        .await
        .unwrap();
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

// --- 3. partitions ----------------------------------------------------------------------------

/// Sends `rounds` deposits and withdrawals to each account, two concurrent senders per account.
async fn churn(client: &async_nats::Client, ids: &[String], rounds: usize) -> Result<()> {
    let mut senders = FuturesUnordered::new();
    for (n, id) in ids.iter().enumerate() {
        for lane in 0..2u64 {
            let client = client.clone();
            senders.push(async move {
                let mut rng = Rng::new(n as u64 * 2 + lane + 1);
                for round in 0..rounds {
                    if round % 3 == 2 {
                        let amount = rng.below(5) + 1;
                        accepted(&client, id, "withdraw", json!({"amount": amount})).await?;
                    } else {
                        let amount = rng.below(10) + 1;
                        accepted(&client, id, "deposit", json!({"amount": amount})).await?;
                    }
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(result) = senders.next().await {
        result?;
    }
    Ok(())
}

/// After another instance stopped: waits until all `partitions` reach the stream's end within
/// `timeout`, checks the read model and its change feed, and that `remaining` reports the end
/// itself, so it is the one that applied the latest events.
async fn taken_over_by(
    remaining: &RunningProjection,
    client: &async_nats::Client,
    redis: &RedisServer,
    partitions: u32,
    order: FeedOrder,
    timeout: Duration,
) -> Result<()> {
    let last = stream_last_seq(client).await?;
    wait_until_caught_up(client, redis, partitions, timeout).await?;
    check_read_side(client, redis, 1, partitions, order).await?;
    poll(
        "the remaining instance reports the stream's end",
        Duration::from_secs(10),
        || async { Ok((remaining.checkpoint() >= last).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_partitions_on_two_instances_keep_each_accounts_order() {
    let side = ReadSide::start_with(|config| {
        config.projection.partitions = 4;
        config.projection.pin_timeout = Duration::from_secs(2);
        config.projection.batch = 50;
    })
    .await
    .unwrap();
    let (client, redis) = (&side.client, &side.redis);
    let second = start_projection(side.config.clone()).await.unwrap();

    let ids: Vec<String> = (0..40).map(|n| format!("p-{n:02}")).collect();
    let partitions: BTreeSet<u32> = ids.iter().map(|id| partition_of(id, 4)).collect();
    assert_eq!(partitions.len(), 4, "the accounts cover every partition");
    open_accounts(client, &ids, 1000).await.unwrap();
    churn(client, &ids, 30).await.unwrap();
    let events = stream_last_seq(client).await.unwrap();
    assert!(events >= 2000, "only {events} events");

    wait_until_caught_up(client, redis, 4, Duration::from_secs(30))
        .await
        .unwrap();
    check_read_side(client, redis, 1, 4, FeedOrder::PerAccount)
        .await
        .unwrap();

    // The first instance goes away while commands keep coming: the second takes every partition.
    let more = {
        let (client, ids) = (client.clone(), ids.clone());
        tokio::spawn(async move { churn(&client, &ids, 3).await })
    };
    side.projection.stop().await.unwrap();
    more.await.unwrap().unwrap();
    churn(client, &ids, 1).await.unwrap();
    // Only the second instance is left to have applied the latest events of all four partitions,
    // and it reports so.
    taken_over_by(
        &second,
        client,
        redis,
        4,
        FeedOrder::PerAccount,
        Duration::from_secs(30),
    )
    .await
    .unwrap();

    second.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_hands_its_partition_to_a_standby_at_once() {
    // No pin expires within the test: the standby gets the partition only if the stopping
    // instance hands it over.
    let side = ReadSide::start_with(|config| {
        config.projection.pin_timeout = Duration::from_secs(600);
    })
    .await
    .unwrap();
    let (client, redis) = (&side.client, &side.redis);
    let other = start_projection(side.config.clone()).await.unwrap();

    let ids: Vec<String> = (0..8).map(|n| format!("h-{n}")).collect();
    open_accounts(client, &ids, 10).await.unwrap();
    wait_until_caught_up(client, redis, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let opened = stream_last_seq(client).await.unwrap();
    let first = side.projection;
    poll(
        "one instance reports the partition",
        Duration::from_secs(10),
        || async {
            Ok((first.checkpoint() >= opened || other.checkpoint() >= opened).then_some(()))
        },
    )
    .await
    .unwrap();
    let (serving, standby) = if first.checkpoint() >= opened {
        (first, other)
    } else {
        (other, first)
    };

    serving.stop().await.unwrap();
    churn(client, &ids, 2).await.unwrap();
    // Far below the pin timeout: only a hand-over gets here.
    taken_over_by(
        &standby,
        client,
        redis,
        1,
        FeedOrder::Stream,
        Duration::from_secs(60),
    )
    .await
    .unwrap();

    standby.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_right_after_a_stop_reach_the_next_instance_before_the_pin_timeout() {
    // No pin expires within the test.
    let side = ReadSide::start_with(|config| {
        config.projection.pin_timeout = Duration::from_secs(600);
        config.projection.partitions = 4;
    })
    .await
    .unwrap();
    let (client, redis) = (&side.client, &side.redis);
    let other = start_projection(side.config.clone()).await.unwrap();
    let ids: Vec<String> = (0..40).map(|n| format!("d-{n}")).collect();
    open_accounts(client, &ids, 10).await.unwrap();
    wait_until_caught_up(client, redis, 4, Duration::from_secs(30))
        .await
        .unwrap();

    // Each instance stands by for the partitions the other serves. The standbys' last pull
    // requests (they carry no pin) still wait at the server when the next events arrive (they
    // expire after half the pin timeout, at most 5 s): nats-server pins one of them, though its
    // client is gone, and keeps the pin.
    side.projection.stop().await.unwrap();
    other.stop().await.unwrap();
    churn(client, &ids, 1).await.unwrap();
    let next = start_projection(side.config.clone()).await.unwrap();
    wait_until_caught_up(client, redis, 4, Duration::from_secs(60))
        .await
        .unwrap();
    check_read_side(client, redis, 1, 4, FeedOrder::PerAccount)
        .await
        .unwrap();

    next.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

/// Messages the consumers of `stream_name` have delivered, redeliveries included, by consumer.
async fn deliveries(
    client: &async_nats::Client,
    stream_name: &str,
) -> Result<BTreeMap<String, u64>> {
    let stream = stream(client, stream_name).await?;
    let mut consumers = stream.consumers();
    let mut delivered = BTreeMap::new();
    while let Some(info) = consumers.next().await {
        let info = info?;
        delivered.insert(info.name.clone(), info.delivered.consumer_sequence);
    }
    Ok(delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partitions_each_read_only_their_own_events_and_idle_ones_pass_tokens() {
    let side = ReadSide::start_with(|config| {
        config.projection.partitions = 4;
        config.projection.batch = 50;
    })
    .await
    .unwrap();
    let (client, redis) = (&side.client, &side.redis);
    let ids: Vec<String> = (0..40).map(|n| format!("q-{n:02}")).collect();
    open_accounts(client, &ids, 10).await.unwrap();
    churn(client, &ids, 5).await.unwrap();
    let events = stream_last_seq(client).await.unwrap();
    wait_until_caught_up(client, redis, 4, Duration::from_secs(30))
        .await
        .unwrap();
    check_read_side(client, redis, 1, 4, FeedOrder::PerAccount)
        .await
        .unwrap();

    // The partitions read the view, each only its own events: about one delivery per event (a
    // few more only if a consumer had to deliver again from its checkpoint).
    let view = jetfn::wire::names::partition_view(ACCOUNT_STREAM, "account", 4);
    let on_view = deliveries(client, &view).await.unwrap();
    let names: BTreeSet<&str> = on_view.keys().map(String::as_str).collect();
    let expected: BTreeSet<String> = (0..4)
        .map(|k| jetfn::wire::names::live_projection_consumer(PROJECTION, k))
        .collect();
    assert_eq!(
        names,
        expected.iter().map(String::as_str).collect(),
        "consumers on {view}"
    );
    let delivered: u64 = on_view.values().sum();
    assert!(
        delivered >= events && delivered * 10 <= events * 12,
        "{delivered} deliveries for {events} events: {on_view:?}"
    );
    // The view never answers the stream's direct gets (a mirror of it would, wrongly: its
    // subjects carry the partition), so cold loads of the command path keep working.
    let mut view_stream = stream(client, &view).await.unwrap();
    let view_config = view_stream.info().await.unwrap().config.clone();
    assert!(
        view_config.mirror.is_none() && !view_config.mirror_direct,
        "{view_config:?}"
    );
    for _ in 0..20 {
        let reply = client
            .request(
                format!("$JS.API.DIRECT.GET.{ACCOUNT_STREAM}"),
                json!({"last_by_subj": "evt.account.q-03"})
                    .to_string()
                    .into(),
            )
            .await
            .unwrap();
        let headers = reply.headers.unwrap_or_default();
        assert_eq!(
            headers.get("Nats-Stream").map(|v| v.as_str()),
            Some(ACCOUNT_STREAM),
            "a direct get of the stream answered by {headers:?}"
        );
    }
    let on_stream = deliveries(client, ACCOUNT_STREAM).await.unwrap();
    assert!(
        !on_stream.keys().any(|name| name.starts_with(PROJECTION)),
        "no projection consumer reads the stream itself: {on_stream:?}"
    );

    // One command on one account: the three partitions that have no event after it still let
    // its token pass, so wait_for returns, and every checkpoint reaches it.
    let model = jetfn::readmodel::ReadModel::connect(&redis.url(), PROJECTION)
        .await
        .unwrap();
    for id in ["q-03", "q-17"] {
        let seq = accepted(client, id, "deposit", json!({"amount": 1}))
            .await
            .unwrap();
        model.wait_for(seq, Duration::from_secs(10)).await.unwrap();
        let checkpoints = model.checkpoints(1).await.unwrap();
        assert_eq!(checkpoints.len(), 4, "{checkpoints:?}");
        assert!(
            checkpoints.iter().all(|(_, at)| *at >= seq),
            "{checkpoints:?} < {seq}"
        );
    }
    check_read_side(client, redis, 1, 4, FeedOrder::PerAccount)
        .await
        .unwrap();

    // A rebuild reads the view through consumers of its own, and its partitions reach the
    // stream's end too, the idle ones by the same rule.
    assert_eq!(rebuild(&side).await, 2);
    wait_until_caught_up(client, redis, 4, Duration::from_secs(30))
        .await
        .unwrap();
    check_read_side(client, redis, 2, 4, FeedOrder::PerAccount)
        .await
        .unwrap();

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

// --- 4. stats ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_checkpoints_are_visible_in_srv_stats() {
    let side = ReadSide::start().await.unwrap();
    let (client, redis) = (&side.client, &side.redis);

    let ids: Vec<String> = (0..10).map(|n| format!("s-{n}")).collect();
    open_accounts(client, &ids, 20).await.unwrap();
    accepted(client, "s-3", "withdraw", json!({"amount": 5}))
        .await
        .unwrap();
    wait_until_caught_up(client, redis, 1, Duration::from_secs(20))
        .await
        .unwrap();
    let last = stream_last_seq(client).await.unwrap();
    assert_eq!(last, 21);

    let caught_up = |data: &Value| {
        data["lag"] == json!(0)
            && data["checkpoint"] == json!(last)
            && data["stream_last_seq"] == json!(last)
    };
    let stats = poll(
        "$SRV.STATS shows the projection caught up",
        Duration::from_secs(15),
        || async {
            let reply = client
                .request("$SRV.STATS.account-balances", "".into())
                .await?;
            let stats: Value = serde_json::from_slice(&reply.payload)?;
            Ok(caught_up(&stats["endpoints"][0]["data"]).then_some(stats))
        },
    )
    .await
    .unwrap();
    assert_eq!(stats["name"], json!(PROJECTION));
    let data = &stats["endpoints"][0]["data"];
    assert_eq!(data["lag"], json!(0));
    assert_eq!(data["checkpoint"], json!(last));
    assert_eq!(data["checkpoints"], json!({"p0": last}));
    assert_eq!(data["generation"], json!(1));
    assert_eq!(data["dead_letters"], json!(0));
    assert!(
        data["processed"].as_u64().unwrap_or(0) >= last,
        "processed: {data}"
    );

    let reply = client
        .request("jetfn.projection.account-balances.status", "".into())
        .await
        .unwrap();
    let status: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(status["lag"], json!(0), "status: {status}");
    assert_eq!(status["checkpoint"], json!(last), "status: {status}");
    assert_eq!(status["stream_last_seq"], json!(last), "status: {status}");
    assert!(
        status["processed"].as_u64().unwrap_or(0) >= last,
        "status: {status}"
    );

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

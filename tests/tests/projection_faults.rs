//! The account projection under faults, against real nats-server, redis-server and the real
//! `account-projection` binary: large workloads, crashes between the Redis commit and the acks,
//! SIGKILL in the middle of a backlog, a Redis that lost everything, a consumer the projection
//! cannot recreate, and read-your-writes waits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use futures::StreamExt;
use jetfn::command::RunningFunction;
use jetfn::readmodel::{Keys, ReadModel, ReadModelError};
use jetfn_tests::commands::{ACCOUNT_STREAM, send, start_account};
use jetfn_tests::faults::{assert_read_model_exact, function_process};
use jetfn_tests::readmodels::{
    FeedOrder, PROJECTION, ReadSide, check_read_model, check_read_side, consumer_ack_floor,
    live_generation, projection_config, read_model_checkpoint, wait_until_caught_up,
};
use jetfn_tests::topology::{self, passwords};
use jetfn_tests::workload::{poll, produce_events, stream_last_seq};
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use redis::AsyncCommands;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The projection binary.
const BINARY: &str = "account-projection";
/// The durable consumer of the only partition of the first read-model version.
const CONSUMER: &str = "account-balances-p0";
/// How long catching up may take, generously.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Both servers, the account function in this process and a client, but no projection: the
/// tests that use this run the projection as a process.
async fn servers_and_account() -> (NatsServer, RedisServer, RunningFunction, async_nats::Client) {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let function = start_account(projection_config(&nats, &redis))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    (nats, redis, function, client)
}

/// The environment of an `account-projection` process against these servers, plus `extra`.
fn projection_env(
    nats: &NatsServer,
    redis: &RedisServer,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut env = vec![("NATS_URL", nats.url()), ("REDIS_URL", redis.url())];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    env
}

/// Waits until the projection (one partition) has caught up, then checks the live read-model
/// version and its change feed, in stream order, against the stream.
async fn catch_up_then_check_exact(client: &async_nats::Client, redis: &RedisServer) {
    wait_until_caught_up(client, redis, 1, CATCH_UP)
        .await
        .unwrap();
    let live = live_generation(redis).await.unwrap();
    check_read_side(client, redis, live, 1, FeedOrder::Stream)
        .await
        .unwrap();
}

/// An `account-projection` process against these servers, once it says it is ready.
async fn ready_projection(nats: &NatsServer, redis: &RedisServer) -> FunctionProcess {
    let mut projection = FunctionProcess::spawn(BINARY, &projection_env(nats, redis, &[])).unwrap();
    projection
        .wait_for_log("projection function ready", CATCH_UP)
        .await
        .unwrap();
    projection
}

/// Panics with `why` and the log unless `process` has logged `line`.
#[track_caller]
fn assert_logged(process: &FunctionProcess, line: &str, why: &str) {
    let log = process.log();
    assert!(log.contains(line), "{why}; log:\n{log}");
}

/// Stops a projection process with SIGTERM and checks that it exits 0.
async fn stop_process(mut process: FunctionProcess) {
    process.terminate().unwrap();
    let status = process.wait(Duration::from_secs(30)).await.unwrap();
    assert!(
        status.success(),
        "{BINARY} did not stop cleanly ({status}); log:\n{}",
        process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_events_fold_to_exactly_the_read_model() {
    let side = ReadSide::start().await.unwrap();
    let (client, redis) = (&side.client, &side.redis);

    let produced = produce_events(client, 32, 300, 10_000).await.unwrap();
    let last = stream_last_seq(client).await.unwrap();
    assert!(last >= 10_000, "only {last} events in the stream");
    assert_eq!(
        produced.events, last,
        "the replies report {} events, the stream holds {last}",
        produced.events
    );
    assert!(produced.rejected > 0, "the workload sends some overdrafts");

    wait_until_caught_up(client, redis, 1, CATCH_UP)
        .await
        .unwrap();
    check_read_model(client, redis, 1).await.unwrap();
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_redis_commit_and_the_ack_does_not_double_count() {
    let (nats, redis, function, client) = servers_and_account().await;
    produce_events(&client, 8, 40, 400).await.unwrap();
    let last = stream_last_seq(&client).await.unwrap();

    let settings = [
        ("JETFN_PROJECTION__BATCH", "50"),
        ("JETFN_PROJECTION__ACK_WAIT", "2s"),
    ];
    let mut crashing = FunctionProcess::spawn(
        BINARY,
        &projection_env(
            &nats,
            &redis,
            &[
                settings[0],
                settings[1],
                ("JETFN_PROJECTION__CRASH_AFTER_COMMITS", "2"),
            ],
        ),
    )
    .unwrap();
    let status = crashing.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        status.code(),
        Some(86),
        "{BINARY} should exit 86 after its 2nd commit; log:\n{}",
        crashing.log()
    );
    let (generation, checkpoint) = read_model_checkpoint(&redis.url(), 1)
        .await
        .unwrap()
        .expect("a live read-model version after two commits");
    assert_eq!(generation, 1);
    assert!(
        checkpoint > 0 && checkpoint < last,
        "after two batches of at most 50 the checkpoint is {checkpoint}, the stream ends at {last}"
    );
    let acked = consumer_ack_floor(&client, CONSUMER).await.unwrap();
    assert!(
        acked < checkpoint,
        "the second batch was committed (checkpoint {checkpoint}) but must not be acknowledged \
         (ack floor {acked}), so that it is redelivered"
    );

    let resumed =
        FunctionProcess::spawn(BINARY, &projection_env(&nats, &redis, &settings)).unwrap();
    catch_up_then_check_exact(&client, &redis).await;
    stop_process(resumed).await;
    function.stop().await.unwrap();
}

/// How a test interrupts a projection process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interruption {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a graceful stop, as in a rolling deploy.
    Terminate,
}

/// Builds a backlog of a few thousand events, lets an `account-projection` process work on it in
/// batches of 20, interrupts it once it has committed something, starts a new one, and checks the
/// read model and the change feed against the stream once it has caught up.
///
/// `ack_wait` is 10 s: above the default pin timeout (5 s) like the defaults (30 s > 5 s), so the
/// new process takes over before JetStream redelivers what the old one held, as in production,
/// while the test stays short.
async fn interrupt_a_backlog_then_restart(interruption: Interruption) {
    let (nats, redis, function, client) = servers_and_account().await;
    produce_events(&client, 16, 150, 4_000).await.unwrap();
    let last = stream_last_seq(&client).await.unwrap();

    let settings = [
        ("JETFN_PROJECTION__BATCH", "20"),
        ("JETFN_PROJECTION__ACK_WAIT", "10s"),
    ];
    let mut first =
        FunctionProcess::spawn(BINARY, &projection_env(&nats, &redis, &settings)).unwrap();
    let url = redis.url();
    poll("a checkpoint inside the backlog", CATCH_UP, || async {
        Ok(read_model_checkpoint(&url, 1)
            .await?
            .map(|(_, checkpoint)| checkpoint)
            .filter(|checkpoint| *checkpoint > 0 && *checkpoint < last))
    })
    .await
    .unwrap();
    match interruption {
        Interruption::Kill => {
            first.kill().unwrap();
        }
        Interruption::Terminate => {
            first.terminate().unwrap();
            let status = first.wait(Duration::from_secs(30)).await.unwrap();
            assert!(
                status.success(),
                "{BINARY} should stop cleanly on SIGTERM ({status}); log:\n{}",
                first.log()
            );
        }
    }
    let (_, stopped_at) = read_model_checkpoint(&url, 1).await.unwrap().unwrap();
    assert!(
        stopped_at > 0 && stopped_at < last,
        "the {interruption:?} should interrupt the backlog: checkpoint {stopped_at} of {last}"
    );

    let second = FunctionProcess::spawn(BINARY, &projection_env(&nats, &redis, &settings)).unwrap();
    catch_up_then_check_exact(&client, &redis).await;
    stop_process(second).await;
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_backlog_then_restart_ends_exact() {
    interrupt_a_backlog_then_restart(Interruption::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_in_the_middle_of_a_backlog_ends_exact() {
    interrupt_a_backlog_then_restart(Interruption::Terminate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_detected_and_the_read_model_is_rebuilt_exact() {
    let (nats, mut redis, function, client) = servers_and_account().await;
    let projection = ready_projection(&nats, &redis).await;

    produce_events(&client, 8, 40, 300).await.unwrap();
    wait_until_caught_up(&client, &redis, 1, CATCH_UP)
        .await
        .unwrap();
    check_read_model(&client, &redis, 1).await.unwrap();
    let before = stream_last_seq(&client).await.unwrap();

    redis.restart_empty().await.unwrap();
    assert_eq!(
        read_model_checkpoint(&redis.url(), 1).await.unwrap(),
        None,
        "the restarted Redis holds nothing"
    );
    for n in 0..20 {
        send(
            &client,
            &format!("late{n}"),
            "open",
            json!({"owner": format!("Late {n}"), "initial_deposit": 10 + n}),
            None,
        )
        .await
        .unwrap()
        .accepted();
    }
    assert!(stream_last_seq(&client).await.unwrap() > before);

    catch_up_then_check_exact(&client, &redis).await;
    assert_logged(
        &projection,
        "rebuilding from the first event",
        "the projection should say it rebuilds",
    );
    stop_process(projection).await;
    function.stop().await.unwrap();
}

/// A client of `nats` logged in as `user` of `deploy/nats/permissions.conf`.
async fn login(nats: &NatsServer, user: &str, password: &str) -> async_nats::Client {
    topology::login(nats, user, password).await.unwrap()
}

/// A projection that may not delete (so cannot recreate) its consumer, bound to one whose first
/// events went to a pull that is gone and wait, unacknowledged, for their ack timeout, while
/// newer events keep arriving: every batch it is delivered skips the held events, at the same
/// checkpoint, again after each failed attempt to recreate the consumer. That repeated hole is
/// not one in the stream: the projection must wait for the held events (JetStream redelivers
/// them) and skip none, and the read model and change feed end exact.
///
/// The held events are kept from redelivery (in-progress acks) until the projection has either
/// committed past them or failed three times to recreate its consumer, then handed back (nak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_that_cannot_recreate_its_consumer_skips_no_event() {
    /// Events delivered to the pull that is gone.
    const HELD: usize = 3;
    /// The consumer's ack wait and pin timeout (the projection is configured alike). Each failed
    /// attempt to recreate the consumer waits out the NATS request timeout (2 s) and then 0.5 s,
    /// longer than the ack wait: by the next bind every event delivered to the pull before has
    /// come due for redelivery, so, once the held events are handed back and no new ones arrive,
    /// a bind is delivered everything pending at once, in order.
    const ACK_WAIT: Duration = Duration::from_secs(1);
    const PIN_TIMEOUT: Duration = Duration::from_secs(1);
    /// The projection user's right to delete consumers of the stream.
    const DELETE_LINE: &str = "\"$JS.API.CONSUMER.DELETE.ACCOUNT_EVENTS.*\"";
    /// What the projection logs when binding (here: recreating) its consumer failed.
    const BIND_FAILED: &str = "cannot bind consumer";
    jetfn_tests::init_tracing();

    let (permissions, removed) = topology::deploy_permissions_without(DELETE_LINE).unwrap();
    assert_eq!(
        removed, 1,
        "permissions.conf grants {DELETE_LINE} on one line"
    );
    let nats =
        NatsServer::start_with_config(&permissions, Some(("jetfn-deploy", passwords::DEPLOY)))
            .await
            .unwrap();
    let redis = RedisServer::start().await.unwrap();
    let login_env = |user: &str, password: &str| {
        vec![
            ("NATS_URL", nats.url()),
            ("JETFN_NATS__USER", user.to_owned()),
            ("JETFN_NATS__PASSWORD", password.to_owned()),
            ("JETFN_NATS__INBOX_PREFIX", format!("_INBOX.{user}")),
        ]
    };
    let mut account = function_process(
        "account",
        &login_env("account", passwords::ACCOUNT),
        CATCH_UP,
    )
    .await
    .unwrap();
    let client = login(&nats, "jetfn-client", passwords::CLIENT).await;
    let operator = login(&nats, "jetfn-deploy", passwords::DEPLOY).await;
    let ids = ["ann", "ben", "cid", "dot"];
    for id in ids {
        send(
            &client,
            id,
            "open",
            json!({"owner": id, "initial_deposit": 100}),
            None,
        )
        .await
        .unwrap()
        .accepted();
    }

    // An earlier instance of the projection: it created the live consumer as the projection
    // does, pulled the first events under the pin, and is gone (its pin released) without
    // acknowledging them. Under the projection's own user, which may do all that.
    let holder = login(&nats, "account-balances", passwords::PROJECTION).await;
    let stream = async_nats::jetstream::new(holder.clone())
        .get_stream(ACCOUNT_STREAM)
        .await
        .unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::All,
            ack_wait: ACK_WAIT,
            max_deliver: -1,
            filter_subject: "evt.account.*".to_owned(),
            max_ack_pending: 1500,
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec!["jetfn".to_owned()],
            priority_timeout: PIN_TIMEOUT,
            ..Default::default()
        })
        .await
        .unwrap();
    // One pull request for exactly the first events, in the pin group (async-nats's pull
    // stream would ask for more), answered to an inbox of the holder's.
    let inbox = holder.new_inbox();
    let mut replies = holder.subscribe(inbox.clone()).await.unwrap();
    let request = json!({"batch": HELD, "expires": 10_000_000_000_u64, "group": "jetfn"});
    holder
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.{ACCOUNT_STREAM}.{CONSUMER}"),
            inbox,
            request.to_string().into(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    while held.len() < HELD {
        let message = tokio::time::timeout(CATCH_UP, replies.next())
            .await
            .expect("the first events")
            .unwrap();
        // Status messages (heartbeats) carry no ack subject.
        if let Some(ack) = message.reply.filter(|r| r.starts_with("$JS.ACK.")) {
            held.push(ack);
        }
    }
    drop(replies);
    stream.unpin_consumer(CONSUMER, "jetfn").await.unwrap();
    // Kept from redelivery (in progress) while `holding`, then handed back (nak).
    let holding = Arc::new(AtomicBool::new(true));
    let keeper = tokio::spawn({
        let holding = holding.clone();
        async move {
            while holding.load(Ordering::Relaxed) {
                for ack in &held {
                    holder.publish(ack.clone(), "+WPI".into()).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            for ack in &held {
                holder.publish(ack.clone(), "-NAK".into()).await.unwrap();
            }
            holder.flush().await.unwrap();
        }
    });

    let mut env = login_env("account-balances", passwords::PROJECTION);
    env.extend([
        ("REDIS_URL", redis.url()),
        ("JETFN_NATS__REQUEST_TIMEOUT", "2s".to_owned()),
        ("JETFN_PROJECTION__ACK_WAIT", "1s".to_owned()),
        ("JETFN_PROJECTION__PIN_TIMEOUT", "1s".to_owned()),
    ]);
    let projection = function_process("account-projection", &env, CATCH_UP)
        .await
        .unwrap();
    // Newer events keep arriving while the first ones are held.
    let url = redis.url();
    let mut deposits = 0_usize;
    poll(
        "the projection past the held events, or failing to recreate its consumer",
        CATCH_UP,
        || {
            let (client, url, projection) = (&client, &url, &projection);
            deposits += 1;
            let id = ids[deposits % ids.len()];
            async move {
                send(client, id, "deposit", json!({"amount": 1}), None)
                    .await?
                    .accepted();
                let committed = read_model_checkpoint(url, 1)
                    .await?
                    .is_some_and(|(_, checkpoint)| checkpoint > 0);
                let failed = projection.log().matches(BIND_FAILED).count() >= 3;
                Ok((committed || failed).then_some(()))
            }
        },
    )
    .await
    .unwrap();
    holding.store(false, Ordering::Relaxed);
    keeper.await.unwrap();

    assert_read_model_exact(&operator, &redis, CATCH_UP).await;
    assert!(
        projection.log().contains(BIND_FAILED),
        "the projection should have failed to recreate its consumer; log:\n{}",
        projection.log()
    );
    stop_process(projection).await;
    account.terminate().unwrap();
    assert!(account.wait(CATCH_UP).await.unwrap().success());
}

/// Events the stream no longer holds (its limits removed them while the projection was stopped)
/// are a hole in the stream itself: the projection says so, continues after it, and applies
/// every event the stream still holds after its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_stream_no_longer_holds_are_passed_and_the_rest_applied() {
    let (nats, redis, function, client) = servers_and_account().await;
    let deposit = || async {
        send(&client, "h", "deposit", json!({"amount": 1}), None)
            .await
            .unwrap()
            .accepted();
    };
    let projection = ready_projection(&nats, &redis).await;
    send(&client, "h", "open", json!({"owner": "H"}), None)
        .await
        .unwrap()
        .accepted();
    for _ in 0..9 {
        deposit().await;
    }
    wait_until_caught_up(&client, &redis, 1, CATCH_UP)
        .await
        .unwrap();
    stop_process(projection).await;

    // Twenty more deposits while no projection runs; then an operator limits the stream to its
    // last five messages, dropping the oldest (jetfn's own stream discards new ones instead),
    // so 11..=25 are gone for good and 26..=30 remain.
    for _ in 0..20 {
        deposit().await;
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut config = js
        .get_stream(ACCOUNT_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_messages = 5;
    config.discard = async_nats::jetstream::stream::DiscardPolicy::Old;
    js.update_stream(config).await.unwrap();
    let state = js
        .get_stream(ACCOUNT_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    assert_eq!((state.first_sequence, state.last_sequence), (26, 30));

    let projection = ready_projection(&nats, &redis).await;
    wait_until_caught_up(&client, &redis, 1, CATCH_UP)
        .await
        .unwrap();
    let generation = live_generation(&redis).await.unwrap();
    let key = Keys::new(PROJECTION).key(generation, "account:h");
    let balance: i64 = redis
        .connect()
        .await
        .unwrap()
        .hget(&key, "balance")
        .await
        .unwrap();
    assert_eq!(
        balance,
        9 + 5,
        "the first ten events, then the five the stream holds"
    );
    assert_logged(
        &projection,
        "continuing after the hole",
        "the projection should say it passes the hole",
    );
    stop_process(projection).await;
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_returns_once_the_projection_reaches_the_token() {
    let side = ReadSide::start().await.unwrap();
    let (client, redis) = (&side.client, &side.redis);
    let model = ReadModel::connect(&redis.url(), PROJECTION).await.unwrap();
    let mut connection = redis.connect().await.unwrap();

    let opened = send(
        client,
        "reader",
        "open",
        json!({"owner": "Reader", "initial_deposit": 5}),
        None,
    )
    .await
    .unwrap();
    let mut balance = 5;
    let mut token = opened.accepted().seq;
    for n in 1..=20_i64 {
        // Each command's reply token, once waited for, must show that command's effect.
        model
            .wait_for(token, Duration::from_secs(10))
            .await
            .unwrap();
        let generation = model.active_generation().await.unwrap().unwrap();
        let key = Keys::new(PROJECTION).key(generation, "account:reader");
        let (stored, seq): (i64, u64) = redis::cmd("HMGET")
            .arg(&key)
            .arg("balance")
            .arg("seq")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(stored, balance, "{key} after waiting for {token}");
        assert_eq!(seq, token, "{key} after waiting for {token}");

        let deposited = send(client, "reader", "deposit", json!({"amount": n}), None)
            .await
            .unwrap();
        balance += n;
        token = deposited.accepted().seq;
    }
    model
        .wait_for(token, Duration::from_secs(10))
        .await
        .unwrap();
    let generation = model.active_generation().await.unwrap().unwrap();
    let stored: i64 = connection
        .hget(
            Keys::new(PROJECTION).key(generation, "account:reader"),
            "balance",
        )
        .await
        .unwrap();
    assert_eq!(stored, balance);
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_times_out_cleanly_when_the_projection_cannot_reach_the_token() {
    let side = ReadSide::start().await.unwrap();
    let (client, redis) = (&side.client, &side.redis);
    produce_events(client, 4, 8, 30).await.unwrap();
    wait_until_caught_up(client, redis, 1, CATCH_UP)
        .await
        .unwrap();
    side.projection.stop().await.unwrap();
    let last = stream_last_seq(client).await.unwrap();

    let model = ReadModel::connect(&redis.url(), PROJECTION).await.unwrap();
    // A token the read model has reached is still answered with the projection stopped.
    model
        .wait_for(last, Duration::from_millis(300))
        .await
        .unwrap();
    let awaited = last + 1000;
    match model.wait_for(awaited, Duration::from_millis(300)).await {
        Err(ReadModelError::Timeout {
            projection,
            seq,
            reached,
            timeout,
        }) => {
            assert_eq!(projection, PROJECTION);
            assert_eq!(seq, awaited);
            assert_eq!(reached, last);
            assert_eq!(timeout, Duration::from_millis(300));
        }
        other => panic!("expected a timeout waiting for {awaited}, got {other:?}"),
    }
    side.function.stop().await.unwrap();
}

//! The account projection under faults, against real nats-server, redis-server and the real
//! `account-projection` binary: large workloads, crashes between the Redis commit and the acks,
//! SIGKILL in the middle of a backlog, a Redis that lost everything, and read-your-writes waits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn::command::RunningFunction;
use jetfn::readmodel::{Keys, ReadModel, ReadModelError};
use jetfn_tests::commands::{send, start_account};
use jetfn_tests::readmodels::{
    FeedOrder, PROJECTION, ReadSide, check_read_model, check_read_side, consumer_ack_floor,
    live_generation, projection_config, read_model_checkpoint, wait_until_caught_up,
};
use jetfn_tests::workload::{poll, produce_events, stream_last_seq};
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use redis::AsyncCommands;
use serde_json::json;
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
    let mut projection =
        FunctionProcess::spawn(BINARY, &projection_env(&nats, &redis, &[])).unwrap();
    projection
        .wait_for_log("projection function ready", Duration::from_secs(30))
        .await
        .unwrap();

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
    assert!(
        projection.log().contains("rebuilding from the first event"),
        "the projection should say it rebuilds; log:\n{}",
        projection.log()
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

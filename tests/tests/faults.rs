//! The standing fault suite of issue 11: while clients send account commands, resending each
//! under the same command id until it is accepted, a process or a server is killed, stopped or
//! restarted. Afterwards two invariants must hold:
//!
//! - every acknowledged command's events are in the stream exactly once (nothing lost, nothing
//!   repeated, nothing stored that was not acknowledged);
//! - the read model equals a fold of the stream, its checkpoint is the stream's last sequence,
//!   and its change feed has one entry per event.
//!
//! Each test prints its figures (acked, stored, duplicates, lost, recovery time). Times are
//! printed, never asserted. All servers and processes are private, on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn::readmodel::ReadModel;
use jetfn_tests::faults::{
    Acked, Figures, Load, assert_exactly_once, assert_read_model_exact, assert_running,
    first_ack_after, function_process, in_flight_at, secs,
};
use jetfn_tests::readmodels::{PROJECTION, read_model_checkpoint};
use jetfn_tests::workload::{poll, stream_last_seq};
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Concurrent clients of each load.
const CLIENTS: usize = 8;
/// The most commands one client sends (the tests stop the load much earlier).
const MAX_PER_CLIENT: usize = 2_000;
/// Commands accepted before a fault, and again after it.
const ACKS: usize = 150;
/// How long anything may take to start, to serve again or to catch up, generously.
const PATIENCE: Duration = Duration::from_secs(60);

/// Starts an `account` command function process and waits until it serves.
async fn account_process(nats: &NatsServer) -> FunctionProcess {
    function_process("account", &[("NATS_URL", nats.url())], PATIENCE)
        .await
        .unwrap()
}

/// Starts an `account-projection` process with `extra` settings and waits until it runs.
async fn projection_process(
    nats: &NatsServer,
    redis: &RedisServer,
    extra: &[(&'static str, &str)],
) -> FunctionProcess {
    let mut env = vec![("NATS_URL", nats.url()), ("REDIS_URL", redis.url())];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    function_process("account-projection", &env, PATIENCE)
        .await
        .unwrap()
}

/// Sends `signal` to a server process.
fn signal(pid: Option<u32>, signal: Signal) {
    let pid = i32::try_from(pid.expect("the server runs")).unwrap();
    kill(Pid::from_raw(pid), signal).unwrap();
}

/// The first invariant: prints the figures, then checks every acknowledged command's events are
/// stored exactly once.
async fn check_commands(test: &str, client: &async_nats::Client, acked: &[Acked]) -> Figures {
    assert_exactly_once(test, client, acked).await
}

/// The second invariant: the read model ends exact.
async fn check_read_model(client: &async_nats::Client, redis: &RedisServer) {
    assert_read_model_exact(client, redis, PATIENCE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_killed_mid_load_loses_and_repeats_no_acknowledged_command() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let mut doomed = account_process(&nats).await;
    let _survivor = account_process(&nats).await;
    let mut projection = projection_process(&nats, &redis, &[]).await;
    let client = nats.connect().await.unwrap();

    let mut load = Load::start(&client, "fnkill", CLIENTS, MAX_PER_CLIENT);
    load.wait_for_acks(ACKS, PATIENCE).await.unwrap();
    let killed_at = Instant::now();
    doomed.kill().unwrap();
    let _restarted = account_process(&nats).await;
    let restarted_at = Instant::now();
    let before = load.acked();
    load.wait_for_acks(before + ACKS, PATIENCE).await.unwrap();
    let acked = load.finish().await.unwrap();

    let test = "kill -9 of a command function";
    let caught = in_flight_at(&acked, killed_at);
    let longest = caught
        .iter()
        .map(|a| a.answered.answered_at - killed_at)
        .max();
    check_commands(test, &client, &acked).await;
    println!(
        "{test}: {} commands in flight at the kill, all answered within {} of it; the killed \
         instance was replaced after {}",
        caught.len(),
        secs(longest),
        secs(Some(restarted_at - killed_at))
    );
    assert_running(&mut projection);
    check_read_model(&client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_load_and_restarted_on_its_store_serves_again_with_no_command_lost() {
    jetfn_tests::init_tracing();
    let mut nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let mut function = account_process(&nats).await;
    let mut projection = projection_process(&nats, &redis, &[]).await;
    let client = nats.connect().await.unwrap();

    let mut load = Load::start(&client, "natskill", CLIENTS, MAX_PER_CLIENT);
    load.wait_for_acks(ACKS, PATIENCE).await.unwrap();
    let killed_at = Instant::now();
    nats.kill().unwrap();
    // Down long enough that every client and function notices and starts reconnecting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart().await.unwrap();
    let ready_at = Instant::now();
    let before = load.acked();
    // The same processes, never restarted: they must reconnect by themselves.
    load.wait_for_acks(before + ACKS, PATIENCE).await.unwrap();
    let acked = load.finish().await.unwrap();
    assert_running(&mut function);
    assert_running(&mut projection);

    let test = "kill -9 of nats-server";
    check_commands(test, &client, &acked).await;
    println!(
        "{test}: down {} (kill, 1 s pause, ready on the same store); commands served again {} after the \
         server was ready, {} after the kill; {} commands in flight at the kill",
        secs(Some(ready_at - killed_at)),
        secs(first_ack_after(&acked, ready_at)),
        secs(first_ack_after(&acked, killed_at)),
        in_flight_at(&acked, killed_at).len()
    );
    check_read_model(&client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_an_always_synced_aof_killed_mid_backlog_resumes_where_it_was_and_ends_exact() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut redis = RedisServer::builder().persistent().start().await.unwrap();
    let _function = account_process(&nats).await;
    let client = nats.connect().await.unwrap();

    // A backlog first, then the projection works on it while the commands go on.
    let mut load = Load::start(&client, "rediskill", CLIENTS, MAX_PER_CLIENT);
    load.wait_for_acks(ACKS, PATIENCE).await.unwrap();
    let mut projection =
        projection_process(&nats, &redis, &[("JETFN_PROJECTION__BATCH", "10")]).await;
    let url = redis.url();
    let (generation, checkpoint) = poll("a checkpoint inside the backlog", PATIENCE, || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let last = stream_last_seq(&client).await?;
            Ok(read_model_checkpoint(&url, 1)
                .await?
                .filter(|(_, checkpoint)| *checkpoint > 0 && *checkpoint < last))
        }
    })
    .await
    .unwrap();
    let last_at_kill = stream_last_seq(&client).await.unwrap();
    let killed_at = Instant::now();
    redis.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await.unwrap();
    let back_at = Instant::now();

    // The append-only file kept what was applied: the same version, no step back.
    let (generation_after, checkpoint_after) = read_model_checkpoint(&redis.url(), 1)
        .await
        .unwrap()
        .expect("the restarted Redis has the read model it had");
    assert_eq!(generation_after, generation, "the live version survives");
    assert!(
        checkpoint_after >= checkpoint,
        "the checkpoint went back from {checkpoint} to {checkpoint_after}: applied writes lost"
    );
    let resumed = time_until_visible(
        &redis,
        last_at_kill,
        back_at,
        "the backlog applied after the restart",
    )
    .await;
    let before = load.acked();
    load.wait_for_acks(before + ACKS, PATIENCE).await.unwrap();
    let acked = load.finish().await.unwrap();
    assert_running(&mut projection);

    let test = "kill -9 of redis-server (AOF always)";
    check_commands(test, &client, &acked).await;
    println!(
        "{test}: killed at checkpoint {checkpoint} of {last_at_kill}, back with checkpoint \
         {checkpoint_after} after {}; the backlog up to {last_at_kill} applied {} after Redis \
         was back",
        secs(Some(back_at - killed_at)),
        secs(Some(resumed))
    );
    check_read_model(&client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_ten_seconds_while_commands_flow_delays_the_read_model_only() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let _function = account_process(&nats).await;
    let mut projection = projection_process(&nats, &redis, &[]).await;
    let client = nats.connect().await.unwrap();

    // Paced, so that ten seconds of commands stay a few hundred.
    let mut load = Load::start_paced(
        &client,
        "redisstop",
        CLIENTS,
        MAX_PER_CLIENT,
        Duration::from_millis(50),
    );
    load.wait_for_acks(ACKS, PATIENCE).await.unwrap();
    signal(redis.pid(), Signal::SIGSTOP);
    let stopped_at = load.acked();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = load.acked() - stopped_at;
    let last_at_cont = stream_last_seq(&client).await.unwrap();
    signal(redis.pid(), Signal::SIGCONT);
    let continued_at = Instant::now();
    assert!(
        during > 0,
        "no command was accepted while Redis was stopped: the write side must not need Redis"
    );

    let caught_up = time_until_visible(
        &redis,
        last_at_cont,
        continued_at,
        "the commands of the outage in Redis",
    )
    .await;
    let before = load.acked();
    load.wait_for_acks(before + ACKS, PATIENCE).await.unwrap();
    let acked = load.finish().await.unwrap();
    assert_running(&mut projection);

    let test = "redis-server stopped (SIGSTOP) for 10 s";
    check_commands(test, &client, &acked).await;
    println!(
        "{test}: {during} commands accepted while Redis was stopped; the read model reached \
         the stream's last sequence at SIGCONT ({last_at_cont}) {} after SIGCONT",
        secs(Some(caught_up))
    );
    check_read_model(&client, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_restart_while_the_projection_is_idle_new_commands_reach_redis() {
    jetfn_tests::init_tracing();
    let mut nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let mut function = account_process(&nats).await;
    let mut projection = projection_process(&nats, &redis, &[]).await;
    let client = nats.connect().await.unwrap();

    let mut load = Load::start(&client, "idle-before", 2, MAX_PER_CLIENT);
    load.wait_for_acks(50, PATIENCE).await.unwrap();
    let mut acked = load.finish().await.unwrap();
    check_read_model(&client, &redis).await;
    // Idle: nothing to deliver, the projection waits on its consumer.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let restart_at = Instant::now();
    nats.restart().await.unwrap();
    let ready_at = Instant::now();
    let mut load = Load::start(&client, "idle-after", 2, MAX_PER_CLIENT);
    load.wait_for_acks(50, PATIENCE).await.unwrap();
    let after = load.finish().await.unwrap();
    let served = first_ack_after(&after, ready_at);
    let last = stream_last_seq(&client).await.unwrap();
    let reached = time_until_visible(&redis, last, ready_at, "the new commands in Redis").await;
    assert_running(&mut function);
    assert_running(&mut projection);
    acked.extend(after);

    let test = "nats-server restart while the projection is idle";
    check_commands(test, &client, &acked).await;
    println!(
        "{test}: restart took {}; commands served again {} after the server was ready; the \
         new commands were in Redis {} after it was ready",
        secs(Some(ready_at - restart_at)),
        secs(served),
        secs(Some(reached))
    );
    check_read_model(&client, &redis).await;
}

/// How long after `since` the read model became visible at stream sequence `seq` (polls
/// `ReadModel::wait_for` until it reaches it, within PATIENCE).
async fn time_until_visible(redis: &RedisServer, seq: u64, since: Instant, what: &str) -> Duration {
    let model = ReadModel::connect(&redis.url(), PROJECTION).await.unwrap();
    poll(what, PATIENCE, || {
        let model = &model;
        async move {
            let reached = model.wait_for(seq, Duration::from_millis(100)).await;
            Ok(reached.ok().map(|()| since.elapsed()))
        }
    })
    .await
    .unwrap()
}

//! Cloud deployment (issue 12): the 3-node JetStream cluster of `deploy/nats/cluster/` on
//! loopback, the functions connected with all three URLs and every stream and bucket at three
//! replicas. While clients send a few hundred commands a second over many accounts (each
//! resending under the same command id on `unavailable` or a timeout), the event stream's leader
//! is killed with SIGKILL; later it is restarted and rejoins. Then two writers race on one
//! aggregate through the runtime's own append path, an atomic batch against a single event with
//! the same expected sequence, round after round.
//!
//! Printed, never asserted as timings: the election, how long commands stalled, the loss and
//! duplicate counts, and the conflict codes the races drew (10071, 10164).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream;
use jetfn::store::{Append, AppendError, EventStore, NewEvent, StoreSettings};
use jetfn::wire::names;
use jetfn_tests::commands::{ACCOUNT_STREAM, stored_messages};
use jetfn_tests::faults::{
    Load, assert_exactly_once, assert_read_model_exact, assert_running, function_process,
    in_flight_at, longest_silence, secs,
};
use jetfn_tests::topology::start_cluster;
use jetfn_tests::workload::poll;
use jetfn_tests::{NatsCluster, RedisServer};
use std::time::{Duration, Instant};

/// Concurrent clients of the load: each owns its accounts, a new one every 25 commands.
const CLIENTS: usize = 24;
/// The most commands one client sends (the test stops the load much earlier).
const MAX_PER_CLIENT: usize = 2_000;
/// Commands accepted before the kill, after the election, and after the rejoin.
const ACKS: usize = 400;
/// Rounds of the race on one aggregate.
const RACES: usize = 60;
/// How long anything may take to start, to serve again or to catch up, generously.
const PATIENCE: Duration = Duration::from_secs(60);

/// The leader and the replicas of stream `name`, as the cluster reports them.
async fn stream_cluster(
    client: &async_nats::Client,
    name: &str,
) -> anyhow::Result<jetstream::stream::ClusterInfo> {
    // Short requests, so a poll sees the election soon after it happens.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(client.clone());
    let mut stream = js.get_stream(name).await?;
    let info = stream.info().await?;
    info.cluster
        .clone()
        .ok_or_else(|| anyhow::anyhow!("stream {name} reports no cluster"))
}

/// The replicas of stream `name`, asked until it answers: after a node's restart, a stream
/// whose leader was on it may still be electing one, and its info requests time out meanwhile.
async fn stream_replicas(client: &async_nats::Client, name: &str) -> usize {
    poll(&format!("the info of stream {name}"), PATIENCE, || {
        let client = client.clone();
        async move {
            let mut stream = jetstream::new(client).get_stream(name).await?;
            Ok(Some(stream.info().await?.config.num_replicas))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The runtime's event store of the race aggregate type, on the cluster at three replicas.
fn race_store(client: async_nats::Client) -> EventStore {
    EventStore::new(
        client,
        StoreSettings {
            aggregate: "race".into(),
            stream: "RACE_EVENTS".into(),
            subject_prefix: "evt.race".into(),
            replicas: 3,
            duplicate_window: Duration::from_secs(120),
            max_bytes: None,
            timeout: Duration::from_secs(5),
            api_prefix: names::JETSTREAM_API.into(),
        },
    )
}

fn event(event_type: &str) -> NewEvent {
    NewEvent {
        event_type: event_type.into(),
        version: 1,
        payload: br#"{"amount":1}"#.to_vec(),
    }
}

/// One racer's append to aggregate `one`, expecting its last sequence to be `expected` (after
/// `version` events).
fn racing<'a>(
    (expected, version): (u64, usize),
    command_id: &'a str,
    events: &'a [NewEvent],
) -> Append<'a> {
    Append {
        aggregate_id: "one",
        expected_last_seq: expected,
        expected_version: version as u64,
        command_id,
        command: "race",
        events,
        fingerprint: None,
        trace: None,
    }
}

/// An append of one event to aggregate `id`, the first of its history, to see that the stream
/// takes it.
fn probe<'a>(id: &'a str, events: &'a [NewEvent]) -> Append<'a> {
    Append {
        aggregate_id: id,
        expected_last_seq: 0,
        expected_version: 0,
        command_id: id,
        command: "reach",
        events,
        fingerprint: None,
        trace: None,
    }
}

/// What the races drew.
#[derive(Debug, Default)]
struct Races {
    batch_won: usize,
    single_won: usize,
    both_won: usize,
    neither_won: usize,
    code_10071: usize,
    code_10164: usize,
    other_conflicts: usize,
}

/// Races an atomic batch of two events against one event, both expecting the aggregate's
/// current last sequence, [`RACES`] times over; returns the tally and the events that should be
/// stored (the winners').
async fn race(cluster: &NatsCluster) -> (Races, usize) {
    // Two writers on different nodes, so the race reaches the leader from two routes.
    let urls: Vec<String> = cluster.nodes().iter().map(|n| n.url()).collect();
    let batch_writer = race_store(async_nats::connect(&urls[0]).await.unwrap());
    let single_writer = race_store(async_nats::connect(&urls[1]).await.unwrap());
    batch_writer.provision().await.unwrap();
    // A stream just created may not yet be reachable from every node: its leader's interest in
    // the subjects takes a moment to cross the routes, and a publish before that finds no
    // responders. The race starts once both writers have reached it, on an aggregate of its own.
    let reach = [event("Opened")];
    for (n, writer) in [&batch_writer, &single_writer].into_iter().enumerate() {
        let (id, reach) = (format!("reach-{n}"), &reach);
        poll("the race stream from every writer", PATIENCE, || async {
            // A conflict is an answer too: an earlier probe landed but its ack was lost.
            let reached = writer.append(probe(&id, reach)).await;
            Ok(matches!(reached, Ok(_) | Err(AppendError::Conflict(_))).then_some(()))
        })
        .await
        .unwrap();
    }
    let (batch, single) = ([event("Opened"), event("Deposited")], [event("Deposited")]);
    let mut tally = Races::default();
    let (mut expected, mut stored) = (0, 0);
    let count = |error: &AppendError, tally: &mut Races| match error {
        AppendError::Conflict(m) if m.contains("10071") => tally.code_10071 += 1,
        AppendError::Conflict(m) if m.contains("10164") => tally.code_10164 += 1,
        AppendError::Conflict(_) => tally.other_conflicts += 1,
        other => panic!("a racing append failed other than by a conflict: {other}"),
    };
    for round in 0..RACES {
        let (batch_id, single_id) = (format!("race-b{round}"), format!("race-s{round}"));
        let (by_batch, by_single) = tokio::join!(
            batch_writer.append(racing((expected, stored), &batch_id, &batch)),
            single_writer.append(racing((expected, stored), &single_id, &single)),
        );
        match (by_batch, by_single) {
            (Ok(_), Ok(_)) => tally.both_won += 1,
            (Ok(seq), Err(e)) => {
                count(&e, &mut tally);
                tally.batch_won += 1;
                (expected, stored) = (seq, stored + batch.len());
            }
            (Err(e), Ok(seq)) => {
                count(&e, &mut tally);
                tally.single_won += 1;
                (expected, stored) = (seq, stored + single.len());
            }
            (Err(a), Err(b)) => {
                count(&a, &mut tally);
                count(&b, &mut tally);
                tally.neither_won += 1;
            }
        }
    }
    (tally, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_of_an_r3_cluster_mid_load_loses_and_repeats_no_command() {
    jetfn_tests::init_tracing();
    let mut cluster = start_cluster().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let on_cluster = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("NATS_URL", cluster.urls()),
            ("JETFN_STREAM__REPLICAS", "3".to_owned()),
            ("JETFN_LEDGER__REPLICAS", "3".to_owned()),
            ("JETFN_NATS__REQUEST_TIMEOUT", "2s".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let mut functions = Vec::new();
    for _ in 0..2 {
        functions.push(
            function_process("account", &on_cluster(&[]), PATIENCE)
                .await
                .unwrap(),
        );
    }
    let mut projection = function_process(
        "account-projection",
        &on_cluster(&[("REDIS_URL", redis.url())]),
        PATIENCE,
    )
    .await
    .unwrap();
    let client = cluster.connect().await.unwrap();

    let started = Instant::now();
    let mut load = Load::start(&client, "r3", CLIENTS, MAX_PER_CLIENT);
    load.wait_for_acks(ACKS, PATIENCE).await.unwrap();
    let rate = load.acked() as f64 / started.elapsed().as_secs_f64();

    // Kill the events' leader.
    let leader = stream_cluster(&client, ACCOUNT_STREAM)
        .await
        .unwrap()
        .leader
        .expect("the event stream has a leader");
    let doomed = cluster
        .index_of(&leader)
        .expect("the leader is one of ours");
    let killed_at = Instant::now();
    cluster.node_mut(doomed).unwrap().kill().unwrap();
    let new_leader = poll("a new leader of the event stream", PATIENCE, || {
        let (client, leader) = (client.clone(), leader.clone());
        async move {
            Ok(stream_cluster(&client, ACCOUNT_STREAM)
                .await
                .ok()
                .and_then(|c| c.leader)
                .filter(|l| *l != leader))
        }
    })
    .await
    .unwrap();
    let elected_at = Instant::now();
    let before = load.acked();
    load.wait_for_acks(before + ACKS, PATIENCE).await.unwrap();

    // Restart it on its store: it rejoins as a current replica, and the load goes on.
    cluster.node_mut(doomed).unwrap().restart().await.unwrap();
    let restarted_at = Instant::now();
    poll("the restarted node current again", PATIENCE, || {
        let (client, leader) = (client.clone(), leader.clone());
        async move {
            let info = stream_cluster(&client, ACCOUNT_STREAM).await?;
            Ok(info
                .replicas
                .iter()
                .any(|peer| peer.name == leader && peer.current && !peer.offline)
                .then_some(()))
        }
    })
    .await
    .unwrap();
    let rejoined_at = Instant::now();
    let before = load.acked();
    load.wait_for_acks(before + ACKS, PATIENCE).await.unwrap();
    let acked = load.finish().await.unwrap();
    for function in &mut functions {
        assert_running(function);
    }
    assert_running(&mut projection);

    let test = "R3 cluster: stream leader killed";
    let figures = assert_exactly_once(test, &client, &acked).await;
    let caught = in_flight_at(&acked, killed_at);
    let silence = longest_silence(&acked, killed_at, restarted_at);
    let stalled = caught
        .iter()
        .map(|a| a.answered.answered_at - killed_at)
        .max();
    println!(
        "{test}: {rate:.0} commands/s before the kill; {} accounts opened; leader {leader} killed, \
         {new_leader} elected {} later (as seen by a client); no command accepted for {} at most \
         after the kill; {} commands in flight at the kill, all answered within {} of it; the \
         killed node rejoined {} after its restart; {} unavailable and {} unanswered requests \
         resent",
        acked
            .iter()
            .filter(|a| a.command_id.ends_with("-c0") || a.events.len() == 2)
            .count(),
        secs(Some(elected_at - killed_at)),
        secs(Some(silence)),
        caught.len(),
        secs(stalled),
        secs(Some(rejoined_at - restarted_at)),
        figures.unavailable,
        figures.unanswered,
    );
    for stream in [
        ACCOUNT_STREAM.to_owned(),
        names::kv_stream("jetfn-ledger-account"),
        names::kv_stream("jetfn-snapshots-account"),
        names::DEFAULT_DLQ_STREAM.to_owned(),
    ] {
        assert_eq!(stream_replicas(&client, &stream).await, 3, "{stream}");
    }
    assert_read_model_exact(&client, &redis, PATIENCE).await;

    // The race: an atomic batch and a single event, the same expected sequence, never both.
    let (races, winners_events) = race(&cluster).await;
    let stored = stored_messages(&client, "RACE_EVENTS", Some("evt.race.one"))
        .await
        .unwrap()
        .len();
    println!(
        "{test}: {RACES} races of an atomic batch (2 events) against a single event on one \
         aggregate: batch won {}, single won {}, both {}, neither {}; the losers were refused \
         with 10071 {} times, with 10164 {} times, otherwise {} times; {stored} events stored",
        races.batch_won,
        races.single_won,
        races.both_won,
        races.neither_won,
        races.code_10071,
        races.code_10164,
        races.other_conflicts,
    );
    assert_eq!(races.both_won, 0, "{races:?}");
    assert_eq!(stored, winners_events, "{races:?}");
}

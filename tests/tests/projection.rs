//! The account projection against real nats-server and redis-server: exactly once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::commands::send;
use jetfn_tests::readmodels::{ReadSide, check_read_model, wait_until_caught_up};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_show_up_in_the_read_model_exactly_once() {
    let side = ReadSide::start().await.unwrap();
    let (client, redis) = (&side.client, &side.redis);

    send(
        client,
        "alice",
        "open",
        json!({"owner": "Alice", "initial_deposit": 100}),
        None,
    )
    .await
    .unwrap();
    send(client, "bob", "open", json!({"owner": "Bob"}), None)
        .await
        .unwrap();
    send(client, "alice", "withdraw", json!({"amount": 30}), None)
        .await
        .unwrap();
    send(client, "bob", "close", json!({}), None).await.unwrap();

    wait_until_caught_up(client, redis, 1, Duration::from_secs(10))
        .await
        .unwrap();
    check_read_model(client, redis, 1).await.unwrap();
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_started_over_nats_reports_progress_until_done() {
    let side = ReadSide::start().await.unwrap();
    let client = &side.client;
    for n in 0..20 {
        let id = format!("r{n}");
        send(
            client,
            &id,
            "open",
            json!({"owner": "Ann", "initial_deposit": n + 1}),
            None,
        )
        .await
        .unwrap();
    }
    let mut progress = client
        .subscribe("jetfn.projection.account-balances.rebuild.progress")
        .await
        .unwrap();
    let started = client
        .request("jetfn.projection.account-balances.rebuild", "".into())
        .await
        .unwrap();
    let started: serde_json::Value = serde_json::from_slice(&started.payload).unwrap();
    assert_eq!(started, json!({"started": true, "generation": 2}));

    let done = loop {
        let message = tokio::time::timeout(
            Duration::from_secs(30),
            futures::StreamExt::next(&mut progress),
        )
        .await
        .expect("progress until done")
        .unwrap();
        let report: jetfn::projection::RebuildProgress =
            serde_json::from_slice(&message.payload).unwrap();
        if report.done {
            break report;
        }
    };
    assert_eq!(done.generation, 2);
    assert!(done.reached >= done.target && done.target >= 40, "{done:?}");
    wait_until_caught_up(client, &side.redis, 1, Duration::from_secs(10))
        .await
        .unwrap();
    check_read_model(client, &side.redis, 1).await.unwrap();
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_replayed_over_nats() {
    let side = ReadSide::start().await.unwrap();
    let reply = side
        .client
        .request("jetfn.projection.account-balances.dlq.replay", "".into())
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply, json!({"replayed": 0}));
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_caught_up_every_event_is_acknowledged_with_one_ack_per_batch() {
    let side = ReadSide::start_with(|config| config.projection.batch = 7)
        .await
        .unwrap();
    let (client, redis) = (&side.client, &side.redis);
    jetfn_tests::workload::produce_events(client, 4, 10, 100)
        .await
        .unwrap();
    wait_until_caught_up(client, redis, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let last = jetfn_tests::workload::stream_last_seq(client)
        .await
        .unwrap();
    let stream = jetfn_tests::commands::stream(client, jetfn_tests::commands::ACCOUNT_STREAM)
        .await
        .unwrap();
    let consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("account-balances-p0")
        .await
        .unwrap();
    // Acks are sent after the commit; give the last one a moment to arrive.
    let info =
        jetfn_tests::workload::poll("every event acknowledged", Duration::from_secs(10), || {
            let mut consumer = consumer.clone();
            async move {
                let info = consumer.info().await?.clone();
                Ok(
                    (info.ack_floor.stream_sequence == last && info.num_ack_pending == 0)
                        .then_some(info),
                )
            }
        })
        .await
        .unwrap();
    assert_eq!(
        info.config.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::All
    );
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    check_read_model(client, redis, 1).await.unwrap();
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

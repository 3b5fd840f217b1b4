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

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

//! The account projection against real nats-server and redis-server: exactly once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::commands::{send, start_account};
use jetfn_tests::readmodels::{
    check_read_model, projection_config, start_projection, wait_until_caught_up,
};
use jetfn_tests::{NatsServer, RedisServer};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_show_up_in_the_read_model_exactly_once() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let config = projection_config(&nats, &redis);
    let function = start_account(config.clone()).await.unwrap();
    let projection = start_projection(config).await.unwrap();
    let client = nats.connect().await.unwrap();

    send(
        &client,
        "alice",
        "open",
        json!({"owner": "Alice", "initial_deposit": 100}),
        None,
    )
    .await
    .unwrap();
    send(&client, "bob", "open", json!({"owner": "Bob"}), None)
        .await
        .unwrap();
    send(&client, "alice", "withdraw", json!({"amount": 30}), None)
        .await
        .unwrap();
    send(&client, "bob", "close", json!({}), None)
        .await
        .unwrap();

    wait_until_caught_up(&client, &redis, 1, Duration::from_secs(10))
        .await
        .unwrap();
    check_read_model(&client, &redis, 1).await.unwrap();
    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

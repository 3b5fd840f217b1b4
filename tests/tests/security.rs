//! Redis ACL users work, and secrets never reach the logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::commands::start_account;
use jetfn_tests::readmodels::{only_acl_user, projection_config, start_projection};
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use std::time::Duration;

const PASSWORD: &str = "s3cret-Pa55word";

/// Creates an ACL user `jetfn` and switches the default user off.
async fn lock_down(redis: &RedisServer) {
    only_acl_user(redis, "jetfn", PASSWORD).await.unwrap();
}

fn with_user(redis: &RedisServer, password: &str) -> String {
    format!("redis://jetfn:{password}@127.0.0.1:{}", redis.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_connects_as_a_redis_acl_user() {
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    lock_down(&redis).await;
    let mut config = projection_config(&nats, &redis);
    config.redis.url = jetfn::config::Secret::new(with_user(&redis, PASSWORD));
    let function = start_account(config.clone()).await.unwrap();
    let projection = start_projection(config.clone()).await.unwrap();
    let client = nats.connect().await.unwrap();
    let reply = client
        .request("cmd.account.acl.open", r#"{"owner":"Al"}"#.into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).contains(r#""ok":true"#));
    let model = jetfn::readmodel::ReadModel::connect(config.redis.url.expose(), "account-balances")
        .await
        .unwrap();
    model.wait_for(1, Duration::from_secs(10)).await.unwrap();
    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_fails_the_start_without_showing_it() {
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    lock_down(&redis).await;
    let mut process = FunctionProcess::spawn(
        "account-projection",
        &[
            ("NATS_URL", nats.url()),
            ("REDIS_URL", with_user(&redis, "not-the-Pa55word")),
            ("RUST_LOG", "debug".into()),
        ],
    )
    .unwrap();
    let status = process.wait(Duration::from_secs(30)).await.unwrap();
    assert!(!status.success());
    let log = process.log();
    assert!(log.to_lowercase().contains("redis"), "{log}");
    assert!(
        !log.contains("not-the-Pa55word"),
        "the password leaked:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_the_configuration_never_reach_the_logs() {
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    lock_down(&redis).await;
    let mut process = FunctionProcess::spawn(
        "account-projection",
        &[
            ("NATS_URL", nats.url()),
            ("REDIS_URL", with_user(&redis, PASSWORD)),
            ("JETFN_NATS__TOKEN", "tok-EN-secret".into()),
            ("RUST_LOG", "trace".into()),
        ],
    )
    .unwrap();
    process
        .wait_for_log("projection function ready", Duration::from_secs(30))
        .await
        .unwrap();
    process.terminate().unwrap();
    process.wait(Duration::from_secs(30)).await.unwrap();
    let log = process.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains("tok-EN-secret"),
        "a secret leaked"
    );
}

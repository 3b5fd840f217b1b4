//! A projection whose Redis ACL user lacks a command it needs fails at start, naming the command,
//! instead of reporting ready and retrying "redis unavailable" forever. Real redis-server ACLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::readmodels::{projection_config, start_projection};
use jetfn_tests::{NatsServer, RedisServer};

const PASSWORD: &str = "pr0jection-Pa55";

/// Creates ACL user `limited` with every command on every key, minus `denied`; returns its URL.
async fn user_without(redis: &RedisServer, denied: &[&str]) -> String {
    let mut connection = redis.connect().await.unwrap();
    let mut rules = vec![
        "SETUSER".to_owned(),
        "limited".to_owned(),
        "reset".to_owned(),
        "on".to_owned(),
        format!(">{PASSWORD}"),
        "~*".to_owned(),
        "&*".to_owned(),
        "+@all".to_owned(),
    ];
    rules.extend(denied.iter().map(|command| format!("-{command}")));
    let _: () = redis::cmd("ACL")
        .arg(&rules)
        .query_async(&mut connection)
        .await
        .unwrap();
    format!("redis://limited:{PASSWORD}@127.0.0.1:{}", redis.port())
}

/// Starts the account projection as that user and returns why it failed to start.
async fn start_error(denied: &[&str]) -> String {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let mut config = projection_config(&nats, &redis);
    config.redis.url = jetfn::config::Secret::new(user_without(&redis, denied).await);
    match start_projection(config).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("the projection started without {denied:?}");
        }
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_evalsha_fails_the_start_naming_it() {
    let error = start_error(&["evalsha"]).await;
    assert!(
        error.contains("may not run EVALSHA") && error.contains("+evalsha"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_eval_fails_the_start_naming_it() {
    let error = start_error(&["eval"]).await;
    assert!(error.contains("may not run EVAL "), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_a_command_of_the_apply_step_fails_the_start_naming_it() {
    let error = start_error(&["hincrby", "xadd"]).await;
    assert!(error.contains("may not run HINCRBY"), "{error}");
}

//! Redis stopped for 10 s and started again with its data while commands keep flowing: the
//! projection waits (with its own bounded backoff, not the Redis client's), resumes once Redis is
//! back, and the read model ends exact. Real nats-server and redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn::readmodel::ReadModel;
use jetfn_tests::commands::send;
use jetfn_tests::readmodels::{PROJECTION, ReadSide, check_read_model, wait_until_caught_up};
use jetfn_tests::workload::stream_last_seq;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ACCOUNTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_redis_outage_while_commands_flow_ends_with_an_exact_read_model() {
    // A short ack wait: without progress acks JetStream would redeliver during the outage.
    let mut side = ReadSide::start_with(|config| {
        config.projection.ack_wait = Duration::from_secs(3);
    })
    .await
    .unwrap();
    for n in 0..ACCOUNTS {
        send(
            &side.client,
            &format!("out{n}"),
            "open",
            json!({"owner": format!("Out {n}")}),
            None,
        )
        .await
        .unwrap()
        .accepted();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn({
        let (client, stop, accepted) = (side.client.clone(), stop.clone(), accepted.clone());
        async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("out{}", n % ACCOUNTS);
                let sent = send(&client, &id, "deposit", json!({"amount": n + 1}), None)
                    .await
                    .unwrap();
                sent.accepted();
                accepted.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    tokio::time::sleep(Duration::from_secs(1)).await;
    side.redis.stop_saving().await.unwrap();
    let during = accepted.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        accepted.load(Ordering::Relaxed) > during,
        "commands should keep flowing while Redis is down"
    );
    side.redis.start_again().await.unwrap();
    let back = Instant::now();
    let target = stream_last_seq(&side.client).await.unwrap();
    let model = ReadModel::connect(&side.redis.url(), PROJECTION)
        .await
        .unwrap();
    model
        .wait_for(target, Duration::from_secs(60))
        .await
        .unwrap();
    println!(
        "redis back: the read model reached sequence {target} (every event stored during the \
         outage) {:?} later",
        back.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    wait_until_caught_up(&side.client, &side.redis, 1, Duration::from_secs(60))
        .await
        .unwrap();
    check_read_model(&side.client, &side.redis, 1)
        .await
        .unwrap();
    println!(
        "{} deposits accepted, {} events in the stream",
        accepted.load(Ordering::Relaxed),
        stream_last_seq(&side.client).await.unwrap()
    );
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

/// How often Redis has refused a command for lack of memory (`INFO errorstats`).
async fn oom_refusals(redis: &jetfn_tests::RedisServer) -> u64 {
    let mut connection = redis.connect().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("errorstat_OOM:count="))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// `CONFIG SET name value`.
async fn config_set(redis: &jetfn_tests::RedisServer, name: &str, value: &str) {
    let mut connection = redis.connect().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", name, value])
        .query_async(&mut connection)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_out_of_memory_holds_the_projection_back_until_memory_is_freed() {
    let side = ReadSide::start().await.unwrap();
    let opened = send(
        &side.client,
        "mem",
        "open",
        json!({"owner": "Mem", "initial_deposit": 10}),
        None,
    )
    .await
    .unwrap();
    let model = ReadModel::connect(&side.redis.url(), PROJECTION)
        .await
        .unwrap();
    model
        .wait_for(opened.accepted().seq, Duration::from_secs(20))
        .await
        .unwrap();

    config_set(&side.redis, "maxmemory-policy", "noeviction").await;
    config_set(&side.redis, "maxmemory", "1").await;
    let mut last = 0;
    for n in 1..=5 {
        last = send(&side.client, "mem", "deposit", json!({"amount": n}), None)
            .await
            .unwrap()
            .accepted()
            .seq;
    }
    // The apply step reads, then its first write is refused: nothing is written, it is retried.
    jetfn_tests::workload::poll(
        "an apply step refused for memory",
        Duration::from_secs(20),
        || async { Ok((oom_refusals(&side.redis).await >= 3).then_some(())) },
    )
    .await
    .unwrap();
    config_set(&side.redis, "maxmemory", "0").await;

    model.wait_for(last, Duration::from_secs(20)).await.unwrap();
    check_read_model(&side.client, &side.redis, 1)
        .await
        .unwrap();
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

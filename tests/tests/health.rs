//! Liveness and readiness probes over HTTP, as Kubernetes uses them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::commands::{account_config, start_account};
use jetfn_tests::readmodels::{projection_config, start_projection};
use jetfn_tests::workload::poll;
use jetfn_tests::{NatsServer, RedisServer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The HTTP status of `GET path`, or `None` when nothing listens.
async fn get(port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: probe\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_is_live_and_ready_until_it_stops() {
    let nats = NatsServer::start().await.unwrap();
    let port = free_port();
    let mut config = account_config(&nats);
    config.health.port = Some(port);
    config.health.address = "127.0.0.1".into();
    let function = start_account(config).await.unwrap();

    assert_eq!(get(port, "/livez").await, Some(200));
    assert_eq!(get(port, "/readyz").await, Some(200));
    assert_eq!(get(port, "/metrics").await, Some(404));
    function.stop().await.unwrap();
    assert_eq!(
        get(port, "/livez").await,
        None,
        "the endpoint closes with the function"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_is_ready_once_its_consumers_are_bound() {
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let port = free_port();
    let function = start_account(projection_config(&nats, &redis))
        .await
        .unwrap();
    let mut config = projection_config(&nats, &redis);
    config.health.port = Some(port);
    config.health.address = "127.0.0.1".into();
    let projection = start_projection(config).await.unwrap();

    assert_eq!(get(port, "/livez").await, Some(200));
    poll(
        "the projection reports ready",
        Duration::from_secs(10),
        || async { Ok((get(port, "/readyz").await == Some(200)).then_some(())) },
    )
    .await
    .unwrap();
    projection.stop().await.unwrap();
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_health_port_stops_the_start_naming_the_setting() {
    let nats = NatsServer::start().await.unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = account_config(&nats);
    config.health.port = Some(taken.local_addr().unwrap().port());
    config.health.address = "127.0.0.1".into();
    let err = start_account(config).await.unwrap_err();
    assert!(format!("{err:#}").contains("health.port"), "{err:#}");
}

//! One W3C trace id crosses a command's span, its stored events and the projection span that
//! applies them, across processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::HeaderMap;
use jetfn_tests::commands::{ACCOUNT_STREAM, stored_messages};
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use std::time::Duration;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_follows_a_command_into_its_events_and_the_projection() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let env = |log: &str| {
        vec![
            ("NATS_URL", nats.url()),
            ("REDIS_URL", redis.url()),
            ("RUST_LOG", log.to_owned()),
        ]
    };
    let mut function =
        FunctionProcess::spawn("account", &env("info,jetfn::command=debug")).unwrap();
    function
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();
    let mut projection =
        FunctionProcess::spawn("account-projection", &env("info,jetfn::projection=debug")).unwrap();
    projection
        .wait_for_log("projection function ready", PATIENCE)
        .await
        .unwrap();

    let client = nats.connect().await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01").as_str(),
    );
    headers.insert("tracestate", "vendor=value");
    let reply = client
        .request_with_headers(
            "cmd.account.traced.open",
            headers,
            r#"{"owner":"Tia"}"#.into(),
        )
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).contains(r#""ok":true"#));

    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.traced"))
        .await
        .unwrap();
    let parent = events[0].header("traceparent");
    assert!(parent.starts_with(&format!("00-{TRACE_ID}-")), "{parent}");
    assert!(
        !parent.contains("00f067aa0ba902b7"),
        "the event names the command's span: {parent}"
    );
    assert_eq!(events[0].header("tracestate"), "vendor=value");

    let needle = format!("trace_id=\"{TRACE_ID}\"");
    function.wait_for_log(&needle, PATIENCE).await.unwrap();
    projection.wait_for_log(&needle, PATIENCE).await.unwrap();
    assert!(
        projection
            .log()
            .lines()
            .any(|l| l.contains(&needle) && l.contains("apply"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_a_trace_starts_one() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let function =
        jetfn_tests::commands::start_account(jetfn_tests::commands::account_config(&nats))
            .await
            .unwrap();
    let client = nats.connect().await.unwrap();
    client
        .request("cmd.account.untraced.open", r#"{"owner":"Ugo"}"#.into())
        .await
        .unwrap();
    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.untraced"))
        .await
        .unwrap();
    let parent = events[0].header("traceparent");
    let parts: Vec<&str> = parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{parent}");
    assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{parent}");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_command_span() {
    let nats = NatsServer::start().await.unwrap();
    let mut function = FunctionProcess::spawn(
        "account",
        &[
            ("NATS_URL", nats.url()),
            ("JETFN_LOG_FORMAT", "json".into()),
            // Accepted commands' lines are debug lines.
            ("RUST_LOG", "info,jetfn::command=debug".into()),
        ],
    )
    .unwrap();
    function
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    client
        .request("cmd.account.j1.open", r#"{"owner":"Jo"}"#.into())
        .await
        .unwrap();
    function
        .wait_for_log("command handled", PATIENCE)
        .await
        .unwrap();
    let log = function.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let handled = lines
        .iter()
        .find(|l| l["fields"]["message"] == "command handled")
        .expect("a command log line");
    assert_eq!(handled["span"]["command"], "open");
    assert_eq!(handled["span"]["outcome"], "accepted");
}

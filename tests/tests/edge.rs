//! Edge deployment (issue 12): the functions run at an edge leaf node (`deploy/nats/leaf.conf`,
//! no JetStream of its own) with `nats.jetstream_domain = "hub"`, and every event, ledger entry
//! and consumer lives in the hub's JetStream. Clients at the edge and at the hub send commands;
//! then the hub is killed and restarted on its store while they go on.
//!
//! Printed, never asserted as timings: how fast a command at the cut-off edge is answered, how
//! long the edge could not serve, and the loss and duplicate counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn::Reply;
use jetfn::command::ErrorKind;
use jetfn_tests::RedisServer;
use jetfn_tests::faults::{
    Acked, Load, account_subject, assert_exactly_once, assert_read_model_exact, assert_running,
    expect_accepted, first_ack_after, function_process, longest_silence, secs, send_until_answered,
};
use jetfn_tests::topology::{Edge, HUB_DOMAIN};
use serde_json::json;
use std::time::{Duration, Instant};

/// Clients at the edge, and as many at the hub.
const CLIENTS: usize = 3;
/// The most commands one client sends (the test stops the load much earlier).
const MAX_PER_CLIENT: usize = 2_000;
/// Commands accepted at each side before the cut, and again after it.
const ACKS: usize = 60;
/// The functions' `nats.request_timeout`: how long they wait for JetStream.
const FUNCTION_TIMEOUT: &str = "2s";
/// How long a client waits for the one answer to its probe during the cut: far beyond
/// [`FUNCTION_TIMEOUT`], so only a hang runs into it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long anything may take to start, to serve again or to catch up, generously.
const PATIENCE: Duration = Duration::from_secs(60);

/// One command at the edge while the hub is away: sent once, and how its answer came.
async fn probe_once(client: &async_nats::Client, command_id: &str) -> (Duration, Option<Reply>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(jetfn::wire::header::MSG_ID, command_id);
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(
            json!({"owner": "Probe", "initial_deposit": 7})
                .to_string()
                .into(),
        )
        .timeout(Some(PROBE_TIMEOUT));
    let sent = Instant::now();
    let answer = client
        .send_request(account_subject("edge-probe", "open"), request)
        .await
        .ok()
        .and_then(|message| serde_json::from_slice(&message.payload).ok());
    (sent.elapsed(), answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_at_a_leaf_node_store_in_the_hub_and_serve_again_after_the_hub_comes_back() {
    jetfn_tests::init_tracing();
    let mut edge = Edge::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let at_edge = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("NATS_URL", edge.leaf.url()),
            ("JETFN_NATS__JETSTREAM_DOMAIN", HUB_DOMAIN.to_owned()),
            ("JETFN_NATS__REQUEST_TIMEOUT", FUNCTION_TIMEOUT.to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let mut function = function_process("account", &at_edge(&[]), PATIENCE)
        .await
        .unwrap();
    let mut projection = function_process(
        "account-projection",
        &at_edge(&[("REDIS_URL", redis.url())]),
        PATIENCE,
    )
    .await
    .unwrap();
    let edge_client = edge.leaf.connect().await.unwrap();
    let hub_client = edge.hub.connect().await.unwrap();

    let mut edge_load = Load::start(&edge_client, "edge", CLIENTS, MAX_PER_CLIENT);
    let mut hub_load = Load::start(&hub_client, "hub", CLIENTS, MAX_PER_CLIENT);
    edge_load.wait_for_acks(ACKS, PATIENCE).await.unwrap();
    hub_load.wait_for_acks(ACKS, PATIENCE).await.unwrap();

    // The cut: the hub dies, the leaf stays, the functions keep their connection to the leaf.
    let cut_at = Instant::now();
    edge.hub.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (probe_took, probe_answer) = probe_once(&edge_client, "edge-probe-c0").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    edge.hub.restart().await.unwrap();
    let back_at = Instant::now();
    edge.wait_for_leaf_connection().await.unwrap();
    let linked_at = Instant::now();
    let (edge_before, hub_before) = (edge_load.acked(), hub_load.acked());
    // The same function processes, never restarted: they must serve again by themselves.
    edge_load
        .wait_for_acks(edge_before + ACKS, PATIENCE)
        .await
        .unwrap();
    hub_load
        .wait_for_acks(hub_before + ACKS, PATIENCE)
        .await
        .unwrap();
    // The probe's client retries with the same command id, as any client would.
    let probe = send_until_answered(
        &edge_client,
        &account_subject("edge-probe", "open"),
        &json!({"owner": "Probe", "initial_deposit": 7}),
        "edge-probe-c0",
    )
    .await
    .unwrap();
    let probe = expect_accepted("edge-probe", "edge-probe-c0", 7, probe).unwrap();
    let edge_acked = edge_load.finish().await.unwrap();
    let mut acked: Vec<Acked> = hub_load.finish().await.unwrap();
    acked.extend(edge_acked.iter().cloned());
    acked.push(probe);
    assert_running(&mut function);
    assert_running(&mut projection);

    let test = "edge: hub killed under the leaf";
    // Read from the hub: the events are in its stream, exactly once each.
    assert_exactly_once(test, &hub_client, &acked).await;
    let probe_kind = probe_answer.as_ref().and_then(Reply::error_kind);
    println!(
        "{test}: during the cut a command at the edge was answered {:?} after {} (function \
         timeout {FUNCTION_TIMEOUT}); hub down {} (kill, pause, ready on its store), leaf \
         linked again {} after the restart; edge commands served again {} after the restart: \
         no edge command was accepted for {} at most",
        probe_kind,
        secs(Some(probe_took)),
        secs(Some(back_at - cut_at)),
        secs(Some(linked_at - back_at)),
        secs(first_ack_after(&edge_acked, back_at)),
        secs(Some(longest_silence(
            &edge_acked,
            cut_at,
            linked_at + PATIENCE
        ))),
    );
    assert_eq!(
        probe_kind,
        Some(ErrorKind::Unavailable),
        "a command at the cut-off edge is answered unavailable, not left hanging: {probe_answer:?}"
    );
    assert_read_model_exact(&hub_client, &redis, PATIENCE).await;
}

/// The least-privilege users of `deploy/nats/permissions.conf` as a leaf node in front of the
/// hub gives them: every JetStream API subject under the hub's domain prefix, KV writes
/// included (deploy/README.md, "Edge: leaf nodes"), and a user for the test's own checks.
fn edge_permissions() -> String {
    let permissions = jetfn_tests::topology::deploy_permissions()
        .unwrap()
        .replace("\"$JS.API.", &format!("\"$JS.{HUB_DOMAIN}.API."))
        .replace("\"$KV.", &format!("\"$JS.{HUB_DOMAIN}.API.$KV."));
    permissions.replacen(
        "users = [",
        &format!("users = [\n    {{ user: \"{PROBE_USER}\", password: \"{PROBE_PASSWORD}\" }}"),
        1,
    )
}

/// The test's own user at the leaf, allowed everything.
const PROBE_USER: &str = "edge-probe";
const PROBE_PASSWORD: &str = "probe-pw-5";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_at_a_leaf_node_work_with_the_deploy_permissions_under_the_hub_domain() {
    use jetfn_tests::topology::passwords;
    jetfn_tests::init_tracing();
    let edge =
        Edge::start_with_leaf_config(&edge_permissions(), Some((PROBE_USER, PROBE_PASSWORD)))
            .await
            .unwrap();
    let redis = RedisServer::start().await.unwrap();
    let as_user = |user: &str, password: &str, extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("NATS_URL", edge.leaf.url()),
            ("JETFN_NATS__JETSTREAM_DOMAIN", HUB_DOMAIN.to_owned()),
            ("JETFN_NATS__USER", user.to_owned()),
            ("JETFN_NATS__PASSWORD", password.to_owned()),
            ("JETFN_NATS__INBOX_PREFIX", format!("_INBOX.{user}")),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let _function = function_process(
        "account",
        &as_user("account", passwords::ACCOUNT, &[]),
        PATIENCE,
    )
    .await
    .unwrap();
    let _projection = function_process(
        "account-projection",
        &as_user(
            "account-balances",
            passwords::PROJECTION,
            &[("REDIS_URL", redis.url())],
        ),
        PATIENCE,
    )
    .await
    .unwrap();
    let client = async_nats::ConnectOptions::with_user_and_password(
        "jetfn-client".into(),
        passwords::CLIENT.into(),
    )
    .custom_inbox_prefix("_INBOX.jetfn-client")
    .connect(edge.leaf.url())
    .await
    .unwrap();
    for (id, command, body) in [
        ("e1", "open", json!({"owner": "E", "initial_deposit": 5})),
        ("e1", "deposit", json!({"amount": 7})),
        ("e2", "open", json!({"owner": "F"})),
    ] {
        let reply = jetfn_tests::commands::send(&client, id, command, body, None)
            .await
            .unwrap();
        assert!(
            reply.reply.error_kind().is_none(),
            "{id} {command}: {:?}",
            reply.reply
        );
    }
    // A rejection is written to the ledger (in the hub's KV) before it is answered.
    let refused =
        jetfn_tests::commands::send(&client, "e2", "withdraw", json!({"amount": 9}), None)
            .await
            .unwrap();
    assert_eq!(
        refused.reply.error_kind(),
        Some(ErrorKind::Rejected),
        "{:?}",
        refused.reply
    );
    let hub_client = edge.hub.connect().await.unwrap();
    assert_read_model_exact(&hub_client, &redis, PATIENCE).await;
    let violations: Vec<String> = edge
        .leaf
        .log()
        .lines()
        .chain(edge.hub.log().lines())
        .filter(|line| line.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
}

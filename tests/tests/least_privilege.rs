//! The functions run under exactly the NATS permissions of `deploy/nats/permissions.conf`, and a
//! missing permission shows up as a bounded failure, not a hang.
//!
//! Both functions run as processes configured the way a deployment configures them
//! (`JETFN_NATS__USER`, `JETFN_NATS__PASSWORD`), against a nats-server whose only users are the
//! ones of the deploy file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use jetfn::command::ErrorKind;
use jetfn_tests::commands::{ACCOUNT_STREAM, send, transfer};
use jetfn_tests::faults::assert_running;
use jetfn_tests::latency::SlowLink;
use jetfn_tests::workload::poll;
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use serde_json::{Value, json};
use std::time::Duration;

use jetfn_tests::topology::passwords::{
    ACCOUNT as ACCOUNT_PASSWORD, BANK as BANK_PASSWORD, CLIENT as CLIENT_PASSWORD,
    DEPLOY as DEPLOY_PASSWORD, PROJECTION as PROJECTION_PASSWORD, SIGNUP as SIGNUP_PASSWORD,
};

const PATIENCE: Duration = Duration::from_secs(30);
/// The line of the account user that allows appending events.
const EVENT_PUBLISH_LINE: &str = "\"evt.account.*\"";

fn deploy_permissions() -> String {
    jetfn_tests::topology::deploy_permissions().unwrap()
}

/// [`deploy_permissions`] without every line that is exactly `line` (trimmed).
fn deploy_permissions_without(line: &str) -> String {
    jetfn_tests::topology::deploy_permissions_without(line)
        .unwrap()
        .0
}

async fn start_nats(config: &str) -> NatsServer {
    NatsServer::start_with_config(config, Some(("jetfn-deploy", DEPLOY_PASSWORD)))
        .await
        .unwrap()
}

async fn login(nats: &NatsServer, user: &str, password: &str) -> async_nats::Client {
    jetfn_tests::topology::login(nats, user, password)
        .await
        .unwrap()
}

fn account_process(nats: &NatsServer, extra: &[(&str, String)]) -> FunctionProcess {
    let mut env = vec![
        ("NATS_URL", nats.url()),
        ("JETFN_NATS__USER", "account".to_owned()),
        ("JETFN_NATS__PASSWORD", ACCOUNT_PASSWORD.to_owned()),
        ("JETFN_NATS__INBOX_PREFIX", "_INBOX.account".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    FunctionProcess::spawn("account", &env).unwrap()
}

/// Every permission violation the server logged.
fn violations(nats: &NatsServer) -> Vec<String> {
    nats.log()
        .lines()
        .filter(|line| line.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

async fn request_json(client: &async_nats::Client, subject: &str) -> Value {
    let reply = tokio::time::timeout(PATIENCE, client.request(subject.to_owned(), "".into()))
        .await
        .unwrap_or_else(|_| panic!("no reply on {subject}"))
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn balance(redis: &RedisServer, generation: u64, id: &str) -> Option<i64> {
    let mut redis = redis.connect().await.ok()?;
    let key = format!("{{account-balances}}:g{generation}:account:{id}");
    redis::cmd("HGET")
        .arg(&key)
        .arg("balance")
        .query_async::<Option<i64>>(&mut redis)
        .await
        .ok()?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_functions_work_with_exactly_the_deploy_permissions() {
    jetfn_tests::init_tracing();
    let nats = start_nats(&deploy_permissions()).await;
    let redis = RedisServer::start().await.unwrap();

    let mut account = account_process(&nats, &[]);
    account
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();
    // Two partitions, so the instances count each other over $SRV.PING too.
    let mut projection = FunctionProcess::spawn(
        "account-projection",
        &[
            ("NATS_URL", nats.url()),
            ("REDIS_URL", redis.url()),
            ("JETFN_NATS__USER", "account-balances".to_owned()),
            ("JETFN_NATS__PASSWORD", PROJECTION_PASSWORD.to_owned()),
            (
                "JETFN_NATS__INBOX_PREFIX",
                "_INBOX.account-balances".to_owned(),
            ),
            ("JETFN_PROJECTION__PARTITIONS", "2".to_owned()),
            ("JETFN_PROJECTION__PIN_TIMEOUT", "1s".to_owned()),
        ],
    )
    .unwrap();
    projection
        .wait_for_log("projection function ready", PATIENCE)
        .await
        .unwrap();

    // Commands, as a client with only the client permissions sends them: an atomic batch
    // (open with a deposit), a single event, a repeat answered from the ledger, a rejection.
    let client = login(&nats, "jetfn-client", CLIENT_PASSWORD).await;
    // A client that tries to read every inbox (others' replies, the functions' direct gets of
    // events) is refused that subscription by the server.
    let snooper = login(&nats, "jetfn-client", CLIENT_PASSWORD).await;
    let mut snooped = snooper.subscribe("_INBOX.>").await.unwrap();
    let opened = send(
        &client,
        "alice",
        "open",
        json!({"owner": "Alice", "initial_deposit": 100}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(opened.accepted().version, 2, "{:?}", opened.body);
    let deposited = send(
        &client,
        "alice",
        "deposit",
        json!({"amount": 50}),
        Some("d-1"),
    )
    .await
    .unwrap();
    assert_eq!(deposited.accepted().version, 3);
    let repeated = send(
        &client,
        "alice",
        "deposit",
        json!({"amount": 50}),
        Some("d-1"),
    )
    .await
    .unwrap();
    assert_eq!(repeated.body, deposited.body);
    let refused = send(&client, "alice", "withdraw", json!({"amount": 1000}), None)
        .await
        .unwrap();
    assert_eq!(refused.reply.error_kind(), Some(ErrorKind::Rejected));
    let bob = send(&client, "bob", "open", json!({"owner": "Bob"}), None)
        .await
        .unwrap();
    bob.accepted();
    // Everything routed to the snooper before this round trip has arrived: nothing was.
    snooper.flush().await.unwrap();
    let seen = futures::FutureExt::now_or_never(futures::StreamExt::next(&mut snooped));
    assert!(
        !matches!(seen, Some(Some(_))),
        "a client read a reply that was not its own: {seen:?}"
    );

    // The read model follows.
    let shown = poll("alice's balance in the read model", PATIENCE, || async {
        Ok(balance(&redis, 1, "alice").await.filter(|b| *b == 150))
    })
    .await
    .unwrap();
    assert_eq!(shown, 150);

    // An event the projection refuses goes to the dead-letter stream (published by the
    // projection's user). Only the account user may publish events.
    let writer = login(&nats, "account", ACCOUNT_PASSWORD).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-type", "NoSuchEvent");
    headers.insert("Nats-Msg-Id", "bad:1:0");
    let ack = async_nats::jetstream::new(writer)
        .publish_with_headers("evt.account.bad", headers, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.sequence > 0);
    let operator = login(&nats, "jetfn-deploy", DEPLOY_PASSWORD).await;
    let operator_js = async_nats::jetstream::new(operator.clone());
    let dead = poll("the dead letter", PATIENCE, || async {
        let mut dlq = operator_js.get_stream("JETFN_DLQ").await?;
        let messages = dlq.info().await?.state.messages;
        Ok((messages == 1).then_some(messages))
    })
    .await
    .unwrap();
    assert_eq!(dead, 1);

    // Status, dead-letter replay (reads the dead-letter stream) and a rebuild (new consumers,
    // deleting and unpinning the old ones), all served under the projection's permissions.
    let status = poll("the dead letter in the status", PATIENCE, || async {
        let status = request_json(&operator, "jetfn.projection.account-balances.status").await;
        Ok((status["dead_letters"] == json!(1)).then_some(status))
    })
    .await
    .unwrap();
    assert_eq!(status["errors"], json!(0), "{status}");
    let replayed = request_json(&operator, "jetfn.projection.account-balances.dlq.replay").await;
    assert_eq!(replayed, json!({"replayed": 0}));
    let mut progress = operator
        .subscribe("jetfn.projection.account-balances.rebuild.progress")
        .await
        .unwrap();
    let started = request_json(&operator, "jetfn.projection.account-balances.rebuild").await;
    assert_eq!(started, json!({"started": true, "generation": 2}));
    loop {
        let report = tokio::time::timeout(PATIENCE, progress.next())
            .await
            .expect("rebuild progress")
            .unwrap();
        let report: Value = serde_json::from_slice(&report.payload).unwrap();
        assert!(report.get("error").is_none(), "{report}");
        if report["done"] == json!(true) {
            break;
        }
    }
    let rebuilt = poll("alice in the rebuilt read model", PATIENCE, || async {
        Ok(balance(&redis, 2, "alice").await.filter(|b| *b == 150))
    })
    .await
    .unwrap();
    assert_eq!(rebuilt, 150);
    // The live projection follows the new version.
    let after = send(&client, "alice", "deposit", json!({"amount": 1}), None)
        .await
        .unwrap();
    after.accepted();
    poll(
        "the deposit in the rebuilt read model",
        PATIENCE,
        || async { Ok(balance(&redis, 2, "alice").await.filter(|b| *b == 151)) },
    )
    .await
    .unwrap();

    // Nothing was refused on the way but the snooper's subscription.
    let refused = violations(&nats);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("jetfn-client") && refused[0].contains(r#"Subject "_INBOX.>""#),
        "{refused:?}"
    );
    for function in [&account, &projection] {
        assert!(
            !function.log().contains("Permissions Violation"),
            "{}",
            function.log()
        );
    }
    account.terminate().unwrap();
    projection.terminate().unwrap();
    assert!(account.wait(PATIENCE).await.unwrap().success());
    assert!(projection.wait(PATIENCE).await.unwrap().success());
}

/// A command function that may not publish its events: the server drops each publish and sends
/// the connection `-ERR 'Permissions Violation for Publish to "evt.account.<id>"'`; the function
/// ties that report to the pending append and replies `unavailable` naming the permission at
/// once, without waiting out the request timeout or retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_that_may_not_publish_events_fails_in_bounded_time() {
    jetfn_tests::init_tracing();
    // The account user's own line goes; others' (the bank decision's) stay.
    let full = deploy_permissions();
    let account_user = full
        .find("user: \"account\"")
        .expect("permissions.conf has the account user");
    let line = account_user
        + full[account_user..]
            .find(EVENT_PUBLISH_LINE)
            .expect("the account user may publish its events");
    let crippled = format!(
        "{}{}",
        &full[..line],
        &full[line + EVENT_PUBLISH_LINE.len()..]
    );
    let nats = start_nats(&crippled).await;
    let mut account = account_process(
        &nats,
        &[
            ("JETFN_NATS__REQUEST_TIMEOUT", "1s".to_owned()),
            ("JETFN_COMMAND__MAX_RETRIES", "1".to_owned()),
        ],
    );
    // Start-up needs no event publish: the stream and the ledger are provisioned.
    account
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();

    let client = login(&nats, "jetfn-client", CLIENT_PASSWORD).await;
    for (id, body) in [
        // One event: a single publish.
        ("alice", json!({"owner": "Alice"})),
        // Two events: an atomic batch, refused at its first message.
        ("bob", json!({"owner": "Bob", "initial_deposit": 5})),
    ] {
        let sent = send(&client, id, "open", body, None).await.unwrap();
        let failure = match &sent.reply {
            jetfn::Reply::Failed(failure) => failure.clone(),
            jetfn::Reply::Accepted(accepted) => panic!("accepted without permission: {accepted:?}"),
        };
        assert_eq!(failure.kind, ErrorKind::Unavailable, "{:?}", sent.body);
        assert_eq!(sent.error_code.as_deref(), Some("503"));
        // The server's refusal is named, at once, instead of a timeout.
        let message = &failure.message;
        assert!(
            message.starts_with("permission denied: Permissions Violation for Publish to")
                && message.contains(&format!("\"evt.account.{id}\"")),
            "{message}"
        );
        eprintln!("open {id}: {}", sent.body);
    }

    // The server refused exactly the event publishes, and said so.
    let refused = violations(&nats);
    assert!(!refused.is_empty());
    for line in &refused {
        assert!(
            line.contains("Publish Violation") && line.contains("evt.account."),
            "{line}"
        );
    }
    eprintln!("server: {refused:#?}");
    // The function's log has async-nats's INFO line about the server error, and the warning
    // about the unacknowledged append.
    let log = account.log();
    assert!(log.contains("command failed"), "{log}");
    assert!(
        log.contains("Permissions Violation for Publish to"),
        "{log}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("Violation") || l.contains("command failed"))
    {
        eprintln!("function: {line}");
    }

    // Nothing was stored.
    let operator = login(&nats, "jetfn-deploy", DEPLOY_PASSWORD).await;
    let mut stream = async_nats::jetstream::new(operator)
        .get_stream(ACCOUNT_STREAM)
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    account.terminate().unwrap();
    assert!(account.wait(PATIENCE).await.unwrap().success());
}

/// The function exited unsuccessfully, its log names `refusal`, and it never said it was ready.
async fn assert_refused_to_start(function: &mut FunctionProcess, refusal: &str) -> String {
    let status = function.wait(PATIENCE).await.unwrap();
    assert!(!status.success());
    let log = function.log();
    assert!(log.contains(refusal), "{log}");
    assert!(!log.contains("command function ready"), "{log}");
    log
}

/// A command function that may not read its command ledger refuses to start, naming the
/// subject to grant, instead of failing every command it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_that_may_not_read_its_ledger_does_not_start() {
    jetfn_tests::init_tracing();
    let crippled = deploy_permissions_without("\"$JS.API.DIRECT.GET.KV_jetfn-ledger-account\"");
    let nats = start_nats(&crippled).await;
    let mut account = account_process(&nats, &[]);
    let log = assert_refused_to_start(
        &mut account,
        "the ledger jetfn-ledger-account cannot be read",
    )
    .await;
    assert!(
        log.contains(
            "Permissions Violation for Publish to \"$JS.API.DIRECT.GET.KV_jetfn-ledger-account\""
        ),
        "{log}"
    );
}

/// A command function that may not subscribe to its commands refuses to start, naming the
/// subject, instead of reporting ready while nobody answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_that_may_not_subscribe_to_its_commands_does_not_start() {
    jetfn_tests::init_tracing();
    let crippled = deploy_permissions_without("\"cmd.account.> q\"");
    let nats = start_nats(&crippled).await;
    let mut account = account_process(&nats, &[]);
    assert_refused_to_start(
        &mut account,
        "permission denied: Permissions Violation for Subscription to \"cmd.account.>\"",
    )
    .await;
}

/// Also across a slow link: the refusal of its subscription comes back after the start-up
/// would otherwise have said it was ready, and the function still waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_far_from_its_server_that_may_not_subscribe_does_not_start() {
    jetfn_tests::init_tracing();
    let crippled = deploy_permissions_without("\"cmd.account.> q\"");
    let nats = start_nats(&crippled).await;
    let far = SlowLink::start(nats.port(), Duration::from_millis(100))
        .await
        .unwrap();
    let mut account = account_process(&nats, &[("NATS_URL", far.url())]);
    assert_refused_to_start(
        &mut account,
        "permission denied: Permissions Violation for Subscription to \"cmd.account.>\"",
    )
    .await;
}

/// A command function refused the aggregate-affinity subjects refuses to start, naming the
/// subject and the setting that does without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_function_refused_the_affinity_subjects_does_not_start() {
    jetfn_tests::init_tracing();
    let crippled = deploy_permissions_without("\"jetfn.affinity.account.>\"");
    let nats = start_nats(&crippled).await;
    let mut account = account_process(&nats, &[]);
    let log = assert_refused_to_start(
        &mut account,
        "permission denied: Permissions Violation for Subscription to \"jetfn.affinity.account.",
    )
    .await;
    assert!(log.contains("or set command.affinity = false"), "{log}");

    // Without affinity it needs none of them.
    let mut account = account_process(&nats, &[("JETFN_COMMAND__AFFINITY", "false".to_owned())]);
    account
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();
    account.terminate().unwrap();
    assert!(account.wait(PATIENCE).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_decision_works_with_exactly_the_deploy_permissions() {
    jetfn_tests::init_tracing();
    let nats = start_nats(&deploy_permissions()).await;
    let mut account = account_process(&nats, &[]);
    account
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();
    let mut bank = FunctionProcess::spawn(
        "bank",
        &[
            ("NATS_URL", nats.url()),
            ("JETFN_NATS__USER", "bank".to_owned()),
            ("JETFN_NATS__PASSWORD", BANK_PASSWORD.to_owned()),
            ("JETFN_NATS__INBOX_PREFIX", "_INBOX.bank".to_owned()),
        ],
    )
    .unwrap();
    bank.wait_for_log("decision function ready", PATIENCE)
        .await
        .unwrap();

    let client = login(&nats, "jetfn-client", CLIENT_PASSWORD).await;
    for (id, body) in [
        ("alice", json!({"owner": "Alice", "initial_deposit": 100})),
        ("bob", json!({"owner": "Bob"})),
    ] {
        send(&client, id, "open", body, None)
            .await
            .unwrap()
            .accepted();
    }
    let moved = transfer(&client, "t1", "alice", "bob", 30, Some("t1-a"))
        .await
        .unwrap();
    assert_eq!(moved.accepted().aggregates.len(), 2, "{:?}", moved.body);
    let repeated = transfer(&client, "t1", "alice", "bob", 30, Some("t1-a"))
        .await
        .unwrap();
    assert_eq!(repeated.body, moved.body, "a repeat is answered alike");
    // A rejection is written to the bank's own ledger before it is answered.
    let refused = transfer(&client, "t2", "alice", "bob", 1000, None)
        .await
        .unwrap();
    assert_eq!(refused.reply.error_kind(), Some(ErrorKind::Rejected));
    let events = jetfn_tests::commands::stored_messages(
        &client_as_deploy(&nats).await,
        ACCOUNT_STREAM,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        jetfn_tests::commands::balance(
            &events
                .iter()
                .filter(|e| e.subject == "evt.account.bob")
                .cloned()
                .collect::<Vec<_>>()
        )
        .unwrap(),
        30
    );
    assert!(violations(&nats).is_empty(), "{:?}", violations(&nats));
    assert_running(&mut account);
    assert_running(&mut bank);
}

/// The operator user, which may read every stream.
async fn client_as_deploy(nats: &NatsServer) -> async_nats::Client {
    login(nats, "jetfn-deploy", DEPLOY_PASSWORD).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signup_decision_works_with_exactly_the_deploy_permissions() {
    jetfn_tests::init_tracing();
    let nats = start_nats(&deploy_permissions()).await;
    let mut signup = FunctionProcess::spawn(
        "signup",
        &[
            ("NATS_URL", nats.url()),
            ("JETFN_NATS__USER", "signup".to_owned()),
            ("JETFN_NATS__PASSWORD", SIGNUP_PASSWORD.to_owned()),
            ("JETFN_NATS__INBOX_PREFIX", "_INBOX.signup".to_owned()),
        ],
    )
    .unwrap();
    signup
        .wait_for_log("decision function ready", PATIENCE)
        .await
        .unwrap();
    let client = login(&nats, "jetfn-client", CLIENT_PASSWORD).await;
    let subject = jetfn::wire::CommandSubjects::new(None, "signup").subject("s1", "register");
    let register = async |user: &str, command_id: &str| {
        let body = json!({"user": user, "username": "alice"}).to_string();
        jetfn_tests::commands::send_raw(&client, &subject, body, Some(command_id)).await
    };
    register("u1", "c1").await.unwrap().accepted();
    // Taken: the rejection goes to the signup's ledger before it is answered.
    let taken = register("u2", "c2").await.unwrap();
    assert_eq!(taken.reply.error_kind(), Some(ErrorKind::Rejected));
    assert!(violations(&nats).is_empty(), "{:?}", violations(&nats));
    assert_running(&mut signup);
}

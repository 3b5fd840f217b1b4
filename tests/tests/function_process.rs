//! The account function as a deployed process: start-up errors, and SIGTERM under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use jetfn::Reply;
use jetfn_tests::commands::{ACCOUNT_STREAM, balance, send, stored_messages};
use jetfn_tests::{FunctionProcess, NatsServer};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const READY: &str = "command function ready";
const PATIENCE: Duration = Duration::from_secs(30);

async fn account_process(nats: &NatsServer) -> FunctionProcess {
    let mut process = FunctionProcess::spawn("account", &[("NATS_URL", nats.url())]).unwrap();
    process.wait_for_log(READY, PATIENCE).await.unwrap();
    process
}

/// Sends a command until some instance answers it, always with the same command id, the way a
/// careful client retries. Returns the answer.
async fn send_until_answered(
    client: &async_nats::Client,
    id: &str,
    command: &str,
    body: serde_json::Value,
    command_id: &str,
) -> Reply {
    for _ in 0..50 {
        match send(client, id, command, body.clone(), Some(command_id)).await {
            Ok(sent) if sent.reply.error_kind() != Some(jetfn::command::ErrorKind::Unavailable) => {
                return sent.reply;
            }
            // No responder, timeout or unavailable: the same command id is safe to resend.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("{command_id} was never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_accepted_command_and_half_applies_none() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut leaving = account_process(&nats).await;
    let staying = account_process(&nats).await;
    let client = nats.connect().await.unwrap();
    send_until_answered(
        &client,
        "load",
        "open",
        json!({"owner": "Ann"}),
        "open-load",
    )
    .await;

    let answered = Arc::new(AtomicUsize::new(0));
    let workers = (0..8).map(|worker| {
        let (client, answered) = (client.clone(), answered.clone());
        async move {
            let mut replies = BTreeMap::new();
            for n in 0..40 {
                // Deposits race on one account; openings with a first deposit are two events
                // that must land together.
                let (id, command, body) = if n % 4 == 0 {
                    (
                        format!("new-{worker}-{n}"),
                        "open",
                        json!({"owner": "Bo", "initial_deposit": 5}),
                    )
                } else {
                    ("load".to_owned(), "deposit", json!({"amount": 1}))
                };
                let command_id = format!("w{worker}-{n}");
                let reply = send_until_answered(&client, &id, command, body, &command_id).await;
                answered.fetch_add(1, Ordering::Relaxed);
                replies.insert(command_id, (id, reply));
            }
            replies
        }
    });
    let load = tokio::spawn(join_all(workers));

    while answered.load(Ordering::Relaxed) < 60 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    leaving.terminate().unwrap();
    let status = leaving.wait(PATIENCE).await.unwrap();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        leaving.log()
    );
    assert!(leaving.log().contains("command function stopped"));

    let replies: BTreeMap<String, (String, Reply)> =
        load.await.unwrap().into_iter().flatten().collect();
    assert_eq!(replies.len(), 320);
    let events = stored_messages(&client, ACCOUNT_STREAM, None)
        .await
        .unwrap();
    for (command_id, (id, reply)) in &replies {
        let Reply::Accepted(accepted) = reply else {
            panic!("{command_id} failed: {reply:?}");
        };
        let stored: Vec<_> = events
            .iter()
            .filter(|e| e.header("jetfn-command-id") == *command_id)
            .collect();
        assert_eq!(
            stored.len(),
            accepted.events.len(),
            "{command_id} stored exactly once, whole"
        );
        assert_eq!(stored.last().unwrap().seq, accepted.seq, "{command_id}");
        assert!(
            stored
                .iter()
                .all(|e| e.subject == format!("evt.account.{id}"))
        );
    }
    let hot: Vec<_> = events
        .iter()
        .filter(|e| e.subject == "evt.account.load")
        .cloned()
        .collect();
    assert_eq!(balance(&hot).unwrap(), 240);
    let versions: BTreeSet<u64> = replies
        .values()
        .filter(|(id, _)| id == "load")
        .map(|(_, reply)| match reply {
            Reply::Accepted(accepted) => accepted.version,
            Reply::Failed(_) => 0,
        })
        .collect();
    assert_eq!(versions.len(), 240, "each deposit got its own version");
    drop(staying);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_badly_typed_setting_stops_the_start_naming_the_key() {
    let nats = NatsServer::start().await.unwrap();
    let mut process = FunctionProcess::spawn(
        "account",
        &[
            ("NATS_URL", nats.url()),
            ("JETFN_COMMAND__MAX_RETRIES", "lots".into()),
        ],
    )
    .unwrap();
    let status = process.wait(PATIENCE).await.unwrap();
    assert!(!status.success());
    let log = process.log().to_lowercase();
    assert!(
        log.contains("command.max_retries") && log.contains("lots"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_setting_in_the_config_file_stops_the_start_naming_it() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jetfn.toml");
    std::fs::write(&file, "[command]\nmax_retry = 3\n").unwrap();
    let mut process = FunctionProcess::spawn(
        "account",
        &[
            ("NATS_URL", nats.url()),
            ("JETFN_CONFIG", file.display().to_string()),
        ],
    )
    .unwrap();
    let status = process.wait(PATIENCE).await.unwrap();
    assert!(!status.success());
    assert!(
        process.log().contains("unknown field: found `max_retry`"),
        "{}",
        process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_stops_the_start_naming_the_url() {
    let mut process =
        FunctionProcess::spawn("account", &[("NATS_URL", "nats://127.0.0.1:1".into())]).unwrap();
    let status = process.wait(PATIENCE).await.unwrap();
    assert!(!status.success());
    assert!(
        process
            .log()
            .contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{}",
        process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_idle_exits_zero() {
    let nats = NatsServer::start().await.unwrap();
    let mut process = account_process(&nats).await;
    process.terminate().unwrap();
    let status = process.wait(PATIENCE).await.unwrap();
    assert!(status.success(), "{status:?}");
    let client = nats.connect().await.unwrap();
    let gone = client.request("cmd.account.x.open", "{}".into()).await;
    assert!(gone.is_err(), "nobody serves after shutdown");
}

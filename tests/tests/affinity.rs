//! Aggregate affinity: with several instances of a command function, each aggregate's commands
//! are served by one of them, so no instance decides on a state another one has moved on from;
//! and when an instance stops or dies, the others take its aggregates over without losing or
//! doubling a command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use jetfn_tests::commands::{
    ACCOUNT_STREAM, account_config, account_config_without_affinity, balance, send, service_stats,
    start_two_accounts, stored_messages,
};
use jetfn_tests::faults::{FUNCTION_READY, send_until_answered};
use jetfn_tests::workload::poll;
use jetfn_tests::{FunctionProcess, NatsServer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const ACCOUNTS: usize = 40;
const DEPOSITS: usize = 10;
const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until each of `instances` instances counts `instances` instances alive.
async fn wait_until_they_know_each_other(client: &async_nats::Client, instances: usize) {
    poll("the instances to know each other", PATIENCE, || async {
        let stats = service_stats(client, "account", instances).await?;
        let known = stats
            .iter()
            .all(|s| data(s)["affinity"]["instances"] == instances);
        Ok(known.then_some(()))
    })
    .await
    .unwrap();
}

fn data(stats: &Value) -> &Value {
    &stats["endpoints"][0]["data"]
}

fn counter(stats: &[Value], path: &[&str]) -> Vec<u64> {
    stats
        .iter()
        .map(|s| {
            let mut value = data(s);
            for key in path {
                value = &value[*key];
            }
            value.as_u64().unwrap_or(0)
        })
        .collect()
}

fn id(n: usize) -> String {
    format!("aff-{n}")
}

/// Opens the first `accounts` accounts.
async fn open_accounts(client: &async_nats::Client, accounts: usize) {
    for n in 0..accounts {
        send(client, &id(n), "open", json!({"owner": "Ann"}), None)
            .await
            .unwrap()
            .accepted();
    }
}

/// Deposits `1..=DEPOSITS` into every account, all accounts at once, one deposit per account at
/// a time, counting the accepted ones in `done`; panics on any reply other than accepted.
async fn deposit_into_all(client: &async_nats::Client, done: &AtomicUsize) {
    join_all((0..ACCOUNTS).map(|n| async move {
        for amount in 1..=DEPOSITS {
            send(client, &id(n), "deposit", json!({"amount": amount}), None)
                .await
                .unwrap()
                .accepted();
            done.fetch_add(1, Ordering::Relaxed);
        }
    }))
    .await;
}

async fn assert_balances(client: &async_nats::Client, each: u64) {
    // One pass over the stream, split by account.
    let stored = stored_messages(client, ACCOUNT_STREAM, None).await.unwrap();
    for n in 0..ACCOUNTS {
        let subject = format!("evt.account.{}", id(n));
        let events: Vec<_> = stored
            .iter()
            .filter(|m| m.subject == subject)
            .cloned()
            .collect();
        assert_eq!(balance(&events).unwrap(), each, "{subject}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_instances_each_account_is_decided_by_one_of_them_and_never_retried() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let (first, second) = start_two_accounts(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    wait_until_they_know_each_other(&client, 2).await;

    open_accounts(&client, ACCOUNTS).await;
    deposit_into_all(&client, &AtomicUsize::new(0)).await;

    assert_balances(&client, (1..=DEPOSITS as u64).sum()).await;
    let stats = service_stats(&client, "account", 2).await.unwrap();
    // Random routing would make about half of these decide on a stale state and retry.
    assert_eq!(counter(&stats, &["retries"]), [0, 0], "{stats:?}");
    let accepted = counter(&stats, &["accepted"]);
    assert_eq!(
        accepted.iter().sum::<u64>(),
        (ACCOUNTS * (1 + DEPOSITS)) as u64
    );
    assert!(accepted.iter().all(|&n| n > 0), "both served: {accepted:?}");
    // Requests that reached the other instance were handed on, and each was taken over once.
    let handed_on: u64 = counter(&stats, &["affinity", "handed_on"]).iter().sum();
    let taken_over: u64 = counter(&stats, &["affinity", "taken_over"]).iter().sum();
    assert!(handed_on > 0, "{stats:?}");
    assert_eq!(handed_on, taken_over);
    // Every request is counted once, by the instance that served it.
    let requests: u64 = stats
        .iter()
        .map(|s| s["endpoints"][0]["num_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, (ACCOUNTS * (1 + DEPOSITS)) as u64);
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stopping_under_load_hands_its_accounts_over_without_losing_a_reply() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let (staying, leaving) = start_two_accounts(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    wait_until_they_know_each_other(&client, 2).await;
    open_accounts(&client, ACCOUNTS).await;

    // Every deposit is sent once and must be answered: none may fall between the two.
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (client, done) = (client.clone(), done.clone());
        async move { deposit_into_all(&client, &done).await }
    });
    poll("a quarter of the deposits", PATIENCE, || async {
        Ok((done.load(Ordering::Relaxed) >= ACCOUNTS * DEPOSITS / 4).then_some(()))
    })
    .await
    .unwrap();
    let stopping_at = done.load(Ordering::Relaxed);
    leaving.stop().await.unwrap();
    load.await.unwrap();
    assert!(
        stopping_at < ACCOUNTS * DEPOSITS,
        "stopped mid-load: {stopping_at}"
    );

    assert_balances(&client, (1..=DEPOSITS as u64).sum()).await;
    let stats = service_stats(&client, "account", 1).await.unwrap();
    assert_eq!(data(&stats[0])["affinity"]["instances"], 1, "{stats:?}");
    staying.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_an_instance_is_killed_its_accounts_are_served_by_the_others_exactly_once() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut process = FunctionProcess::spawn("account", &[("NATS_URL", nats.url())]).unwrap();
        process
            .wait_for_log(FUNCTION_READY, PATIENCE)
            .await
            .unwrap();
        instances.push(process);
    }
    let client = nats.connect().await.unwrap();
    wait_until_they_know_each_other(&client, 2).await;
    let subject = |n: usize, command: &str| format!("cmd.account.{}.{command}", id(n));
    for n in 0..ACCOUNTS {
        let body = json!({"owner": "Ann"});
        let opened = send_until_answered(&client, &subject(n, "open"), &body, &format!("o-{n}"))
            .await
            .unwrap();
        assert!(opened.reply.error_kind().is_none(), "{:?}", opened.reply);
    }

    // Killed outright: its announcements stop, and the commands handed to it until the other
    // notices are lost unanswered. The client resends them (same command id) until answered.
    instances[1].kill().unwrap();
    let answered = join_all((0..ACCOUNTS).map(|n| {
        let (client, subject) = (client.clone(), subject(n, "deposit"));
        async move {
            for amount in 1..=DEPOSITS {
                let body = json!({"amount": amount});
                let command_id = format!("d-{n}-{amount}");
                let answered = send_until_answered(&client, &subject, &body, &command_id)
                    .await
                    .unwrap();
                assert!(
                    answered.reply.error_kind().is_none(),
                    "{:?}",
                    answered.reply
                );
            }
        }
    }))
    .await;
    assert_eq!(answered.len(), ACCOUNTS);

    // Each deposit stored once, however often it was sent.
    assert_balances(&client, (1..=DEPOSITS as u64).sum()).await;
    let stats = service_stats(&client, "account", 1).await.unwrap();
    assert_eq!(data(&stats[0])["affinity"]["instances"], 1, "{stats:?}");
    instances[0].terminate().unwrap();
    assert!(instances[0].wait(PATIENCE).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_affinity_off_the_instances_share_requests_at_random_and_report_no_affinity() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let (first, second) = start_two_accounts(account_config_without_affinity(&nats))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    open_accounts(&client, ACCOUNTS).await;
    deposit_into_all(&client, &AtomicUsize::new(0)).await;

    assert_balances(&client, (1..=DEPOSITS as u64).sum()).await;
    let stats = service_stats(&client, "account", 2).await.unwrap();
    assert!(
        stats.iter().all(|s| data(s)["affinity"].is_null()),
        "{stats:?}"
    );
    // Without affinity the instances do decide on states the other has moved past, and retry.
    assert!(
        counter(&stats, &["retries"]).iter().sum::<u64>() > 0,
        "{stats:?}"
    );
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

/// What affinity usually spares the instances, and what keeps answers right while instances come
/// and go: a withdraw that reaches the instance whose cached balance is older than the deposit
/// just accepted by the other one is not rejected on that old balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_affinity_a_withdraw_is_never_rejected_on_a_balance_the_other_instance_moved() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let (first, second) = start_two_accounts(account_config_without_affinity(&nats))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    open_accounts(&client, 4).await;
    // Each round leaves every balance at 0: the withdraw is only possible after the deposit.
    for round in 0..30 {
        for n in 0..4 {
            let amount = 10 + round;
            send(&client, &id(n), "deposit", json!({"amount": amount}), None)
                .await
                .unwrap()
                .accepted();
            send(&client, &id(n), "withdraw", json!({"amount": amount}), None)
                .await
                .unwrap()
                .accepted();
        }
    }
    let stats = service_stats(&client, "account", 2).await.unwrap();
    let accepted = counter(&stats, &["accepted"]);
    assert!(accepted.iter().all(|&n| n > 0), "both served: {accepted:?}");
    assert_eq!(counter(&stats, &["rejected"]), [0, 0], "{stats:?}");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

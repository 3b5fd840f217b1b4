//! A conflict storm (issue 11): three instances of the account function, 64 clients making 50
//! deposits each on 8 accounts, every client resending `conflict` and `unavailable` answers under
//! the same command id. No update may be lost: each account's balance is the sum of its accepted
//! deposits, each accepted command's event is stored exactly once, and each deposit got its own
//! version. The `conflict` answers are counted and printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::try_join_all;
use jetfn::Reply;
use jetfn_tests::commands::balance;
use jetfn_tests::faults::{
    Acked, account_event_subject, account_subject, check_exactly_once, expect_accepted,
    send_until_answered,
};
use jetfn_tests::{FunctionProcess, NatsServer};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const INSTANCES: usize = 3;
const CLIENTS: usize = 64;
const DEPOSITS: usize = 50;
const ACCOUNTS: usize = 8;
const PATIENCE: Duration = Duration::from_secs(60);

/// Conflict retries inside an instance before it answers `conflict`: few, so that the storm
/// hands conflicts back to the clients and their resends under the same id are exercised.
const MAX_RETRIES: &str = "2";

async fn account_process(nats: &NatsServer) -> FunctionProcess {
    let env = [
        ("NATS_URL", nats.url()),
        ("JETFN_COMMAND__MAX_RETRIES", MAX_RETRIES.to_owned()),
        // The storm is three instances deciding the same accounts (as while instances come
        // and go); affinity would route each account to one of them.
        ("JETFN_COMMAND__AFFINITY", "false".to_owned()),
    ];
    let mut process = FunctionProcess::spawn("account", &env).unwrap();
    process
        .wait_for_log("command function ready", PATIENCE)
        .await
        .unwrap();
    process
}

fn account(n: usize) -> String {
    format!("storm-{n}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_storm_on_three_instances_loses_no_update() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        instances.push(account_process(&nats).await);
    }
    let client = nats.connect().await.unwrap();

    let mut acked: Vec<Acked> = Vec::new();
    for n in 0..ACCOUNTS {
        let (id, command_id) = (account(n), format!("storm-open-{n}"));
        let body = json!({"owner": format!("Storm {n}")});
        let answered =
            send_until_answered(&client, &account_subject(&id, "open"), &body, &command_id)
                .await
                .unwrap();
        acked.push(expect_accepted(&id, &command_id, 0, answered).unwrap());
    }

    let started = Instant::now();
    let clients = (0..CLIENTS).map(|c| {
        let client = client.clone();
        async move {
            let id = account(c % ACCOUNTS);
            let subject = account_subject(&id, "deposit");
            let mut done = Vec::with_capacity(DEPOSITS);
            for d in 0..DEPOSITS {
                // Amounts differ by client and deposit, so a lost or doubled one shows in the sum.
                let amount = (1 + c * DEPOSITS + d) as u64;
                let command_id = format!("storm-{c}-{d}");
                let answered =
                    send_until_answered(&client, &subject, &json!({"amount": amount}), &command_id)
                        .await?;
                done.push(expect_accepted(&id, &command_id, amount, answered)?);
            }
            anyhow::Ok(done)
        }
    });
    let deposits: Vec<Acked> = try_join_all(clients)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    let took = started.elapsed();
    assert_eq!(deposits.len(), CLIENTS * DEPOSITS);
    acked.extend(deposits);

    let (figures, events) = check_exactly_once(&client, &acked).await.unwrap();
    println!(
        "conflict storm ({INSTANCES} instances, {CLIENTS} clients x {DEPOSITS} deposits on \
         {ACCOUNTS} accounts, {:.2}s): {} conflict answers resent; {figures}",
        took.as_secs_f64(),
        figures.conflicts
    );
    assert!(
        figures.exact(),
        "{figures}\n{}",
        figures.problems.join("\n")
    );

    // No lost update: each balance, as the stream folds it, is the sum of accepted deposits,
    // and each accepted deposit saw its own version of the account.
    let mut wanted = BTreeMap::<String, u64>::new();
    let mut versions = BTreeMap::<String, BTreeSet<u64>>::new();
    for command in &acked {
        *wanted.entry(command.account.clone()).or_default() += command.amount;
        if let Reply::Accepted(accepted) = &command.answered.reply {
            versions
                .entry(command.account.clone())
                .or_default()
                .insert(accepted.version);
        }
    }
    for (id, want) in &wanted {
        let subject = account_event_subject(id);
        let history: Vec<_> = events
            .iter()
            .filter(|e| e.subject == subject)
            .cloned()
            .collect();
        assert_eq!(balance(&history).unwrap(), *want, "balance of {id}");
        let per_account = CLIENTS / ACCOUNTS * DEPOSITS + 1;
        assert_eq!(
            versions[id],
            (1..=per_account as u64).collect::<BTreeSet<_>>(),
            "{id}: the open and each deposit got versions 1 to {per_account}, each once"
        );
    }
    for mut instance in instances {
        assert!(
            instance.try_status().unwrap().is_none(),
            "an instance exited during the storm; log:\n{}",
            instance.log()
        );
    }
}

//! The transfer process manager against real servers: money moves exactly once through kills,
//! refunds happen once, and timers survive restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use account::{Account, Amount, Owner};
use anyhow::{Context, Result, bail};
use futures::StreamExt;
use jetfn::client::CommandClient;
use jetfn::wire::header;
use jetfn_tests::commands::{ACCOUNT_STREAM, StoredMessage, balance, stored_messages};
use jetfn_tests::readmodels::check_read_model;
use jetfn_tests::workload::Rng;
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use transfer::{AccountId, Transfer};

const TRANSFER_STREAM: &str = "TRANSFER_EVENTS";
const INSTANCE_STREAM: &str = "PM_TRANSFER";
const PATIENCE: Duration = Duration::from_secs(30);

/// The log line each kind of function prints once it serves.
fn ready_line(name: &str) -> &'static str {
    match name {
        "account" | "transfer" => "command function ready",
        "transfer-manager" => "process manager ready",
        _ => "projection function ready",
    }
}

struct Functions {
    nats: String,
    redis: Option<String>,
    deadline_secs: u64,
    running: BTreeMap<&'static str, FunctionProcess>,
}

impl Functions {
    fn new(nats: &NatsServer, redis: Option<&RedisServer>, deadline_secs: u64) -> Self {
        Functions {
            nats: nats.url(),
            redis: redis.map(RedisServer::url),
            deadline_secs,
            running: BTreeMap::new(),
        }
    }

    async fn start(&mut self, name: &'static str) -> Result<()> {
        let mut envs = vec![
            ("NATS_URL", self.nats.clone()),
            ("TRANSFER_DEADLINE_SECS", self.deadline_secs.to_string()),
        ];
        if let Some(redis) = &self.redis {
            envs.push(("REDIS_URL", redis.clone()));
        }
        let mut process = FunctionProcess::spawn(name, &envs)?;
        process.wait_for_log(ready_line(name), PATIENCE).await?;
        self.running.insert(name, process);
        Ok(())
    }

    fn kill(&mut self, name: &str) -> Result<()> {
        if let Some(mut process) = self.running.remove(name) {
            process.kill()?;
        }
        Ok(())
    }
}

fn commands(client: &async_nats::Client) -> CommandClient {
    CommandClient::new(client.clone())
        .attempts(100)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
}

async fn open(client: &CommandClient, id: &str, deposit: u64) -> Result<()> {
    let command = account::Command::Open {
        owner: Owner::try_from(format!("owner of {id}")).map_err(anyhow::Error::msg)?,
        initial_deposit: Amount::try_from(deposit).ok(),
    };
    client
        .send_with_id::<Account>(id, &command, &format!("open-{id}"))
        .await?;
    Ok(())
}

async fn start_transfer(
    client: &CommandClient,
    id: &str,
    from: &str,
    to: &str,
    amount: u64,
) -> Result<()> {
    let command = transfer::Command::Start {
        from: AccountId::try_from(from.to_owned()).map_err(anyhow::Error::msg)?,
        to: AccountId::try_from(to.to_owned()).map_err(anyhow::Error::msg)?,
        amount: Amount::try_from(amount).map_err(anyhow::Error::msg)?,
    };
    client
        .send_with_id::<Transfer>(id, &command, &format!("start-{id}"))
        .await?;
    Ok(())
}

/// The outcome event of each transfer that has one, by transfer id.
async fn outcomes(client: &async_nats::Client) -> Result<BTreeMap<String, Vec<String>>> {
    let mut outcomes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in stored_messages(client, TRANSFER_STREAM, None).await? {
        let kind = event.header(header::CE_TYPE);
        if kind != "TransferStarted" {
            let id = event
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            outcomes.entry(id).or_default().push(kind);
        }
    }
    Ok(outcomes)
}

async fn messages_in(client: &async_nats::Client, stream: &str) -> Result<u64> {
    jetfn_tests::commands::message_count(client, stream).await
}

/// Waits until every instance's last record is `jetfn.Ended`.
async fn wait_until_all_ended(
    client: &async_nats::Client,
    instances: usize,
    timeout: Duration,
) -> Result<Vec<StoredMessage>> {
    let started = Instant::now();
    loop {
        let records = stored_messages(client, INSTANCE_STREAM, None).await?;
        let mut last: BTreeMap<&str, String> = BTreeMap::new();
        for record in &records {
            last.insert(&record.subject, record.header(header::CE_TYPE));
        }
        let ended = last.values().filter(|t| *t == "jetfn.Ended").count();
        if last.len() == instances && ended == instances {
            return Ok(records);
        }
        if started.elapsed() > timeout {
            let open: Vec<_> = last.iter().filter(|(_, t)| *t != "jetfn.Ended").collect();
            bail!(
                "{ended} of {instances} instances ended within {timeout:?}; open: {:?}",
                open.iter().take(10).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Each account's events by subject.
fn by_account(events: &[StoredMessage]) -> BTreeMap<String, Vec<StoredMessage>> {
    let mut accounts: BTreeMap<String, Vec<StoredMessage>> = BTreeMap::new();
    for event in events {
        let id = event.subject.rsplit('.').next().unwrap_or_default();
        accounts
            .entry(id.to_owned())
            .or_default()
            .push(event.clone());
    }
    accounts
}

/// The money a transfer's commands moved: per account, deposits minus withdrawals. Also fails
/// if any command id of the process manager was applied more than once.
fn moved_by_transfers(events: &[StoredMessage]) -> Result<BTreeMap<String, BTreeMap<String, i64>>> {
    let mut seen = BTreeSet::new();
    let mut moved: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for event in events {
        let command_id = event.header(header::COMMAND_ID);
        let Some(rest) = command_id.strip_prefix("pm.transfer.") else {
            continue;
        };
        if !seen.insert(command_id.clone()) {
            bail!(
                "command id {command_id} was applied twice (again at {})",
                event.seq
            );
        }
        let transfer = rest.split('.').next().unwrap_or_default().to_owned();
        let account = event
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let amount = event.payload["amount"].as_i64().context("amount")?;
        let signed = match event.header(header::CE_TYPE).as_str() {
            "MoneyDeposited" => amount,
            "MoneyWithdrawn" => -amount,
            other => bail!("transfer command {command_id} caused {other}"),
        };
        *moved
            .entry(transfer)
            .or_default()
            .entry(account)
            .or_default() += signed;
    }
    Ok(moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_a_closed_or_unknown_account_is_refunded_exactly_once() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut functions = Functions::new(&nats, None, 30);
    for name in ["account", "transfer", "transfer-manager"] {
        functions.start(name).await.unwrap();
    }
    let client = nats.connect().await.unwrap();
    let send = commands(&client);
    open(&send, "alice", 100).await.unwrap();
    open(&send, "bob", 0).await.unwrap();
    open(&send, "carol", 0).await.unwrap();
    send.send_with_id::<Account>("carol", &account::Command::Close {}, "close-carol")
        .await
        .unwrap();

    start_transfer(&send, "t1", "alice", "bob", 10)
        .await
        .unwrap();
    start_transfer(&send, "t2", "alice", "carol", 5)
        .await
        .unwrap();
    start_transfer(&send, "t3", "alice", "nobody", 7)
        .await
        .unwrap();
    start_transfer(&send, "t4", "bob", "alice", 1000)
        .await
        .unwrap();
    wait_until_all_ended(&client, 4, PATIENCE).await.unwrap();

    let outcomes = outcomes(&client).await.unwrap();
    assert_eq!(outcomes["t1"], ["TransferCompleted"]);
    for failed in ["t2", "t3", "t4"] {
        assert_eq!(outcomes[failed], ["TransferFailed"], "{failed}");
    }
    let events = stored_messages(&client, ACCOUNT_STREAM, None)
        .await
        .unwrap();
    let accounts = by_account(&events);
    assert_eq!(balance(&accounts["alice"]).unwrap(), 90);
    assert_eq!(balance(&accounts["bob"]).unwrap(), 10);
    assert_eq!(balance(&accounts["carol"]).unwrap(), 0);
    let moved = moved_by_transfers(&events).unwrap();
    // The refunds: one withdrawal and one deposit on alice each, nothing elsewhere.
    for refunded in ["t2", "t3"] {
        assert_eq!(
            moved[refunded],
            BTreeMap::from([("alice".into(), 0)]),
            "{refunded}"
        );
        let refunds = events
            .iter()
            .filter(|e| {
                e.header(header::COMMAND_ID)
                    .starts_with(&format!("pm.transfer.{refunded}."))
            })
            .filter(|e| e.header(header::CE_TYPE) == "MoneyDeposited")
            .count();
        assert_eq!(refunds, 1, "{refunded}");
    }
    assert!(!moved.contains_key("t4"), "a refused debit moved money");

    // An event the process manager cannot read is dead-lettered, with the reason.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(header::CE_TYPE, "TransferStarted");
    let js = async_nats::jetstream::new(client.clone());
    js.publish_with_headers("evt.transfer.bad", headers, r#"{"from":1}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let started = Instant::now();
    let letter = loop {
        let letters = stored_messages(&client, "JETFN_DLQ", Some("jetfn.dlq.pm-transfer"))
            .await
            .unwrap();
        if let Some(letter) = letters.into_iter().next() {
            break letter;
        }
        if started.elapsed() > PATIENCE {
            let all = stored_messages(&client, "JETFN_DLQ", None).await.unwrap();
            let subjects: Vec<_> = all.iter().map(|m| m.subject.clone()).collect();
            panic!("no dead letter on jetfn.dlq.pm-transfer; the stream has {subjects:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = letter.header(header::DLQ_ERROR);
    assert!(error.contains("TransferStarted"), "{error}");
    assert_eq!(letter.header(header::DLQ_STREAM), TRANSFER_STREAM);

    // `jetfn status` shows the process manager and what it did.
    let output = tokio::process::Command::new(jetfn_tests::binary_path("jetfn").unwrap())
        .args(["--server", &nats.url(), "status", "--json"])
        .env_remove("NATS_URL")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let manager = &status["process_managers"][0];
    assert_eq!(manager["name"], "pm-transfer", "{status:#}");
    assert_eq!(manager["instance_stream"], INSTANCE_STREAM, "{status:#}");
    assert_eq!(
        (
            &manager["started"],
            &manager["completed"],
            &manager["compensated"]
        ),
        (&4.into(), &1.into(), &3.into()),
        "{status:#}"
    );
    assert_eq!(manager["open"], 0, "{status:#}");
    assert_eq!(manager["dead_letters"], 1, "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_survive_kills_and_conserve_money() {
    jetfn_tests::init_tracing();
    let transfers: usize = std::env::var("JETFN_TEST_TRANSFERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500);
    const ACCOUNTS: usize = 50;
    const OPENING: u64 = 1000;
    let nats = NatsServer::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let mut functions = Functions::new(&nats, Some(&redis), 20);
    for name in [
        "account",
        "transfer",
        "transfer-manager",
        "account-projection",
        "transfer-projection",
    ] {
        functions.start(name).await.unwrap();
    }
    let client = nats.connect().await.unwrap();
    let send = commands(&client);
    futures::stream::iter(0..ACCOUNTS)
        .map(|n| {
            let send = send.clone();
            async move { open(&send, &format!("a{n}"), OPENING).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .unwrap();

    let mut rng = Rng::new(13);
    let plan: Vec<(String, String, String, u64)> = (0..transfers)
        .map(|n| {
            let from = rng.below(ACCOUNTS);
            let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
            (
                format!("t{n}"),
                format!("a{from}"),
                format!("a{to}"),
                rng.between(1, 400),
            )
        })
        .collect();
    let starting = {
        let send = send.clone();
        tokio::spawn(async move {
            futures::stream::iter(plan)
                .map(|(id, from, to, amount)| {
                    let send = send.clone();
                    async move { start_transfer(&send, &id, &from, &to, amount).await }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<_>>>()
        })
    };

    // Kill -9 one of the three at random, restart it, again, until every transfer has an
    // outcome.
    let victims = ["account", "transfer-manager", "account-projection"];
    let mut kills = BTreeMap::<&str, u32>::new();
    let began = Instant::now();
    let mut round = 0;
    loop {
        let done = messages_in(&client, TRANSFER_STREAM).await.unwrap() as usize;
        if done >= 2 * transfers {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(150),
            "{} of {transfers} transfers have an outcome after {:?}; kills {kills:?}",
            done.saturating_sub(transfers),
            began.elapsed()
        );
        // Every victim at least once, then at random, while the work goes on.
        let victim = if round < victims.len() {
            victims[round]
        } else {
            victims[rng.below(victims.len())]
        };
        round += 1;
        if round <= 9 {
            tokio::time::sleep(Duration::from_millis(rng.between(300, 1500))).await;
            functions.kill(victim).unwrap();
            *kills.entry(victim).or_default() += 1;
            functions.start(victim).await.unwrap();
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    starting.await.unwrap().unwrap();
    let records = wait_until_all_ended(&client, transfers, Duration::from_secs(60))
        .await
        .unwrap();

    let outcomes = outcomes(&client).await.unwrap();
    assert_eq!(outcomes.len(), transfers, "transfers without an outcome");
    let mut completed = 0;
    let events = stored_messages(&client, ACCOUNT_STREAM, None)
        .await
        .unwrap();
    let moved = moved_by_transfers(&events).unwrap();
    for (id, outcome) in &outcomes {
        let nothing = BTreeMap::new();
        let moved = moved.get(id).unwrap_or(&nothing);
        match outcome.as_slice() {
            [one] if one == "TransferCompleted" => {
                completed += 1;
                let amounts: BTreeSet<i64> = moved.values().copied().collect();
                assert_eq!(moved.len(), 2, "{id} moved {moved:?}");
                assert_eq!(moved.values().sum::<i64>(), 0, "{id} moved {moved:?}");
                assert!(!amounts.contains(&0), "{id} moved {moved:?}");
            }
            [one] if one == "TransferFailed" => {
                assert!(
                    moved.values().all(|m| *m == 0),
                    "{id} failed but moved {moved:?}"
                );
            }
            other => panic!("{id} has outcomes {other:?}"),
        }
    }
    let accounts = by_account(&events);
    let total: u64 = accounts.values().map(|e| balance(e).unwrap()).sum();
    assert_eq!(total, ACCOUNTS as u64 * OPENING, "money is not conserved");

    // The transfer read model shows each outcome.
    let mut redis_connection = redis.connect().await.unwrap();
    for (id, outcome) in &outcomes {
        let want = if outcome[0] == "TransferCompleted" {
            "completed"
        } else {
            "failed"
        };
        let key = format!("{{transfer-status}}:g1:transfer:{id}");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status: Option<String> = redis::cmd("HGET")
                .arg(&key)
                .arg("status")
                .query_async(&mut redis_connection)
                .await
                .unwrap();
            if status.as_deref() == Some(want) {
                break;
            }
            assert!(Instant::now() < deadline, "{key} is {status:?}, not {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The read model agrees with the stream, once the projection has caught up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check_read_model(&client, &redis, 1).await {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline => {
                tracing::debug!(%err, "read model not there yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => panic!("{err:#}"),
        }
    }
    eprintln!(
        "{transfers} transfers ({completed} completed, {} failed) among {ACCOUNTS} accounts in \
         {:?}, {} instance records, kills {kills:?}; money conserved ({total})",
        transfers - completed,
        began.elapsed(),
        records.len()
    );
}

async fn records_of(client: &async_nats::Client, id: &str) -> Vec<StoredMessage> {
    stored_messages(client, INSTANCE_STREAM, Some(&format!("pm.transfer.{id}")))
        .await
        .unwrap()
}

async fn status(client: &async_nats::Client) -> serde_json::Value {
    let reply = client
        .request("jetfn.pm.transfer.status", "".into())
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fires_after_a_restart_and_is_ignored_once_its_step_completed() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut functions = Functions::new(&nats, None, 2);
    functions.start("account").await.unwrap();
    let client = nats.connect().await.unwrap();
    let send = commands(&client);
    open(&send, "alice", 100).await.unwrap();
    open(&send, "bob", 0).await.unwrap();

    // The debit cannot be answered: the account function is down.
    functions.kill("account").unwrap();
    functions.start("transfer").await.unwrap();
    functions.start("transfer-manager").await.unwrap();
    start_transfer(&send, "t1", "alice", "bob", 10)
        .await
        .unwrap();
    let schedule = "jetfn.pm.transfer.timer.t1.deadline";
    let started = Instant::now();
    while stored_messages(&client, "PM_TRANSFER_TIMERS", Some(schedule))
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the deadline was never scheduled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The process manager is down when the deadline passes; the timer is the server's.
    functions.kill("transfer-manager").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    functions.start("transfer-manager").await.unwrap();
    let started = Instant::now();
    let failed = loop {
        let events = stored_messages(&client, TRANSFER_STREAM, Some("evt.transfer.t1"))
            .await
            .unwrap();
        if let Some(failed) = events
            .iter()
            .find(|e| e.header(header::CE_TYPE) == "TransferFailed")
        {
            break failed.payload.clone();
        }
        assert!(started.elapsed() < PATIENCE, "the deadline did not fail t1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed["reason"], "timed out");

    // The account function returns: the withdrawal, sent again with its id, lands and is
    // refunded.
    functions.start("account").await.unwrap();
    wait_until_all_ended(&client, 1, PATIENCE).await.unwrap();
    let events = stored_messages(&client, ACCOUNT_STREAM, None)
        .await
        .unwrap();
    let accounts = by_account(&events);
    assert_eq!(balance(&accounts["alice"]).unwrap(), 100);
    assert_eq!(balance(&accounts["bob"]).unwrap(), 0);
    let moved = moved_by_transfers(&events).unwrap();
    assert_eq!(moved["t1"], BTreeMap::from([("alice".into(), 0)]));

    // A transfer that completed: its deadline firing now (late) changes nothing.
    start_transfer(&send, "t2", "alice", "bob", 5)
        .await
        .unwrap();
    wait_until_all_ended(&client, 2, PATIENCE).await.unwrap();
    let before = records_of(&client, "t2").await;
    let set = before
        .iter()
        .find(|r| r.header(header::CE_TYPE) == "jetfn.TimerSet")
        .expect("t2 armed its deadline");
    let firing = serde_json::json!({"id": "t2", "name": "deadline", "token": set.payload["token"]});
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        "jetfn.pm.transfer.fired.t2.deadline",
        firing.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let started = Instant::now();
    while status(&client).await["timers"]["ignored"].as_u64() < Some(1) {
        assert!(
            started.elapsed() < PATIENCE,
            "the late firing was not handled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(records_of(&client, "t2").await.len(), before.len());
    let outcomes = outcomes(&client).await.unwrap();
    assert_eq!(outcomes["t2"], ["TransferCompleted"]);
}

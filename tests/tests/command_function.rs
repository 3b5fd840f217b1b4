//! The command contract, checked against a real nats-server with the account function.
//!
//! Clients here are plain NATS requests, as a client in any language would send them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use jetfn::command::ErrorKind;
use jetfn_tests::NatsServer;
use jetfn_tests::commands::{
    ACCOUNT_STREAM, account_config, account_config_without_affinity, balance, message_count, send,
    send_raw, service_stats, start_account, start_two_accounts, stored_messages, stream,
};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

async fn server_with_account() -> (
    NatsServer,
    jetfn::command::RunningFunction,
    async_nats::Client,
) {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    (nats, function, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_lives_through_open_deposit_withdraw_and_close() {
    let (_nats, function, client) = server_with_account().await;

    let opened = send(
        &client,
        "acc-1",
        "open",
        json!({"owner": "Ann", "initial_deposit": 100}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        opened.body,
        json!({"ok": true, "id": "acc-1", "version": 2, "seq": 2,
               "events": ["AccountOpened", "MoneyDeposited"]})
    );
    let deposited = send(&client, "acc-1", "deposit", json!({"amount": 50}), None)
        .await
        .unwrap();
    assert_eq!(deposited.accepted().version, 3);
    assert_eq!(deposited.accepted().events, ["MoneyDeposited"]);
    let withdrawn = send(&client, "acc-1", "withdraw", json!({"amount": 150}), None)
        .await
        .unwrap();
    assert_eq!(withdrawn.accepted().version, 4);
    let closed = send(&client, "acc-1", "close", json!({}), None)
        .await
        .unwrap();
    assert_eq!(
        closed.body,
        json!({"ok": true, "id": "acc-1", "version": 5, "seq": 5, "events": ["AccountClosed"]})
    );
    assert_eq!(closed.error_code, None);

    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.acc-1"))
        .await
        .unwrap();
    let types: Vec<String> = events.iter().map(|e| e.header("ce-type")).collect();
    assert_eq!(
        types,
        [
            "AccountOpened",
            "MoneyDeposited",
            "MoneyDeposited",
            "MoneyWithdrawn",
            "AccountClosed"
        ]
    );
    assert_eq!(events[0].payload, json!({"owner": "Ann"}));
    assert_eq!(events[3].payload, json!({"amount": 150}));
    assert_eq!(events[4].payload, json!({}));
    assert_eq!(balance(&events).unwrap(), 0);
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_carry_cloudevents_headers_and_a_message_id_derived_from_the_command_id() {
    let (_nats, function, client) = server_with_account().await;
    let body = json!({"owner": "Ann", "initial_deposit": 5});
    send(&client, "acc-2", "open", body, Some("cmd-42"))
        .await
        .unwrap()
        .accepted();

    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.acc-2"))
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event.header("ce-specversion"), "1.0");
        assert_eq!(event.header("ce-source"), "/jetfn/account");
        assert_eq!(event.header("ce-subject"), "acc-2");
        assert_eq!(event.header("ce-datacontenttype"), "application/json");
        assert_eq!(event.header("jetfn-event-version"), "1");
        assert_eq!(event.header("jetfn-command-id"), "cmd-42");
        assert_eq!(event.header("jetfn-command"), "open");
        assert_eq!(event.header("Nats-Msg-Id"), format!("acc-2:cmd-42:{index}"));
        assert_eq!(event.header("ce-id"), event.header("Nats-Msg-Id"));
        assert!(
            event.header("ce-time").ends_with('Z'),
            "{}",
            event.header("ce-time")
        );
    }
    assert_eq!(events[0].header("ce-type"), "AccountOpened");
    assert_eq!(events[1].header("ce-type"), "MoneyDeposited");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_provisioned_with_the_settings_jetfn_relies_on() {
    let (nats, function, client) = server_with_account().await;
    // A second instance provisions again without changing anything.
    let second = start_account(account_config(&nats)).await.unwrap();
    let mut stream = stream(&client, ACCOUNT_STREAM).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    use async_nats::jetstream::stream::{DiscardPolicy, StorageType};
    assert_eq!(config.subjects, ["evt.account.*"]);
    assert_eq!(config.storage, StorageType::File);
    assert_eq!(config.discard, DiscardPolicy::New);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    assert!(config.allow_direct && config.allow_atomic_publish);
    assert!(config.deny_delete && config.deny_purge);
    second.stop().await.unwrap();
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_replies_422_and_appends_nothing() {
    let (_nats, function, client) = server_with_account().await;
    send(
        &client,
        "open-1",
        "open",
        json!({"owner": "Ann", "initial_deposit": 10}),
        None,
    )
    .await
    .unwrap()
    .accepted();
    send(&client, "closed-1", "open", json!({"owner": "Cy"}), None)
        .await
        .unwrap()
        .accepted();
    send(&client, "closed-1", "close", json!({}), None)
        .await
        .unwrap()
        .accepted();
    let before = message_count(&client, ACCOUNT_STREAM).await.unwrap();

    let cases = [
        (
            "open-1",
            "open",
            json!({"owner": "Bob"}),
            "account already exists",
        ),
        (
            "nobody",
            "deposit",
            json!({"amount": 1}),
            "account is not open",
        ),
        (
            "nobody",
            "withdraw",
            json!({"amount": 1}),
            "account is not open",
        ),
        ("nobody", "close", json!({}), "account is not open"),
        (
            "closed-1",
            "deposit",
            json!({"amount": 1}),
            "account is closed",
        ),
        (
            "closed-1",
            "withdraw",
            json!({"amount": 1}),
            "account is closed",
        ),
        ("closed-1", "close", json!({}), "account is closed"),
        (
            "open-1",
            "withdraw",
            json!({"amount": 11}),
            "insufficient funds: balance is 10",
        ),
        (
            "open-1",
            "close",
            json!({}),
            "balance must be zero to close, is 10",
        ),
    ];
    for (id, command, body, message) in cases {
        let sent = send(&client, id, command, body, None).await.unwrap();
        assert_eq!(
            sent.body,
            json!({"ok": false, "error": {"kind": "rejected", "message": message}}),
            "{id} {command}"
        );
        assert_eq!(sent.error_code.as_deref(), Some("422"));
        assert_eq!(sent.error_message.as_deref(), Some(message));
    }
    assert_eq!(
        message_count(&client, ACCOUNT_STREAM).await.unwrap(),
        before
    );
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_replies_400_naming_the_problem_and_appends_nothing() {
    let (_nats, function, client) = server_with_account().await;
    send(&client, "acc-3", "open", json!({"owner": "Ann"}), None)
        .await
        .unwrap()
        .accepted();
    let before = message_count(&client, ACCOUNT_STREAM).await.unwrap();

    let oversized = format!(r#"{{"amount": 1, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "cmd.account.acc-3.deposit",
            "{not json".into(),
            "not valid JSON",
        ),
        (
            "cmd.account.acc-3.deposit",
            "[1, 2]".into(),
            "must be a JSON object",
        ),
        (
            "cmd.account.acc-3.deposit",
            r#"{"amount": "ten"}"#.into(),
            "/amount: invalid type",
        ),
        (
            "cmd.account.acc-3.deposit",
            r#"{"amount": -5}"#.into(),
            "/amount: invalid value",
        ),
        (
            "cmd.account.acc-3.deposit",
            r#"{"amount": 0}"#.into(),
            "/amount: an amount must be at least 1",
        ),
        (
            "cmd.account.acc-3.deposit",
            "{}".into(),
            "missing field `amount`",
        ),
        (
            "cmd.account.acc-3.deposit",
            r#"{"amount": 1, "memo": "x"}"#.into(),
            "unknown field `memo`",
        ),
        (
            "cmd.account.new-1.open",
            r#"{"owner": ""}"#.into(),
            "/owner: owner must not be empty",
        ),
        (
            "cmd.account.acc-3.fly",
            "{}".into(),
            "unknown command \"fly\"",
        ),
        (
            "cmd.account.acc=3.deposit",
            r#"{"amount": 1}"#.into(),
            "aggregate id \"acc=3\"",
        ),
        (
            "cmd.account.acc-3",
            r#"{"amount": 1}"#.into(),
            "must have the form",
        ),
        (
            "cmd.account.acc-3.deposit.now",
            r#"{"amount": 1}"#.into(),
            "must have the form",
        ),
        ("cmd.account.acc-3.deposit", oversized, "the limit is 65536"),
    ];
    for (subject, body, fragment) in cases {
        let sent = send_raw(&client, subject, body, None).await.unwrap();
        let failure = match &sent.reply {
            jetfn::Reply::Failed(failure) => failure.clone(),
            other => panic!("{subject}: expected invalid, got {other:?}"),
        };
        assert_eq!(failure.kind, ErrorKind::Invalid, "{subject}");
        assert!(
            failure.message.contains(fragment),
            "{subject}: {:?}",
            failure.message
        );
        assert_eq!(sent.error_code.as_deref(), Some("400"), "{subject}");
    }
    let long_id = "a".repeat(129);
    let sent = send(&client, &long_id, "open", json!({"owner": "Ann"}), None)
        .await
        .unwrap();
    assert_eq!(sent.reply.error_kind(), Some(ErrorKind::Invalid));
    assert_eq!(
        message_count(&client, ACCOUNT_STREAM).await.unwrap(),
        before
    );
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_deposits_from_separate_connections_all_land_exactly_once() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    // Two instances without affinity (as while instances come and go), so deposits race
    // across two instances' states and must retry.
    let (first, second) = start_two_accounts(account_config_without_affinity(&nats))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    send(&client, "hot", "open", json!({"owner": "Ann"}), None)
        .await
        .unwrap()
        .accepted();

    let mut connections = Vec::new();
    for _ in 0..32 {
        connections.push(nats.connect().await.unwrap());
    }
    let replies =
        join_all(connections.iter().enumerate().map(|(n, connection)| {
            send(connection, "hot", "deposit", json!({"amount": n + 1}), None)
        }))
        .await;

    let versions: BTreeSet<u64> = replies
        .iter()
        .map(|r| r.as_ref().unwrap().accepted().version)
        .collect();
    assert_eq!(
        versions,
        (2..=33).collect::<BTreeSet<u64>>(),
        "distinct versions 2..=33"
    );
    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.hot"))
        .await
        .unwrap();
    assert_eq!(events.len(), 33);
    assert_eq!(balance(&events).unwrap(), (1..=32).sum::<u64>());
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_command_id_inside_the_duplicate_window_gets_the_first_reply_and_one_effect() {
    let (_nats, function, client) = server_with_account().await;
    send(&client, "acc-4", "open", json!({"owner": "Ann"}), None)
        .await
        .unwrap()
        .accepted();

    let first = send(
        &client,
        "acc-4",
        "deposit",
        json!({"amount": 7}),
        Some("dep-1"),
    )
    .await
    .unwrap();
    let again = send(
        &client,
        "acc-4",
        "deposit",
        json!({"amount": 7}),
        Some("dep-1"),
    )
    .await
    .unwrap();
    assert_eq!(again.body, first.body);
    let rejected = send(
        &client,
        "acc-4",
        "withdraw",
        json!({"amount": 99}),
        Some("w-1"),
    )
    .await
    .unwrap();
    let rejected_again = send(
        &client,
        "acc-4",
        "withdraw",
        json!({"amount": 99}),
        Some("w-1"),
    )
    .await
    .unwrap();
    assert_eq!(rejected_again.body, rejected.body);

    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.acc-4"))
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(balance(&events).unwrap(), 7);
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_command_id_after_the_duplicate_window_gets_the_first_reply_and_one_effect() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut config = account_config(&nats);
    config.stream.duplicate_window = Duration::from_secs(1);
    let function = start_account(config).await.unwrap();
    let client = nats.connect().await.unwrap();
    send(&client, "acc-5", "open", json!({"owner": "Ann"}), None)
        .await
        .unwrap()
        .accepted();
    let first = send(
        &client,
        "acc-5",
        "deposit",
        json!({"amount": 3}),
        Some("late-1"),
    )
    .await
    .unwrap();
    let first_nothing = send(
        &client,
        "acc-5",
        "deposit",
        json!({"amount": 4}),
        Some("late-2"),
    )
    .await;
    let first_nothing = first_nothing.unwrap();

    // Let JetStream forget the message ids; only the ledger and the stored events remember.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let again = send(
        &client,
        "acc-5",
        "deposit",
        json!({"amount": 3}),
        Some("late-1"),
    )
    .await
    .unwrap();
    assert_eq!(again.body, first.body);

    // Even with the ledger entry gone, the stored events identify the command.
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("jetfn-ledger-account")
        .await
        .unwrap();
    kv.purge("acc-5.late-2").await.unwrap();
    // A different command under that id is still refused, and does not overwrite the first.
    let different = send(
        &client,
        "acc-5",
        "deposit",
        json!({"amount": 99}),
        Some("late-2"),
    )
    .await
    .unwrap();
    assert_eq!(different.reply.error_kind(), Some(ErrorKind::Invalid));
    let again = send(
        &client,
        "acc-5",
        "deposit",
        json!({"amount": 4}),
        Some("late-2"),
    )
    .await
    .unwrap();
    assert_eq!(again.body, first_nothing.body);

    let events = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.acc-5"))
        .await
        .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(balance(&events).unwrap(), 7);
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_and_new_commands_sent_at_once_to_a_fresh_instance_each_get_their_own_answer() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let config = account_config(&nats);
    let first = start_account(config.clone()).await.unwrap();
    let client = nats.connect().await.unwrap();
    const ACCOUNTS: usize = 40;
    let mut rejections = Vec::new();
    for k in 0..ACCOUNTS {
        let id = format!("burst-{k}");
        send(&client, &id, "open", json!({"owner": "Ann"}), None)
            .await
            .unwrap()
            .accepted();
        let withdraw = json!({"amount": 1});
        let rejected = send(&client, &id, "withdraw", withdraw, Some(&format!("w-{k}")))
            .await
            .unwrap();
        assert_eq!(
            rejected.body["error"]["kind"], "rejected",
            "{:?}",
            rejected.body
        );
        rejections.push(rejected.body);
    }
    first.stop().await.unwrap();

    // A new instance knows nothing in its cache: only the ledger remembers the rejections. Each
    // account gets a new deposit and the repeated withdraw at once; the repeat must keep its
    // rejection even where the deposit lands first and the withdraw would now be accepted.
    let second = start_account(config).await.unwrap();
    let ids: Vec<String> = (0..ACCOUNTS).map(|k| format!("burst-{k}")).collect();
    let client = &client;
    let before = ledger_counts(client).await;
    // `command` with `body` to every account, under command id `<prefix>-<k>`.
    let to_all = |command: &'static str, body: serde_json::Value, prefix: &'static str| {
        let ids = &ids;
        join_all(ids.iter().enumerate().map(move |(k, id)| {
            let body = body.clone();
            async move { send(client, id, command, body, Some(&format!("{prefix}-{k}"))).await }
        }))
    };
    let deposits = to_all("deposit", json!({"amount": 5}), "d");
    let repeats = to_all("withdraw", json!({"amount": 1}), "w");
    let (deposited, repeated) = tokio::join!(deposits, repeats);

    for (k, (deposit, repeat)) in deposited.iter().zip(&repeated).enumerate() {
        assert_eq!(
            deposit.as_ref().unwrap().accepted().version,
            2,
            "account {k}"
        );
        assert_eq!(repeat.as_ref().unwrap().body, rejections[k], "account {k}");
        let subject = format!("evt.account.{}", ids[k]);
        let events = stored_messages(client, ACCOUNT_STREAM, Some(&subject))
            .await
            .unwrap();
        assert_eq!(events.len(), 2, "account {k}: open and the deposit");
        assert_eq!(balance(&events).unwrap(), 5, "account {k}");
    }
    // The lookups of commands that arrived together went out together.
    let after = ledger_counts(client).await;
    let (reads, requests) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(reads, 2 * ACCOUNTS as u64, "{before:?} then {after:?}");
    assert!(
        requests >= 1 && requests < reads,
        "{before:?} then {after:?}"
    );
    second.stop().await.unwrap();
}

/// The one instance's ledger `reads` and `requests` (`$SRV.STATS`).
async fn ledger_counts(client: &async_nats::Client) -> (u64, u64) {
    let stats = service_stats(client, "account", 1).await.unwrap();
    let ledger = &stats[0]["endpoints"][0]["data"]["ledger"];
    (
        ledger["reads"].as_u64().unwrap(),
        ledger["requests"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_reused_for_a_different_command_is_invalid() {
    let (_nats, function, client) = server_with_account().await;
    send(
        &client,
        "acc-6",
        "open",
        json!({"owner": "Ann"}),
        Some("x-1"),
    )
    .await
    .unwrap()
    .accepted();
    let reused = send(
        &client,
        "acc-6",
        "deposit",
        json!({"amount": 1}),
        Some("x-1"),
    )
    .await
    .unwrap();
    assert_eq!(reused.reply.error_kind(), Some(ErrorKind::Invalid));
    assert!(
        reused
            .error_message
            .unwrap()
            .contains("already used for a different command")
    );
    assert_eq!(message_count(&client, ACCOUNT_STREAM).await.unwrap(), 1);
    function.stop().await.unwrap();
}

/// A light switch: turning it on when it is already on decides nothing.
#[derive(Default)]
struct Switch {
    on: bool,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum SwitchCommand {
    TurnOn {},
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
enum SwitchEvent {
    TurnedOn {},
}

impl jetfn::Aggregate for Switch {
    const NAME: &'static str = "switch";
    type Command = SwitchCommand;
    type Event = SwitchEvent;

    fn decide(
        &self,
        SwitchCommand::TurnOn {}: SwitchCommand,
    ) -> Result<Vec<SwitchEvent>, jetfn::Rejection> {
        Ok(if self.on {
            vec![]
        } else {
            vec![SwitchEvent::TurnedOn {}]
        })
    }

    fn evolve(self, SwitchEvent::TurnedOn {}: &SwitchEvent) -> Self {
        Switch { on: true }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_decides_nothing_succeeds_with_no_events_at_the_current_version() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let function = jetfn::command_function::<Switch>()
        .with_config(account_config(&nats))
        .start()
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    let empty = send_raw(&client, "cmd.switch.s1.turn_on", "", None)
        .await
        .unwrap();
    assert_eq!(
        empty.body,
        json!({"ok": true, "id": "s1", "version": 1, "seq": 1, "events": ["TurnedOn"]})
    );
    let nothing = send_raw(&client, "cmd.switch.s1.turn_on", "{}", None)
        .await
        .unwrap();
    assert_eq!(
        nothing.body,
        json!({"ok": true, "id": "s1", "version": 1, "seq": 1, "events": []})
    );
    let never_touched = send_raw(&client, "cmd.switch.s2.turn_on", "", None)
        .await
        .unwrap();
    assert_eq!(never_touched.accepted().seq, 2);
    assert_eq!(message_count(&client, "SWITCH_EVENTS").await.unwrap(), 2);
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_queue_group_both_serve() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let first = start_account(account_config(&nats)).await.unwrap();
    let second = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    for n in 0..40 {
        send(
            &client,
            &format!("qa-{n}"),
            "open",
            json!({"owner": "Ann"}),
            None,
        )
        .await
        .unwrap()
        .accepted();
    }

    // $SRV.STATS.account is answered by every instance; collect them all.
    let mut served = HashMap::new();
    for stats in service_stats(&client, "account", 2).await.unwrap() {
        let requests = stats["endpoints"][0]["num_requests"].as_u64().unwrap();
        assert_eq!(stats["endpoints"][0]["queue_group"], "q");
        served.insert(stats["id"].as_str().unwrap().to_owned(), requests);
    }
    assert!(
        served.values().all(|&n| n > 0),
        "each instance served some: {served:?}"
    );
    assert_eq!(served.values().sum::<u64>(), 40);
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_is_discoverable_with_its_commands() {
    let (_nats, function, client) = server_with_account().await;
    let info = client
        .request("$SRV.INFO.account", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "account");
    assert_eq!(
        info["metadata"]["jetfn.commands"],
        "open,deposit,withdraw,close"
    );
    let schemas: serde_json::Value =
        serde_json::from_str(info["metadata"]["jetfn.schemas"].as_str().unwrap()).unwrap();
    let names: Vec<&String> = schemas.as_object().unwrap().keys().collect();
    assert_eq!(names, ["close", "deposit", "open", "withdraw"]);
    assert_eq!(
        schemas["deposit"]["$id"],
        "urn:jetfn:account:command:deposit"
    );
    assert_eq!(info["endpoints"][0]["subject"], "cmd.account.>");
    let ping = client.request("$SRV.PING", "".into()).await.unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "account");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_replies_unavailable_with_a_reason() {
    let (_nats, function, client) = server_with_account().await;
    async_nats::jetstream::new(client.clone())
        .delete_stream(ACCOUNT_STREAM)
        .await
        .unwrap();
    let sent = send(&client, "acc-8", "open", json!({"owner": "Ann"}), None)
        .await
        .unwrap();
    assert_eq!(sent.reply.error_kind(), Some(ErrorKind::Unavailable));
    assert_eq!(sent.error_code.as_deref(), Some("503"));
    assert!(sent.error_message.unwrap().contains(ACCOUNT_STREAM));
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_prefix_moves_the_command_subjects() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut config = account_config(&nats);
    config.command.subject_prefix = Some("eu".into());
    let function = start_account(config).await.unwrap();
    let client = nats.connect().await.unwrap();
    let sent = send_raw(
        &client,
        "eu.cmd.account.p-1.open",
        r#"{"owner":"Ann"}"#,
        None,
    )
    .await
    .unwrap();
    assert_eq!(sent.accepted().version, 1);
    function.stop().await.unwrap();
}

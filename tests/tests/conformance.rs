//! Conformance with `docs/protocol.md`: every checkable statement, by its number (`P1`, `P2`, ...).
//!
//! The account function and projection run in this process (started by the harness), but the
//! test side speaks only raw NATS (requests, publishes, subscriptions, `$SRV.*`,
//! `$JS.API.DIRECT.GET.*`, `$JS.API.STREAM.INFO.*`) and raw Redis commands, as a client in another
//! language would. It uses no jetfn client code.
//!
//! Not checked: the "stored nothing" cases of P21 and P33 (the account example always stores an
//! event or refuses), P49 beyond "unknown headers are `Nats-...`", P55's grace period as a slow
//! reader sees it, P59 (advice) and P66 (trimming the change feed at about 10,000 entries).
//! P3 is checked for `account` only. P71 is checked in `functions/transfer/tests/rules.rs`, P72
//! and P73 in `process_manager.rs`, P75-P78 in `atomic_decisions.rs`; P74 and P80-P83 here, with
//! the signup decision (the race of P82 in `cross_type_decisions.rs`). P84 needs bytes no NATS
//! client sends, so `hostile.rs` checks it over a raw TCP connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::{Client, HeaderMap, RequestErrorKind, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use jetfn::command::RunningFunction;
use jetfn::projection::RunningProjection;
use jetfn_tests::commands::{account_config, start_account};
use jetfn_tests::readmodels::{projection_config, start_projection};
use jetfn_tests::{NatsServer, RedisServer};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

const STREAM: &str = "ACCOUNT_EVENTS";
const TAG: &str = "{account-balances}";
const COMMANDS: [&str; 4] = ["open", "deposit", "withdraw", "close"];
const EVENT_TYPES: [&str; 4] = [
    "AccountOpened",
    "MoneyDeposited",
    "MoneyWithdrawn",
    "AccountClosed",
];
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Raw NATS

/// A reply as the wire carries it.
#[derive(Debug, Clone)]
struct Raw {
    status: Option<u16>,
    headers: BTreeMap<String, String>,
    payload: Bytes,
}

impl Raw {
    fn from_message(message: async_nats::Message) -> Raw {
        let mut headers = BTreeMap::new();
        if let Some(map) = &message.headers {
            for (name, values) in map.iter() {
                if let Some(value) = values.first() {
                    headers.insert(name.to_string(), value.as_str().to_owned());
                }
            }
        }
        Raw {
            status: message.status.map(|s| s.as_u16()),
            headers,
            payload: message.payload,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    map
}

async fn try_request(
    client: &Client,
    subject: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Result<Raw, async_nats::RequestError> {
    let request = async_nats::Request::new()
        .headers(header_map(headers))
        .payload(body.into())
        .timeout(Some(WAIT));
    let message = client.send_request(subject.to_owned(), request).await?;
    Ok(Raw::from_message(message))
}

async fn request(
    client: &Client,
    subject: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Raw {
    try_request(client, subject, body, headers)
        .await
        .unwrap_or_else(|e| panic!("request to {subject}: {e}"))
}

/// `cmd.account.<id>.<command>` with a JSON body and an optional `Nats-Msg-Id`.
async fn cmd(
    client: &Client,
    id: &str,
    command: &str,
    body: Value,
    command_id: Option<&str>,
) -> Raw {
    cmd_bytes(client, id, command, body.to_string(), command_id).await
}

async fn cmd_bytes(
    client: &Client,
    id: &str,
    command: &str,
    body: impl Into<Bytes>,
    command_id: Option<&str>,
) -> Raw {
    let headers: Vec<(&str, &str)> = command_id.map(|c| ("Nats-Msg-Id", c)).into_iter().collect();
    request(
        client,
        &format!("cmd.account.{id}.{command}"),
        body,
        &headers,
    )
    .await
}

/// What a success reply says.
#[derive(Debug, Clone, PartialEq)]
struct Accepted {
    version: u64,
    seq: u64,
    events: Vec<String>,
}

/// P18: exactly ok/id/version/seq/events, and no error headers.
#[track_caller]
fn ok(raw: &Raw, id: &str) -> Accepted {
    let body = raw.json();
    let keys = field_names(&body);
    assert_eq!(
        keys,
        BTreeSet::from(["ok", "id", "version", "seq", "events"]),
        "P18: success reply fields of {body}"
    );
    assert_eq!(body["ok"], true, "P18: {body}");
    assert_eq!(body["id"], id, "P18: id of {body}");
    assert_eq!(raw.header("Nats-Service-Error-Code"), None, "P18");
    assert_eq!(raw.header("Nats-Service-Error"), None, "P18");
    Accepted {
        version: body["version"].as_u64().expect("version"),
        seq: body["seq"].as_u64().expect("seq"),
        events: body["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e.as_str().expect("event type").to_owned())
            .collect(),
    }
}

/// P23, P24, P25: the failure shape, the kind, its code in the header and the same message.
/// Returns the message.
#[track_caller]
fn failed(raw: &Raw, kind: &str) -> String {
    let body = raw.json();
    let keys = field_names(&body);
    assert_eq!(keys, BTreeSet::from(["ok", "error"]), "P23: {body}");
    assert_eq!(body["ok"], false, "P23: {body}");
    let error_keys = field_names(&body["error"]);
    assert_eq!(
        error_keys,
        BTreeSet::from(["kind", "message"]),
        "P23: {body}"
    );
    assert_eq!(body["error"]["kind"], kind, "P25: {body}");
    let code = match kind {
        "invalid" => "400",
        "rejected" => "422",
        "conflict" => "409",
        "unavailable" => "503",
        other => panic!("unknown kind {other}"),
    };
    let message = body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert_eq!(
        raw.header("Nats-Service-Error-Code"),
        Some(code),
        "P24: {body}"
    );
    assert_eq!(
        raw.header("Nats-Service-Error"),
        Some(message.replace(['\r', '\n'], " ").as_str()),
        "P24: {body}"
    );
    message
}

/// Sends a request and collects every reply that arrives within `quiet` of the previous one (the
/// services protocol: every instance answers).
async fn collect(client: &Client, subject: &str, body: Value, quiet: Duration) -> Vec<Raw> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_owned(), inbox, body.to_string().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut collected = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(quiet, replies.next()).await {
        collected.push(Raw::from_message(message));
    }
    collected
}

async fn services(client: &Client, subject: &str) -> Vec<Value> {
    collect(client, subject, json!({}), Duration::from_millis(500))
        .await
        .iter()
        .map(Raw::json)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Raw JetStream

/// One stored event as direct get returns it.
#[derive(Debug, Clone)]
struct Event {
    seq: u64,
    subject: String,
    headers: BTreeMap<String, String>,
    payload: Value,
}

impl Event {
    fn from_raw(raw: &Raw) -> Event {
        assert!(
            matches!(raw.status, None | Some(200)),
            "a stored message, not a status: {raw:?}"
        );
        Event {
            seq: raw
                .header("Nats-Sequence")
                .expect("P51: Nats-Sequence")
                .parse()
                .unwrap(),
            subject: raw
                .header("Nats-Subject")
                .expect("P51: Nats-Subject")
                .to_owned(),
            headers: raw.headers.clone(),
            payload: raw.json(),
        }
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| {
                panic!(
                    "event {} has no header {name}: {:?}",
                    self.seq, self.headers
                )
            })
    }
}

async fn direct_get(client: &Client, body: Value) -> Raw {
    request(
        client,
        &format!("$JS.API.DIRECT.GET.{STREAM}"),
        body.to_string(),
        &[],
    )
    .await
}

/// P51: an aggregate's events with the batch form of direct get, following `Nats-Num-Pending`.
async fn events_of(client: &Client, subject: &str) -> Vec<Event> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    let mut events = Vec::new();
    let mut next = 1;
    loop {
        // A small batch, so that longer histories take several (Nats-Num-Pending).
        let body = json!({"seq": next, "next_by_subj": subject, "batch": 3});
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{STREAM}"),
                inbox.clone(),
                body.to_string().into(),
            )
            .await
            .unwrap();
        let pending = loop {
            let message = tokio::time::timeout(WAIT, replies.next())
                .await
                .expect("P51: a direct get batch ends with a status message")
                .unwrap();
            let reply = Raw::from_message(message);
            match reply.status {
                None | Some(200) => events.push(Event::from_raw(&reply)),
                Some(204) => {
                    break reply
                        .header("Nats-Num-Pending")
                        .expect("P51: Nats-Num-Pending on the end of a batch")
                        .parse::<u64>()
                        .unwrap();
                }
                Some(404) => break 0,
                Some(other) => panic!("direct get status {other}: {reply:?}"),
            }
        };
        if pending == 0 {
            return events;
        }
        next = events.last().expect("events before pending").seq + 1;
    }
}

async fn stream_info(client: &Client) -> Value {
    request(client, &format!("$JS.API.STREAM.INFO.{STREAM}"), "", &[])
        .await
        .json()
}

async fn last_seq(client: &Client) -> u64 {
    stream_info(client).await["state"]["last_seq"]
        .as_u64()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Raw Redis

async fn active(redis: &mut MultiplexedConnection) -> Option<u64> {
    let value: Option<String> = redis.get(format!("{TAG}:active")).await.unwrap();
    value.map(|v| v.parse().expect("P54: active is a decimal integer"))
}

/// Section 8's recipe: poll the live version and its checkpoint hash until
/// `min(p0..p<n-1>) >= seq`. Returns the live version.
async fn wait_for_token(redis: &mut MultiplexedConnection, seq: u64) -> u64 {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(generation) = active(redis).await {
            let checkpoint: HashMap<String, u64> = redis
                .hgetall(format!("{TAG}:g{generation}:checkpoint"))
                .await
                .unwrap();
            if let Some(&partitions) = checkpoint.get("partitions") {
                let least = (0..partitions)
                    .map(|k| checkpoint.get(&format!("p{k}")).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                if least >= seq {
                    return generation;
                }
            }
        }
        assert!(
            started.elapsed() < WAIT,
            "the read model did not reach seq {seq} within {WAIT:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

async fn account_hash(
    redis: &mut MultiplexedConnection,
    generation: u64,
    id: &str,
) -> BTreeMap<String, String> {
    redis
        .hgetall(format!("{TAG}:g{generation}:account:{id}"))
        .await
        .unwrap()
}

/// The change feed entries: (entry id, fields).
async fn feed(
    redis: &mut MultiplexedConnection,
    generation: u64,
) -> Vec<(String, BTreeMap<String, String>)> {
    redis::cmd("XRANGE")
        .arg(format!("{TAG}:g{generation}:changes"))
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Servers

struct Side {
    nats: NatsServer,
    client: Client,
    function: RunningFunction,
}

async fn function_only(tweak: impl FnOnce(&mut jetfn::Config)) -> Side {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let mut config = account_config(&nats);
    tweak(&mut config);
    let function = start_account(config).await.unwrap();
    let client = nats.connect().await.unwrap();
    serving(&client, "account").await;
    Side {
        nats,
        client,
        function,
    }
}

/// Waits until service `name` answers `$SRV.INFO.<name>`. A started function may not have its
/// subscriptions on the server yet; its INFO reply travels after them on its connection, so once
/// it arrives its endpoints are served too.
async fn serving(client: &Client, name: &str) {
    let started = Instant::now();
    while try_request(client, &format!("$SRV.INFO.{name}"), "", &[])
        .await
        .is_err()
    {
        assert!(started.elapsed() < WAIT, "service {name} does not answer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct ReadSide {
    _nats: NatsServer,
    redis_server: RedisServer,
    config: jetfn::Config,
    client: Client,
    redis: MultiplexedConnection,
    function: RunningFunction,
    projection: RunningProjection,
}

async fn read_side(partitions: u32) -> ReadSide {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let redis_server = RedisServer::start().await.unwrap();
    let mut config = projection_config(&nats, &redis_server);
    config.projection.partitions = partitions;
    let function = start_account(config.clone()).await.unwrap();
    let projection = start_projection(config.clone()).await.unwrap();
    let client = nats.connect().await.unwrap();
    serving(&client, "account").await;
    serving(&client, "account-balances").await;
    let redis = redis_server.connect().await.unwrap();
    ReadSide {
        _nats: nats,
        redis_server,
        config,
        client,
        redis,
        function,
        projection,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Sending a command

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_to_p6_subjects_and_ids() {
    let side = function_only(|_| {}).await;
    let client = &side.client;

    // P1
    let opened = ok(
        &cmd(client, "alice", "open", json!({"owner": "Alice"}), None).await,
        "alice",
    );
    assert_eq!(opened.events, ["AccountOpened"]);

    // P4: the allowed alphabet, 128 characters, case-sensitive ids.
    for id in ["A_b-9", &"x".repeat(128), "Alice"] {
        let reply = cmd(client, id, "open", json!({"owner": "O"}), None).await;
        assert_eq!(ok(&reply, id).version, 1, "P4: {id} is a new aggregate");
    }
    for id in ["a:b", "a+b", "ä", &"x".repeat(129)] {
        let message = failed(
            &cmd(client, id, "open", json!({"owner": "O"}), None).await,
            "invalid",
        );
        assert!(message.contains("[A-Za-z0-9_-]{1,128}"), "P4: {message}");
    }

    // P5
    for subject in ["cmd.account.alice", "cmd.account.alice.deposit.now"] {
        let reply = request(client, subject, r#"{"amount":1}"#, &[]).await;
        let message = failed(&reply, "invalid");
        assert!(
            message.contains("cmd.account.<id>.<command>"),
            "P5: {message}"
        );
    }

    // P6
    let message = failed(
        &cmd(client, "alice", "fly", json!({}), None).await,
        "invalid",
    );
    for name in COMMANDS {
        assert!(message.contains(name), "P6: {message} lists {name}");
    }

    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_to_p13_bodies() {
    let side = function_only(|_| {}).await;
    let client = &side.client;
    ok(
        &cmd(client, "b", "open", json!({"owner": "B"}), None).await,
        "b",
    );

    // P7
    let deposited = ok(
        &cmd(client, "b", "deposit", json!({"amount": 50}), None).await,
        "b",
    );
    assert_eq!(deposited.events, ["MoneyDeposited"]);

    // P8: no body and a whitespace body both mean {}.
    for (id, body) in [("e1", ""), ("e2", " \n\t ")] {
        ok(
            &cmd(client, id, "open", json!({"owner": "E"}), None).await,
            id,
        );
        let closed = ok(&cmd_bytes(client, id, "close", body, None).await, id);
        assert_eq!(closed.events, ["AccountClosed"], "P8: {body:?}");
    }
    let message = failed(
        &cmd_bytes(client, "b", "deposit", "", None).await,
        "invalid",
    );
    assert!(message.contains("`amount`"), "P8/P11: {message}");

    // P9
    for body in ["not json", "null", "[]", "5", "\"x\"", "{\"amount\":"] {
        failed(
            &cmd_bytes(client, "b", "deposit", body, None).await,
            "invalid",
        );
    }

    // P10: 65,536 bytes pass, 65,537 do not; the message names both numbers.
    let padded = |len: usize| {
        let mut body = br#"{"amount":1}"#.to_vec();
        body.resize(len, b' ');
        body
    };
    ok(
        &cmd_bytes(client, "b", "deposit", padded(65_536), None).await,
        "b",
    );
    let message = failed(
        &cmd_bytes(client, "b", "deposit", padded(65_537), None).await,
        "invalid",
    );
    assert!(
        message.contains("65537") && message.contains("65536"),
        "P10: {message}"
    );

    // P11: the message names the field.
    for (body, starts) in [
        (json!({"amount": 0}), "/amount: "),
        (json!({"amount": "1"}), "/amount: "),
        (json!({"amount": -1}), "/amount: "),
    ] {
        let message = failed(&cmd(client, "b", "deposit", body, None).await, "invalid");
        assert!(message.starts_with(starts), "P11: {message}");
    }
    let missing = failed(
        &cmd(client, "b", "deposit", json!({}), None).await,
        "invalid",
    );
    assert!(missing.contains("missing field `amount`"), "P11: {missing}");
    let unknown = failed(
        &cmd(
            client,
            "b",
            "deposit",
            json!({"amount": 1, "memo": "x"}),
            None,
        )
        .await,
        "invalid",
    );
    assert!(
        unknown.starts_with("/memo: ") && unknown.contains("unknown field `memo`"),
        "P11: {unknown}"
    );
    let message = failed(
        &cmd(
            client,
            "o",
            "open",
            json!({"owner": "A", "initial_deposit": 0}),
            None,
        )
        .await,
        "invalid",
    );
    assert!(
        message.starts_with("/initial_deposit: "),
        "P11/P52: {message}"
    );

    // P12: an optional field left out or null.
    for (id, body) in [
        ("n1", json!({"owner": "N"})),
        ("n2", json!({"owner": "N", "initial_deposit": null})),
    ] {
        let opened = ok(&cmd(client, id, "open", body, None).await, id);
        assert_eq!(opened.events, ["AccountOpened"], "P12");
    }

    // P13: integers only, up to 2^64-1.
    for body in [
        r#"{"amount":1.5}"#,
        r#"{"amount":1e2}"#,
        r#"{"amount":"1"}"#,
        r#"{"amount":-1}"#,
        r#"{"amount":18446744073709551616}"#,
    ] {
        let message = failed(
            &cmd_bytes(client, "b", "deposit", body, None).await,
            "invalid",
        );
        assert!(message.starts_with("/amount: "), "P13: {body}: {message}");
    }
    ok(
        &cmd(client, "big", "open", json!({"owner": "Big"}), None).await,
        "big",
    );
    // P13 parses up to 2^64-1; P52 then allows the account's amounts up to 10^15.
    let message = failed(
        &cmd_bytes(
            client,
            "big",
            "deposit",
            r#"{"amount":18446744073709551615}"#,
            None,
        )
        .await,
        "invalid",
    );
    assert_eq!(
        message, "/amount: an amount must be at most 1000000000000000 (10^15 minor units)",
        "P52"
    );
    ok(
        &cmd_bytes(
            client,
            "big",
            "deposit",
            r#"{"amount":1000000000000000}"#,
            None,
        )
        .await,
        "big",
    );

    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p14_to_p17_command_ids_and_trace_context() {
    let side = function_only(|_| {}).await;
    let client = &side.client;
    ok(
        &cmd(client, "c", "open", json!({"owner": "C"}), None).await,
        "c",
    );

    // P14: 1..128 visible ASCII characters.
    let widest: String = (0x21u8..=0x7e).map(char::from).take(128).collect();
    let longest = "y".repeat(128);
    for id in [widest.as_str(), longest.as_str(), "!", "a:b/c.d"] {
        ok(
            &cmd(client, "c", "deposit", json!({"amount": 1}), Some(id)).await,
            "c",
        );
    }
    for id in ["", "a b", "é", &"y".repeat(129)] {
        let message = failed(
            &cmd(client, "c", "deposit", json!({"amount": 1}), Some(id)).await,
            "invalid",
        );
        assert!(message.contains("Nats-Msg-Id"), "P14: {id:?}: {message}");
    }

    // P15: another spelling is no command id: the second open is decided again (rejected),
    // not answered with the first reply.
    let lower = [("nats-msg-id", "same-id")];
    let first = request(client, "cmd.account.lc.open", r#"{"owner":"L"}"#, &lower).await;
    ok(&first, "lc");
    let second = request(client, "cmd.account.lc.open", r#"{"owner":"L"}"#, &lower).await;
    assert_eq!(failed(&second, "rejected"), "account already exists", "P15");

    // P16: without a command id the function makes up a UUID v7 and stores it with the events.
    let events = events_of(client, "evt.account.lc").await;
    let made_up = events[0].header("jetfn-command-id");
    assert_ne!(made_up, "same-id", "P15");
    let uuid = uuid::Uuid::parse_str(made_up).expect("P16: a UUID");
    assert_eq!(uuid.get_version_num(), 7, "P16: version 7");
    assert_eq!(made_up.len(), 36, "P16: hyphenated form");

    // P17: a trace is continued into the events, with a new parent id.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced = [
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "vendor=value"),
    ];
    let reply = request(client, "cmd.account.tr.open", r#"{"owner":"T"}"#, &traced).await;
    ok(&reply, "tr");
    let event = &events_of(client, "evt.account.tr").await[0];
    let parts: Vec<&str> = event.header("traceparent").split('-').collect();
    assert_eq!(parts.len(), 4, "P17: {parts:?}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", trace_id, "01"),
        "P17"
    );
    assert_ne!(parts[2], "00f067aa0ba902b7", "P17: a new parent id");
    assert_eq!(event.header("tracestate"), "vendor=value", "P17");
    // Absent or malformed: a new trace.
    for (id, headers) in [("tn", vec![]), ("tm", vec![("traceparent", "garbage")])] {
        let reply = request(
            client,
            &format!("cmd.account.{id}.open"),
            r#"{"owner":"T"}"#,
            &headers,
        )
        .await;
        ok(&reply, id);
        let event = &events_of(client, &format!("evt.account.{id}")).await[0];
        let parts: Vec<&str> = event.header("traceparent").split('-').collect();
        assert_eq!(parts.len(), 4, "P17: {parts:?}");
        assert_eq!(parts[0], "00", "P17");
        assert!(
            parts[1].len() == 32 && parts[1].bytes().all(|b| b.is_ascii_hexdigit()),
            "P17: {parts:?}"
        );
        assert_ne!(parts[1], trace_id, "P17: a new trace");
        assert_eq!(
            parts[3], "00",
            "P17: not sampled, since no spans are exported"
        );
        assert!(!event.headers.contains_key("tracestate"), "P17");
    }

    side.function.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2. Replies; 6. the account example

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p18_to_p26_and_p52_replies_and_account_rules() {
    let side = function_only(|_| {}).await;
    let client = &side.client;

    // P19, P20, P21: two events, version 2, consecutive sequences ending at seq.
    let opened = ok(
        &cmd(
            client,
            "r",
            "open",
            json!({"owner": "R", "initial_deposit": 100}),
            None,
        )
        .await,
        "r",
    );
    assert_eq!(opened.events, ["AccountOpened", "MoneyDeposited"], "P19");
    assert_eq!(opened.version, 2, "P20");
    let stored = events_of(client, "evt.account.r").await;
    assert_eq!(stored.len() as u64, opened.version, "P20");
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [opened.seq - 1, opened.seq],
        "P21"
    );
    let types: Vec<&str> = stored.iter().map(|e| e.header("ce-type")).collect();
    assert_eq!(types, opened.events, "P19");

    // P22: another aggregate's events take sequences in between.
    let other = ok(
        &cmd(client, "s", "open", json!({"owner": "S"}), None).await,
        "s",
    );
    assert!(other.seq > opened.seq, "P22");
    let deposited = ok(
        &cmd(client, "r", "deposit", json!({"amount": 5}), None).await,
        "r",
    );
    assert_eq!(deposited.version, 3, "P20");
    assert!(
        deposited.seq > opened.seq + 1 && deposited.seq >= deposited.version,
        "P22: {deposited:?}"
    );
    let stored = events_of(client, "evt.account.r").await;
    assert_eq!(stored.len() as u64, deposited.version, "P20");
    assert_eq!(stored.last().unwrap().seq, deposited.seq, "P20/P21");

    // P23-P26 and P52: rejections name the rule and store nothing.
    let before = last_seq(client).await;
    let rejections = [
        (
            "r",
            "open",
            json!({"owner": "Again"}),
            "account already exists".to_owned(),
        ),
        (
            "nobody",
            "deposit",
            json!({"amount": 1}),
            "account is not open".to_owned(),
        ),
        (
            "r",
            "withdraw",
            json!({"amount": 106}),
            "insufficient funds: balance is 105".to_owned(),
        ),
        (
            "r",
            "close",
            json!({}),
            "balance must be zero to close, is 105".to_owned(),
        ),
    ];
    for (id, command, body, expected) in rejections {
        let message = failed(&cmd(client, id, command, body, None).await, "rejected");
        assert_eq!(message, expected, "P52");
    }
    ok(&cmd(client, "s", "close", json!({}), None).await, "s");
    let after_close = last_seq(client).await;
    for (command, body) in [
        ("deposit", json!({"amount": 1})),
        ("withdraw", json!({"amount": 1})),
        ("close", json!({})),
        ("open", json!({"owner": "S"})),
    ] {
        let message = failed(&cmd(client, "s", command, body, None).await, "rejected");
        let expected = if command == "open" {
            "account already exists"
        } else {
            "account is closed"
        };
        assert_eq!(message, expected, "P52");
    }
    // P52: owner rules; the balance never goes below 0.
    for owner in [" ".to_owned(), "x".repeat(201)] {
        let message = failed(
            &cmd(client, "o", "open", json!({"owner": owner}), None).await,
            "invalid",
        );
        assert!(message.starts_with("/owner: "), "P52: {message}");
    }
    failed(
        &cmd(client, "o", "open", json!({"owner": 5}), None).await,
        "invalid",
    );
    failed(&cmd(client, "r", "nope", json!({}), None).await, "invalid");
    assert_eq!(last_seq(client).await, after_close, "P26: nothing stored");
    assert_eq!(after_close, before + 1, "only the close was stored");
    ok(
        &cmd(client, "o", "open", json!({"owner": "é".repeat(200)}), None).await,
        "o",
    );
    let withdrawn = ok(
        &cmd(client, "r", "withdraw", json!({"amount": 105}), None).await,
        "r",
    );
    assert_eq!(withdrawn.events, ["MoneyWithdrawn"]);
    let closed = ok(&cmd(client, "r", "close", json!({}), None).await, "r");
    assert_eq!(closed.events, ["AccountClosed"]);

    side.function.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Idempotency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p27_to_p32_idempotency() {
    let side = function_only(|_| {}).await;
    let client = &side.client;
    ok(
        &cmd(client, "i", "open", json!({"owner": "I"}), None).await,
        "i",
    );

    // P27: the first reply again, field for field, nothing stored again, even after changes.
    let first = cmd(client, "i", "deposit", json!({"amount": 10}), Some("c-1")).await;
    ok(&first, "i");
    let stored = last_seq(client).await;
    let again = cmd(client, "i", "deposit", json!({"amount": 10}), Some("c-1")).await;
    assert_eq!(again.json(), first.json(), "P27");
    assert_eq!(last_seq(client).await, stored, "P27: nothing stored again");
    ok(
        &cmd(client, "i", "deposit", json!({"amount": 1}), None).await,
        "i",
    );
    let later = cmd(client, "i", "deposit", json!({"amount": 10}), Some("c-1")).await;
    assert_eq!(
        later.json(),
        first.json(),
        "P27: after the aggregate changed"
    );

    // P27: a rejection stays a rejection under its id.
    let refused = cmd(client, "i", "withdraw", json!({"amount": 500}), Some("r-1")).await;
    failed(&refused, "rejected");
    ok(
        &cmd(client, "i", "deposit", json!({"amount": 1000}), None).await,
        "i",
    );
    let still = cmd(client, "i", "withdraw", json!({"amount": 500}), Some("r-1")).await;
    failed(&still, "rejected");
    assert_eq!(still.json(), refused.json(), "P27: rejected stays rejected");

    // P28: key order and whitespace do not matter; an empty body equals {}.
    let opened = cmd_bytes(
        client,
        "k",
        "open",
        r#"{"owner":"K","initial_deposit":5}"#,
        Some("o-1"),
    )
    .await;
    ok(&opened, "k");
    let reordered = cmd_bytes(
        client,
        "k",
        "open",
        "{ \"initial_deposit\" : 5,\n \"owner\" : \"K\" }",
        Some("o-1"),
    )
    .await;
    assert_eq!(reordered.json(), opened.json(), "P28");
    ok(
        &cmd(client, "k", "withdraw", json!({"amount": 5}), None).await,
        "k",
    );
    let closed = cmd_bytes(client, "k", "close", "", Some("z-1")).await;
    ok(&closed, "k");
    let braces = cmd_bytes(client, "k", "close", "{}", Some("z-1")).await;
    assert_eq!(braces.json(), closed.json(), "P28: empty body = {{}}");

    // P29: an invalid reply is not remembered; the fixed command with the same id is processed.
    failed(
        &cmd(client, "i", "deposit", json!({"amount": 0}), Some("f-1")).await,
        "invalid",
    );
    let fixed = ok(
        &cmd(client, "i", "deposit", json!({"amount": 3}), Some("f-1")).await,
        "i",
    );
    assert_eq!(fixed.events, ["MoneyDeposited"], "P29");

    // P30: the same id for a different command (name or body) is invalid.
    for (command, body) in [
        ("withdraw", json!({"amount": 10})),
        ("deposit", json!({"amount": 11})),
    ] {
        let message = failed(
            &cmd(client, "i", command, body, Some("c-1")).await,
            "invalid",
        );
        assert!(message.contains("already used"), "P30: {message}");
    }

    // P31: command ids are scoped to the aggregate.
    ok(
        &cmd(client, "j", "open", json!({"owner": "J"}), None).await,
        "j",
    );
    let other = ok(
        &cmd(client, "j", "deposit", json!({"amount": 10}), Some("c-1")).await,
        "j",
    );
    assert_eq!(other.version, 2, "P31: processed on its own");

    // P32: a command published without a reply subject is processed and remembered.
    client
        .publish_with_headers(
            "cmd.account.p.open",
            header_map(&[("Nats-Msg-Id", "p-1")]),
            r#"{"owner":"P"}"#.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let reply = ok(
        &cmd(client, "p", "open", json!({"owner": "P"}), Some("p-1")).await,
        "p",
    );
    assert_eq!(reply.version, 1, "P32");
    let events = events_of(client, "evt.account.p").await;
    assert_eq!(events.len(), 1, "P32: stored once");
    assert_eq!(events[0].header("jetfn-command-id"), "p-1", "P32");

    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p33_replies_are_remembered_for_the_ledger_ttl() {
    let side = function_only(|config| {
        config.stream.duplicate_window = Duration::from_secs(1);
        config.ledger.ttl = Duration::from_secs(1);
    })
    .await;
    let client = &side.client;

    let opened = cmd(client, "t", "open", json!({"owner": "T"}), Some("o-1")).await;
    ok(&opened, "t");
    failed(
        &cmd(client, "t", "withdraw", json!({"amount": 500}), Some("r-1")).await,
        "rejected",
    );
    ok(
        &cmd(client, "t", "deposit", json!({"amount": 1000}), None).await,
        "t",
    );

    // While remembered the rejection is repeated; once the TTL has passed the command is new.
    let started = Instant::now();
    let accepted = loop {
        let reply = cmd(client, "t", "withdraw", json!({"amount": 500}), Some("r-1")).await;
        if reply.json()["ok"] == true {
            break reply;
        }
        failed(&reply, "rejected");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "P33: the rejected command id was still remembered after 20 s with a 1 s TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ok(&accepted, "t").events, ["MoneyWithdrawn"], "P33");

    // A command that stored events is still recognised from them: the same command gets its
    // first reply, a different one under that id is refused.
    let stored = last_seq(client).await;
    let other = cmd(client, "t", "open", json!({"owner": "Other"}), Some("o-1")).await;
    let message = failed(&other, "invalid");
    assert!(message.contains("already used"), "P33/P30: {message}");
    let original = cmd(client, "t", "open", json!({"owner": "T"}), Some("o-1")).await;
    assert_eq!(original.json(), opened.json(), "P33");
    assert_eq!(last_seq(client).await, stored, "P33: nothing stored");

    side.function.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2./3. conflict and unavailable

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p25_p29_conflict_is_409_and_can_be_resent() {
    // Two instances that never retry, each deciding the account for itself (no affinity, as
    // while instances come and go): concurrent commands on one account conflict.
    let without_affinity = |config: &mut jetfn::Config| {
        config.command.max_retries = 0;
        config.command.affinity = false;
    };
    let side = function_only(without_affinity).await;
    let mut config = account_config(&side.nats);
    without_affinity(&mut config);
    let second = start_account(config).await.unwrap();
    let client = &side.client;
    ok(
        &cmd(client, "hot", "open", json!({"owner": "Hot"}), None).await,
        "hot",
    );

    let mut sent = Vec::new();
    let mut conflicted = Vec::new();
    for round in 0..20 {
        let ids: Vec<String> = (0..40).map(|i| format!("d-{round}-{i}")).collect();
        let replies = join_all(
            ids.iter()
                .map(|id| cmd(client, "hot", "deposit", json!({"amount": 1}), Some(id))),
        )
        .await;
        for (id, reply) in ids.into_iter().zip(replies) {
            if reply.json()["ok"] == true {
                ok(&reply, "hot");
            } else {
                let message = failed(&reply, "conflict");
                assert!(!message.is_empty());
                conflicted.push(id.clone());
            }
            sent.push(id);
        }
        if !conflicted.is_empty() {
            break;
        }
    }
    assert!(
        !conflicted.is_empty(),
        "no conflict in 800 concurrent commands on two instances"
    );

    // P25/P29: resend with the same id until accepted; each command is stored exactly once.
    for id in &conflicted {
        let mut attempts = 0;
        loop {
            let reply = cmd(client, "hot", "deposit", json!({"amount": 1}), Some(id)).await;
            if reply.json()["ok"] == true {
                break;
            }
            failed(&reply, "conflict");
            attempts += 1;
            assert!(attempts < 50, "{id} kept conflicting");
        }
    }
    let events = events_of(client, "evt.account.hot").await;
    let mut by_command: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &events[1..] {
        *by_command
            .entry(event.header("jetfn-command-id"))
            .or_default() += 1;
    }
    assert_eq!(by_command.len(), sent.len(), "P26: every command stored");
    assert!(by_command.values().all(|n| *n == 1), "P26: none twice");

    // P39: the instances counted the conflicts.
    let stats = services(client, "$SRV.STATS.account").await;
    assert_eq!(stats.len(), 2, "every instance answers");
    let conflicts: u64 = stats
        .iter()
        .map(|s| s["endpoints"][0]["data"]["conflict"].as_u64().unwrap())
        .sum();
    assert!(conflicts >= conflicted.len() as u64, "P39: {stats:?}");

    second.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p25_unavailable_is_503_for_events_this_function_cannot_read() {
    let side = function_only(|_| {}).await;
    let client = &side.client;

    // Events from "a newer version": a schema version above 1, and an unknown event type.
    for (id, event_type, version) in [("future", "MoneyDeposited", "99"), ("odd", "Bogus", "1")] {
        let ack = request(
            client,
            &format!("evt.account.{id}"),
            r#"{"amount":1}"#,
            &[("ce-type", event_type), ("jetfn-event-version", version)],
        )
        .await;
        assert!(ack.json()["seq"].as_u64().unwrap() > 0, "stored: {ack:?}");
    }
    let stored = last_seq(client).await;
    for id in ["future", "odd"] {
        for _ in 0..2 {
            // P29: not remembered, so the resend is processed again, with the same outcome.
            let reply = cmd(client, id, "deposit", json!({"amount": 1}), Some("u-1")).await;
            let message = failed(&reply, "unavailable");
            assert!(!message.is_empty(), "P23");
        }
    }
    assert_eq!(last_seq(client).await, stored, "nothing stored");

    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_p34_prefix_and_no_responders() {
    let side = function_only(|config| {
        config.command.subject_prefix = Some("tenant-1".into());
    })
    .await;
    let client = &side.client;

    // P2: the prefixed subject is served ...
    let reply = request(
        client,
        "tenant-1.cmd.account.a.open",
        r#"{"owner":"A"}"#,
        &[],
    )
    .await;
    ok(&reply, "a");
    let message = failed(
        &request(client, "tenant-1.cmd.account.a", "", &[]).await,
        "invalid",
    );
    assert!(
        message.contains("tenant-1.cmd.account.<id>.<command>"),
        "P2/P5: {message}"
    );

    // ... and the unprefixed one is not: P34, no responders.
    let err = try_request(client, "cmd.account.a.open", r#"{"owner":"A"}"#, &[])
        .await
        .expect_err("P2: nothing serves the unprefixed subject");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "P34");
    // P34 on the wire: a status 503 message without a body.
    let replies = collect(
        client,
        "cmd.account.a.open",
        json!({"owner": "A"}),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(replies.len(), 1, "P34: {replies:?}");
    assert_eq!(
        replies[0].status,
        Some(StatusCode::NO_RESPONDERS.as_u16()),
        "P34"
    );
    assert!(replies[0].payload.is_empty(), "P34");

    // P37 with a prefix.
    let info = services(client, "$SRV.INFO.account").await;
    let endpoint = &info[0]["endpoints"][0];
    assert_eq!(endpoint["subject"], "tenant-1.cmd.account.>", "P37");
    assert_eq!(
        endpoint["metadata"]["subject"], "tenant-1.cmd.account.<id>.<command>",
        "P37"
    );

    side.function.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Discovery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p35_to_p41_p43_discovery() {
    let side = read_side(1).await;
    let client = &side.client;

    // P35, P36: PING of every service; the command function and the projection both answer.
    let pings = services(client, "$SRV.PING").await;
    let by_name: BTreeMap<&str, &Value> = pings
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p))
        .collect();
    assert_eq!(
        by_name.keys().copied().collect::<Vec<_>>(),
        ["account", "account-balances"],
        "{pings:?}"
    );
    for ping in &pings {
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response", "P35");
    }
    let command_metadata = &by_name["account"]["metadata"];
    assert_eq!(command_metadata["jetfn.kind"], "command", "P36");
    assert_eq!(
        by_name["account-balances"]["metadata"]["jetfn.kind"], "projection",
        "P40"
    );

    // P35-P38: INFO.
    let info = services(client, "$SRV.INFO.account").await;
    assert_eq!(info.len(), 1, "one instance: {info:?}");
    let info = &info[0];
    assert_eq!(info["type"], "io.nats.micro.v1.info_response", "P35");
    assert_eq!(info["name"], "account", "P3/P35");
    assert_eq!(
        info["description"], "jetfn command function for aggregate account",
        "P35"
    );
    let version = info["version"].as_str().unwrap();
    let parts: Vec<&str> = version
        .split(['-', '+'])
        .next()
        .unwrap()
        .split('.')
        .collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok()),
        "P35: semver {version}"
    );
    let metadata = &info["metadata"];
    assert_eq!(metadata, command_metadata, "P36: PING and INFO agree");
    assert_eq!(metadata["jetfn.kind"], "command", "P36");
    assert_eq!(metadata["jetfn.aggregate"], "account", "P36");
    assert_eq!(
        metadata["jetfn.commands"], "open,deposit,withdraw,close",
        "P36"
    );
    assert_eq!(metadata["jetfn.stream"], STREAM, "P36");
    assert_eq!(metadata["jetfn.events"], "evt.account.<id>", "P36");
    let schemas_text = metadata["jetfn.schemas"]
        .as_str()
        .expect("P36: jetfn.schemas metadata is missing");
    let schemas: Value = serde_json::from_str(schemas_text).expect("P36: jetfn.schemas is JSON");
    let schemas = schemas
        .as_object()
        .expect("P36: jetfn.schemas is an object");
    assert_eq!(
        schemas.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(COMMANDS),
        "P36/P38"
    );
    assert!(
        schemas.values().all(Value::is_object),
        "P36: schemas are objects"
    );
    assert_eq!(
        serde_json::to_string(schemas).unwrap(),
        schemas_text,
        "P36: compact JSON"
    );
    let endpoints = info["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "P37");
    assert_eq!(endpoints[0]["name"], "commands", "P37");
    assert_eq!(endpoints[0]["subject"], "cmd.account.>", "P37");
    assert_eq!(endpoints[0]["queue_group"], "q", "P37");
    assert_eq!(
        endpoints[0]["metadata"]["subject"], "cmd.account.<id>.<command>",
        "P37"
    );

    // P38: every listed command is accepted in a subject (no "unknown command").
    let listed: Vec<&str> = metadata["jetfn.commands"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    for command in &listed {
        let reply = cmd(client, "probe", command, json!({}), None).await;
        if reply.json()["ok"] == false {
            let message = reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(
                !message.contains("unknown command"),
                "P38: {command}: {message}"
            );
        }
    }

    // P39: STATS counts outcomes since start. So far: the probes above.
    let probes = listed.len() as u64;
    ok(
        &cmd(client, "st", "open", json!({"owner": "S"}), None).await,
        "st",
    );
    failed(
        &cmd(client, "st", "withdraw", json!({"amount": 1}), None).await,
        "rejected",
    );
    failed(
        &cmd_bytes(client, "st", "deposit", "x", None).await,
        "invalid",
    );
    let stats = services(client, "$SRV.STATS.account").await;
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0]["type"], "io.nats.micro.v1.stats_response", "P35");
    let endpoint = &stats[0]["endpoints"][0];
    let data = &endpoint["data"];
    let keys = field_names(data);
    assert_eq!(
        keys,
        BTreeSet::from([
            "accepted",
            "invalid",
            "rejected",
            "conflict",
            "unavailable",
            "retries",
            "cache",
            "ledger",
            "affinity"
        ]),
        "P39"
    );
    let cache = field_names(&data["cache"]);
    assert_eq!(
        cache,
        BTreeSet::from(["hits", "misses", "evictions", "entries", "capacity"]),
        "P39: {data}"
    );
    // Every command read the ledger; one request may carry several reads, never the reverse.
    let ledger = &data["ledger"];
    assert_eq!(
        field_names(ledger),
        BTreeSet::from(["reads", "requests"]),
        "P39: {data}"
    );
    let (reads, requests) = (ledger["reads"].as_u64(), ledger["requests"].as_u64());
    assert!(
        matches!((reads, requests), (Some(r), Some(q)) if r >= 2 && q >= 1 && q <= r),
        "P39: {data}"
    );
    // One instance alone: it counts itself, and hands nothing on.
    assert_eq!(
        data["affinity"],
        json!({"instances": 1, "handed_on": 0, "taken_over": 0}),
        "P39"
    );
    let count = |key: &str| data[key].as_u64().unwrap();
    let outcomes = ["accepted", "invalid", "rejected", "conflict", "unavailable"];
    let total: u64 = outcomes.iter().map(|k| count(k)).sum();
    assert_eq!(total, probes + 3, "P39: {data}");
    assert!(
        count("accepted") >= 1 && count("rejected") >= 1 && count("invalid") >= 1,
        "P39"
    );
    assert_eq!(
        endpoint["num_requests"].as_u64().unwrap(),
        probes + 3,
        "P39"
    );
    assert_eq!(endpoint["num_errors"], 0, "P39");

    // Section 4: every instance answers, each with its own id.
    // (The new instance's subscriptions reach the server a moment after it starts.)
    let second = start_account(side.config.clone()).await.unwrap();
    let started = Instant::now();
    loop {
        let pings = services(client, "$SRV.PING.account").await;
        let ids: BTreeSet<&str> = pings.iter().map(|p| p["id"].as_str().unwrap()).collect();
        if (pings.len(), ids.len()) == (2, 2) {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "two instances, two answers: {pings:?}"
        );
    }
    second.stop().await.unwrap();

    // P40: the projection's service.
    let info = services(client, "$SRV.INFO.account-balances").await;
    assert_eq!(
        info[0]["description"], "jetfn projection account-balances",
        "P40"
    );
    let endpoints: BTreeMap<&str, (&str, &str)> = info[0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap();
            (field("name"), (field("subject"), field("queue_group")))
        })
        .collect();
    assert_eq!(
        endpoints,
        BTreeMap::from([
            (
                "dlq-replay",
                ("jetfn.projection.account-balances.dlq.replay", "q")
            ),
            (
                "rebuild",
                ("jetfn.projection.account-balances.rebuild", "q")
            ),
            ("status", ("jetfn.projection.account-balances.status", "q")),
        ]),
        "P40"
    );
    let metadata = &info[0]["metadata"];
    assert_eq!(metadata["jetfn.kind"], "projection", "P40");
    assert_eq!(metadata["jetfn.stream"], STREAM, "P40");
    assert_eq!(metadata["jetfn.partitions"], "1", "P40");
    assert_eq!(metadata["jetfn.redis_tag"], TAG, "P40");
    let status_fields = BTreeSet::from([
        "generation",
        "checkpoint",
        "checkpoints",
        "stream_last_seq",
        "lag",
        "processed",
        "dead_letters",
        "errors",
    ]);
    let status = request(client, "jetfn.projection.account-balances.status", "", &[])
        .await
        .json();
    let keys = field_names(&status);
    assert_eq!(keys, status_fields, "P41: {status}");
    assert_eq!(status["generation"], 1, "P41");
    assert!(status["checkpoints"]["p0"].is_u64(), "P41: {status}");
    let stats = services(client, "$SRV.STATS.account-balances").await;
    for endpoint in stats[0]["endpoints"].as_array().unwrap() {
        assert_eq!(
            field_names(&endpoint["data"]),
            status_fields,
            "P41: {endpoint}"
        );
    }

    // P43: nothing is dead-lettered, so nothing is replayed.
    let replayed = request(
        client,
        "jetfn.projection.account-balances.dlq.replay",
        "",
        &[],
    )
    .await
    .json();
    assert_eq!(replayed, json!({"replayed": 0}), "P43");

    // P79: a reply subject outside the inboxes gets nothing: no answer, no processing.
    let status_errors = |stats: &[Value]| {
        stats[0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "status")
            .unwrap()["num_errors"]
            .as_u64()
            .unwrap()
    };
    let refused_before = status_errors(&stats);
    for subject in [
        "$SRV.PING",
        "cmd.account.p79.open",
        "jetfn.projection.account-balances.status",
    ] {
        client
            .publish_with_reply(subject, "evt.account.p79", r#"{"owner":"P"}"#.into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // The endpoint counts the refusal when it takes the request, which the discovery verbs
    // (another subscription) do not wait for: ask until it shows, for at most 10 s.
    let counted = jetfn_tests::workload::poll(
        "P79: the refusal counted",
        Duration::from_secs(10),
        || async {
            let counted = status_errors(&services(client, "$SRV.STATS.account-balances").await);
            Ok((counted > refused_before).then_some(counted))
        },
    )
    .await
    .unwrap();
    assert_eq!(counted, refused_before + 1, "P79: counted");
    ok(
        &cmd(client, "p79b", "open", json!({"owner": "P"}), None).await,
        "p79b",
    );
    assert!(events_of(client, "evt.account.p79").await.is_empty(), "P79");

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. Events in JetStream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p44_to_p51_events_in_jetstream() {
    let side = function_only(|_| {}).await;
    let client = &side.client;

    // P44, P45: the stream.
    let config = &stream_info(client).await["config"];
    assert_eq!(config["name"], STREAM, "P44");
    assert_eq!(config["subjects"], json!(["evt.account.*"]), "P44");
    assert_eq!(config["storage"], "file", "P45");
    assert_eq!(config["allow_direct"], true, "P45");
    assert_eq!(config["allow_atomic"], true, "P45");
    assert_eq!(config["deny_delete"], true, "P45");
    assert_eq!(config["deny_purge"], true, "P45");
    assert_eq!(config["discard"], "new", "P45");
    assert_eq!(
        config["duplicate_window"], 120_000_000_000u64,
        "P45: 2 minutes"
    );

    let opened = ok(
        &cmd(
            client,
            "ev",
            "open",
            json!({"owner": "Eve", "initial_deposit": 100}),
            Some("e-1"),
        )
        .await,
        "ev",
    );
    ok(
        &cmd(client, "other", "open", json!({"owner": "O"}), Some("e-1")).await,
        "other",
    );
    ok(
        &cmd(client, "ev", "deposit", json!({"amount": 5}), None).await,
        "ev",
    );
    ok(
        &cmd(
            client,
            "ev",
            "withdraw",
            json!({"amount": 105}),
            Some("with:colon:1"),
        )
        .await,
        "ev",
    );
    let closed = ok(
        &cmd_bytes(client, "ev", "close", "", Some("e-4")).await,
        "ev",
    );

    // P46: the aggregate's events are its subject's messages in order; the k-th made version k.
    let events = events_of(client, "evt.account.ev").await;
    assert_eq!(events.len() as u64, closed.version, "P46");
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq), "P46");
    assert!(events.iter().all(|e| e.subject == "evt.account.ev"), "P44");
    let types: Vec<&str> = events.iter().map(|e| e.header("ce-type")).collect();
    assert_eq!(
        types,
        [
            "AccountOpened",
            "MoneyDeposited",
            "MoneyDeposited",
            "MoneyWithdrawn",
            "AccountClosed"
        ],
        "P46/P48"
    );

    // P47: payloads.
    let payloads: Vec<&Value> = events.iter().map(|e| &e.payload).collect();
    assert_eq!(
        payloads,
        [
            &json!({"owner": "Eve"}),
            &json!({"amount": 100}),
            &json!({"amount": 5}),
            &json!({"amount": 105}),
            &json!({}),
        ],
        "P47"
    );

    // P48: headers.
    let commands = ["open", "open", "deposit", "withdraw", "close"];
    let indexes = [0, 1, 0, 0, 0];
    for (k, event) in events.iter().enumerate() {
        assert_eq!(event.header("ce-specversion"), "1.0", "P48");
        assert_eq!(event.header("ce-source"), "/jetfn/account", "P48");
        assert_eq!(event.header("ce-subject"), "ev", "P48");
        assert_eq!(
            event.header("ce-datacontenttype"),
            "application/json",
            "P48"
        );
        assert_eq!(event.header("jetfn-event-version"), "1", "P48");
        assert_eq!(event.header("jetfn-command"), commands[k], "P48");
        let command_id = event.header("jetfn-command-id");
        let ce_id = event.header("ce-id");
        assert_eq!(ce_id, format!("ev:{command_id}:{}", indexes[k]), "P48");
        assert_eq!(event.header("Nats-Msg-Id"), ce_id, "P48");
        // ce-id splits at its first and last colon.
        let (aggregate, rest) = ce_id.split_once(':').unwrap();
        let (middle, index) = rest.rsplit_once(':').unwrap();
        assert_eq!((aggregate, middle), ("ev", command_id), "P48");
        assert_eq!(index, indexes[k].to_string(), "P48");
        assert!(
            is_rfc3339_utc(event.header("ce-time")),
            "P48: {:?}",
            event.header("ce-time")
        );
        // P49: any other header is JetStream's.
        let documented = [
            "ce-specversion",
            "ce-type",
            "ce-id",
            "ce-source",
            "ce-subject",
            "ce-time",
            "ce-datacontenttype",
            "jetfn-event-version",
            "jetfn-command-id",
            "jetfn-command",
            "jetfn-command-fingerprint",
            "jetfn-previous-seq",
            "jetfn-aggregate-version",
            "jetfn-event-index",
            "traceparent",
            "tracestate",
        ];
        for name in event.headers.keys() {
            assert!(
                documented.contains(&name.as_str()) || name.starts_with("Nats-"),
                "P49: unexpected header {name}"
            );
        }
    }
    assert_eq!(events[0].header("jetfn-command-id"), "e-1", "P48");
    assert_eq!(events[3].header("jetfn-command-id"), "with:colon:1", "P48");
    assert_eq!(events[4].header("jetfn-command-id"), "e-4", "P48");

    // P48: each command links to the aggregate's last event before it; indexes from the second
    // event of a command on.
    let previous = |k: usize| events[k].header("jetfn-previous-seq").to_owned();
    assert_eq!(previous(0), "0", "P48: the first command");
    assert_eq!(previous(1), "0", "P48: the same command");
    assert_eq!(events[0].headers.get("jetfn-event-index"), None, "P48");
    assert_eq!(events[1].header("jetfn-event-index"), "1", "P48");
    for k in 2..events.len() {
        assert_eq!(
            previous(k),
            events[k - 1].seq.to_string(),
            "P48: link of event {k}"
        );
    }
    for (k, event) in events.iter().enumerate() {
        let version = (k + 1).to_string();
        assert_eq!(event.header("jetfn-aggregate-version"), version, "P48");
    }

    // P50: one command's events are consecutive and share time and command.
    assert_eq!(events[1].seq, events[0].seq + 1, "P50");
    assert_eq!(events[1].seq, opened.seq, "P50/P21");
    for name in [
        "ce-time",
        "jetfn-command-id",
        "jetfn-command",
        "jetfn-previous-seq",
    ] {
        assert_eq!(
            events[0].header(name),
            events[1].header(name),
            "P50: {name}"
        );
    }

    // P51: the other forms of direct get.
    let by_seq = Event::from_raw(&direct_get(client, json!({"seq": events[2].seq})).await);
    assert_eq!(by_seq.payload, json!({"amount": 5}), "P51");
    assert!(by_seq.headers.contains_key("Nats-Time-Stamp"), "P51");
    let last =
        Event::from_raw(&direct_get(client, json!({"last_by_subj": "evt.account.ev"})).await);
    assert_eq!(last.seq, closed.seq, "P51");
    let none = direct_get(client, json!({"last_by_subj": "evt.account.nobody"})).await;
    assert_eq!(none.status, Some(404), "P51");
    assert!(
        events_of(client, "evt.account.nobody").await.is_empty(),
        "P51"
    );

    side.function.stop().await.unwrap();
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`.
fn is_rfc3339_utc(text: &str) -> bool {
    let Some(body) = text.strip_suffix('Z') else {
        return false;
    };
    let (seconds, fraction) = body.split_once('.').unwrap_or((body, "1"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let shape = seconds.len() == 19
        && seconds.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
    shape && digits(fraction) && fraction.len() <= 9
}

// ---------------------------------------------------------------------------------------------
// 7.-9. Read models, the consistency token, the change feed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p53_to_p65_read_model_token_and_change_feed() {
    let mut side = read_side(1).await;
    let client = side.client.clone();

    // P54: the live version exists from the start.
    assert_eq!(active(&mut side.redis).await, Some(1), "P54");

    // Follow the change feed live on a connection of its own (P64: when an entry is read, the
    // data already reflects it).
    let mut follower = side.redis_server.connect().await.unwrap();
    let mut checker = side.redis_server.connect().await.unwrap();
    let follow = tokio::spawn(async move {
        let key = format!("{TAG}:g1:changes");
        // The feed is still empty, so reading from the start is reading from "$" without the
        // race of a command landing before the first XREAD.
        let mut last = "0-0".to_owned();
        let mut seen = Vec::new();
        while seen.len() < 8 {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(10_000)
                .arg("STREAMS")
                .arg(&key)
                .arg(&last)
                .query_async(&mut follower)
                .await
                .unwrap();
            assert!(!reply.keys.is_empty(), "P63: no entry within 10 s");
            for entry in &reply.keys[0].ids {
                let field = |name: &str| -> String {
                    entry
                        .get(name)
                        .unwrap_or_else(|| panic!("P63: no {name} in {entry:?}"))
                };
                let (seq, id) = (field("seq").parse::<u64>().unwrap(), field("id"));
                let hash = account_hash(&mut checker, 1, &id).await;
                let applied: u64 = hash["seq"].parse().unwrap();
                assert!(
                    applied >= seq,
                    "P64: entry {seq} read before its data ({hash:?})"
                );
                seen.push((entry.id.clone(), seq));
                last = entry.id.clone();
            }
        }
        seen
    });
    assert!(feed(&mut side.redis, 1).await.is_empty(), "no events yet");

    let client = &client;
    ok(
        &cmd(
            client,
            "alice",
            "open",
            json!({"owner": "Alice", "initial_deposit": 100}),
            None,
        )
        .await,
        "alice",
    );
    ok(
        &cmd(client, "bob", "open", json!({"owner": "Bob"}), None).await,
        "bob",
    );
    ok(
        &cmd(client, "alice", "deposit", json!({"amount": 50}), None).await,
        "alice",
    );
    ok(
        &cmd(
            client,
            "carol",
            "open",
            json!({"owner": "Carol", "initial_deposit": 7}),
            None,
        )
        .await,
        "carol",
    );
    let withdrawn = ok(
        &cmd(client, "alice", "withdraw", json!({"amount": 30}), None).await,
        "alice",
    );
    let closed = ok(&cmd(client, "bob", "close", json!({}), None).await, "bob");

    // P61: once the least checkpoint reaches the token, every key reflects the commands.
    let generation = wait_for_token(&mut side.redis, closed.seq).await;
    assert_eq!(generation, 1, "P54");
    let redis = &mut side.redis;

    // P60: the checkpoint hash.
    let checkpoint: BTreeMap<String, String> =
        redis.hgetall(format!("{TAG}:g1:checkpoint")).await.unwrap();
    assert_eq!(
        checkpoint.keys().map(String::as_str).collect::<Vec<_>>(),
        ["p0", "partitions"],
        "P60"
    );
    assert_eq!(checkpoint["partitions"], "1", "P60");
    assert!(
        checkpoint["p0"].parse::<u64>().unwrap() >= closed.seq,
        "P60"
    );

    // P56: the account hashes.
    let alice = account_hash(redis, 1, "alice").await;
    let expected = |owner: &str, balance: u64, status: &str, version: u64, seq: u64| {
        BTreeMap::from([
            ("owner".to_owned(), owner.to_owned()),
            ("balance".to_owned(), balance.to_string()),
            ("status".to_owned(), status.to_owned()),
            ("version".to_owned(), version.to_string()),
            ("seq".to_owned(), seq.to_string()),
        ])
    };
    assert_eq!(
        alice,
        expected("Alice", 120, "open", withdrawn.version, withdrawn.seq),
        "P56"
    );
    assert_eq!(
        account_hash(redis, 1, "bob").await,
        expected("Bob", 0, "closed", closed.version, closed.seq),
        "P56"
    );
    assert!(
        account_hash(redis, 1, "nobody").await.is_empty(),
        "P56: missing key"
    );
    // P62: the shortcut agrees.
    assert!(alice["seq"].parse::<u64>().unwrap() >= withdrawn.seq, "P62");

    // P57, P58.
    let ranked: Vec<(String, i64)> = redis
        .zrange_withscores(format!("{TAG}:g1:accounts:open-by-balance"), 0, -1)
        .await
        .unwrap();
    assert_eq!(
        ranked,
        [("carol".to_owned(), 7), ("alice".to_owned(), 120)],
        "P57: open accounts by balance, closed ones removed"
    );
    let totals: BTreeMap<String, String> = redis
        .hgetall(format!("{TAG}:g1:accounts:totals"))
        .await
        .unwrap();
    assert_eq!(
        totals,
        BTreeMap::from([
            ("open_accounts".to_owned(), "2".to_owned()),
            ("total_balance".to_owned(), "127".to_owned()),
        ]),
        "P58"
    );

    // P53: every key carries the hash tag.
    let keys: Vec<String> = redis.keys("*").await.unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(key.starts_with(TAG), "P53: {key}");
    }
    let key_type: String = redis::cmd("TYPE")
        .arg(format!("{TAG}:active"))
        .query_async(redis)
        .await
        .unwrap();
    assert_eq!(key_type, "string", "P54");

    // P63, P65: one entry per event, in stream order, with exactly seq, id and type.
    let entries = feed(redis, 1).await;
    let last = last_seq(client).await;
    assert_eq!(entries.len() as u64, last, "P63: one entry per event");
    let mut previous = 0;
    for (entry, fields) in &entries {
        assert_eq!(
            fields.keys().map(String::as_str).collect::<Vec<_>>(),
            ["id", "seq", "type"],
            "P63: {entry}"
        );
        let seq: u64 = fields["seq"].parse().unwrap();
        assert_eq!(seq, previous + 1, "P65: stream order");
        previous = seq;
        assert!(EVENT_TYPES.contains(&fields["type"].as_str()), "P63");
        let event = Event::from_raw(&direct_get(client, json!({"seq": seq})).await);
        assert_eq!(fields["type"], event.header("ce-type"), "P63");
        assert_eq!(fields["id"], event.header("ce-subject"), "P63");
    }

    // P64 (live follower) and resuming from an entry id.
    let seen = follow.await.unwrap();
    assert_eq!(
        seen.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "P63: the live follower saw every event"
    );
    let (resume_from, _) = &seen[3];
    let resumed: redis::streams::StreamReadReply = redis::cmd("XREAD")
        .arg("STREAMS")
        .arg(format!("{TAG}:g1:changes"))
        .arg(resume_from)
        .query_async(redis)
        .await
        .unwrap();
    let resumed: Vec<&str> = resumed.keys[0].ids.iter().map(|e| e.id.as_str()).collect();
    let expected: Vec<&str> = seen[4..].iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        resumed, expected,
        "section 9: resume after the last entry id"
    );

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p60_p61_p65_the_token_with_two_partitions() {
    let mut side = read_side(2).await;
    let client = side.client.clone();

    let ids: Vec<String> = (0..8).map(|i| format!("acct-{i}")).collect();
    let mut tokens = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let opened = ok(
            &cmd(
                &client,
                id,
                "open",
                json!({"owner": id, "initial_deposit": 10 + i}),
                None,
            )
            .await,
            id,
        );
        tokens.push(opened.seq);
    }
    for id in &ids {
        let deposited = ok(
            &cmd(&client, id, "deposit", json!({"amount": 1}), None).await,
            id,
        );
        tokens.push(deposited.seq);
    }
    let token = *tokens.iter().max().unwrap();

    // P60, P61: min over p0, p1.
    let generation = wait_for_token(&mut side.redis, token).await;
    let checkpoint: BTreeMap<String, String> = side
        .redis
        .hgetall(format!("{TAG}:g{generation}:checkpoint"))
        .await
        .unwrap();
    assert_eq!(
        checkpoint.keys().map(String::as_str).collect::<Vec<_>>(),
        ["p0", "p1", "partitions"],
        "P60"
    );
    assert_eq!(checkpoint["partitions"], "2", "P60");
    for (i, id) in ids.iter().enumerate() {
        let hash = account_hash(&mut side.redis, generation, id).await;
        assert_eq!(hash["balance"], (11 + i).to_string(), "P61: {id}");
        assert_eq!(hash["version"], "3", "P61: {id}");
    }

    // P65: each event exactly once, each account's entries in stream order.
    let entries = feed(&mut side.redis, generation).await;
    let last = last_seq(&client).await;
    let mut seqs: Vec<u64> = entries
        .iter()
        .map(|(_, f)| f["seq"].parse().unwrap())
        .collect();
    let mut by_account: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for ((_, fields), seq) in entries.iter().zip(&seqs) {
        by_account
            .entry(fields["id"].as_str())
            .or_default()
            .push(*seq);
    }
    for (id, account_seqs) in &by_account {
        assert!(account_seqs.windows(2).all(|w| w[0] < w[1]), "P65: {id}");
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "P65: each event once");

    // P61: one more command touches one partition only; the other, with no event of its own
    // after it, still reaches its token.
    let single = ok(
        &cmd(&client, &ids[0], "deposit", json!({"amount": 1}), None).await,
        &ids[0],
    );
    let generation = wait_for_token(&mut side.redis, single.seq).await;
    let checkpoint: BTreeMap<String, u64> = side
        .redis
        .hgetall(format!("{TAG}:g{generation}:checkpoint"))
        .await
        .unwrap();
    assert!(
        checkpoint["p0"] >= single.seq && checkpoint["p1"] >= single.seq,
        "P61: {checkpoint:?} and token {}",
        single.seq
    );

    // P40: the projection says how many partitions it has.
    let info = services(&client, "$SRV.INFO.account-balances").await;
    assert_eq!(info[0]["metadata"]["jetfn.partitions"], "2", "P40");

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p42_p54_p55_a_rebuild_switches_the_live_version() {
    let mut side = read_side(1).await;
    let client = side.client.clone();
    ok(
        &cmd(
            &client,
            "v",
            "open",
            json!({"owner": "V", "initial_deposit": 40}),
            None,
        )
        .await,
        "v",
    );
    let withdrawn = ok(
        &cmd(&client, "v", "withdraw", json!({"amount": 15}), None).await,
        "v",
    );
    assert_eq!(wait_for_token(&mut side.redis, withdrawn.seq).await, 1);
    let before = account_hash(&mut side.redis, 1, "v").await;

    // P42: an operator starts a rebuild over NATS and follows its progress.
    let mut progress = client
        .subscribe("jetfn.projection.account-balances.rebuild.progress")
        .await
        .unwrap();
    client.flush().await.unwrap();
    let started = request(
        &client,
        "jetfn.projection.account-balances.rebuild",
        "",
        &[],
    )
    .await
    .json();
    assert_eq!(started, json!({"started": true, "generation": 2}), "P42");
    loop {
        let message = tokio::time::timeout(WAIT, progress.next())
            .await
            .expect("P42: progress within 10 s")
            .unwrap();
        let report: Value = serde_json::from_slice(&message.payload).unwrap();
        assert!(report.get("error").is_none(), "P42: {report}");
        assert_eq!(
            field_names(&report),
            BTreeSet::from([
                "generation",
                "reached",
                "target",
                "events_per_second",
                "done"
            ]),
            "P42: {report}"
        );
        assert_eq!(report["generation"], 2, "P42");
        if report["done"] == true {
            break;
        }
    }

    // P54, P55: the pointer moved; the new version is complete; the old one is gone after the
    // grace period (500 ms here), which P42's "done" already reports.
    assert_eq!(active(&mut side.redis).await, Some(2), "P54/P55");
    assert_eq!(account_hash(&mut side.redis, 2, "v").await, before, "P55");
    let started = Instant::now();
    loop {
        let old: Vec<String> = side.redis.keys(format!("{TAG}:g1:*")).await.unwrap();
        if old.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "P55: version 1 not deleted: {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let feed2 = feed(&mut side.redis, 2).await;
    assert_eq!(
        feed2.len() as u64,
        last_seq(&client).await,
        "P63: the new version's feed"
    );

    // The live projection follows the new version: the recipe (reading active first) works.
    let deposited = ok(
        &cmd(&client, "v", "deposit", json!({"amount": 5}), None).await,
        "v",
    );
    assert_eq!(
        wait_for_token(&mut side.redis, deposited.seq).await,
        2,
        "P54"
    );
    let hash = account_hash(&mut side.redis, 2, "v").await;
    assert_eq!(hash["balance"], "30", "P61");

    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 10. JSON Schemas

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p67_to_p70_json_schemas() {
    let side = function_only(|_| {}).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let read = |path: &str| -> Value {
        let text = std::fs::read_to_string(dir.join(path))
            .unwrap_or_else(|e| panic!("schemas/{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("schemas/{path}: {e}"))
    };
    const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

    // P69: the discovery metadata carries the same command schemas.
    let info = services(&side.client, "$SRV.INFO.account").await;
    let served: Value = serde_json::from_str(
        info[0]["metadata"]["jetfn.schemas"]
            .as_str()
            .expect("P36: jetfn.schemas"),
    )
    .unwrap();

    // P67
    for command in COMMANDS {
        let schema = read(&format!("account/commands/{command}.json"));
        assert_eq!(schema["$schema"], DRAFT, "P67");
        assert_eq!(
            schema["$id"],
            format!("urn:jetfn:account:command:{command}"),
            "P67"
        );
        assert_eq!(schema["type"], "object", "P67");
        assert_eq!(served[command], schema, "P69: {command}");
    }
    // P68
    for event_type in EVENT_TYPES {
        let schema = read(&format!("account/events/{event_type}.json"));
        assert_eq!(schema["$schema"], DRAFT, "P68");
        assert_eq!(
            schema["$id"],
            format!("urn:jetfn:account:event:{event_type}"),
            "P68"
        );
    }
    // P70
    assert_eq!(read("reply.json")["$id"], "urn:jetfn:reply", "P70");
    let account = read("account-balances/account.json");
    assert_eq!(account["$id"], "urn:jetfn:account-balances:account", "P70");
    let properties: BTreeSet<&str> = account["properties"]
        .as_object()
        .expect("P70: properties")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        properties,
        BTreeSet::from(["owner", "balance", "status", "version", "seq"]),
        "P70/P56"
    );
    let totals = read("account-balances/totals.json");
    assert_eq!(totals["$id"], "urn:jetfn:account-balances:totals", "P70");

    // P67 with P11: what the schema requires, the function requires.
    let client = &side.client;
    ok(
        &cmd(client, "sch", "open", json!({"owner": "S"}), None).await,
        "sch",
    );
    for command in ["deposit", "withdraw"] {
        let schema = &served[command];
        assert_eq!(schema["required"], json!(["amount"]), "P67");
        assert_eq!(schema["additionalProperties"], false, "P67");
        let message = failed(
            &cmd(client, "sch", command, json!({}), None).await,
            "invalid",
        );
        assert!(message.contains("`amount`"), "P11: {message}");
    }

    side.function.stop().await.unwrap();
}

/// The field names of a JSON object.
fn field_names(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p74_p80_to_p83_decisions_across_aggregate_types() {
    let nats = NatsServer::start().await.unwrap();
    // P83: without one stream for both types, the function does not start.
    let refused = jetfn::decision_function::<signup::Signup>()
        .with_config(account_config(&nats))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("user in USER_EVENTS") && refused.contains("username in USERNAME_EVENTS"),
        "P83: {refused}"
    );
    let mut config = account_config(&nats);
    config.stream.name = Some("USERS".into());
    let _signup = jetfn::decision_function::<signup::Signup>()
        .with_config(config)
        .start()
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    let body = json!({"user": "u1", "username": "alice"}).to_string();
    let reply = request(
        &client,
        "cmd.signup.s1.register",
        body,
        &[("Nats-Msg-Id", "c1")],
    )
    .await;
    let body = reply.json();
    assert_eq!(
        (&body["version"], &body["seq"]),
        (&json!(0), &json!(2)),
        "P74: {body}"
    );
    let written: Vec<(&str, &str, u64, u64)> = body["aggregates"]
        .as_array()
        .expect("P74: aggregates")
        .iter()
        .map(|a| {
            assert_eq!(
                field_names(a),
                BTreeSet::from(["aggregate", "id", "version", "seq", "events"]),
                "P74: {a}"
            );
            let text = |key: &str| a[key].as_str().unwrap();
            let number = |key: &str| a[key].as_u64().unwrap();
            (
                text("aggregate"),
                text("id"),
                number("version"),
                number("seq"),
            )
        })
        .collect();
    assert_eq!(
        written,
        [("user", "u1", 1, 1), ("username", "alice", 1, 2)],
        "P74"
    );

    // P80: one stream, each type on its own subjects, all listed.
    let info = request(&client, "$JS.API.STREAM.INFO.USERS", "", &[])
        .await
        .json();
    let config = &info["config"];
    assert_eq!(
        config["subjects"],
        json!(["evt.user.*", "evt.username.*"]),
        "P80"
    );
    assert_eq!(
        config["metadata"]["jetfn.aggregate"], "user,username",
        "P80"
    );
    assert_eq!(
        config["metadata"]["jetfn.aggregate.user"], "evt.user.*",
        "P80"
    );
    assert_eq!(
        config["metadata"]["jetfn.aggregate.username"], "evt.username.*",
        "P80"
    );

    // P81, P82: each event on its own subject, its dedupe id naming its type.
    for (subject, msg_id, ce_id) in [
        ("evt.user.u1", "user.u1:c1:0", "u1:c1:0"),
        ("evt.username.alice", "username.alice:c1:0", "alice:c1:0"),
    ] {
        let raw = request(
            &client,
            "$JS.API.DIRECT.GET.USERS",
            json!({"last_by_subj": subject}).to_string(),
            &[],
        )
        .await;
        let event = Event::from_raw(&raw);
        assert_eq!(event.header("Nats-Msg-Id"), msg_id, "P81");
        assert_eq!(event.header("ce-id"), ce_id, "P81");
        assert_eq!(
            event.header("Nats-Expected-Last-Subject-Sequence"),
            "0",
            "P82"
        );
    }

    // P82: the name is taken.
    let body = json!({"user": "u2", "username": "alice"}).to_string();
    let taken = request(
        &client,
        "cmd.signup.s2.register",
        body,
        &[("Nats-Msg-Id", "c2")],
    )
    .await
    .json();
    assert_eq!(taken["error"]["kind"], "rejected", "P82: {taken}");
    assert_eq!(taken["error"]["code"], "username_taken", "P82: {taken}");
    assert_eq!(
        taken["error"]["message"], "username alice is taken by u1",
        "P82"
    );

    // P83: discovery names both types and their subjects.
    let infos = services(&client, "$SRV.INFO.signup").await;
    let metadata = &infos[0]["metadata"];
    assert_eq!(metadata["jetfn.aggregate"], "user,username", "P83");
    assert_eq!(
        metadata["jetfn.events"], "evt.user.<id>,evt.username.<id>",
        "P83"
    );
    assert_eq!(metadata["jetfn.stream"], "USERS", "P83");
}

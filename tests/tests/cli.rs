//! The `jetfn` command-line tool, run as the built binary against real servers: `send`, `tail`,
//! `status`, `dlq`, `projection rebuild` and `deploy`, their exit statuses and their messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::{self, stream};
use jetfn_tests::commands::{ACCOUNT_STREAM, account_config, send, start_account};
use jetfn_tests::readmodels::{PROJECTION, ReadSide, live_generation};
use jetfn_tests::workload::poll;
use jetfn_tests::{FunctionProcess, NatsServer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Longest any single `jetfn` run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// What a finished `jetfn` run printed.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout as one JSON document.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// stdout as JSON lines.
    #[track_caller]
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?} in {self:?}"))
            })
            .collect()
    }
}

/// `jetfn` with `args`, in a new empty working directory (no `jetfn.toml`, no
/// `.jetfn/nats.url`; keep it while the command runs) and without the developer's
/// `NATS_URL`/`JETFN_*`, so only what the test passes counts.
fn command(args: &[&str]) -> (tokio::process::Command, tempfile::TempDir) {
    let binary = FunctionProcess::binary_path("jetfn").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(binary);
    command
        .args(args)
        .current_dir(dir.path())
        .env_remove("NATS_URL")
        .env_remove("REDIS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("JETFN_") {
            command.env_remove(key);
        }
    }
    (command, dir)
}

/// Runs `jetfn args` to the end (at most [`RUN_LIMIT`]).
async fn jetfn(args: &[&str]) -> Run {
    jetfn_with_env(args, &[]).await
}

/// Runs `jetfn args` with the extra environment `envs` (e.g. `JETFN_*` configuration).
async fn jetfn_with_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let (mut command, _dir) = command(args);
    command.envs(envs.iter().copied());
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("jetfn {args:?} did not finish within {RUN_LIMIT:?}"))
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `args` after `--server <url>`.
fn with_server<'a>(url: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--server", url];
    all.extend_from_slice(args);
    all
}

#[tokio::test]
async fn every_subcommand_has_help_with_examples() {
    for args in [
        vec!["--help"],
        vec!["send", "--help"],
        vec!["tail", "--help"],
        vec!["status", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "replay", "--help"],
        vec!["projection", "rebuild", "--help"],
        vec!["deploy", "diff", "--help"],
        vec!["deploy", "apply", "--help"],
    ] {
        let run = jetfn(&args).await;
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert!(run.stdout.contains("Examples:"), "{args:?}: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_prints_the_reply_and_exits_0_on_ok_and_1_on_an_error_reply() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let _account = start_account(account_config(&nats)).await.unwrap();
    let url = nats.url();

    let run = jetfn(&with_server(
        &url,
        &[
            "send",
            "account.alice.open",
            r#"{"owner":"Alice","initial_deposit":100}"#,
        ],
    ))
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let reply = run.json();
    assert_eq!(reply["ok"], json!(true));
    assert_eq!(reply["version"], json!(2));
    assert_eq!(reply["events"], json!(["AccountOpened", "MoneyDeposited"]));
    assert!(
        run.stdout.lines().count() > 1,
        "the reply is pretty-printed: {run:?}"
    );

    // The same command id twice: the first reply again, nothing stored twice.
    let deposit = [
        "send",
        "account.alice.deposit",
        r#"{"amount":5}"#,
        "--id",
        "c-1",
    ];
    let first = jetfn(&with_server(&url, &deposit)).await;
    let again = jetfn(&with_server(&url, &deposit)).await;
    assert_eq!((first.code, again.code), (0, 0), "{first:?} {again:?}");
    assert_eq!(first.json(), again.json());

    // An empty body is {}: `close` has no fields, and is rejected here (balance not zero).
    let run = jetfn(&with_server(&url, &["send", "account.alice.close", ""])).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.json()["error"]["kind"], json!("rejected"));
    assert!(
        run.stderr.contains("rejected (422)") && run.stderr.contains("balance must be zero"),
        "kind, code and message on stderr: {run:?}"
    );

    let run = jetfn(&with_server(
        &url,
        &["send", "account.alice.withdraw", r#"{"amount":500}"#],
    ))
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.json()["ok"], json!(false));
    assert!(run.stderr.contains("insufficient funds"), "{run:?}");

    // The function's own validation: an invalid reply is an error reply too.
    let run = jetfn(&with_server(
        &url,
        &["send", "account.alice.deposit", r#"{"amount":0}"#],
    ))
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("invalid (400)"), "{run:?}");

    // Nobody serves that aggregate: no reply at all.
    let run = jetfn(&with_server(&url, &["send", "nobody.x.do", "{}"])).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("no responders") && run.stderr.contains(&url),
        "{run:?}"
    );
}

#[tokio::test]
async fn send_refuses_bad_arguments_before_connecting() {
    // Nothing listens here: each refusal below happens before any connection attempt.
    let nowhere = "nats://127.0.0.1:1";
    let cases: [(&[&str], &str); 6] = [
        (
            &["send", "account.alice.deposit", r#"{"amount":"#],
            "not valid JSON",
        ),
        (
            &["send", "account.alice.deposit", "[1,2]"],
            "must be a JSON object",
        ),
        (
            &["send", "account.alice", "{}"],
            "<aggregate>.<id>.<command>",
        ),
        (
            &["send", "account.alice.deposit", "{}", "--id", "has space"],
            "--id",
        ),
        (
            &["send", "account.alice.deposit", "{}", "--timeout", "soon"],
            "--timeout",
        ),
        (&["send"], "AGGREGATE.ID.COMMAND"),
    ];
    for (args, message) in cases {
        let run = jetfn(&with_server(nowhere, args)).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains(message), "{args:?}: {run:?}");
        assert!(
            !run.stderr.contains("cannot connect"),
            "refused locally: {run:?}"
        );
    }
    let run = jetfn(&with_server(nowhere, &["send", "account.a.open", "{}"])).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("cannot connect") && run.stderr.contains(nowhere),
        "a connection error names the URL: {run:?}"
    );
    let run = jetfn(&with_server(nowhere, &["status"])).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(nowhere), "{run:?}");
}

/// Durations beyond what the clock can add, and numbers at the edge of their type, are
/// refused with a message (exit 2) or served; the CLI never panics (exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_argument_makes_the_cli_panic() {
    let nats = NatsServer::start().await.unwrap();
    let url = nats.url();
    let huge = "18446744073709551615s";
    let cases: [&[&str]; 7] = [
        &["status", "--wait", huge],
        &["status", "--wait", "400days"],
        &["send", "account.a.open", "{}", "--timeout", huge],
        &["dlq", "replay", "account-balances", "--timeout", huge],
        &[
            "projection",
            "rebuild",
            "account-balances",
            "--timeout",
            huge,
        ],
        &[
            "projection",
            "rebuild",
            "account-balances",
            "--idle-timeout",
            huge,
        ],
        &["status", "--wait", "99999999999999999999999s"],
    ];
    for args in cases {
        let run = jetfn(&with_server(&url, args)).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("too long") || run.stderr.contains("too large"),
            "{args:?}: {run:?}"
        );
    }
    // The largest sequence and limit are valid numbers: no panic, an answer from the server.
    let max = u64::MAX.to_string();
    let run = jetfn(&with_server(&url, &["tail", "nothing", "--from", &max])).await;
    assert_eq!(run.code, 1, "{run:?}");
    let run = jetfn(&with_server(&url, &["tail", "nothing", "--limit", &max])).await;
    assert_eq!(run.code, 1, "{run:?}");
}

#[tokio::test]
async fn projection_names_follow_the_runtime_rule_without_underscores() {
    let nowhere = "nats://127.0.0.1:1";
    for args in [
        ["dlq", "list", "account_balances"],
        ["dlq", "replay", "account_balances"],
        ["projection", "rebuild", "account_balances"],
    ] {
        let run = jetfn(&with_server(nowhere, &args)).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("must match [a-z0-9-]+"),
            "{args:?}: {run:?}"
        );
        assert!(!run.stderr.contains("cannot connect"), "{args:?}: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_the_events_as_json_lines() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let _account = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    let url = nats.url();
    let opened = send(
        &client,
        "alice",
        "open",
        json!({"owner": "Alice", "initial_deposit": 10}),
        None,
    )
    .await
    .unwrap();
    let bob = send(&client, "bob", "open", json!({"owner": "Bob"}), None)
        .await
        .unwrap();
    let (alice_seq, bob_seq) = (opened.accepted().seq, bob.accepted().seq);

    let run = jetfn(&with_server(
        &url,
        &["--json", "tail", "account", "--all", "--limit", "3"],
    ))
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let events = run.json_lines();
    let summary: Vec<(u64, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["type"].as_str().unwrap(),
                e["id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (alice_seq - 1, "AccountOpened", "alice"),
            (alice_seq, "MoneyDeposited", "alice"),
            (bob_seq, "AccountOpened", "bob"),
        ]
    );
    assert_eq!(events[1]["payload"], json!({"amount": 10}));
    assert_eq!(events[1]["version"], json!(1));
    assert!(events[1]["time"].as_str().unwrap().ends_with('Z'));

    // One aggregate, from a sequence on, as text.
    let from = alice_seq.to_string();
    let run = jetfn(&with_server(
        &url,
        &["tail", "account.alice", "--from", &from, "--limit", "1"],
    ))
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let line = run.stdout.trim();
    assert!(line.starts_with(&from), "sequence first: {run:?}");
    assert!(
        line.contains("MoneyDeposited")
            && line.contains("alice")
            && line.contains(r#"{"amount":10}"#),
        "{run:?}"
    );

    // Live: by default only events stored after tail started.
    let (mut live, _dir) = command(&with_server(
        &url,
        &["--json", "tail", "account", "--limit", "2"],
    ));
    let mut live = live.spawn().unwrap();
    let mut stderr = BufReader::new(live.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(RUN_LIMIT, stderr.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(ready.contains("following"), "{ready:?}");
    let deposit = send(&client, "bob", "deposit", json!({"amount": 7}), None)
        .await
        .unwrap();
    let withdraw = send(&client, "bob", "withdraw", json!({"amount": 2}), None)
        .await
        .unwrap();
    let output = tokio::time::timeout(RUN_LIMIT, live.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [deposit.accepted().seq, withdraw.accepted().seq]);
    assert_eq!(lines[1]["type"], json!("MoneyWithdrawn"));

    // An ordered consumer leaves no durable consumer behind.
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(ACCOUNT_STREAM).await.unwrap();
    let mut consumers = stream.consumers();
    while let Some(info) = futures::StreamExt::next(&mut consumers).await {
        assert!(info.unwrap().config.durable_name.is_none());
    }

    let run = jetfn(&with_server(&url, &["tail", "Not-An-Aggregate"])).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = jetfn(&with_server(&url, &["tail", "nothing"])).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("NOTHING_EVENTS") && run.stderr.contains("--stream"),
        "{run:?}"
    );
}

/// A deployment with its own stream and event subjects: `jetfn tail` reads the same
/// configuration as the function, so it follows the events there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_the_stream_and_subject_prefix_of_the_configuration() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let url = nats.url();
    let deployment = [
        ("JETFN_STREAM__NAME", "TENANT1_ACCOUNTS"),
        ("JETFN_STREAM__SUBJECT_PREFIX", "tenant1.evt.account"),
    ];
    let mut envs: Vec<(&str, String)> = vec![("NATS_URL", url.clone())];
    envs.extend(deployment.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let mut account = FunctionProcess::spawn("account", &envs).unwrap();
    account
        .wait_for_log("command function ready", RUN_LIMIT)
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    let opened = send(
        &client,
        "carol",
        "open",
        json!({"owner": "Carol", "initial_deposit": 3}),
        None,
    )
    .await
    .unwrap();
    let seq = opened.accepted().seq;
    let js = jetstream::new(client.clone());
    let stored = js
        .get_stream("TENANT1_ACCOUNTS")
        .await
        .unwrap()
        .get_raw_message(seq)
        .await
        .unwrap();
    assert_eq!(stored.subject.as_str(), "tenant1.evt.account.carol");

    let run = jetfn_with_env(
        &with_server(
            &url,
            &["--json", "tail", "account", "--all", "--limit", "2"],
        ),
        &deployment,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let events: Vec<(u64, String, String)> = run
        .json_lines()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_owned(),
                e["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            (seq - 1, "AccountOpened".to_owned(), "carol".to_owned()),
            (seq, "MoneyDeposited".to_owned(), "carol".to_owned()),
        ]
    );
    assert!(
        run.stderr
            .contains("following tenant1.evt.account.* in TENANT1_ACCOUNTS"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_functions_streams_and_projections_with_their_lag() {
    let side = ReadSide::start().await.unwrap();
    let url = side.nats.url();
    let seq = send(
        &side.client,
        "alice",
        "open",
        json!({"owner": "Alice", "initial_deposit": 3}),
        None,
    )
    .await
    .unwrap()
    .accepted()
    .seq;

    // Projection numbers refresh about once a second: wait until they show the command.
    let status = poll(
        "jetfn status shows the projection caught up",
        Duration::from_secs(30),
        || async {
            let run = jetfn(&with_server(&url, &["status", "--json"])).await;
            anyhow::ensure!(run.code == 0, "{run:?}");
            let status = run.json();
            let caught_up = status["projections"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == json!(PROJECTION)))
                .is_some_and(|p| p["checkpoint"].as_u64() >= Some(seq) && p["lag"] == json!(0));
            Ok(caught_up.then_some(status))
        },
    )
    .await
    .unwrap();

    let functions = status["functions"].as_array().unwrap();
    let account = functions.iter().find(|f| f["name"] == json!("account"));
    let account = account.unwrap_or_else(|| panic!("no account function: {status:#}"));
    assert_eq!(account["kind"], json!("command"));
    assert_eq!(account["instances"], json!(1));
    assert!(account["requests"].as_u64().unwrap() >= 1, "{status:#}");
    let projection = functions.iter().find(|f| f["name"] == json!(PROJECTION));
    assert_eq!(
        projection.unwrap_or_else(|| panic!("{status:#}"))["kind"],
        json!("projection")
    );

    let projection = status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == json!(PROJECTION))
        .unwrap();
    assert_eq!(projection["generation"], json!(1));
    assert_eq!(projection["dead_letters"], json!(0));
    assert_eq!(projection["stream"], json!(ACCOUNT_STREAM));

    let stream = status["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == json!(ACCOUNT_STREAM))
        .unwrap_or_else(|| panic!("no {ACCOUNT_STREAM}: {status:#}"));
    assert_eq!(stream["messages"], json!(2));
    assert!(stream["bytes"].as_u64().unwrap() > 0);

    let run = jetfn(&with_server(&url, &["status"])).await;
    assert_eq!(run.code, 0, "{run:?}");
    for expected in [
        "FUNCTIONS",
        "account",
        "command",
        "STREAMS",
        ACCOUNT_STREAM,
        "PROJECTIONS",
        PROJECTION,
        "LAG",
        "DEAD_LETTERS",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_a_poison_event_and_replay_asks_the_running_projection() {
    let side = ReadSide::start().await.unwrap();
    let url = side.nats.url();
    send(&side.client, "x", "open", json!({"owner": "X"}), None)
        .await
        .unwrap();
    let js = jetstream::new(side.client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-type", "Nope");
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-subject", "x");
    let poison = js
        .publish_with_headers("evt.account.x", headers, bytes::Bytes::from_static(b"{}"))
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;

    let letters = poll(
        "jetfn dlq list shows the poison event",
        Duration::from_secs(60),
        || async {
            let run = jetfn(&with_server(&url, &["dlq", "list", PROJECTION, "--json"])).await;
            anyhow::ensure!(run.code == 0, "{run:?}");
            let letters = run.json();
            Ok((letters.as_array().map_or(0, Vec::len) == 1).then_some(letters))
        },
    )
    .await
    .unwrap();
    let letter = &letters[0];
    assert_eq!(letter["type"], json!("Nope"));
    assert_eq!(letter["subject"], json!("evt.account.x"));
    assert_eq!(letter["seq"], json!(poison));
    assert!(letter["deliveries"].as_i64().unwrap() >= 1, "{letter}");
    assert!(
        letter["error"].as_str().unwrap().contains("Nope"),
        "{letter}"
    );

    let run = jetfn(&with_server(&url, &["dlq", "list", PROJECTION])).await;
    assert_eq!(run.code, 0, "{run:?}");
    for expected in ["DLQ_SEQ", "evt.account.x", &poison.to_string(), "Nope"] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }

    // The running code still refuses `Nope`: nothing is replayed, the letter stays.
    let run = jetfn(&with_server(&url, &["dlq", "replay", PROJECTION])).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("replayed 0"), "{run:?}");
    let run = jetfn(&with_server(&url, &["--json", "dlq", "replay", PROJECTION])).await;
    assert_eq!(run.json()["replayed"], json!(0), "{run:?}");
    let run = jetfn(&with_server(&url, &["--json", "dlq", "list", PROJECTION])).await;
    assert_eq!(run.json().as_array().unwrap().len(), 1, "{run:?}");

    let run = jetfn(&with_server(&url, &["dlq", "replay", "no-such-projection"])).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no responders"), "{run:?}");
    let run = jetfn(&with_server(&url, &["dlq", "list", "Bad Name"])).await;
    assert_eq!(run.code, 2, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_rebuild_follows_the_progress_until_the_new_generation_is_live() {
    let side = ReadSide::start().await.unwrap();
    let url = side.nats.url();
    for id in ["a", "b", "c"] {
        send(&side.client, id, "open", json!({"owner": id}), None)
            .await
            .unwrap();
    }
    assert_eq!(live_generation(&side.redis).await.unwrap(), 1);

    let run = jetfn(&with_server(&url, &["projection", "rebuild", PROJECTION])).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("generation 2 is live"),
        "the new generation is printed: {run:?}"
    );
    // Not a terminal: plain progress lines instead of a bar.
    assert!(
        run.stderr.contains("3/3 events") && run.stderr.contains("done"),
        "{run:?}"
    );
    assert_eq!(live_generation(&side.redis).await.unwrap(), 2);

    let run = jetfn(&with_server(
        &url,
        &["--json", "projection", "rebuild", PROJECTION],
    ))
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["generation"], json!(3), "{run:?}");
    assert_eq!(live_generation(&side.redis).await.unwrap(), 3);

    let run = jetfn(&with_server(&url, &["projection", "rebuild", "nobody"])).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("jetfn.projection.nobody.rebuild") && run.stderr.contains("running"),
        "{run:?}"
    );
}

/// A directory of resource files.
struct Resources(tempfile::TempDir);

impl Resources {
    fn new() -> Resources {
        Resources(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &str {
        self.0.path().to_str().unwrap()
    }

    fn write(&self, file: &str, document: &Value) {
        assert_schema_valid(document);
        std::fs::write(
            self.0.path().join(file),
            serde_json::to_vec_pretty(document).unwrap(),
        )
        .unwrap();
    }
}

fn stream_file(duplicate_window: Duration, storage: &str, subjects: &[&str]) -> Value {
    json!({
        "kind": "stream",
        "config": {
            "name": "CLI_TEST",
            "subjects": subjects,
            "storage": storage,
            "num_replicas": 1,
            "duplicate_window": duplicate_window.as_nanos() as u64,
            "allow_direct": true,
            "discard": "new",
        }
    })
}

/// The repository's `deploy/jetstream`.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("jetstream")
}

fn schema_validator() -> jsonschema::Validator {
    let path = deploy_dir().join("resource.schema.json");
    let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[track_caller]
fn assert_schema_valid(document: &Value) {
    let errors: Vec<String> = schema_validator()
        .iter_errors(document)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{document} does not follow resource.schema.json: {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_creates_updates_and_refuses_destructive_changes() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let url = nats.url();
    let dir = Resources::new();
    let two_minutes = Duration::from_secs(120);
    dir.write(
        "stream.json",
        &stream_file(two_minutes, "file", &["cli.a.*", "cli.b.*"]),
    );
    dir.write(
        "bucket.json",
        &json!({"kind": "kv", "config": {
            "bucket": "cli-test", "history": 3, "max_age": 3_600_000_000_000u64,
            "storage": "file", "num_replicas": 1
        }}),
    );
    dir.write(
        "consumer.json",
        &json!({"kind": "consumer", "stream": "CLI_TEST", "config": {
            "durable_name": "audit", "ack_policy": "explicit", "filter_subject": "cli.a.*",
            "ack_wait": 30_000_000_000u64
        }}),
    );
    let deploy = |action: &'static str, extra: &'static [&'static str]| {
        let url = url.clone();
        let path = dir.path().to_owned();
        async move {
            let mut args = vec!["--server", url.as_str(), "deploy", action, "--dir", &path];
            args.extend_from_slice(extra);
            jetfn(&args).await
        }
    };

    let run = deploy("diff", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    for expected in [
        "stream CLI_TEST: create",
        "kv cli-test: create",
        "consumer CLI_TEST/audit: create",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }
    assert!(
        js.get_stream("CLI_TEST").await.is_err(),
        "diff changes nothing"
    );

    let run = deploy("apply", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("stream CLI_TEST: created"), "{run:?}");
    let mut stream = js.get_stream("CLI_TEST").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.duplicate_window, two_minutes);
    assert_eq!(config.storage, stream::StorageType::File);
    assert!(config.allow_direct);
    assert_eq!(config.discard, stream::DiscardPolicy::New);
    let bucket = js.get_key_value("cli-test").await.unwrap();
    assert_eq!(bucket.status().await.unwrap().history(), 3);
    stream.consumer_info("audit").await.unwrap();

    let run = deploy("apply", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("no changes"), "{run:?}");
    let run = deploy("diff", &[]).await;
    assert!(run.stdout.contains("no changes"), "{run:?}");

    // A stored message, to show that nothing below loses it.
    js.publish("cli.b.one", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();

    dir.write(
        "stream.json",
        &stream_file(Duration::from_secs(60), "file", &["cli.a.*", "cli.b.*"]),
    );
    let run = deploy("diff", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("stream CLI_TEST: duplicate_window 120s -> 60s"),
        "{run:?}"
    );
    assert_eq!(
        run.stdout.lines().filter(|l| l.contains("->")).count(),
        1,
        "only the changed field: {run:?}"
    );
    let run = deploy("apply", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("duplicate_window 120s -> 60s"),
        "{run:?}"
    );
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(60));

    // Removing a subject is destructive: refused without --force, applied with it.
    dir.write(
        "stream.json",
        &stream_file(Duration::from_secs(60), "file", &["cli.a.*"]),
    );
    let run = deploy("apply", &[]).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("subjects") && run.stderr.contains("--force"),
        "{run:?}"
    );
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert_eq!(subjects.len(), 2, "nothing applied: {subjects:?}");
    let run = deploy("apply", &["--force"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert_eq!(subjects, ["cli.a.*"]);

    // A storage change cannot be made in place: refused, even with --force, naming the field.
    dir.write(
        "stream.json",
        &stream_file(Duration::from_secs(60), "memory", &["cli.a.*"]),
    );
    let run = deploy("diff", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("storage file -> memory"), "{run:?}");
    for force in [&[][..], &["--force"][..]] {
        let run = deploy("apply", force).await;
        assert_ne!(run.code, 0, "{force:?}: {run:?}");
        assert!(
            run.stderr.contains("storage") && run.stderr.contains("recreated"),
            "{force:?}: {run:?}"
        );
    }
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.storage, stream::StorageType::File);
    assert_eq!(info.state.messages, 1, "the stream and its data are kept");

    // A limit where there was none is destructive too.
    let mut limited = stream_file(Duration::from_secs(60), "file", &["cli.a.*"]);
    limited["config"]["max_bytes"] = json!(1_000_000);
    dir.write("stream.json", &limited);
    let run = deploy("apply", &[]).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("max_bytes") && run.stderr.contains("unlimited"),
        "{run:?}"
    );

    // Resources without a file are listed, never deleted.
    js.create_stream(stream::Config {
        name: "UNMANAGED".into(),
        subjects: vec!["unmanaged.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::remove_file(dir.0.path().join("consumer.json")).unwrap();
    dir.write(
        "stream.json",
        &stream_file(Duration::from_secs(60), "file", &["cli.a.*"]),
    );
    let run = deploy("apply", &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("no changes"), "{run:?}");
    for expected in [
        "stream UNMANAGED: not managed",
        "consumer CLI_TEST/audit: not managed",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }
    js.get_stream("UNMANAGED").await.unwrap();
    stream.consumer_info("audit").await.unwrap();

    let run = deploy("diff", &["--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let document = run.json();
    assert_eq!(document["applied"], json!(false));
    assert!(
        document["not_managed"]
            .as_array()
            .unwrap()
            .contains(&json!("stream UNMANAGED"))
    );
}

/// Every file is judged against the server before the first change: a later file the server
/// would refuse stops the whole apply, and the error names that file and its resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_applies_nothing_when_a_later_file_would_be_refused() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let js = jetstream::new(nats.connect().await.unwrap());
    let url = nats.url();
    js.create_stream(stream::Config {
        name: "TAKEN".into(),
        subjects: vec!["taken.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = Resources::new();
    dir.write(
        "a-good.json",
        &json!({"kind": "stream", "config": {"name": "GOOD", "subjects": ["good.*"]}}),
    );
    dir.write(
        "b-bucket.json",
        &json!({"kind": "kv", "config": {"bucket": "good-bucket", "history": 2}}),
    );
    let bad_files = [
        (
            json!({"kind": "stream", "config": {"name": "BAD", "subjects": ["taken.x"]}}),
            "stream BAD",
            "overlaps taken.> of stream TAKEN",
        ),
        (
            json!({"kind": "stream", "config": {"name": "BAD", "subjects": ["good.>"]}}),
            "stream BAD",
            "overlaps good.* of stream GOOD (declared by another file)",
        ),
        (
            json!({"kind": "consumer", "stream": "GOOD", "config": {
                "durable_name": "audit", "filter_subject": "elsewhere.*"}}),
            "consumer GOOD/audit",
            "matches none of the subjects of stream GOOD",
        ),
        (
            json!({"kind": "stream", "config": {
                "name": "BAD", "subjects": ["bad.*"], "num_replicas": 3}}),
            "stream BAD",
            "not part of a cluster",
        ),
    ];
    for (document, resource, reason) in bad_files {
        dir.write("c-bad.json", &document);
        let run = jetfn(&["--server", &url, "deploy", "apply", "--dir", dir.path()]).await;
        assert_ne!(run.code, 0, "{document}: {run:?}");
        assert!(
            run.stderr
                .contains(&format!("c-bad.json: {resource}: refused: "))
                && run.stderr.contains(reason)
                && run.stderr.contains("nothing was applied"),
            "{document}: {run:?}"
        );
        assert!(js.get_stream("GOOD").await.is_err(), "{document}: {run:?}");
        assert!(
            js.get_key_value("good-bucket").await.is_err(),
            "{document}: {run:?}"
        );
        // diff shows the same refusal and changes nothing either.
        let run = jetfn(&["--server", &url, "deploy", "diff", "--dir", dir.path()]).await;
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains(reason), "{run:?}");
    }

    std::fs::remove_file(dir.0.path().join("c-bad.json")).unwrap();
    let run = jetfn(&["--server", &url, "deploy", "apply", "--dir", dir.path()]).await;
    assert_eq!(run.code, 0, "{run:?}");
    js.get_stream("GOOD").await.unwrap();
    js.get_key_value("good-bucket").await.unwrap();
}

/// What only the server can judge (here: its disk limit) may still be refused during `apply`:
/// the error then names the file, what was applied before it, and what was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_says_what_was_applied_when_the_server_refuses_a_request() {
    let nats = NatsServer::start_with_config("jetstream { max_file_store: 10MB }", None)
        .await
        .unwrap();
    let js = jetstream::new(nats.connect().await.unwrap());
    let dir = Resources::new();
    dir.write(
        "a-good.json",
        &json!({"kind": "stream", "config": {"name": "GOOD", "subjects": ["good.*"]}}),
    );
    dir.write(
        "b-big.json",
        &json!({"kind": "stream", "config": {
            "name": "BIG", "subjects": ["big.*"], "max_bytes": 1_000_000_000}}),
    );
    dir.write(
        "c-later.json",
        &json!({"kind": "stream", "config": {"name": "LATER", "subjects": ["later.*"]}}),
    );
    let run = jetfn(&[
        "--server",
        &nats.url(),
        "deploy",
        "apply",
        "--dir",
        dir.path(),
    ])
    .await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("b-big.json")
            && run.stderr.contains("Applied before it: stream GOOD.")
            && run
                .stderr
                .contains("Not applied: stream BIG and what follows: stream LATER"),
        "{run:?}"
    );
    js.get_stream("GOOD").await.unwrap();
    assert!(js.get_stream("LATER").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_refuses_unreadable_files_naming_the_file_and_field() {
    let nats = NatsServer::start().await.unwrap();
    let url = nats.url();
    let cases = [
        (
            json!({"kind": "stream", "config": {"name": "T", "duplicate_windw": 5}}),
            "duplicate_windw",
        ),
        (
            json!({"kind": "stream", "config": {"name": "T", "max_age": "5s"}}),
            "nanoseconds",
        ),
        (json!({"kind": "streams", "config": {}}), "kind"),
        (
            json!({"kind": "consumer", "config": {"durable_name": "c"}}),
            "stream",
        ),
        (
            json!({"kind": "kv", "config": {"bucket": "b", "histroy": 2}}),
            "histroy",
        ),
    ];
    for (document, field) in cases {
        let dir = Resources::new();
        std::fs::write(dir.0.path().join("bad.json"), document.to_string()).unwrap();
        let run = jetfn(&["--server", &url, "deploy", "diff", "--dir", dir.path()]).await;
        assert_ne!(run.code, 0, "{document}: {run:?}");
        assert!(
            run.stderr.contains("bad.json") && run.stderr.contains(field),
            "{document}: {run:?}"
        );
    }
    let run = jetfn(&["--server", &url, "deploy", "diff", "--dir", "/no/such/dir"]).await;
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("/no/such/dir"), "{run:?}");
}

/// The files in the repository's `deploy/jetstream` follow the schema, and `jetfn` reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_resource_files_follow_the_schema() {
    let validator = schema_validator();
    for wrong in [
        json!({"kind": "kv", "config": {"bucket": "b", "histroy": 2}}),
        json!({"kind": "stream", "config": {"subjects": ["a.*"]}}),
        json!({"kind": "consumer", "config": {"durable_name": "c"}}),
        json!({"kind": "stream", "stream": "S", "config": {"name": "S"}}),
        json!({"kind": "stream", "config": {"name": "S", "storage": "disk"}}),
    ] {
        assert!(!validator.is_valid(&wrong), "the schema accepts {wrong}");
    }
    let dir = deploy_dir();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.ends_with(".json") || name.ends_with(".schema.json") {
            continue;
        }
        let document: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert_schema_valid(&document);
        files += 1;
    }
    let nats = NatsServer::start().await.unwrap();
    let dir = dir.to_str().unwrap();
    let run = jetfn(&["--server", &nats.url(), "deploy", "diff", "--dir", dir]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout.matches(": create").count(),
        files,
        "every file is a resource to create on an empty server: {run:?}"
    );
}

//! Hostile clients against the functions: requests that try to aim replies (to commands,
//! `$SRV` discovery and control requests) at event or control subjects, resend storms around a rejected command id, floods on one aggregate, oversized
//! trace headers, bursts of atomic batches and malformed protocol bytes. Each test reproduces a defect found in an audit.

use futures::StreamExt;
use futures::future::join_all;
use jetfn::command::ErrorKind;
use jetfn::projection::DeadLetters;
use jetfn::readmodel::ReadModel;
use jetfn::wire::header;
use jetfn_tests::NatsServer;
use jetfn_tests::commands::{
    ACCOUNT_STREAM, account_config, account_config_without_affinity, message_count, send, send_raw,
    send_raw_within, start_account, start_two_accounts, stored_messages,
};
use jetfn_tests::raw::RawConnection;
use jetfn_tests::readmodels::{PROJECTION, ReadSide, live_generation};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_subject_outside_the_inboxes_is_never_answered_and_nothing_is_stored() {
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    send(&client, "victim", "open", json!({"owner": "V"}), None)
        .await
        .unwrap()
        .accepted();
    // The reply would land in the victim's event subject, or start a rebuild.
    for reply in [
        "evt.account.victim",
        "jetfn.projection.account-balances.rebuild",
    ] {
        client
            .publish_with_reply(
                "cmd.account.zz.open",
                reply,
                json!({"owner": "Z"}).to_string().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // A normal command afterwards is served in order behind the hostile ones.
    send(&client, "victim", "deposit", json!({"amount": 5}), None)
        .await
        .unwrap()
        .accepted();
    let victim = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.victim"))
        .await
        .unwrap();
    assert_eq!(victim.len(), 2, "only the victim's own two events");
    assert!(victim.iter().all(|e| !e.header(header::CE_TYPE).is_empty()));
    let zz = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.zz"))
        .await
        .unwrap();
    assert!(zz.is_empty(), "the hostile command was not processed");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_command_id_stays_rejected_under_twenty_concurrent_resends_on_two_instances() {
    let nats = NatsServer::start().await.unwrap();
    // Without affinity (as while instances come and go) both instances take the resends.
    let (first, second) = start_two_accounts(account_config_without_affinity(&nats))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    for round in 0..5 {
        let id = format!("r{round}");
        send(&client, &id, "open", json!({"owner": "R"}), None)
            .await
            .unwrap()
            .accepted();
        let withdraw = json!({"amount": 50});
        let rejected = send(&client, &id, "withdraw", withdraw.clone(), Some("w-1"))
            .await
            .unwrap();
        assert_eq!(rejected.reply.error_kind(), Some(ErrorKind::Rejected));
        let deposit = send(&client, &id, "deposit", json!({"amount": 100}), Some("d-1"));
        let resends =
            (0..20).map(|_| send(&client, &id, "withdraw", withdraw.clone(), Some("w-1")));
        let (deposit, resends) = tokio::join!(deposit, join_all(resends));
        deposit.unwrap().accepted();
        for resend in resends {
            assert_eq!(
                resend.unwrap().body,
                rejected.body,
                "round {round}: first outcome is final"
            );
        }
    }
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_aggregate_does_not_hold_up_commands_for_others() {
    let nats = NatsServer::start().await.unwrap();
    let mut config = account_config(&nats);
    config.command.max_in_flight = 8;
    let function = start_account(config).await.unwrap();
    let client = nats.connect().await.unwrap();
    send(&client, "hot", "open", json!({"owner": "H"}), None)
        .await
        .unwrap()
        .accepted();
    let flooder = client.clone();
    let done = Arc::new(AtomicUsize::new(0));
    let counted = done.clone();
    let flood = tokio::spawn(async move {
        let flood = (0..600).map(|_| async {
            let sent = send(&flooder, "hot", "deposit", json!({"amount": 1}), None).await;
            counted.fetch_add(1, Ordering::SeqCst);
            sent
        });
        join_all(flood).await
    });
    // Sent after the flood, served while most of it still waits for "hot": before, the queued
    // commands held every permit and the idle account came after nearly all of them.
    while done.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let idle = send(&client, "idle", "open", json!({"owner": "I"}), None)
        .await
        .unwrap();
    idle.accepted();
    let before_idle = done.load(Ordering::SeqCst);
    assert!(
        before_idle < 300,
        "{before_idle} of 600 hot commands were served first"
    );
    let replies = flood.await.unwrap();
    let accepted = replies
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.reply.error_kind().is_none()))
        .count();
    assert_eq!(accepted, 600, "the flood itself is served too");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_tracestate_is_invalid_not_retryable() {
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(header::TRACESTATE, "v=".repeat(40_000).as_str());
    let reply = client
        .request_with_headers(
            "cmd.account.t.open",
            headers,
            json!({"owner": "T"}).to_string().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        header::get(reply.headers.as_ref(), header::SERVICE_ERROR_CODE),
        Some("400")
    );
    let stored = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.t"))
        .await
        .unwrap();
    assert!(stored.is_empty());
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_concurrent_multi_event_commands_all_succeed_on_healthy_servers() {
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    let opens = (0..400).map(|n| {
        let body = json!({"owner": "B", "initial_deposit": 10}).to_string();
        let client = client.clone();
        async move { send_raw(&client, &format!("cmd.account.b{n}.open"), body, None).await }
    });
    let replies = join_all(opens).await;
    let failed: Vec<_> = replies
        .iter()
        .filter_map(|r| match r {
            Ok(sent) if sent.reply.error_kind().is_none() => None,
            other => Some(format!("{other:?}")),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let stored = stored_messages(&client, ACCOUNT_STREAM, None)
        .await
        .unwrap();
    assert_eq!(stored.len(), 800, "two events per open, each stored once");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_control_requests_never_answer_outside_the_inboxes() {
    let side = ReadSide::start().await.unwrap();
    let client = &side.client;
    send(client, "victim", "open", json!({"owner": "V"}), None)
        .await
        .unwrap()
        .accepted();
    // Each answer would land in the victim's events, start a rebuild or a dead-letter replay,
    // or file a fake dead letter: every subject one of the two functions may publish to.
    let targets = [
        "evt.account.victim",
        "jetfn.projection.account-balances.rebuild",
        "jetfn.projection.account-balances.dlq.replay",
        "jetfn.dlq.account-balances",
    ];
    let requests = [
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
        "$SRV.PING.account",
        "$SRV.STATS.account-balances",
        "jetfn.projection.account-balances.status",
    ];
    for request in requests {
        for target in targets {
            client
                .publish_with_reply(request, target, "".into())
                .await
                .unwrap();
        }
    }
    client.flush().await.unwrap();
    // Both services still answer an inbox, after the hostile requests were handled in order.
    let answered = jetfn_tests::commands::service_stats(client, "account", 1)
        .await
        .unwrap();
    assert_eq!(answered.len(), 1);
    // An endpoint counts a refusal when it takes the request, which the discovery verbs (another
    // subscription) do not wait for: ask until the status endpoint's count shows them all.
    let projection = jetfn_tests::workload::poll(
        "the refused status requests counted",
        Duration::from_secs(10),
        || async {
            let stats = jetfn_tests::commands::service_stats(client, PROJECTION, 1).await?;
            let refused = stats[0]["endpoints"]
                .as_array()
                .and_then(|e| e.iter().find(|e| e["name"] == "status"))
                .and_then(|e| e["num_errors"].as_u64());
            Ok((refused >= Some(targets.len() as u64)).then_some(stats))
        },
    )
    .await
    .unwrap();
    send(client, "victim", "deposit", json!({"amount": 5}), None)
        .await
        .unwrap()
        .accepted();

    let victim = stored_messages(client, ACCOUNT_STREAM, Some("evt.account.victim"))
        .await
        .unwrap();
    assert_eq!(victim.len(), 2, "only the victim's own two events");
    assert_eq!(
        message_count(client, "JETFN_DLQ").await.unwrap(),
        0,
        "no fake dead letter"
    );
    let endpoints = projection[0]["endpoints"].as_array().unwrap();
    let endpoint = |name: &str| {
        endpoints
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no endpoint {name}: {endpoints:?}"))
    };
    for control in ["rebuild", "dlq-replay"] {
        assert_eq!(
            endpoint(control)["num_requests"],
            0,
            "{control} was never triggered"
        );
    }
    let status = endpoint("status");
    assert_eq!(status["num_requests"], 0);
    assert_eq!(
        status["num_errors"],
        targets.len(),
        "the refused status requests are counted"
    );
    assert_eq!(live_generation(&side.redis).await.unwrap(), 1);
}

/// Requests whose bytes no client library would send: (what the `invalid` reply says, subject,
/// header block).
fn malformed_requests() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let subject = b"cmd.account.mal.deposit".to_vec();
    let block = |line: &[u8]| [b"NATS/1.0\r\n".as_slice(), line, b"\r\n\r\n"].concat();
    vec![
        (
            "a header line is not valid UTF-8",
            subject.clone(),
            block(b"Nats-Msg-Id: m-\xff"),
        ),
        (
            "a bare CR or LF",
            subject.clone(),
            block(b"Nats-Msg-Id: m-\n1"),
        ),
        (
            "a bare CR or LF",
            subject.clone(),
            block(b"Nats-Msg-Id: m-\r1"),
        ),
        (
            "a header line has no colon",
            subject.clone(),
            block(b"no colon here"),
        ),
        (
            "a header name holds",
            subject.clone(),
            block(b"Bad Name: x"),
        ),
        (
            "does not begin with NATS/1.0",
            subject.clone(),
            b"Nats-Msg-Id: m-2\r\n\r\n".to_vec(),
        ),
        (
            "subject is not valid UTF-8",
            b"cmd.account.m\xff.deposit".to_vec(),
            block(b"Nats-Msg-Id: m-3"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_requests_is_answered_invalid_and_leaves_good_commands_served() {
    let nats = NatsServer::start().await.unwrap();
    let function = start_account(account_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();
    send(&client, "good", "open", json!({"owner": "G"}), None)
        .await
        .unwrap()
        .accepted();
    let mut replies = client.subscribe("_INBOX.hostile.>").await.unwrap();
    client.flush().await.unwrap();
    let mut raw = RawConnection::connect(nats.port()).await.unwrap();
    let kinds = malformed_requests();
    const ROUNDS: usize = 40;
    for round in 0..ROUNDS {
        for (n, (_, subject, headers)) in kinds.iter().enumerate() {
            let reply = format!("_INBOX.hostile.{n}.{round}");
            raw.hpub(subject, reply.as_bytes(), headers, br#"{"amount":1}"#)
                .await
                .unwrap();
        }
        raw.ping().await.unwrap();
        // Right behind them, with no retry: served as if nothing had happened.
        send_raw_within(
            &client,
            "cmd.account.good.deposit",
            json!({"amount": 1}).to_string(),
            Some(&format!("good-{round}")),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("good deposit {round}: {e:#}"))
        .accepted();
    }
    // Every malformed request got an `invalid` reply that says what was wrong with it.
    let mut answered = vec![0; kinds.len()];
    for _ in 0..ROUNDS * kinds.len() {
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .unwrap_or_else(|_| panic!("only {answered:?} of the malformed requests answered"))
            .unwrap();
        let kind: usize = reply.subject.split('.').nth(2).unwrap().parse().unwrap();
        let (says, _, _) = &kinds[kind];
        let code = header::get(reply.headers.as_ref(), header::SERVICE_ERROR_CODE);
        let body = String::from_utf8_lossy(&reply.payload);
        assert_eq!(code, Some("400"), "{says}: {body}");
        assert!(
            body.contains("\"invalid\"") && body.contains(says),
            "{says}: {body}"
        );
        answered[kind] += 1;
    }
    assert!(answered.iter().all(|&n| n == ROUNDS), "{answered:?}");
    // Discovery requests with such headers are answered too.
    for round in 0..5 {
        let reply = format!("_INBOX.hostile.ping.{round}");
        raw.hpub(
            b"$SRV.PING.account",
            reply.as_bytes(),
            b"NATS/1.0\r\nX: \xff\r\n\r\n",
            b"",
        )
        .await
        .unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .unwrap_or_else(|_| panic!("PING {round} with a malformed header not answered"))
            .unwrap();
        let pong: serde_json::Value = serde_json::from_slice(&pong.payload).unwrap();
        assert_eq!(pong["name"], "account", "{pong}");
    }
    let good = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.good"))
        .await
        .unwrap();
    assert_eq!(
        good.len(),
        1 + ROUNDS,
        "the open and every good deposit, once"
    );
    let malformed = stored_messages(&client, ACCOUNT_STREAM, Some("evt.account.mal"))
        .await
        .unwrap();
    assert!(malformed.is_empty(), "nothing malformed was stored");
    function.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_event_with_a_malformed_header_is_named_by_commands_and_dead_lettered() {
    let side = ReadSide::start().await.unwrap();
    let client = &side.client;
    send(client, "m1", "open", json!({"owner": "M"}), None)
        .await
        .unwrap()
        .accepted();
    // Someone with publish rights on the event subjects (never a client, see deploy/nats)
    // stores an event whose version header is not UTF-8.
    let mut raw = RawConnection::connect(side.nats.port()).await.unwrap();
    raw.hpub(
        b"evt.account.m1",
        b"_INBOX.hostile.store",
        b"NATS/1.0\r\nce-type: Deposited\r\njetfn-event-version: 1\xff\r\n\r\n",
        br#"{"amount":5}"#,
    )
    .await
    .unwrap();
    raw.ping().await.unwrap();
    jetfn_tests::workload::poll("the event stored", Duration::from_secs(10), || async {
        Ok((message_count(client, ACCOUNT_STREAM).await? == 2).then_some(()))
    })
    .await
    .unwrap();

    // Its aggregate answers at once, naming the event; the connection and other aggregates
    // are unharmed.
    let refused = send(client, "m1", "deposit", json!({"amount": 1}), None)
        .await
        .unwrap();
    assert_eq!(
        refused.reply.error_kind(),
        Some(ErrorKind::Unavailable),
        "{:?}",
        refused.body
    );
    let message = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("sequence 2") && message.contains("not valid UTF-8"),
        "{message}"
    );
    send(client, "m2", "open", json!({"owner": "N"}), None)
        .await
        .unwrap()
        .accepted();
    let last = send(client, "m2", "deposit", json!({"amount": 3}), None)
        .await
        .unwrap()
        .accepted()
        .seq;

    // The projection files it as a dead letter and goes on.
    ReadModel::connect(&side.redis.url(), PROJECTION)
        .await
        .unwrap()
        .wait_for(last, Duration::from_secs(20))
        .await
        .unwrap();
    let letters = DeadLetters::connect(&side.config)
        .await
        .unwrap()
        .list(PROJECTION)
        .await
        .unwrap();
    assert_eq!(
        letters.iter().map(|l| l.seq).collect::<Vec<_>>(),
        [2],
        "{letters:?}"
    );
    assert!(
        letters[0].error.contains("not valid UTF-8"),
        "{}",
        letters[0].error
    );
    side.projection.stop().await.unwrap();
    side.function.stop().await.unwrap();
}

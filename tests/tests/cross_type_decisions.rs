//! Atomic decisions across aggregate *types*, against a real nats-server: the signup example
//! creates a user and claims its unique username in one atomic batch on the stream the two
//! types share.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use jetfn::command::ErrorKind;
use jetfn::command::RunningFunction;
use jetfn::wire::{CommandSubjects, header};
use jetfn_tests::NatsServer;
use jetfn_tests::commands::{
    Sent, account_config, message_count, operator_stream, send_raw, service_stats, stored_messages,
};
use serde_json::json;

/// The stream users and usernames share in these tests.
const USERS: &str = "USERS";

fn users_config(nats: &NatsServer) -> jetfn::Config {
    let mut config = account_config(nats);
    config.stream.name = Some(USERS.into());
    config
}

async fn start_signup(config: jetfn::Config) -> anyhow::Result<RunningFunction> {
    Ok(jetfn::decision_function::<signup::Signup>()
        .with_config(config)
        .start()
        .await?)
}

async fn register(
    client: &async_nats::Client,
    signup: &str,
    user: &str,
    username: &str,
    command_id: &str,
) -> Sent {
    let subject = CommandSubjects::new(None, "signup").subject(signup, "register");
    let body = json!({"user": user, "username": username}).to_string();
    send_raw(client, &subject, body, Some(command_id))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signup_writes_the_user_and_its_username_in_one_append_to_the_shared_stream() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let _signup = start_signup(users_config(&nats)).await.unwrap();
    let client = nats.connect().await.unwrap();

    let sent = register(&client, "s1", "u1", "alice", "c1").await;
    assert_eq!(
        sent.body,
        json!({"ok": true, "id": "s1", "version": 0, "seq": 2,
               "events": ["Registered", "Claimed"],
               "aggregates": [
                   {"aggregate": "user", "id": "u1", "version": 1, "seq": 1,
                    "events": ["Registered"]},
                   {"aggregate": "username", "id": "alice", "version": 1, "seq": 2,
                    "events": ["Claimed"]}]})
    );
    // One stream holds both types, each on its own subjects, and says so.
    let mut stream = jetfn_tests::commands::stream(&client, USERS).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.subjects, ["evt.user.*", "evt.username.*"]);
    assert_eq!(config.metadata["jetfn.aggregate"], "user,username");
    let stored = stored_messages(&client, USERS, None).await.unwrap();
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["evt.user.u1", "evt.username.alice"]);
    assert_eq!(stored[0].header(header::CE_SOURCE), "/jetfn/user");
    assert_eq!(stored[1].header(header::CE_SOURCE), "/jetfn/username");
    assert_eq!(stored[1].payload, json!({"user": "u1"}));

    // A user whose id is its username: the two events' dedupe ids still differ.
    let same = register(&client, "s2", "bob", "bob", "c2").await;
    assert_eq!(same.accepted().seq, 4);
    let stored = stored_messages(&client, USERS, None).await.unwrap();
    assert_eq!(stored[2].header("Nats-Msg-Id"), "user.bob:c2:0");
    assert_eq!(stored[3].header("Nats-Msg-Id"), "username.bob:c2:0");
    assert_eq!(stored[3].header(header::CE_ID), "bob:c2:0");

    // A repeat gets the first reply and stores nothing, on this instance or a fresh one.
    let again = register(&client, "s1", "u1", "alice", "c1").await;
    assert_eq!(again.body, sent.body);
    let fresh = start_signup(users_config(&nats)).await.unwrap();
    for _ in 0..4 {
        let again = register(&client, "s1", "u1", "alice", "c1").await;
        assert_eq!(again.body, sent.body);
    }
    fresh.stop().await.unwrap();
    assert_eq!(message_count(&client, USERS).await.unwrap(), 4);

    // Another user cannot have the name.
    let taken = register(&client, "s3", "u3", "alice", "c3").await;
    assert_eq!(taken.reply.error_kind(), Some(ErrorKind::Rejected));
    assert_eq!(
        taken.body["error"]["code"], "username_taken",
        "{}",
        taken.body
    );
    assert_eq!(message_count(&client, USERS).await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_signups_for_one_username_exactly_one_is_accepted() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    // Two instances, so the racing signups meet in the stream's checks, not only in one
    // instance's lock.
    let instances = [
        start_signup(users_config(&nats)).await.unwrap(),
        start_signup(users_config(&nats)).await.unwrap(),
    ];
    let client = nats.connect().await.unwrap();
    let rounds = 12;
    for round in 0..rounds {
        let name = format!("name-{round}");
        let racers = join_all((0..2).map(|n| {
            let (client, name) = (client.clone(), name.clone());
            async move {
                let user = format!("u-{round}-{n}");
                let id = format!("s-{round}-{n}");
                register(&client, &id, &user, &name, &id).await
            }
        }))
        .await;
        let accepted: Vec<&Sent> = racers
            .iter()
            .filter(|s| s.reply.error_kind().is_none())
            .collect();
        assert_eq!(accepted.len(), 1, "round {round}: {racers:?}");
        let loser = racers
            .iter()
            .find(|s| s.reply.error_kind().is_some())
            .unwrap();
        assert_eq!(
            loser.reply.error_kind(),
            Some(ErrorKind::Rejected),
            "{}",
            loser.body
        );
        assert_eq!(loser.body["error"]["code"], "username_taken");
        let claims = stored_messages(&client, USERS, Some(&format!("evt.username.{name}")))
            .await
            .unwrap();
        assert_eq!(claims.len(), 1, "round {round}: one claim stored");
        let winner = &accepted[0].accepted().aggregates[0].id;
        assert_eq!(claims[0].payload["user"], winner.as_str());
    }
    // Every accepted signup stored its user and its claim; the losers stored nothing.
    assert_eq!(message_count(&client, USERS).await.unwrap(), 2 * rounds);
    // Each type's state cache counts its own lookups: every signup looked up one of each.
    let stats = service_stats(&client, "signup", 2).await.unwrap();
    for aggregate in ["user", "username"] {
        let lookups: u64 = stats
            .iter()
            .map(|s| {
                let cache = &s["endpoints"][0]["data"]["caches"][aggregate];
                cache["hits"].as_u64().unwrap() + cache["misses"].as_u64().unwrap()
            })
            .sum();
        assert!(lookups >= 2 * rounds, "{aggregate}: {lookups} lookups");
    }
    for instance in instances {
        instance.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_type_decision_refuses_to_start_when_its_types_are_in_different_streams() {
    let nats = NatsServer::start().await.unwrap();
    // No stream.name: each type would have its default stream.
    let err = start_signup(account_config(&nats)).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("user in USER_EVENTS")
            && message.contains("username in USERNAME_EVENTS")
            && message.contains("single-stream")
            && message.contains("stream.name"),
        "{message}"
    );
    // One subject prefix for both types is refused too.
    let mut config = users_config(&nats);
    config.stream.subject_prefix = Some("people".into());
    let err = start_signup(config).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("stream.subject_prefix") && message.contains("user, username"),
        "{message}"
    );
    // Nothing was provisioned.
    let client = nats.connect().await.unwrap();
    for stream in [USERS, "USER_EVENTS", "USERNAME_EVENTS"] {
        assert!(
            jetfn_tests::commands::stream(&client, stream)
                .await
                .is_err(),
            "{stream}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_type_decision_refuses_to_start_when_the_shared_stream_does_not_take_a_type() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    // An operator's stream that takes users but not usernames.
    operator_stream(&client, USERS, &["evt.user.*"])
        .await
        .unwrap();
    let mut config = users_config(&nats);
    config.stream.provision = false;
    let err = start_signup(config).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("USERS") && message.contains("does not take evt.username.*"),
        "{message}"
    );
}

//! Aggregate types whose default stream names collide (`a-b` and `a_b` both default to
//! `A_B_EVENTS`) never share a stream: the second to start is refused with a message naming both
//! and the way out. Types configured to share a stream (`stream.name`) do, each on its own
//! subjects, also when provisioned concurrently; a subject prefix is never shared. Real
//! nats-server.

#![allow(clippy::unwrap_used)]

use jetfn::store::{EventStore, StoreError, StoreSettings};
use jetfn::wire::AggregateNames;
use jetfn_tests::NatsServer;

fn store(client: &async_nats::Client, aggregate: &str) -> EventStore {
    store_in(client, aggregate, None, None)
}

/// The store of `aggregate` with `stream.name` and `stream.subject_prefix` as given.
fn store_in(
    client: &async_nats::Client,
    aggregate: &str,
    stream: Option<&str>,
    prefix: Option<&str>,
) -> EventStore {
    let mut config = jetfn::Config::default();
    config.stream.name = stream.map(str::to_owned);
    config.stream.subject_prefix = prefix.map(str::to_owned);
    let names = AggregateNames::new(aggregate, &config).unwrap();
    EventStore::new(
        client.clone(),
        StoreSettings {
            aggregate: aggregate.into(),
            stream: names.stream,
            subject_prefix: names.event_prefix,
            replicas: config.stream.replicas,
            duplicate_window: config.stream.duplicate_window,
            max_bytes: config.stream.max_bytes,
            timeout: config.nats.request_timeout,
            api_prefix: config.nats.jetstream_api(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_whose_default_streams_collide_are_refused_at_start_up() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let hyphen = store(&client, "a-b");
    let underscore = store(&client, "a_b");
    assert_eq!(hyphen.settings().stream, underscore.settings().stream);

    hyphen.provision().await.unwrap();
    hyphen.provision().await.unwrap(); // its own stream again: fine
    let refused = underscore.provision().await.unwrap_err();
    assert!(
        matches!(refused, StoreError::IncompatibleStream { .. }),
        "{refused:?}"
    );
    let message = refused.to_string();
    assert!(
        message.contains("\"a-b\"")
            && message.contains("\"a_b\"")
            && message.contains("stream.name"),
        "{message}"
    );
    // The refused aggregate's subjects were not added to the other's stream.
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("A_B_EVENTS").await.unwrap();
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert_eq!(subjects, ["evt.a-b.*"]);
}

async fn stream_config(
    client: &async_nats::Client,
    name: &str,
) -> async_nats::jetstream::stream::Config {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().config.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_configured_to_share_a_stream_keep_their_own_subjects_and_are_all_listed() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let user = store_in(&client, "user", Some("USERS"), None);
    let username = store_in(&client, "username", Some("USERS"), None);
    user.provision().await.unwrap();
    username.provision().await.unwrap();
    user.provision().await.unwrap(); // again: nothing changes
    let config = stream_config(&client, "USERS").await;
    assert_eq!(config.subjects, ["evt.user.*", "evt.username.*"]);
    assert_eq!(config.metadata["jetfn.aggregate"], "user,username");
    assert_eq!(config.metadata["jetfn.aggregate.user"], "evt.user.*");
    assert_eq!(
        config.metadata["jetfn.aggregate.username"],
        "evt.username.*"
    );

    // A type may also join another's default stream by naming it.
    let account = store(&client, "account");
    let ledger = store_in(&client, "ledger", Some("ACCOUNT_EVENTS"), None);
    account.provision().await.unwrap();
    ledger.provision().await.unwrap();
    let config = stream_config(&client, "ACCOUNT_EVENTS").await;
    assert_eq!(config.metadata["jetfn.aggregate"], "account,ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_types_with_one_subject_prefix_are_refused() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let user = store_in(&client, "user", Some("USERS"), Some("people"));
    let admin = store_in(&client, "admin", Some("USERS"), Some("people"));
    user.provision().await.unwrap();
    let refused = admin.provision().await.unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("\"user\" already stores its events on people.*")
            && message.contains("stream.subject_prefix"),
        "{message}"
    );
    let config = stream_config(&client, "USERS").await;
    assert_eq!(config.metadata["jetfn.aggregate"], "user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_provisioned_concurrently_into_one_stream_all_keep_their_subjects() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let types: Vec<String> = (0..8).map(|n| format!("kind-{n}")).collect();
    // The stream exists, so every store reads, merges and updates at once.
    store_in(&client, "seed", Some("SHARED"), None)
        .provision()
        .await
        .unwrap();
    let stores: Vec<EventStore> = types
        .iter()
        .map(|t| store_in(&client, t, Some("SHARED"), None))
        .collect();
    let provisioned = futures::future::join_all(stores.iter().map(EventStore::provision)).await;
    for outcome in provisioned {
        outcome.unwrap();
    }
    let config = stream_config(&client, "SHARED").await;
    for t in &types {
        let filter = format!("evt.{t}.*");
        assert!(
            config.subjects.contains(&filter),
            "{filter} lost: {:?}",
            config.subjects
        );
        assert_eq!(config.metadata[&format!("jetfn.aggregate.{t}")], filter);
    }
    let owners: Vec<&str> = config.metadata["jetfn.aggregate"].split(',').collect();
    assert_eq!(owners.len(), 9, "{owners:?}");
}

//! Aggregate types whose default stream names collide (`a-b` and `a_b` both default to
//! `A_B_EVENTS`) never share a stream: the second to start is refused with a message naming both
//! and the way out. Real nats-server.

#![allow(clippy::unwrap_used)]

use jetfn::store::{EventStore, StoreError, StoreSettings};
use jetfn::wire::AggregateNames;
use jetfn_tests::NatsServer;

fn store(client: &async_nats::Client, aggregate: &str) -> EventStore {
    let config = jetfn::Config::default();
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

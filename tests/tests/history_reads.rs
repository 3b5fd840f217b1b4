//! Reading an aggregate's history back from any point gives exactly its events, in order, in a
//! stream shared with many other aggregates: through the links jetfn writes (single events and
//! atomic batches), and forward for events published without them. Real nats-server.

#![allow(clippy::unwrap_used)]

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::try_join_all;
use jetfn::store::{Append, EventStore, NewEvent, StoreSettings, StoredEvent};
use jetfn::wire::AggregateNames;
use jetfn::wire::event::{self, EventMeta};
use jetfn_tests::NatsServer;
use std::collections::BTreeMap;

fn store(client: &async_nats::Client) -> EventStore {
    let config = jetfn::Config::default();
    let names = AggregateNames::new("ledger", &config).unwrap();
    EventStore::new(
        client.clone(),
        StoreSettings {
            aggregate: "ledger".into(),
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

fn events(tag: &str, count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|n| NewEvent {
            event_type: format!("Entry{n}"),
            version: 1,
            payload: format!(r#"{{"tag":"{tag}"}}"#).into_bytes(),
        })
        .collect()
}

/// Appends `count` events after `expected` (sequence, version).
async fn append(
    store: &EventStore,
    id: &str,
    expected: (u64, u64),
    command_id: &str,
    count: usize,
) -> u64 {
    let events = events(command_id, count);
    store
        .append(Append {
            aggregate_id: id,
            expected_last_seq: expected.0,
            expected_version: expected.1,
            command_id,
            command: "post",
            events: &events,
            fingerprint: None,
            trace: None,
        })
        .await
        .unwrap()
}

/// `count` one-event commands on fresh aggregates, so the next command of the aggregate under
/// test lands far from its previous one.
async fn noise(store: &EventStore, round: usize, count: usize) {
    let ids: Vec<String> = (0..count).map(|k| format!("noise-{round}-{k}")).collect();
    for chunk in ids.chunks(64) {
        try_join_all(chunk.iter().map(|id| async move {
            let events = events(id, 1);
            store
                .append(Append {
                    aggregate_id: id,
                    expected_last_seq: 0,
                    expected_version: 0,
                    command_id: id,
                    command: "post",
                    events: &events,
                    fingerprint: None,
                    trace: None,
                })
                .await
        }))
        .await
        .unwrap();
    }
}

fn summary(events: &[StoredEvent]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .map(|e| {
            let command = e.command_id.clone().unwrap_or_default();
            (e.seq, e.event_type.clone(), command)
        })
        .collect()
}

/// Reads `id` after every boundary and compares with the full history.
async fn check_reads_from_every_boundary(store: &EventStore, id: &str, boundaries: &[u64]) {
    let all = store.read_after(id, 0).await.unwrap();
    for &after in boundaries {
        let read = store.read_after(id, after).await.unwrap();
        let expected: Vec<_> = all.iter().filter(|e| e.seq > after).cloned().collect();
        assert_eq!(
            summary(&read),
            summary(&expected),
            "{id} read after {after}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_spread_through_a_busy_stream_reads_back_exactly_from_any_point() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let store = store(&client);
    store.provision().await.unwrap();

    // Commands of one, then three events (an atomic batch), 300 other aggregates' events apart.
    let mut boundaries = vec![0];
    let mut written = Vec::new();
    for round in 0..6 {
        let count = if round % 2 == 0 { 1 } else { 3 };
        let command_id = format!("c{round}");
        let last = *boundaries.last().unwrap();
        let version = written.len() as u64;
        let seq = append(&store, "target", (last, version), &command_id, count).await;
        written.extend((0..count).map(|n| (format!("Entry{n}"), command_id.clone())));
        boundaries.push(seq);
        noise(&store, round, 300).await;
    }
    let history = store.read_after("target", 0).await.unwrap();
    let read: Vec<_> = history
        .iter()
        .map(|e| {
            (
                e.event_type.clone(),
                e.command_id.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(read, written);
    check_reads_from_every_boundary(&store, "target", &boundaries).await;
    assert!(
        store
            .read_after("target", *boundaries.last().unwrap())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_without_links_are_read_all_the_same() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let store = store(&client);
    store.provision().await.unwrap();
    let js = jetstream::new(client.clone());

    // Another tool's events (no links) first, then jetfn's, all far apart.
    let mut boundaries = vec![0];
    for round in 0..3 {
        let command_id = format!("legacy-{round}");
        let meta = EventMeta {
            source: "/jetfn/ledger",
            aggregate_id: "target",
            command_id: &command_id,
            command: "post",
            fingerprint: None,
            trace: None,
            time: "2026-01-01T00:00:00Z",
            previous: None,
        };
        let headers = event::headers(&meta, 0, "Entry0", 1);
        let ack = js
            .send_publish(
                store.subject("target"),
                PublishMessage::build()
                    .headers(headers)
                    .payload(Bytes::from_static(b"{}")),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        boundaries.push(ack.sequence);
        noise(&store, round, 300).await;
    }
    for round in 3..5u64 {
        let last = *boundaries.last().unwrap();
        let version = 3 + (round - 3) * 2;
        let seq = append(&store, "target", (last, version), &format!("c{round}"), 2).await;
        boundaries.push(seq);
        noise(&store, round as usize, 300).await;
    }
    assert_eq!(
        store.read_after("target", 0).await.unwrap().len(),
        3 + 2 * 2
    );
    check_reads_from_every_boundary(&store, "target", &boundaries).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_aggregate_batches_read_back_exactly_for_each_aggregate_from_any_point() {
    let nats = NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let store = store(&client);
    store.provision().await.unwrap();

    // Atomic decisions over "left" and "right" (two and one, then one and three events per
    // aggregate in one batch), 300 other aggregates' events apart.
    let mut boundaries = BTreeMap::from([("left", vec![0]), ("right", vec![0])]);
    let mut versions = BTreeMap::from([("left", 0u64), ("right", 0u64)]);
    for round in 0..6 {
        let (left_count, right_count) = if round % 2 == 0 { (2, 1) } else { (1, 3) };
        let command_id = format!("d{round}");
        let (left_events, right_events) = (
            events(&command_id, left_count),
            events(&command_id, right_count),
        );
        let appends =
            [("left", &left_events), ("right", &right_events)].map(|(id, events)| Append {
                aggregate_id: id,
                expected_last_seq: *boundaries[id].last().unwrap(),
                expected_version: versions[id],
                command_id: &command_id,
                command: "decide",
                events,
                fingerprint: None,
                trace: None,
            });
        let last = store.append_all(&appends).await.unwrap();
        *versions.get_mut("left").unwrap() += left_count as u64;
        *versions.get_mut("right").unwrap() += right_count as u64;
        boundaries.get_mut("right").unwrap().push(last);
        boundaries
            .get_mut("left")
            .unwrap()
            .push(last - right_count as u64);
        noise(&store, round, 300).await;
    }
    for (id, boundaries) in &boundaries {
        let history = store.read_after(id, 0).await.unwrap();
        assert_eq!(history.len(), if *id == "left" { 9 } else { 12 }, "{id}");
        check_reads_from_every_boundary(&store, id, boundaries).await;
    }
}

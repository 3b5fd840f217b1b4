//! How much an all-or-nothing command costs, measured on a private nats-server (file storage).
//!
//! Compares, for one command, sequentially and with optimistic concurrency:
//! * one event as one message (what jetfn does for one-event commands);
//! * three events as an ADR-50 atomic batch (what jetfn does for multi-event commands);
//! * three events in one envelope message (the alternative jetfn did not choose).
//!
//! It then times the load of the 2000-event aggregate by direct get batch.
//!
//! Run with `just bench` (`cargo bench -p jetfn-tests --bench append`). Results are reported,
//! never asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::HeaderMap;
use jetfn::store::{Append, EventStore, NewEvent, StoreSettings};
use jetfn_tests::NatsServer;
use std::time::{Duration, Instant};

const COMMANDS: usize = 2000;

fn event(kind: &str) -> NewEvent {
    NewEvent {
        event_type: kind.to_owned(),
        version: 1,
        payload: br#"{"amount":100}"#.to_vec(),
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    let total: Duration = samples.iter().sum();
    println!(
        "{name:<44} median {:>8.3} ms   p99 {:>8.3} ms   {:>8.0} commands/s",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.len() as f64 / total.as_secs_f64()
    );
}

async fn store(nats: &NatsServer, name: &str) -> EventStore {
    let store = EventStore::new(
        nats.connect().await.unwrap(),
        StoreSettings {
            aggregate: name.to_lowercase(),
            stream: name.to_owned(),
            subject_prefix: format!("bench.{}", name.to_lowercase()),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_bytes: None,
            timeout: Duration::from_secs(5),
            api_prefix: jetfn::wire::names::JETSTREAM_API.into(),
        },
    );
    store.provision().await.unwrap();
    store
}

async fn appends(store: &EventStore, events: &[NewEvent]) -> Vec<Duration> {
    let mut last_seq = 0;
    let mut samples = Vec::with_capacity(COMMANDS);
    for n in 0..COMMANDS {
        let command_id = format!("c{n}");
        let started = Instant::now();
        last_seq = store
            .append(Append {
                aggregate_id: "a1",
                expected_last_seq: last_seq,
                expected_version: (n * events.len()) as u64,
                command_id: &command_id,
                command: "bench",
                events,
                fingerprint: None,
                trace: None,
            })
            .await
            .unwrap();
        samples.push(started.elapsed());
    }
    samples
}

async fn envelopes(nats: &NatsServer, store: &EventStore) -> Vec<Duration> {
    let client = nats.connect().await.unwrap();
    let body = br#"[{"type":"A","data":{"amount":100}},{"type":"B","data":{"amount":100}},{"type":"C","data":{"amount":100}}]"#;
    let subject = store.subject("a1");
    let mut last_seq = 0u64;
    let mut samples = Vec::with_capacity(COMMANDS);
    for n in 0..COMMANDS {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("e{n}").as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last_seq.to_string().as_str(),
        );
        let started = Instant::now();
        let reply = client
            .request_with_headers(subject.clone(), headers, body.as_slice().into())
            .await
            .unwrap();
        samples.push(started.elapsed());
        let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        last_seq = ack["seq"].as_u64().expect("an ack");
    }
    samples
}

#[tokio::main]
async fn main() {
    let nats = NatsServer::start().await.unwrap();
    println!(
        "nats-server {} (file storage), {COMMANDS} sequential commands per row\n",
        nats.connect().await.unwrap().server_info().version
    );

    let single = store(&nats, "SINGLE").await;
    report(
        "1 event, 1 message (jetfn)",
        appends(&single, &[event("A")]).await,
    );

    let batch = store(&nats, "BATCH").await;
    let three = [event("A"), event("B"), event("C")];
    report(
        "3 events, atomic batch (jetfn)",
        appends(&batch, &three).await,
    );

    let envelope = store(&nats, "ENVELOPE").await;
    report(
        "3 events, 1 envelope message (not chosen)",
        envelopes(&nats, &envelope).await,
    );

    let mut loads = Vec::new();
    let mut events = 0;
    for _ in 0..50 {
        let started = Instant::now();
        events = single.load("a1").await.unwrap().events.len();
        loads.push(started.elapsed());
    }
    loads.sort();
    let median = loads[loads.len() / 2];
    println!(
        "\nload of a {events}-event aggregate by direct get batch: median {:.3} ms ({:.0} events/s)",
        median.as_secs_f64() * 1e3,
        events as f64 / median.as_secs_f64()
    );
}

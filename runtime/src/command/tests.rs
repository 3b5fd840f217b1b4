//! The command loop on the in-memory log: conflicts, exhausted retries, lost acks, outages, the
//! state cache and snapshots, each reached on purpose rather than by hoping for a race.

use super::memory::{Fault, MemoryLedger, MemoryLog, MemorySnapshots};
use super::*;
use crate::Rejection;
use crate::config::CommandConfig;
use crate::telemetry::TraceContext;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    value: u64,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Add { by: u64 },
    AddTwice { by: u64 },
    Take { by: u64 },
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
enum Event {
    Added { by: u64 },
    Taken { by: u64 },
}

impl Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Command = Command;
    type Event = Event;

    fn decide(&self, command: Command) -> Result<Vec<Event>, Rejection> {
        match command {
            Command::Add { by: 0 } => Ok(vec![]),
            Command::Add { by } => Ok(vec![Event::Added { by }]),
            Command::AddTwice { by } => Ok(vec![Event::Added { by }, Event::Added { by }]),
            Command::Take { by } if by > self.value => {
                Err(Rejection::new(format!("only {} left", self.value)).with_code("too_little"))
            }
            Command::Take { by } => Ok(vec![Event::Taken { by }]),
        }
    }

    fn evolve(self, event: &Event) -> Self {
        match event {
            Event::Added { by } => Counter {
                value: self.value + by,
            },
            Event::Taken { by } => Counter {
                value: self.value - by,
            },
        }
    }

    fn snapshots() -> Option<Snapshots<Self>> {
        Some(Snapshots::serde(1))
    }
}

struct Rig {
    log: Arc<MemoryLog>,
    ledger: Arc<MemoryLedger>,
    snapshots: Arc<MemorySnapshots>,
    handler: Handler<Counter>,
    writer: tokio::task::JoinHandle<()>,
}

fn config() -> CommandConfig {
    CommandConfig {
        max_retries: 5,
        retry_backoff: Duration::ZERO,
        max_retry_backoff: Duration::ZERO,
        snapshot_every: 3,
        ..CommandConfig::default()
    }
}

impl Rig {
    fn new() -> Rig {
        Rig::over(Arc::default(), Arc::default(), Arc::default(), config())
    }

    /// Another instance over the same log, ledger and snapshots.
    fn another(&self) -> Rig {
        Rig::over(
            self.log.clone(),
            self.ledger.clone(),
            self.snapshots.clone(),
            config(),
        )
    }

    fn over(
        log: Arc<MemoryLog>,
        ledger: Arc<MemoryLedger>,
        snapshots: Arc<MemorySnapshots>,
        config: CommandConfig,
    ) -> Rig {
        let setup = SnapshotSetup {
            store: snapshots.clone() as Arc<dyn SnapshotStore>,
            codec: Snapshots::serde(1),
            format: snapshots::format_of::<Counter>(1, &Upcasters::default()),
        };
        let (handler, writer) = Handler::new(
            log.clone(),
            ledger.clone(),
            Some(setup),
            Upcasters::default(),
            CommandSubjects::new(None, "counter"),
            config,
            Duration::from_secs(3600),
        );
        Rig {
            log,
            ledger,
            snapshots,
            handler,
            writer,
        }
    }

    async fn send(&self, command: &str, body: serde_json::Value, command_id: &str) -> (Reply, u32) {
        let request = CommandRequest {
            id: "c1".into(),
            command: command.into(),
            command_id: command_id.into(),
            fingerprint: request::fingerprint(command, &body),
            body,
            trace: TraceContext::new_root(),
        };
        let decoded = self.handler.decode(&request).unwrap();
        self.handler.execute(&request, decoded).await
    }

    /// Stops the handler and waits for its background writes.
    async fn finish(self) -> (Arc<MemoryLog>, Arc<MemoryLedger>, Arc<MemorySnapshots>) {
        drop(self.handler);
        self.writer.await.unwrap();
        (self.log, self.ledger, self.snapshots)
    }
}

fn add(by: u64) -> serde_json::Value {
    serde_json::json!({ "by": by })
}

fn accepted_version(reply: &Reply) -> u64 {
    match reply {
        Reply::Accepted(accepted) => accepted.version,
        Reply::Failed(failure) => panic!("expected success, got {failure:?}"),
    }
}

#[tokio::test]
async fn a_conflict_catches_up_and_decides_again_on_the_new_state() {
    let rig = Rig::new();
    rig.send("add", add(1), "first").await;
    rig.log.inject(Fault::Rival("Added"));
    let (reply, retries) = rig.send("add", add(5), "second").await;
    assert_eq!(retries, 1);
    assert_eq!(
        accepted_version(&reply),
        3,
        "first, the rival's event, then ours"
    );
    assert_eq!(rig.log.events("c1").len(), 3);
}

#[tokio::test]
async fn conflicts_until_the_retries_run_out_reply_conflict_and_store_nothing() {
    let rig = Rig::new();
    for _ in 0..=config().max_retries {
        rig.log.inject(Fault::Rival("Added"));
    }
    let (reply, retries) = rig.send("add", add(5), "c").await;
    assert_eq!(reply.error_kind(), Some(ErrorKind::Conflict));
    assert_eq!(retries, config().max_retries);
    let ours = rig
        .log
        .events("c1")
        .iter()
        .filter(|e| e.command_id.is_some())
        .count();
    assert_eq!(ours, 0);
}

#[tokio::test]
async fn a_lost_ack_is_followed_by_a_retry_that_finds_its_own_events_and_appends_nothing() {
    let rig = Rig::new();
    rig.log.inject(Fault::LostAck);
    let (reply, retries) = rig.send("add_twice", add(2), "c").await;
    assert_eq!(accepted_version(&reply), 2);
    assert_eq!(retries, 1);
    assert_eq!(rig.log.events("c1").len(), 2, "stored once");
    let Reply::Accepted(accepted) = reply else {
        unreachable!()
    };
    assert_eq!(accepted.events, ["Added", "Added"]);
    assert_eq!(accepted.seq, 2);
}

#[tokio::test]
async fn an_outage_in_the_middle_of_a_batch_stores_nothing_and_a_resend_applies_once() {
    let rig = Rig::new();
    rig.log.inject(Fault::Unavailable);
    let (reply, _) = rig.send("add_twice", add(2), "c").await;
    assert_eq!(reply.error_kind(), Some(ErrorKind::Unavailable));
    assert!(rig.log.events("c1").is_empty());
    let (reply, _) = rig.send("add_twice", add(2), "c").await;
    assert_eq!(accepted_version(&reply), 2);
    let (again, _) = rig.send("add_twice", add(2), "c").await;
    assert_eq!(again, reply);
    assert_eq!(rig.log.events("c1").len(), 2);
}

#[tokio::test]
async fn a_slow_store_delays_the_reply_but_changes_nothing_else() {
    let rig = Rig::new();
    rig.log.inject(Fault::Slow(Duration::from_millis(5)));
    let (reply, retries) = rig.send("add", add(1), "c").await;
    assert_eq!((accepted_version(&reply), retries), (1, 0));
}

#[tokio::test]
async fn a_cached_aggregate_decides_without_reading_the_log_again() {
    let rig = Rig::new();
    for n in 0..5 {
        rig.send("add", add(1), &format!("c{n}")).await;
    }
    assert_eq!(
        rig.log.reads.load(Ordering::Relaxed),
        1,
        "only the first command loads"
    );
    assert_eq!(rig.log.appends.load(Ordering::Relaxed), 5);
    assert_eq!(rig.handler.cache.hits.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_rejection_is_never_decided_on_a_stale_cached_state() {
    let a = Rig::new();
    let b = a.another();
    a.send("add", add(1), "d1").await;
    b.send("add", add(1), "d2").await; // b caches the aggregate at 2
    a.send("add", add(10), "d3").await; // b does not know
    let (reply, _) = b.send("take", add(5), "w1").await;
    assert_eq!(
        accepted_version(&reply),
        4,
        "decided on the current balance of 12"
    );
}

#[tokio::test]
async fn a_rejection_carries_its_code_and_stays_the_answer_after_the_state_changes() {
    let rig = Rig::new();
    let (first, _) = rig.send("take", add(5), "w1").await;
    let Reply::Failed(failure) = &first else {
        panic!("{first:?}")
    };
    assert_eq!(failure.code.as_deref(), Some("too_little"));
    rig.send("add", add(10), "d1").await;
    let (again, _) = rig.send("take", add(5), "w1").await;
    assert_eq!(again, first);
    let other = rig.another();
    let (elsewhere, _) = other.send("take", add(5), "w1").await;
    assert_eq!(elsewhere, first, "another instance answers from the ledger");
}

#[tokio::test]
async fn a_resent_command_id_gets_the_first_reply_from_any_instance_and_appends_nothing() {
    let rig = Rig::new();
    let (first, _) = rig.send("add", add(3), "c").await;
    let (again, _) = rig.send("add", add(3), "c").await;
    assert_eq!(again, first);
    let (log, ledger, snapshots) = rig.finish().await;
    assert_eq!(
        ledger.len(),
        0,
        "no entry until a snapshot covers it: its event answers"
    );
    let other = Rig::over(log, ledger, snapshots, config());
    let (elsewhere, _) = other.send("add", add(3), "c").await;
    assert_eq!(elsewhere, first);
    let (reused, _) = other.send("add", add(4), "c").await;
    assert_eq!(reused.error_kind(), Some(ErrorKind::Invalid));
    assert_eq!(other.log.appends.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_command_whose_ledger_entry_was_never_written_is_recognised_by_its_events() {
    let rig = Rig::new();
    let (first, _) = rig.send("add", add(3), "c").await;
    // A crash between the reply and the ledger write: the other instance finds no entry.
    let other = Rig::over(rig.log.clone(), Arc::default(), Arc::default(), config());
    let (elsewhere, _) = other.send("add", add(3), "c").await;
    assert_eq!(elsewhere, first);
    assert_eq!(other.log.events("c1").len(), 1);
}

#[tokio::test]
async fn snapshots_are_written_every_n_events_and_cold_loads_read_only_the_tail() {
    let rig = Rig::new();
    for n in 0..4 {
        rig.send("add", add(1), &format!("c{n}")).await;
    }
    let (log, ledger, snapshots) = rig.finish().await;
    let record = snapshots
        .records
        .lock()
        .unwrap()
        .get("c1")
        .cloned()
        .unwrap();
    assert_eq!((record.seq, record.version), (3, 3));
    let cold = Rig::over(log, ledger, snapshots, config());
    let (reply, _) = cold.send("take", add(4), "w").await;
    assert_eq!(
        accepted_version(&reply),
        5,
        "balance 4 from snapshot (3) + tail (1)"
    );
}

#[tokio::test]
async fn a_resend_after_a_snapshot_moved_past_its_events_gets_the_first_reply() {
    let rig = Rig::new();
    let (first, _) = rig.send("add", add(1), "early").await;
    for n in 0..4 {
        rig.send("add", add(1), &format!("c{n}")).await;
    }
    let (log, ledger, snapshots) = rig.finish().await;
    let cold = Rig::over(log, ledger, snapshots, config());
    let (again, _) = cold.send("add", add(1), "early").await;
    assert_eq!(again, first);
}

#[tokio::test]
async fn a_snapshot_first_records_every_command_it_covers_from_any_instance() {
    let a = Rig::new();
    let b = a.another();
    a.send("add", add(1), "c0").await;
    let (from_b, _) = b.send("add", add(1), "c1").await;
    // a catches up with b's command on the conflict, then snapshots at version 3.
    a.send("add", add(1), "c2").await;
    drop(b);
    let (log, ledger, snapshots) = a.finish().await;
    assert_eq!(ledger.len(), 3, "c0, c1 (from the other instance) and c2");
    let record = snapshots
        .records
        .lock()
        .unwrap()
        .get("c1")
        .cloned()
        .unwrap();
    assert_eq!(record.version, 3);
    let cold = Rig::over(log, ledger, snapshots, config());
    let (again, _) = cold.send("add", add(1), "c1").await;
    assert_eq!(
        again, from_b,
        "answered from the ledger: the snapshot hides its event"
    );
    assert_eq!(cold.log.events("c1").len(), 3, "nothing appended again");
}

#[tokio::test]
async fn a_snapshot_waits_for_the_ledger_and_the_next_one_records_what_was_missed() {
    let rig = Rig::new();
    // Every attempt at the first snapshot's three entries fails (5 attempts each).
    rig.ledger.failing_puts.store(15, Ordering::Relaxed);
    for n in 0..6 {
        rig.send("add", add(1), &format!("c{n}")).await;
    }
    let (log, ledger, snapshots) = rig.finish().await;
    assert_eq!(ledger.failing_puts.load(Ordering::Relaxed), 0);
    assert_eq!(
        ledger.len(),
        6,
        "the second snapshot wrote the first one's entries too"
    );
    let record = snapshots
        .records
        .lock()
        .unwrap()
        .get("c1")
        .cloned()
        .unwrap();
    assert_eq!(record.version, 6, "the first snapshot was never stored");
    let cold = Rig::over(log, ledger, snapshots, config());
    let (again, _) = cold.send("add", add(1), "c0").await;
    assert_eq!(accepted_version(&again), 1, "c0's first reply");
}

#[tokio::test]
async fn a_snapshot_of_another_format_is_ignored() {
    let rig = Rig::new();
    for n in 0..3 {
        rig.send("add", add(1), &format!("c{n}")).await;
    }
    let (log, ledger, snapshots) = rig.finish().await;
    snapshots
        .records
        .lock()
        .unwrap()
        .values_mut()
        .for_each(|r| {
            r.format = "v0;events:;upcasters:".into();
            r.state = serde_json::json!({ "value": 1000 });
        });
    let cold = Rig::over(log, ledger, snapshots, config());
    let (reply, _) = cold.send("take", add(4), "w").await;
    let Reply::Failed(failure) = reply else {
        panic!("a misread snapshot would allow this")
    };
    assert_eq!(failure.message, "only 3 left");
}

#[tokio::test]
async fn a_command_deciding_nothing_is_checked_against_the_current_state_and_remembered() {
    let rig = Rig::new();
    let (reply, _) = rig.send("add", add(0), "noop").await;
    assert_eq!(accepted_version(&reply), 0);
    assert_eq!(
        rig.ledger.len(),
        1,
        "recorded before the reply: it leaves no event"
    );
}

#[tokio::test]
async fn too_many_commands_waiting_for_one_aggregate_are_turned_away() {
    let rig = Rig::over(
        Arc::default(),
        Arc::default(),
        Arc::default(),
        CommandConfig {
            max_queued_per_aggregate: 1,
            ..config()
        },
    );
    let _held = rig.handler.cache.slot("c1").unwrap();
    let (reply, _) = rig.send("add", add(1), "c").await;
    assert_eq!(reply.error_kind(), Some(ErrorKind::Unavailable));
}

#[tokio::test]
async fn a_command_found_on_folded_events_gets_exactly_its_first_reply() {
    let rig = Rig::new();
    let (first, _) = rig.send("add_twice", add(1), "first").await;
    rig.send("add", add(1), "second").await;
    // No ledger: the cold instance knows the commands only from their events.
    let cold = Rig::over(rig.log.clone(), Arc::default(), Arc::default(), config());
    let (again, _) = cold.send("add_twice", add(1), "first").await;
    assert_eq!(again, first);
}

#[test]
fn the_periodic_summary_counts_what_was_served_since_the_last_one_and_skips_idle_periods() {
    let counters = Counters::default();
    let mut summary = Summary::new(counters.to_json());
    assert_eq!(
        summary.since(counters.to_json()),
        None,
        "nothing served yet"
    );
    let accepted = Reply::Accepted(crate::command::Accepted {
        id: "a".into(),
        version: 1,
        seq: 1,
        events: vec!["Added".into()],
        aggregates: Vec::new(),
    });
    counters.count(&accepted, 2);
    counters.count(&accepted, 0);
    counters.count(&Reply::failed(ErrorKind::Rejected, "no"), 0);
    assert_eq!(
        summary.since(counters.to_json()),
        Some([2, 0, 1, 0, 0, 2]),
        "accepted, invalid, rejected, conflict, unavailable, retries"
    );
    assert_eq!(
        summary.since(counters.to_json()),
        None,
        "an idle period logs nothing"
    );
    counters.count(&Reply::failed(ErrorKind::Unavailable, "down"), 1);
    assert_eq!(summary.since(counters.to_json()), Some([0, 0, 0, 0, 1, 1]));
}

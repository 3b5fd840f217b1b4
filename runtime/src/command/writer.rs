//! Writes that need not hold up a reply: snapshots, with the ledger entries of the accepted
//! commands they cover.
//!
//! Why an accepted command's ledger entry may wait for the snapshot that covers it: until then,
//! the command is recognised by its stored events, which carry its id. A resend that reaches
//! any instance reads the ledger, finds nothing, and loads or catches up the aggregate; the
//! events with that id are in what it reads, so it answers with the first reply. Only a
//! snapshot could hide those events from a cold load, so a snapshot is written only after every
//! ledger entry queued before it is stored. If the process dies first, the events still answer,
//! because no snapshot past them was written either.
//!
//! Jobs run in the order they were queued. Ledger writes are pipelined (many in flight); a
//! snapshot waits for all of them first, and once stored it tells the cache entry (`ledgered`)
//! that the commands it covers may be forgotten there.

use super::ledger::{CommandLedger, Entry};
use super::snapshots::{SnapshotRecord, SnapshotStore};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// A write queued for after the reply.
pub(crate) enum Job {
    /// Record an accepted command's first reply.
    Ledger {
        id: String,
        command_id: String,
        entry: Entry,
    },
    /// Store a snapshot, then raise `ledgered` to its version.
    Snapshot {
        id: String,
        record: SnapshotRecord,
        ledgered: Arc<AtomicU64>,
    },
}

/// The queue of background writes.
#[derive(Clone)]
pub(crate) struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
}

/// How often a failed ledger write is tried again before giving up (the events still answer).
const LEDGER_ATTEMPTS: u32 = 5;

impl Writer {
    /// Starts the writer task; it ends when every [`Writer`] is dropped and the queue is done.
    pub fn start(
        ledger: Arc<dyn CommandLedger>,
        snapshots: Option<Arc<dyn SnapshotStore>>,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (jobs, queue) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(queue, ledger, snapshots));
        (Writer { jobs }, task)
    }

    /// Queues a job; `false` when the writer has stopped.
    pub fn queue(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

async fn run(
    mut queue: mpsc::UnboundedReceiver<Job>,
    ledger: Arc<dyn CommandLedger>,
    snapshots: Option<Arc<dyn SnapshotStore>>,
) {
    let mut jobs = Vec::with_capacity(256);
    while queue.recv_many(&mut jobs, 256).await > 0 {
        let mut writes = FuturesUnordered::new();
        let mut failed = false;
        for job in jobs.drain(..) {
            match job {
                Job::Ledger {
                    id,
                    command_id,
                    entry,
                } => {
                    let ledger = ledger.clone();
                    writes.push(async move { record(&*ledger, &id, &command_id, &entry).await });
                }
                Job::Snapshot {
                    id,
                    record,
                    ledgered,
                } => {
                    while let Some(ok) = writes.next().await {
                        failed |= !ok;
                    }
                    // A snapshot past an unrecorded command could hide its events. The next
                    // snapshot of the aggregate writes all its unconfirmed entries again.
                    if std::mem::take(&mut failed) {
                        tracing::warn!(id, "snapshot skipped: a ledger write before it failed");
                        continue;
                    }
                    let Some(store) = &snapshots else { continue };
                    match store.put(&id, &record).await {
                        Ok(()) => {
                            ledgered.fetch_max(record.version, Ordering::Relaxed);
                        }
                        Err(err) => tracing::warn!(id, error = %err, "snapshot not written"),
                    }
                }
            }
        }
        while writes.next().await.is_some() {}
    }
}

async fn record(ledger: &dyn CommandLedger, id: &str, command_id: &str, entry: &Entry) -> bool {
    for attempt in 1..=LEDGER_ATTEMPTS {
        match ledger.put(id, command_id, entry).await {
            Ok(()) => return true,
            Err(err) if attempt == LEDGER_ATTEMPTS => {
                // The command's events still identify it; only snapshots must wait.
                tracing::warn!(id, command_id, error = %err, "reply not recorded in the ledger");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await,
        }
    }
    false
}

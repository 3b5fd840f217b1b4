//! In-memory stand-ins for the event log and the ledger, for deterministic tests of the command
//! loop. Faults are queued and hit the next appends in order: a rival's write just before ours
//! (a conflict), a stored append whose ack is lost, an outage, a slow store.

use super::ledger::{CommandLedger, Entry};
use super::snapshots::{SnapshotRecord, SnapshotStore};
use crate::store::{Append, AppendError, EventLog, StoreError, StoredEvent};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to an append.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// Another writer appends this event type (payload `{"by":1}`) to the same aggregate first.
    Rival(&'static str),
    /// The events are stored, but the acknowledgement never arrives.
    LostAck,
    /// The store cannot be reached; nothing is stored.
    Unavailable,
    /// The append takes this long, then succeeds.
    Slow(Duration),
}

#[derive(Default)]
struct Log {
    /// (subject key: `<type>.<id>`, or the id for the untyped log; event) in stream order.
    events: Vec<(String, StoredEvent)>,
    faults: VecDeque<Fault>,
}

/// An event stream in memory with literal-subject OCC, like JetStream's. [`MemoryLog::of_type`]
/// gives views of the same stream for other aggregate types, as types sharing a stream have.
#[derive(Default)]
pub(crate) struct MemoryLog {
    log: Arc<Mutex<Log>>,
    /// The aggregate type of this view ("" for the untyped log).
    kind: String,
    pub appends: AtomicU32,
    pub reads: AtomicU32,
}

impl MemoryLog {
    /// A view of the same stream for aggregate type `kind`.
    pub fn of_type(&self, kind: &str) -> MemoryLog {
        MemoryLog {
            log: self.log.clone(),
            kind: kind.to_owned(),
            ..MemoryLog::default()
        }
    }

    /// Where aggregate `id` of this view's type is stored.
    fn key(&self, id: &str) -> String {
        if self.kind.is_empty() {
            id.to_owned()
        } else {
            format!("{}.{id}", self.kind)
        }
    }

    /// Appends several aggregates' events (each with its key), all or nothing, with
    /// literal-subject OCC.
    async fn append_keyed(&self, appends: &[(String, Append<'_>)]) -> Result<u64, AppendError> {
        self.appends.fetch_add(1, Ordering::Relaxed);
        let fault = self.lock().faults.pop_front();
        match &fault {
            Some(Fault::Slow(delay)) => tokio::time::sleep(*delay).await,
            Some(Fault::Unavailable) => {
                return Err(AppendError::Unavailable(
                    "store unreachable (injected)".into(),
                ));
            }
            Some(Fault::Rival(event_type)) => {
                if let Some((key, _)) = appends.first() {
                    push_foreign(&mut self.lock(), key, event_type, r#"{"by":1}"#);
                }
            }
            _ => {}
        }
        let mut log = self.lock();
        for (key, append) in appends {
            let last = last_of(&log, key);
            // JetStream's dedupe: the same command's events are not stored twice.
            let own = log.events.iter().any(|(aggregate, e)| {
                aggregate == key && e.command_id.as_deref() == Some(append.command_id)
            });
            if own {
                return Err(AppendError::Conflict("duplicate (injected dedupe)".into()));
            }
            if last != append.expected_last_seq {
                return Err(AppendError::Conflict(format!(
                    "wrong last sequence: {last} (expected {})",
                    append.expected_last_seq
                )));
            }
        }
        let mut seq = 0;
        for (key, append) in appends {
            for event in append.events {
                seq = push(
                    &mut log,
                    key,
                    &event.event_type,
                    Some(append.command_id),
                    append.fingerprint,
                    Bytes::from(event.payload.clone()),
                );
            }
        }
        match fault {
            Some(Fault::LostAck) => {
                Err(AppendError::Unknown("no acknowledgement (injected)".into()))
            }
            _ => Ok(seq),
        }
    }

    /// Queues a fault for a coming append.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Stores an event as another writer would.
    pub fn append_foreign(&self, id: &str, event_type: &str, payload: &str) -> u64 {
        push_foreign(&mut self.lock(), &self.key(id), event_type, payload)
    }

    /// The events of one aggregate.
    pub fn events(&self, id: &str) -> Vec<StoredEvent> {
        let key = self.key(id);
        self.lock()
            .events
            .iter()
            .filter(|(aggregate, _)| *aggregate == key)
            .map(|(_, event)| event.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn push_foreign(log: &mut Log, key: &str, event_type: &str, payload: &str) -> u64 {
    push(
        log,
        key,
        event_type,
        None,
        None,
        Bytes::from(payload.to_owned()),
    )
}

fn push(
    log: &mut Log,
    key: &str,
    event_type: &str,
    command_id: Option<&str>,
    fingerprint: Option<&str>,
    payload: Bytes,
) -> u64 {
    let seq = log.events.len() as u64 + 1;
    log.events.push((
        key.to_owned(),
        StoredEvent {
            seq,
            event_type: event_type.to_owned(),
            version: 1,
            time: None,
            command_id: command_id.map(str::to_owned),
            fingerprint: fingerprint.map(str::to_owned),
            previous_seq: None,
            index: 0,
            aggregate_version: None,
            payload,
        },
    ));
    seq
}

fn last_of(log: &Log, key: &str) -> u64 {
    log.events
        .iter()
        .rev()
        .find(|(aggregate, _)| aggregate == key)
        .map_or(0, |(_, e)| e.seq)
}

impl EventLog for MemoryLog {
    fn append_across<'a>(
        &'a self,
        appends: &'a [(&'a dyn EventLog, Append<'a>)],
    ) -> BoxFuture<'a, Result<u64, AppendError>> {
        // Every append must be on a view of this one stream.
        let keyed: Option<Vec<(String, Append<'a>)>> = appends
            .iter()
            .map(|(log, append)| {
                let view = log.memory().filter(|m| Arc::ptr_eq(&m.log, &self.log))?;
                Some((view.key(append.aggregate_id), *append))
            })
            .collect();
        Box::pin(async move {
            match keyed {
                Some(keyed) => self.append_keyed(&keyed).await,
                None => Err(AppendError::Unavailable("another memory stream".into())),
            }
        })
    }

    fn memory(&self) -> Option<&MemoryLog> {
        Some(self)
    }

    fn read_after<'a>(
        &'a self,
        id: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let events = self
            .events(id)
            .into_iter()
            .filter(|e| e.seq > after)
            .collect();
        Box::pin(async move { Ok(events) })
    }

    fn last_seq<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        let last = last_of(&self.lock(), &self.key(id));
        Box::pin(async move { Ok(last) })
    }

    fn append<'a>(&'a self, append: Append<'a>) -> BoxFuture<'a, Result<u64, AppendError>> {
        Box::pin(async move {
            self.append_keyed(&[(self.key(append.aggregate_id), append)])
                .await
        })
    }
}

/// A ledger in memory.
#[derive(Default)]
pub(crate) struct MemoryLedger {
    entries: Mutex<HashMap<(String, String), Entry>>,
    pub reads: AtomicU32,
    /// This many writes fail before writes work again.
    pub failing_puts: AtomicU32,
}

impl MemoryLedger {
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl CommandLedger for MemoryLedger {
    fn get<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Entry>, StoreError>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(id.to_owned(), command_id.to_owned()))
            .cloned();
        Box::pin(async move { Ok(entry) })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
        entry: &'a Entry,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let fail = self
            .failing_puts
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(StoreError::Unavailable("ledger down".into())) });
        }
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((id.to_owned(), command_id.to_owned()), entry.clone());
        Box::pin(async move { Ok(()) })
    }
}

/// Snapshots in memory.
#[derive(Default)]
pub(crate) struct MemorySnapshots {
    pub records: Mutex<HashMap<String, SnapshotRecord>>,
}

impl SnapshotStore for MemorySnapshots {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SnapshotRecord>, StoreError>> {
        let record = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        Box::pin(async move { Ok(record) })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        record: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), record.clone());
        Box::pin(async move { Ok(()) })
    }
}

//! The event store: one JetStream stream per aggregate type, one literal subject per aggregate.
//!
//! * **Load** reads an aggregate's subject with a *direct get batch* (`$JS.API.DIRECT.GET`,
//!   server >= 2.11): no consumer is created per command, and any replica can answer.
//! * **Append** uses `Nats-Expected-Last-Subject-Sequence` for optimistic concurrency. A command
//!   that decides one event publishes one message. A command that decides several uses an atomic
//!   batch (ADR-50, server >= 2.12), so its events are stored all together or not at all. Every
//!   stored message is exactly one event, with CloudEvents headers.
//!
//! Each event's `Nats-Msg-Id` is `<aggregate id>:<command id>:<index>`, so JetStream drops a
//! repeated publish inside the duplicate window, and its `jetfn-command-id` header lets a reload
//! recognise a command that was already applied, at any age.

use crate::direct::DirectGets;
use crate::wire::event::{self as wire_event, EventMeta, Previous};
use crate::wire::jetstream::{self as wire_js, DirectReply, PubAck};
use crate::wire::{MalformedEvent, header, names};
use async_nats::jetstream::stream;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OnceCell, Semaphore};

pub use crate::wire::StoredEvent;

/// The lowest nats-server version jetfn runs on: atomic batch publish arrived in 2.12.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 12, 0);

/// Events read per direct-get batch request.
const LOAD_BATCH: usize = 1000;
/// Up to this many stream messages between a cached sequence and the aggregate's last event,
/// scanning forward is cheaper than walking back.
const SCAN_STRETCH: u64 = 256;
/// The most gets a walk back makes before it gives up and scans.
const MAX_WALK: usize = 32;

/// Atomic batches one instance keeps in flight per stream, below the server's limit of 50.
const MAX_INFLIGHT_BATCHES: usize = 40;
/// How often an atomic batch refused for too many in flight (10210) is tried again.
const INFLIGHT_BATCH_RETRIES: u32 = 50;

/// How many times provisioning updates a stream before it gives up on concurrent changes.
const PROVISION_ROUNDS: u32 = 8;
/// How long provisioning waits after an update before it reads the stream again (plus up to
/// as much at random).
const PROVISION_SETTLE: Duration = Duration::from_millis(100);

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// NATS or JetStream did not answer, or answered with an error.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The server is older than jetfn needs.
    #[error(
        "nats-server {found} is too old: jetfn needs {required} or newer (atomic batch publish)"
    )]
    ServerTooOld {
        /// The version the server reported.
        found: String,
        /// The minimum version.
        required: String,
    },
    /// The existing stream cannot be changed into what jetfn needs without losing data.
    #[error("stream {stream}: {message}")]
    IncompatibleStream {
        /// The stream name.
        stream: String,
        /// What is incompatible.
        message: String,
    },
    /// A stored event is malformed (missing headers, not JSON).
    #[error(transparent)]
    Malformed(#[from] MalformedEvent),
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The aggregate changed since it was loaded (or our own earlier attempt landed).
    /// Reload and decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// No answer came: the events may or may not be stored. Reload to find out.
    #[error("no acknowledgement: {0}")]
    Unknown(String),
    /// JetStream refused the events or is unreachable.
    #[error("append failed: {0}")]
    Unavailable(String),
    /// Too many atomic batches are in flight on the stream; try again shortly.
    #[error("append failed: {0}")]
    TooManyBatches(String),
}

/// An aggregate's stored events in order.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The events, oldest first.
    pub events: Vec<StoredEvent>,
    /// The stream sequence of the last event, 0 when there is none.
    pub last_seq: u64,
}

/// An event ready to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event type.
    pub event_type: String,
    /// The schema version.
    pub version: u32,
    /// The JSON payload.
    pub payload: Vec<u8>,
}

/// What one command appends.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The aggregate id.
    pub aggregate_id: &'a str,
    /// The stream sequence the aggregate was loaded at (0 when new).
    pub expected_last_seq: u64,
    /// The aggregate's version at that sequence (its number of events).
    pub expected_version: u64,
    /// The command id, the root of every event's `Nats-Msg-Id`.
    pub command_id: &'a str,
    /// The command name.
    pub command: &'a str,
    /// The events, in order; at least one.
    pub events: &'a [NewEvent],
    /// The command's fingerprint, stored on every event.
    pub fingerprint: Option<&'a str>,
    /// The command's trace, stored on every event (`traceparent`, `tracestate`).
    pub trace: Option<&'a crate::telemetry::TraceContext>,
}

/// Where and how an aggregate type's events are stored.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The aggregate type name.
    pub aggregate: String,
    /// The stream name.
    pub stream: String,
    /// Events of aggregate `id` are stored on `<subject_prefix>.<id>`.
    pub subject_prefix: String,
    /// Stream replicas.
    pub replicas: usize,
    /// JetStream's deduplication window.
    pub duplicate_window: Duration,
    /// Optional size limit in bytes.
    pub max_bytes: Option<i64>,
    /// How long to wait for JetStream.
    pub timeout: Duration,
    /// The JetStream API prefix (`$JS.API`, or `$JS.<domain>.API`):
    /// [`crate::config::NatsConfig::jetstream_api`].
    pub api_prefix: String,
}

/// Reads and appends one aggregate type's events.
#[derive(Debug, Clone)]
pub struct EventStore {
    client: Client,
    settings: StoreSettings,
    direct_get_subject: String,
    source: String,
    reads: Arc<OnceCell<DirectGets>>,
    batches: Arc<Semaphore>,
    /// Whether the stream is not the aggregate type's default one, so it may hold other
    /// types' events too: the `Nats-Msg-Id`s then name the type.
    shared: bool,
}

impl EventStore {
    /// A store over an existing connection. Call [`EventStore::provision`] to create the stream.
    pub fn new(client: Client, settings: StoreSettings) -> Self {
        EventStore {
            // A process manager's instance stream (owner `pm.<name>`) holds no aggregate type.
            shared: names::check_aggregate_name(&settings.aggregate).is_ok()
                && settings.stream != names::default_stream(&settings.aggregate),
            direct_get_subject: names::direct_get(&settings.api_prefix, &settings.stream),
            source: format!("/jetfn/{}", settings.aggregate),
            client,
            settings,
            reads: Arc::default(),
            batches: Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES)),
        }
    }

    /// The subject of one aggregate's events.
    pub fn subject(&self, id: &str) -> String {
        format!("{}.{id}", self.settings.subject_prefix)
    }

    /// The settings this store was made with.
    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// Fails unless the connected server is at least [`MIN_SERVER_VERSION`].
    pub fn check_server_version(&self) -> Result<(), StoreError> {
        check_server_version(&self.client.server_info().version)
    }

    /// Creates the stream, or updates the settings jetfn relies on and adds this aggregate
    /// type's subjects and name to it. Idempotent, so every instance may run it at start-up.
    ///
    /// Several aggregate types share a stream when configured to (`stream.name`), each on its
    /// own subjects; the stream lists them in its metadata ([`names::STREAM_AGGREGATE_METADATA`],
    /// and [`names::stream_subjects_metadata`] per type). Refused: a type whose *default* stream
    /// name is that of a type already there (`a-b` and `a_b` both default to `A_B_EVENTS`), and
    /// a type whose subjects another type already uses (one `stream.subject_prefix` for two).
    ///
    /// JetStream updates a stream's configuration as a whole, so two functions adding their
    /// subjects at once could each write a configuration that lacks the other's. After an
    /// update the stream is read again a moment later, and updated again until it holds this
    /// type's subjects (at most 8 times).
    pub async fn provision(&self) -> Result<(), StoreError> {
        let js = crate::wire::jetstream::context(self.client.clone(), &self.settings.api_prefix);
        let desired = self.stream_config();
        for round in 0..PROVISION_ROUNDS {
            let current = match js.get_stream(&self.settings.stream).await {
                Ok(mut existing) => existing
                    .info()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?
                    .config
                    .clone(),
                Err(_) => match js.create_stream(desired.clone()).await {
                    Ok(_) => {
                        tracing::info!(stream = %self.settings.stream, "created stream");
                        return Ok(());
                    }
                    // Another function may have created it in between: merge into theirs.
                    Err(create) => match js.get_stream(&self.settings.stream).await {
                        Ok(_) => continue,
                        Err(_) => {
                            return Err(StoreError::Unavailable(format!(
                                "cannot create stream {}: {create}",
                                self.settings.stream
                            )));
                        }
                    },
                },
            };
            self.check_compatible(&current)?;
            let merged = merge_managed(current.clone(), &desired);
            if merged == current {
                return Ok(());
            }
            tracing::info!(stream = %self.settings.stream, round, "updating stream settings");
            js.update_stream(merged)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            // A function that read the stream before this update may write over it: look again
            // once its update would have landed.
            let settle = PROVISION_SETTLE + PROVISION_SETTLE.mul_f64(rand::random::<f64>());
            tokio::time::sleep(settle).await;
        }
        Err(StoreError::Unavailable(format!(
            "stream {}: its subjects kept changing while aggregate {} was added ({PROVISION_ROUNDS} \
             updates); start the functions again",
            self.settings.stream, self.settings.aggregate
        )))
    }

    /// Fails unless the stream exists and takes every subject of this aggregate type: an atomic
    /// decision writes all its aggregates in one batch, and a batch is single-stream.
    pub async fn check_single_stream(&self) -> Result<(), StoreError> {
        let js = crate::wire::jetstream::context(self.client.clone(), &self.settings.api_prefix);
        let filter = format!("{}.*", self.settings.subject_prefix);
        let incompatible = |message: String| StoreError::IncompatibleStream {
            stream: self.settings.stream.clone(),
            message,
        };
        let mut stream = js.get_stream(&self.settings.stream).await.map_err(|e| {
            incompatible(format!(
                "cannot be read ({e}); an atomic decision needs all its aggregates' events \
                 ({filter}) in this one stream"
            ))
        })?;
        let config = stream
            .info()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .config
            .clone();
        let covers = config.subjects.iter().any(|s| {
            s == &filter || s == ">" || *s == format!("{}.>", self.settings.subject_prefix)
        });
        if !covers {
            return Err(incompatible(format!(
                "does not take {filter} (its subjects: {}); an atomic batch is single-stream, so \
                 every aggregate of a decision must be stored in this one stream",
                config.subjects.join(", ")
            )));
        }
        if !config.allow_atomic_publish {
            return Err(incompatible(
                "does not allow atomic publish (allow_atomic_publish), which atomic decisions need"
                    .into(),
            ));
        }
        Ok(())
    }

    fn check_compatible(&self, current: &stream::Config) -> Result<(), StoreError> {
        let incompatible = |message: String| StoreError::IncompatibleStream {
            stream: self.settings.stream.clone(),
            message,
        };
        if current.storage != stream::StorageType::File {
            return Err(incompatible(
                "uses memory storage; jetfn needs file storage and JetStream cannot change it \
                 in place"
                    .into(),
            ));
        }
        let me = self.settings.aggregate.as_str();
        let owners = current
            .metadata
            .get(names::STREAM_AGGREGATE_METADATA)
            .map(|value| names::stream_owners(value))
            .unwrap_or_default();
        if owners.contains(&me) {
            return Ok(());
        }
        let others: Vec<&str> = owners.into_iter().filter(|o| *o != me).collect();
        // Types whose default names collide never share by accident.
        let default = names::default_stream(me);
        if self.settings.stream == default
            && let Some(other) = others.iter().find(|o| names::default_stream(o) == default)
        {
            return Err(incompatible(format!(
                "holds the events of aggregate {other:?}, not {me:?}; give one of them its own \
                 stream with stream.name"
            )));
        }
        // A subject prefix is one type's, so each type's events stay apart.
        let filter = self.filter();
        let taken = others
            .iter()
            .find(|o| current.metadata.get(&names::stream_subjects_metadata(o)) == Some(&filter));
        // A type listed before jetfn recorded each type's subjects owns the stream's subjects.
        let unrecorded = others.iter().find(|o| {
            !current
                .metadata
                .contains_key(&names::stream_subjects_metadata(o))
        });
        if let Some(other) = taken.or(unrecorded.filter(|_| current.subjects.contains(&filter))) {
            return Err(incompatible(format!(
                "aggregate {other:?} already stores its events on {filter}; two aggregate types \
                 cannot share a subject prefix, so give {me:?} its own stream.subject_prefix or \
                 leave it unset"
            )));
        }
        Ok(())
    }

    /// The stream metadata this type adds: its name, and in a stream other than its default
    /// one (which other types may share) its subjects. A stream of one type keeps the one key.
    fn stream_metadata(&self) -> std::collections::HashMap<String, String> {
        let mut metadata = std::collections::HashMap::from([(
            names::STREAM_AGGREGATE_METADATA.to_owned(),
            self.settings.aggregate.clone(),
        )]);
        if self.shared {
            metadata.insert(
                names::stream_subjects_metadata(&self.settings.aggregate),
                self.filter(),
            );
        }
        metadata
    }

    /// The subject filter of this aggregate type's events.
    fn filter(&self) -> String {
        format!("{}.*", self.settings.subject_prefix)
    }

    /// The stream configuration jetfn needs.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.settings.stream.clone(),
            description: Some(format!(
                "jetfn events of aggregate {}",
                self.settings.aggregate
            )),
            subjects: vec![self.filter()],
            storage: stream::StorageType::File,
            num_replicas: self.settings.replicas,
            duplicate_window: self.settings.duplicate_window,
            discard: stream::DiscardPolicy::New,
            max_bytes: self.settings.max_bytes.unwrap_or(-1),
            allow_direct: true,
            allow_atomic_publish: true,
            deny_delete: true,
            deny_purge: true,
            metadata: self.stream_metadata(),
            ..Default::default()
        }
    }

    /// Loads one aggregate's events with a direct get batch.
    pub async fn load(&self, id: &str) -> Result<History, StoreError> {
        let mut history = History::default();
        self.catch_up(id, &mut history).await?;
        Ok(history)
    }

    /// Appends to `history` the aggregate's events stored after `history.last_seq`, so a retry
    /// after a conflict reads only what changed.
    pub async fn catch_up(&self, id: &str, history: &mut History) -> Result<(), StoreError> {
        let events = self.read_after(id, history.last_seq).await?;
        if let Some(last) = events.last() {
            history.last_seq = last.seq;
        }
        history.events.extend(events);
        Ok(())
    }

    async fn reads(&self) -> Result<&DirectGets, StoreError> {
        self.reads
            .get_or_try_init(|| DirectGets::start(self.client.clone(), self.settings.timeout))
            .await
    }

    /// The events of aggregate `id` stored after stream sequence `after`, oldest first.
    ///
    /// JetStream finds a subject's last message at once, but its next message after a sequence
    /// only by scanning every message in between: in a stream shared by many aggregates, a
    /// catch-up by subject scans the whole stretch since `after`. So the read starts from the
    /// subject's last event and follows each command's [`header::PREVIOUS_SEQ`] link back, one
    /// get by sequence per step, until it reaches `after`: a catch-up of one command costs one
    /// get. The [`header::AGGREGATE_VERSION`]s of the last event and of the one at `after` say
    /// how many steps that takes; short stretches, tails longer than [`MAX_WALK`] events and
    /// events without links are read forward in batches of [`LOAD_BATCH`] instead.
    pub async fn read_after(&self, id: &str, after: u64) -> Result<Vec<StoredEvent>, StoreError> {
        let subject = self.subject(id);
        // The event at `after` says how far the aggregate had come, so the versions tell how
        // many events are missing before any is read.
        let (last, known) =
            tokio::join!(self.get(wire_js::direct_get_last(&subject), None), async {
                match after {
                    0 => Ok(None),
                    seq => self.get(wire_js::direct_get_seq(seq), Some(&subject)).await,
                }
            });
        let Some(last) = last? else {
            return Ok(Vec::new());
        };
        if last.seq <= after {
            return Ok(Vec::new());
        }
        let known_version = match (after, known?) {
            (0, _) => Some(0),
            (_, known) => known.and_then(|event| event.aggregate_version),
        };
        let missing = last
            .aggregate_version
            .zip(known_version)
            .and_then(|(last, known)| last.checked_sub(known));
        let walk = missing.is_some_and(|missing| missing <= MAX_WALK as u64);
        if walk
            && last.seq - after > SCAN_STRETCH
            && let Some(events) = self.walk_back(&subject, last, after).await?
        {
            return Ok(events);
        }
        self.read_batches(&subject, after + 1, Vec::new()).await
    }

    /// Follows the links from `last` back to `after`; `None` when a link is missing or does
    /// not lead there within [`MAX_WALK`] gets (the caller then scans).
    async fn walk_back(
        &self,
        subject: &str,
        last: StoredEvent,
        after: u64,
    ) -> Result<Option<Vec<StoredEvent>>, StoreError> {
        let mut events = vec![last];
        while let Some(newest_read) = events.last() {
            let Some(previous) = newest_read.previous_seq else {
                return Ok(None);
            };
            // Within a command, the event before; else the previous command's last event.
            let seq = match newest_read.index {
                0 if previous == after => break,
                0 if previous < after => return Ok(None),
                0 => previous,
                _ => newest_read.seq - 1,
            };
            if events.len() >= MAX_WALK {
                return Ok(None);
            }
            let Some(event) = self
                .get(wire_js::direct_get_seq(seq), Some(subject))
                .await?
            else {
                return Ok(None);
            };
            let links = if newest_read.index == 0 {
                event.seq > after
            } else {
                // An atomic batch is stored contiguously; anything else is not this command.
                event.index + 1 == newest_read.index
                    && event.command_id == newest_read.command_id
                    && event.previous_seq == Some(previous)
            };
            if !links {
                return Ok(None);
            }
            events.push(event);
        }
        events.reverse();
        Ok(Some(events))
    }

    /// One single direct get: the event it found, or `None` when there is none, or when
    /// `subject` is given and the message found is on another subject.
    async fn get(
        &self,
        body: Vec<u8>,
        subject: Option<&str>,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let reads = self.reads().await?;
        let mut replies = reads.request(&self.direct_get_subject, body).await?;
        let reply = replies.next().await?;
        let event = self.single(&reply)?;
        let on =
            |subject| header::get(reply.headers.as_ref(), header::NATS_SUBJECT) == Some(subject);
        Ok(event.filter(|_| subject.is_none_or(on)))
    }

    /// Reads `subject` from `seq` on in direct get batches, after `events` already read.
    async fn read_batches(
        &self,
        subject: &str,
        mut seq: u64,
        mut events: Vec<StoredEvent>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let reads = self.reads().await?;
        loop {
            let body = wire_js::direct_get_batch(seq, subject, LOAD_BATCH);
            let mut replies = reads.request(&self.direct_get_subject, body).await?;
            let pending = loop {
                match wire_js::direct_reply(&replies.next().await?) {
                    DirectReply::Event(event) => events.push(event),
                    DirectReply::EndOfBatch { pending } => break pending,
                    DirectReply::NotFound => break 0,
                    DirectReply::Malformed(malformed) => return Err(malformed.into()),
                    DirectReply::NoStream => return Err(self.no_stream()),
                    DirectReply::Failed(message) => return Err(StoreError::Unavailable(message)),
                }
            };
            match events.last() {
                Some(last) if pending > 0 => seq = last.seq + 1,
                _ => return Ok(events),
            }
        }
    }

    /// The one message a single direct get answered with, or `None` for nothing found.
    fn single(&self, reply: &async_nats::Message) -> Result<Option<StoredEvent>, StoreError> {
        match wire_js::direct_reply(reply) {
            DirectReply::Event(event) => Ok(Some(event)),
            DirectReply::NotFound => Ok(None),
            DirectReply::Malformed(malformed) => Err(malformed.into()),
            DirectReply::NoStream => Err(self.no_stream()),
            DirectReply::EndOfBatch { .. } => Err(StoreError::Unavailable(
                "a single direct get answered as a batch".into(),
            )),
            DirectReply::Failed(message) => Err(StoreError::Unavailable(message)),
        }
    }

    /// The stream sequence of aggregate `id`'s last event (0 when it has none): one direct get.
    pub async fn last_seq(&self, id: &str) -> Result<u64, StoreError> {
        let last = self
            .get(wire_js::direct_get_last(&self.subject(id)), None)
            .await?;
        Ok(last.map_or(0, |event| event.seq))
    }

    fn no_stream(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "stream {} does not exist or does not allow direct get",
            self.settings.stream
        ))
    }

    /// Appends a command's events, all or nothing, if the aggregate is still at
    /// `expected_last_seq`. Returns the stream sequence of the last event.
    pub async fn append(&self, append: Append<'_>) -> Result<u64, AppendError> {
        self.append_all(std::slice::from_ref(&append)).await
    }

    /// Appends one command's events to several aggregates, all or nothing, if each aggregate is
    /// still at its `expected_last_seq`. Returns the stream sequence of the last event.
    ///
    /// Each aggregate's events are contiguous and indexed from 0 with that aggregate's previous
    /// sequence, exactly as a single-aggregate append writes them, so the walk back of
    /// [`EventStore::read_after`] reads them as it reads any command. Each aggregate's first
    /// message carries its own **literal** `Nats-Expected-Last-Subject-Sequence`; the wildcard
    /// form (`...-Subject`) is never used: it is not safe under concurrency on replicated streams.
    pub async fn append_all(&self, appends: &[Append<'_>]) -> Result<u64, AppendError> {
        let time = wire_event::now_rfc3339();
        let mut messages = Vec::new();
        for append in appends {
            self.messages(append, &time, &mut messages);
        }
        self.send_messages(messages).await
    }

    /// Appends one command's events to aggregates of several types, all or nothing, each
    /// append paired with the store of its aggregate's type; every store must be of this
    /// store's stream (an atomic batch is single-stream). Otherwise as
    /// [`EventStore::append_all`].
    pub async fn append_across(
        &self,
        appends: &[(&EventStore, Append<'_>)],
    ) -> Result<u64, AppendError> {
        let time = wire_event::now_rfc3339();
        let mut messages = Vec::new();
        for (store, append) in appends {
            if store.settings.stream != self.settings.stream {
                return Err(AppendError::Unavailable(format!(
                    "aggregate {} is stored in stream {}, not {}: one atomic batch is \
                     single-stream",
                    store.settings.aggregate, store.settings.stream, self.settings.stream
                )));
            }
            store.messages(append, &time, &mut messages);
        }
        self.send_messages(messages).await
    }

    /// The messages of one append, each with its headers, after `messages`.
    fn messages(
        &self,
        append: &Append<'_>,
        time: &str,
        messages: &mut Vec<(String, HeaderMap, Bytes)>,
    ) {
        let subject = self.subject(append.aggregate_id);
        let meta = EventMeta {
            source: &self.source,
            aggregate_id: append.aggregate_id,
            command_id: append.command_id,
            command: append.command,
            fingerprint: append.fingerprint,
            trace: append.trace,
            time,
            previous: Some(Previous {
                seq: append.expected_last_seq,
                version: append.expected_version,
            }),
        };
        for (index, event) in append.events.iter().enumerate() {
            let mut headers = wire_event::headers(&meta, index, &event.event_type, event.version);
            if self.shared {
                let id = wire_event::shared_msg_id(
                    &self.settings.aggregate,
                    append.aggregate_id,
                    append.command_id,
                    index,
                );
                headers.insert(header::MSG_ID, id.as_str());
            }
            if index == 0 {
                wire_js::expect_last_subject_sequence(&mut headers, append.expected_last_seq);
            }
            messages.push((subject.clone(), headers, Bytes::from(event.payload.clone())));
        }
    }

    /// Publishes one message, or several as one atomic batch.
    async fn send_messages(
        &self,
        mut messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<u64, AppendError> {
        match messages.len() {
            0 => Err(AppendError::Unavailable("nothing to append".into())),
            1 => {
                let (subject, headers, payload) = messages.remove(0);
                let reply = self.request(&subject, headers, payload).await?;
                acknowledged(&reply)
            }
            _ => self.append_atomic_batch(messages).await,
        }
    }

    /// ADR-50 atomic batch: the first message is a request (carrying the precondition), the
    /// middle ones are plain publishes, the last is a request with the commit flag whose reply is
    /// the PubAck for the whole batch. At most [`MAX_INFLIGHT_BATCHES`] run at once per
    /// instance, and a refusal for too many batches in flight (10210) is retried with backoff.
    async fn append_atomic_batch(
        &self,
        messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<u64, AppendError> {
        let _slot = self
            .batches
            .acquire()
            .await
            .map_err(|_| AppendError::Unavailable("shutting down".into()))?;
        let mut attempt = 0;
        loop {
            match self.send_batch(messages.clone()).await {
                Err(AppendError::TooManyBatches(message)) if attempt < INFLIGHT_BATCH_RETRIES => {
                    tracing::debug!(error = %message, attempt, "waiting for atomic batch room");
                    attempt += 1;
                    let jitter = rand::random::<u64>() % 5;
                    tokio::time::sleep(Duration::from_millis(2 + jitter) * attempt.min(10)).await;
                }
                Err(AppendError::TooManyBatches(message)) => {
                    return Err(AppendError::Unavailable(message));
                }
                other => return other,
            }
        }
    }

    /// Sends one batch; each message already carries its own expectations.
    async fn send_batch(
        &self,
        messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<u64, AppendError> {
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let count = messages.len();
        for (index, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
            let position = index + 1;
            wire_js::batch_headers(&mut headers, &batch_id, position, count);
            if position == count {
                let reply = self.request(&subject, headers, payload).await?;
                return acknowledged(&reply);
            } else if position == 1 {
                let reply = self.request(&subject, headers, payload).await?;
                if !reply.is_empty() {
                    // An early refusal; the commit reply would say the same.
                    acknowledged(&reply)?;
                }
            } else {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| AppendError::Unavailable(e.to_string()))?;
            }
        }
        Err(AppendError::Unavailable("empty batch".into()))
    }

    async fn request(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Bytes, AppendError> {
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(self.settings.timeout));
        let mut violations = crate::permissions::watch();
        let sent = tokio::select! {
            sent = self.client.send_request(subject.to_owned(), request) => sent,
            denied = crate::permissions::denied(&mut violations, subject) => {
                return Err(AppendError::Unavailable(format!("permission denied: {denied}")));
            }
        };
        match sent {
            Ok(message) => Ok(message.payload),
            Err(err) => match err.kind() {
                async_nats::RequestErrorKind::TimedOut => Err(AppendError::Unknown(format!(
                    "no acknowledgement from stream {} within {:?}",
                    self.settings.stream, self.settings.timeout
                ))),
                async_nats::RequestErrorKind::NoResponders => {
                    Err(AppendError::Unavailable(format!(
                        "no stream accepts subject {subject} (is stream {} provisioned?)",
                        self.settings.stream
                    )))
                }
                _ => Err(AppendError::Unavailable(err.to_string())),
            },
        }
    }
}

/// Where the command loop reads and appends events: JetStream in production, an in-memory log
/// in the loop's unit tests (where conflicts, lost acks and outages can be injected).
pub(crate) trait EventLog: Send + Sync + 'static {
    /// The events of aggregate `id` stored after stream sequence `after`, oldest first.
    fn read_after<'a>(
        &'a self,
        id: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>>;

    /// The stream sequence of aggregate `id`'s last event, 0 when there is none.
    fn last_seq<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Appends a command's events if the aggregate is still at `append.expected_last_seq`.
    fn append<'a>(&'a self, append: Append<'a>) -> BoxFuture<'a, Result<u64, AppendError>>;

    /// Appends one command's events to aggregates of several types sharing this log's stream,
    /// all or nothing, each append paired with the log of its aggregate's type.
    fn append_across<'a>(
        &'a self,
        appends: &'a [(&'a dyn EventLog, Append<'a>)],
    ) -> BoxFuture<'a, Result<u64, AppendError>>;

    /// The JetStream store behind this log, if it is one.
    fn event_store(&self) -> Option<&EventStore> {
        None
    }

    /// The in-memory log behind this log, in the command loop's unit tests.
    #[cfg(test)]
    fn memory(&self) -> Option<&crate::command::memory::MemoryLog> {
        None
    }
}

impl EventLog for EventStore {
    fn read_after<'a>(
        &'a self,
        id: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(EventStore::read_after(self, id, after))
    }

    fn last_seq<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(EventStore::last_seq(self, id))
    }

    fn append<'a>(&'a self, append: Append<'a>) -> BoxFuture<'a, Result<u64, AppendError>> {
        Box::pin(EventStore::append(self, append))
    }

    fn append_across<'a>(
        &'a self,
        appends: &'a [(&'a dyn EventLog, Append<'a>)],
    ) -> BoxFuture<'a, Result<u64, AppendError>> {
        Box::pin(async move {
            let mut typed = Vec::with_capacity(appends.len());
            for (log, append) in appends {
                let Some(store) = log.event_store() else {
                    return Err(AppendError::Unavailable(
                        "an atomic batch mixes JetStream and other logs".into(),
                    ));
                };
                typed.push((store, *append));
            }
            EventStore::append_across(self, &typed).await
        })
    }

    fn event_store(&self) -> Option<&EventStore> {
        Some(self)
    }
}

/// Copies the settings jetfn manages onto an existing stream's configuration, keeping the rest
/// (limits an operator set, placement, other metadata): the desired subjects are added, and the
/// aggregate types listed in the metadata are merged.
fn merge_managed(mut current: stream::Config, desired: &stream::Config) -> stream::Config {
    for subject in &desired.subjects {
        if !current.subjects.contains(subject) {
            current.subjects.push(subject.clone());
        }
    }
    for (key, value) in &desired.metadata {
        let merged = match current.metadata.get(key) {
            Some(existing) if key == names::STREAM_AGGREGATE_METADATA => {
                names::stream_owners_value(
                    names::stream_owners(existing)
                        .into_iter()
                        .chain(names::stream_owners(value)),
                )
            }
            _ => value.clone(),
        };
        current.metadata.insert(key.clone(), merged);
    }
    current.allow_direct = true;
    current.allow_atomic_publish = true;
    current.deny_delete = true;
    current.deny_purge = true;
    current.discard = stream::DiscardPolicy::New;
    current.duplicate_window = desired.duplicate_window;
    // Never lower replicas: an operator's R3 stays R3 whatever a function's default says.
    current.num_replicas = current.num_replicas.max(desired.num_replicas);
    if desired.max_bytes > 0 {
        current.max_bytes = desired.max_bytes;
    }
    current
}

/// Turns a publish acknowledgement into the append's outcome.
///
/// A duplicate ack means an earlier attempt of this command already stored the event; it is
/// reported as a conflict so the caller catches up and answers from the stored history.
fn acknowledged(reply: &[u8]) -> Result<u64, AppendError> {
    let ack = wire_js::parse_pub_ack(reply).map_err(AppendError::Unavailable)?;
    match ack {
        PubAck::Stored(seq) => Ok(seq),
        PubAck::Duplicate(seq) => Err(AppendError::Conflict(format!(
            "already stored at sequence {seq} (duplicate)"
        ))),
        ack if ack.is_conflict() => Err(AppendError::Conflict(ack_text(&ack))),
        PubAck::Refused {
            code: wire_js::BATCH_TOO_MANY_INFLIGHT,
            ..
        } => Err(AppendError::TooManyBatches(ack_text(&ack))),
        ack => Err(AppendError::Unavailable(ack_text(&ack))),
    }
}

fn ack_text(ack: &PubAck) -> String {
    match ack {
        PubAck::Refused { code, description } => format!("{description} (JetStream error {code})"),
        PubAck::Stored(seq) | PubAck::Duplicate(seq) => format!("stored at {seq}"),
    }
}

/// Compares a server version string (`2.15.1`, `2.12.0-beta.1`) with [`MIN_SERVER_VERSION`].
pub fn check_server_version(found: &str) -> Result<(), StoreError> {
    let core = found.trim_start_matches('v');
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let parsed = (|| {
        Some((
            parts.next()??,
            parts.next()??,
            parts.next().flatten().unwrap_or(0),
        ))
    })();
    let (major, minor, patch) = MIN_SERVER_VERSION;
    let too_old = || StoreError::ServerTooOld {
        found: found.to_owned(),
        required: format!("{major}.{minor}.{patch}"),
    };
    match parsed {
        Some(version) if version >= MIN_SERVER_VERSION => Ok(()),
        _ => Err(too_old()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_from_2_12_are_accepted() {
        for ok in ["2.12.0", "2.15.1", "v2.12.3", "3.0.0", "2.12.0-RC.1"] {
            assert!(check_server_version(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn older_or_unreadable_server_versions_name_both_versions() {
        let err = check_server_version("2.9.10").unwrap_err().to_string();
        assert_eq!(
            err,
            "nats-server 2.9.10 is too old: jetfn needs 2.12.0 or newer (atomic batch publish)"
        );
        assert!(check_server_version("banana").is_err());
    }

    #[test]
    fn a_wrong_last_sequence_is_a_conflict() {
        let reply = br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"},"stream":"T","seq":0}"#;
        assert!(matches!(acknowledged(reply), Err(AppendError::Conflict(_))));
    }

    #[test]
    fn a_failed_commit_names_the_servers_reason() {
        let reply = br#"{"error":{"code":400,"err_code":10077,"description":"maximum bytes exceeded"},"stream":"T","seq":0}"#;
        let err = acknowledged(reply).unwrap_err().to_string();
        assert!(err.contains("maximum bytes exceeded"), "{err}");
    }

    #[test]
    fn too_many_batches_in_flight_is_waited_out_not_reported() {
        let reply = br#"{"error":{"code":429,"err_code":10210,"description":"atomic publish too many inflight"},"stream":"T","seq":0}"#;
        assert!(matches!(
            acknowledged(reply),
            Err(AppendError::TooManyBatches(_))
        ));
    }

    #[test]
    fn a_duplicate_ack_sends_the_caller_back_to_the_stored_history() {
        let duplicate = br#"{"stream":"T","seq":7,"duplicate":true}"#;
        assert!(matches!(
            acknowledged(duplicate),
            Err(AppendError::Conflict(_))
        ));
    }
}

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

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::time::Duration;

/// Header names of stored events.
pub mod headers {
    /// CloudEvents spec version, always `1.0`.
    pub const CE_SPECVERSION: &str = "ce-specversion";
    /// CloudEvents id: unique per event (`<aggregate id>:<command id>:<index>`).
    pub const CE_ID: &str = "ce-id";
    /// CloudEvents type: the event's variant name, e.g. `MoneyDeposited`.
    pub const CE_TYPE: &str = "ce-type";
    /// CloudEvents source: `/jetfn/<aggregate>`.
    pub const CE_SOURCE: &str = "ce-source";
    /// CloudEvents subject: the aggregate id.
    pub const CE_SUBJECT: &str = "ce-subject";
    /// CloudEvents time: when the command was decided (RFC 3339).
    pub const CE_TIME: &str = "ce-time";
    /// CloudEvents data content type, always `application/json`.
    pub const CE_DATACONTENTTYPE: &str = "ce-datacontenttype";
    /// The event's schema version (an integer, 1 unless the aggregate says otherwise).
    pub const EVENT_VERSION: &str = "jetfn-event-version";
    /// The id of the command that caused the event.
    pub const COMMAND_ID: &str = "jetfn-command-id";
    /// The name of the command that caused the event.
    pub const COMMAND: &str = "jetfn-command";
    /// A fingerprint of the command's name and body, so a reused command id is recognised.
    pub const COMMAND_FINGERPRINT: &str = "jetfn-command-fingerprint";
    /// JetStream's deduplication id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    /// JetStream's optimistic-concurrency precondition.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
}

/// The lowest nats-server version jetfn runs on: atomic batch publish arrived in 2.12.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 12, 0);

/// Events read per direct-get batch request.
const LOAD_BATCH: usize = 1000;

/// JetStream error codes that mean "someone else appended first".
const WRONG_LAST_SEQUENCE: u64 = 10071;
const CLUSTERED_IN_FLIGHT: u64 = 10164;
/// An atomic batch carried a `Nats-Msg-Id` already stored: our own earlier attempt landed.
const BATCH_DUPLICATE_MSG_ID: u64 = 10201;

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
    #[error("event at stream sequence {seq} is malformed: {reason}")]
    Malformed {
        /// Its stream sequence.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
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
}

/// One stored event, not yet decoded.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Stream sequence.
    pub seq: u64,
    /// The event type (`ce-type`).
    pub event_type: String,
    /// The event schema version (`jetfn-event-version`).
    pub version: u32,
    /// The command that caused it, if recorded.
    pub command_id: Option<String>,
    /// The fingerprint of that command, if recorded.
    pub fingerprint: Option<String>,
    /// The JSON payload.
    pub payload: Bytes,
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
#[derive(Debug)]
pub struct Append<'a> {
    /// The aggregate id.
    pub aggregate_id: &'a str,
    /// The stream sequence the aggregate was loaded at (0 when new).
    pub expected_last_seq: u64,
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
}

/// Reads and appends one aggregate type's events.
#[derive(Debug, Clone)]
pub struct EventStore {
    client: Client,
    settings: StoreSettings,
    direct_get_subject: String,
    source: String,
}

impl EventStore {
    /// A store over an existing connection. Call [`EventStore::provision`] to create the stream.
    pub fn new(client: Client, settings: StoreSettings) -> Self {
        EventStore {
            direct_get_subject: format!("$JS.API.DIRECT.GET.{}", settings.stream),
            source: format!("/jetfn/{}", settings.aggregate),
            client,
            settings,
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

    /// Creates the stream, or updates the settings jetfn relies on. Idempotent, so every
    /// instance may run it at start-up.
    pub async fn provision(&self) -> Result<(), StoreError> {
        let js = jetstream::new(self.client.clone());
        let desired = self.stream_config();
        match js.get_stream(&self.settings.stream).await {
            Ok(mut existing) => {
                let current = existing
                    .info()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?
                    .config
                    .clone();
                if current.storage != stream::StorageType::File {
                    return Err(StoreError::IncompatibleStream {
                        stream: self.settings.stream.clone(),
                        message: "uses memory storage; jetfn needs file storage and JetStream \
                                  cannot change it in place"
                            .into(),
                    });
                }
                let merged = merge_managed(current.clone(), &desired);
                if merged != current {
                    tracing::info!(stream = %self.settings.stream, "updating stream settings");
                    js.update_stream(merged)
                        .await
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                }
                Ok(())
            }
            Err(_) => match js.create_stream(desired.clone()).await {
                Ok(_) => {
                    tracing::info!(stream = %self.settings.stream, "created stream");
                    Ok(())
                }
                // Another instance may have created it in between.
                Err(create) => match js.get_stream(&self.settings.stream).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(StoreError::Unavailable(format!(
                        "cannot create stream {}: {create}",
                        self.settings.stream
                    ))),
                },
            },
        }
    }

    /// The stream configuration jetfn needs.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.settings.stream.clone(),
            description: Some(format!(
                "jetfn events of aggregate {}",
                self.settings.aggregate
            )),
            subjects: vec![format!("{}.*", self.settings.subject_prefix)],
            storage: stream::StorageType::File,
            num_replicas: self.settings.replicas,
            duplicate_window: self.settings.duplicate_window,
            discard: stream::DiscardPolicy::New,
            max_bytes: self.settings.max_bytes.unwrap_or(-1),
            allow_direct: true,
            allow_atomic_publish: true,
            deny_delete: true,
            deny_purge: true,
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
        let subject = self.subject(id);
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut violations = crate::permissions::watch();
        let mut next_seq = history.last_seq + 1;
        loop {
            let request = serde_json::json!({
                "seq": next_seq,
                "next_by_subj": subject,
                "batch": LOAD_BATCH,
            });
            self.client
                .publish_with_reply(
                    self.direct_get_subject.clone(),
                    inbox.clone(),
                    request.to_string().into(),
                )
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let pending = loop {
                let next = async {
                    tokio::select! {
                        message = replies.next() => Ok(message),
                        denied = crate::permissions::denied(&mut violations, &self.direct_get_subject) => Err(denied),
                    }
                };
                let message = tokio::time::timeout(self.settings.timeout, next)
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "no direct get reply from stream {} within {:?}",
                            self.settings.stream, self.settings.timeout
                        ))
                    })?
                    .map_err(|denied| {
                        StoreError::Unavailable(format!("permission denied: {denied}"))
                    })?
                    .ok_or_else(|| StoreError::Unavailable("connection closed".into()))?;
                match message.status {
                    None | Some(StatusCode::OK) => {
                        let event = stored_event(&message)?;
                        history.last_seq = event.seq;
                        history.events.push(event);
                    }
                    // End of batch: more may follow.
                    Some(status) if status.as_u16() == 204 => {
                        break header_u64(&message.headers, "Nats-Num-Pending").unwrap_or(0);
                    }
                    // Nothing (more) on the subject.
                    Some(StatusCode::NOT_FOUND) => break 0,
                    Some(StatusCode::NO_RESPONDERS) => {
                        return Err(StoreError::Unavailable(format!(
                            "stream {} does not exist or does not allow direct get",
                            self.settings.stream
                        )));
                    }
                    Some(status) => {
                        return Err(StoreError::Unavailable(format!(
                            "direct get failed: {status} {}",
                            message.description.unwrap_or_default()
                        )));
                    }
                }
            };
            if pending == 0 {
                return Ok(());
            }
            next_seq = history.last_seq + 1;
        }
    }

    /// Appends a command's events, all or nothing, if the aggregate is still at
    /// `expected_last_seq`. Returns the stream sequence of the last event.
    pub async fn append(&self, append: Append<'_>) -> Result<u64, AppendError> {
        let subject = self.subject(append.aggregate_id);
        let time = now_rfc3339();
        let mut messages = append.events.iter().enumerate().map(|(index, event)| {
            let headers = self.event_headers(&append, index, event, &time);
            (headers, Bytes::from(event.payload.clone()))
        });
        match append.events.len() {
            0 => Err(AppendError::Unavailable("nothing to append".into())),
            1 => {
                let Some((mut headers, payload)) = messages.next() else {
                    return Err(AppendError::Unavailable("nothing to append".into()));
                };
                headers.insert(
                    headers::EXPECTED_LAST_SUBJECT_SEQUENCE,
                    append.expected_last_seq.to_string().as_str(),
                );
                let reply = self.request(&subject, headers, payload).await?;
                parse_pub_ack(&reply)
            }
            count => {
                self.append_atomic_batch(&subject, append.expected_last_seq, count, messages)
                    .await
            }
        }
    }

    /// ADR-50 atomic batch: the first message is a request (carrying the precondition), the
    /// middle ones are plain publishes, the last is a request with the commit flag whose reply is
    /// the PubAck for the whole batch.
    async fn append_atomic_batch(
        &self,
        subject: &str,
        expected_last_seq: u64,
        count: usize,
        messages: impl Iterator<Item = (HeaderMap, Bytes)>,
    ) -> Result<u64, AppendError> {
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        for (index, (mut headers, payload)) in messages.enumerate() {
            let position = index + 1;
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", position.to_string().as_str());
            if position == 1 {
                headers.insert(
                    headers::EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expected_last_seq.to_string().as_str(),
                );
            }
            if position == count {
                headers.insert("Nats-Batch-Commit", "1");
                let reply = self.request(subject, headers, payload).await?;
                return parse_pub_ack(&reply);
            } else if position == 1 {
                let reply = self.request(subject, headers, payload).await?;
                if !reply.is_empty() {
                    // An early refusal; the commit reply would say the same.
                    parse_pub_ack(&reply)?;
                }
            } else {
                self.client
                    .publish_with_headers(subject.to_owned(), headers, payload)
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

    fn event_headers(
        &self,
        append: &Append<'_>,
        index: usize,
        event: &NewEvent,
        time: &str,
    ) -> HeaderMap {
        let msg_id = format!("{}:{}:{index}", append.aggregate_id, append.command_id);
        let mut headers = HeaderMap::new();
        headers.insert(headers::NATS_MSG_ID, msg_id.as_str());
        headers.insert(headers::CE_SPECVERSION, "1.0");
        headers.insert(headers::CE_ID, msg_id.as_str());
        headers.insert(headers::CE_TYPE, event.event_type.as_str());
        headers.insert(headers::CE_SOURCE, self.source.as_str());
        headers.insert(headers::CE_SUBJECT, append.aggregate_id);
        headers.insert(headers::CE_TIME, time);
        headers.insert(headers::CE_DATACONTENTTYPE, "application/json");
        headers.insert(headers::EVENT_VERSION, event.version.to_string().as_str());
        headers.insert(headers::COMMAND_ID, append.command_id);
        headers.insert(headers::COMMAND, append.command);
        if let Some(fingerprint) = append.fingerprint {
            headers.insert(headers::COMMAND_FINGERPRINT, fingerprint);
        }
        if let Some(trace) = append.trace {
            trace.write(&mut headers);
        }
        headers
    }
}

/// Copies the settings jetfn manages onto an existing stream's configuration, keeping the rest
/// (limits an operator set, placement, metadata).
fn merge_managed(mut current: stream::Config, desired: &stream::Config) -> stream::Config {
    for subject in &desired.subjects {
        if !current.subjects.contains(subject) {
            current.subjects.push(subject.clone());
        }
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

#[derive(Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Reads a JetStream publish acknowledgement.
///
/// A duplicate ack means an earlier attempt of this command already stored the event; it is
/// reported as a conflict so the caller reloads and answers from the stored history.
fn parse_pub_ack(reply: &[u8]) -> Result<u64, AppendError> {
    let ack: PubAck = serde_json::from_slice(reply).map_err(|e| {
        AppendError::Unavailable(format!(
            "unreadable acknowledgement {:?}: {e}",
            String::from_utf8_lossy(reply)
        ))
    })?;
    match ack.error {
        Some(error) => match error.err_code {
            WRONG_LAST_SEQUENCE | CLUSTERED_IN_FLIGHT | BATCH_DUPLICATE_MSG_ID => Err(
                AppendError::Conflict(format!("{} ({})", error.description, error.err_code)),
            ),
            code => Err(AppendError::Unavailable(format!(
                "{} (JetStream error {code})",
                error.description
            ))),
        },
        None if ack.duplicate => Err(AppendError::Conflict(format!(
            "already stored at sequence {} (duplicate)",
            ack.seq
        ))),
        None if ack.seq == 0 => Err(AppendError::Unavailable(
            "acknowledgement without a sequence".into(),
        )),
        None => Ok(ack.seq),
    }
}

fn stored_event(message: &async_nats::Message) -> Result<StoredEvent, StoreError> {
    let headers = &message.headers;
    let seq = header_u64(headers, "Nats-Sequence").ok_or_else(|| StoreError::Malformed {
        seq: 0,
        reason: "direct get reply without Nats-Sequence".into(),
    })?;
    let malformed = |reason: String| StoreError::Malformed { seq, reason };
    let event_type = header_str(headers, headers::CE_TYPE)
        .ok_or_else(|| malformed(format!("no {} header", headers::CE_TYPE)))?;
    let version = match header_str(headers, headers::EVENT_VERSION) {
        None => 1,
        Some(v) => v
            .parse()
            .map_err(|_| malformed(format!("{} is {v:?}", headers::EVENT_VERSION)))?,
    };
    Ok(StoredEvent {
        seq,
        event_type: event_type.to_owned(),
        version,
        command_id: header_str(headers, headers::COMMAND_ID).map(str::to_owned),
        fingerprint: header_str(headers, headers::COMMAND_FINGERPRINT).map(str::to_owned),
        payload: message.payload.clone(),
    })
}

fn header_str<'a>(headers: &'a Option<HeaderMap>, name: &str) -> Option<&'a str> {
    headers.as_ref()?.get(name).map(|v| v.as_str())
}

fn header_u64(headers: &Option<HeaderMap>, name: &str) -> Option<u64> {
    header_str(headers, name)?.parse().ok()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
        assert!(matches!(
            parse_pub_ack(reply),
            Err(AppendError::Conflict(_))
        ));
    }

    #[test]
    fn a_failed_commit_with_seq_zero_is_not_a_success() {
        let reply = br#"{"error":{"code":400,"err_code":10077,"description":"maximum bytes exceeded"},"stream":"T","seq":0}"#;
        let err = parse_pub_ack(reply).unwrap_err().to_string();
        assert!(err.contains("maximum bytes exceeded"), "{err}");
    }

    #[test]
    fn an_ack_returns_the_sequence() {
        assert_eq!(parse_pub_ack(br#"{"stream":"T","seq":42}"#).unwrap(), 42);
    }

    #[test]
    fn a_duplicate_ack_sends_the_caller_back_to_the_stored_history() {
        let duplicate = br#"{"stream":"T","seq":7,"duplicate":true}"#;
        assert!(matches!(
            parse_pub_ack(duplicate),
            Err(AppendError::Conflict(_))
        ));
    }
}

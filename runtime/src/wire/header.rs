//! Every header jetfn reads or writes, by name.
//!
//! JetStream's and the service API's own headers are async-nats's constants, re-exported here
//! under the names jetfn's code uses, so the rest of the crate never spells a header.

use async_nats::HeaderMap;
use async_nats::HeaderName;
pub use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_LAST_SEQUENCE,
    NATS_MESSAGE_ID as MSG_ID, NATS_SCHEDULE as SCHEDULE, NATS_SCHEDULE_TARGET as SCHEDULE_TARGET,
    NATS_SEQUENCE, NATS_SUBJECT,
};
pub use async_nats::service::{
    NATS_SERVICE_ERROR as SERVICE_ERROR, NATS_SERVICE_ERROR_CODE as SERVICE_ERROR_CODE,
};

/// The value of [`NATS_BATCH_COMMIT`] that commits a batch with its last message.
pub const BATCH_COMMIT_FINAL: &str = async_nats::header::NATS_BATCH_COMMIT_FINAL;
/// JetStream's expected-last-sequence check over a subject *filter*. jetfn **never** sends it: on
/// replicated streams the leader tracks in-flight writes by literal subject, so overlapping
/// wildcard checks can all pass (see the README, "Atomic decisions across aggregates"). Named
/// only for the test that documents this.
pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
    "Nats-Expected-Last-Subject-Sequence-Subject";
/// Messages still matching a direct get batch after its end (status 204 reply).
pub const NUM_PENDING: &str = "Nats-Num-Pending";
/// Set by JetStream on a message a stream sourced from another:
/// `<origin stream> <origin sequence> <filter> <destination>...`.
pub const STREAM_SOURCE: &str = "Nats-Stream-Source";

/// The origin sequence of a sourced message (the second field of [`STREAM_SOURCE`]).
pub fn source_sequence(headers: Option<&HeaderMap>) -> Option<u64> {
    get(headers, STREAM_SOURCE)?.split(' ').nth(1)?.parse().ok()
}

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
/// The stream sequence of the aggregate's last event before the command that wrote this event
/// (the command's expected last subject sequence, checked by JetStream): it links a command's
/// events to the ones before, so a reader can walk an aggregate's history back by sequence
/// instead of scanning the stream for its subject.
pub const PREVIOUS_SEQ: &str = "jetfn-previous-seq";
/// The aggregate's version after an event: its position in the aggregate's history, from 1.
/// Tells a reader how many events it is missing before it reads them.
pub const AGGREGATE_VERSION: &str = "jetfn-aggregate-version";
/// The position of an event among its command's events, from 0. Written from the second event
/// on; absent means 0.
pub const EVENT_INDEX: &str = "jetfn-event-index";

/// W3C trace context: the sending span.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context: vendor state.
pub const TRACESTATE: &str = "tracestate";

/// Dead letters: the projection that refused the event.
pub const DLQ_PROJECTION: &str = "jetfn-dlq-projection";
/// Dead letters: the stream the event came from.
pub const DLQ_STREAM: &str = "jetfn-dlq-stream";
/// Dead letters: the event's original subject.
pub const DLQ_SUBJECT: &str = "jetfn-dlq-subject";
/// Dead letters: the event's original stream sequence.
pub const DLQ_SEQ: &str = "jetfn-dlq-seq";
/// Dead letters: why the projection refused it.
pub const DLQ_ERROR: &str = "jetfn-dlq-error";
/// Dead letters: how many deliveries were tried.
pub const DLQ_DELIVERIES: &str = "jetfn-dlq-deliveries";
/// Dead letters: the prefix under which the original's JetStream (`Nats-*`) headers are kept.
pub const DLQ_ORIGINAL_PREFIX: &str = "jetfn-dlq-orig-";

/// A header name fixed at compile time (one of this module's constants): looked up without a
/// copy of the name or a check of its characters, which a `&str` costs on every lookup.
pub trait StaticName {
    /// The name as async-nats keys it.
    fn header_name(self) -> HeaderName;
}

impl StaticName for &'static str {
    fn header_name(self) -> HeaderName {
        HeaderName::from_static(self)
    }
}

impl StaticName for HeaderName {
    fn header_name(self) -> HeaderName {
        self
    }
}

/// The value of header `name`, if present.
pub fn get(headers: Option<&HeaderMap>, name: impl StaticName) -> Option<&str> {
    headers?.get(name.header_name()).map(|v| v.as_str())
}

/// The value of header `name` as an unsigned integer, if present and numeric.
pub fn get_u64(headers: Option<&HeaderMap>, name: impl StaticName) -> Option<u64> {
    get(headers, name)?.parse().ok()
}

/// KV: the operation a bucket entry records (`DEL` or `PURGE` for a removed key).
pub const KV_OPERATION: &str = "KV-Operation";

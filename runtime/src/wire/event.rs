//! Stored events: the headers jetfn writes on every event, and their decoding.
//!
//! One event is one JetStream message on `<event prefix>.<aggregate id>`, its JSON payload the
//! event's fields, its headers CloudEvents (`ce-*`), the event version and the command that
//! caused it. Everything that reads events (the command loop, projections, the CLI) decodes them
//! here.

use super::header;
use crate::telemetry::TraceContext;
use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use bytes::Bytes;

/// One stored event, not yet decoded into the aggregate's event type.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Stream sequence.
    pub seq: u64,
    /// The event type (`ce-type`).
    pub event_type: String,
    /// The event schema version (`jetfn-event-version`, 1 when absent).
    pub version: u32,
    /// When it was decided (`ce-time`), if recorded.
    pub time: Option<String>,
    /// The command that caused it, if recorded.
    pub command_id: Option<String>,
    /// The fingerprint of that command, if recorded.
    pub fingerprint: Option<String>,
    /// The aggregate's last sequence before that command ([`header::PREVIOUS_SEQ`]), when
    /// recorded and readable. Events written before jetfn recorded it have none.
    pub previous_seq: Option<u64>,
    /// The event's position among its command's events, from 0.
    pub index: u32,
    /// The aggregate's version after this event ([`header::AGGREGATE_VERSION`]), if recorded.
    pub aggregate_version: Option<u64>,
    /// The JSON payload.
    pub payload: Bytes,
}

/// A stored message that is not a readable jetfn event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event at stream sequence {seq} is malformed: {reason}")]
pub struct MalformedEvent {
    /// Its stream sequence (0 when even that is unknown).
    pub seq: u64,
    /// What is wrong.
    pub reason: String,
}

impl StoredEvent {
    /// Reads the event stored at `seq` from its message: [`decode`](Self::decode), after
    /// refusing a message whose bytes the NATS client could not read exactly (a header line
    /// that is not UTF-8, say; see vendor/async-nats/JETFN-PATCH.md).
    pub fn read(seq: u64, message: &async_nats::Message) -> Result<StoredEvent, MalformedEvent> {
        if let Some(problem) = message.malformed() {
            return Err(MalformedEvent {
                seq,
                reason: format!("the stored message cannot be read: {problem}"),
            });
        }
        Self::decode(seq, message.headers.as_ref(), message.payload.clone())
    }

    /// Reads an event from the headers and payload of the message stored at `seq`.
    pub fn decode(
        seq: u64,
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<StoredEvent, MalformedEvent> {
        let malformed = |reason: String| MalformedEvent { seq, reason };
        let event_type = header::get(headers, header::CE_TYPE)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| malformed(format!("no {} header", header::CE_TYPE)))?;
        let version = match header::get(headers, header::EVENT_VERSION) {
            None => 1,
            Some(v) => v
                .parse()
                .map_err(|_| malformed(format!("{} is {v:?}", header::EVENT_VERSION)))?,
        };
        let owned = |name: &'static str| header::get(headers, name).map(str::to_owned);
        // The links only speed up reads: an unreadable one is treated as absent, never as a
        // malformed event.
        let index = match header::get(headers, header::EVENT_INDEX) {
            None => Some(0),
            Some(index) => index.parse().ok(),
        };
        let previous_seq =
            header::get_u64(headers, header::PREVIOUS_SEQ).filter(|_| index.is_some());
        Ok(StoredEvent {
            seq,
            event_type: event_type.to_owned(),
            version,
            time: owned(header::CE_TIME),
            command_id: owned(header::COMMAND_ID),
            fingerprint: owned(header::COMMAND_FINGERPRINT),
            previous_seq,
            index: index.unwrap_or(0),
            aggregate_version: header::get_u64(headers, header::AGGREGATE_VERSION),
            payload,
        })
    }
}

/// What one event of a command carries besides its payload.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta<'a> {
    /// CloudEvents source, `/jetfn/<aggregate>`.
    pub source: &'a str,
    /// The aggregate id.
    pub aggregate_id: &'a str,
    /// The command id.
    pub command_id: &'a str,
    /// The command name.
    pub command: &'a str,
    /// The command's fingerprint.
    pub fingerprint: Option<&'a str>,
    /// The command's trace.
    pub trace: Option<&'a TraceContext>,
    /// When the command was decided (RFC 3339).
    pub time: &'a str,
    /// Where the aggregate stood before the command. `None` writes no link (for events
    /// published without JetStream's sequence check).
    pub previous: Option<Previous>,
}

/// Where an aggregate stood before a command: what its append expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Previous {
    /// The stream sequence of its last event (0 for none), which JetStream checks.
    pub seq: u64,
    /// Its version: how many events it had.
    pub version: u64,
}

/// The deduplication id (and CloudEvents id) of a command's `index`-th event.
pub fn msg_id(aggregate_id: &str, command_id: &str, index: usize) -> String {
    format!("{aggregate_id}:{command_id}:{index}")
}

/// The deduplication id (`Nats-Msg-Id`) of a command's `index`-th event in a stream other than
/// its aggregate type's default one, which it may share with other types:
/// `<aggregate>.<id>:<command id>:<index>`. An aggregate id never contains `.`, so these never
/// equal another type's ids, qualified or not.
pub fn shared_msg_id(
    aggregate: &str,
    aggregate_id: &str,
    command_id: &str,
    index: usize,
) -> String {
    format!("{aggregate}.{}", msg_id(aggregate_id, command_id, index))
}

/// The headers of a command's `index`-th event. Names are static (no copy, no check per
/// event: these are the runtime's own).
pub fn headers(meta: &EventMeta<'_>, index: usize, event_type: &str, version: u32) -> HeaderMap {
    let msg_id = msg_id(meta.aggregate_id, meta.command_id, index);
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, msg_id.as_str());
    headers.insert(static_name(header::CE_SPECVERSION), "1.0");
    headers.insert(static_name(header::CE_ID), msg_id.as_str());
    headers.insert(static_name(header::CE_TYPE), event_type);
    headers.insert(static_name(header::CE_SOURCE), meta.source);
    headers.insert(static_name(header::CE_SUBJECT), meta.aggregate_id);
    headers.insert(static_name(header::CE_TIME), meta.time);
    headers.insert(static_name(header::CE_DATACONTENTTYPE), "application/json");
    headers.insert(
        static_name(header::EVENT_VERSION),
        version.to_string().as_str(),
    );
    headers.insert(static_name(header::COMMAND_ID), meta.command_id);
    headers.insert(static_name(header::COMMAND), meta.command);
    if let Some(fingerprint) = meta.fingerprint {
        headers.insert(static_name(header::COMMAND_FINGERPRINT), fingerprint);
    }
    if let Some(previous) = meta.previous {
        headers.insert(
            static_name(header::PREVIOUS_SEQ),
            previous.seq.to_string().as_str(),
        );
        let version = previous.version + index as u64 + 1;
        headers.insert(
            static_name(header::AGGREGATE_VERSION),
            version.to_string().as_str(),
        );
        if index > 0 {
            headers.insert(static_name(header::EVENT_INDEX), index.to_string().as_str());
        }
    }
    if let Some(trace) = meta.trace {
        trace.write(&mut headers);
    }
    headers
}

/// A header name the runtime defines.
fn static_name(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

/// Now, as CloudEvents time.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> EventMeta<'static> {
        EventMeta {
            source: "/jetfn/account",
            aggregate_id: "alice",
            command_id: "c-1",
            command: "deposit",
            fingerprint: Some("f"),
            trace: None,
            time: "2026-01-01T00:00:00Z",
            previous: Some(Previous { seq: 7, version: 4 }),
        }
    }

    #[test]
    fn written_headers_decode_to_the_same_event() {
        let headers = headers(&meta(), 2, "MoneyDeposited", 3);
        assert_eq!(
            header::get(Some(&headers), header::MSG_ID),
            Some("alice:c-1:2")
        );
        let event = StoredEvent::decode(9, Some(&headers), Bytes::from_static(b"{}")).unwrap();
        assert_eq!(event.seq, 9);
        assert_eq!(event.event_type, "MoneyDeposited");
        assert_eq!(event.version, 3);
        assert_eq!(event.command_id.as_deref(), Some("c-1"));
        assert_eq!(event.fingerprint.as_deref(), Some("f"));
        assert_eq!(event.time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(event.previous_seq, Some(7));
        assert_eq!(event.index, 2);
        assert_eq!(
            event.aggregate_version,
            Some(7),
            "4 before, then the third event"
        );
    }

    #[test]
    fn a_commands_first_event_records_no_index_and_unreadable_links_count_as_absent() {
        let first = headers(&meta(), 0, "MoneyDeposited", 1);
        assert_eq!(header::get(Some(&first), header::EVENT_INDEX), None);
        let event = StoredEvent::decode(8, Some(&first), Bytes::new()).unwrap();
        assert_eq!((event.previous_seq, event.index), (Some(7), 0));

        let mut garbled = first.clone();
        garbled.insert(header::EVENT_INDEX, "one");
        let event = StoredEvent::decode(8, Some(&garbled), Bytes::new()).unwrap();
        assert_eq!(event.previous_seq, None);
        let mut garbled = first;
        garbled.insert(header::PREVIOUS_SEQ, "-1");
        let event = StoredEvent::decode(8, Some(&garbled), Bytes::new()).unwrap();
        assert_eq!(event.previous_seq, None);
    }

    #[test]
    fn a_message_without_a_type_or_with_a_bad_version_is_malformed() {
        let err = StoredEvent::decode(4, None, Bytes::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "event at stream sequence 4 is malformed: no ce-type header"
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CE_TYPE, "X");
        headers.insert(header::EVENT_VERSION, "two");
        let err = StoredEvent::decode(5, Some(&headers), Bytes::new()).unwrap_err();
        assert!(err.reason.contains("jetfn-event-version"), "{err}");
    }
}

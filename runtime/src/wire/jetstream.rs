//! JetStream's API messages jetfn speaks without a high-level client: publish acknowledgements,
//! direct get batches and ADR-50 atomic batch headers.

use super::event::{MalformedEvent, StoredEvent};
use super::header;
use async_nats::{HeaderMap, Message, StatusCode};
use serde::Deserialize;

/// Expected last subject sequence did not match: someone else appended first.
pub const WRONG_LAST_SEQUENCE: u64 = 10071;
/// Clustered stream: another publish to the same subject is in flight.
pub const CLUSTERED_IN_FLIGHT: u64 = 10164;
/// An atomic batch carried a `Nats-Msg-Id` already stored: an earlier attempt landed.
pub const BATCH_DUPLICATE_MSG_ID: u64 = 10201;
/// Too many atomic batches in flight on the stream.
pub const BATCH_TOO_MANY_INFLIGHT: u64 = 10210;

/// What a publish acknowledgement says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubAck {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Already stored at this sequence (same `Nats-Msg-Id` inside the duplicate window).
    Duplicate(u64),
    /// Refused, with JetStream's error code and description.
    Refused {
        /// JetStream's `err_code`.
        code: u64,
        /// What the server said.
        description: String,
    },
}

impl PubAck {
    /// Whether a refusal means the aggregate changed since it was read (or our own earlier
    /// attempt landed): catch up and decide again.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            PubAck::Duplicate(_)
                | PubAck::Refused {
                    code: WRONG_LAST_SEQUENCE | CLUSTERED_IN_FLIGHT | BATCH_DUPLICATE_MSG_ID,
                    ..
                }
        )
    }
}

#[derive(Deserialize)]
struct RawAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Reads a publish acknowledgement (also the commit reply of an atomic batch, whose failure
/// still carries a `seq` of 0).
pub fn parse_pub_ack(reply: &[u8]) -> Result<PubAck, String> {
    let ack: RawAck = serde_json::from_slice(reply).map_err(|e| {
        format!(
            "unreadable acknowledgement {:?}: {e}",
            String::from_utf8_lossy(reply)
        )
    })?;
    match ack.error {
        Some(error) => Ok(PubAck::Refused {
            code: error.err_code,
            description: error.description,
        }),
        None if ack.duplicate => Ok(PubAck::Duplicate(ack.seq)),
        None if ack.seq == 0 => Err("acknowledgement without a sequence".into()),
        None => Ok(PubAck::Stored(ack.seq)),
    }
}

/// The body of a direct get batch request: up to `batch` messages on `subject` from `seq` on.
pub fn direct_get_batch(seq: u64, subject: &str, batch: usize) -> Vec<u8> {
    serde_json::json!({ "seq": seq, "next_by_subj": subject, "batch": batch })
        .to_string()
        .into_bytes()
}

/// The body of a direct get of the first message on `subject` at or after `seq` (no batch, so
/// the server counts nothing).
pub fn direct_get_next(seq: u64, subject: &str) -> Vec<u8> {
    serde_json::json!({ "seq": seq, "next_by_subj": subject })
        .to_string()
        .into_bytes()
}

/// The body of a direct get of the message stored at `seq`, whatever its subject.
pub fn direct_get_seq(seq: u64) -> Vec<u8> {
    serde_json::json!({ "seq": seq }).to_string().into_bytes()
}

/// The body of a direct get of the last message on `subject`.
pub fn direct_get_last(subject: &str) -> Vec<u8> {
    serde_json::json!({ "last_by_subj": subject })
        .to_string()
        .into_bytes()
}

/// The body of a direct get of the last message on each of `subjects` (`multi_last`). The
/// server answers with those messages in stream order, then an end-of-batch status, or with one
/// `404 No Results` when none has a message. Wildcards would match other subjects too, so
/// callers pass literal subjects.
pub fn direct_get_multi_last(subjects: &[&str]) -> Vec<u8> {
    serde_json::json!({ "multi_last": subjects })
        .to_string()
        .into_bytes()
}

/// One reply of a direct get.
#[derive(Debug)]
pub enum DirectReply {
    /// A stored event.
    Event(StoredEvent),
    /// The end of a batch; this many more messages match.
    EndOfBatch {
        /// Matching messages after this batch.
        pending: u64,
    },
    /// Nothing (more) matches.
    NotFound,
    /// The stream does not exist or does not allow direct get.
    NoStream,
    /// A stored message that is not a jetfn event.
    Malformed(MalformedEvent),
    /// Any other failure, described.
    Failed(String),
}

/// Classifies one reply message of a direct get.
pub fn direct_reply(message: &Message) -> DirectReply {
    let headers = message.headers.as_ref();
    match message.status {
        None | Some(StatusCode::OK) => {
            let Some(seq) = header::get_u64(headers, header::NATS_SEQUENCE) else {
                return DirectReply::Malformed(MalformedEvent {
                    seq: 0,
                    reason: "direct get reply without Nats-Sequence".into(),
                });
            };
            match StoredEvent::read(seq, message) {
                Ok(event) => DirectReply::Event(event),
                Err(malformed) => DirectReply::Malformed(malformed),
            }
        }
        Some(status) if status.as_u16() == 204 => DirectReply::EndOfBatch {
            pending: header::get_u64(headers, header::NUM_PENDING).unwrap_or(0),
        },
        Some(StatusCode::NOT_FOUND) => DirectReply::NotFound,
        Some(StatusCode::NO_RESPONDERS) => DirectReply::NoStream,
        Some(status) => DirectReply::Failed(format!(
            "direct get failed: {status} {}",
            message.description.as_deref().unwrap_or_default()
        )),
    }
}

/// Adds the ADR-50 headers of message `position` (from 1) of `count` to an atomic batch.
pub fn batch_headers(headers: &mut HeaderMap, batch_id: &str, position: usize, count: usize) {
    headers.insert(header::NATS_BATCH_ID, batch_id);
    headers.insert(header::NATS_BATCH_SEQUENCE, position.to_string().as_str());
    if position == count {
        headers.insert(header::NATS_BATCH_COMMIT, header::BATCH_COMMIT_FINAL);
    }
}

/// Sets the optimistic-concurrency precondition: the subject's last message is at `seq`.
pub fn expect_last_subject_sequence(headers: &mut HeaderMap, seq: u64) {
    headers.insert(
        header::EXPECTED_LAST_SUBJECT_SEQUENCE,
        seq.to_string().as_str(),
    );
}

/// The JetStream context on `client` under API prefix `api` (`$JS.API`, or a domain's
/// `$JS.<domain>.API`). The one constructor of contexts in the runtime and the CLI: build it
/// through [`crate::config::NatsConfig::jetstream`], which knows the configured prefix.
pub fn context(client: async_nats::Client, api: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::with_prefix(client, api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_last_sequence_is_a_conflict() {
        let reply = br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"},"stream":"T","seq":0}"#;
        assert!(parse_pub_ack(reply).unwrap().is_conflict());
    }

    #[test]
    fn a_failed_commit_with_seq_zero_is_not_a_success() {
        let reply = br#"{"error":{"code":400,"err_code":10077,"description":"maximum bytes exceeded"},"stream":"T","seq":0}"#;
        let ack = parse_pub_ack(reply).unwrap();
        assert!(!ack.is_conflict());
        assert!(matches!(ack, PubAck::Refused { code: 10077, .. }));
    }

    #[test]
    fn an_ack_returns_the_sequence() {
        assert_eq!(
            parse_pub_ack(br#"{"stream":"T","seq":42}"#),
            Ok(PubAck::Stored(42))
        );
    }

    #[test]
    fn a_duplicate_ack_is_a_conflict_so_the_caller_reads_the_stored_history() {
        let ack = parse_pub_ack(br#"{"stream":"T","seq":7,"duplicate":true}"#).unwrap();
        assert_eq!(ack, PubAck::Duplicate(7));
        assert!(ack.is_conflict());
    }

    #[test]
    fn garbage_and_seq_zero_are_errors() {
        assert!(parse_pub_ack(b"nope").is_err());
        assert!(parse_pub_ack(br#"{"stream":"T"}"#).is_err());
    }

    #[test]
    fn only_the_last_message_of_a_batch_commits() {
        let mut first = HeaderMap::new();
        batch_headers(&mut first, "b", 1, 2);
        assert!(header::get(Some(&first), header::NATS_BATCH_COMMIT).is_none());
        let mut last = HeaderMap::new();
        batch_headers(&mut last, "b", 2, 2);
        assert_eq!(
            header::get(Some(&last), header::NATS_BATCH_COMMIT),
            Some("1")
        );
        assert_eq!(
            header::get(Some(&last), header::NATS_BATCH_SEQUENCE),
            Some("2")
        );
    }
}

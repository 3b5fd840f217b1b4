//! Turning a NATS request into a checked command: subject, command id and body.
//!
//! Everything here is pure, so every rule of the wire contract has a unit test.

use crate::Aggregate;
use crate::codec::{decode_variant, variant_names};
use crate::telemetry::TraceContext;
use crate::wire::{CommandSubjects, header};
use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The longest command id (`Nats-Msg-Id`).
pub const MAX_COMMAND_ID_LEN: usize = 128;

/// A request that passed the wire checks; the command itself is decoded later.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CommandRequest {
    pub id: String,
    pub command: String,
    pub command_id: String,
    pub body: Value,
    /// Fingerprint of command and body, to recognise a reused command id.
    pub fingerprint: String,
    /// The caller's trace (or a new one), continued by the stored events.
    pub trace: crate::telemetry::TraceContext,
}

/// The wire checks of one request, in order: the subject (aggregate id and command), the
/// command id header, the body (at most `max_body_bytes`), the trace context, then the decoding
/// into `A::Command`. `Err` is the `invalid` reply's message.
pub(crate) fn check<A: Aggregate>(
    subjects: &CommandSubjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    max_body_bytes: usize,
) -> Result<(CommandRequest, A::Command), String> {
    check_for::<A::Command>(
        &format!("aggregate {}", A::NAME),
        subjects,
        subject,
        headers,
        payload,
        max_body_bytes,
    )
}

/// [`check`] for the commands `C` of `owner` (`aggregate account`, `decision bank`).
pub(crate) fn check_for<C: DeserializeOwned>(
    owner: &str,
    subjects: &CommandSubjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    max_body_bytes: usize,
) -> Result<(CommandRequest, C), String> {
    let (id, command) = subjects.parse(subject)?;
    let command_id = match header::get(headers, header::MSG_ID) {
        Some(value) => {
            check_command_id(value)?;
            value.to_owned()
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let body = parse_body(payload, max_body_bytes)?;
    check_trace_headers(headers)?;
    let trace = TraceContext::from_headers(headers)
        .unwrap_or_else(TraceContext::new_root)
        .child();
    let request = CommandRequest {
        id: id.to_owned(),
        command: command.to_owned(),
        command_id,
        fingerprint: fingerprint(command, &body),
        body,
        trace,
    };
    let decoded = decode_for::<C>(owner, &request)?;
    Ok((request, decoded))
}

/// Decodes a checked request into the aggregate's command type.
pub(crate) fn decode<A: Aggregate>(request: &CommandRequest) -> Result<A::Command, String> {
    decode_for::<A::Command>(&format!("aggregate {}", A::NAME), request)
}

/// Decodes a checked request into the command type `C` of the function named `owner`.
pub(crate) fn decode_for<C: DeserializeOwned>(
    owner: &str,
    request: &CommandRequest,
) -> Result<C, String> {
    let known = variant_names::<C>();
    if !known.is_empty() && !known.contains(&request.command.as_str()) {
        return Err(format!(
            "unknown command {:?} for {}; known commands: {}",
            request.command,
            owner,
            known.join(", ")
        ));
    }
    decode_variant(&request.command, request.body.clone()).map_err(|e| e.to_string())
}

/// The longest `tracestate` W3C trace context asks vendors to pass on, and its most members.
pub(crate) const MAX_TRACESTATE_LEN: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// The longest `traceparent` accepted: version 00 is 55 characters; later versions may add
/// fields, within reason.
const MAX_TRACEPARENT_LEN: usize = 256;

/// Trace context headers within W3C's limits, so no oversized value is stored on every event.
/// A malformed but small `traceparent` is not an error: the command starts a new trace.
pub(crate) fn check_trace_headers(headers: Option<&async_nats::HeaderMap>) -> Result<(), String> {
    use crate::wire::header;
    if let Some(parent) = header::get(headers, header::TRACEPARENT)
        && parent.len() > MAX_TRACEPARENT_LEN
    {
        return Err(format!(
            "header {} is {} bytes; at most {MAX_TRACEPARENT_LEN} are accepted",
            header::TRACEPARENT,
            parent.len()
        ));
    }
    if let Some(state) = header::get(headers, header::TRACESTATE) {
        if state.len() > MAX_TRACESTATE_LEN {
            return Err(format!(
                "header {} is {} bytes; W3C trace context allows {MAX_TRACESTATE_LEN}",
                header::TRACESTATE,
                state.len()
            ));
        }
        if state.split(',').count() > MAX_TRACESTATE_MEMBERS {
            return Err(format!(
                "header {} has more than {MAX_TRACESTATE_MEMBERS} list members",
                header::TRACESTATE
            ));
        }
    }
    Ok(())
}

/// Command ids: 1 to 128 visible ASCII characters.
pub(crate) fn check_command_id(command_id: &str) -> Result<(), String> {
    let visible = command_id.bytes().all(|b| b.is_ascii_graphic());
    if command_id.is_empty() || command_id.len() > MAX_COMMAND_ID_LEN || !visible {
        return Err(format!(
            "{} {command_id:?} must be 1 to {MAX_COMMAND_ID_LEN} visible ASCII characters",
            crate::wire::header::MSG_ID
        ));
    }
    Ok(())
}

/// The body: a JSON object of the command's fields; empty means `{}`.
pub(crate) fn parse_body(payload: &[u8], max_bytes: usize) -> Result<Value, String> {
    if payload.len() > max_bytes {
        return Err(format!(
            "body is {} bytes; the limit is {max_bytes}",
            payload.len()
        ));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_slice(payload) {
        Ok(Value::Object(fields)) => Ok(Value::Object(fields)),
        Ok(_) => Err("body must be a JSON object of the command's fields".into()),
        Err(err) => Err(format!("body is not valid JSON: {err}")),
    }
}

/// A stable 64-bit FNV-1a fingerprint of a command, so a reused command id with a different
/// command is recognised. Stable across builds, unlike `std`'s hasher.
pub(crate) fn fingerprint(command: &str, body: &Value) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{command}\n{body}");
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_trace_context_is_invalid_and_names_the_header() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("tracestate", "a=1");
        assert!(check_trace_headers(Some(&headers)).is_ok());
        headers.insert("tracestate", "x".repeat(513).as_str());
        let err = check_trace_headers(Some(&headers)).unwrap_err();
        assert!(err.contains("tracestate") && err.contains("513"), "{err}");
        let mut members = async_nats::HeaderMap::new();
        members.insert("tracestate", vec!["a=1"; 33].join(",").as_str());
        assert!(check_trace_headers(Some(&members)).is_err());
        let mut parent = async_nats::HeaderMap::new();
        parent.insert("traceparent", "0".repeat(300).as_str());
        assert!(
            check_trace_headers(Some(&parent))
                .unwrap_err()
                .contains("traceparent")
        );
    }

    #[test]
    fn command_ids_are_visible_ascii() {
        assert!(check_command_id("018f3a5e-7c1d-7000-8000-000000000000").is_ok());
        for bad in ["", "a b", &"x".repeat(129)] {
            assert!(check_command_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_empty_body_means_no_fields() {
        assert_eq!(parse_body(b"", 10), Ok(Value::Object(Map::new())));
        assert_eq!(parse_body(b" \n", 10), Ok(Value::Object(Map::new())));
    }

    #[test]
    fn bodies_must_be_json_objects_within_the_limit() {
        assert!(
            parse_body(b"not json", 100)
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(parse_body(b"[1]", 100).unwrap_err().contains("JSON object"));
        assert_eq!(
            parse_body(b"{\"a\":1}", 3).unwrap_err(),
            "body is 7 bytes; the limit is 3"
        );
    }

    #[test]
    fn fingerprints_ignore_key_order_and_differ_by_content() {
        let a = fingerprint("deposit", &serde_json::json!({"amount": 1, "memo": "x"}));
        let b = fingerprint(
            "deposit",
            &serde_json::from_str(r#"{"memo":"x","amount":1}"#).unwrap(),
        );
        let c = fingerprint("deposit", &serde_json::json!({"amount": 2, "memo": "x"}));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

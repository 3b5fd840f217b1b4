//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default). Not
//! an API: nothing here is stable.
//!
//! The command function's wire checks are crate-private (`command/request.rs`, inside the
//! private `command::request` module). This module compiles that very file a second time, as
//! its own child module, so the fuzz targets run the same code without widening its
//! visibility, and [`check_request`] chains the checks in the order `CommandFunction::check`
//! does. Keep the two in step.

use crate::Aggregate;
use crate::codec::{decode_variant, variant_names};
use crate::telemetry::TraceContext;
use crate::wire::{CommandSubjects, header};
use async_nats::HeaderMap;
use serde_json::Value;

// The same file as `command::request`, on purpose (see the module documentation): what is
// fuzzed is the code the command function runs, while its visibility stays crate-private.
#[path = "command/request.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod request;

pub use request::MAX_COMMAND_ID_LEN;

/// What the command function makes of a request before it loads the aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedRequest {
    /// The aggregate id, from the subject.
    pub id: String,
    /// The command name, from the subject.
    pub command: String,
    /// The command id: `Nats-Msg-Id`, or a new UUID v7 when absent.
    pub command_id: String,
    /// The body: a JSON object.
    pub body: Value,
    /// The fingerprint of command and body.
    pub fingerprint: String,
    /// The trace the stored events continue.
    pub trace: TraceContext,
}

/// The command function's wire checks of one request, in its order: the subject (aggregate id
/// and command), the command id header, the body (at most `max_body_bytes`), the trace context,
/// the fingerprint, and the decoding into `A::Command`. `Err` is the `invalid` reply's message.
pub fn check_request<A: Aggregate>(
    subjects: &CommandSubjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    max_body_bytes: usize,
) -> Result<(CheckedRequest, A::Command), String> {
    let (id, command) = subjects.parse(subject)?;
    let command_id = match header::get(headers, header::MSG_ID) {
        Some(value) => {
            request::check_command_id(value)?;
            value.to_owned()
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let body = request::parse_body(payload, max_body_bytes)?;
    let trace = TraceContext::from_headers(headers)
        .unwrap_or_else(TraceContext::new_root)
        .child();
    let checked = CheckedRequest {
        id: id.to_owned(),
        command: command.to_owned(),
        command_id,
        fingerprint: request::fingerprint(command, &body),
        body,
        trace,
    };
    let known = variant_names::<A::Command>();
    if !known.is_empty() && !known.contains(&checked.command.as_str()) {
        return Err(format!(
            "unknown command {:?} for aggregate {}; known commands: {}",
            checked.command,
            A::NAME,
            known.join(", ")
        ));
    }
    let decoded =
        decode_variant(&checked.command, checked.body.clone()).map_err(|e| e.to_string())?;
    Ok((checked, decoded))
}

/// The command id check alone (`Nats-Msg-Id`: 1 to 128 visible ASCII characters).
pub fn check_command_id(command_id: &str) -> Result<(), String> {
    request::check_command_id(command_id)
}

/// The body check alone: a JSON object within `max_bytes`; blank means `{}`.
pub fn parse_body(payload: &[u8], max_bytes: usize) -> Result<Value, String> {
    request::parse_body(payload, max_bytes)
}

/// The fingerprint of a command and its body.
pub fn fingerprint(command: &str, body: &Value) -> String {
    request::fingerprint(command, body)
}

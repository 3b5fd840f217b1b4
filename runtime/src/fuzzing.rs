//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default). Not
//! an API: nothing here is stable.
//!
//! The command function's wire checks are crate-private (`command::request`); this module
//! calls the very same functions, so what is fuzzed is what the command function runs.

use crate::Aggregate;
use crate::telemetry::TraceContext;
use crate::wire::CommandSubjects;
use async_nats::HeaderMap;
use serde_json::Value;

use crate::command::request;

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

/// The command function's wire checks of one request (`command::request::check`): the subject,
/// the command id header, the body (at most `max_body_bytes`), the trace headers, and the
/// decoding into `A::Command`. `Err` is the `invalid` reply's message.
pub fn check_request<A: Aggregate>(
    subjects: &CommandSubjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    max_body_bytes: usize,
) -> Result<(CheckedRequest, A::Command), String> {
    let (checked, decoded) =
        request::check::<A>(subjects, subject, headers, payload, max_body_bytes)?;
    let checked = CheckedRequest {
        id: checked.id,
        command: checked.command,
        command_id: checked.command_id,
        body: checked.body,
        fingerprint: checked.fingerprint,
        trace: checked.trace,
    };
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

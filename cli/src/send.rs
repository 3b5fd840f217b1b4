//! `jetfn send`: one command, its reply printed.

use crate::common::{Global, format_duration, parse_duration, redact, say, say_json, usage};
use anyhow::{Context, Result, anyhow};
use async_nats::{HeaderMap, RequestErrorKind};
use jetfn::wire::{CommandSubjects, header, names};
use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  jetfn send account.alice.open '{\"owner\":\"Alice\",\"initial_deposit\":100}'
  jetfn send account.alice.withdraw '{\"amount\":30}' --id my-command-1
  jetfn send account.alice.close            # no body: {}
  jetfn send account.alice.deposit '{\"amount\":5}' --prefix tenant-1 --timeout 2s

The request goes to cmd.<aggregate>.<id>.<command> (or <prefix>.cmd...). --id sets the
Nats-Msg-Id header, the command id: resending with the same id is applied at most once.

Exit status: 0 when the reply says \"ok\":true; 1 on an error reply (its kind and code go to
stderr); 2 when nothing answered (no responders, timeout, no server) or the arguments are wrong.";

/// Arguments of `jetfn send`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The command as <aggregate>.<id>.<command>, e.g. account.alice.deposit
    #[arg(value_name = "AGGREGATE.ID.COMMAND")]
    target: String,

    /// The command's fields as a JSON object; empty or omitted means {}
    #[arg(value_name = "JSON")]
    body: Option<String>,

    /// Command id (header Nats-Msg-Id), the idempotency key: 1-128 visible ASCII characters
    #[arg(long, value_name = "COMMAND_ID")]
    id: Option<String>,

    /// How long to wait for the reply
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,

    /// Subject prefix the function serves under (default: command.subject_prefix of the config)
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
}

/// Sends the command; exit 0 on ok, 1 on an error reply.
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let root = format!("{}.", names::COMMAND_ROOT);
    let target = args.target.strip_prefix(&root).unwrap_or(&args.target);
    let tokens: Vec<&str> = target.split('.').collect();
    let [aggregate, id, command] = tokens.as_slice() else {
        return Err(usage(format!(
            "expected <aggregate>.<id>.<command> (e.g. account.alice.open), got {:?}",
            args.target
        )));
    };
    // Only what would break the subject is checked here; the function itself answers `invalid`
    // for an id or command it does not accept, naming the rule.
    for (what, token) in [("aggregate", aggregate), ("id", id), ("command", command)] {
        let ok = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>');
        if !ok {
            return Err(usage(format!(
                "the {what} in {:?} must be a non-empty subject token without spaces, `*` or `>`",
                args.target
            )));
        }
    }
    let body = body_bytes(args.body.as_deref())?;
    if let Some(command_id) = &args.id {
        let valid = (1..=128).contains(&command_id.len())
            && command_id.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(usage(format!(
                "--id {command_id:?} must be 1-128 visible ASCII characters (no spaces)"
            )));
        }
    }

    let config = global.config()?;
    let prefix = args
        .prefix
        .or_else(|| config.command.subject_prefix.clone());
    let subject = CommandSubjects::new(prefix.as_deref(), aggregate).subject(id, command);
    let client = config.nats.connect(crate::common::CONNECTION).await?;
    let mut headers = HeaderMap::new();
    if let Some(command_id) = &args.id {
        headers.insert(header::MSG_ID, command_id.as_str());
    }
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(body)
        .timeout(Some(args.timeout));
    let reply = client
        .send_request(subject.clone(), request)
        .await
        .map_err(|err| match err.kind() {
            RequestErrorKind::NoResponders => anyhow!(
                "no function answers on {subject} at {} (no responders): is the {aggregate} \
                 function running{}?",
                redact(&config.nats.url),
                prefix
                    .as_deref()
                    .map(|p| format!(" with subject prefix {p}"))
                    .unwrap_or_default()
            ),
            RequestErrorKind::TimedOut => anyhow!(
                "no reply on {subject} within {}; resend with the same --id to retry safely",
                format_duration(args.timeout)
            ),
            _ => anyhow!("request on {subject} failed: {err}"),
        })?;
    let value: Value = serde_json::from_slice(&reply.payload).with_context(|| {
        format!(
            "the reply is not JSON: {:?}",
            String::from_utf8_lossy(&reply.payload)
        )
    })?;
    // Printed in the reply's own field order (`ok` first), which a `Value` would sort.
    match serde_json::from_slice::<Ordered>(&reply.payload) {
        Ok(ordered) => {
            say(serde_json::to_string_pretty(&ordered).unwrap_or_else(|_| value.to_string()))
        }
        Err(_) => say_json(&value),
    }
    match value.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(ExitCode::SUCCESS),
        Some(false) => {
            let kind = value
                .pointer("/error/kind")
                .and_then(Value::as_str)
                .unwrap_or("error");
            let message = value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            let code = header::get(reply.headers.as_ref(), header::SERVICE_ERROR_CODE)
                .unwrap_or_else(|| kind_code(kind));
            eprintln!("jetfn: {kind} ({code}): {message}");
            Ok(ExitCode::from(1))
        }
        None => Err(anyhow!("the reply has no \"ok\" field: {value}")),
    }
}

/// The body to send: `{}` when empty, the text itself when it is a JSON object.
fn body_bytes(body: Option<&str>) -> Result<bytes::Bytes> {
    let text = body.unwrap_or("").trim();
    if text.is_empty() {
        return Ok(bytes::Bytes::from_static(b"{}"));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        usage(format!(
            "the body is not valid JSON ({e}); nothing was sent. Write a JSON object, \
             e.g. '{{\"amount\":50}}'"
        ))
    })?;
    if !value.is_object() {
        return Err(usage(format!(
            "the body must be a JSON object, got {value}; nothing was sent"
        )));
    }
    Ok(bytes::Bytes::copy_from_slice(text.as_bytes()))
}

/// A JSON object that keeps its fields in the order they came.
struct Ordered(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered, A::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry::<String, Value>()? {
                    fields.push(field);
                }
                Ok(Ordered(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl serde::Serialize for Ordered {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

fn kind_code(kind: &str) -> &'static str {
    match kind {
        "invalid" => "400",
        "rejected" => "422",
        "conflict" => "409",
        "unavailable" => "503",
        _ => "?",
    }
}

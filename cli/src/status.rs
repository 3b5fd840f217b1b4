//! `jetfn status`: what runs (through the NATS services protocol), the JetStream streams, and
//! each projection's generation, checkpoint, lag and dead letters.

use crate::common::{Global, format_bytes, say, say_json, table};
use anyhow::{Context, Result};
use async_nats::Client;
use async_nats::jetstream;
use futures::{StreamExt, TryStreamExt};
use jetfn::wire::names::{self, meta};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  jetfn status
  jetfn status --json | jq '.projections[] | {name, lag}'

Functions are found with $SRV.PING (replies collected for --wait), then asked $SRV.INFO and
$SRV.STATS. KIND is the jetfn.kind metadata (command, projection or process-manager); REQUESTS/PROCESSED is the
requests a command function answered, or the events a projection applied; ERRORS counts conflict
and unavailable replies of command functions, and failed batches of projections. Projection
numbers come from their STATS data, refreshed about once a second.";

/// Arguments of `jetfn status`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// How long to collect $SRV.PING replies
    #[arg(long, default_value = "300ms", value_parser = crate::common::parse_duration,
          value_name = "DURATION")]
    wait: Duration,
}

/// One service (all its instances).
#[derive(Default)]
struct Service {
    kind: String,
    version: String,
    description: String,
    instances: BTreeSet<String>,
    metadata: BTreeMap<String, String>,
    requests: u64,
    errors: u64,
    /// STATS `data` of each instance that sent any.
    data: Vec<Value>,
}

/// Prints the status table or document.
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let (client, config) = global.connect().await?;
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    for ping in collect(&client, names::SERVICE_PING_ALL, args.wait, None).await? {
        let (Some(name), Some(id)) = (str_of(&ping, "name"), str_of(&ping, "id")) else {
            continue;
        };
        let service = services.entry(name.to_owned()).or_default();
        service.instances.insert(id.to_owned());
        service.version = str_of(&ping, "version").unwrap_or_default().to_owned();
        if let Some(metadata) = ping.get("metadata").and_then(Value::as_object) {
            for (key, value) in metadata {
                if let Some(value) = value.as_str() {
                    service.metadata.insert(key.clone(), value.to_owned());
                }
            }
        }
    }
    // Ask each service for INFO and STATS, all at once, until every instance answered.
    let asks = services.iter().map(|(name, service)| {
        let client = client.clone();
        let expected = service.instances.len();
        let name = name.clone();
        async move {
            let wait = Duration::from_secs(2);
            let (info_subject, stats_subject) =
                (names::service_info(&name), names::service_stats(&name));
            let (info, stats) = tokio::join!(
                collect(&client, &info_subject, wait, Some(expected)),
                collect(&client, &stats_subject, wait, Some(expected)),
            );
            (name, info, stats)
        }
    });
    for (name, info, stats) in futures::future::join_all(asks).await {
        let Some(service) = services.get_mut(&name) else {
            continue;
        };
        for info in info? {
            service.description = str_of(&info, "description").unwrap_or_default().to_owned();
        }
        for stats in stats? {
            add_stats(service, &stats);
        }
        service.kind = service
            .metadata
            .get(meta::KIND)
            .cloned()
            .unwrap_or_else(|| "-".into());
    }

    let streams = list_streams(&config.nats.jetstream(client.clone())).await;
    let functions: Vec<Value> = services
        .iter()
        .map(|(name, s)| {
            json!({
                "name": name,
                "kind": s.kind,
                "version": s.version,
                "description": s.description,
                "instances": s.instances.len(),
                "requests": s.requests,
                "processed": sum_data(&s.data, "processed"),
                "errors": s.errors,
                "metadata": s.metadata.iter()
                    .filter(|(k, _)| k.as_str() != meta::SCHEMAS)
                    .collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    let projections: Vec<Value> = services
        .iter()
        .filter(|(_, s)| s.kind == names::KIND_PROJECTION)
        .map(|(name, s)| projection_json(name, s))
        .collect();
    let process_managers: Vec<Value> = services
        .iter()
        .filter(|(_, s)| s.kind == names::KIND_PROCESS_MANAGER)
        .map(|(name, s)| process_manager_json(name, s))
        .collect();

    if global.json {
        let streams = match &streams {
            Ok(streams) => json!(streams),
            Err(err) => json!({ "error": format!("{err:#}") }),
        };
        say_json(&json!({
            "server": crate::common::redact(&config.nats.url),
            "functions": functions,
            "streams": streams,
            "projections": projections,
            "process_managers": process_managers,
        }));
        return Ok(ExitCode::SUCCESS);
    }

    say(format!(
        "FUNCTIONS (at {})",
        crate::common::redact(&config.nats.url)
    ));
    if functions.is_empty() {
        say(format!("  none answered {}", names::SERVICE_PING_ALL));
    } else {
        let rows: Vec<Vec<String>> = functions
            .iter()
            .map(|f| {
                let handled = if f["kind"] == names::KIND_PROJECTION {
                    &f["processed"]
                } else {
                    &f["requests"]
                };
                vec![
                    text(&f["name"]),
                    text(&f["kind"]),
                    text(&f["instances"]),
                    text(handled),
                    text(&f["errors"]),
                ]
            })
            .collect();
        say(table(
            &["NAME", "KIND", "INSTANCES", "REQUESTS/PROCESSED", "ERRORS"],
            &rows,
        ));
    }
    say("");
    say("STREAMS");
    match &streams {
        Ok(streams) if streams.is_empty() => say("  none"),
        Ok(streams) => {
            let rows: Vec<Vec<String>> = streams
                .iter()
                .map(|s| {
                    vec![
                        text(&s["name"]),
                        text(&s["messages"]),
                        format_bytes(s["bytes"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            say(table(&["NAME", "MESSAGES", "BYTES"], &rows));
        }
        Err(err) => say(format!("  cannot list streams: {err:#}")),
    }
    say("");
    say("PROJECTIONS");
    if projections.is_empty() {
        say("  none running");
    } else {
        let rows: Vec<Vec<String>> = projections
            .iter()
            .map(|p| {
                vec![
                    text(&p["name"]),
                    text(&p["generation"]),
                    text(&p["checkpoint"]),
                    text(&p["lag"]),
                    text(&p["dead_letters"]),
                ]
            })
            .collect();
        say(table(
            &["NAME", "GENERATION", "CHECKPOINT", "LAG", "DEAD_LETTERS"],
            &rows,
        ));
    }
    if !process_managers.is_empty() {
        say("");
        say("PROCESS MANAGERS (instance counts since each instance started)");
        let rows: Vec<Vec<String>> = process_managers
            .iter()
            .map(|p| {
                vec![
                    text(&p["name"]),
                    text(&p["open"]),
                    text(&p["completed"]),
                    text(&p["compensated"]),
                    text(&p["pending_commands"]),
                    format!("{}/{}", text(&p["timers_set"]), text(&p["timers_fired"])),
                    text(&p["dead_letters"]),
                ]
            })
            .collect();
        say(table(
            &[
                "NAME",
                "OPEN",
                "COMPLETED",
                "COMPENSATED",
                "PENDING_COMMANDS",
                "TIMERS_SET/FIRED",
                "DEAD_LETTERS",
            ],
            &rows,
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// A process manager's row: counters summed over its instances; the pending commands are the
/// outbox consumer's, which every instance reports alike, so the largest report is taken.
fn process_manager_json(name: &str, service: &Service) -> Value {
    let sum = |group: &str, key: &str| -> u64 {
        service
            .data
            .iter()
            .filter_map(|d| {
                d.get(group)
                    .and_then(|g| g.get(key))
                    .and_then(Value::as_u64)
            })
            .fold(0, u64::saturating_add)
    };
    let pending = service
        .data
        .iter()
        .filter_map(|d| d.pointer("/commands/pending").and_then(Value::as_u64))
        .max();
    json!({
        "name": name,
        "instances": service.instances.len(),
        "stream": service.metadata.get(meta::STREAM),
        "instance_stream": service.metadata.get(meta::INSTANCES),
        "timer_stream": service.metadata.get(meta::TIMERS),
        "started": sum("instances", "started"),
        "open": sum("instances", "open"),
        "completed": sum("instances", "completed"),
        "compensated": sum("instances", "compensated"),
        "pending_commands": pending,
        "commands_in_flight": sum("commands", "in_flight"),
        "commands_retried": sum("commands", "retried"),
        "timers_set": sum("timers", "set"),
        "timers_fired": sum("timers", "fired"),
        "timers_ignored": sum("timers", "ignored"),
        "dead_letters": sum_data(&service.data, "dead_letters"),
        "errors": sum_data(&service.data, "errors"),
    })
}

/// Publishes an empty request on `subject` and collects the JSON replies until `wait` passes or
/// `expected` replies came.
async fn collect(
    client: &Client,
    subject: &str,
    wait: Duration,
    expected: Option<usize>,
) -> Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .with_context(|| format!("subscribing for {subject} replies"))?;
    client
        .publish_with_reply(subject.to_owned(), inbox, bytes::Bytes::new())
        .await
        .with_context(|| format!("asking {subject}"))?;
    client
        .flush()
        .await
        .with_context(|| format!("asking {subject}"))?;
    let deadline = crate::common::deadline_after(wait)?;
    let mut values = Vec::new();
    while expected.is_none_or(|n| values.len() < n) {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break;
        };
        // A status message (no responders) carries no reply.
        if message.status.is_some() {
            continue;
        }
        if let Ok(value) = serde_json::from_slice::<Value>(&message.payload) {
            values.push(value);
        }
    }
    Ok(values)
}

/// Adds one instance's STATS reply.
fn add_stats(service: &mut Service, stats: &Value) {
    let endpoints = stats
        .get("endpoints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut data: Option<Value> = None;
    for endpoint in &endpoints {
        let name = endpoint.get("name").and_then(Value::as_str).unwrap_or("");
        let count = |key: &str| endpoint.get(key).and_then(Value::as_u64).unwrap_or(0);
        // A projection's status endpoint counts `jetfn status`-like polls, not work.
        if name != "status" {
            service.requests = service.requests.saturating_add(count("num_requests"));
        }
        service.errors = service.errors.saturating_add(count("num_errors"));
        // The same data is attached to every endpoint of an instance: take it once.
        if data.is_none()
            && let Some(d) = endpoint.get("data").filter(|d| d.is_object())
        {
            data = Some(d.clone());
        }
    }
    if let Some(data) = data {
        let count = |key: &str| data.get(key).and_then(Value::as_u64).unwrap_or(0);
        let errors = match service.metadata.get(meta::KIND).map(String::as_str) {
            Some(names::KIND_COMMAND) => count("conflict").saturating_add(count("unavailable")),
            Some(names::KIND_PROJECTION | names::KIND_PROCESS_MANAGER) => count("errors"),
            _ => 0,
        };
        service.errors = service.errors.saturating_add(errors);
        service.data.push(data);
    }
}

/// A projection's row: the numbers of its most advanced instance (they all read the same Redis
/// checkpoints), with `processed`, `dead_letters` and `errors` summed over instances.
fn projection_json(name: &str, service: &Service) -> Value {
    let leader = service.data.iter().max_by_key(|d| {
        (
            d.get("generation").and_then(Value::as_u64).unwrap_or(0),
            d.get("checkpoint").and_then(Value::as_u64).unwrap_or(0),
        )
    });
    let field = |key: &str| {
        leader
            .and_then(|d| d.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    json!({
        "name": name,
        "instances": service.instances.len(),
        "stream": service.metadata.get(meta::STREAM),
        "partitions": service.metadata.get(meta::PARTITIONS).and_then(|p| p.parse::<u64>().ok()),
        "generation": field("generation"),
        "checkpoint": field("checkpoint"),
        "checkpoints": field("checkpoints"),
        "stream_last_seq": field("stream_last_seq"),
        "lag": field("lag"),
        "processed": sum_data(&service.data, "processed"),
        "dead_letters": sum_data(&service.data, "dead_letters"),
        "errors": sum_data(&service.data, "errors"),
    })
}

fn sum_data(data: &[Value], key: &str) -> Value {
    if data.iter().all(|d| d.get(key).is_none()) {
        return Value::Null;
    }
    data.iter()
        .filter_map(|d| d.get(key).and_then(Value::as_u64))
        .fold(0u64, u64::saturating_add)
        .into()
}

/// Every JetStream stream with its message and byte counts.
async fn list_streams(js: &jetstream::Context) -> Result<Vec<Value>> {
    let infos: Vec<jetstream::stream::Info> = js
        .streams()
        .try_collect()
        .await
        .context("listing JetStream streams")?;
    let mut streams: Vec<Value> = infos
        .iter()
        .map(|info| {
            json!({
                "name": info.config.name,
                "subjects": info.config.subjects,
                "messages": info.state.messages,
                "bytes": info.state.bytes,
                "first_seq": info.state.first_sequence,
                "last_seq": info.state.last_sequence,
                "consumers": info.state.consumer_count,
            })
        })
        .collect();
    streams.sort_by(|a, b| text(&a["name"]).cmp(&text(&b["name"])));
    Ok(streams)
}

fn str_of<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// A JSON value as table text: strings without quotes, null as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

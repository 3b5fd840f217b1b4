//! Comparing the declared resources with the server, field by field, judging each change, and
//! applying them.
//!
//! Only the fields a file sets are compared and changed: everything else keeps the server's
//! value (or its default, for a new resource). Values that mean "unlimited" or "not set"
//! (`0`, `-1`, `false`, `""`, `[]`, `{}`) compare equal, and a field the server fills with a
//! default (`duplicate_window`, `num_replicas`, `ack_wait`, ...) is left alone when the file
//! leaves it unset.

use super::files::{
    DURATION_FIELDS, Declared, Resource, consumer_config, json_of, kv_config, stream_config, typed,
};
use crate::common::{format_bytes, format_nanos};
use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use futures::{StreamExt, TryStreamExt};
use jetfn::wire::names;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Fields whose value `<= 0` means "no limit".
const LIMITS: &[&str] = &[
    "max_bytes",
    "max_msgs",
    "max_msgs_per_subject",
    "max_consumers",
    "max_msg_size",
    "max_age",
    "max_deliver",
    "max_ack_pending",
    "max_waiting",
    "max_batch",
    "max_expires",
    "max_value_size",
];

/// Fields the server fills in when they are not set: an unset value in a file leaves them alone.
const SERVER_DEFAULTS: &[&str] = &[
    "duplicate_window",
    "num_replicas",
    "ack_wait",
    "max_waiting",
    "max_ack_pending",
    "inactive_threshold",
    "metadata",
    "consumer_limits",
    "first_seq",
    "max_expires",
];

/// Consumer fields JetStream refuses to change on an existing consumer.
const CONSUMER_FIXED: &[&str] = &[
    "deliver_policy",
    "opt_start_seq",
    "opt_start_time",
    "ack_policy",
    "replay_policy",
    "max_waiting",
];

/// Fields that name the resource rather than configure it.
const IDENTITY: &[&str] = &["name", "durable_name", "bucket"];

/// KV bucket fields and the fields of the stream `KV_<bucket>` that hold them.
const KV_FIELDS: &[(&str, &str)] = &[
    ("description", "description"),
    ("history", "max_msgs_per_subject"),
    ("max_age", "max_age"),
    ("max_bytes", "max_bytes"),
    ("max_value_size", "max_msg_size"),
    ("storage", "storage"),
    ("num_replicas", "num_replicas"),
    ("compression", "compression"),
];

/// Why a change is not simply applied.
#[derive(Debug, Clone)]
pub enum Problem {
    /// It can lose or refuse data: only with `--force`.
    Destructive(String),
    /// JetStream cannot do it in place; jetfn never deletes, so never.
    Impossible(String),
}

/// One field that differs.
#[derive(Debug, Clone)]
pub struct Change {
    /// The field as the file names it.
    pub field: String,
    /// What the server has.
    pub from: String,
    /// What the file says.
    pub to: String,
    /// Why it needs care, if it does.
    pub problem: Option<Problem>,
}

/// What to do with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It does not exist yet.
    Create,
    /// It exists and differs.
    Update,
    /// It exists as declared.
    Unchanged,
}

/// The request that applies an item.
#[derive(Debug)]
pub enum Step {
    /// Nothing to do.
    Nothing,
    /// Create a stream.
    CreateStream(Box<stream::Config>),
    /// Update a stream (or the stream of a KV bucket).
    UpdateStream(Box<stream::Config>),
    /// Create a KV bucket.
    CreateKv(Box<kv::Config>),
    /// Create a consumer on the stream.
    CreateConsumer(String, Box<pull::Config>),
    /// Update a consumer of the stream.
    UpdateConsumer(String, Box<pull::Config>),
}

/// One declared resource, compared.
#[derive(Debug)]
pub struct Item {
    /// `stream NAME`, `kv BUCKET`, `consumer STREAM/NAME`.
    pub label: String,
    /// Its file.
    pub file: PathBuf,
    /// Create, update or nothing.
    pub action: Action,
    /// The fields that differ (for updates).
    pub changes: Vec<Change>,
    /// The request that applies it.
    pub step: Step,
}

impl Item {
    /// Changes that stop `apply`: impossible ones always, destructive ones without `force`.
    pub fn blocked(&self, force: bool) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(move |c| match &c.problem {
            Some(Problem::Impossible(_)) => true,
            Some(Problem::Destructive(_)) => !force,
            None => false,
        })
    }
}

/// Compares every declared resource with the server. Streams and buckets come before consumers.
pub async fn plan(js: &jetstream::Context, declared: &[Declared]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    let mut created_streams = BTreeSet::new();
    let (consumers, others): (Vec<&Declared>, Vec<&Declared>) = declared
        .iter()
        .partition(|d| matches!(d.resource, Resource::Consumer { .. }));
    for declared in others.into_iter().chain(consumers) {
        let label = declared.resource.label();
        let item = match &declared.resource {
            Resource::Stream { name, config } => {
                let item = plan_stream(js, name, config, &[]).await;
                if item.as_ref().is_ok_and(|item| item.0 == Action::Create) {
                    created_streams.insert(name.clone());
                }
                item
            }
            Resource::Kv { bucket, config } => plan_kv(js, bucket, config).await,
            Resource::Consumer {
                stream,
                name,
                config,
            } => plan_consumer(js, stream, name, config, &created_streams).await,
        }
        .with_context(|| format!("{} ({label})", declared.file.display()))?;
        let (action, changes, step) = item;
        items.push(Item {
            label,
            file: declared.file.clone(),
            action,
            changes,
            step,
        });
    }
    Ok(items)
}

type Planned = (Action, Vec<Change>, Step);

/// A stream: `names` maps stream fields to the names the file uses (for KV buckets).
async fn plan_stream(
    js: &jetstream::Context,
    name: &str,
    config: &Map<String, Value>,
    names: &[(&str, &str)],
) -> Result<Planned> {
    let Some(mut stream) = existing_stream(js, name).await? else {
        let config = stream_config(config)?;
        return Ok((
            Action::Create,
            Vec::new(),
            Step::CreateStream(Box::new(config)),
        ));
    };
    let info = stream
        .info()
        .await
        .with_context(|| format!("reading stream {name}"))?
        .clone();
    let current = json_of(&info.config)?;
    let mut changes = Vec::new();
    for (field, from, to) in differences(config, &current) {
        let problem = stream_problem(&field, &from, &to, &mut stream, &info).await;
        let shown = names
            .iter()
            .find(|(_, stream_field)| *stream_field == field)
            .map_or(field.as_str(), |(file_field, _)| file_field);
        changes.push(Change {
            field: shown.to_owned(),
            from: show(&field, &from),
            to: show(&field, &to),
            problem,
        });
    }
    if changes.is_empty() {
        return Ok((Action::Unchanged, changes, Step::Nothing));
    }
    let updated: stream::Config = typed(config, current)?;
    Ok((
        Action::Update,
        changes,
        Step::UpdateStream(Box::new(updated)),
    ))
}

async fn plan_kv(
    js: &jetstream::Context,
    bucket: &str,
    config: &Map<String, Value>,
) -> Result<Planned> {
    let stream_name = names::kv_stream(bucket);
    if existing_stream(js, &stream_name).await?.is_none() {
        let kv = kv_config(config)?;
        return Ok((Action::Create, Vec::new(), Step::CreateKv(Box::new(kv))));
    }
    let mut fields = Map::new();
    for (key, value) in config {
        let Some((_, stream_field)) = KV_FIELDS.iter().find(|(kv_field, _)| kv_field == key) else {
            continue;
        };
        let value = match (*stream_field, value) {
            ("compression", Value::Bool(true)) => json!("s2"),
            ("compression", _) => json!("none"),
            _ => value.clone(),
        };
        fields.insert((*stream_field).to_owned(), value);
    }
    plan_stream(js, &stream_name, &fields, KV_FIELDS).await
}

async fn plan_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    name: &str,
    config: &Map<String, Value>,
    created_streams: &BTreeSet<String>,
) -> Result<Planned> {
    let create = || -> Result<Planned> {
        let config = consumer_config(config)?;
        Ok((
            Action::Create,
            Vec::new(),
            Step::CreateConsumer(stream_name.to_owned(), Box::new(config)),
        ))
    };
    if created_streams.contains(stream_name) {
        return create();
    }
    let Some(stream) = existing_stream(js, stream_name).await? else {
        bail!(
            "consumer {stream_name}/{name}: stream {stream_name} does not exist and no file \
             declares it"
        );
    };
    let info = match stream.consumer_info(name).await {
        Ok(info) => info,
        Err(err) if not_found(err.kind()) => return create(),
        Err(err) => return Err(anyhow!("reading consumer {stream_name}/{name}: {err}")),
    };
    let current = json_of(&info.config)?;
    let changes: Vec<Change> = differences(config, &current)
        .into_iter()
        .map(|(field, from, to)| Change {
            from: show(&field, &from),
            to: show(&field, &to),
            problem: CONSUMER_FIXED.contains(&field.as_str()).then(|| {
                Problem::Impossible(format!(
                    "JetStream cannot change the {field} of an existing consumer; jetfn deploy \
                     never deletes one (create a consumer under a new durable_name instead)"
                ))
            }),
            field,
        })
        .collect();
    if changes.is_empty() {
        return Ok((Action::Unchanged, changes, Step::Nothing));
    }
    let updated: pull::Config = typed(config, current)?;
    Ok((
        Action::Update,
        changes,
        Step::UpdateConsumer(stream_name.to_owned(), Box::new(updated)),
    ))
}

/// The stream, or `None` when the server has none by that name.
async fn existing_stream(js: &jetstream::Context, name: &str) -> Result<Option<stream::Stream>> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(err) => match err.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(anyhow!("reading stream {name}: {err}")),
        },
    }
}

fn not_found(kind: async_nats::jetstream::context::ConsumerInfoErrorKind) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as Kind;
    match kind {
        Kind::NotFound => true,
        Kind::JetStream(e) => e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// `(field, server value, file value)` for each field the file sets that differs.
fn differences(desired: &Map<String, Value>, current: &Value) -> Vec<(String, Value, Value)> {
    let mut found = Vec::new();
    for (field, want) in desired {
        if IDENTITY.contains(&field.as_str()) {
            continue;
        }
        let have = current.get(field).cloned().unwrap_or(Value::Null);
        let (w, h) = (normal(field, want), normal(field, &have));
        if w == h || (w.is_null() && SERVER_DEFAULTS.contains(&field.as_str())) {
            continue;
        }
        found.push((field.clone(), have, want.clone()));
    }
    found
}

/// A value with every spelling of "unset"/"unlimited" turned into `null`.
fn normal(field: &str, value: &Value) -> Value {
    match value {
        Value::Bool(false) => Value::Null,
        Value::Number(n) => {
            let zero = n.as_f64() == Some(0.0);
            let unlimited = LIMITS.contains(&field) && n.as_i64().is_some_and(|i| i < 0);
            if zero || unlimited {
                Value::Null
            } else {
                value.clone()
            }
        }
        Value::String(s) if s.is_empty() || (field == "compression" && s == "none") => Value::Null,
        Value::Array(items) if items.is_empty() => Value::Null,
        Value::Array(items) if field == "subjects" || field == "filter_subjects" => {
            let mut items = items.clone();
            items.sort_by_key(|v| v.to_string());
            Value::Array(items)
        }
        Value::Object(map) => {
            // The server adds its own `_nats.*` metadata.
            let map: Map<String, Value> = map
                .iter()
                .filter(|(k, _)| !(field == "metadata" && k.starts_with("_nats.")))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if map.is_empty() {
                Value::Null
            } else {
                Value::Object(map)
            }
        }
        _ => value.clone(),
    }
}

/// A value for humans: durations as `120s`, limits `<= 0` as `unlimited`.
fn show(field: &str, value: &Value) -> String {
    let limit = LIMITS.contains(&field);
    let duration = DURATION_FIELDS.contains(&field);
    match value {
        Value::Null if limit => "unlimited".into(),
        Value::Null => "unset".into(),
        Value::Number(n) if limit && n.as_i64().is_some_and(|i| i <= 0) => "unlimited".into(),
        Value::Number(n) if duration => n
            .as_u64()
            .map_or_else(|| n.to_string(), |ns| format_nanos(u128::from(ns))),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "none".into(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                Value::Number(n) if duration => n
                    .as_u64()
                    .map_or_else(|| n.to_string(), |ns| format_nanos(u128::from(ns))),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// `Some(n)` for a limit `n > 0`, `None` for unlimited.
fn limit_of(value: &Value) -> Option<u64> {
    value.as_i64().filter(|n| *n > 0).map(|n| n as u64)
}

/// Judges a change of a stream field (streams and KV buckets).
async fn stream_problem(
    field: &str,
    from: &Value,
    to: &Value,
    stream: &mut stream::Stream,
    info: &stream::Info,
) -> Option<Problem> {
    match field {
        "storage" => Some(Problem::Impossible(
            "JetStream cannot change the storage type of a stream in place; it would have to be \
             deleted and recreated, and jetfn deploy never deletes a stream or its data, even \
             with --force (migrate it yourself, e.g. by mirroring into a new stream)"
                .into(),
        )),
        "retention" => Some(Problem::Destructive(
            "changing the retention policy changes which messages the stream keeps".into(),
        )),
        "subjects" => {
            let wanted: BTreeSet<&str> = strings(to);
            let removed: Vec<&str> = strings(from)
                .into_iter()
                .filter(|s| !wanted.contains(s))
                .collect();
            (!removed.is_empty()).then(|| {
                Problem::Destructive(format!(
                    "removes subject {}: messages published there would no longer be stored",
                    removed.join(", ")
                ))
            })
        }
        "num_replicas" => {
            let (from, to) = (from.as_u64().unwrap_or(1), to.as_u64().unwrap_or(0));
            (to > 0 && to < from).then(|| {
                Problem::Destructive(format!(
                    "lowering the replicas from {from} to {to} keeps each message on fewer servers"
                ))
            })
        }
        "max_bytes" | "max_msgs" | "max_msgs_per_subject" | "max_age" => {
            let new = limit_of(to)?;
            let Some(old) = limit_of(from) else {
                return Some(Problem::Destructive(
                    "from unlimited to a limit: messages beyond it would be dropped or refused"
                        .into(),
                ));
            };
            if new >= old {
                return None;
            }
            let held = held(field, stream, info).await;
            (held > new).then(|| {
                Problem::Destructive(format!(
                    "lowering it below what the stream holds now ({})",
                    show_held(field, held)
                ))
            })
        }
        _ => None,
    }
}

fn strings(value: &Value) -> BTreeSet<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// How much of `field`'s measure the stream holds now (bytes, messages, the oldest message's age
/// in nanoseconds, the most messages on one subject).
async fn held(field: &str, stream: &mut stream::Stream, info: &stream::Info) -> u64 {
    let state = &info.state;
    match field {
        "max_bytes" => state.bytes,
        "max_msgs" => state.messages,
        "max_age" if state.messages == 0 => 0,
        "max_age" => {
            let age = time::OffsetDateTime::now_utc() - state.first_timestamp;
            u64::try_from(age.whole_nanoseconds()).unwrap_or(0)
        }
        "max_msgs_per_subject" => match stream.info_with_subjects(">").await {
            Ok(subjects) => {
                subjects
                    .filter_map(|s| async move { s.ok().map(|(_, count)| count as u64) })
                    .fold(0, |most, count| async move { most.max(count) })
                    .await
            }
            // Unknown: assume the worst.
            Err(_) => state.messages,
        },
        _ => 0,
    }
}

fn show_held(field: &str, held: u64) -> String {
    match field {
        "max_bytes" => format_bytes(held),
        "max_age" => format!(
            "its oldest message is {} old",
            format_nanos(u128::from(held / 1_000_000_000 * 1_000_000_000))
        ),
        "max_msgs_per_subject" => format!("{held} messages on one subject"),
        _ => format!("{held} messages"),
    }
}

/// Applies one item.
pub async fn apply(js: &jetstream::Context, item: &Item) -> Result<()> {
    match &item.step {
        Step::Nothing => Ok(()),
        Step::CreateStream(config) => js
            .create_stream(config.as_ref().clone())
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("creating {}: {e}", item.label)),
        Step::UpdateStream(config) => js
            .update_stream(config.as_ref())
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("updating {}: {e}", item.label)),
        Step::CreateKv(config) => js
            .create_key_value(config.as_ref().clone())
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("creating {}: {e}", item.label)),
        Step::CreateConsumer(stream, config) => js
            .create_consumer_on_stream(config.as_ref().clone(), stream.as_str())
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("creating {}: {e}", item.label)),
        Step::UpdateConsumer(stream, config) => js
            .update_consumer_on_stream(config.as_ref().clone(), stream.as_str())
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("updating {}: {e}", item.label)),
    }
}

/// Streams, buckets and durable consumers on the server that no file declares.
pub async fn not_managed(js: &jetstream::Context, declared: &[Declared]) -> Result<Vec<String>> {
    let mut streams = BTreeSet::new();
    let mut buckets = BTreeSet::new();
    let mut consumers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for d in declared {
        match &d.resource {
            Resource::Stream { name, .. } => {
                streams.insert(name.as_str());
            }
            Resource::Kv { bucket, .. } => {
                buckets.insert(bucket.as_str());
            }
            Resource::Consumer { stream, name, .. } => {
                consumers
                    .entry(stream.as_str())
                    .or_default()
                    .insert(name.as_str());
            }
        }
    }
    let mut names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .context("listing streams")?;
    names.sort();
    let mut found = Vec::new();
    for name in names {
        if let Some(bucket) = names::kv_bucket(&name) {
            if !buckets.contains(bucket) {
                found.push(format!("kv {bucket}"));
            }
            continue;
        }
        if !streams.contains(name.as_str()) && !consumers.contains_key(name.as_str()) {
            found.push(format!("stream {name}"));
            continue;
        }
        let Some(stream) = existing_stream(js, &name).await? else {
            continue;
        };
        let infos: Vec<_> = stream
            .consumers()
            .try_collect()
            .await
            .with_context(|| format!("listing the consumers of {name}"))?;
        let declared = consumers.get(name.as_str());
        let mut durable: Vec<String> = infos
            .into_iter()
            .filter_map(|info| info.config.durable_name)
            .filter(|c| !declared.is_some_and(|d| d.contains(c.as_str())))
            .collect();
        durable.sort();
        if !streams.contains(name.as_str()) {
            found.push(format!("stream {name}"));
        }
        found.extend(durable.into_iter().map(|c| format!("consumer {name}/{c}")));
    }
    Ok(found)
}

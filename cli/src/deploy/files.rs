//! Reading the resource files: one JSON document per file, `{"kind", "config"}` (plus
//! `"stream"` for consumers), checked against the async-nats types so a typo or a wrong type is
//! reported with the file and the field before anything is sent.

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{kv, stream};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What a file declares.
#[derive(Debug, Clone)]
pub enum Resource {
    /// A stream; `config` as `stream::Config` serializes.
    Stream {
        /// The stream name.
        name: String,
        /// The fields the file sets.
        config: Map<String, Value>,
    },
    /// A KV bucket, held by stream `KV_<bucket>`.
    Kv {
        /// The bucket name.
        bucket: String,
        /// The fields the file sets (KV names: history, max_value_size, ...).
        config: Map<String, Value>,
    },
    /// A durable pull consumer.
    Consumer {
        /// Its stream.
        stream: String,
        /// Its durable name.
        name: String,
        /// The fields the file sets, as `pull::Config` serializes.
        config: Map<String, Value>,
    },
}

impl Resource {
    /// `stream NAME`, `kv BUCKET`, `consumer STREAM/NAME`.
    pub fn label(&self) -> String {
        match self {
            Resource::Stream { name, .. } => format!("stream {name}"),
            Resource::Kv { bucket, .. } => format!("kv {bucket}"),
            Resource::Consumer { stream, name, .. } => format!("consumer {stream}/{name}"),
        }
    }
}

/// A resource and the file it came from.
#[derive(Debug, Clone)]
pub struct Declared {
    /// The file.
    pub file: PathBuf,
    /// What it declares.
    pub resource: Resource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(rename = "$schema", default)]
    _schema: Option<String>,
    #[serde(default)]
    _comment: Option<Value>,
    kind: Kind,
    #[serde(default)]
    stream: Option<String>,
    config: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Stream,
    Kv,
    Consumer,
}

/// The fields of a KV bucket file (the settable ones of `async_nats::jetstream::kv::Config`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvFields {
    bucket: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    history: Option<i64>,
    /// Nanoseconds.
    #[serde(default)]
    max_age: Option<u64>,
    #[serde(default)]
    max_bytes: Option<i64>,
    #[serde(default)]
    max_value_size: Option<i32>,
    #[serde(default)]
    storage: Option<stream::StorageType>,
    #[serde(default)]
    num_replicas: Option<usize>,
    #[serde(default)]
    compression: Option<bool>,
}

/// Reads every `*.json` file of `dir` (not `*.schema.json`), in name order.
pub fn load(dir: &Path) -> Result<Vec<Declared>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        anyhow!(
            "cannot read the resource directory {}: {e} (name another with --dir)",
            dir.display()
        )
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file() && name.ends_with(".json") && !name.ends_with(".schema.json") {
            files.push(path);
        }
    }
    files.sort();
    let mut declared = Vec::new();
    let mut labels = BTreeSet::new();
    for file in files {
        let resource = read(&file).with_context(|| format!("{}", file.display()))?;
        if !labels.insert(resource.label()) {
            bail!(
                "{}: {} is declared by more than one file",
                file.display(),
                resource.label()
            );
        }
        declared.push(Declared { file, resource });
    }
    Ok(declared)
}

fn read(file: &Path) -> Result<Resource> {
    let text = std::fs::read_to_string(file).context("cannot read the file")?;
    let value: Value = serde_json::from_str(&text).context("not valid JSON")?;
    let document: Document = serde_path_to_error::deserialize(value).map_err(|e| {
        anyhow!(
            "{}: {} (expected {{\"kind\": \"stream\"|\"kv\"|\"consumer\", \"config\": {{...}}}}, \
             plus \"stream\" for a consumer)",
            e.path(),
            e.inner()
        )
    })?;
    match document.kind {
        Kind::Stream => {
            if document.stream.is_some() {
                bail!("\"stream\" belongs to consumers; a stream's name is config.name");
            }
            known_fields(&document.config, STREAM_FIELDS, "stream")?;
            let config = stream_config(&document.config)?;
            if config.name.is_empty() {
                bail!("config.name: a stream needs a name");
            }
            Ok(Resource::Stream {
                name: config.name,
                config: document.config,
            })
        }
        Kind::Kv => {
            if document.stream.is_some() {
                bail!("\"stream\" belongs to consumers; a bucket's name is config.bucket");
            }
            let kv = kv_config(&document.config).map_err(|e| {
                anyhow!(
                    "{e} (a kv config has bucket, description, history, max_age, max_bytes, \
                     max_value_size, storage, num_replicas, compression)"
                )
            })?;
            if kv.bucket.is_empty() {
                bail!("config.bucket: a bucket needs a name");
            }
            Ok(Resource::Kv {
                bucket: kv.bucket,
                config: document.config,
            })
        }
        Kind::Consumer => {
            let stream = document
                .stream
                .filter(|s| !s.is_empty())
                .ok_or_else(|| anyhow!("\"stream\": a consumer names its stream"))?;
            known_fields(&document.config, CONSUMER_FIELDS, "pull consumer")?;
            let config = consumer_config(&document.config)?;
            let name = config
                .durable_name
                .clone()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    anyhow!("config.durable_name: a managed consumer must be durable and named")
                })?;
            if config.name.as_ref().is_some_and(|n| n != &name) {
                bail!("config.name must equal config.durable_name when both are given");
            }
            Ok(Resource::Consumer {
                stream,
                name,
                config: document.config,
            })
        }
    }
}

/// The JSON fields of `async_nats::jetstream::stream::Config` (async-nats 0.51).
const STREAM_FIELDS: &[&str] = &[
    "name",
    "max_bytes",
    "max_msgs",
    "max_msgs_per_subject",
    "discard",
    "discard_new_per_subject",
    "subjects",
    "retention",
    "max_consumers",
    "max_age",
    "max_msg_size",
    "storage",
    "num_replicas",
    "no_ack",
    "duplicate_window",
    "template_owner",
    "sealed",
    "description",
    "allow_rollup_hdrs",
    "deny_delete",
    "deny_purge",
    "republish",
    "allow_direct",
    "mirror_direct",
    "mirror",
    "sources",
    "metadata",
    "subject_transform",
    "compression",
    "consumer_limits",
    "first_seq",
    "placement",
    "persist_mode",
    "pause_until",
    "allow_msg_ttl",
    "subject_delete_marker_ttl",
    "allow_atomic",
    "allow_msg_schedules",
    "allow_msg_counter",
    "allow_batched",
];

/// The JSON fields of `async_nats::jetstream::consumer::pull::Config` (async-nats 0.51).
const CONSUMER_FIELDS: &[&str] = &[
    "durable_name",
    "name",
    "description",
    "deliver_policy",
    "opt_start_seq",
    "opt_start_time",
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "filter_subject",
    "filter_subjects",
    "replay_policy",
    "rate_limit_bps",
    "sample_freq",
    "max_waiting",
    "max_ack_pending",
    "headers_only",
    "max_batch",
    "max_bytes",
    "max_expires",
    "inactive_threshold",
    "num_replicas",
    "memory_storage",
    "metadata",
    "backoff",
    "priority_policy",
    "priority_groups",
    "priority_timeout",
    "pause_until",
];

/// Refuses a field the type does not have (serde would silently drop a misspelt one).
fn known_fields(config: &Map<String, Value>, known: &[&str], what: &str) -> Result<()> {
    match config.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => bail!(
            "config.{key}: not a field of a {what} config (fields: {})",
            known.join(", ")
        ),
        None => Ok(()),
    }
}

/// The file's fields over `base` (the defaults, or what the server has), as the async-nats
/// type, so types are checked.
pub fn typed<T: serde::de::DeserializeOwned>(
    fields: &Map<String, Value>,
    base: Value,
) -> Result<T> {
    let mut merged = base;
    if let Value::Object(merged) = &mut merged {
        for (key, value) in fields {
            merged.insert(key.clone(), value.clone());
        }
    }
    serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let hint = if DURATION_FIELDS.contains(&path.as_str()) {
            " (durations are integers in nanoseconds: 120000000000 is 2m)"
        } else {
            ""
        };
        anyhow!("config.{path}: {}{hint}", e.inner())
    })
}

/// Fields in nanoseconds.
pub const DURATION_FIELDS: &[&str] = &[
    "max_age",
    "duplicate_window",
    "ack_wait",
    "inactive_threshold",
    "max_expires",
    "subject_delete_marker_ttl",
    "priority_timeout",
    "backoff",
];

/// The `stream::Config` a stream file describes: its fields over the defaults.
pub fn stream_config(config: &Map<String, Value>) -> Result<stream::Config> {
    typed(config, json_of(&stream::Config::default())?)
}

/// The `pull::Config` a consumer file describes: its fields over the defaults.
pub fn consumer_config(config: &Map<String, Value>) -> Result<pull::Config> {
    typed(config, json_of(&pull::Config::default())?)
}

/// `value` as JSON, for [`typed`].
pub fn json_of(value: &impl serde::Serialize) -> Result<Value> {
    serde_json::to_value(value).context("serializing a configuration")
}

/// The `kv::Config` a bucket file describes.
pub fn kv_config(config: &Map<String, Value>) -> Result<kv::Config> {
    let fields: KvFields = typed(config, Value::Object(Map::new()))?;
    Ok(kv::Config {
        bucket: fields.bucket,
        description: fields.description.unwrap_or_default(),
        history: fields.history.unwrap_or(1),
        max_age: std::time::Duration::from_nanos(fields.max_age.unwrap_or(0)),
        max_bytes: fields.max_bytes.unwrap_or(-1),
        max_value_size: fields.max_value_size.unwrap_or(-1),
        storage: fields.storage.unwrap_or_default(),
        num_replicas: fields.num_replicas.unwrap_or(1),
        compression: fields.compression.unwrap_or(false),
        ..Default::default()
    })
}

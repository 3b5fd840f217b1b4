//! The `jetfn deploy` file reader on any directory of resource files: it never panics, and
//! what it accepts has a unique label and converts to the async-nats configuration it is sent
//! as.

#![no_main]

use jetfn_cli::deploy::files::{Resource, consumer_config, kv_config, load, stream_config};
use jetfn_fuzz::{Json, Value};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A file's content: a resource document most of the time, or any bytes.
#[derive(Arbitrary, Debug)]
enum Content<'a> {
    Document {
        kind: Kind<'a>,
        stream: Option<&'a str>,
        config: Vec<(Key<'a>, Json<'a>)>,
        extra: Option<(&'a str, Json<'a>)>,
    },
    Raw(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
enum Kind<'a> {
    Stream,
    Kv,
    Consumer,
    Other(Json<'a>),
}

/// Fields of stream, consumer and bucket configurations, or any other name.
#[derive(Arbitrary, Debug)]
enum Key<'a> {
    Name,
    Subjects,
    MaxAge,
    DuplicateWindow,
    Storage,
    Retention,
    NumReplicas,
    AllowDirect,
    AllowAtomic,
    DurableName,
    AckWait,
    AckPolicy,
    FilterSubject,
    Backoff,
    MaxDeliver,
    Metadata,
    Bucket,
    History,
    MaxValueSize,
    MaxBytes,
    Other(&'a str),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Name => "name",
            Key::Subjects => "subjects",
            Key::MaxAge => "max_age",
            Key::DuplicateWindow => "duplicate_window",
            Key::Storage => "storage",
            Key::Retention => "retention",
            Key::NumReplicas => "num_replicas",
            Key::AllowDirect => "allow_direct",
            Key::AllowAtomic => "allow_atomic",
            Key::DurableName => "durable_name",
            Key::AckWait => "ack_wait",
            Key::AckPolicy => "ack_policy",
            Key::FilterSubject => "filter_subject",
            Key::Backoff => "backoff",
            Key::MaxDeliver => "max_deliver",
            Key::Metadata => "metadata",
            Key::Bucket => "bucket",
            Key::History => "history",
            Key::MaxValueSize => "max_value_size",
            Key::MaxBytes => "max_bytes",
            Key::Other(other) => other,
        }
    }
}

impl Content<'_> {
    fn to_bytes(&self) -> Vec<u8> {
        let (kind, stream, config, extra) = match self {
            Content::Raw(bytes) => return bytes.to_vec(),
            Content::Document {
                kind,
                stream,
                config,
                extra,
            } => (kind, stream, config, extra),
        };
        let mut document = serde_json::Map::new();
        let kind = match kind {
            Kind::Stream => Value::from("stream"),
            Kind::Kv => Value::from("kv"),
            Kind::Consumer => Value::from("consumer"),
            Kind::Other(json) => json.to_value(),
        };
        document.insert("kind".into(), kind);
        if let Some(stream) = stream {
            document.insert("stream".into(), Value::from(*stream));
        }
        let config = config
            .iter()
            .map(|(key, value)| (key.as_str().to_owned(), value.to_value()))
            .collect();
        document.insert("config".into(), Value::Object(config));
        if let Some((key, value)) = extra {
            document.insert((*key).to_owned(), value.to_value());
        }
        Value::Object(document).to_string().into_bytes()
    }
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    files: Vec<(u8, Content<'a>)>,
}

/// One directory per process, emptied for every input.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory").keep())
}

fuzz_target!(|input: Input<'_>| {
    let dir = dir();
    for entry in std::fs::read_dir(dir).expect("readable") {
        std::fs::remove_file(entry.expect("an entry").path()).expect("removable");
    }
    // At most 4 files; names by number, some of them schemas (which are not read).
    for (name, content) in input.files.iter().take(4) {
        let file = match name % 8 {
            7 => format!("{name}.schema.json"),
            _ => format!("{name}.json"),
        };
        std::fs::write(dir.join(file), content.to_bytes()).expect("writable");
    }
    let Ok(declared) = load(dir) else {
        return;
    };
    let mut labels = BTreeSet::new();
    for item in &declared {
        assert!(labels.insert(item.resource.label()), "{declared:?}");
        match &item.resource {
            Resource::Stream { name, config } => {
                let typed = stream_config(config).expect("accepted, so typed");
                assert_eq!(&typed.name, name);
                assert!(!name.is_empty());
            }
            Resource::Kv { bucket, config } => {
                let typed = kv_config(config).expect("accepted, so typed");
                assert_eq!(&typed.bucket, bucket);
                assert!(!bucket.is_empty());
            }
            Resource::Consumer {
                stream,
                name,
                config,
            } => {
                let typed = consumer_config(config).expect("accepted, so typed");
                assert_eq!(typed.durable_name.as_ref(), Some(name));
                assert!(!stream.is_empty() && !name.is_empty());
            }
        }
    }
});

//! `jetfn tail`: follow an aggregate type's (or one aggregate's) events live, through an ordered
//! consumer: ephemeral, in memory, nothing durable left behind.

use crate::common::{Global, is_aggregate_id, is_aggregate_name, redact, say, usage};
use anyhow::{Context, Result, anyhow};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use jetfn::store::headers;
use serde_json::{Value, json};
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  jetfn tail account                  # new events of every account, until Ctrl-C
  jetfn tail account.alice --all      # alice's whole history, then live
  jetfn tail account --from 120       # from stream sequence 120 on
  jetfn tail account --all --json --limit 10

Each event is one line: stream sequence, time (ce-time), type (ce-type), aggregate id and
payload. --json prints JSON lines {\"seq\",\"time\",\"type\",\"id\",\"version\",\"payload\"}.
The stream and the subjects are the ones the functions use, from the same configuration
(jetfn.toml or $JETFN_CONFIG, JETFN_* variables): the stream is --stream, else stream.name
(JETFN_STREAM__NAME), else <AGGREGATE>_EVENTS (upper case, - as _); events are read from
<prefix>.<id>, the prefix being stream.subject_prefix (JETFN_STREAM__SUBJECT_PREFIX), else
evt.<aggregate>.";

/// Arguments of `jetfn tail`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The aggregate type, or one aggregate as <aggregate>.<id> (e.g. account or account.alice)
    #[arg(value_name = "AGGREGATE[.ID]")]
    target: String,

    /// Start at this stream sequence instead of with new events
    #[arg(long, value_name = "SEQ", conflicts_with = "all",
          value_parser = clap::value_parser!(u64).range(1..))]
    from: Option<u64>,

    /// Start with the first stored event instead of with new events
    #[arg(long)]
    all: bool,

    /// Exit after this many events
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,

    /// The stream to read (default: stream.name of the configuration, else <AGGREGATE>_EVENTS)
    #[arg(long, value_name = "NAME")]
    stream: Option<String>,
}

/// Prints events until Ctrl-C or `--limit`.
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let (aggregate, id) = match args.target.split_once('.') {
        Some((aggregate, id)) => (aggregate, Some(id)),
        None => (args.target.as_str(), None),
    };
    if !is_aggregate_name(aggregate) {
        return Err(usage(format!(
            "aggregate {aggregate:?} must match [a-z0-9_-]+ (e.g. account or account.alice)"
        )));
    }
    if let Some(id) = id
        && !is_aggregate_id(id)
    {
        return Err(usage(format!(
            "aggregate id {id:?} must be 1-128 characters of A-Z, a-z, 0-9, _ and -"
        )));
    }
    let config = global.config()?;
    let names = EventNames::new(aggregate, &config);
    let stream_name = args.stream.clone().unwrap_or(names.stream);
    let filter = match id {
        Some(id) => format!("{}.{id}", names.event_prefix),
        None => format!("{}.*", names.event_prefix),
    };
    let (deliver_policy, from_text) = match (args.from, args.all) {
        (Some(seq), _) => (
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            format!("from sequence {seq}"),
        ),
        (None, true) => (consumer::DeliverPolicy::All, "from the first event".into()),
        (None, false) => (consumer::DeliverPolicy::New, "new events only".into()),
    };

    let client = config.nats.connect("jetfn-cli").await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(&stream_name).await.map_err(|err| {
        let not_found = matches!(
            err.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        );
        if not_found {
            anyhow!(
                "stream {stream_name} not found at {} ({err}); start the {aggregate} function \
                 first, or name the stream with --stream",
                redact(&config.nats.url)
            )
        } else {
            anyhow!("stream {stream_name}: {err}")
        }
    })?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating an ordered consumer on {stream_name}"))?;
    let mut messages = consumer
        .messages()
        .await
        .with_context(|| format!("reading {stream_name}"))?;
    let until = match args.limit {
        Some(n) => format!(" (until {n} events)"),
        None => " (Ctrl-C to stop)".into(),
    };
    eprintln!("jetfn: following {filter} in {stream_name}, {from_text}{until}");

    let mut seen = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while args.limit.is_none_or(|limit| seen < limit) {
        let message = tokio::select! {
            _ = &mut interrupted => break,
            message = messages.next() => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(anyhow!("reading {stream_name}: {err}")),
            None => return Err(anyhow!("the connection to NATS closed")),
        };
        let event = Event::from_message(&message)?;
        if global.json {
            say(event.to_json());
        } else {
            say(event.to_line());
        }
        seen += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// Where an aggregate type's events are, under the configuration the functions read.
struct EventNames {
    stream: String,
    event_prefix: String,
}

impl EventNames {
    fn new(aggregate: &str, config: &jetfn::Config) -> EventNames {
        EventNames {
            stream: config.stream.name.clone().unwrap_or_else(|| {
                format!(
                    "{}_EVENTS",
                    aggregate.to_ascii_uppercase().replace('-', "_")
                )
            }),
            event_prefix: config
                .stream
                .subject_prefix
                .clone()
                .unwrap_or_else(|| format!("evt.{aggregate}")),
        }
    }
}

/// One event as printed.
struct Event {
    seq: u64,
    time: Option<String>,
    event_type: Option<String>,
    id: String,
    version: u64,
    payload: Value,
}

impl Event {
    fn from_message(message: &jetstream::Message) -> Result<Event> {
        let info = message
            .info()
            .map_err(|e| anyhow!("a message without JetStream metadata: {e}"))?;
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let id = header(headers::CE_SUBJECT).unwrap_or_else(|| {
            message
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned()
        });
        let payload = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
        Ok(Event {
            seq: info.stream_sequence,
            time: header(headers::CE_TIME),
            event_type: header(headers::CE_TYPE),
            id,
            version: header(headers::EVENT_VERSION)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            payload,
        })
    }

    fn to_line(&self) -> String {
        format!(
            "{:>6}  {}  {:<15}  {}  {}",
            self.seq,
            self.time.as_deref().unwrap_or("-"),
            self.event_type.as_deref().unwrap_or("-"),
            self.id,
            self.payload
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "time": self.time,
            "type": self.event_type,
            "id": self.id,
            "version": self.version,
            "payload": self.payload,
        })
    }
}

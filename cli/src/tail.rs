//! `jetfn tail`: follow an aggregate type's (or one aggregate's) events live, through an ordered
//! consumer: ephemeral, in memory, nothing durable left behind.

use crate::common::{Global, redact, say, usage};
use anyhow::{Context, Result, anyhow};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use jetfn::wire::{AggregateNames, StoredEvent, header, names};
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
    names::check_aggregate_name(aggregate)
        .map_err(|e| usage(format!("{e} (e.g. account or account.alice)")))?;
    if let Some(id) = id {
        names::check_id(id).map_err(usage)?;
    }
    let config = global.config()?;
    let names = AggregateNames::new(aggregate, &config).map_err(|e| usage(e.to_string()))?;
    let stream_name = args.stream.clone().unwrap_or_else(|| names.stream.clone());
    let filter = match id {
        Some(id) => names.event_subject(id),
        None => names.event_filter(),
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

    let client = config.nats.connect(crate::common::CONNECTION).await?;
    let js = config.nats.jetstream(client);
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

/// One event as printed.
struct Event {
    seq: u64,
    time: Option<String>,
    event_type: Option<String>,
    id: String,
    version: u32,
    payload: Value,
}

impl Event {
    fn from_message(message: &jetstream::Message) -> Result<Event> {
        let info = message
            .info()
            .map_err(|e| anyhow!("a message without JetStream metadata: {e}"))?;
        let headers = message.headers.as_ref();
        let id = header::get(headers, header::CE_SUBJECT)
            .or_else(|| message.subject.rsplit('.').next())
            .unwrap_or_default()
            .to_owned();
        let payload = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
        // Something that is not a jetfn event is still shown, without type and version.
        let (time, event_type, version) =
            match StoredEvent::decode(info.stream_sequence, headers, message.payload.clone()) {
                Ok(event) => (event.time, Some(event.event_type), event.version),
                Err(_) => (
                    header::get(headers, header::CE_TIME).map(str::to_owned),
                    None,
                    1,
                ),
            };
        Ok(Event {
            seq: info.stream_sequence,
            time,
            event_type,
            id,
            version,
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

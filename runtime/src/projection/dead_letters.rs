//! The dead-letter stream: events a projection could not apply, with why, kept for replay.
//!
//! One stream (`JETFN_DLQ` by default) holds every projection's dead letters on
//! `jetfn.dlq.<projection>`. Each keeps the original payload and headers, plus:
//! `jetfn-dlq-projection`, `jetfn-dlq-stream`, `jetfn-dlq-subject`, `jetfn-dlq-seq` (the original
//! stream sequence), `jetfn-dlq-error` and `jetfn-dlq-deliveries`. The original's `Nats-*`
//! headers are JetStream's controls (expected sequences, batch, message id, TTL, schedules,
//! rollups): JetStream would act on them again and refuse the copy, so they are kept as
//! `jetfn-dlq-orig-<name>` instead (`jetfn-dlq-orig-Nats-Msg-Id`).

use super::worker::decode_recorded;
use super::{Context, Projection};
use crate::Error;
use crate::config::Config;
use crate::readmodel::{Applied, AppliedEvent, Batch, Mode, Order, RedisWrites, Step};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, Message, stream};
use bytes::Bytes;
use std::time::Duration;

use crate::wire::header::{
    DLQ_DELIVERIES as DELIVERIES, DLQ_ERROR as ERROR, DLQ_ORIGINAL_PREFIX as ORIGINAL,
    DLQ_PROJECTION as PROJECTION, DLQ_SEQ as SEQ, DLQ_STREAM as STREAM, DLQ_SUBJECT as SUBJECT,
};
use crate::wire::{StoredEvent, names};

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream.
    pub dlq_seq: u64,
    /// The projection that gave up on it.
    pub projection: String,
    /// The event stream it came from.
    pub stream: String,
    /// Its original subject.
    pub subject: String,
    /// Its original stream sequence.
    pub seq: u64,
    /// Its event type.
    pub event_type: String,
    /// Why it could not be applied.
    pub error: String,
    /// How often JetStream had delivered it.
    pub deliveries: i64,
    /// Its original payload.
    pub payload: Bytes,
    /// Its headers (the original ones plus the dead-letter ones).
    pub headers: HeaderMap,
}

/// Reads and removes dead letters.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    stream: stream::Stream,
}

impl DeadLetters {
    /// Opens the dead-letter stream named in `config.projection.dead_letter_stream`.
    pub async fn connect(config: &Config) -> Result<DeadLetters, Error> {
        let client = config.nats.connect("jetfn-dlq").await?;
        let js = config.nats.jetstream(client);
        provision(
            &js,
            &config.projection.dead_letter_stream,
            config.stream.replicas,
        )
        .await?;
        Self::open(&js, &config.projection.dead_letter_stream).await
    }

    async fn open(js: &jetstream::Context, name: &str) -> Result<DeadLetters, Error> {
        let stream = js
            .get_stream(name)
            .await
            .map_err(|e| Error::Service(format!("dead-letter stream {name}: {e}")))?;
        Ok(DeadLetters { stream })
    }

    /// The dead letters of `projection`, oldest first.
    pub async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, Error> {
        let subject = names::dlq_subject(projection);
        let mut letters = Vec::new();
        let mut next = 1;
        loop {
            match self
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(message) => {
                    next = message.sequence + 1;
                    letters.push(letter(message.sequence, message.headers, message.payload));
                }
                Err(err) if err.kind() == stream::DirectGetErrorKind::NotFound => {
                    return Ok(letters);
                }
                Err(err) => return Err(Error::Service(format!("reading dead letters: {err}"))),
            }
        }
    }

    /// Removes a dead letter (after a successful replay).
    pub async fn remove(&self, dlq_seq: u64) -> Result<(), Error> {
        self.stream
            .delete_message(dlq_seq)
            .await
            .map(|_| ())
            .map_err(|e| Error::Service(format!("removing dead letter {dlq_seq}: {e}")))
    }
}

fn letter(dlq_seq: u64, headers: HeaderMap, payload: Bytes) -> DeadLetter {
    let get = |name: &'static str| {
        crate::wire::header::get(Some(&headers), name)
            .unwrap_or_default()
            .to_owned()
    };
    DeadLetter {
        dlq_seq,
        projection: get(PROJECTION),
        stream: get(STREAM),
        subject: get(SUBJECT),
        seq: get(SEQ).parse().unwrap_or(0),
        event_type: get(crate::wire::header::CE_TYPE),
        error: get(ERROR),
        deliveries: get(DELIVERIES).parse().unwrap_or(0),
        payload,
        headers,
    }
}

/// Creates the dead-letter stream with `replicas` replicas (`stream.replicas`) if it does not
/// exist (an existing one is left as it is).
pub(crate) async fn provision(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<(), Error> {
    if js.get_stream(name).await.is_ok() {
        return Ok(());
    }
    js.get_or_create_stream(stream::Config {
        name: name.to_owned(),
        description: Some("jetfn dead letters: events projections could not apply".into()),
        subjects: vec![names::DLQ_SUBJECTS.into()],
        storage: stream::StorageType::File,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|e| Error::Service(format!("dead-letter stream {name}: {e}")))
}

/// Where a dead letter's event was stored: its stream and its own subject (a partitioned view
/// delivers it on another one).
pub(crate) struct Origin<'a> {
    pub stream: &'a str,
    pub subject: &'a str,
}

/// Stores a dead letter; retries until JetStream has it, because the checkpoint will pass it.
/// `projection` names the function that gave up on the event (a projection or a process
/// manager), `origin` where the event was stored.
pub(crate) async fn send(
    js: &jetstream::Context,
    origin: Origin<'_>,
    projection: &str,
    generation: u64,
    message: &Message,
    seq: u64,
    error: &str,
) -> Result<(), Error> {
    let deliveries = message.info().map(|info| info.delivered).unwrap_or(0);
    let mut headers = copy_headers(message.headers.as_ref());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{projection}:g{generation}:{seq}").as_str(),
    );
    headers.insert(PROJECTION, projection);
    headers.insert(STREAM, origin.stream);
    headers.insert(SUBJECT, origin.subject);
    headers.insert(SEQ, seq.to_string().as_str());
    headers.insert(ERROR, error.replace(['\r', '\n'], " ").as_str());
    headers.insert(DELIVERIES, deliveries.to_string().as_str());
    let subject = names::dlq_subject(projection);
    let mut pause = Duration::from_millis(100);
    loop {
        let sent = match js
            .publish_with_headers(subject.clone(), headers.clone(), message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match sent {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::warn!(projection, seq, error = %err, "dead-letter stream unavailable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The original headers for a dead letter: all of them, but JetStream's `Nats-*` controls renamed
/// to `jetfn-dlq-orig-<name>` so that the dead-letter stream does not act on them.
fn copy_headers(original: Option<&HeaderMap>) -> HeaderMap {
    let mut copy = HeaderMap::new();
    for (name, values) in original.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        let control = name
            .get(..5)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"));
        let name = if control {
            format!("{ORIGINAL}{name}")
        } else {
            name.to_owned()
        };
        for value in values {
            copy.append(name.as_str(), value.clone());
        }
    }
    copy
}

/// Applies every dead letter of `P` with the current code, each at most once per version, and
/// removes those that applied.
pub(crate) async fn replay<P: Projection>(
    projection: &P,
    context: &Context<P>,
) -> Result<usize, Error> {
    let letters =
        DeadLetters::open(&context.js, &context.config.projection.dead_letter_stream).await?;
    let generation = context.model.activate_if_none(1).await?;
    let mut replayed = 0;
    for letter in letters.list(P::NAME).await? {
        let aggregate_id = letter.subject.rsplit('.').next().unwrap_or_default();
        let stored = StoredEvent::decode(letter.seq, Some(&letter.headers), letter.payload.clone());
        let writes = decode_recorded::<P::Source>(&context.upcasters, stored, aggregate_id)
            .and_then(|recorded| {
                let mut writes = RedisWrites::default();
                projection
                    .apply(&recorded, &mut writes)
                    .map_err(|refusal| format!("refused: {}", refusal.0))?;
                writes.into_ops().map_err(|refusal| refusal.to_string())
            });
        let ops = match writes {
            Ok(ops) => ops,
            Err(error) => {
                tracing::warn!(projection = P::NAME, seq = letter.seq, %error, "dead letter still fails");
                continue;
            }
        };
        let event = AppliedEvent {
            seq: letter.seq,
            aggregate_id: aggregate_id.to_owned(),
            event_type: letter.event_type.clone(),
            ops: ops.into(),
            write: true,
        };
        let applied = context
            .model
            .apply(
                0,
                generation,
                Mode::Replay,
                0,
                &Batch {
                    feed_len: context.config.projection.change_feed_len,
                    partitions: context.config.projection.partitions,
                    order: Order::HoleAccepted,
                    floor: 0,
                },
                &[event],
            )
            .await?;
        match applied {
            // 0: already replayed into this version (a crash before the removal); just remove it.
            Step::Done(Applied::Committed(applied)) => {
                letters.remove(letter.dlq_seq).await?;
                replayed += applied as usize;
            }
            Step::Refused { reason, .. } => {
                tracing::warn!(projection = P::NAME, seq = letter.seq, error = %reason, "dead letter still fails");
            }
            Step::Done(
                Applied::Gap(_) | Applied::Reset | Applied::Moved(_) | Applied::Stale(_),
            ) => {}
        }
    }
    Ok(replayed)
}

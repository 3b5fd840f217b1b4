//! Command functions: NATS services that turn commands into stored events.
//!
//! For every request on `cmd.<aggregate>.<id>.<command>` the runtime
//! 1. checks the subject, the command id (`Nats-Msg-Id`) and the body, and decodes the command;
//! 2. answers a repeated command id from the ledger;
//! 3. loads the aggregate's events, folds them into state and calls `decide`;
//! 4. appends the new events with `Nats-Expected-Last-Subject-Sequence`, and on a conflict
//!    reloads and decides again, up to `command.max_retries` times with jittered backoff;
//! 5. records the reply in the ledger and sends it.
//!
//! Commands for one aggregate are processed one at a time per instance, so conflicts only arise
//! between instances.

mod ledger;
mod locks;
mod reply;
mod request;

pub use reply::{Accepted, ErrorKind, Failure, Reply};
pub use request::{MAX_COMMAND_ID_LEN, MAX_ID_LEN};

use crate::aggregate::{Aggregate, Upcasters, decode_stored};
use crate::codec::{decode_variant, encode_variant, variant_names};
use crate::config::Config;
use crate::store::{
    Append, AppendError, EventStore, History, NewEvent, StoreSettings, StoredEvent,
};
use crate::telemetry::{self, TraceContext};
use crate::{Error, health};
use async_nats::service::{self, ServiceExt};
use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use ledger::{Entry, Ledger};
use locks::KeyedLocks;
use rand::Rng;
use request::{CommandRequest, CommandSubjects};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long start-up waits for a refusal of the command subscription to surface.
const SUBSCRIPTION_VERDICT: Duration = Duration::from_millis(250);

/// Starts building the command function of aggregate `A`.
///
/// ```no_run
/// # use jetfn::{Aggregate, Rejection};
/// # #[derive(Default)] struct Account;
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
/// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)] enum Event {}
/// # impl Aggregate for Account {
/// #     const NAME: &'static str = "account";
/// #     type Command = Command; type Event = Event;
/// #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
/// #     fn evolve(self, e: &Event) -> Self { match *e {} }
/// # }
/// #[tokio::main]
/// async fn main() -> Result<(), jetfn::Error> {
///     // Reads jetfn.toml and JETFN_* / NATS_URL, serves until SIGTERM or Ctrl-C.
///     jetfn::command_function::<Account>().run().await
/// }
/// ```
pub fn command_function<A: Aggregate>() -> CommandFunction<A> {
    CommandFunction {
        config: None,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        _aggregate: PhantomData,
    }
}

/// A command function being configured. See [`command_function`].
#[derive(Debug)]
pub struct CommandFunction<A> {
    config: Option<Config>,
    version: String,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> CommandFunction<A> {
    /// Uses this configuration instead of loading `jetfn.toml` and the environment.
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The version reported to `$SRV.INFO` (semver). Defaults to jetfn's version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Runs until SIGTERM or SIGINT, then stops taking commands, finishes the ones in flight and
    /// returns. Initialises logging from `RUST_LOG` unless the caller already did.
    pub async fn run(self) -> Result<(), Error> {
        telemetry::init();
        let signal = telemetry::shutdown_signal();
        let running = self.start().await?;
        let stopped = running.stop_on(signal).await;
        telemetry::shutdown();
        stopped
    }

    /// Connects, provisions the stream and ledger, and starts serving. The returned handle stops
    /// the function gracefully.
    pub async fn start(self) -> Result<RunningFunction, Error> {
        let config = match self.config {
            Some(config) => {
                config.validate()?;
                config
            }
            None => Config::load()?,
        };
        let names = Names::of::<A>(&config)?;
        let client = config.nats.connect(&names.connection).await?;
        let store = EventStore::new(
            client.clone(),
            StoreSettings {
                aggregate: A::NAME.to_owned(),
                stream: names.stream.clone(),
                subject_prefix: names.event_subject_prefix.clone(),
                replicas: config.stream.replicas,
                duplicate_window: config.stream.duplicate_window,
                max_bytes: config.stream.max_bytes,
                timeout: config.nats.request_timeout,
            },
        );
        store.check_server_version()?;
        if config.stream.provision {
            store.provision().await?;
        }
        let ledger = Ledger::open(
            client.clone(),
            &names.ledger_bucket,
            config.ledger.ttl,
            config.ledger.replicas,
        )
        .await?;
        let subjects = CommandSubjects::new(config.command.subject_prefix.as_deref(), A::NAME);
        let handler = Arc::new(Handler::<A> {
            store,
            upcasters: A::upcasters(),
            ledger,
            locks: KeyedLocks::default(),
            counters: Arc::default(),
            subjects,
            config: config.command.clone(),
            _aggregate: PhantomData,
        });
        let mut violations = crate::permissions::watch();
        let (service, endpoint) =
            register_service(&client, &handler, &names, &self.version).await?;
        // A denied subscription is reported asynchronously; a flush makes sure it has arrived.
        let flushed = tokio::time::timeout(config.nats.request_timeout, client.flush()).await;
        if flushed.is_err() {
            return Err(Error::Service(
                "NATS did not confirm the subscriptions".into(),
            ));
        }
        // The server's refusal reaches the connection before the flush's reply, but async-nats
        // hands it to the event callback on its own task: give that a moment.
        let wildcard = handler.subjects.wildcard();
        let refused = tokio::time::timeout(
            SUBSCRIPTION_VERDICT,
            crate::permissions::denied(&mut violations, &wildcard),
        )
        .await;
        if let Ok(denied) = refused {
            return Err(Error::Service(format!("permission denied: {denied}")));
        }
        tracing::info!(
            aggregate = A::NAME,
            subjects = %handler.subjects.wildcard(),
            stream = %names.stream,
            queue_group = %handler.config.queue_group,
            "command function ready"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let ready = stop_rx.clone();
        let health =
            health::serve(&config.health, client.clone(), move || !*ready.borrow()).await?;
        let task = tokio::spawn(serve(client, handler, service, endpoint, stop_rx));
        Ok(RunningFunction {
            stop: stop_tx,
            task,
            _health: health,
        })
    }
}

/// A command function that is serving. Dropping it does not stop it; call
/// [`RunningFunction::stop`].
#[derive(Debug)]
pub struct RunningFunction {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
    _health: Option<health::HealthServer>,
}

impl RunningFunction {
    /// Stops taking commands, finishes those in flight, flushes their replies and returns.
    pub async fn stop(self) -> Result<(), Error> {
        // The serving task may already have ended; then there is nobody to tell.
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| Error::Service(format!("serving task failed: {e}")))?
    }

    /// Serves until `signal` completes, then stops as [`RunningFunction::stop`] does.
    pub async fn stop_on(mut self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::select! {
            () = signal => {
                tracing::info!("shutting down: finishing commands in flight");
                self.stop().await
            }
            ended = &mut self.task => {
                ended.map_err(|e| Error::Service(format!("serving task failed: {e}")))?
            }
        }
    }
}

/// The names an aggregate's resources get from the configuration.
struct Names {
    service: String,
    connection: String,
    stream: String,
    event_subject_prefix: String,
    ledger_bucket: String,
}

impl Names {
    fn of<A: Aggregate>(config: &Config) -> Result<Names, Error> {
        let aggregate = A::NAME;
        let valid = !aggregate.is_empty()
            && aggregate
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Err(Error::AggregateName(aggregate));
        }
        Ok(Names {
            service: aggregate.to_owned(),
            connection: config
                .nats
                .name
                .clone()
                .unwrap_or_else(|| format!("jetfn-{aggregate}")),
            stream: config.stream.name.clone().unwrap_or_else(|| {
                format!(
                    "{}_EVENTS",
                    aggregate.to_ascii_uppercase().replace('-', "_")
                )
            }),
            event_subject_prefix: config
                .stream
                .subject_prefix
                .clone()
                .unwrap_or_else(|| format!("evt.{aggregate}")),
            ledger_bucket: config
                .ledger
                .bucket
                .clone()
                .unwrap_or_else(|| format!("jetfn-ledger-{aggregate}")),
        })
    }
}

/// Outcome counters reported in `$SRV.STATS` endpoint data.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    invalid: AtomicU64,
    rejected: AtomicU64,
    conflict: AtomicU64,
    unavailable: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    fn count(&self, reply: &Reply, retries: u32) {
        let counter = match reply.error_kind() {
            None => &self.accepted,
            Some(ErrorKind::Invalid) => &self.invalid,
            Some(ErrorKind::Rejected) => &self.rejected,
            Some(ErrorKind::Conflict) => &self.conflict,
            Some(ErrorKind::Unavailable) => &self.unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.retries
            .fetch_add(u64::from(retries), Ordering::Relaxed);
    }

    fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "accepted": get(&self.accepted),
            "invalid": get(&self.invalid),
            "rejected": get(&self.rejected),
            "conflict": get(&self.conflict),
            "unavailable": get(&self.unavailable),
            "retries": get(&self.retries),
        })
    }
}

async fn register_service<A: Aggregate>(
    client: &Client,
    handler: &Arc<Handler<A>>,
    names: &Names,
    version: &str,
) -> Result<(service::Service, service::endpoint::Endpoint), Error> {
    let commands = variant_names::<A::Command>().join(",");
    let schemas = serde_json::to_string(&crate::schema::command_schemas::<A>()).unwrap_or_default();
    let metadata = HashMap::from([
        ("jetfn.schemas".to_owned(), schemas),
        ("jetfn.kind".to_owned(), "command".to_owned()),
        ("jetfn.aggregate".to_owned(), A::NAME.to_owned()),
        ("jetfn.commands".to_owned(), commands),
        ("jetfn.stream".to_owned(), names.stream.clone()),
        (
            "jetfn.events".to_owned(),
            format!("{}.<id>", names.event_subject_prefix),
        ),
    ]);
    let counters = handler.counters.clone();
    let service = client
        .service_builder()
        .description(format!("jetfn command function for aggregate {}", A::NAME))
        .metadata(metadata)
        .queue_group(&handler.config.queue_group)
        .stats_handler(move |_endpoint, _stats| counters.to_json())
        .start(&names.service, version)
        .await
        .map_err(|e| Error::Service(format!("cannot register NATS service: {e}")))?;
    let endpoint = service
        .endpoint_builder()
        .name("commands")
        .metadata(HashMap::from([(
            "subject".to_owned(),
            handler.subjects.pattern(),
        )]))
        .add(handler.subjects.wildcard())
        .await
        .map_err(|e| Error::Service(format!("cannot subscribe to commands: {e}")))?;
    Ok((service, endpoint))
}

/// Takes requests until told to stop, then drains: the endpoint unsubscribes, already received
/// requests are still processed, and the loop ends when all have replied.
async fn serve<A: Aggregate>(
    client: Client,
    handler: Arc<Handler<A>>,
    service: service::Service,
    mut endpoint: service::endpoint::Endpoint,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let permits = Arc::new(Semaphore::new(handler.config.max_in_flight));
    let mut in_flight = JoinSet::new();
    let mut service = Some(service);
    loop {
        tokio::select! {
            changed = stop.changed(), if service.is_some() => {
                if (changed.is_err() || *stop.borrow())
                    && let Some(service) = service.take()
                {
                    // Unsubscribes the endpoint; buffered requests still come through.
                    let _ = service.stop().await;
                }
            }
            request = endpoint.next() => {
                let Some(request) = request else { break };
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let handler = handler.clone();
                in_flight.spawn(async move {
                    handler.handle(request).await;
                    drop(permit);
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
    // Without a server (it went away) there is nothing to flush to; do not wait for it forever.
    match tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "replies may not have been flushed"),
        Err(_) => tracing::warn!("NATS unreachable at shutdown: replies may not have been flushed"),
    }
    tracing::info!(aggregate = A::NAME, "command function stopped");
    Ok(())
}

struct Handler<A> {
    store: EventStore,
    upcasters: Upcasters,
    ledger: Ledger,
    locks: KeyedLocks,
    counters: Arc<Counters>,
    subjects: CommandSubjects,
    config: crate::config::CommandConfig,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> Handler<A> {
    async fn handle(&self, request: service::Request) {
        let started = Instant::now();
        let message = &request.message;
        let span = tracing::info_span!(
            "command",
            aggregate = A::NAME,
            id = tracing::field::Empty,
            command = tracing::field::Empty,
            command_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
            retries = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let (reply, retries) = match self.check(message) {
            Ok(command) => {
                span.record("id", command.id.as_str());
                span.record("command", command.command.as_str());
                span.record("command_id", command.command_id.as_str());
                span.record("trace_id", command.trace.trace_id.as_str());
                telemetry::link(&span, &command.trace);
                self.execute(&command).instrument(span.clone()).await
            }
            Err(message) => (Reply::failed(ErrorKind::Invalid, message), 0),
        };
        self.counters.count(&reply, retries);
        span.record("outcome", reply.outcome());
        span.record("retries", retries);
        span.record("duration_ms", started.elapsed().as_secs_f64() * 1000.0);
        span.in_scope(|| match &reply {
            Reply::Failed(failure) if failure.kind == ErrorKind::Unavailable => {
                tracing::warn!(error = %failure.message, "command failed")
            }
            _ => tracing::info!("command handled"),
        });
        if let Err(err) = respond(&request, &reply).await {
            // Commands published without a reply subject are still applied.
            tracing::debug!(parent: &span, error = %err, "reply not sent");
        }
    }

    /// The wire checks: subject, command id, body, and decoding into the command type.
    fn check(&self, message: &async_nats::Message) -> Result<CommandRequest, String> {
        let (id, command) = self.subjects.parse(&message.subject)?;
        let command_id = match message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            Some(value) => {
                request::check_command_id(value.as_str())?;
                value.as_str().to_owned()
            }
            None => uuid::Uuid::now_v7().to_string(),
        };
        let body = request::parse_body(&message.payload, self.config.max_body_bytes)?;
        let trace = TraceContext::from_headers(message.headers.as_ref())
            .unwrap_or_else(TraceContext::new_root)
            .child();
        let request = CommandRequest {
            id: id.to_owned(),
            command: command.to_owned(),
            command_id,
            fingerprint: request::fingerprint(command, &body),
            body,
            trace,
        };
        self.decode(&request)?;
        Ok(request)
    }

    fn decode(&self, request: &CommandRequest) -> Result<A::Command, String> {
        let known = variant_names::<A::Command>();
        if !known.is_empty() && !known.contains(&request.command.as_str()) {
            return Err(format!(
                "unknown command {:?} for aggregate {}; known commands: {}",
                request.command,
                A::NAME,
                known.join(", ")
            ));
        }
        decode_variant(&request.command, request.body.clone()).map_err(|e| e.to_string())
    }

    /// Answers a checked command, returning the reply and the number of conflict retries.
    async fn execute(&self, request: &CommandRequest) -> (Reply, u32) {
        {
            let fingerprint = request.fingerprint.clone();
            match self.ledger.get(&request.id, &request.command_id).await {
                Ok(Some(entry)) if entry.fingerprint == fingerprint => return (entry.reply, 0),
                Ok(Some(_)) => return (reused_id(request), 0),
                Ok(None) => {}
                Err(err) => return (Reply::failed(ErrorKind::Unavailable, err), 0),
            }
            let _writer = self.locks.lock(&request.id).await;
            let (reply, retries) = self.decide_and_append(request).await;
            if matches!(&reply, Reply::Accepted(_))
                || reply.error_kind() == Some(ErrorKind::Rejected)
            {
                let entry = Entry {
                    fingerprint,
                    reply: reply.clone(),
                };
                if let Err(err) = self
                    .ledger
                    .put(&request.id, &request.command_id, &entry)
                    .await
                {
                    // Accepted commands stay recognisable from their stored events.
                    tracing::warn!(error = %err, "reply not recorded in the ledger");
                }
            }
            (reply, retries)
        }
    }

    /// Load, decide, append; on a conflict, catch up with what changed and decide again.
    async fn decide_and_append(&self, request: &CommandRequest) -> (Reply, u32) {
        let unavailable = |message: String| Reply::failed(ErrorKind::Unavailable, message);
        let mut history = History::default();
        let mut state = A::default();
        let mut retries = 0;
        loop {
            let folded = history.events.len();
            if let Err(err) = self.store.catch_up(&request.id, &mut history).await {
                return (unavailable(err.to_string()), retries);
            }
            if let Some(reply) = earlier_reply(&history, request) {
                return (reply, retries);
            }
            state = match fold(state, &history.events[folded..], &self.upcasters) {
                Ok(state) => state,
                Err(message) => return (unavailable(message), retries),
            };
            let Decided { events, types } = match self.decide(&state, request) {
                Ok(decided) => decided,
                Err(reply) => return (reply, retries),
            };
            let version = (history.events.len() + events.len()) as u64;
            if events.is_empty() {
                return (accepted(request, version, history.last_seq, types), retries);
            }
            let append = Append {
                aggregate_id: &request.id,
                expected_last_seq: history.last_seq,
                command_id: &request.command_id,
                command: &request.command,
                events: &events,
                fingerprint: Some(&request.fingerprint),
                trace: Some(&request.trace),
            };
            let outcome = self.store.append(append).await;
            let exhausted = retries >= self.config.max_retries;
            match outcome {
                Ok(seq) => return (accepted(request, version, seq, types), retries),
                Err(AppendError::Unavailable(message)) => return (unavailable(message), retries),
                Err(AppendError::Conflict(message)) if exhausted => {
                    let message = format!(
                        "{} changed concurrently {} times in a row; last: {message}",
                        request.id,
                        retries + 1
                    );
                    return (Reply::failed(ErrorKind::Conflict, message), retries);
                }
                Err(AppendError::Unknown(message)) if exhausted => {
                    return (unavailable(message), retries);
                }
                Err(err) => {
                    tracing::debug!(error = %err, retry = retries + 1, "catching up after conflict");
                    tokio::time::sleep(self.backoff(retries)).await;
                    retries += 1;
                }
            }
        }
    }

    /// Asks the domain, and encodes what it decided.
    fn decide(&self, state: &A, request: &CommandRequest) -> Result<Decided, Reply> {
        let command = self
            .decode(request)
            .map_err(|m| Reply::failed(ErrorKind::Invalid, m))?;
        let decided = state
            .decide(command)
            .map_err(|r| Reply::failed(ErrorKind::Rejected, r.message()))?;
        let mut events = Vec::with_capacity(decided.len());
        for event in &decided {
            let (event_type, payload) = encode_variant(event)
                .map_err(|e| Reply::failed(ErrorKind::Unavailable, e.to_string()))?;
            events.push(NewEvent {
                version: A::event_version(&event_type),
                event_type,
                payload,
            });
        }
        Ok(Decided {
            types: events.iter().map(|e| e.event_type.clone()).collect(),
            events,
        })
    }

    /// No pause before the first retry: with one writer per aggregate per instance, the usual
    /// rival is one other instance, and pausing would hand it the next turn as well. After that,
    /// full-jitter exponential backoff: uniform in [0, min(max, base * 2^(retry-1))].
    fn backoff(&self, retry: u32) -> Duration {
        let Some(retry) = retry.checked_sub(1) else {
            return Duration::ZERO;
        };
        let ceiling = self
            .config
            .retry_backoff
            .saturating_mul(1u32 << retry.min(16))
            .min(self.config.max_retry_backoff);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

struct Decided {
    events: Vec<NewEvent>,
    types: Vec<String>,
}

/// Applies stored events to a state, upcasting old versions and refusing what this code does not
/// understand.
fn fold<A: Aggregate>(
    mut state: A,
    events: &[StoredEvent],
    upcasters: &Upcasters,
) -> Result<A, String> {
    for stored in events {
        let event = decode_stored::<A>(
            upcasters,
            &stored.event_type,
            stored.version,
            &stored.payload,
        )
        .map_err(|e| {
            format!(
                "stored event at sequence {} cannot be used: {e}",
                stored.seq
            )
        })?;
        state = state.evolve(&event);
    }
    Ok(state)
}

fn accepted(request: &CommandRequest, version: u64, seq: u64, events: Vec<String>) -> Reply {
    Reply::Accepted(Accepted {
        id: request.id.clone(),
        version,
        seq,
        events,
    })
}

/// The reply a command already got, recognised by its id on the stored events; `invalid` when
/// the id was used for a different command (its events record the command's fingerprint).
fn earlier_reply(history: &History, request: &CommandRequest) -> Option<Reply> {
    let mut found: Option<(usize, u64)> = None;
    let mut types = Vec::new();
    for (index, event) in history.events.iter().enumerate() {
        if event.command_id.as_deref() == Some(request.command_id.as_str()) {
            if event
                .fingerprint
                .as_deref()
                .is_some_and(|f| f != request.fingerprint)
            {
                return Some(reused_id(request));
            }
            found = Some((index, event.seq));
            types.push(event.event_type.clone());
        }
    }
    let (index, seq) = found?;
    Some(accepted(request, index as u64 + 1, seq, types))
}

fn reused_id(request: &CommandRequest) -> Reply {
    let message = format!(
        "command id {:?} was already used for a different command on {}",
        request.command_id, request.id
    );
    Reply::failed(ErrorKind::Invalid, message)
}

async fn respond(request: &service::Request, reply: &Reply) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    if let Reply::Failed(failure) = reply {
        headers.insert(
            service::NATS_SERVICE_ERROR_CODE,
            failure.kind.code().to_string().as_str(),
        );
        // Header values cannot hold line breaks.
        let message = failure.message.replace(['\r', '\n'], " ");
        headers.insert(service::NATS_SERVICE_ERROR, message.as_str());
    }
    request
        .respond_with_headers(Ok(reply.to_json().into()), headers)
        .await
        .map_err(|e| e.to_string())
}

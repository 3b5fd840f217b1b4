//! Command functions: NATS services that turn commands into stored events.
//!
//! For every request on `cmd.<aggregate>.<id>.<command>` the runtime
//! 1. checks the subject, the command id (`Nats-Msg-Id`) and the body, and decodes the command;
//! 2. takes the aggregate's slot in the state cache (its lock inside the instance), loading the
//!    aggregate on a miss: the latest snapshot, if the aggregate has them, then the events
//!    after it;
//! 3. answers a repeated command id from the cache's recent commands or the ledger;
//! 4. decides on the cached state and appends the new events with
//!    `Nats-Expected-Last-Subject-Sequence` set to the cached sequence; on a conflict it catches
//!    up from that sequence and decides again, up to `command.max_retries` times within
//!    `command.conflict_budget`;
//! 5. replies. An accepted command's ledger entry is written after the reply (its events
//!    identify it until then); a rejection or an empty decision is first checked against the
//!    aggregate's current sequence and recorded, then sent.
//!
//! Commands for one aggregate are processed one at a time per instance, so conflicts only arise
//! between instances.

mod batched;
mod cache;
pub mod decision;
mod kv;
mod ledger;
#[cfg(test)]
pub(crate) mod memory;
mod reply;
pub(crate) mod request;
mod snapshots;
#[cfg(test)]
mod tests;
mod writer;

pub use crate::wire::names::MAX_ID_LEN;
pub use reply::{Accepted, ErrorKind, Failure, Reply, Written};
pub use request::MAX_COMMAND_ID_LEN;

use crate::affinity::Affinity;
use crate::aggregate::{Aggregate, Snapshots, Upcasters, decode_stored};
use crate::codec::{encode_variant, variant_names};
use crate::config::Config;
use crate::direct::DirectGets;
use crate::running::run_until_signal;
use crate::service::{self, Endpoint, Replies, Request, Service, ServiceSpec};
use crate::store::{Append, AppendError, EventLog, EventStore, NewEvent, StoreSettings};
use crate::telemetry;
use crate::wire::{AggregateNames, CommandSubjects, header, names};
use crate::{Error, health};
use async_nats::{Client, HeaderMap};
use cache::{Cached, QueueFull, StateCache};
use ledger::{CommandLedger, Entry, KvLedger};
use rand::Rng;
use request::CommandRequest;
use snapshots::{KvSnapshots, SnapshotRecord, SnapshotStore};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;
use writer::{Job, Writer};

/// How long start-up lets an already received refusal of the command subscription surface.
const REFUSAL_GRACE: Duration = Duration::from_millis(5);

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
        run_until_signal(self.start()).await
    }

    /// Connects, provisions the stream, ledger and snapshot buckets, and starts serving. The
    /// returned handle stops the function gracefully.
    pub async fn start(self) -> Result<RunningFunction, Error> {
        let config = Config::given_or_load(self.config)?;
        let names = AggregateNames::new(A::NAME, &config)?;
        let connection = config
            .nats
            .name
            .clone()
            .unwrap_or_else(|| names.connection());
        let (client, store, ledger, snapshots) =
            open::<A>(&config, &names, &connection, &names.ledger_bucket).await?;
        let upcasters = A::upcasters();
        let (handler, writer) = Handler::<A>::new(
            Arc::new(store),
            Arc::new(ledger),
            snapshots,
            upcasters,
            names.commands.clone(),
            config.command.clone(),
            config.ledger.ttl,
        );
        let handler = Arc::new(handler);
        let violations = crate::permissions::watch();
        let (service, endpoint, affinity) =
            register_service(&client, &handler, &names, &config, &self.version).await?;
        let (subjects, queue_group) = (
            handler.subjects.wildcard(),
            handler.config.queue_group.clone(),
        );
        let ready = move || {
            tracing::info!(
                aggregate = A::NAME,
                subjects = %subjects,
                stream = %names.stream,
                queue_group = %queue_group,
                "command function ready"
            )
        };
        go_live(
            &config,
            Serving {
                client,
                handler,
                service,
                endpoint,
                writer,
                violations,
                affinity,
            },
            ready,
        )
        .await
    }
}

/// Connects and opens what a function writing aggregate type `A`'s events needs: the event
/// store (provisioned when configured), the ledger bucket `ledger_bucket` and, when `A` has
/// them, its snapshots.
async fn open<A: Aggregate>(
    config: &Config,
    names: &AggregateNames,
    connection: &str,
    ledger_bucket: &str,
) -> Result<(Client, EventStore, KvLedger, Option<SnapshotSetup<A>>), Error> {
    let client = config.nats.connect(connection).await?;
    let store = open_store(config, names, &client).await?;
    let (ledger, reads) = open_ledger(config, &client, ledger_bucket).await?;
    let snapshots = open_snapshots::<A>(config, names, &client, reads).await?;
    Ok((client, store, ledger, snapshots))
}

/// The event store of the aggregate type `names` describes, provisioned when configured.
async fn open_store(
    config: &Config,
    names: &AggregateNames,
    client: &Client,
) -> Result<EventStore, Error> {
    let store = EventStore::new(
        client.clone(),
        StoreSettings {
            aggregate: names.aggregate.clone(),
            stream: names.stream.clone(),
            subject_prefix: names.event_prefix.clone(),
            replicas: config.stream.replicas,
            duplicate_window: config.stream.duplicate_window,
            max_bytes: config.stream.max_bytes,
            timeout: config.nats.request_timeout,
            api_prefix: config.nats.jetstream_api(),
        },
    );
    store.check_server_version()?;
    if config.stream.provision {
        store.provision().await?;
    }
    Ok(store)
}

/// The ledger bucket `bucket`, and the direct gets its reads (and the snapshots') use.
async fn open_ledger(
    config: &Config,
    client: &Client,
    bucket: &str,
) -> Result<(KvLedger, Arc<DirectGets>), Error> {
    let reads = Arc::new(DirectGets::start(client.clone(), config.nats.request_timeout).await?);
    let ledger = KvLedger::open(
        config.nats.jetstream(client.clone()),
        &config.nats.jetstream_api(),
        reads.clone(),
        bucket,
        config.ledger.ttl,
        config.ledger.replicas,
    )
    .await?;
    Ok((ledger, reads))
}

/// `A`'s snapshot bucket, when `A` has snapshots.
async fn open_snapshots<A: Aggregate>(
    config: &Config,
    names: &AggregateNames,
    client: &Client,
    reads: Arc<DirectGets>,
) -> Result<Option<SnapshotSetup<A>>, Error> {
    let Some(codec) = A::snapshots() else {
        return Ok(None);
    };
    let store = KvSnapshots::open(
        config.nats.jetstream(client.clone()),
        &config.nats.jetstream_api(),
        reads,
        &names.snapshot_bucket,
        config.stream.replicas,
    )
    .await?;
    Ok(Some(SnapshotSetup {
        format: snapshots::format_of::<A>(codec.version(), &A::upcasters()),
        store: Arc::new(store),
        codec,
    }))
}

/// Confirms the subscriptions were allowed, says so with `ready` (never before: a denied
/// function must not log that it is ready), starts the health endpoint and serves.
async fn go_live<H: Serves>(
    config: &Config,
    mut serving: Serving<H>,
    ready: impl FnOnce(),
) -> Result<RunningFunction, Error> {
    // A denied subscription is reported asynchronously, and a client's flush only writes out
    // what it buffered: it does not wait for the server. So make one round trip instead. The
    // server handles a connection's operations in order and writes a refusal of a SUB as it
    // handles it, so by the time the answer to a later request arrives any refusal has arrived
    // before it; a moment's grace lets the connection's event task hand it over. Anything later
    // stops the serving loop.
    let confirm = config.nats.jetstream(serving.client.clone());
    match tokio::time::timeout(config.nats.request_timeout, confirm.query_account()).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => {
            return Err(Error::Service(format!(
                "NATS did not confirm the subscriptions: {err}"
            )));
        }
        Err(_) => {
            return Err(Error::Service(
                "NATS did not confirm the subscriptions in time".into(),
            ));
        }
    }
    let subscriptions = serving.subscriptions();
    let refused = tokio::time::timeout(
        REFUSAL_GRACE,
        crate::permissions::denied_any(&mut serving.violations, &subscriptions),
    )
    .await;
    if let Ok(denied) = refused {
        let hint = if denied.contains("\"jetfn.affinity.") {
            " (aggregate affinity needs it; or set command.affinity = false)"
        } else {
            ""
        };
        return Err(Error::Service(format!("permission denied: {denied}{hint}")));
    }
    ready();
    let (stop_tx, stop_rx) = watch::channel(false);
    let ready = stop_rx.clone();
    let health = health::serve(&config.health, serving.client.clone(), move || {
        !*ready.borrow()
    })
    .await?;
    let task = tokio::spawn(serve(serving, stop_rx));
    Ok(RunningFunction {
        stop: stop_tx,
        task,
        _health: health,
    })
}

/// What the serving loop needs of a handler: the single-aggregate [`Handler`] and the atomic
/// decision handler are served alike.
trait Serves: Send + Sync + 'static {
    /// Processes one request and replies.
    fn handle(&self, request: Request) -> impl Future<Output = ()> + Send;
    /// Answers a request the instance has no room for.
    fn overloaded(&self, request: Request) -> impl Future<Output = ()> + Send;
    /// Requests taken before the instance answers `overloaded`.
    fn max_pending(&self) -> usize;
    /// The command subjects served, as a subscription wildcard.
    fn wildcard(&self) -> String;
    /// The command subjects' pattern, for the endpoint's metadata.
    fn pattern(&self) -> String;
    /// The function's name in logs.
    fn name(&self) -> &str;
    /// The queue group of its subscription.
    fn queue_group(&self) -> &str;
    /// The endpoint data of `$SRV.STATS`.
    fn stats(&self) -> serde_json::Value;
}

impl<A: Aggregate> Serves for Handler<A> {
    fn handle(&self, request: Request) -> impl Future<Output = ()> + Send {
        Handler::handle(self, request)
    }

    fn overloaded(&self, request: Request) -> impl Future<Output = ()> + Send {
        Handler::overloaded(self, request)
    }

    fn max_pending(&self) -> usize {
        self.config.max_pending
    }

    fn wildcard(&self) -> String {
        self.subjects.wildcard()
    }

    fn pattern(&self) -> String {
        self.subjects.pattern()
    }

    fn name(&self) -> &str {
        A::NAME
    }

    fn queue_group(&self) -> &str {
        &self.config.queue_group
    }

    fn stats(&self) -> serde_json::Value {
        Handler::stats(self)
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

impl crate::running::StopOnSignal for RunningFunction {
    fn stop_on(
        self,
        signal: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<(), Error>> {
        RunningFunction::stop_on(self, signal)
    }
}

/// Registers the service of a command function and its endpoint, with aggregate affinity
/// unless `command.affinity` is off.
async fn register_service<A: Aggregate>(
    client: &Client,
    handler: &Arc<Handler<A>>,
    names: &AggregateNames,
    config: &Config,
    version: &str,
) -> Result<(Service, Endpoint, Option<Arc<Affinity>>), Error> {
    let commands = variant_names::<A::Command>().join(",");
    let schemas = serde_json::to_string(&crate::schema::command_schemas::<A>()).unwrap_or_default();
    let metadata = HashMap::from([
        (names::meta::SCHEMAS.to_owned(), schemas),
        (names::meta::KIND.to_owned(), names::KIND_COMMAND.to_owned()),
        (names::meta::AGGREGATE.to_owned(), A::NAME.to_owned()),
        (names::meta::COMMANDS.to_owned(), commands),
        (names::meta::STREAM.to_owned(), names.stream.clone()),
        (
            names::meta::EVENTS.to_owned(),
            format!("{}.<id>", names.event_prefix),
        ),
    ]);
    // The affinity's counters join the stats once it exists, which needs the instance id.
    let affinity_stats = Arc::new(std::sync::OnceLock::<Arc<Affinity>>::new());
    let stats = {
        let (handler, affinity) = (handler.clone(), affinity_stats.clone());
        Arc::new(move || {
            let mut stats = handler.stats();
            if let Some(affinity) = affinity.get() {
                stats["affinity"] = affinity.to_json();
            }
            stats
        })
    };
    let (service, endpoint) = register(
        client,
        handler,
        service::ServiceSpec {
            name: A::NAME.to_owned(),
            version: version.to_owned(),
            description: format!("jetfn command function for aggregate {}", A::NAME),
            metadata,
            queue_group: handler.queue_group().to_owned(),
            replies: Replies::new(&config.nats.reply_prefixes),
            stats,
        },
    )
    .await?;
    if !config.command.affinity {
        return Ok((service, endpoint, None));
    }
    let (affinity, handed) = Affinity::start(
        client,
        A::NAME,
        service.id(),
        handler.subjects.clone(),
        handler.queue_group(),
    )
    .await?;
    let _ = affinity_stats.set(affinity.clone());
    let endpoint = endpoint.with_affinity(affinity.clone(), handed);
    Ok((service, endpoint, Some(affinity)))
}

/// The `$SRV.STATS` data of a handler.
fn stats_of<H: Serves>(handler: &Arc<H>) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
    let handler = handler.clone();
    Arc::new(move || handler.stats())
}

/// Registers the NATS service of `handler` and its one endpoint on the command subjects.
async fn register<H: Serves>(
    client: &Client,
    handler: &Arc<H>,
    spec: ServiceSpec,
) -> Result<(Service, Endpoint), Error> {
    let service = Service::start(client, spec).await?;
    let endpoint = service
        .endpoint(
            "commands",
            handler.wildcard(),
            HashMap::from([("subject".to_owned(), handler.pattern())]),
        )
        .await?;
    Ok((service, endpoint))
}

/// What the serving loop owns.
struct Serving<H> {
    client: Client,
    handler: Arc<H>,
    service: Service,
    endpoint: Endpoint,
    writer: tokio::task::JoinHandle<()>,
    violations: tokio::sync::broadcast::Receiver<String>,
    /// Aggregate affinity among the instances (command functions, unless turned off).
    affinity: Option<Arc<Affinity>>,
}

impl<H: Serves> Serving<H> {
    /// Every subject the function subscribes to serve: a refusal of any stops it.
    fn subscriptions(&self) -> Vec<String> {
        let mut subscriptions = vec![self.handler.wildcard()];
        if let Some(affinity) = &self.affinity {
            subscriptions.extend(affinity.subscriptions());
        }
        subscriptions
    }
}

/// Takes requests until told to stop, then drains: the endpoint unsubscribes, already received
/// requests are still processed, the background writes finish, and the loop ends.
async fn serve<H: Serves>(
    serving: Serving<H>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let subscriptions = serving.subscriptions();
    let Serving {
        client,
        handler,
        service,
        mut endpoint,
        writer,
        mut violations,
        affinity,
    } = serving;
    // Serving now: from here on the other instances may hand this one its aggregates.
    if let Some(affinity) = &affinity {
        affinity.join().await?;
    }
    // Requests waiting for their aggregate hold no processing permit (that is taken after the
    // aggregate's lock), so this only bounds memory.
    let pending = Arc::new(Semaphore::new(handler.max_pending()));
    let mut in_flight = JoinSet::new();
    let mut service = Some(service);
    let mut result = Ok(());
    let mut summary = Summary::new(handler.stats());
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + SUMMARY_EVERY, SUMMARY_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => summary.log(handler.name(), handler.stats()),
            changed = stop.changed(), if service.is_some() => {
                if (changed.is_err() || *stop.borrow())
                    && let Some(service) = service.take()
                {
                    // Unsubscribes the endpoint; buffered requests still come through.
                    service.stop().await;
                }
            }
            denied = crate::permissions::denied_any(&mut violations, &subscriptions) => {
                result = Err(Error::Service(format!("permission denied: {denied}")));
                break;
            }
            request = endpoint.next() => {
                let Some(request) = request else { break };
                let handler = handler.clone();
                match pending.clone().try_acquire_owned() {
                    Ok(permit) => in_flight.spawn(async move {
                        handler.handle(request).await;
                        drop(permit);
                    }),
                    // Never block the subscription: a full instance says so at once.
                    Err(_) => in_flight.spawn(async move { handler.overloaded(request).await }),
                };
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
    let name = handler.name().to_owned();
    // The handler's writer queue closes with the last handler; wait for its writes.
    drop(handler);
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        tracing::warn!("background ledger writes did not finish at shutdown");
    }
    // Without a server (it went away) there is nothing to flush to; do not wait for it forever.
    match tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "replies may not have been flushed"),
        Err(_) => tracing::warn!("NATS unreachable at shutdown: replies may not have been flushed"),
    }
    tracing::info!(function = %name, "command function stopped");
    result
}

/// How often a command function logs how many commands it served, when it served any.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The periodic info line of a command function: its outcome counters since the last one.
struct Summary {
    last: serde_json::Value,
}

impl Summary {
    const COUNTERS: [&'static str; 6] = [
        "accepted",
        "invalid",
        "rejected",
        "conflict",
        "unavailable",
        "retries",
    ];

    fn new(stats: serde_json::Value) -> Self {
        Self { last: stats }
    }

    /// Logs the counters' growth since the last call, unless nothing was served.
    fn log(&mut self, name: &str, stats: serde_json::Value) {
        let Some([accepted, invalid, rejected, conflict, unavailable, retries]) = self.since(stats)
        else {
            return;
        };
        tracing::info!(
            function = name,
            accepted,
            invalid,
            rejected,
            conflict,
            unavailable,
            retries,
            "commands served in the last {} s",
            SUMMARY_EVERY.as_secs()
        );
    }

    /// The growth of [`Self::COUNTERS`] since the last call, or `None` when no command was
    /// served in between.
    fn since(&mut self, stats: serde_json::Value) -> Option<[u64; 6]> {
        let grown = Self::COUNTERS.map(|counter| {
            let count = |stats: &serde_json::Value| stats[counter].as_u64().unwrap_or(0);
            count(&stats).saturating_sub(count(&self.last))
        });
        self.last = stats;
        // Retries alone are no command served.
        (grown[..5].iter().sum::<u64>() > 0).then_some(grown)
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

/// Snapshots of an aggregate that opted in: where they go and how they are written.
struct SnapshotSetup<A> {
    store: Arc<dyn SnapshotStore>,
    codec: Snapshots<A>,
    format: String,
}

/// Decides commands for aggregate type `A` over an event log and a ledger.
struct Handler<A: Aggregate> {
    log: Arc<dyn EventLog>,
    ledger: Arc<dyn CommandLedger>,
    snapshots: Option<SnapshotSetup<A>>,
    writer: Writer,
    cache: StateCache<A>,
    permits: Semaphore,
    upcasters: Upcasters,
    counters: Counters,
    subjects: CommandSubjects,
    config: crate::config::CommandConfig,
    /// How long the ledger remembers a reply; cached replies are forgotten as soon.
    ledger_ttl: Duration,
}

/// The outcome of one command in the loop.
struct Outcome {
    reply: Reply,
    retries: u32,
    /// Whether the cached state is still good (false after a fold error).
    keep: bool,
}

impl Outcome {
    fn new(reply: Reply, retries: u32) -> Self {
        Outcome {
            reply,
            retries,
            keep: true,
        }
    }
}

fn unavailable(message: impl Into<String>) -> Reply {
    Reply::failed(ErrorKind::Unavailable, message)
}

impl<A: Aggregate> Handler<A> {
    /// A handler and the task of its background writer.
    fn new(
        log: Arc<dyn EventLog>,
        ledger: Arc<dyn CommandLedger>,
        snapshots: Option<SnapshotSetup<A>>,
        upcasters: Upcasters,
        subjects: CommandSubjects,
        config: crate::config::CommandConfig,
        ledger_ttl: Duration,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (writer, task) =
            Writer::start(ledger.clone(), snapshots.as_ref().map(|s| s.store.clone()));
        let handler = Handler {
            log,
            ledger,
            snapshots,
            writer,
            cache: StateCache::new(config.cache_entries, config.max_queued_per_aggregate),
            permits: Semaphore::new(config.max_in_flight),
            upcasters,
            counters: Counters::default(),
            subjects,
            config,
            ledger_ttl,
        };
        (handler, task)
    }

    fn stats(&self) -> serde_json::Value {
        let mut stats = self.counters.to_json();
        stats["cache"] = self.cache.to_json();
        let ledger = self.ledger.stats();
        if !ledger.is_null() {
            stats["ledger"] = ledger;
        }
        stats
    }

    async fn handle(&self, request: Request) {
        self.serve_request(
            request,
            A::NAME,
            |message| self.check(message),
            |checked, command| async move { self.execute(&checked, command).await },
        )
        .await
    }

    /// One request from start to reply: the wire checks (`check`), the work (`execute`), the
    /// counters, the log line and the reply. (Its reply subject was checked by the endpoint.)
    async fn serve_request<C, Fut>(
        &self,
        request: Request,
        name: &str,
        check: impl FnOnce(&async_nats::Message) -> Result<(CommandRequest, C), String>,
        execute: impl FnOnce(CommandRequest, C) -> Fut,
    ) where
        Fut: Future<Output = (Reply, u32)>,
    {
        let started = Instant::now();
        let message = &request.message;
        // A debug span: at info, recording its fields for the log cost a quarter of the
        // throughput at full load. Span exporters (the `otlp` feature) take debug spans anyway.
        let span = tracing::debug_span!(
            "command",
            aggregate = name,
            id = tracing::field::Empty,
            command = tracing::field::Empty,
            command_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
            retries = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        // Bytes the client library could not read exactly (see vendor/async-nats) are refused
        // before anything else looks at the request.
        let checked = match message.malformed() {
            Some(problem) => Err(format!("the request cannot be read: {problem}")),
            None => check(message),
        };
        let mut about = None;
        let (reply, retries) = match checked {
            Ok((checked, command)) => {
                about = Some((
                    checked.id.clone(),
                    checked.command.clone(),
                    checked.command_id.clone(),
                    checked.trace.trace_id.clone(),
                ));
                span.record("id", checked.id.as_str());
                span.record("command", checked.command.as_str());
                span.record("command_id", checked.command_id.as_str());
                span.record("trace_id", checked.trace.trace_id.as_str());
                telemetry::link(&span, &checked.trace);
                execute(checked, command).instrument(span.clone()).await
            }
            Err(message) => (Reply::failed(ErrorKind::Invalid, message), 0),
        };
        self.counters.count(&reply, retries);
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        span.record("outcome", reply.outcome());
        span.record("retries", retries);
        span.record("duration_ms", duration_ms);
        // Accepted commands log a debug line in their span (`RUST_LOG=info,jetfn::command=debug`);
        // the counters go out at info every `SUMMARY_EVERY` (see `serve`). Failures log at info
        // or warn, with the span's fields, since the span is not there at those levels.
        let failure = match &reply {
            Reply::Accepted(_) => {
                span.in_scope(|| tracing::debug!("command handled"));
                None
            }
            Reply::Failed(failure) => Some(failure),
        };
        if let Some(failure) = failure {
            let (id, command, command_id, trace_id) = about.unwrap_or_default();
            let outcome = reply.outcome();
            macro_rules! failed {
                ($level:ident, $message:literal) => {
                    tracing::$level!(
                        parent: None,
                        aggregate = name,
                        id,
                        command,
                        command_id,
                        trace_id,
                        outcome,
                        retries,
                        duration_ms,
                        error = %failure.message,
                        $message
                    )
                };
            }
            match failure.kind {
                ErrorKind::Unavailable => failed!(warn, "command failed"),
                _ => failed!(info, "command handled"),
            }
        }
        if let Err(err) = respond(&request, &reply).await {
            // Commands published without a reply subject are still applied.
            tracing::debug!(parent: &span, error = %err, "reply not sent");
        }
    }

    /// Answers a request the instance has no room for, without processing it.
    async fn overloaded(&self, request: Request) {
        let message = format!(
            "instance overloaded: {} requests pending (command.max_pending); retry with the same \
             command id",
            self.config.max_pending
        );
        let reply = unavailable(message);
        self.counters.count(&reply, 0);
        let _ = respond(&request, &reply).await;
    }

    /// The wire checks: subject, command id, body, and decoding into the command type.
    fn check(&self, message: &async_nats::Message) -> Result<(CommandRequest, A::Command), String> {
        request::check::<A>(
            &self.subjects,
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            self.config.max_body_bytes,
        )
    }

    fn decode(&self, request: &CommandRequest) -> Result<A::Command, String> {
        request::decode::<A>(request)
    }

    /// Answers a checked command, returning the reply and the number of conflict retries.
    async fn execute(&self, request: &CommandRequest, command: A::Command) -> (Reply, u32) {
        let Ok(slot) = self.cache.slot(&request.id) else {
            let QueueFull = QueueFull;
            let message = format!(
                "{} has {} commands waiting in this instance; retry with the same command id",
                request.id, self.config.max_queued_per_aggregate
            );
            return (unavailable(message), 0);
        };
        // The ledger is asked while the command waits for its aggregate: on a busy aggregate the
        // answer is there when its turn comes. A repeat queued behind its first attempt is still
        // caught: the cache, checked first under the lock, knows what the first attempt did.
        let (mut guard, ledger) = tokio::join!(
            slot.lock(),
            self.ledger.get(&request.id, &request.command_id)
        );
        // Taken only once the aggregate is ours, so commands queued on a busy aggregate never
        // keep an idle one waiting.
        let Ok(_permit) = self.permits.acquire().await else {
            return (unavailable("shutting down"), 0);
        };
        self.cache.count(guard.is_some());
        let (mut cached, fresh) = match guard.take() {
            Some(cached) => (cached, false),
            None => match self.load(&request.id).await {
                Ok(cached) => (cached, true),
                Err(reply) => return (reply, 0),
            },
        };
        let outcome = self
            .decide_and_append(&mut cached, request, command, fresh, ledger)
            .await;
        if outcome.keep {
            *guard = Some(cached);
        }
        (outcome.reply, outcome.retries)
    }

    /// A cold load: the latest usable snapshot, then the events after it.
    async fn load(&self, id: &str) -> Result<Cached<A>, Reply> {
        let mut cached = Cached::empty(self.config.recent_commands, self.ledger_ttl);
        if let Some(setup) = &self.snapshots {
            match setup.store.get(id).await {
                Ok(Some(record)) if record.format == setup.format => {
                    match setup.codec.decode(record.state) {
                        Ok(state) => {
                            cached.state = state;
                            cached.last_seq = record.seq;
                            cached.version = record.version;
                            cached.snapshot_version = record.version;
                            cached.ledgered.store(record.version, Ordering::Relaxed);
                        }
                        Err(err) => {
                            tracing::warn!(id, error = %err, "snapshot unreadable; loading the events")
                        }
                    }
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(id, error = %err, "no snapshot; loading the events"),
            }
        }
        self.catch_up(&mut cached, id, None)
            .await
            .map(|_| cached)
            .map_err(|(reply, _)| reply)
    }

    /// Folds the events stored after the cached sequence into the cached state, remembering
    /// their commands. Returns the earlier reply of `request`'s command id when its events are
    /// among them. An error carries whether the cached state is still usable.
    async fn catch_up(
        &self,
        cached: &mut Cached<A>,
        id: &str,
        request: Option<&CommandRequest>,
    ) -> Result<Option<Reply>, (Reply, bool)> {
        let events = self
            .log
            .read_after(id, cached.last_seq)
            .await
            .map_err(|e| (unavailable(e.to_string()), true))?;
        let mut earlier = None;
        // The command whose events are being folded: (id, fingerprint, event types).
        let mut group: Option<(String, Option<String>, Vec<String>)> = None;
        for stored in &events {
            let event = decode_stored::<A>(
                &self.upcasters,
                &stored.event_type,
                stored.version,
                &stored.payload,
            )
            .map_err(|e| {
                let message = format!(
                    "stored event at sequence {} cannot be used: {e}",
                    stored.seq
                );
                (unavailable(message), false)
            })?;
            // A command's events are contiguous: a new id ends the previous command, whose
            // reply ends at the version and sequence folded so far.
            if group.as_ref().map(|(c, _, _)| Some(c)) != Some(stored.command_id.as_ref())
                && let Some(done) = group.take()
            {
                self.remember_folded(cached, id, done);
            }
            cached.state = std::mem::take(&mut cached.state).evolve(&event);
            cached.last_seq = stored.seq;
            cached.version += 1;
            if let Some(command_id) = &stored.command_id {
                let (_, _, types) = group.get_or_insert_with(|| {
                    (command_id.clone(), stored.fingerprint.clone(), Vec::new())
                });
                types.push(stored.event_type.clone());
            }
        }
        if let Some(done) = group.take() {
            self.remember_folded(cached, id, done);
        }
        if let Some(request) = request
            && let Some(entry) = cached.applied.get(&request.command_id)
            && events
                .iter()
                .any(|e| e.command_id.as_deref() == Some(&request.command_id))
        {
            earlier = Some(answer(entry, request));
        }
        Ok(earlier)
    }

    /// Remembers a command found on folded events, ending at the cached version.
    fn remember_folded(
        &self,
        cached: &mut Cached<A>,
        id: &str,
        (command_id, fingerprint, types): (String, Option<String>, Vec<String>),
    ) {
        let reply = Reply::Accepted(Accepted {
            id: id.to_owned(),
            version: cached.version,
            seq: cached.last_seq,
            events: types,
            aggregates: Vec::new(),
        });
        let entry = Entry {
            fingerprint: fingerprint.unwrap_or_default(),
            reply,
        };
        cached.applied.insert(command_id, entry);
    }

    /// Decide, append; on a conflict, catch up with what changed and decide again.
    async fn decide_and_append(
        &self,
        cached: &mut Cached<A>,
        request: &CommandRequest,
        command: A::Command,
        mut fresh: bool,
        ledger: Result<Option<Entry>, crate::store::StoreError>,
    ) -> Outcome {
        if let Some(entry) = cached.reply_of(&request.command_id) {
            return Outcome::new(answer(entry, request), 0);
        }
        match ledger {
            Ok(Some(entry)) => {
                let reply = answer(&entry, request);
                cached.recent.remember(&request.command_id, entry);
                return Outcome::new(reply, 0);
            }
            Ok(None) => {}
            Err(err) => return Outcome::new(unavailable(err.to_string()), 0),
        }
        let started = Instant::now();
        let mut command = Some(command);
        let mut retries = 0;
        loop {
            // Decoded once per attempt: the first attempt uses the checked command.
            let command = match command.take() {
                Some(command) => command,
                None => match self.decode(request) {
                    Ok(command) => command,
                    Err(m) => return Outcome::new(Reply::failed(ErrorKind::Invalid, m), retries),
                },
            };
            let decided = match cached.state.decide(command) {
                Ok(events) if !events.is_empty() => events,
                outcome => {
                    // Nothing to append, so OCC cannot catch a stale state: make sure the state
                    // is current before this outcome becomes the command's answer for good.
                    if !fresh {
                        match self.is_current(cached, &request.id).await {
                            Ok(true) => {}
                            Ok(false) => {
                                fresh = true;
                                match self.catch_up(cached, &request.id, Some(request)).await {
                                    Ok(Some(reply)) => return Outcome::new(reply, retries),
                                    Ok(None) => continue,
                                    Err((reply, keep)) => {
                                        return Outcome {
                                            reply,
                                            retries,
                                            keep,
                                        };
                                    }
                                }
                            }
                            Err(reply) => return Outcome::new(reply, retries),
                        }
                    }
                    let reply = match outcome {
                        Err(rejection) => Reply::rejected(&rejection),
                        Ok(_) => accepted(request, cached.version, cached.last_seq, Vec::new()),
                    };
                    return Outcome::new(self.record_now(cached, request, reply).await, retries);
                }
            };
            let encoded = match encode::<A>(&decided) {
                Ok(encoded) => encoded,
                Err(reply) => return Outcome::new(reply, retries),
            };
            let append = Append {
                aggregate_id: &request.id,
                expected_last_seq: cached.last_seq,
                expected_version: cached.version,
                command_id: &request.command_id,
                command: &request.command,
                events: &encoded,
                fingerprint: Some(&request.fingerprint),
                trace: Some(&request.trace),
            };
            let exhausted = retries >= self.config.max_retries
                || started.elapsed() >= self.config.conflict_budget;
            match self.log.append(append).await {
                Ok(seq) => {
                    for event in &decided {
                        cached.state = std::mem::take(&mut cached.state).evolve(event);
                    }
                    cached.last_seq = seq;
                    cached.version += decided.len() as u64;
                    let types = encoded.into_iter().map(|e| e.event_type).collect();
                    let reply = accepted(request, cached.version, seq, types);
                    self.record_later(cached, request, &reply);
                    return Outcome::new(reply, retries);
                }
                Err(AppendError::Unavailable(message) | AppendError::TooManyBatches(message)) => {
                    return Outcome::new(unavailable(message), retries);
                }
                Err(AppendError::Conflict(message)) if exhausted => {
                    let message = format!(
                        "{} changed concurrently {} times in a row; last: {message}",
                        request.id,
                        retries + 1
                    );
                    return Outcome::new(Reply::failed(ErrorKind::Conflict, message), retries);
                }
                Err(AppendError::Unknown(message)) if exhausted => {
                    return Outcome::new(unavailable(message), retries);
                }
                Err(err) => {
                    tracing::debug!(error = %err, retry = retries + 1, "catching up after conflict");
                    retries += 1;
                    fresh = true;
                    let before = cached.last_seq;
                    match self.catch_up(cached, &request.id, Some(request)).await {
                        Ok(Some(reply)) => return Outcome::new(reply, retries),
                        Ok(None) => {}
                        Err((reply, keep)) => {
                            return Outcome {
                                reply,
                                retries,
                                keep,
                            };
                        }
                    }
                    // The rival's events are folded in: the state is current, so try again at
                    // once. Pause only when nothing new was found (a clustered in-flight
                    // conflict, an answer that never came), while the aggregate stays locked.
                    if cached.last_seq == before {
                        tokio::time::sleep(self.backoff(retries)).await;
                    }
                }
            }
        }
    }

    /// Whether no event was appended to the aggregate since it was cached: one direct get.
    async fn is_current(&self, cached: &Cached<A>, id: &str) -> Result<bool, Reply> {
        let last = self
            .log
            .last_seq(id)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(last == cached.last_seq)
    }

    /// Records a reply that left no event behind before it is sent: only the ledger knows it.
    async fn record_now(
        &self,
        cached: &mut Cached<A>,
        request: &CommandRequest,
        reply: Reply,
    ) -> Reply {
        let entry = Entry {
            fingerprint: request.fingerprint.clone(),
            reply,
        };
        if let Err(err) = self
            .ledger
            .put(&request.id, &request.command_id, &entry)
            .await
        {
            // Unrecorded, a resend could be decided differently: let the client retry.
            return unavailable(format!("could not record the outcome: {err}"));
        }
        cached.recent.remember(&request.command_id, entry.clone());
        entry.reply
    }

    /// Remembers an accepted command in the cache; when a snapshot is due, queues the ledger
    /// entries of every command the snapshot will cover, then the snapshot.
    ///
    /// An accepted command needs no ledger entry while its events can still be read: any
    /// instance that loads or catches up the aggregate folds them and finds its id. Only a
    /// snapshot hides events from a load, so the entries of the commands it covers are written
    /// just before it, and the writer stores the snapshot only once they all are. The cache
    /// entry knows every command since the last snapshot it knows to be stored with its ledger
    /// entries (its own or the one it loaded), from this instance and others alike, so a
    /// snapshot never covers a command that only its events knew. It forgets them only once
    /// the writer has confirmed that snapshot; until then it answers resends itself.
    fn record_later(&self, cached: &mut Cached<A>, request: &CommandRequest, reply: &Reply) {
        let entry = Entry {
            fingerprint: request.fingerprint.clone(),
            reply: reply.clone(),
        };
        cached.applied.insert(request.command_id.clone(), entry);
        let Some(setup) = &self.snapshots else { return };
        if cached.version < cached.snapshot_version + self.config.snapshot_every {
            return;
        }
        let ledgered = cached.ledgered.load(Ordering::Relaxed);
        cached.applied.retain(|_, entry| match &entry.reply {
            Reply::Accepted(accepted) => accepted.version > ledgered,
            Reply::Failed(_) => false,
        });
        let state = match setup.codec.encode(&cached.state) {
            Ok(state) => state,
            Err(err) => {
                tracing::warn!(id = %request.id, error = %err, "state not snapshotted");
                return;
            }
        };
        // Everything not yet confirmed, so a snapshot that failed is made good by the next.
        for (command_id, entry) in &cached.applied {
            self.writer.queue(Job::Ledger {
                id: request.id.clone(),
                command_id: command_id.clone(),
                entry: entry.clone(),
            });
        }
        self.writer.queue(Job::Snapshot {
            id: request.id.clone(),
            record: SnapshotRecord {
                format: setup.format.clone(),
                seq: cached.last_seq,
                version: cached.version,
                state,
            },
            ledgered: cached.ledgered.clone(),
        });
        cached.snapshot_version = cached.version;
    }

    /// Full-jitter exponential backoff before retry `retry` (from 1) when a catch-up found
    /// nothing new: uniform in [0, min(max, base * 2^(retry-1))].
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

/// Encodes what the domain decided.
fn encode<A: Aggregate>(events: &[A::Event]) -> Result<Vec<NewEvent>, Reply> {
    events
        .iter()
        .map(|event| {
            let (event_type, payload) =
                encode_variant(event).map_err(|e| unavailable(e.to_string()))?;
            Ok(NewEvent {
                version: A::event_version(&event_type),
                event_type,
                payload,
            })
        })
        .collect()
}

/// The reply a command already got; `invalid` when its id was used for a different command.
fn answer(entry: &Entry, request: &CommandRequest) -> Reply {
    // Events written before fingerprints were recorded carry none: trust the id.
    if entry.fingerprint.is_empty() || entry.fingerprint == request.fingerprint {
        entry.reply.clone()
    } else {
        reused_id(request)
    }
}

fn accepted(request: &CommandRequest, version: u64, seq: u64, events: Vec<String>) -> Reply {
    Reply::Accepted(Accepted {
        id: request.id.clone(),
        version,
        seq,
        events,
        aggregates: Vec::new(),
    })
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
            header::SERVICE_ERROR_CODE,
            failure.kind.code().to_string().as_str(),
        );
        // Header values cannot hold line breaks.
        let message = failure.message.replace(['\r', '\n'], " ");
        headers.insert(header::SERVICE_ERROR, message.as_str());
    }
    request
        .respond_with_headers(reply.to_json().into(), headers)
        .await
}

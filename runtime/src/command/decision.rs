//! Decision functions: NATS services that decide one command over several aggregates and append
//! all its events in one atomic batch.
//!
//! For every request on `cmd.<decision>.<id>.<command>` the runtime
//! 1. runs the command function's wire checks and decodes the command;
//! 2. asks the [`Decision`] which aggregates it needs, and takes their slots in the state cache
//!    of their type in (type, id) order (so two decisions over the same aggregates never wait
//!    for each other in a circle), loading each on a miss: snapshot, then the events after it;
//! 3. answers a repeated command id from the ledger (keyed by the decision's `<id>`) or from the
//!    command's events found on the aggregates;
//! 4. decides, and appends every event in **one** ADR-50 atomic batch, each aggregate's events
//!    contiguous, its first message carrying that aggregate's literal
//!    `Nats-Expected-Last-Subject-Sequence`. On a conflict it catches up the aggregates (one
//!    direct get each for those that did not change) and decides again, within the same
//!    `command.max_retries`, `command.conflict_budget` and backoff as a single-aggregate command;
//! 5. replies with every aggregate written (type and id), its new version, and the sequence of
//!    the batch's last message as the consistency token.
//!
//! Each aggregate type keeps its own state cache (one single-aggregate [`Handler`] per type);
//! the types of one decision must share one stream, which start-up checks.
//!
//! Wildcard `Nats-Expected-Last-Subject-Sequence-Subject` checks are never used: on replicated
//! streams the server tracks in-flight writes by literal subject, so two batches with
//! overlapping wildcard checks can both be accepted.

use super::cache::{Cached, QueueFull};
use super::ledger::{Entry, KvLedger};
use super::request::{self, CommandRequest};
use super::writer::Job;
use super::{
    Handler, Replies, Request, RunningFunction, Serves, ServiceSpec, Serving, accepted, answer,
    encode, go_live, open_ledger, open_snapshots, open_store, register, run_until_signal, stats_of,
    unavailable,
};
use crate::Error;
use crate::aggregate::Aggregate;
use crate::codec::variant_names;
use crate::config::Config;
use crate::decision::{
    Aggregates, Decision, EventList, MAX_BATCH_EVENTS, StateEntry, States, Visit, type_names,
};
use crate::direct::DirectGets;
use crate::store::{Append, AppendError, EventLog, NewEvent};
use crate::wire::{AggregateNames, CommandSubjects, names};
use async_nats::Client;
use futures::future::BoxFuture;
use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedMutexGuard;

use super::reply::{ErrorKind, Reply, Written};

/// Replies of accepted decisions each cached aggregate keeps before starting over: the ledger,
/// written in the background within moments, answers for older ones.
const MAX_APPLIED: usize = 1024;

/// The first aggregate type of decision `D`.
type First<D> = <<D as Decision>::Aggregate as Aggregates>::First;

/// Starts building the function that serves decision `D`.
///
/// ```no_run
/// # use jetfn::decision::{Decision, Events, States};
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
/// # struct Bank;
/// # impl Decision for Bank {
/// #     const NAME: &'static str = "bank";
/// #     type Aggregate = Account; type Command = Command;
/// #     fn aggregates(c: &Command) -> Vec<String> { match *c {} }
/// #     fn decide(_: &States<'_, Account>, c: Command) -> Result<Events<Account>, Rejection> { match c {} }
/// # }
/// #[tokio::main]
/// async fn main() -> Result<(), jetfn::Error> {
///     jetfn::decision_function::<Bank>().run().await
/// }
/// ```
pub fn decision_function<D: Decision>() -> DecisionFunction<D> {
    DecisionFunction {
        config: None,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        _decision: PhantomData,
    }
}

/// A decision function being configured. See [`decision_function`].
#[derive(Debug)]
pub struct DecisionFunction<D> {
    config: Option<Config>,
    version: String,
    _decision: PhantomData<fn() -> D>,
}

/// What each aggregate type's part is opened with.
struct Setup<'a> {
    config: &'a Config,
    client: &'a Client,
    reads: Arc<DirectGets>,
    ledger: Arc<KvLedger>,
    commands: CommandSubjects,
}

/// Opens one aggregate type's part of a decision function.
type OpenPart = for<'a> fn(&'a Setup<'a>) -> BoxFuture<'a, Result<Arc<dyn Part>, Error>>;

/// Collects a part opener per aggregate type.
#[derive(Default)]
struct Openers(Vec<OpenPart>);

impl Visit for Openers {
    fn visit<A: Aggregate>(&mut self) {
        fn open<'a, A: Aggregate>(
            setup: &'a Setup<'a>,
        ) -> BoxFuture<'a, Result<Arc<dyn Part>, Error>> {
            Box::pin(async move {
                let handler = open_handler::<A>(setup).await?;
                Ok(Arc::new(PartOf(handler)) as Arc<dyn Part>)
            })
        }
        self.0.push(open::<A>);
    }
}

/// The handler of aggregate type `A`'s events in a decision function: its store (whose stream
/// must take atomic batches of all its subjects), snapshots and state cache, with the
/// decision's ledger.
async fn open_handler<A: Aggregate>(setup: &Setup<'_>) -> Result<Arc<Handler<A>>, Error> {
    let names = AggregateNames::new(A::NAME, setup.config)?;
    let store = open_store(setup.config, &names, setup.client).await?;
    store.check_single_stream().await?;
    let snapshots =
        open_snapshots::<A>(setup.config, &names, setup.client, setup.reads.clone()).await?;
    // The writer task of a type other than the first has nothing to write (the first type's
    // writes the decision's ledger entries); it ends with its handler.
    let (handler, _writer) = Handler::<A>::new(
        Arc::new(store),
        setup.ledger.clone(),
        snapshots,
        A::upcasters(),
        setup.commands.clone(),
        setup.config.command.clone(),
        setup.config.ledger.ttl,
    );
    Ok(Arc::new(handler))
}

/// Refuses decisions whose aggregate types cannot be written in one atomic batch: repeated or
/// clashing names, a shared `stream.subject_prefix`, or streams that differ. Returns each
/// type's names.
fn check_types<D: Decision>(config: &Config) -> Result<Vec<AggregateNames>, Error> {
    let types = type_names::<D::Aggregate>();
    let refuse = |message: String| Err(Error::Service(message));
    if let Some(clash) = types.iter().find(|t| **t == D::NAME) {
        return refuse(format!(
            "decision {:?} has the name of its aggregate type {clash:?}; the aggregate's command \
             function owns cmd.{clash}.>, so give the decision another name",
            D::NAME
        ));
    }
    for (at, name) in types.iter().enumerate() {
        if types[..at].contains(name) {
            return refuse(format!(
                "decision {:?} lists aggregate type {name:?} twice; its types must be distinct",
                D::NAME
            ));
        }
    }
    if types.len() > 1 && config.stream.subject_prefix.is_some() {
        return refuse(format!(
            "decision {:?} writes aggregate types {} and stream.subject_prefix is set: one prefix \
             cannot be shared by several types; leave it unset so each type keeps evt.<type>",
            D::NAME,
            types.join(", ")
        ));
    }
    let names = types
        .iter()
        .map(|t| AggregateNames::new(t, config))
        .collect::<Result<Vec<_>, _>>()?;
    let mut streams: Vec<String> = names
        .iter()
        .map(|n| format!("{} in {}", n.aggregate, n.stream))
        .collect();
    if names.iter().any(|n| n.stream != names[0].stream) {
        streams.sort();
        return refuse(format!(
            "decision {:?}: its aggregate types are in different streams ({}); an atomic batch \
             is single-stream, so set the same stream.name for the decision and for the command \
             functions of all its types",
            D::NAME,
            streams.join(", ")
        ));
    }
    Ok(names)
}

impl<D: Decision> DecisionFunction<D> {
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

    /// Runs until SIGTERM or SIGINT, as [`super::CommandFunction::run`] does.
    pub async fn run(self) -> Result<(), Error> {
        run_until_signal(self.start()).await
    }

    /// Connects, checks that the aggregates' stream can take the atomic batches (all the
    /// decision's types in one stream), opens the ledger and starts serving.
    pub async fn start(self) -> Result<RunningFunction, Error> {
        let config = Config::given_or_load(self.config)?;
        let types = check_types::<D>(&config)?;
        // Where the decision's own commands and ledger are.
        let own = AggregateNames::new(D::NAME, &config)?;
        let connection = config.nats.name.clone().unwrap_or_else(|| own.connection());
        let client = config.nats.connect(&connection).await?;
        // The first type's store is opened before the ledger, as a command function's is.
        let first = open_store(&config, &types[0], &client).await?;
        let (ledger, reads) = open_ledger(&config, &client, &own.ledger_bucket).await?;
        first.check_single_stream().await?;
        let snapshots =
            open_snapshots::<First<D>>(&config, &types[0], &client, reads.clone()).await?;
        let ledger = Arc::new(ledger);
        let (inner, writer) = Handler::<First<D>>::new(
            Arc::new(first),
            ledger.clone(),
            snapshots,
            <First<D> as Aggregate>::upcasters(),
            own.commands.clone(),
            config.command.clone(),
            config.ledger.ttl,
        );
        let inner = Arc::new(inner);
        let setup = Setup {
            config: &config,
            client: &client,
            reads,
            ledger,
            commands: own.commands.clone(),
        };
        let mut openers = Openers::default();
        D::Aggregate::visit(&mut openers);
        let mut parts: Vec<Arc<dyn Part>> = vec![Arc::new(PartOf(inner.clone()))];
        for open in openers.0.into_iter().skip(1) {
            parts.push(open(&setup).await?);
        }
        let handler = Arc::new(DecisionHandler::<D> {
            inner,
            parts,
            _decision: PhantomData,
        });
        let violations = crate::permissions::watch();
        let commands = variant_names::<D::Command>().join(",");
        let schemas = serde_json::to_string(&crate::schema::decision_command_schemas::<D>())
            .unwrap_or_default();
        let aggregates: Vec<&str> = types.iter().map(|n| n.aggregate.as_str()).collect();
        let aggregates = aggregates.join(",");
        let events: Vec<String> = types
            .iter()
            .map(|n| format!("{}.<id>", n.event_prefix))
            .collect();
        let stream = types[0].stream.clone();
        let metadata = HashMap::from([
            (names::meta::SCHEMAS.to_owned(), schemas),
            (names::meta::KIND.to_owned(), names::KIND_COMMAND.to_owned()),
            (names::meta::AGGREGATE.to_owned(), aggregates.clone()),
            (names::meta::COMMANDS.to_owned(), commands),
            (names::meta::STREAM.to_owned(), stream.clone()),
            (names::meta::EVENTS.to_owned(), events.join(",")),
        ]);
        let description = format!(
            "jetfn atomic decision {} over aggregates {aggregates}",
            D::NAME
        );
        let spec = ServiceSpec {
            name: D::NAME.to_owned(),
            version: self.version.clone(),
            description,
            metadata,
            queue_group: handler.queue_group().to_owned(),
            replies: Replies::new(&config.nats.reply_prefixes),
            stats: stats_of(&handler),
        };
        let (service, endpoint) = register(&client, &handler, spec).await?;
        let subjects = handler.wildcard();
        let ready = move || {
            tracing::info!(
                decision = D::NAME,
                aggregate = %aggregates,
                subjects = %subjects,
                stream = %stream,
                "decision function ready"
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
                affinity: None,
            },
            ready,
        )
        .await
    }
}

/// Decides the commands of decision `D`: the first aggregate type's handler brings the ledger,
/// log, counters and settings; each type's part its state cache and events.
struct DecisionHandler<D: Decision> {
    inner: Arc<Handler<First<D>>>,
    /// One per aggregate type, in the decision's order (the first is `inner`'s).
    parts: Vec<Arc<dyn Part>>,
    _decision: PhantomData<fn() -> D>,
}

impl<D: Decision> Serves for DecisionHandler<D> {
    async fn handle(&self, request: Request) {
        let subjects = &self.inner.subjects;
        let max_body = self.inner.config.max_body_bytes;
        self.inner
            .serve_request(
                request,
                D::NAME,
                |message| {
                    request::check_for::<D::Command>(
                        &owner::<D>(),
                        subjects,
                        &message.subject,
                        message.headers.as_ref(),
                        &message.payload,
                        max_body,
                    )
                },
                |checked, command| async move { self.execute(&checked, command).await },
            )
            .await
    }

    fn overloaded(&self, request: Request) -> impl Future<Output = ()> + Send {
        self.inner.overloaded(request)
    }

    fn max_pending(&self) -> usize {
        self.inner.config.max_pending
    }

    fn wildcard(&self) -> String {
        self.inner.subjects.wildcard()
    }

    fn pattern(&self) -> String {
        self.inner.subjects.pattern()
    }

    fn name(&self) -> &str {
        D::NAME
    }

    fn queue_group(&self) -> &str {
        &self.inner.config.queue_group
    }

    fn stats(&self) -> serde_json::Value {
        let mut stats = self.inner.stats();
        if self.parts.len() > 1 {
            // `cache` is the first type's; each type's own state cache by type name.
            let caches: serde_json::Map<String, serde_json::Value> = self
                .parts
                .iter()
                .map(|p| (p.aggregate().to_owned(), p.cache()))
                .collect();
            stats["caches"] = caches.into();
        }
        stats
    }
}

fn owner<D: Decision>() -> String {
    format!("decision {}", D::NAME)
}

/// One aggregate type's share of a decision function, its type erased.
trait Part: Send + Sync {
    /// The aggregate type.
    fn aggregate(&self) -> &'static str;
    /// Joins the queue for aggregate `id`'s slot; the future takes it.
    fn queue(&self, id: &str) -> Result<BoxFuture<'static, Box<dyn Locked>>, QueueFull>;
    /// The state cache's numbers for `$SRV.STATS`.
    fn cache(&self) -> serde_json::Value;
}

struct PartOf<A: Aggregate>(Arc<Handler<A>>);

impl<A: Aggregate> Part for PartOf<A> {
    fn aggregate(&self) -> &'static str {
        A::NAME
    }

    fn cache(&self) -> serde_json::Value {
        self.0.cache.to_json()
    }

    fn queue(&self, id: &str) -> Result<BoxFuture<'static, Box<dyn Locked>>, QueueFull> {
        let slot = self.0.cache.slot(id)?;
        let handler = self.0.clone();
        let id = id.to_owned();
        Ok(Box::pin(async move {
            let guard = slot.lock_owned().await;
            Box::new(LockedOf { handler, id, guard }) as Box<dyn Locked>
        }))
    }
}

/// An aggregate's slot, taken, its state not yet loaded.
trait Locked: Send {
    /// The cached state, or a load on a miss.
    fn load(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Held>, Reply>>;
}

struct LockedOf<A: Aggregate> {
    handler: Arc<Handler<A>>,
    id: String,
    guard: OwnedMutexGuard<Option<Cached<A>>>,
}

impl<A: Aggregate> Locked for LockedOf<A> {
    fn load(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Held>, Reply>> {
        Box::pin(async move {
            let LockedOf {
                handler,
                id,
                mut guard,
            } = *self;
            handler.cache.count(guard.is_some());
            let (cached, fresh) = match guard.take() {
                Some(cached) => (cached, false),
                // The aggregate that failed stays uncached.
                None => (handler.load(&id).await?, true),
            };
            Ok(Box::new(HeldOf {
                handler,
                id,
                guard,
                cached,
                fresh,
                keep: true,
            }) as Box<dyn Held>)
        })
    }
}

/// One locked, loaded aggregate of a decision, its type erased.
trait Held: Send {
    fn aggregate(&self) -> &'static str;
    fn id(&self) -> &str;
    fn state(&self) -> &(dyn Any + Send + Sync);
    fn last_seq(&self) -> u64;
    fn version(&self) -> u64;
    /// The reply of a command whose events were folded in.
    fn applied(&self, command_id: &str) -> Option<&Entry>;
    /// The reply of a recent command that stored nothing.
    fn recent(&self, command_id: &str) -> Option<&Entry>;
    fn remember(&mut self, command_id: &str, entry: Entry);
    fn log(&self) -> &dyn EventLog;
    /// Catches up with the stored events; whether any were new.
    fn catch_up(&mut self) -> BoxFuture<'_, Result<bool, Reply>>;
    /// Makes sure a state not read during this command is current; whether it was not (and
    /// has been caught up).
    fn refresh(&mut self) -> BoxFuture<'_, Result<bool, Reply>>;
    /// Encodes the events decided for it (a `Vec` of its type's events).
    fn encode(&self, events: &(dyn Any + Send)) -> Result<Vec<NewEvent>, Reply>;
    /// Folds in the appended events, the last stored at `last_seq`, and remembers the reply.
    fn applied_now(
        &mut self,
        events: Box<dyn Any + Send>,
        stored: u64,
        last_seq: u64,
        command_id: &str,
        entry: &Entry,
    );
}

struct HeldOf<A: Aggregate> {
    handler: Arc<Handler<A>>,
    id: String,
    guard: OwnedMutexGuard<Option<Cached<A>>>,
    cached: Cached<A>,
    /// Whether it was read from the store during this command.
    fresh: bool,
    /// Whether the cached state is still good (false after a fold error).
    keep: bool,
}

impl<A: Aggregate> Drop for HeldOf<A> {
    fn drop(&mut self) {
        if self.keep {
            let empty = Cached::empty(0, std::time::Duration::ZERO);
            *self.guard = Some(std::mem::replace(&mut self.cached, empty));
        }
    }
}

impl<A: Aggregate> Held for HeldOf<A> {
    fn aggregate(&self) -> &'static str {
        A::NAME
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> &(dyn Any + Send + Sync) {
        &self.cached.state
    }

    fn last_seq(&self) -> u64 {
        self.cached.last_seq
    }

    fn version(&self) -> u64 {
        self.cached.version
    }

    fn applied(&self, command_id: &str) -> Option<&Entry> {
        self.cached.applied.get(command_id)
    }

    fn recent(&self, command_id: &str) -> Option<&Entry> {
        self.cached.recent.get(command_id)
    }

    fn remember(&mut self, command_id: &str, entry: Entry) {
        self.cached.recent.remember(command_id, entry);
    }

    fn log(&self) -> &dyn EventLog {
        &*self.handler.log
    }

    fn catch_up(&mut self) -> BoxFuture<'_, Result<bool, Reply>> {
        Box::pin(async move {
            let before = self.cached.last_seq;
            if let Err((reply, keep)) = self
                .handler
                .catch_up(&mut self.cached, &self.id, None)
                .await
            {
                self.keep = keep;
                return Err(reply);
            }
            self.fresh = true;
            Ok(self.cached.last_seq != before)
        })
    }

    fn refresh(&mut self) -> BoxFuture<'_, Result<bool, Reply>> {
        Box::pin(async move {
            if self.fresh || self.handler.is_current(&self.cached, &self.id).await? {
                self.fresh = true;
                return Ok(false);
            }
            self.catch_up().await.map(|_| true)
        })
    }

    fn encode(&self, events: &(dyn Any + Send)) -> Result<Vec<NewEvent>, Reply> {
        match events.downcast_ref::<Vec<A::Event>>() {
            Some(events) => encode::<A>(events),
            None => Err(Reply::failed(
                ErrorKind::Invalid,
                format!(
                    "the decision wrote events of another Rust type to aggregate type {}",
                    A::NAME
                ),
            )),
        }
    }

    fn applied_now(
        &mut self,
        events: Box<dyn Any + Send>,
        stored: u64,
        last_seq: u64,
        command_id: &str,
        entry: &Entry,
    ) {
        if let Ok(events) = events.downcast::<Vec<A::Event>>() {
            for event in events.iter() {
                self.cached.state = std::mem::take(&mut self.cached.state).evolve(event);
            }
        }
        self.cached.last_seq = last_seq;
        self.cached.version += stored;
        let applied = &mut self.cached.applied;
        // The ledger answers once its entry is written (in the background); only the last
        // commands need answering from here, and the cache must not grow without end.
        if applied.len() >= MAX_APPLIED {
            applied.clear();
        }
        applied.insert(command_id.to_owned(), entry.clone());
    }
}

impl<D: Decision> DecisionHandler<D> {
    /// Answers a checked command, returning the reply and the number of conflict retries.
    async fn execute(&self, request: &CommandRequest, command: D::Command) -> (Reply, u32) {
        let inner = &self.inner;
        let mut keys: Vec<(&'static str, String)> = D::aggregates(&command)
            .into_iter()
            .map(D::Aggregate::key)
            .collect();
        // In (type, id) order: every decision takes its aggregates in the same order.
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            let message = format!("{} names no aggregate to decide on", request.command);
            return (Reply::failed(ErrorKind::Invalid, message), 0);
        }
        if keys.len() > MAX_BATCH_EVENTS {
            let message = format!(
                "the decision names {} aggregates; one atomic batch holds at most \
                 {MAX_BATCH_EVENTS} events",
                keys.len()
            );
            return (Reply::failed(ErrorKind::Invalid, message), 0);
        }
        let mut queued = Vec::with_capacity(keys.len());
        for (aggregate, id) in &keys {
            if let Err(message) = names::check_id(id) {
                return (Reply::failed(ErrorKind::Invalid, message), 0);
            }
            let Some(part) = self.parts.iter().find(|p| p.aggregate() == *aggregate) else {
                let declared: Vec<&str> = self.parts.iter().map(|p| p.aggregate()).collect();
                let message = format!(
                    "the decision names aggregate type {aggregate:?}, which decision {} does not \
                     declare (its types: {})",
                    D::NAME,
                    declared.join(", ")
                );
                return (Reply::failed(ErrorKind::Invalid, message), 0);
            };
            match part.queue(id) {
                Ok(lock) => queued.push(lock),
                Err(QueueFull) => {
                    let message = format!(
                        "{aggregate} {id} has {} commands waiting in this instance; retry with \
                         the same command id",
                        inner.config.max_queued_per_aggregate
                    );
                    return (unavailable(message), 0);
                }
            }
        }
        let lock_all = async {
            let mut locked = Vec::with_capacity(queued.len());
            for lock in queued {
                locked.push(lock.await);
            }
            locked
        };
        let (locked, ledger) =
            tokio::join!(lock_all, inner.ledger.get(&request.id, &request.command_id));
        let Ok(_permit) = inner.permits.acquire().await else {
            return (unavailable("shutting down"), 0);
        };
        let mut held = Vec::with_capacity(locked.len());
        for locked in locked {
            // On a failed load, those already loaded go back to their slots as they drop.
            match locked.load().await {
                Ok(aggregate) => held.push(aggregate),
                Err(reply) => return (reply, 0),
            }
        }
        self.decide_and_append(&mut held, request, command, ledger)
            .await
    }

    /// Decide, append atomically; on a conflict, catch up and decide again.
    async fn decide_and_append(
        &self,
        held: &mut [Box<dyn Held>],
        request: &CommandRequest,
        command: D::Command,
        ledger: Result<Option<Entry>, crate::store::StoreError>,
    ) -> (Reply, u32) {
        let inner = &self.inner;
        match ledger {
            Ok(Some(entry)) => return (answer(&entry, request), 0),
            Ok(None) => {}
            Err(err) => return (unavailable(err.to_string()), 0),
        }
        let started = Instant::now();
        let mut command = Some(command);
        let mut retries = 0;
        loop {
            if let Some(reply) = earlier(held, request) {
                return (reply, retries);
            }
            let command = match command.take() {
                Some(command) => command,
                None => match request::decode_for::<D::Command>(&owner::<D>(), request) {
                    Ok(command) => command,
                    Err(m) => return (Reply::failed(ErrorKind::Invalid, m), retries),
                },
            };
            let states = States::erased(
                held.iter()
                    .map(|h| StateEntry {
                        aggregate: h.aggregate(),
                        id: h.id(),
                        state: h.state(),
                    })
                    .collect(),
            );
            let decided = match D::decide(&states, command) {
                Ok(events) if !events.is_empty() => events,
                outcome => {
                    // Nothing to append, so OCC cannot catch a stale state: make sure every
                    // state is current before this outcome becomes the command's answer.
                    match refresh(held).await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(reply) => return (reply, retries),
                    }
                    let reply = match outcome {
                        Err(rejection) => Reply::rejected(&rejection),
                        Ok(_) => accepted(request, 0, 0, Vec::new()),
                    };
                    let reply = self.record_now(request, reply).await;
                    if reply.error_kind() != Some(ErrorKind::Unavailable) {
                        // A repeat queued behind this command on the same aggregates may have
                        // asked the ledger before this was recorded: the cache answers it.
                        let entry = Entry {
                            fingerprint: request.fingerprint.clone(),
                            reply: reply.clone(),
                        };
                        for aggregate in held.iter_mut() {
                            aggregate.remember(&request.command_id, entry.clone());
                        }
                    }
                    return (reply, retries);
                }
            };
            if decided.len() > MAX_BATCH_EVENTS {
                let message = format!(
                    "the decision writes {} events; one atomic batch holds at most \
                     {MAX_BATCH_EVENTS}",
                    decided.len()
                );
                return (Reply::failed(ErrorKind::Invalid, message), retries);
            }
            let lists = decided.into_lists();
            let mut encoded: Vec<(usize, Vec<NewEvent>)> = Vec::with_capacity(lists.len());
            for list in &lists {
                let Some(at) = held
                    .iter()
                    .position(|h| h.aggregate() == list.aggregate && h.id() == list.id)
                else {
                    let message = format!(
                        "the decision wrote to aggregate {} {:?}, which its command did not name",
                        list.aggregate, list.id
                    );
                    return (Reply::failed(ErrorKind::Invalid, message), retries);
                };
                match held[at].encode(&*list.events) {
                    Ok(events) => encoded.push((at, events)),
                    Err(reply) => return (reply, retries),
                }
            }
            let appends: Vec<(&dyn EventLog, Append<'_>)> = encoded
                .iter()
                .map(|(at, events)| {
                    let aggregate = &held[*at];
                    let append = Append {
                        aggregate_id: aggregate.id(),
                        expected_last_seq: aggregate.last_seq(),
                        expected_version: aggregate.version(),
                        command_id: &request.command_id,
                        command: &request.command,
                        events,
                        fingerprint: Some(&request.fingerprint),
                        trace: Some(&request.trace),
                    };
                    (aggregate.log(), append)
                })
                .collect();
            let exhausted = retries >= inner.config.max_retries
                || started.elapsed() >= inner.config.conflict_budget;
            let appended = inner.log.append_across(&appends).await;
            drop(appends);
            match appended {
                Ok(last) => {
                    let reply = self.applied(held, request, lists, &encoded, last);
                    return (reply, retries);
                }
                Err(AppendError::Unavailable(message) | AppendError::TooManyBatches(message)) => {
                    return (unavailable(message), retries);
                }
                Err(AppendError::Conflict(message)) if exhausted => {
                    let named: Vec<String> = held
                        .iter()
                        .map(|h| format!("{} {}", h.aggregate(), h.id()))
                        .collect();
                    let message = format!(
                        "{} changed concurrently {} times in a row; last: {message}",
                        named.join(", "),
                        retries + 1
                    );
                    return (Reply::failed(ErrorKind::Conflict, message), retries);
                }
                Err(AppendError::Unknown(message)) if exhausted => {
                    return (unavailable(message), retries);
                }
                Err(err) => {
                    tracing::debug!(error = %err, retry = retries + 1, "catching up after conflict");
                    retries += 1;
                    match catch_up_all(held).await {
                        Ok(true) => {}
                        // Nothing new (a clustered in-flight conflict, an answer that never
                        // came): pause, the aggregates staying locked.
                        Ok(false) => tokio::time::sleep(inner.backoff(retries)).await,
                        Err(reply) => return (reply, retries),
                    }
                }
            }
        }
    }

    /// Folds the appended events in and builds the reply; its ledger entry is written later.
    fn applied(
        &self,
        held: &mut [Box<dyn Held>],
        request: &CommandRequest,
        lists: Vec<EventList>,
        encoded: &[(usize, Vec<NewEvent>)],
        last: u64,
    ) -> Reply {
        let total: u64 = encoded.iter().map(|(_, e)| e.len() as u64).sum();
        // The batch is stored contiguously, in the order it was sent.
        let mut seq = last + 1 - total;
        let mut written = Vec::with_capacity(encoded.len());
        let mut all_types = Vec::new();
        for (at, new) in encoded {
            seq += new.len() as u64;
            let aggregate = &held[*at];
            let types: Vec<String> = new.iter().map(|e| e.event_type.clone()).collect();
            all_types.extend(types.iter().cloned());
            written.push(Written {
                aggregate: aggregate.aggregate().to_owned(),
                id: aggregate.id().to_owned(),
                version: aggregate.version() + new.len() as u64,
                seq: seq - 1,
                events: types,
            });
        }
        let reply = decision_reply(request, last, all_types, written.clone());
        let entry = Entry {
            fingerprint: request.fingerprint.clone(),
            reply: reply.clone(),
        };
        for ((list, (at, new)), written) in lists.into_iter().zip(encoded).zip(&written) {
            held[*at].applied_now(
                list.events,
                new.len() as u64,
                written.seq,
                &request.command_id,
                &entry,
            );
        }
        self.inner.writer.queue(Job::Ledger {
            id: request.id.clone(),
            command_id: request.command_id.clone(),
            entry,
        });
        reply
    }

    /// Records a reply that left no event behind before it is sent: only the ledger knows it.
    async fn record_now(&self, request: &CommandRequest, reply: Reply) -> Reply {
        let entry = Entry {
            fingerprint: request.fingerprint.clone(),
            reply,
        };
        if let Err(err) = self
            .inner
            .ledger
            .put(&request.id, &request.command_id, &entry)
            .await
        {
            return unavailable(format!("could not record the outcome: {err}"));
        }
        entry.reply
    }
}

/// Catches every aggregate up; whether any had changed.
async fn catch_up_all(held: &mut [Box<dyn Held>]) -> Result<bool, Reply> {
    let mut changed = false;
    for aggregate in held.iter_mut() {
        changed |= aggregate.catch_up().await?;
    }
    Ok(changed)
}

/// Makes sure every aggregate not read during this command is current; whether any was not
/// (and has been caught up).
async fn refresh(held: &mut [Box<dyn Held>]) -> Result<bool, Reply> {
    let mut changed = false;
    for aggregate in held.iter_mut() {
        changed |= aggregate.refresh().await?;
    }
    Ok(changed)
}

/// The first reply of `request`'s command id, when its events are on the locked aggregates:
/// this instance's own record, or rebuilt from the events another instance (or an earlier
/// attempt whose acknowledgement was lost) stored.
fn earlier(held: &[Box<dyn Held>], request: &CommandRequest) -> Option<Reply> {
    // Rejections and empty decisions of this instance, not yet found in the ledger.
    if let Some(entry) = held.iter().find_map(|h| h.recent(&request.command_id)) {
        return Some(answer(entry, request));
    }
    let mut written = Vec::new();
    let mut fingerprint = String::new();
    for aggregate in held {
        let Some(entry) = aggregate.applied(&request.command_id) else {
            continue;
        };
        match &entry.reply {
            Reply::Accepted(accepted) if !accepted.aggregates.is_empty() => {
                return Some(answer(entry, request));
            }
            Reply::Accepted(accepted) => {
                fingerprint.clone_from(&entry.fingerprint);
                written.push(Written {
                    aggregate: aggregate.aggregate().to_owned(),
                    id: aggregate.id().to_owned(),
                    version: accepted.version,
                    seq: accepted.seq,
                    events: accepted.events.clone(),
                });
            }
            Reply::Failed(_) => return Some(answer(entry, request)),
        }
    }
    if written.is_empty() {
        return None;
    }
    // The batch's order: by sequence.
    written.sort_by_key(|w| w.seq);
    let last = written.last().map_or(0, |w| w.seq);
    let types = written.iter().flat_map(|w| w.events.clone()).collect();
    let entry = Entry {
        fingerprint,
        reply: decision_reply(request, last, types, written),
    };
    Some(answer(&entry, request))
}

fn decision_reply(
    request: &CommandRequest,
    seq: u64,
    events: Vec<String>,
    aggregates: Vec<Written>,
) -> Reply {
    Reply::Accepted(super::Accepted {
        id: request.id.clone(),
        version: 0,
        seq,
        events,
        aggregates,
    })
}

#[cfg(test)]
mod tests {
    //! The decision loop on the in-memory log: conflicts and exhausted retries reached on
    //! purpose, and lost acknowledgements.

    use super::super::memory::{Fault, MemoryLedger, MemoryLog};
    use super::*;
    use crate::Rejection;
    use crate::config::CommandConfig;
    use crate::decision::Events;
    use crate::telemetry::TraceContext;
    use crate::wire::CommandSubjects;
    use serde::{Deserialize, Serialize};
    use std::time::Duration;

    #[derive(Debug, Default)]
    struct Pot {
        coins: u64,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    enum PotEvent {
        Added { by: u64 },
        Taken { by: u64 },
    }

    #[derive(Deserialize, schemars::JsonSchema)]
    enum PotCommand {}

    impl Aggregate for Pot {
        const NAME: &'static str = "pot";
        type Command = PotCommand;
        type Event = PotEvent;
        fn decide(&self, command: PotCommand) -> Result<Vec<PotEvent>, Rejection> {
            match command {}
        }
        fn evolve(self, event: &PotEvent) -> Self {
            match event {
                PotEvent::Added { by } => Pot {
                    coins: self.coins + by,
                },
                PotEvent::Taken { by } => Pot {
                    coins: self.coins.saturating_sub(*by),
                },
            }
        }
    }

    #[derive(Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum MoveCommand {
        Move { from: String, to: String },
    }

    /// Moves every coin of `from` to `to`: what it moves depends on the state it read.
    struct MoveAll;

    impl Decision for MoveAll {
        const NAME: &'static str = "mover";
        type Aggregate = Pot;
        type Command = MoveCommand;
        fn aggregates(MoveCommand::Move { from, to }: &MoveCommand) -> Vec<String> {
            vec![from.clone(), to.clone()]
        }
        fn decide(
            states: &States<'_, Pot>,
            MoveCommand::Move { from, to }: MoveCommand,
        ) -> Result<Events<Pot>, Rejection> {
            let by = states.get(&from).map_or(0, |pot| pot.coins);
            if by == 0 {
                return Err(Rejection::new(format!("{from} is empty")));
            }
            Ok(Events::new()
                .with(from, [PotEvent::Taken { by }])
                .with(to, [PotEvent::Added { by }]))
        }
    }

    fn rig(log: &Arc<MemoryLog>, max_retries: u32) -> DecisionHandler<MoveAll> {
        let config = CommandConfig {
            max_retries,
            retry_backoff: Duration::ZERO,
            max_retry_backoff: Duration::ZERO,
            ..CommandConfig::default()
        };
        let (inner, _writer) = Handler::new(
            log.clone(),
            Arc::new(MemoryLedger::default()),
            None,
            Default::default(),
            CommandSubjects::new(None, "mover"),
            config,
            Duration::from_secs(3600),
        );
        let inner = Arc::new(inner);
        DecisionHandler {
            parts: vec![Arc::new(PartOf(inner.clone()))],
            inner,
            _decision: PhantomData,
        }
    }

    /// Sends `command` with `body` to decision `d1` of `handler`.
    async fn send_as<D: Decision>(
        handler: &DecisionHandler<D>,
        command: &str,
        body: serde_json::Value,
        command_id: &str,
    ) -> (Reply, u32) {
        let request = CommandRequest {
            id: "d1".into(),
            command: command.into(),
            command_id: command_id.into(),
            fingerprint: request::fingerprint(command, &body),
            body,
            trace: TraceContext::new_root(),
        };
        let decoded = request::decode_for::<D::Command>(&owner::<D>(), &request).unwrap();
        handler.execute(&request, decoded).await
    }

    async fn send(handler: &DecisionHandler<MoveAll>, command_id: &str) -> (Reply, u32) {
        let body = serde_json::json!({"from": "a", "to": "b"});
        send_as(handler, "move", body, command_id).await
    }

    fn coins(log: &MemoryLog, id: &str) -> i64 {
        log.events(id)
            .iter()
            .map(|e| {
                let by: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
                let by = by["by"].as_i64().unwrap();
                if e.event_type == "Taken" { -by } else { by }
            })
            .sum()
    }

    #[tokio::test]
    async fn a_conflict_catches_up_and_decides_again_on_the_new_states() {
        let log = Arc::new(MemoryLog::default());
        log.append_foreign("a", "Added", r#"{"by":1}"#);
        let handler = rig(&log, 5);
        // Cached at one coin; a rival adds one to `a` before the first append.
        assert_eq!(send(&handler, "warm-up").await.0.error_kind(), None);
        log.append_foreign("a", "Added", r#"{"by":1}"#);
        log.inject(Fault::Rival("Added"));
        let (reply, retries) = send(&handler, "c").await;
        assert_eq!(reply.error_kind(), None, "{reply:?}");
        assert_eq!(retries, 1);
        // Decided again on the caught-up state: both coins moved, none lost or made.
        assert_eq!((coins(&log, "a"), coins(&log, "b")), (0, 3));
    }

    #[tokio::test]
    async fn conflicts_until_the_retries_run_out_reply_conflict_and_store_nothing() {
        let log = Arc::new(MemoryLog::default());
        log.append_foreign("a", "Added", r#"{"by":1}"#);
        let handler = rig(&log, 3);
        for _ in 0..=3 {
            log.inject(Fault::Rival("Added"));
        }
        let (reply, retries) = send(&handler, "c").await;
        assert_eq!(reply.error_kind(), Some(ErrorKind::Conflict), "{reply:?}");
        assert_eq!(retries, 3);
        assert!(log.events("b").is_empty(), "nothing of the decision stored");
    }

    #[tokio::test]
    async fn a_lost_ack_is_answered_from_the_stored_events_without_appending_again() {
        let log = Arc::new(MemoryLog::default());
        log.append_foreign("a", "Added", r#"{"by":2}"#);
        let handler = rig(&log, 5);
        log.inject(Fault::LostAck);
        let (reply, retries) = send(&handler, "c").await;
        let Reply::Accepted(accepted) = reply else {
            panic!("expected success, got {reply:?}")
        };
        assert_eq!(retries, 1);
        let written: Vec<(&str, u64)> = accepted
            .aggregates
            .iter()
            .map(|w| (w.id.as_str(), w.version))
            .collect();
        assert_eq!(written, [("a", 2), ("b", 1)]);
        assert_eq!((log.events("a").len(), log.events("b").len()), (2, 1));
        // A repeat on a fresh instance finds the events too.
        let (again, _) = send(&rig(&log, 5), "c").await;
        assert_eq!(again, Reply::Accepted(accepted));
    }

    #[derive(Debug, Default)]
    struct Jar {
        coins: u64,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    enum JarEvent {
        Filled { by: u64 },
    }

    impl Aggregate for Jar {
        const NAME: &'static str = "jar";
        type Command = PotCommand;
        type Event = JarEvent;
        fn decide(&self, command: PotCommand) -> Result<Vec<JarEvent>, Rejection> {
            match command {}
        }
        fn evolve(self, JarEvent::Filled { by }: &JarEvent) -> Self {
            Jar {
                coins: self.coins + by,
            }
        }
    }

    #[derive(Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum BottleCommand {
        Bottle { pot: String, jar: String },
    }

    /// Pours every coin of a pot into a jar: two aggregate types in one stream.
    struct Bottle;

    impl Decision for Bottle {
        const NAME: &'static str = "bottler";
        type Aggregate = (Pot, Jar);
        type Command = BottleCommand;
        fn aggregates(
            BottleCommand::Bottle { pot, jar }: &BottleCommand,
        ) -> Vec<(&'static str, String)> {
            vec![(Pot::NAME, pot.clone()), (Jar::NAME, jar.clone())]
        }
        fn decide(
            states: &States<'_, (Pot, Jar)>,
            BottleCommand::Bottle { pot, jar }: BottleCommand,
        ) -> Result<Events<(Pot, Jar)>, Rejection> {
            let by = states.get::<Pot>(&pot).map_or(0, |p| p.coins);
            if by == 0 {
                return Err(Rejection::new(format!("{pot} is empty")));
            }
            Ok(Events::new()
                .with(pot, [PotEvent::Taken { by }])
                .with(jar, [JarEvent::Filled { by }]))
        }
    }

    /// A bottler over views of `log` for pots and jars, with a ledger of its own.
    fn bottler(log: &MemoryLog) -> DecisionHandler<Bottle> {
        let config = CommandConfig {
            retry_backoff: Duration::ZERO,
            max_retry_backoff: Duration::ZERO,
            ..CommandConfig::default()
        };
        let ledger = Arc::new(MemoryLedger::default());
        let subjects = CommandSubjects::new(None, "bottler");
        let ttl = Duration::from_secs(3600);
        let (pots, _) = Handler::<Pot>::new(
            Arc::new(log.of_type("pot")),
            ledger.clone(),
            None,
            Default::default(),
            subjects.clone(),
            config.clone(),
            ttl,
        );
        let (jars, _) = Handler::<Jar>::new(
            Arc::new(log.of_type("jar")),
            ledger,
            None,
            Default::default(),
            subjects,
            config,
            ttl,
        );
        let pots = Arc::new(pots);
        DecisionHandler {
            parts: vec![
                Arc::new(PartOf(pots.clone())),
                Arc::new(PartOf(Arc::new(jars))),
            ],
            inner: pots,
            _decision: PhantomData,
        }
    }

    async fn bottle(handler: &DecisionHandler<Bottle>, command_id: &str) -> (Reply, u32) {
        let body = serde_json::json!({"pot": "a", "jar": "a"});
        send_as(handler, "bottle", body, command_id).await
    }

    #[tokio::test]
    async fn a_conflict_across_types_catches_up_and_decides_again_on_the_new_states() {
        let stream = MemoryLog::default();
        let (pots, jars) = (stream.of_type("pot"), stream.of_type("jar"));
        pots.append_foreign("a", "Added", r#"{"by":1}"#);
        // Before the batch lands, a rival adds a coin to the pot (its first aggregate).
        stream.inject(Fault::Rival("Added"));
        let (reply, retries) = bottle(&bottler(&stream), "c").await;
        assert_eq!(reply.error_kind(), None, "{reply:?}");
        assert_eq!(retries, 1);
        // Both coins moved, none lost or made; the pot and the jar with one id stay apart.
        assert_eq!((coins(&pots, "a"), coins(&jars, "a")), (0, 2));
        assert_eq!(jars.events("a").len(), 1);
    }

    #[tokio::test]
    async fn a_lost_ack_across_types_is_answered_from_both_types_events() {
        let stream = MemoryLog::default();
        stream
            .of_type("pot")
            .append_foreign("a", "Added", r#"{"by":2}"#);
        stream.inject(Fault::LostAck);
        let (reply, retries) = bottle(&bottler(&stream), "c").await;
        let Reply::Accepted(accepted) = reply else {
            panic!("expected success, got {reply:?}")
        };
        assert_eq!(retries, 1);
        let written: Vec<(&str, &str, u64, u64)> = accepted
            .aggregates
            .iter()
            .map(|w| (w.aggregate.as_str(), w.id.as_str(), w.version, w.seq))
            .collect();
        assert_eq!(written, [("pot", "a", 2, 2), ("jar", "a", 1, 3)]);
        // A repeat on a fresh instance (its own empty ledger) finds both types' events.
        let (again, _) = bottle(&bottler(&stream), "c").await;
        assert_eq!(again, Reply::Accepted(accepted));
        assert_eq!(stream.of_type("jar").events("a").len(), 1, "stored once");
    }
}

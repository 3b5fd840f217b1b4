//! Decision functions: NATS services that decide one command over several aggregates and append
//! all its events in one atomic batch.
//!
//! For every request on `cmd.<decision>.<id>.<command>` the runtime
//! 1. runs the command function's wire checks and decodes the command;
//! 2. asks the [`Decision`] which aggregates it needs, and takes their slots in the state cache
//!    in id order (so two decisions over the same accounts never wait for each other in a
//!    circle), loading each on a miss: snapshot, then the events after it;
//! 3. answers a repeated command id from the ledger (keyed by the decision's `<id>`) or from the
//!    command's events found on the aggregates;
//! 4. decides, and appends every event in **one** ADR-50 atomic batch, each aggregate's events
//!    contiguous, its first message carrying that aggregate's literal
//!    `Nats-Expected-Last-Subject-Sequence`. On a conflict it catches up the aggregates (one
//!    direct get each for those that did not change) and decides again, within the same
//!    `command.max_retries`, `command.conflict_budget` and backoff as a single-aggregate command;
//! 5. replies with every aggregate written, its new version, and the sequence of the batch's
//!    last message as the consistency token.
//!
//! Wildcard `Nats-Expected-Last-Subject-Sequence-Subject` checks are never used: on replicated
//! streams the server tracks in-flight writes by literal subject, so two batches with
//! overlapping wildcard checks can both be accepted.

use super::cache::{Cached, QueueFull, Slot};
use super::ledger::Entry;
use super::request::{self, CommandRequest};
use super::writer::Job;
use super::{
    Handler, Replies, Request, RunningFunction, Serves, ServiceSpec, Serving, accepted, answer,
    encode, go_live, open, register, run_until_signal, stats_of, unavailable,
};
use crate::Error;
use crate::aggregate::Aggregate;
use crate::codec::variant_names;
use crate::config::Config;
use crate::decision::{Decision, MAX_BATCH_EVENTS, States};
use crate::store::{Append, AppendError, NewEvent};
use crate::wire::{AggregateNames, names};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use super::reply::{ErrorKind, Reply, Written};

/// Replies of accepted decisions each cached aggregate keeps before starting over: the ledger,
/// written in the background within moments, answers for older ones.
const MAX_APPLIED: usize = 1024;

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

    /// Connects, checks that the aggregates' stream can take the atomic batches, opens the
    /// ledger and starts serving.
    pub async fn start(self) -> Result<RunningFunction, Error> {
        let config = Config::given_or_load(self.config)?;
        let aggregate = <D::Aggregate as Aggregate>::NAME;
        if D::NAME == aggregate {
            return Err(Error::Service(format!(
                "decision {:?} has the name of its aggregate type; the aggregate's command \
                 function owns cmd.{aggregate}.>, so give the decision another name",
                D::NAME
            )));
        }
        // Where the aggregates' events are, and where the decision's own commands and ledger are.
        let names = AggregateNames::new(aggregate, &config)?;
        let own = AggregateNames::new(D::NAME, &config)?;
        let connection = config.nats.name.clone().unwrap_or_else(|| own.connection());
        let (client, store, ledger, snapshots) =
            open::<D::Aggregate>(&config, &names, &connection, &own.ledger_bucket).await?;
        store.check_single_stream().await?;
        let (inner, writer) = Handler::<D::Aggregate>::new(
            Arc::new(store),
            Arc::new(ledger),
            snapshots,
            <D::Aggregate as Aggregate>::upcasters(),
            own.commands.clone(),
            config.command.clone(),
            config.ledger.ttl,
        );
        let handler = Arc::new(DecisionHandler::<D> {
            inner,
            _decision: PhantomData,
        });
        let violations = crate::permissions::watch();
        let commands = variant_names::<D::Command>().join(",");
        let schemas = serde_json::to_string(&crate::schema::decision_command_schemas::<D>())
            .unwrap_or_default();
        let metadata = HashMap::from([
            (names::meta::SCHEMAS.to_owned(), schemas),
            (names::meta::KIND.to_owned(), names::KIND_COMMAND.to_owned()),
            (names::meta::AGGREGATE.to_owned(), aggregate.to_owned()),
            (names::meta::COMMANDS.to_owned(), commands),
            (names::meta::STREAM.to_owned(), names.stream.clone()),
            (
                names::meta::EVENTS.to_owned(),
                format!("{}.<id>", names.event_prefix),
            ),
        ]);
        let description = format!(
            "jetfn atomic decision {} over aggregates {aggregate}",
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
                aggregate,
                subjects = %subjects,
                stream = %names.stream,
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
            },
            ready,
        )
        .await
    }
}

/// Decides the commands of decision `D`, with the single-aggregate handler's cache, ledger,
/// log, counters and settings.
struct DecisionHandler<D: Decision> {
    inner: Handler<D::Aggregate>,
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
        self.inner.stats()
    }
}

fn owner<D: Decision>() -> String {
    format!("decision {}", D::NAME)
}

/// The aggregates of one decision, locked, in id order.
struct Locked<A> {
    ids: Vec<String>,
    cached: Vec<Cached<A>>,
    /// Whether each was read from the store during this command.
    fresh: Vec<bool>,
    /// Whether each cached state is still good (false after a fold error).
    keep: Vec<bool>,
}

impl<D: Decision> DecisionHandler<D> {
    /// Answers a checked command, returning the reply and the number of conflict retries.
    async fn execute(&self, request: &CommandRequest, command: D::Command) -> (Reply, u32) {
        let inner = &self.inner;
        let mut ids = D::aggregates(&command);
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            let message = format!("{} names no aggregate to decide on", request.command);
            return (Reply::failed(ErrorKind::Invalid, message), 0);
        }
        if ids.len() > MAX_BATCH_EVENTS {
            let message = format!(
                "the decision names {} aggregates; one atomic batch holds at most \
                 {MAX_BATCH_EVENTS} events",
                ids.len()
            );
            return (Reply::failed(ErrorKind::Invalid, message), 0);
        }
        for id in &ids {
            if let Err(message) = names::check_id(id) {
                return (Reply::failed(ErrorKind::Invalid, message), 0);
            }
        }
        let mut slots: Vec<Slot<D::Aggregate>> = Vec::with_capacity(ids.len());
        for id in &ids {
            match inner.cache.slot(id) {
                Ok(slot) => slots.push(slot),
                Err(QueueFull) => {
                    let message = format!(
                        "{id} has {} commands waiting in this instance; retry with the same \
                         command id",
                        inner.config.max_queued_per_aggregate
                    );
                    return (unavailable(message), 0);
                }
            }
        }
        // In id order: every decision takes its aggregates in the same order.
        let lock_all = async {
            let mut guards = Vec::with_capacity(slots.len());
            for slot in &slots {
                guards.push(slot.clone().lock_owned().await);
            }
            guards
        };
        let (mut guards, ledger) =
            tokio::join!(lock_all, inner.ledger.get(&request.id, &request.command_id));
        let Ok(_permit) = inner.permits.acquire().await else {
            return (unavailable("shutting down"), 0);
        };
        let mut locked = Locked {
            ids,
            cached: Vec::with_capacity(guards.len()),
            fresh: Vec::with_capacity(guards.len()),
            keep: vec![true; guards.len()],
        };
        for (id, guard) in locked.ids.iter().zip(guards.iter_mut()) {
            inner.cache.count(guard.is_some());
            match guard.take() {
                Some(cached) => {
                    locked.cached.push(cached);
                    locked.fresh.push(false);
                }
                None => match inner.load(id).await {
                    Ok(cached) => {
                        locked.cached.push(cached);
                        locked.fresh.push(true);
                    }
                    Err(reply) => {
                        // Put back what was taken; the aggregate that failed stays uncached.
                        for (guard, cached) in guards.iter_mut().zip(locked.cached) {
                            **guard = Some(cached);
                        }
                        return (reply, 0);
                    }
                },
            }
        }
        let (reply, retries) = self
            .decide_and_append(&mut locked, request, command, ledger)
            .await;
        for ((guard, cached), keep) in guards.iter_mut().zip(locked.cached).zip(locked.keep) {
            if keep {
                **guard = Some(cached);
            }
        }
        (reply, retries)
    }

    /// Decide, append atomically; on a conflict, catch up and decide again.
    async fn decide_and_append(
        &self,
        locked: &mut Locked<D::Aggregate>,
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
            if let Some(reply) = earlier(locked, request) {
                return (reply, retries);
            }
            let command = match command.take() {
                Some(command) => command,
                None => match request::decode_for::<D::Command>(&owner::<D>(), request) {
                    Ok(command) => command,
                    Err(m) => return (Reply::failed(ErrorKind::Invalid, m), retries),
                },
            };
            let states = States::new(
                locked
                    .ids
                    .iter()
                    .zip(&locked.cached)
                    .map(|(id, cached)| (id.as_str(), &cached.state))
                    .collect(),
            );
            let decided = match D::decide(&states, command) {
                Ok(events) if !events.is_empty() => events,
                outcome => {
                    // Nothing to append, so OCC cannot catch a stale state: make sure every
                    // state is current before this outcome becomes the command's answer.
                    match self.refresh(locked).await {
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
                        for cached in &mut locked.cached {
                            cached.recent.remember(&request.command_id, entry.clone());
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
            let parts = decided.into_parts();
            let mut encoded: Vec<(usize, Vec<NewEvent>)> = Vec::with_capacity(parts.len());
            for (id, events) in &parts {
                let Some(at) = locked.ids.iter().position(|named| named == id) else {
                    let message = format!(
                        "the decision wrote to aggregate {id:?}, which its command did not name"
                    );
                    return (Reply::failed(ErrorKind::Invalid, message), retries);
                };
                match encode::<D::Aggregate>(events) {
                    Ok(list) => encoded.push((at, list)),
                    Err(reply) => return (reply, retries),
                }
            }
            let appends: Vec<Append<'_>> = encoded
                .iter()
                .map(|(at, events)| Append {
                    aggregate_id: &locked.ids[*at],
                    expected_last_seq: locked.cached[*at].last_seq,
                    expected_version: locked.cached[*at].version,
                    command_id: &request.command_id,
                    command: &request.command,
                    events,
                    fingerprint: Some(&request.fingerprint),
                    trace: Some(&request.trace),
                })
                .collect();
            let exhausted = retries >= inner.config.max_retries
                || started.elapsed() >= inner.config.conflict_budget;
            let appended = inner.log.append_all(&appends).await;
            drop(appends);
            match appended {
                Ok(last) => {
                    let reply = self.applied(locked, request, parts, &encoded, last);
                    return (reply, retries);
                }
                Err(AppendError::Unavailable(message) | AppendError::TooManyBatches(message)) => {
                    return (unavailable(message), retries);
                }
                Err(AppendError::Conflict(message)) if exhausted => {
                    let message = format!(
                        "{} changed concurrently {} times in a row; last: {message}",
                        locked.ids.join(", "),
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
                    match self.catch_up_all(locked).await {
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
        locked: &mut Locked<D::Aggregate>,
        request: &CommandRequest,
        parts: Vec<(String, Vec<<D::Aggregate as Aggregate>::Event>)>,
        encoded: &[(usize, Vec<NewEvent>)],
        last: u64,
    ) -> Reply {
        let total: u64 = encoded.iter().map(|(_, e)| e.len() as u64).sum();
        // The batch is stored contiguously, in the order it was sent.
        let mut seq = last + 1 - total;
        let mut written = Vec::with_capacity(parts.len());
        let mut all_types = Vec::new();
        for ((_, events), (at, new)) in parts.into_iter().zip(encoded) {
            let cached = &mut locked.cached[*at];
            for event in &events {
                cached.state = std::mem::take(&mut cached.state).evolve(event);
            }
            seq += new.len() as u64;
            cached.last_seq = seq - 1;
            cached.version += new.len() as u64;
            let types: Vec<String> = new.iter().map(|e| e.event_type.clone()).collect();
            all_types.extend(types.iter().cloned());
            written.push(Written {
                id: locked.ids[*at].clone(),
                version: cached.version,
                seq: cached.last_seq,
                events: types,
            });
        }
        let reply = decision_reply(request, last, all_types, written);
        let entry = Entry {
            fingerprint: request.fingerprint.clone(),
            reply: reply.clone(),
        };
        for (at, _) in encoded {
            let applied = &mut locked.cached[*at].applied;
            // The ledger answers once its entry is written (in the background); only the last
            // commands need answering from here, and the cache must not grow without end.
            if applied.len() >= MAX_APPLIED {
                applied.clear();
            }
            applied.insert(request.command_id.clone(), entry.clone());
        }
        self.inner.writer.queue(Job::Ledger {
            id: request.id.clone(),
            command_id: request.command_id.clone(),
            entry,
        });
        reply
    }

    /// Catches every aggregate up; whether any had changed.
    async fn catch_up_all(&self, locked: &mut Locked<D::Aggregate>) -> Result<bool, Reply> {
        let mut changed = false;
        for at in 0..locked.ids.len() {
            let before = locked.cached[at].last_seq;
            let cached = &mut locked.cached[at];
            if let Err((reply, keep)) = self.inner.catch_up(cached, &locked.ids[at], None).await {
                locked.keep[at] = keep;
                return Err(reply);
            }
            locked.fresh[at] = true;
            changed |= locked.cached[at].last_seq != before;
        }
        Ok(changed)
    }

    /// Makes sure every aggregate not read during this command is current; whether any was not
    /// (and has been caught up).
    async fn refresh(&self, locked: &mut Locked<D::Aggregate>) -> Result<bool, Reply> {
        let mut changed = false;
        for at in 0..locked.ids.len() {
            if locked.fresh[at] {
                continue;
            }
            if !self
                .inner
                .is_current(&locked.cached[at], &locked.ids[at])
                .await?
            {
                let cached = &mut locked.cached[at];
                if let Err((reply, keep)) = self.inner.catch_up(cached, &locked.ids[at], None).await
                {
                    locked.keep[at] = keep;
                    return Err(reply);
                }
                changed = true;
            }
            locked.fresh[at] = true;
        }
        Ok(changed)
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

/// The first reply of `request`'s command id, when its events are on the locked aggregates:
/// this instance's own record, or rebuilt from the events another instance (or an earlier
/// attempt whose acknowledgement was lost) stored.
fn earlier<A>(locked: &Locked<A>, request: &CommandRequest) -> Option<Reply> {
    // Rejections and empty decisions of this instance, not yet found in the ledger.
    if let Some(entry) = locked
        .cached
        .iter()
        .find_map(|cached| cached.recent.get(&request.command_id))
    {
        return Some(answer(entry, request));
    }
    let mut written = Vec::new();
    let mut fingerprint = String::new();
    for (id, cached) in locked.ids.iter().zip(&locked.cached) {
        let Some(entry) = cached.applied.get(&request.command_id) else {
            continue;
        };
        match &entry.reply {
            Reply::Accepted(accepted) if !accepted.aggregates.is_empty() => {
                return Some(answer(entry, request));
            }
            Reply::Accepted(accepted) => {
                fingerprint.clone_from(&entry.fingerprint);
                written.push(Written {
                    id: id.clone(),
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
        DecisionHandler {
            inner,
            _decision: PhantomData,
        }
    }

    async fn send(handler: &DecisionHandler<MoveAll>, command_id: &str) -> (Reply, u32) {
        let body = serde_json::json!({"from": "a", "to": "b"});
        let request = CommandRequest {
            id: "m1".into(),
            command: "move".into(),
            command_id: command_id.into(),
            fingerprint: request::fingerprint("move", &body),
            body,
            trace: TraceContext::new_root(),
        };
        let command = request::decode_for::<MoveCommand>("decision mover", &request).unwrap();
        handler.execute(&request, command).await
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
}

//! Projection functions: events in, Redis read models out, exactly once.
//!
//! A [`Projection`] is pure code that turns one recorded event into [`RedisWrites`]. The runtime
//! owns delivery, batching, checkpoints, retries and acks:
//!
//! 1. Each partition reads a durable JetStream pull consumer (pinned to one instance at a time,
//!    so the stream's order holds while other instances wait on standby). With more than one
//!    partition it reads a partitioned view of the stream, which delivers only its own events
//!    (see [`view`]).
//! 2. A batch of events becomes one Lua script: it checks the checkpoint, applies the writes of
//!    every event above it, appends the change feed and advances the checkpoint, atomically.
//! 3. Only then are the messages acknowledged. Events at or below the checkpoint are skipped, so
//!    redeliveries (also after a crash between the commit and the ack) change nothing.
//!
//! On start a partition resumes from its Redis checkpoint. When Redis lost the checkpoint, the
//! partition replays from the stream's first event.

mod balance;
mod commit;
mod control;
pub(crate) mod dead_letters;
mod rebuild;
mod view;
pub(crate) mod worker;

pub use dead_letters::{DeadLetter, DeadLetters};
pub use rebuild::RebuildProgress;

use crate::aggregate::Aggregate;
use crate::config::Config;
use crate::readmodel::{ProgressFeed, ReadModel, RedisWrites};
use crate::{Error, telemetry};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use worker::{Source, Worker};

/// Turns events of one aggregate type into Redis writes.
///
/// ```
/// use jetfn::projection::{Projection, Recorded, Refusal};
/// use jetfn::readmodel::RedisWrites;
/// # use jetfn::{Aggregate, Rejection};
/// # #[derive(Default)] struct Counter;
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
/// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)] enum Event { Added { by: u64 } }
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Command = Command; type Event = Event;
/// #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
/// #     fn evolve(self, _: &Event) -> Self { self }
/// # }
///
/// struct Totals;
///
/// impl Projection for Totals {
///     const NAME: &'static str = "counter-totals";
///     type Source = Counter;
///
///     fn apply(&self, event: &Recorded<Event>, writes: &mut RedisWrites) -> Result<(), Refusal> {
///         match &event.event {
///             Event::Added { by } => writes.hincr("totals", "sum", *by as i64),
///         };
///         Ok(())
///     }
/// }
/// ```
pub trait Projection: Send + Sync + 'static {
    /// The projection's name: its Redis hash tag, consumer and service name. `[a-z0-9-]+` (see
    /// [`crate::wire::names::check_projection_name`]).
    const NAME: &'static str;

    /// The aggregate whose events it reads (its stream and event type).
    type Source: Aggregate;

    /// The writes one event causes. Keys are relative: `account:alice` is stored as
    /// `{<NAME>}:g<version>:account:alice`. Refusing sends the event to the dead-letter stream.
    fn apply(
        &self,
        event: &Recorded<<Self::Source as Aggregate>::Event>,
        writes: &mut RedisWrites,
    ) -> Result<(), Refusal>;
}

/// An event with its place in the stream.
///
/// Tests of projections build one with [`Recorded::new`]:
///
/// ```
/// # #[derive(Debug, Clone, PartialEq)] enum Event { Added { by: u64 } }
/// let event = jetfn::Recorded::new(7, "alice", "Added", Event::Added { by: 2 })
///     .with_command_id("c-1");
/// assert_eq!((event.seq, event.version), (7, 1));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Recorded<E> {
    /// Stream sequence.
    pub seq: u64,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The event type (`ce-type`).
    pub event_type: String,
    /// The event schema version.
    pub version: u32,
    /// When it was decided (`ce-time`), if recorded.
    pub time: Option<String>,
    /// The command that caused it, if recorded.
    pub command_id: Option<String>,
    /// The decoded event.
    pub event: E,
}

impl<E> Recorded<E> {
    /// Event `event` of type `event_type` (its `ce-type`) at stream sequence `seq` of aggregate
    /// `aggregate_id`: schema version 1, no time, no command id.
    pub fn new(
        seq: u64,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event: E,
    ) -> Self {
        Recorded {
            seq,
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            version: 1,
            time: None,
            command_id: None,
            event,
        }
    }

    /// With schema version `version`.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// With the time it was decided (`ce-time`, RFC 3339).
    pub fn with_time(mut self, time: impl Into<String>) -> Self {
        self.time = Some(time.into());
        self
    }

    /// With the id of the command that caused it.
    pub fn with_command_id(mut self, command_id: impl Into<String>) -> Self {
        self.command_id = Some(command_id.into());
        self
    }

    /// The same record carrying `event` instead (for a projection that delegates to another
    /// one after translating the event).
    pub fn with_event<F>(&self, event: F) -> Recorded<F> {
        Recorded {
            seq: self.seq,
            aggregate_id: self.aggregate_id.clone(),
            event_type: self.event_type.clone(),
            version: self.version,
            time: self.time.clone(),
            command_id: self.command_id.clone(),
            event,
        }
    }
}

/// A projection's refusal of an event it cannot handle: the event is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl<T: Into<String>> From<T> for Refusal {
    fn from(message: T) -> Self {
        Refusal(message.into())
    }
}

/// Starts building the function that runs projection `projection`.
pub fn projection_function<P: Projection>(projection: P) -> ProjectionFunction<P> {
    ProjectionFunction {
        projection: Arc::new(projection),
        config: None,
    }
}

/// A projection function being configured. See [`projection_function`].
pub struct ProjectionFunction<P> {
    projection: Arc<P>,
    config: Option<Config>,
}

impl<P: Projection> ProjectionFunction<P> {
    /// Uses this configuration instead of loading `jetfn.toml` and the environment.
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    fn config(&self) -> Result<Config, Error> {
        Ok(Config::given_or_load(self.config.clone())?)
    }

    /// Runs until SIGTERM or SIGINT, then stops after the batches in flight are committed.
    pub async fn run(self) -> Result<(), Error> {
        self.run_with_args(std::iter::empty::<String>()).await
    }

    /// The command-line entry point of a projection binary, given its arguments (without the
    /// program name, e.g. `std::env::args().skip(1)`). Without arguments it runs as
    /// [`ProjectionFunction::run`] does. With `--rebuild` it builds a new version of the read
    /// model from the first event beside the live one, switches to it, deletes the old one, and
    /// returns.
    pub async fn run_with_args(
        self,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<(), Error> {
        telemetry::init();
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        match args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [] => crate::running::run_until_signal(self.start()).await,
            ["--rebuild"] => {
                let generation = self.rebuild().await?;
                tracing::info!(projection = P::NAME, generation, "rebuild complete");
                Ok(())
            }
            _ => Err(Error::Usage(format!(
                "unexpected arguments {args:?}\nusage: {} [--rebuild]",
                P::NAME
            ))),
        }
    }

    /// Connects and starts every partition; the handle stops them.
    pub async fn start(self) -> Result<RunningProjection, Error> {
        let config = self.config()?;
        let context = Context::<P>::connect(&config).await?;
        let generation = context.model.activate_if_none(1).await?;
        let stats = Arc::new(Stats::new(config.projection.partitions));
        stats.generation.store(generation, Ordering::Relaxed);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for partition in 0..config.projection.partitions {
            let worker = Worker::new(
                self.projection.clone(),
                context.clone(),
                partition,
                generation,
                true,
                stats.clone(),
            );
            tasks.spawn(worker.run(stop_rx.clone()));
        }
        let service =
            control::register(self.projection.clone(), context.clone(), stats.clone()).await?;
        tasks.spawn(track_stream_end(
            context.clone(),
            stats.clone(),
            stop_rx.clone(),
        ));
        if context.source.view.is_some() {
            tasks.spawn(follow_progress(
                context.model.clone(),
                stats.clone(),
                stop_rx.clone(),
            ));
        }
        if config.projection.partitions > 1 {
            tasks.spawn(balance::balance(
                context.client.clone(),
                P::NAME,
                stats.clone(),
                config.projection.pin_timeout,
                stop_rx.clone(),
            ));
        }
        tracing::info!(
            projection = P::NAME,
            stream = %context.source.stream,
            partitions = config.projection.partitions,
            generation,
            "projection function ready"
        );
        let (for_health, stopping) = (stats.clone(), stop_rx.clone());
        let health = crate::health::serve(&config.health, context.client.clone(), move || {
            !*stopping.borrow() && for_health.bound.iter().all(|b| b.load(Ordering::Relaxed))
        })
        .await?;
        Ok(RunningProjection {
            running: crate::running::Tasks {
                stop: stop_tx,
                tasks,
                service: Some(service),
                health,
            },
            stats,
        })
    }

    /// Builds a new version of the read model from the first event while the live version keeps
    /// serving, switches the active pointer to it once it has caught up, waits
    /// `projection.rebuild_grace`, and deletes the old version. Returns the new version.
    pub async fn rebuild(self) -> Result<u64, Error> {
        let config = self.config()?;
        let context = Context::<P>::connect(&config).await?;
        rebuild::rebuild(self.projection, context, |_| {}).await
    }

    /// Applies the dead letters of this projection again, with the current code: each at most
    /// once per read-model version. Returns how many were applied; those that fail again stay.
    pub async fn replay_dead_letters(self) -> Result<usize, Error> {
        let config = self.config()?;
        let context = Context::<P>::connect(&config).await?;
        dead_letters::replay(&*self.projection, &context).await
    }
}

/// A running projection function.
pub struct RunningProjection {
    running: crate::running::Tasks,
    stats: Arc<Stats>,
}

impl crate::running::StopOnSignal for RunningProjection {
    fn stop_on(
        self,
        signal: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<(), Error>> {
        RunningProjection::stop_on(self, signal)
    }
}

impl RunningProjection {
    /// The least checkpoint over all partitions of the live version.
    pub fn checkpoint(&self) -> u64 {
        self.stats.least_checkpoint()
    }

    /// Stops after the batches in flight are committed and acknowledged.
    pub async fn stop(self) -> Result<(), Error> {
        self.running.stop("worker").await
    }

    /// Runs until `signal`, then stops as [`RunningProjection::stop`] does. Returns early with
    /// the error if a partition fails for good.
    pub async fn stop_on(self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        self.running
            .stop_on(signal, "committing batches in flight", "worker")
            .await
    }
}

/// What every worker of one projection shares: connections, names and settings.
pub(crate) struct Context<P> {
    pub js: async_nats::jetstream::Context,
    pub upcasters: Arc<crate::aggregate::Upcasters>,
    pub client: async_nats::Client,
    pub model: ReadModel,
    pub source: Source,
    pub config: Config,
    _projection: PhantomData<fn() -> P>,
}

impl<P> Clone for Context<P> {
    fn clone(&self) -> Self {
        Context {
            js: self.js.clone(),
            upcasters: self.upcasters.clone(),
            client: self.client.clone(),
            model: self.model.clone(),
            source: self.source.clone(),
            config: self.config.clone(),
            _projection: PhantomData,
        }
    }
}

impl<P: Projection> Context<P> {
    async fn connect(config: &Config) -> Result<Context<P>, Error> {
        crate::wire::names::check_projection_name(P::NAME)?;
        let aggregate = <P::Source as Aggregate>::NAME;
        let client = config.nats.connect(&format!("jetfn-{}", P::NAME)).await?;
        crate::store::check_server_version(&client.server_info().version)?;
        let model = ReadModel::connect(config.redis.url.expose(), P::NAME).await?;
        model.check_permissions().await?;
        let js = config.nats.jetstream(client.clone());
        let names = crate::wire::AggregateNames::new(aggregate, config)?;
        let source = Source {
            stream: names.stream,
            subject_prefix: names.event_prefix,
            view: None,
        };
        dead_letters::provision(
            &js,
            &config.projection.dead_letter_stream,
            config.stream.replicas,
        )
        .await?;
        let mut context = Context {
            js,
            upcasters: Arc::new(<P::Source as Aggregate>::upcasters()),
            client,
            model,
            source,
            config: config.clone(),
            _projection: PhantomData,
        };
        let partitions = config.projection.partitions;
        if partitions > 1 {
            context.source.view = Some(view::provision(&context, partitions).await?);
        }
        Ok(context)
    }
}

/// Live numbers of one projection instance, for `$SRV.STATS` and logs.
pub(crate) struct Stats {
    pub generation: AtomicU64,
    pub checkpoints: Vec<AtomicU64>,
    pub stream_last_seq: AtomicU64,
    pub processed: AtomicU64,
    pub dead_letters: AtomicU64,
    pub errors: AtomicU64,
    /// When each partition last applied a batch here (ms since the epoch).
    pub last_batch_ms: Vec<AtomicU64>,
    /// Set to ask a partition's worker to hand its consumer to another instance.
    pub hand_over: Vec<std::sync::atomic::AtomicBool>,
    /// Whether each partition's worker has bound its consumer (readiness).
    pub bound: Vec<std::sync::atomic::AtomicBool>,
    /// The highest checkpoint any partition of this version committed (from any instance): a
    /// sequence the stream, and the view, are known to hold.
    pub progress: watch::Sender<u64>,
}

impl Stats {
    fn new(partitions: u32) -> Self {
        Stats {
            generation: AtomicU64::new(0),
            checkpoints: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            stream_last_seq: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_batch_ms: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            hand_over: (0..partitions)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            bound: (0..partitions)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            progress: watch::channel(0).0,
        }
    }

    pub fn least_checkpoint(&self) -> u64 {
        self.checkpoints
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Whether `partition`'s checkpoint (as this instance last saw it, from Redis or its own
    /// commits) is behind the stream's last sequence.
    pub fn behind(&self, partition: u32) -> bool {
        self.checkpoints.get(partition as usize).is_some_and(|c| {
            c.load(Ordering::Relaxed) < self.stream_last_seq.load(Ordering::Relaxed)
        })
    }

    pub fn lag(&self) -> u64 {
        self.stream_last_seq
            .load(Ordering::Relaxed)
            .saturating_sub(self.least_checkpoint())
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let checkpoints: serde_json::Map<String, serde_json::Value> = self
            .checkpoints
            .iter()
            .enumerate()
            .map(|(p, c)| (format!("p{p}"), c.load(Ordering::Relaxed).into()))
            .collect();
        serde_json::json!({
            "generation": self.generation.load(Ordering::Relaxed),
            "checkpoint": self.least_checkpoint(),
            "checkpoints": checkpoints,
            "stream_last_seq": self.stream_last_seq.load(Ordering::Relaxed),
            "lag": self.lag(),
            "processed": self.processed.load(Ordering::Relaxed),
            "dead_letters": self.dead_letters.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
}

/// Follows the progress stream of the version `stats.generation` names, raising
/// `stats.progress`, so that partitions reading a view learn of every other partition's commits
/// (also other instances') without polling.
pub(crate) async fn follow_progress(
    model: ReadModel,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut feed: Option<ProgressFeed> = None;
    loop {
        let Some(follower) = feed.as_mut() else {
            match ProgressFeed::open(&model).await {
                Ok(opened) => feed = Some(opened),
                Err(error) => {
                    tracing::debug!(%error, "cannot follow the progress stream yet");
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
            continue;
        };
        let generation = stats.generation.load(Ordering::Relaxed);
        let next = tokio::select! {
            _ = stop.changed() => return Ok(()),
            next = follower.next(&model, generation, Duration::from_secs(1)) => next,
        };
        match next {
            Ok(Some(seq)) => {
                stats.progress.send_if_modified(|top| {
                    let higher = seq > *top;
                    if higher {
                        *top = seq;
                    }
                    higher
                });
            }
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "progress stream unavailable; following again");
                feed = None;
            }
        }
    }
}

/// Keeps `stream_last_seq` current for lag reports, and logs the lag now and then.
async fn track_stream_end<P: Projection>(
    context: Context<P>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut ticks = 0u64;
    loop {
        if let Ok(mut stream) = context.js.get_stream(&context.source.stream).await
            && let Ok(info) = stream.info().await
        {
            stats
                .stream_last_seq
                .store(info.state.last_sequence, Ordering::Relaxed);
        }
        // Checkpoints come from Redis, so standby instances report the true lag too.
        let generation = stats.generation.load(Ordering::Relaxed);
        if let Ok(checkpoints) = context.model.checkpoints(generation).await {
            for (partition, seq) in checkpoints {
                if let Some(slot) = stats.checkpoints.get(partition as usize) {
                    slot.store(seq, Ordering::Relaxed);
                }
            }
        }
        if ticks.is_multiple_of(30) {
            tracing::info!(
                projection = P::NAME,
                lag = stats.lag(),
                checkpoint = stats.least_checkpoint(),
                "projection lag"
            );
        }
        ticks += 1;
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_projection_name_stops_start_up_with_the_rule() {
        let err = Error::from(crate::wire::names::check_projection_name("a_b").unwrap_err());
        assert_eq!(
            err.to_string(),
            "projection name \"a_b\" must match [a-z0-9-]+"
        );
    }
}

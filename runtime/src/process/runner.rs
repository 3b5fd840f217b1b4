//! The process manager function: three durable consumers feeding one step function.
//!
//! * `events`: source events, correlated to instances;
//! * `outbox`: the instance stream itself. Each recorded `jetfn.CommandSent` is sent (with its
//!   deterministic id) and its final reply handled as the next step; each `jetfn.TimerSet` /
//!   `jetfn.TimerCancelled` publishes or purges a schedule. Only after that is the record
//!   acknowledged, so a crash sends it again, with the same id;
//! * `timers`: fired timers.
//!
//! Every input becomes a step ([`Core::step`]): load the instance, skip the input if the step is
//! already recorded (a redelivery), plan it, and append the plan with optimistic concurrency. A
//! conflict (another consumer's step on the same instance) reloads and plans again.
//!
//! Messages of one instance are handled in arrival order, one at a time (a lane per instance);
//! instances run concurrently up to [`MAX_IN_FLIGHT`] messages per consumer.

use super::instance::{self, Input, Instance};
use super::stats::Stats;
use super::timers::{Firing, Timers};
use super::{Incoming, Outcome, ProcessManager, Sent, StepError};
use crate::Error;
use crate::aggregate::{Aggregate, Upcasters};
use crate::client::{ClientError, CommandClient};
use crate::command::{ErrorKind, Reply};
use crate::config::Config;
use crate::projection::dead_letters;
use crate::projection::worker::decode_recorded;
use crate::service::{Replies, Service, ServiceSpec};
use crate::store::{Append, AppendError, EventStore, StoreSettings, StoredEvent};
use crate::wire::AggregateNames;
use crate::wire::names::{self, ProcessNames};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// Messages one consumer keeps in flight in this process.
const MAX_IN_FLIGHT: usize = 256;
/// How often a step is planned again after a conflict before the input is tried later.
const MAX_CONFLICTS: u32 = 20;
/// The longest pause before a command that got no final answer is sent again.
const MAX_RESEND_PAUSE: Duration = Duration::from_secs(5);
/// How long a command waits for its reply before it counts as unanswered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts building the function that runs process manager `pm`.
///
/// ```no_run
/// # async fn demo<P: jetfn::process::ProcessManager>(pm: P) -> Result<(), jetfn::Error> {
/// jetfn::process_manager_function(pm).run().await
/// # }
/// ```
pub fn process_manager_function<P: ProcessManager>(pm: P) -> ProcessManagerFunction<P> {
    ProcessManagerFunction {
        pm: Arc::new(pm),
        config: None,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// A process manager function being configured. See [`process_manager_function`].
pub struct ProcessManagerFunction<P> {
    pm: Arc<P>,
    config: Option<Config>,
    version: String,
}

impl<P: ProcessManager> ProcessManagerFunction<P> {
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

    /// Runs until SIGTERM or SIGINT, then finishes the inputs in flight and returns.
    pub async fn run(self) -> Result<(), Error> {
        crate::running::run_until_signal(self.start()).await
    }

    /// Connects, provisions the instance and timer streams and the consumers, and starts.
    pub async fn start(self) -> Result<RunningProcessManager, Error> {
        let config = Config::given_or_load(self.config)?;
        let names = ProcessNames::new(P::NAME)?;
        let source = AggregateNames::new(<P::Source as Aggregate>::NAME, &config)?;
        let client = config.nats.connect(&names.connection()).await?;
        crate::store::check_server_version(&client.server_info().version)?;
        let js = config.nats.jetstream(client.clone());
        let store = EventStore::new(
            client.clone(),
            StoreSettings {
                aggregate: names.owner(),
                stream: names.stream.clone(),
                subject_prefix: names.instance_prefix.clone(),
                replicas: config.stream.replicas,
                duplicate_window: config.stream.duplicate_window,
                max_bytes: None,
                timeout: config.nats.request_timeout,
                api_prefix: config.nats.jetstream_api(),
            },
        );
        store.provision().await?;
        let timers = Timers::provision(js.clone(), names.clone(), config.stream.replicas).await?;
        dead_letters::provision(
            &js,
            &config.projection.dead_letter_stream,
            config.stream.replicas,
        )
        .await?;
        let mut commands = CommandClient::new(client.clone()).timeout(COMMAND_TIMEOUT);
        if let Some(prefix) = &config.command.subject_prefix {
            commands = commands.prefix(prefix.clone());
        }
        let consumers = [
            (
                Role::Events,
                consumer(
                    &js,
                    &source.stream,
                    &names.consumer("events"),
                    source.event_filter(),
                )
                .await?,
            ),
            (
                Role::Outbox,
                consumer(
                    &js,
                    &names.stream,
                    &names.consumer("outbox"),
                    format!("{}.*", names.instance_prefix),
                )
                .await?,
            ),
            (
                Role::Timers,
                consumer(
                    &js,
                    &names.timer_stream,
                    &names.consumer("timers"),
                    names.timers_fired(),
                )
                .await?,
            ),
        ];
        let core = Arc::new(Core {
            pm: self.pm,
            upcasters: <P::Source as Aggregate>::upcasters(),
            source,
            names,
            store,
            timers,
            commands,
            js,
            stats: Arc::new(Stats::default()),
        });
        let service = register(&client, &core, &config.nats.reply_prefixes, &self.version).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (role, consumer) in consumers.iter().cloned() {
            tasks.spawn(consume(core.clone(), role, consumer, stop_rx.clone()));
        }
        tasks.spawn(track_pending(
            core.stats.clone(),
            consumers.to_vec(),
            stop_rx.clone(),
        ));
        let ready = stop_rx.clone();
        let health =
            crate::health::serve(&config.health, client.clone(), move || !*ready.borrow()).await?;
        tracing::info!(
            process_manager = P::NAME,
            source = %core.source.stream,
            instances = %core.names.stream,
            timers = %core.names.timer_stream,
            "process manager ready"
        );
        Ok(RunningProcessManager {
            running: crate::running::Tasks {
                stop: stop_tx,
                tasks,
                service: Some(service),
                health,
            },
        })
    }
}

/// A running process manager function.
pub struct RunningProcessManager {
    running: crate::running::Tasks,
}

impl crate::running::StopOnSignal for RunningProcessManager {
    fn stop_on(
        self,
        signal: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<(), Error>> {
        RunningProcessManager::stop_on(self, signal)
    }
}

impl RunningProcessManager {
    /// Stops pulling, finishes the inputs in flight and returns.
    pub async fn stop(self) -> Result<(), Error> {
        self.running.stop("consumer task").await
    }

    /// Runs until `signal`, then stops as [`RunningProcessManager::stop`] does.
    pub async fn stop_on(self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        self.running
            .stop_on(signal, "finishing inputs in flight", "consumer task")
            .await
    }
}

/// Which consumer a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Events,
    Outbox,
    Timers,
}

/// What handling a message came to.
enum Done {
    /// Handled (or nothing to do): acknowledge.
    Ack,
    /// Try again later.
    Retry(String),
    /// It can never be handled: dead-letter it, then acknowledge.
    Dead(String),
}

/// What every consumer shares.
struct Core<P> {
    pm: Arc<P>,
    upcasters: Upcasters,
    source: AggregateNames,
    names: ProcessNames,
    store: EventStore,
    timers: Timers,
    commands: CommandClient,
    js: jetstream::Context,
    stats: Arc<Stats>,
}

impl<P: ProcessManager> Core<P> {
    /// The instance a message belongs to: its lane. Undecodable source events share one.
    fn lane(&self, role: Role, message: &Message) -> String {
        match role {
            Role::Events => self
                .recorded(message)
                .ok()
                .and_then(|event| self.pm.correlate(&event))
                .unwrap_or_default(),
            Role::Outbox => last_token(&message.subject).to_owned(),
            Role::Timers => serde_json::from_slice::<Firing>(&message.payload)
                .map(|firing| firing.id)
                .unwrap_or_default(),
        }
    }

    fn recorded(
        &self,
        message: &Message,
    ) -> Result<crate::Recorded<<P::Source as Aggregate>::Event>, String> {
        let seq = stream_seq(message)?;
        decode_recorded::<P::Source>(
            &self.upcasters,
            StoredEvent::read(seq, message),
            last_token(&message.subject),
        )
    }

    async fn handle(&self, role: Role, message: &Message) -> Done {
        match role {
            Role::Events => self.on_event(message).await,
            Role::Outbox => self.on_record(message).await,
            Role::Timers => self.on_timer(message).await,
        }
    }

    async fn on_event(&self, message: &Message) -> Done {
        let event = match self.recorded(message) {
            Ok(event) => event,
            Err(error) => return Done::Dead(error),
        };
        let Some(id) = self.pm.correlate(&event) else {
            return Done::Ack;
        };
        if let Err(error) = names::check_id(&id) {
            return Done::Dead(format!("correlation id: {error}"));
        }
        let step = format!("evt-{}", event.seq);
        step_done(
            self.step(&id, &step, "event", &Incoming::Event(event), None)
                .await,
        )
    }

    async fn on_timer(&self, message: &Message) -> Done {
        let firing: Firing = match serde_json::from_slice(&message.payload) {
            Ok(firing) => firing,
            Err(e) => return Done::Dead(format!("fired timer is not timer JSON: {e}")),
        };
        let step = format!("timer-{}-{}", firing.name, firing.token);
        let input = Incoming::Timer {
            name: firing.name.clone(),
        };
        let done = self
            .step(&firing.id, &step, "timer", &input, Some(&firing.token))
            .await;
        match &done {
            Ok(true) => self.stats.timers_fired.fetch_add(1, Ordering::Relaxed),
            Ok(false) => self.stats.timers_ignored.fetch_add(1, Ordering::Relaxed),
            Err(_) => 0,
        };
        let done = step_done(done);
        if let (Done::Ack, Ok(seq)) = (&done, stream_seq(message)) {
            self.timers.forget(seq).await;
        }
        done
    }

    /// The outbox: sends a recorded command, publishes or purges a recorded timer.
    async fn on_record(&self, message: &Message) -> Done {
        let id = last_token(&message.subject).to_owned();
        let stored = match stream_seq(message)
            .and_then(|seq| StoredEvent::read(seq, message).map_err(|e| e.to_string()))
        {
            Ok(stored) => stored,
            Err(error) => return Done::Dead(error),
        };
        if let Some(sent) = instance::command_sent(&stored) {
            return match sent {
                Ok(sent) => self.send(&id, sent).await,
                Err(error) => Done::Dead(error),
            };
        }
        if let Some(timer) = instance::timer_set(&stored) {
            let instance = match self.load(&id).await {
                Ok(instance) => instance,
                Err(err) => return step_done(Err(err)),
            };
            // Only the timer as currently armed: a redelivered older setting must not replace
            // a newer schedule.
            if !instance.armed(&timer.name, &timer.token) {
                return Done::Ack;
            }
            let firing = Firing {
                id,
                name: timer.name,
                token: timer.token,
            };
            let at = timer.at.unwrap_or_default();
            return match self.timers.schedule(&firing, &at).await {
                Ok(()) => Done::Ack,
                Err(error) => Done::Retry(format!("scheduling timer {}: {error}", firing.name)),
            };
        }
        if let Some(timer) = instance::timer_cancelled(&stored) {
            let instance = match self.load(&id).await {
                Ok(instance) => instance,
                Err(err) => return step_done(Err(err)),
            };
            // A newer setting of the same timer owns the schedule subject now.
            if instance.timers.contains_key(&timer.name) {
                return Done::Ack;
            }
            return match self.timers.cancel(&id, &timer.name).await {
                Ok(()) => Done::Ack,
                Err(error) => Done::Retry(format!("cancelling timer {}: {error}", timer.name)),
            };
        }
        Done::Ack
    }

    /// Sends a recorded command under its deterministic id; a final reply becomes a step.
    async fn send(&self, id: &str, sent: Sent) -> Done {
        match self.load(id).await {
            // Answered already (a redelivered record): nothing to send.
            Ok(instance) if !instance.pending.contains_key(&sent.command_id) => return Done::Ack,
            Ok(_) => {}
            Err(err) => return step_done(Err(err)),
        }
        let body = match serde_json::to_vec(&sent.body) {
            Ok(body) => body,
            Err(e) => return Done::Dead(format!("command body: {e}")),
        };
        self.stats.commands_sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .commands_in_flight
            .fetch_add(1, Ordering::Relaxed);
        let reply = self
            .commands
            .send_once(
                &sent.aggregate,
                &sent.id,
                &sent.command,
                body,
                &sent.command_id,
            )
            .await;
        self.stats
            .commands_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        let outcome = match reply {
            Ok(Reply::Accepted(accepted)) => Outcome::Accepted { seq: accepted.seq },
            Ok(Reply::Failed(failure))
                if matches!(failure.kind, ErrorKind::Rejected | ErrorKind::Invalid) =>
            {
                Outcome::Rejected {
                    message: failure.message,
                    code: failure
                        .code
                        .or_else(|| Some(failure.kind.as_str().to_owned())),
                }
            }
            Ok(Reply::Failed(failure)) => {
                return self.resend(&sent, &failure.message);
            }
            Err(ClientError::Protocol(error)) => {
                return Done::Dead(format!("{}: {error}", sent.command_id));
            }
            Err(error) => return self.resend(&sent, &error.to_string()),
        };
        let step = format!("reply-{}", sent.command_id);
        let input = Incoming::Reply { sent, outcome };
        step_done(self.step(id, &step, "reply", &input, None).await)
    }

    fn resend(&self, sent: &Sent, error: &str) -> Done {
        self.stats.commands_retried.fetch_add(1, Ordering::Relaxed);
        Done::Retry(format!(
            "{} to {}.{} got no final answer: {error}",
            sent.command_id, sent.aggregate, sent.id
        ))
    }

    async fn load(&self, id: &str) -> Result<Instance<P::State>, StepError> {
        let history: Vec<StoredEvent> =
            self.store
                .read_after(id, 0)
                .await
                .map_err(|e| StepError::Unavailable {
                    id: id.to_owned(),
                    message: e.to_string(),
                })?;
        Instance::fold(&*self.pm, id, &history)
    }

    /// Handles `input` as step `step` of instance `id`: recorded at most once, whatever is
    /// redelivered or retried. Returns whether anything was recorded.
    async fn step(
        &self,
        id: &str,
        step: &str,
        kind: &str,
        input: &Input<P>,
        timer_token: Option<&str>,
    ) -> Result<bool, StepError> {
        let mut conflicts = 0;
        loop {
            let instance = self.load(id).await?;
            if instance.steps.contains(step) {
                return Ok(false);
            }
            let plan = instance.plan(&*self.pm, id, input, timer_token, now_secs())?;
            if plan.records.is_empty() {
                return Ok(false);
            }
            let append = Append {
                aggregate_id: id,
                expected_last_seq: instance.last_seq,
                expected_version: instance.version,
                command_id: step,
                command: kind,
                events: &plan.records,
                fingerprint: None,
                trace: None,
            };
            match self.store.append(append).await {
                Ok(_) => {
                    self.stats.recorded(&plan);
                    return Ok(true);
                }
                // Another input of the instance got there first, or the answer was lost: the
                // reload tells which.
                Err(AppendError::Conflict(message) | AppendError::Unknown(message))
                    if conflicts < MAX_CONFLICTS =>
                {
                    conflicts += 1;
                    tracing::debug!(id, step, %message, "step conflicted; planning again");
                    let jitter = rand::random::<u64>() % 10;
                    tokio::time::sleep(Duration::from_millis(jitter * u64::from(conflicts))).await;
                }
                Err(err) => {
                    return Err(StepError::Unavailable {
                        id: id.to_owned(),
                        message: err.to_string(),
                    });
                }
            }
        }
    }

    async fn dead_letter(&self, role: Role, message: &Message, error: &str) {
        let stream = match role {
            Role::Events => &self.source.stream,
            Role::Outbox => &self.names.stream,
            Role::Timers => &self.names.timer_stream,
        };
        let seq = stream_seq(message).unwrap_or(0);
        tracing::warn!(
            process_manager = P::NAME,
            stream,
            seq,
            error,
            "dead-lettering"
        );
        // The dead-letter stream is retried until it answers; it cannot fail otherwise.
        let service = self.names.service();
        let origin = dead_letters::Origin {
            stream,
            subject: message.subject.as_str(),
        };
        let _ = dead_letters::send(&self.js, origin, &service, 0, message, seq, error).await;
        self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
    }
}

fn step_done(result: Result<bool, StepError>) -> Done {
    match result {
        Ok(_) => Done::Ack,
        Err(err @ StepError::Unavailable { .. }) => Done::Retry(err.to_string()),
        Err(err) => Done::Dead(err.to_string()),
    }
}

/// Creates (or binds) a durable pull consumer from the stream's first message.
async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    filter: String,
) -> Result<PullConsumer, Error> {
    let failed = |e: String| Error::Service(format!("consumer {name} on {stream}: {e}"));
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| failed(e.to_string()))?;
    stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                description: Some("jetfn process manager".into()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: -1,
                filter_subject: filter,
                max_ack_pending: 4 * MAX_IN_FLIGHT as i64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| failed(e.to_string()))
}

type Lanes = Arc<Mutex<HashMap<String, VecDeque<(Message, OwnedSemaphorePermit)>>>>;

/// Pulls messages and hands each to its instance's lane until told to stop.
async fn consume<P: ProcessManager>(
    core: Arc<Core<P>>,
    role: Role,
    consumer: PullConsumer,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let lanes: Lanes = Arc::default();
    'bind: loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(MAX_IN_FLIGHT)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(process_manager = P::NAME, ?role, error = %err, "cannot pull; retrying");
                tokio::select! {
                    _ = stop.changed() => break 'bind,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue 'bind,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.changed() => break 'bind,
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    // Missed heartbeats and the like pass; a consumer that went away fails
                    // every pull, so pause rather than spin.
                    tracing::debug!(process_manager = P::NAME, ?role, error = %err, "pull");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                None => continue 'bind,
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break 'bind;
            };
            let lane = core.lane(role, &message);
            let mut queues = lanes.lock().unwrap_or_else(|poison| poison.into_inner());
            match queues.get_mut(&lane) {
                Some(queue) => queue.push_back((message, permit)),
                None => {
                    queues.insert(lane.clone(), VecDeque::from([(message, permit)]));
                    tokio::spawn(drain(core.clone(), role, lanes.clone(), lane));
                }
            }
        }
    }
    // Let the inputs in flight finish (bounded: a stuck request times out).
    let _ = tokio::time::timeout(
        COMMAND_TIMEOUT * 2,
        permits.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    Ok(())
}

/// Handles one instance's messages in order until its lane is empty.
async fn drain<P: ProcessManager>(core: Arc<Core<P>>, role: Role, lanes: Lanes, lane: String) {
    loop {
        let next = {
            let mut queues = lanes.lock().unwrap_or_else(|poison| poison.into_inner());
            match queues.get_mut(&lane).and_then(VecDeque::pop_front) {
                Some(next) => next,
                None => {
                    queues.remove(&lane);
                    return;
                }
            }
        };
        let (message, permit) = next;
        match core.handle(role, &message).await {
            Done::Ack => {
                let _ = message.ack().await;
            }
            Done::Retry(reason) => {
                core.stats.errors.fetch_add(1, Ordering::Relaxed);
                let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
                let pause = resend_pause(delivered);
                tracing::debug!(process_manager = P::NAME, ?role, %reason, ?pause, "retrying later");
                let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
            }
            Done::Dead(reason) => {
                core.dead_letter(role, &message, &reason).await;
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
        drop(permit);
    }
}

/// Doubling from 100 ms with the deliveries so far, at most [`MAX_RESEND_PAUSE`], with jitter.
fn resend_pause(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 10)).unwrap_or(10);
    let ceiling = Duration::from_millis(100)
        .saturating_mul(1 << doublings)
        .min(MAX_RESEND_PAUSE);
    let half = ceiling / 2;
    let jitter = u64::try_from(half.as_millis()).unwrap_or(0).max(1);
    half + Duration::from_millis(rand::random::<u64>() % jitter)
}

/// Refreshes the pending gauges from the consumers once a second.
async fn track_pending(
    stats: Arc<Stats>,
    mut consumers: Vec<(Role, PullConsumer)>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    loop {
        for (role, consumer) in &mut consumers {
            if let Ok(info) = consumer.info().await {
                let pending = info.num_pending + info.num_ack_pending as u64;
                match role {
                    Role::Events => stats.events_pending.store(pending, Ordering::Relaxed),
                    Role::Outbox => stats.outbox_pending.store(pending, Ordering::Relaxed),
                    Role::Timers => {}
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The NATS service: `$SRV.INFO` metadata, `$SRV.STATS` data and the status endpoint.
async fn register<P: ProcessManager>(
    client: &async_nats::Client,
    core: &Arc<Core<P>>,
    replies: &[String],
    version: &str,
) -> Result<Service, Error> {
    let metadata = HashMap::from([
        (
            names::meta::KIND.to_owned(),
            names::KIND_PROCESS_MANAGER.to_owned(),
        ),
        (
            names::meta::AGGREGATE.to_owned(),
            core.source.aggregate.clone(),
        ),
        (names::meta::STREAM.to_owned(), core.source.stream.clone()),
        (names::meta::INSTANCES.to_owned(), core.names.stream.clone()),
        (
            names::meta::TIMERS.to_owned(),
            core.names.timer_stream.clone(),
        ),
    ]);
    let stats = core.stats.clone();
    let spec = ServiceSpec {
        name: core.names.service(),
        version: version.to_owned(),
        description: format!("jetfn process manager {}", P::NAME),
        metadata,
        queue_group: names::QUEUE_GROUP.to_owned(),
        replies: Replies::new(replies),
        stats: Arc::new(move || stats.to_json()),
    };
    let service = Service::start(client, spec).await?;
    let mut status = service
        .endpoint(names::STATUS, core.names.status(), HashMap::new())
        .await?;
    let stats = core.stats.clone();
    tokio::spawn(async move {
        while let Some(request) = status.next().await {
            let _ = request.respond(stats.to_json().to_string().into()).await;
        }
    });
    Ok(service)
}

fn last_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

fn stream_seq(message: &Message) -> Result<u64, String> {
    message
        .info()
        .map(|info| info.stream_sequence)
        .map_err(|e| format!("unreadable JetStream metadata: {e}"))
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

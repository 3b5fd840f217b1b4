//! One partition of one read-model version: consume, apply atomically, then acknowledge.

use super::commit::{ApplyStep, Around, commit};
use super::{Context, Projection, Recorded, Stats, balance, dead_letters};
use crate::Error;
use crate::aggregate::{Aggregate, Upcasters, decode_stored};
use crate::readmodel::{
    Applied, AppliedEvent, Batch, Mode, Op, Order, ReadModel, ReadModelError, RedisWrites, Step,
};
use crate::telemetry::TraceContext;
use crate::wire::{MalformedEvent, StoredEvent, header, names};
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use async_nats::jetstream::context::{ConsumerInfoError, ConsumerInfoErrorKind};
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long after a first sighting a dead pin is looked at again before it is released.
const DEAD_PIN_RECHECK: Duration = Duration::from_millis(250);

/// The priority group every partition consumer pins one instance in.
pub(crate) const PIN_GROUP: &str = "jetfn";

/// Where a projection's events come from.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub stream: String,
    pub subject_prefix: String,
    /// The partitioned view partitions read instead of the stream (more than one partition).
    pub view: Option<String>,
}

impl Source {
    /// The stream the partition consumers read: the view if there is one.
    pub fn read_stream(&self) -> &str {
        self.view.as_deref().unwrap_or(&self.stream)
    }

    /// What partition `partition`'s consumer filters on.
    pub fn filter(&self, partition: u32) -> String {
        match self.view {
            Some(_) => names::partition_view_filter(&self.subject_prefix, partition),
            None => format!("{}.*", self.subject_prefix),
        }
    }
}

/// How long a worker that has received nothing since it bound waits between claims (it is
/// probably a standby: the pinned instance claims for the partition).
const STANDBY_CLAIM_EVERY: Duration = Duration::from_millis(100);

/// The partition an aggregate belongs to: FNV-1a (32 bit) of its id, modulo the partitions (the
/// hash NATS subject mapping's `partition()` uses too).
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in aggregate_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

pub(crate) struct Worker<P> {
    projection: Arc<P>,
    context: Context<P>,
    partition: u32,
    generation: u64,
    /// Live workers follow the active pointer; build workers write a version not yet active.
    live: bool,
    stats: Arc<Stats>,
    commits: u64,
    /// The bound consumer acknowledges every message up to the one acknowledged (`ack_policy`
    /// `all`): one ack per batch. Consumers created before are `explicit`: one ack per message.
    ack_all: bool,
    /// The checkpoint the bound consumer was created to start after, when this worker created
    /// it (`None`: it bound one that was there).
    created_after: Option<u64>,
    /// The incarnation of the bound consumer (its creation time), when reading a partitioned
    /// view: deliveries are numbered per incarnation.
    tag: String,
    /// Whether this worker received events since it bound its consumer.
    active: bool,
    /// When this worker last tried to advance an idle checkpoint.
    last_claim: Option<Instant>,
    /// In a partitioned view: the view's sequence of the last message committed (the view
    /// numbers its messages itself).
    position: u64,
}

enum Rebind {
    /// The batch skipped events after this checkpoint: deliver again from there.
    Rewind(u64),
    /// Another instance should take this partition: stop pulling for a while.
    HandOver,
    /// The live version changed: follow it.
    Moved(u64),
    /// Redis lost the checkpoint: replay from the first event.
    Reset,
    /// The consumer went away or failed: bind again.
    Again,
}

impl<P: Projection> Worker<P> {
    pub fn new(
        projection: Arc<P>,
        context: Context<P>,
        partition: u32,
        generation: u64,
        live: bool,
        stats: Arc<Stats>,
    ) -> Self {
        Worker {
            projection,
            context,
            partition,
            generation,
            live,
            stats,
            commits: 0,
            ack_all: false,
            created_after: None,
            tag: String::new(),
            active: false,
            last_claim: None,
            position: 0,
        }
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
        self.serve_until_stopped(&mut stop).await?;
        // A graceful stop (a rolling deploy) hands the partition over now, after its last
        // commit: otherwise a standby waits out the pin timeout before JetStream delivers to it.
        // What this worker read ahead and did not commit comes back to the next one as a hole
        // after the checkpoint, which it redelivers from the checkpoint as after any hand-over.
        if self.active {
            self.release_pin().await;
        }
        Ok(())
    }

    /// Serves the partition, binding again whenever it must, until told to stop.
    async fn serve_until_stopped(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let mut recreate = false;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let rebind = self.serve(recreate, stop).await?;
            recreate = false;
            match rebind {
                None => return Ok(()),
                Some(Rebind::Moved(generation)) => {
                    tracing::info!(
                        projection = P::NAME,
                        partition = self.partition,
                        from = self.generation,
                        to = generation,
                        "read model version switched; following it"
                    );
                    self.generation = generation;
                    self.stats.generation.store(generation, Ordering::Relaxed);
                    // The live consumer keeps its name: it starts again after the new
                    // version's checkpoint.
                    recreate = true;
                }
                Some(Rebind::Reset) => {
                    tracing::warn!(
                        projection = P::NAME,
                        partition = self.partition,
                        "checkpoint gone (Redis lost its data?): rebuilding from the first event"
                    );
                    recreate = true;
                }
                Some(Rebind::Rewind(checkpoint)) => {
                    tracing::info!(
                        projection = P::NAME,
                        partition = self.partition,
                        checkpoint,
                        "events after the checkpoint are missing from the batch (held by a \
                         previous worker); redelivering from the checkpoint"
                    );
                    recreate = true;
                }
                Some(Rebind::Again) => tokio::time::sleep(Duration::from_millis(500)).await,
                Some(Rebind::HandOver) => {
                    self.release_pin().await;
                    let pause = self.context.config.projection.pin_timeout * 2;
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Binds the consumer and applies batches until told to stop (`None`) or to rebind.
    async fn serve(
        &mut self,
        recreate: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Rebind>, Error> {
        if self.live
            && let Ok(Some(active)) = self.context.model.active_generation().await
            && active != self.generation
        {
            return Ok(Some(Rebind::Moved(active)));
        }
        let (mut consumer, mut checkpoint) = match self.ensure_consumer(recreate).await {
            Ok(bound) => {
                if let Some(flag) = self.stats.bound.get(self.partition as usize) {
                    flag.store(true, Ordering::Relaxed);
                }
                self.ack_all = bound.0.cached_info().config.ack_policy == AckPolicy::All;
                self.tag = incarnation(bound.0.cached_info());
                self.active = false;
                bound
            }
            Err(error) => {
                tracing::warn!(projection = P::NAME, partition = self.partition, %error, "cannot bind consumer");
                return Ok(Some(Rebind::Again));
            }
        };
        let pull_expiry = (self.context.config.projection.pin_timeout / 2)
            .clamp(Duration::from_millis(500), Duration::from_secs(5));
        let messages = match consumer
            .stream()
            .group(PIN_GROUP)
            .max_messages_per_batch(self.context.config.projection.batch)
            .expires(pull_expiry)
            .heartbeat(pull_expiry / 2)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(projection = P::NAME, partition = self.partition, error = %err, "cannot pull");
                return Ok(Some(Rebind::Again));
            }
        };
        let partitioned = self.context.source.view.is_some();
        let mut progress = self.stats.progress.subscribe();
        // The pull stream is polled by a task of its own, which also decodes and projects each
        // event: the next batch is fetched and prepared while this one is being committed.
        let size = self.context.config.projection.batch;
        let (ahead, mut pulled) = tokio::sync::mpsc::channel(size.saturating_mul(2).max(1));
        let _reader = AbortOnDrop(tokio::spawn(read_ahead(
            messages,
            ahead,
            Preparer {
                projection: self.projection.clone(),
                upcasters: self.context.upcasters.clone(),
                attempts: self.context.config.projection.max_attempts,
                sourced: partitioned,
            },
        )));
        // The next batch, sent to Redis while the one before it is applied (see `Sent`).
        let mut ahead: Option<Sent> = None;
        loop {
            if let Some(sent) = ahead.take() {
                // The next batch goes out before this one is answered, after the checkpoint
                // this one will leave; not once the worker is to stop or hand over.
                let stopping = stop.has_changed().unwrap_or(true)
                    || self.stats.hand_over[self.partition as usize].load(Ordering::Relaxed);
                if !stopping && !sent.interrupted {
                    let after = sent
                        .batch
                        .last()
                        .map_or(checkpoint, |p| p.seq.max(checkpoint));
                    if let Some((next, interrupted)) = self.receive_now(&mut pulled) {
                        let order = following(&sent.order, &next);
                        ahead = Some(self.send(next, after, order, interrupted).await);
                    }
                }
                let Sent {
                    batch,
                    interrupted,
                    order,
                    reply,
                } = sent;
                let committed = match reply.finish().await {
                    Some(Ok(Step::Done(Applied::Committed(committed)))) => Some(committed),
                    _ => None,
                };
                let done = match (committed, order) {
                    (Some(committed), Some((order, _))) => {
                        self.committed(&batch, &mut checkpoint, &order, committed)
                            .await;
                        None
                    }
                    // The ordinary way, with the checks a batch sent ahead skipped.
                    _ => {
                        let top = *progress.borrow();
                        match self.order(&mut consumer, &batch, checkpoint, top).await {
                            Ok((order, floor)) => {
                                self.commit_batch(&batch, &mut checkpoint, order, floor)
                                    .await?
                            }
                            Err(rebind) => Some(rebind),
                        }
                    }
                };
                if let Some(rebind) = done {
                    return Ok(Some(rebind));
                }
                if interrupted {
                    return Ok(Some(Rebind::Again));
                }
                continue;
            }
            if self.stats.hand_over[self.partition as usize].swap(false, Ordering::Relaxed) {
                return Ok(Some(Rebind::HandOver));
            }
            let first = tokio::select! {
                _ = stop.changed() => return Ok(None),
                // Another partition committed further: this one may have nothing up to there.
                // (With events of its own already waiting, their batch claims it instead.)
                Ok(()) = progress.changed(), if partitioned => {
                    let top = *progress.borrow_and_update();
                    if pulled.is_empty()
                        && let Some(rebind) = self.claim(&mut consumer, &mut checkpoint, top).await?
                    {
                        return Ok(Some(rebind));
                    }
                    continue;
                }
                // Wake up now and then to notice hand-over requests (and claim what a
                // throttled standby skipped).
                next = tokio::time::timeout(Duration::from_secs(1), pulled.recv()) => match next {
                    Ok(next) => next,
                    Err(_) => {
                        // Not receiving while the partition is behind: is its pin dead?
                        if !self.active && self.stats.behind(self.partition) {
                            self.release_dead_pin(&mut consumer).await;
                        }
                        if partitioned {
                            let top = *progress.borrow();
                            if let Some(rebind) = self.claim(&mut consumer, &mut checkpoint, top).await? {
                                return Ok(Some(rebind));
                            }
                        }
                        continue;
                    }
                },
            };
            let first = match first {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::debug!(projection = P::NAME, partition = self.partition, error = %err, "pull interrupted");
                    return Ok(Some(Rebind::Again));
                }
                None => return Ok(Some(Rebind::Again)),
            };
            // As many as are here already, up to a batch: one event when live, whole batches
            // when behind.
            let mut batch = vec![first];
            let interrupted = ready(&mut pulled, &mut batch, size);
            self.active = true;
            let top = *progress.borrow();
            let order = match self.order(&mut consumer, &batch, checkpoint, top).await {
                Ok(order) => order,
                Err(rebind) => return Ok(Some(rebind)),
            };
            // Redeliveries can arrive out of order; the script needs ascending sequences.
            batch.sort_by_key(|p| p.seq);
            batch.dedup_by_key(|p| p.seq);
            ahead = Some(self.send(batch, checkpoint, Some(order), interrupted).await);
        }
    }

    /// Takes note that `batch`, applied in `order`, committed the checkpoint to `committed`.
    async fn committed(
        &mut self,
        batch: &[Pulled],
        checkpoint: &mut u64,
        order: &Order,
        committed: u64,
    ) {
        *checkpoint = committed;
        if let Order::Deliveries { position, .. } = order {
            self.position = *position;
        }
        self.after_commit(batch, committed).await;
    }

    /// The settings of one apply step in `order` with `floor`.
    fn settings(&self, order: Order, floor: u64) -> Batch {
        Batch {
            feed_len: self.context.config.projection.change_feed_len,
            partitions: self.context.config.projection.partitions,
            order,
            floor,
        }
    }

    /// Whether this worker applies the live version or builds one.
    fn mode(&self) -> Mode {
        if self.live { Mode::Live } else { Mode::Build }
    }

    /// How the step is to know that `batch` misses nothing after `checkpoint`, and the floor it
    /// may advance the checkpoint to; for a partitioned view this asks the consumer how it
    /// stands (`top`: the furthest any partition committed).
    async fn order(
        &self,
        consumer: &mut consumer::Consumer<pull::Config>,
        batch: &[Pulled],
        checkpoint: u64,
        top: u64,
    ) -> Result<(Order, u64), Rebind> {
        if self.context.source.view.is_none() {
            return Ok((Order::Contiguous, 0));
        }
        let Some((first, last)) = deliveries(batch) else {
            // A delivery in between went elsewhere: start again from the checkpoint.
            return Err(Rebind::Rewind(checkpoint));
        };
        let position = batch.iter().map(|p| p.position).max().unwrap_or(0);
        let floor = match self.check_consumer(consumer, position).await {
            ConsumerState::Recreated => return Err(Rebind::Again),
            ConsumerState::Drained => top,
            ConsumerState::Busy => 0,
        };
        let order = Order::Deliveries {
            tag: self.tag.clone(),
            first,
            last,
            position: position.max(self.position),
        };
        Ok((order, floor))
    }

    /// Commits `batch` the ordinary way, after `checkpoint` (which it advances): until the step
    /// reaches an outcome, dead-lettering what the read model refuses. `Some` when the worker
    /// must bind again instead.
    async fn commit_batch(
        &mut self,
        batch: &[Pulled],
        checkpoint: &mut u64,
        mut order: Order,
        floor: u64,
    ) -> Result<Option<Rebind>, Error> {
        loop {
            match self
                .apply_batch(batch, *checkpoint, order.clone(), floor)
                .await?
            {
                Applied::Committed(committed) => {
                    self.committed(batch, checkpoint, &order, committed).await;
                    return Ok(None);
                }
                Applied::Reset => return Ok(Some(Rebind::Reset)),
                Applied::Moved(generation) => return Ok(Some(Rebind::Moved(generation))),
                Applied::Stale(at) => return Ok(Some(Rebind::Rewind(at))),
                // The first delivery of a consumer this worker created to start right after
                // the checkpoint lies beyond it: the stream itself has the hole (limits or
                // deleted messages).
                Applied::Gap(at) if self.hole_is_in_the_stream(batch, at) => {
                    tracing::warn!(
                        projection = P::NAME,
                        partition = self.partition,
                        checkpoint = at,
                        "the stream has no events right after the checkpoint; continuing after the hole"
                    );
                    order = Order::HoleAccepted;
                }
                // Anything else holds the missing events: a consumer bound as it was (its
                // earlier deliveries wait for their ack timeout), or one that delivered them
                // to a pull that was lost. Only a consumer created at the checkpoint tells.
                Applied::Gap(at) => return Ok(Some(Rebind::Rewind(at))),
            }
        }
    }

    /// Whether a hole after checkpoint `at` is in the stream rather than held elsewhere: `batch`
    /// holds the first delivery of a consumer this worker created to start right after `at`,
    /// which is the stream's first event after `at` that the consumer's filter takes.
    fn hole_is_in_the_stream(&self, batch: &[Pulled], at: u64) -> bool {
        self.created_after == Some(at) && batch.iter().any(|pulled| pulled.delivery == 1)
    }

    /// A batch of what the read-ahead has ready now, sorted, if it has anything; and whether
    /// the pull ended after it. (A pull that ended before it closes the channel, and the
    /// worker's next wait for it binds again.)
    fn receive_now(
        &self,
        pulled: &mut tokio::sync::mpsc::Receiver<Result<Pulled, String>>,
    ) -> Option<(Vec<Pulled>, bool)> {
        let mut batch = vec![pulled.try_recv().ok()?.ok()?];
        let interrupted = ready(pulled, &mut batch, self.context.config.projection.batch);
        batch.sort_by_key(|p| p.seq);
        batch.dedup_by_key(|p| p.seq);
        Some((batch, interrupted))
    }

    /// Sends `batch`'s first attempt at the apply step, in `order` with its floor, without
    /// waiting for its answer: while Redis applies one batch, the next is already on its way,
    /// and Redis goes from one to the next without waiting for the worker. The attempt is made
    /// only with an order, when nothing in the batch needs the worker first (a dead letter) and
    /// every event lies after `checkpoint`, the one the batch before will have committed;
    /// otherwise the batch goes the ordinary way.
    async fn send(
        &self,
        batch: Vec<Pulled>,
        checkpoint: u64,
        order: Option<(Order, u64)>,
        interrupted: bool,
    ) -> Sent {
        let events: Option<Vec<AppliedEvent>> = batch
            .iter()
            .map(|pulled| match self.planned(pulled, checkpoint) {
                Planned::Writes(event) if pulled.seq > checkpoint => Some(event),
                _ => None,
            })
            .collect();
        let reply = match (events, &order) {
            (Some(events), Some((order, floor))) => {
                let model = self.context.model.clone();
                let (partition, generation) = (self.partition, self.generation);
                let mode = self.mode();
                let settings = self.settings(order.clone(), *floor);
                let mut reply: Attempt = Box::pin(async move {
                    model
                        .apply(partition, generation, mode, checkpoint, &settings, &events)
                        .await
                });
                // Polled once here, the step's request is queued on the connection now, before
                // the next batch's: Redis runs them in that order.
                match futures::poll!(reply.as_mut()) {
                    Poll::Ready(step) => Sending::Answered(step),
                    Poll::Pending => Sending::Sent(reply),
                }
            }
            _ => Sending::Not,
        };
        Sent {
            batch,
            interrupted,
            order,
            reply,
        }
    }

    /// Advances an idle partition's checkpoint to `top`, a sequence some partition committed (so
    /// the view holds it), when the consumer shows that nothing of this partition up to there is
    /// undelivered or uncommitted. Without this, a partition without recent events would hold
    /// every consistency token back.
    async fn claim(
        &mut self,
        consumer: &mut consumer::Consumer<pull::Config>,
        checkpoint: &mut u64,
        top: u64,
    ) -> Result<Option<Rebind>, Error> {
        if top <= *checkpoint
            || (!self.active
                && self
                    .last_claim
                    .is_some_and(|at| at.elapsed() < STANDBY_CLAIM_EVERY))
        {
            return Ok(None);
        }
        self.last_claim = Some(Instant::now());
        match self.check_consumer(consumer, self.position).await {
            ConsumerState::Drained => {}
            ConsumerState::Recreated => return Ok(Some(Rebind::Again)),
            ConsumerState::Busy => return Ok(None),
        }
        let order = Order::Deliveries {
            tag: self.tag.clone(),
            first: 0,
            last: 0,
            position: self.position,
        };
        match self.apply_batch(&[], *checkpoint, order, top).await? {
            Applied::Committed(committed) => {
                *checkpoint = committed;
                self.note_checkpoint(committed);
                Ok(None)
            }
            Applied::Reset => Ok(Some(Rebind::Reset)),
            Applied::Moved(generation) => Ok(Some(Rebind::Moved(generation))),
            Applied::Gap(_) | Applied::Stale(_) => Ok(None),
        }
    }

    /// Asks the server about the bound consumer. `Drained`: it has nothing undelivered and has
    /// delivered nothing after `delivered_up_to` (a sequence of the stream it reads). The incarnation check makes sure
    /// the deliveries in hand came from the consumer this worker bound (a recreated one numbers
    /// its deliveries from 1 again).
    async fn check_consumer(
        &self,
        consumer: &mut consumer::Consumer<pull::Config>,
        delivered_up_to: u64,
    ) -> ConsumerState {
        match consumer.info().await {
            Ok(info) if incarnation(info) != self.tag => ConsumerState::Recreated,
            Ok(info)
                if info.num_pending == 0 && info.delivered.stream_sequence <= delivered_up_to =>
            {
                ConsumerState::Drained
            }
            Ok(_) => ConsumerState::Busy,
            // Unknown: the deliveries in hand cannot be vouched for.
            Err(error) => {
                tracing::debug!(projection = P::NAME, partition = self.partition, %error, "consumer info failed");
                ConsumerState::Recreated
            }
        }
    }

    /// Records a new checkpoint of this partition for stats and for the other partitions' claims.
    fn note_checkpoint(&self, committed: u64) {
        if let Some(slot) = self.stats.checkpoints.get(self.partition as usize) {
            slot.store(committed, Ordering::Relaxed);
        }
        self.stats.progress.send_if_modified(|top| {
            let higher = committed > *top;
            if higher {
                *top = committed;
            }
            higher
        });
    }

    /// The consumer this worker reads through: the live one, whose name survives rebuilds, or
    /// the build consumer of the version it writes.
    fn consumer_name(&self) -> String {
        if self.live {
            names::live_projection_consumer(P::NAME, self.partition)
        } else {
            names::projection_consumer(P::NAME, self.generation, self.partition)
        }
    }

    /// Releases this partition's pin so a standby instance takes over at once.
    async fn release_pin(&self) {
        if let Ok(stream) = self
            .context
            .js
            .get_stream(self.context.source.read_stream())
            .await
        {
            let _ = stream
                .unpin_consumer(&self.consumer_name(), PIN_GROUP)
                .await;
        }
    }

    /// Releases a pin nats-server gave to a client that was gone ([`balance::dead_pin`]), seen
    /// twice a moment apart with the same id, so that events flow again now rather than after
    /// the pin timeout.
    async fn release_dead_pin(&self, consumer: &mut consumer::Consumer<pull::Config>) {
        let Ok(info) = consumer.info().await else {
            return;
        };
        let Some(pin) = balance::dead_pin(info, PIN_GROUP).map(str::to_owned) else {
            return;
        };
        tokio::time::sleep(DEAD_PIN_RECHECK).await;
        let Ok(info) = consumer.info().await else {
            return;
        };
        if balance::dead_pin(info, PIN_GROUP) == Some(pin.as_str()) {
            tracing::info!(
                projection = P::NAME,
                partition = self.partition,
                "releasing a pin nats-server gave to a client that was gone"
            );
            self.release_pin().await;
        }
    }

    /// This partition's checkpoint in Redis (0 when it has none). An unreachable Redis is an
    /// error, not 0: that would replay the whole stream.
    async fn checkpoint(&self) -> Result<u64, ReadModelError> {
        let checkpoints = self.context.model.checkpoints(self.generation).await?;
        Ok(checkpoints
            .iter()
            .find(|(p, _)| *p == self.partition)
            .map_or(0, |(_, seq)| *seq))
    }

    /// Gets or creates the partition's durable consumer so that it delivers from the Redis
    /// checkpoint + 1, and returns it with that checkpoint. A consumer whose acknowledgements are
    /// ahead of the checkpoint (Redis lost data) is recreated.
    async fn ensure_consumer(
        &mut self,
        recreate: bool,
    ) -> Result<(consumer::Consumer<pull::Config>, u64), Error> {
        let name = self.consumer_name();
        let read = self.context.source.read_stream();
        let stream = self
            .context
            .js
            .get_stream(read)
            .await
            .map_err(|e| Error::Service(format!("stream {read}: {e}")))?;
        let existing = match stream.get_consumer::<pull::Config>(&name).await {
            Ok(mut existing) => {
                let ack_floor = existing
                    .info()
                    .await
                    .map(|info| info.ack_floor.stream_sequence)
                    .unwrap_or(0);
                Some((existing, ack_floor))
            }
            // Only a consumer the server says is not there is created anew: after any other
            // failure (a timeout while a replicated consumer elects its leader, say) creating it
            // would be refused for a different start position, so bind again later instead.
            Err(err) => match err.downcast_ref::<ConsumerInfoError>().map(|e| e.kind()) {
                Some(ConsumerInfoErrorKind::NotFound) => None,
                _ => return Err(Error::Service(format!("consumer {name}: {err}"))),
            },
        };
        // Read after the ack floor: the checkpoint only grows and is committed before the acks,
        // so a checkpoint read later is never behind the floor unless Redis lost data.
        let checkpoint = self.checkpoint().await?;
        // A view numbers its messages itself: its consumers start from the view's sequence of
        // the last message committed, kept beside the delivery cursor.
        let position = match self.context.source.view {
            Some(_) => {
                self.context
                    .model
                    .view_position(self.generation, self.partition)
                    .await?
            }
            None => checkpoint,
        };
        self.position = position;
        self.created_after = None;
        if let Some((existing, ack_floor)) = existing {
            if ack_floor <= position && !recreate {
                return Ok((existing, checkpoint));
            }
            if ack_floor > position {
                tracing::warn!(
                    projection = P::NAME,
                    partition = self.partition,
                    checkpoint,
                    ack_floor,
                    "consumer is ahead of the Redis checkpoint: replaying from the checkpoint"
                );
            }
            stream
                .delete_consumer(&name)
                .await
                .map_err(|e| Error::Service(format!("deleting consumer {name}: {e}")))?;
        }
        let deliver_policy = match position {
            0 => DeliverPolicy::All,
            seq => DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        let batch = self.context.config.projection.batch as i64;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "jetfn projection {} version {} partition {}",
                    P::NAME,
                    self.generation,
                    self.partition
                )),
                deliver_policy,
                // One ack per batch: the batch continues the checkpoint without a hole (the
                // apply step checks that), so everything up to its last message is applied.
                ack_policy: AckPolicy::All,
                ack_wait: self.context.config.projection.ack_wait,
                max_deliver: -1,
                filter_subject: self.context.source.filter(self.partition),
                // The batch being committed and two more read and prepared ahead: enough to keep
                // Redis, the slowest step, busy, while bounding what a crash hands back.
                max_ack_pending: batch * 3,
                priority_policy: PriorityPolicy::PinnedClient,
                priority_groups: vec![PIN_GROUP.to_owned()],
                priority_timeout: self.context.config.projection.pin_timeout,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Service(format!("creating consumer {name}: {e}")))?;
        self.created_after = Some(position);
        Ok((consumer, checkpoint))
    }

    /// Turns messages into writes and commits them (see [`commit`]): Redis is retried until it
    /// answers, an event the read model cannot hold is dead-lettered and the rest of the batch
    /// applied without it, and an error that waiting cannot cure stops the worker.
    async fn apply_batch(
        &mut self,
        batch: &[Pulled],
        checkpoint: u64,
        order: Order,
        floor: u64,
    ) -> Result<Applied, Error> {
        let mut events = Vec::with_capacity(batch.len());
        for pulled in batch {
            events.push(self.prepare(pulled, checkpoint).await?);
        }
        let step = RedisStep {
            model: &self.context.model,
            partition: self.partition,
            generation: self.generation,
            mode: self.mode(),
            checkpoint,
            settings: self.settings(order, floor),
        };
        let started = Instant::now();
        let mut around = WorkerAround {
            worker: &*self,
            batch,
        };
        let progress_every = self.context.config.projection.ack_wait / 3;
        let (applied, attempts) = commit(&step, &mut around, &mut events, progress_every).await?;
        if attempts > 0 {
            tracing::info!(projection = P::NAME, partition = self.partition, after = ?started.elapsed(), attempts, "redis answers again; batch applied");
        }
        Ok(applied)
    }

    /// Stores `message` in the dead-letter stream with `error`.
    async fn dead_letter(
        &self,
        message: &Message,
        seq: u64,
        event_type: &str,
        error: &str,
    ) -> Result<(), Error> {
        tracing::warn!(
            projection = P::NAME,
            seq,
            event_type,
            error,
            "dead-lettering event"
        );
        // A view's subject carries the partition; the dead letter names the event's own subject.
        let aggregate_id = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap_or_default();
        let subject = format!("{}.{aggregate_id}", self.context.source.subject_prefix);
        let origin = dead_letters::Origin {
            stream: &self.context.source.stream,
            subject: &subject,
        };
        dead_letters::send(
            &self.context.js,
            origin,
            P::NAME,
            self.generation,
            message,
            seq,
            error,
        )
        .await?;
        self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The event's place in the batch: its writes (prepared ahead, see [`read_ahead`]), or
    /// skipped. Events of other partitions and redeliveries only advance the checkpoint; events
    /// that failed every attempt are dead-lettered first.
    async fn prepare(&self, pulled: &Pulled, checkpoint: u64) -> Result<AppliedEvent, Error> {
        match self.planned(pulled, checkpoint) {
            Planned::Writes(event) | Planned::Skipped(event) => Ok(event),
            Planned::DeadLetter(error, skipped) => {
                self.dead_letter(&pulled.message, pulled.seq, &pulled.event_type, error)
                    .await?;
                Ok(skipped)
            }
        }
    }

    /// What [`Worker::prepare`] makes of `pulled`, before any side effect.
    fn planned<'p>(&self, pulled: &'p Pulled, checkpoint: u64) -> Planned<'p> {
        let skipped = || AppliedEvent {
            seq: pulled.seq,
            aggregate_id: pulled.aggregate_id.clone(),
            event_type: pulled.event_type.clone(),
            ops: Arc::default(),
            write: false,
        };
        let partitions = self.context.config.projection.partitions;
        // Already applied (a redelivery), or another partition's (only when reading the whole
        // stream; a view delivers only this partition's): the checkpoint passes it.
        let others = self.context.source.view.is_none()
            && partition_of(&pulled.aggregate_id, partitions) != self.partition;
        if pulled.seq <= checkpoint || others {
            return Planned::Skipped(skipped());
        }
        match &pulled.writes {
            Ok(ops) => Planned::Writes(AppliedEvent {
                ops: ops.clone(),
                write: true,
                ..skipped()
            }),
            Err(error) => Planned::DeadLetter(error, skipped()),
        }
    }

    async fn after_commit(&mut self, batch: &[Pulled], committed: u64) {
        self.commits += 1;
        #[cfg(feature = "fault-injection")]
        if self
            .context
            .config
            .projection
            .crash_after_commits
            .is_some_and(|n| self.commits >= n)
        {
            tracing::error!("fault injection: exiting between the Redis commit and the acks");
            std::process::exit(86);
        }
        // A lost ack only means a redelivery, which the checkpoint skips. The batch is sorted by
        // stream sequence, and an `all` ack covers every message up to it.
        let acks = if self.ack_all {
            batch.last().map(std::slice::from_ref).unwrap_or_default()
        } else {
            batch
        };
        for pulled in acks {
            let _ = pulled.message.ack().await;
        }
        self.note_checkpoint(committed);
        if let Some(slot) = self.stats.last_batch_ms.get(self.partition as usize) {
            slot.store(super::balance::now_ms(), Ordering::Relaxed);
        }
        self.stats
            .processed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            projection = P::NAME,
            partition = self.partition,
            events = batch.len(),
            checkpoint = committed,
            lag = self.stats.lag(),
            "batch applied"
        );
    }
}

/// The atomic apply step of one batch, in Redis.
struct RedisStep<'a> {
    model: &'a ReadModel,
    partition: u32,
    generation: u64,
    mode: Mode,
    checkpoint: u64,
    settings: Batch,
}

impl ApplyStep for RedisStep<'_> {
    fn apply(
        &self,
        events: &[AppliedEvent],
    ) -> impl Future<Output = Result<Step, ReadModelError>> + Send {
        self.model.apply(
            self.partition,
            self.generation,
            self.mode,
            self.checkpoint,
            &self.settings,
            events,
        )
    }
}

/// The worker's side of committing one batch: dead letters, progress acks, counters and logs.
struct WorkerAround<'a, P> {
    worker: &'a Worker<P>,
    batch: &'a [Pulled],
}

impl<P: Projection> Around for WorkerAround<'_, P> {
    fn dead_letter(
        &mut self,
        index: usize,
        event: &AppliedEvent,
        reason: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let (worker, message) = (self.worker, self.batch.get(index).map(|p| &p.message));
        let (seq, event_type) = (event.seq, event.event_type.clone());
        let error = format!("the read model cannot hold this event: {reason}");
        async move {
            match message {
                Some(message) => worker.dead_letter(message, seq, &event_type, &error).await,
                None => Err(ReadModelError::UnexpectedReply(format!(
                    "refused event {index} of a batch of {}",
                    worker.context.config.projection.batch
                ))
                .into()),
            }
        }
    }

    fn in_progress(&mut self) -> impl Future<Output = ()> + Send {
        let batch = self.batch;
        async move {
            for pulled in batch {
                let _ = pulled.message.ack_with(AckKind::Progress).await;
            }
        }
    }

    fn unavailable(&mut self, error: &ReadModelError, attempts: u32, pause: Duration) {
        let worker = self.worker;
        worker.stats.errors.fetch_add(1, Ordering::Relaxed);
        if attempts == 1 || attempts.is_multiple_of(20) {
            tracing::warn!(projection = P::NAME, partition = worker.partition, %error, attempts, retry_in = ?pause, "redis unavailable; retrying the batch");
        } else {
            tracing::debug!(projection = P::NAME, partition = worker.partition, %error, attempts, retry_in = ?pause, "redis unavailable; retrying the batch");
        }
    }

    fn failed(&mut self, error: &ReadModelError) {
        let worker = self.worker;
        worker.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(projection = P::NAME, partition = worker.partition, %error, "cannot apply the batch; stopping");
    }
}

/// What the server says of a partition consumer (see `Worker::check_consumer`).
enum ConsumerState {
    /// Another incarnation (or no answer): bind again.
    Recreated,
    /// Nothing undelivered, nothing delivered beyond what the worker holds.
    Drained,
    /// Events are still on their way.
    Busy,
}

/// A consumer's incarnation: its creation time, in nanoseconds since the epoch.
fn incarnation(info: &consumer::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}

/// The first and last consumer sequence of a batch, if its deliveries follow each other without
/// a gap or a repeat (else some went elsewhere, or the metadata is unreadable).
fn deliveries(batch: &[Pulled]) -> Option<(u64, u64)> {
    let mut sequences: Vec<u64> = batch.iter().map(|p| p.delivery).collect();
    sequences.sort_unstable();
    let first = *sequences.first()?;
    let last = *sequences.last()?;
    let follow = sequences.windows(2).all(|w| w[1] == w[0] + 1);
    follow.then_some((first, last))
}

/// A delivered event, read and prepared ahead of its batch.
pub(crate) struct Pulled {
    message: Message,
    /// Its sequence in the event stream.
    seq: u64,
    /// Its sequence in the stream read (the view's own when reading a view).
    position: u64,
    /// Its consumer (delivery) sequence.
    delivery: u64,
    aggregate_id: String,
    event_type: String,
    /// Its writes, or why every attempt failed.
    writes: Result<Arc<[Op]>, String>,
}

/// What [`read_ahead`] needs to turn events into writes.
struct Preparer<P> {
    projection: Arc<P>,
    upcasters: Arc<Upcasters>,
    attempts: u32,
    /// Reading a partitioned view: the event stream's sequence is in `Nats-Stream-Source`.
    sourced: bool,
}

/// Aborts the task when dropped (a worker rebinding drops its read-ahead).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An event's place in a batch, before any side effect.
enum Planned<'p> {
    /// Its writes.
    Writes(AppliedEvent),
    /// It only advances the checkpoint.
    Skipped(AppliedEvent),
    /// Every attempt to project it failed (why): dead-letter it, then it only advances the
    /// checkpoint.
    DeadLetter(&'p str, AppliedEvent),
}

/// A batch whose first attempt at the apply step went out before the batch ahead of it was
/// answered. Only a commit is taken from that attempt: any other answer (the batch ahead may
/// not have committed yet, or at all) and the batch goes again the ordinary way. That is safe
/// because the step writes nothing unless the batch continues the checkpoint it finds.
struct Sent {
    batch: Vec<Pulled>,
    /// The pull ended (with an error) after this batch: bind again once it is committed.
    interrupted: bool,
    /// The order and floor it was sent with; `None` when they are still to be found (a batch
    /// sent ahead whose deliveries do not follow the batch before it's).
    order: Option<(Order, u64)>,
    reply: Sending,
}

/// A first attempt at the apply step, on its way.
type Attempt = std::pin::Pin<Box<dyn Future<Output = Result<Step, ReadModelError>> + Send>>;

/// Where a batch's first attempt stands.
enum Sending {
    /// Not made: the batch goes the ordinary way.
    Not,
    /// Sent, not answered yet.
    Sent(Attempt),
    /// Answered at once (an error before anything was sent).
    Answered(Result<Step, ReadModelError>),
}

impl Sending {
    /// The step's answer, or `None` when no attempt was made.
    async fn finish(self) -> Option<Result<Step, ReadModelError>> {
        match self {
            Sending::Not => None,
            Sending::Sent(reply) => Some(reply.await),
            Sending::Answered(step) => Some(step),
        }
    }
}

/// The order of `next`, sent ahead right behind a batch in `before` (before its answer): for a
/// partitioned view only if its deliveries follow that batch's, and without a floor (claims wait
/// for the ordinary way). `None`: the ordinary way finds it.
fn following(before: &Option<(Order, u64)>, next: &[Pulled]) -> Option<(Order, u64)> {
    match before {
        Some((
            Order::Deliveries {
                tag,
                last,
                position,
                ..
            },
            _,
        )) => {
            let (first, through) = deliveries(next).filter(|(first, _)| *first == last + 1)?;
            let top = next.iter().map(|p| p.position).max().unwrap_or(0);
            let order = Order::Deliveries {
                tag: tag.clone(),
                first,
                last: through,
                position: top.max(*position),
            };
            Some((order, 0))
        }
        Some(_) => Some((Order::Contiguous, 0)),
        None => None,
    }
}

/// Takes what the read-ahead has ready into `batch`, up to `size`; true when the pull ended
/// with an error (the worker binds again after this batch).
fn ready(
    pulled: &mut tokio::sync::mpsc::Receiver<Result<Pulled, String>>,
    batch: &mut Vec<Pulled>,
    size: usize,
) -> bool {
    while batch.len() < size {
        match pulled.try_recv() {
            Ok(Ok(message)) => batch.push(message),
            Ok(Err(_)) => return true,
            Err(_) => return false,
        }
    }
    false
}

/// Polls the pull stream, so that its next fetch goes out while a batch is being committed,
/// and decodes and projects each event on the way, outside the commit's path. Stops when the
/// stream ends or the worker drops the channel; an error is passed on and ends it.
async fn read_ahead<P: Projection>(
    mut messages: pull::Stream,
    ahead: tokio::sync::mpsc::Sender<Result<Pulled, String>>,
    preparer: Preparer<P>,
) {
    while let Some(next) = messages.next().await {
        let item = match next {
            Ok(message) => preparer.prepare(message),
            Err(error) => Err(error.to_string()),
        };
        let failed = item.is_err();
        if ahead.send(item).await.is_err() || failed {
            return;
        }
    }
}

impl<P: Projection> Preparer<P> {
    fn prepare(&self, message: Message) -> Result<Pulled, String> {
        let info = message
            .info()
            .map_err(|e| format!("unreadable JetStream metadata: {e}"))?;
        let (position, delivery) = (info.stream_sequence, info.consumer_sequence);
        let seq = if self.sourced {
            header::source_sequence(message.headers.as_ref())
                .ok_or_else(|| format!("a view message without {}", header::STREAM_SOURCE))?
        } else {
            position
        };
        // The id is the subject's last token, in the stream and in a view alike.
        let aggregate_id = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let event_type = header::get(message.headers.as_ref(), header::CE_TYPE)
            .unwrap_or_default()
            .to_owned();
        let mut writes = Err(String::new());
        for _attempt in 0..self.attempts.max(1) {
            writes = self.writes(&message, seq, &aggregate_id, &event_type);
            if writes.is_ok() {
                break;
            }
        }
        Ok(Pulled {
            message,
            seq,
            position,
            delivery,
            aggregate_id,
            event_type,
            writes,
        })
    }

    fn writes(
        &self,
        message: &Message,
        seq: u64,
        aggregate_id: &str,
        event_type: &str,
    ) -> Result<Arc<[Op]>, String> {
        let recorded = decode_recorded::<P::Source>(
            &self.upcasters,
            StoredEvent::read(seq, message),
            aggregate_id,
        )?;
        let trace = TraceContext::from_headers(message.headers.as_ref());
        let span = tracing::debug_span!(
            "apply",
            projection = P::NAME,
            seq,
            event_type,
            id = aggregate_id,
            trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
        );
        if let Some(trace) = &trace {
            crate::telemetry::link(&span, trace);
        }
        let _entered = span.enter();
        let mut writes = RedisWrites::default();
        self.projection
            .apply(&recorded, &mut writes)
            .map_err(|refusal| format!("refused: {}", refusal.0))?;
        let ops = writes
            .into_ops()
            .map_err(|refusal| format!("refused by the read model: {refusal}"))?;
        tracing::debug!(writes = ops.len(), "event projected");
        Ok(ops.into())
    }
}

/// Decodes a stored event of aggregate `A` for a consumer (a projection, a process manager):
/// the wire's decoding of the stored message (`stored`), then the version check, upcasting and
/// the event type's own decoding.
pub(crate) fn decode_recorded<A: Aggregate>(
    upcasters: &Upcasters,
    stored: Result<StoredEvent, MalformedEvent>,
    aggregate_id: &str,
) -> Result<Recorded<A::Event>, String> {
    let stored = stored.map_err(|e| e.reason)?;
    let seq = stored.seq;
    let event = decode_stored::<A>(
        upcasters,
        &stored.event_type,
        stored.version,
        &stored.payload,
    )?;
    Ok(Recorded {
        seq,
        aggregate_id: aggregate_id.to_owned(),
        event_type: stored.event_type,
        version: stored.version,
        time: stored.time,
        command_id: stored.command_id,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_fnv1a_of_the_aggregate_id() {
        // FNV-1a 32 of "a" is 0xe40c292c.
        assert_eq!(partition_of("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_of("anything", 1), 0);
        let spread: std::collections::BTreeSet<u32> = (0..100)
            .map(|n| partition_of(&format!("acc-{n}"), 4))
            .collect();
        assert_eq!(spread.len(), 4);
    }

    #[test]
    fn build_consumers_carry_the_version_and_live_ones_do_not() {
        assert_eq!(
            names::projection_consumer("account-balances", 2, 3),
            "account-balances-g2-p3"
        );
        assert_eq!(
            names::live_projection_consumer("account-balances", 3),
            "account-balances-p3"
        );
    }
}

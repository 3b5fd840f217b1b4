//! Atomic decisions across aggregates: one command, several aggregates, one atomic append.
//!
//! Write the rule as a [`Decision`]: from a command, name the aggregates it needs; from their
//! current states, decide the events of each, or reject. The runtime
//! ([`crate::decision_function`]) loads every named aggregate (state cache, then snapshot and
//! events), decides, and appends all the events in **one** ADR-50 atomic batch in which each
//! aggregate's first message carries that aggregate's literal
//! `Nats-Expected-Last-Subject-Sequence`: the events are stored all together or not at all, and
//! only if none of the aggregates changed since it was read.
//!
//! ```
//! use jetfn::decision::{Decision, Events, States};
//! use jetfn::{Aggregate, Rejection};
//! # #[derive(Default)] struct Counter { value: u64 }
//! # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
//! # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! # enum Event { Added { by: u64 }, Removed { by: u64 } }
//! # impl Aggregate for Counter {
//! #     const NAME: &'static str = "counter";
//! #     type Command = Command; type Event = Event;
//! #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
//! #     fn evolve(self, e: &Event) -> Self { match e {
//! #         Event::Added { by } => Counter { value: self.value + by },
//! #         Event::Removed { by } => Counter { value: self.value - by },
//! #     } }
//! # }
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! #[serde(rename_all = "snake_case")]
//! enum MoveCommand { Move { from: String, to: String, by: u64 } }
//!
//! struct Move;
//! impl Decision for Move {
//!     const NAME: &'static str = "mover";
//!     type Aggregate = Counter;
//!     type Command = MoveCommand;
//!     fn aggregates(MoveCommand::Move { from, to, .. }: &MoveCommand) -> Vec<String> {
//!         vec![from.clone(), to.clone()]
//!     }
//!     fn decide(
//!         states: &States<'_, Counter>,
//!         MoveCommand::Move { from, to, by }: MoveCommand,
//!     ) -> Result<Events<Counter>, Rejection> {
//!         if states.get(&from).map_or(0, |c| c.value) < by {
//!             return Err("not enough to move".into());
//!         }
//!         Ok(Events::new()
//!             .with(from, [Event::Removed { by }])
//!             .with(to, [Event::Added { by }]))
//!     }
//! }
//! ```

use crate::aggregate::{Aggregate, Rejection};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

/// The most messages one atomic batch may hold (nats-server's default `max_batch_size`): a
/// decision that writes more events is `invalid`.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// A rule that spans aggregates of one type, decided atomically. Pure: no I/O.
///
/// Served on `cmd.<NAME>.<id>.<command>`, where `<id>` names the decision (a transfer id, say)
/// and keys its idempotency ledger. All aggregates of a decision are of type
/// [`Decision::Aggregate`] and so live in that aggregate type's one stream: atomic batches are
/// single-stream.
pub trait Decision: Send + Sync + 'static {
    /// The decision's name: the `<name>` token of its command subjects, `[a-z0-9_-]+`. It must
    /// differ from the aggregate type's name, whose command function owns `cmd.<aggregate>.>`.
    const NAME: &'static str;

    /// The aggregate type whose instances the decision reads and writes.
    type Aggregate: Aggregate;

    /// What clients ask for: an enum, one variant per command, as for an aggregate.
    type Command: DeserializeOwned + JsonSchema + Send;

    /// The ids of the aggregates the command needs. Repeated ids count once.
    fn aggregates(command: &Self::Command) -> Vec<String>;

    /// Decides the events of each aggregate from their current states, or rejects the command.
    /// Writing to an aggregate that [`Decision::aggregates`] did not name is `invalid`.
    fn decide(
        states: &States<'_, Self::Aggregate>,
        command: Self::Command,
    ) -> Result<Events<Self::Aggregate>, Rejection>;
}

/// The current states of the aggregates a decision named.
#[derive(Debug)]
pub struct States<'a, A> {
    entries: Vec<(&'a str, &'a A)>,
}

impl<'a, A> States<'a, A> {
    /// States from `(id, state)` pairs.
    pub fn new(entries: Vec<(&'a str, &'a A)>) -> Self {
        States { entries }
    }

    /// The state of aggregate `id`, `None` when the decision did not name it. An aggregate with
    /// no events has the default state.
    pub fn get(&self, id: &str) -> Option<&'a A> {
        self.entries
            .iter()
            .find(|(named, _)| *named == id)
            .map(|(_, state)| *state)
    }
}

/// What a decision writes: events per aggregate, each aggregate's in order.
#[derive(Debug)]
pub struct Events<A: Aggregate> {
    by_aggregate: Vec<(String, Vec<A::Event>)>,
}

impl<A: Aggregate> Default for Events<A> {
    fn default() -> Self {
        Events {
            by_aggregate: Vec::new(),
        }
    }
}

impl<A: Aggregate> Events<A> {
    /// No events yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds events for aggregate `id`, after any already added for it.
    pub fn with(
        mut self,
        id: impl Into<String>,
        events: impl IntoIterator<Item = A::Event>,
    ) -> Self {
        let id = id.into();
        let events = events.into_iter();
        match self.by_aggregate.iter_mut().find(|(named, _)| *named == id) {
            Some((_, list)) => list.extend(events),
            None => self.by_aggregate.push((id, events.collect())),
        }
        self
    }

    /// The number of events over all aggregates.
    pub fn len(&self) -> usize {
        self.by_aggregate.iter().map(|(_, e)| e.len()).sum()
    }

    /// Whether no aggregate gets an event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events of aggregate `id`, in order (empty when it gets none).
    pub fn of(&self, id: &str) -> &[A::Event] {
        self.by_aggregate
            .iter()
            .find(|(named, _)| named == id)
            .map_or(&[], |(_, events)| events.as_slice())
    }

    /// Each aggregate with its events, in the order they were first added; aggregates with no
    /// events left out.
    pub fn into_parts(self) -> Vec<(String, Vec<A::Event>)> {
        self.by_aggregate
            .into_iter()
            .filter(|(_, events)| !events.is_empty())
            .collect()
    }
}

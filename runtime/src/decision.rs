//! Atomic decisions across aggregates: one command, several aggregates, one atomic append.
//!
//! Write the rule as a [`Decision`]: from a command, name the aggregates it needs; from their
//! current states, decide the events of each, or reject. The aggregates are of one type, or of
//! several types that share one stream (a tuple of types, see [`Aggregates`]). The runtime
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
use std::any::Any;
use std::fmt;
use std::marker::PhantomData;

/// The most messages one atomic batch may hold (nats-server's default `max_batch_size`): a
/// decision that writes more events is `invalid`.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// A rule that spans aggregates, decided atomically. Pure: no I/O.
///
/// Served on `cmd.<NAME>.<id>.<command>`, where `<id>` names the decision (a transfer id, say)
/// and keys its idempotency ledger. The aggregates are of type [`Decision::Aggregate`], or of
/// the types of a tuple (`(User, Username)`) whose events share one stream: atomic batches are
/// single-stream.
pub trait Decision: Send + Sync + 'static {
    /// The decision's name: the `<name>` token of its command subjects, `[a-z0-9_-]+`. It must
    /// differ from its aggregate types' names, whose command functions own `cmd.<aggregate>.>`.
    const NAME: &'static str;

    /// The aggregate type whose instances the decision reads and writes, or a tuple of up to
    /// four types stored in one stream.
    type Aggregate: Aggregates;

    /// What clients ask for: an enum, one variant per command, as for an aggregate.
    type Command: DeserializeOwned + JsonSchema + Send;

    /// The aggregates the command needs: their ids for one type; `(type name, id)` pairs for a
    /// tuple of types (`(User::NAME, id)`). Repeated ones count once.
    fn aggregates(command: &Self::Command) -> Vec<<Self::Aggregate as Aggregates>::Key>;

    /// Decides the events of each aggregate from their current states, or rejects the command.
    /// Writing to an aggregate that [`Decision::aggregates`] did not name is `invalid`.
    fn decide(
        states: &States<'_, Self::Aggregate>,
        command: Self::Command,
    ) -> Result<Events<Self::Aggregate>, Rejection>;
}

mod sealed {
    /// Only jetfn implements [`super::Aggregates`].
    pub trait Sealed {}

    /// Visits each aggregate type of a set.
    pub trait Visit {
        /// Called once per type, in the set's order.
        fn visit<A: crate::Aggregate>(&mut self);
    }
}

pub(crate) use sealed::Visit;

/// The aggregate types of a decision: one type `A`, or a tuple `(A, B)`, `(A, B, C)`,
/// `(A, B, C, D)` of distinct types whose events share one stream.
pub trait Aggregates: sealed::Sealed + Send + Sync + 'static {
    /// How a decision names one aggregate: its id (`String`) for one type, `(type name, id)`
    /// for a tuple.
    type Key: Send;

    /// The first type, whose command settings the function serves with.
    #[doc(hidden)]
    type First: Aggregate;

    /// The type name and id of a key.
    #[doc(hidden)]
    fn key(key: Self::Key) -> (&'static str, String);

    /// Visits each type in order.
    #[doc(hidden)]
    fn visit<V: Visit>(visitor: &mut V);
}

impl<A: Aggregate> sealed::Sealed for A {}

impl<A: Aggregate> Aggregates for A {
    type Key = String;
    type First = A;

    fn key(id: String) -> (&'static str, String) {
        (A::NAME, id)
    }

    fn visit<V: Visit>(visitor: &mut V) {
        visitor.visit::<A>();
    }
}

/// Marks the position of a type in a decision's tuple of types: see [`Writes`].
#[derive(Debug)]
pub struct At<const N: usize>;

/// The aggregate type of set `Self` whose events are `E`, at position `I` (which the compiler
/// finds): how [`Events::with`] knows the type from the events alone. Two types of one
/// decision with the same event type are ambiguous.
pub trait Writes<E, I>: Aggregates {
    /// The aggregate type whose events are `E`.
    type Target: Aggregate<Event = E>;
}

impl<A: Aggregate> Writes<A::Event, At<0>> for A {
    type Target = A;
}

/// The names of the aggregate types of `S`, in order.
pub(crate) fn type_names<S: Aggregates>() -> Vec<&'static str> {
    struct Names(Vec<&'static str>);
    impl Visit for Names {
        fn visit<A: Aggregate>(&mut self) {
            self.0.push(A::NAME);
        }
    }
    let mut names = Names(Vec::new());
    S::visit(&mut names);
    names.0
}

/// One aggregate's state, its type erased.
pub(crate) struct StateEntry<'a> {
    pub aggregate: &'static str,
    pub id: &'a str,
    pub state: &'a (dyn Any + Send + Sync),
}

/// The current states of the aggregates a decision named.
pub struct States<'a, S> {
    entries: Vec<StateEntry<'a>>,
    _set: PhantomData<fn() -> S>,
}

impl<S> fmt::Debug for States<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (e.aggregate, e.id)))
            .finish()
    }
}

impl<'a, S: Aggregates> States<'a, S> {
    /// States of any of the set's types.
    pub(crate) fn erased(entries: Vec<StateEntry<'a>>) -> Self {
        States {
            entries,
            _set: PhantomData,
        }
    }

    fn find<T: Aggregate>(&self, id: &str) -> Option<&'a T> {
        self.entries
            .iter()
            .find(|e| e.aggregate == T::NAME && e.id == id)
            .and_then(|e| e.state.downcast_ref::<T>())
    }
}

impl<'a, A: Aggregate> States<'a, A> {
    /// States from `(id, state)` pairs.
    pub fn new(entries: Vec<(&'a str, &'a A)>) -> Self {
        let entries = entries
            .into_iter()
            .map(|(id, state)| StateEntry {
                aggregate: A::NAME,
                id,
                state: state as &(dyn Any + Send + Sync),
            })
            .collect();
        Self::erased(entries)
    }

    /// The state of aggregate `id`, `None` when the decision did not name it. An aggregate with
    /// no events has the default state.
    pub fn get(&self, id: &str) -> Option<&'a A> {
        self.find::<A>(id)
    }
}

/// One aggregate's events, their type erased (a `Vec<T::Event>`).
pub(crate) struct EventList {
    pub aggregate: &'static str,
    pub id: String,
    pub len: usize,
    pub events: Box<dyn Any + Send>,
}

/// What a decision writes: events per aggregate, each aggregate's in order.
pub struct Events<S> {
    lists: Vec<EventList>,
    _set: PhantomData<fn() -> S>,
}

impl<S> Default for Events<S> {
    fn default() -> Self {
        Events {
            lists: Vec::new(),
            _set: PhantomData,
        }
    }
}

impl<S> fmt::Debug for Events<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.lists.iter().map(|l| (l.aggregate, &l.id, l.len)))
            .finish()
    }
}

impl<S: Aggregates> Events<S> {
    /// No events yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of events over all aggregates.
    pub fn len(&self) -> usize {
        self.lists.iter().map(|l| l.len).sum()
    }

    /// Whether no aggregate gets an event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds events for aggregate `id`, after any already added for it. The aggregate's type is
    /// the one of the decision's types whose events these are (`S: Writes<E, _>`), so one type
    /// and several read alike: `.with(from, [Event::MoneyWithdrawn { amount }])`.
    pub fn with<E, I>(self, id: impl Into<String>, events: impl IntoIterator<Item = E>) -> Self
    where
        S: Writes<E, I>,
    {
        self.push::<<S as Writes<E, I>>::Target>(id, events)
    }

    /// The aggregates that get events, as `(type name, id)`, in the order first added.
    pub fn aggregates(&self) -> Vec<(&'static str, &str)> {
        self.lists
            .iter()
            .filter(|l| l.len > 0)
            .map(|l| (l.aggregate, l.id.as_str()))
            .collect()
    }

    fn push<T: Aggregate>(
        mut self,
        id: impl Into<String>,
        events: impl IntoIterator<Item = T::Event>,
    ) -> Self {
        let id = id.into();
        let events = events.into_iter();
        let list = self
            .lists
            .iter_mut()
            .find(|l| l.aggregate == T::NAME && l.id == id)
            .and_then(|l| Some((l.events.downcast_mut::<Vec<T::Event>>()?, &mut l.len)));
        match list {
            Some((list, len)) => {
                list.extend(events);
                *len = list.len();
            }
            None => {
                let events: Vec<T::Event> = events.collect();
                self.lists.push(EventList {
                    aggregate: T::NAME,
                    id,
                    len: events.len(),
                    events: Box::new(events),
                });
            }
        }
        self
    }

    fn find<T: Aggregate>(&self, id: &str) -> &[T::Event] {
        self.lists
            .iter()
            .find(|l| l.aggregate == T::NAME && l.id == id)
            .and_then(|l| l.events.downcast_ref::<Vec<T::Event>>())
            .map_or(&[], Vec::as_slice)
    }

    /// Each aggregate's events, aggregates with none left out, in the order first added.
    pub(crate) fn into_lists(self) -> Vec<EventList> {
        self.lists.into_iter().filter(|l| l.len > 0).collect()
    }
}

impl<A: Aggregate> Events<A> {
    /// The events of aggregate `id`, in order (empty when it gets none).
    pub fn of(&self, id: &str) -> &[A::Event] {
        self.find::<A>(id)
    }

    /// Each aggregate with its events, in the order they were first added; aggregates with no
    /// events left out.
    pub fn into_parts(self) -> Vec<(String, Vec<A::Event>)> {
        self.into_lists()
            .into_iter()
            .filter_map(|l| Some((l.id, *l.events.downcast::<Vec<A::Event>>().ok()?)))
            .collect()
    }
}

/// The impls for a tuple of aggregate types.
macro_rules! aggregate_tuple {
    ($($t:ident),+) => {
        impl<First: Aggregate, $($t: Aggregate),+> sealed::Sealed for (First, $($t,)+) {}

        impl<First: Aggregate, $($t: Aggregate),+> Aggregates for (First, $($t,)+) {
            type Key = (&'static str, String);
            type First = First;

            fn key(key: (&'static str, String)) -> (&'static str, String) {
                key
            }

            fn visit<V: Visit>(visitor: &mut V) {
                visitor.visit::<First>();
                $(visitor.visit::<$t>();)+
            }
        }

        impl<'a, First: Aggregate, $($t: Aggregate),+> States<'a, (First, $($t,)+)> {
            /// The state of aggregate `id` of type `T`, `None` when the decision did not name
            /// it. An aggregate with no events has the default state.
            pub fn get<T: Aggregate>(&self, id: &str) -> Option<&'a T> {
                self.find::<T>(id)
            }
        }

        impl<First: Aggregate, $($t: Aggregate),+> Events<(First, $($t,)+)> {
            /// The events of aggregate `id` of type `T`, in order (empty when it gets none).
            pub fn of<T: Aggregate>(&self, id: &str) -> &[T::Event] {
                self.find::<T>(id)
            }
        }
    };
}

aggregate_tuple!(B);
aggregate_tuple!(B, C);
aggregate_tuple!(B, C, D);

/// `Writes` for one position of a tuple of types.
macro_rules! writes {
    ([$($all:ident),+] $t:ident @ $n:literal) => {
        impl<$($all: Aggregate),+> Writes<$t::Event, At<$n>> for ($($all,)+) {
            type Target = $t;
        }
    };
}

writes!([A, B] A @ 0);
writes!([A, B] B @ 1);
writes!([A, B, C] A @ 0);
writes!([A, B, C] B @ 1);
writes!([A, B, C] C @ 2);
writes!([A, B, C, D] A @ 0);
writes!([A, B, C, D] B @ 1);
writes!([A, B, C, D] C @ 2);
writes!([A, B, C, D] D @ 3);

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, PartialEq)]
    struct Left(u32);
    #[derive(Debug, Default, PartialEq)]
    struct Right(u32);
    #[derive(Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    enum LeftEvent {
        L,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    enum RightEvent {
        R,
    }
    #[derive(Deserialize, JsonSchema)]
    enum Never {}

    impl Aggregate for Left {
        const NAME: &'static str = "left";
        type Command = Never;
        type Event = LeftEvent;
        fn decide(&self, command: Never) -> Result<Vec<LeftEvent>, Rejection> {
            match command {}
        }
        fn evolve(self, _: &LeftEvent) -> Self {
            Left(self.0 + 1)
        }
    }

    impl Aggregate for Right {
        const NAME: &'static str = "right";
        type Command = Never;
        type Event = RightEvent;
        fn decide(&self, command: Never) -> Result<Vec<RightEvent>, Rejection> {
            match command {}
        }
        fn evolve(self, _: &RightEvent) -> Self {
            Right(self.0 + 1)
        }
    }

    #[test]
    fn events_find_their_type_from_the_event_type_and_keep_types_with_one_id_apart() {
        let events: Events<(Left, Right)> = Events::new()
            .with("a", [LeftEvent::L])
            .with("a", [RightEvent::R, RightEvent::R])
            .with("a", [LeftEvent::L]);
        assert_eq!(events.len(), 4);
        assert_eq!(events.aggregates(), [("left", "a"), ("right", "a")]);
        assert_eq!(events.of::<Left>("a"), [LeftEvent::L, LeftEvent::L]);
        assert_eq!(events.of::<Right>("a").len(), 2);
        assert!(events.of::<Right>("b").is_empty());
        assert_eq!(type_names::<(Left, Right)>(), ["left", "right"]);
        assert_eq!(
            <(Left, Right)>::key(("right", "a".into())),
            ("right", "a".to_owned())
        );
        assert_eq!(Left::key("a".into()), ("left", "a".to_owned()));
    }

    #[test]
    fn states_answer_by_type_and_id() {
        let (left, right) = (Left(1), Right(2));
        let states: States<'_, (Left, Right)> = States::erased(vec![
            StateEntry {
                aggregate: "left",
                id: "a",
                state: &left,
            },
            StateEntry {
                aggregate: "right",
                id: "a",
                state: &right,
            },
        ]);
        assert_eq!(states.get::<Left>("a"), Some(&Left(1)));
        assert_eq!(states.get::<Right>("a"), Some(&Right(2)));
        assert_eq!(states.get::<Right>("b"), None);
        let one = States::new(vec![("a", &left)]);
        assert_eq!(one.get("a"), Some(&Left(1)));
    }
}

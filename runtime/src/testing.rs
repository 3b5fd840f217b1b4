//! Given/when/then tests of domain rules, without servers.
//!
//! ```
//! # use jetfn::{Aggregate, Rejection};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default)] struct Counter { value: u64 }
//! # #[derive(Deserialize, schemars::JsonSchema)] enum Command { Add { by: u64 } }
//! # #[derive(Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)] enum Event { Added { by: u64 } }
//! # impl Aggregate for Counter {
//! #     const NAME: &'static str = "counter";
//! #     type Command = Command; type Event = Event;
//! #     fn decide(&self, Command::Add { by }: Command) -> Result<Vec<Event>, Rejection> {
//! #         if by == 0 { return Err("adding nothing is not allowed".into()) }
//! #         Ok(vec![Event::Added { by }])
//! #     }
//! #     fn evolve(self, Event::Added { by }: &Event) -> Self { Counter { value: self.value + by } }
//! # }
//! use jetfn::testing::given;
//!
//! given::<Counter>([Event::Added { by: 1 }])
//!     .when(Command::Add { by: 2 })
//!     .then([Event::Added { by: 2 }]);
//!
//! given::<Counter>([])
//!     .when(Command::Add { by: 0 })
//!     .then_rejected("adding nothing");
//! ```

use crate::aggregate::{Aggregate, Rejection, replay};
use crate::decision::{Aggregates, Decision, Events, StateEntry, States, Visit};
use std::any::Any;
use std::fmt::Debug;
use std::marker::PhantomData;

/// Panics unless `outcome` is a rejection whose message contains `fragment`.
#[track_caller]
fn assert_rejected(outcome: Result<impl Debug, Rejection>, fragment: &str) {
    match outcome {
        Ok(events) => panic!("expected a rejection containing {fragment:?}, got {events:?}"),
        Err(rejection) => assert!(
            rejection.message().contains(fragment),
            "expected a rejection containing {fragment:?}, got {:?}",
            rejection.message()
        ),
    }
}

/// Starts a scenario from the events that already happened.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let history: Vec<A::Event> = events.into_iter().collect();
    Given {
        state: replay::<A>(&history),
    }
}

/// The state built from the given events.
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Decides a command in that state.
    pub fn when(self, command: A::Command) -> Then<A> {
        Then {
            outcome: self.state.decide(command),
        }
    }

    /// The state itself, for assertions on it.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// What the command decided.
#[must_use = "a given/when without a `then_*` checks nothing"]
pub struct Then<A: Aggregate> {
    outcome: Result<Vec<A::Event>, Rejection>,
}

impl<A: Aggregate> Then<A>
where
    A::Event: Debug + PartialEq,
{
    /// Asserts the command decided exactly these events, in order.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.outcome {
            Ok(events) => assert_eq!(events, expected, "the command decided other events"),
            Err(rejection) => panic!("expected events {expected:?}, but rejected: {rejection}"),
        }
    }

    /// Asserts the command was rejected with a message containing `fragment`.
    #[track_caller]
    pub fn then_rejected(self, fragment: &str) {
        assert_rejected(self.outcome, fragment);
    }
}

/// Starts a process manager scenario from the instance's own events that already happened.
///
/// ```
/// # use jetfn::process::{Action, Incoming, ProcessManager};
/// # use jetfn::{Aggregate, Recorded, Rejection};
/// # #[derive(Default)] struct Order;
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
/// # #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # enum Event { Placed {} }
/// # impl Aggregate for Order {
/// #     const NAME: &'static str = "order";
/// #     type Command = Command; type Event = Event;
/// #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
/// #     fn evolve(self, _: &Event) -> Self { self }
/// # }
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # enum Seen { Noted {} }
/// # struct Notes;
/// # impl ProcessManager for Notes {
/// #     const NAME: &'static str = "notes";
/// #     type Source = Order; type State = bool; type Event = Seen;
/// #     fn correlate(&self, e: &Recorded<Event>) -> Option<String> { Some(e.aggregate_id.clone()) }
/// #     fn react(&self, noted: &bool, _: &Incoming<Event>) -> Vec<Action<Seen>> {
/// #         if *noted { vec![] } else { vec![Action::record(Seen::Noted {})] }
/// #     }
/// #     fn evolve(&self, _: bool, _: &Seen) -> bool { true }
/// # }
/// use jetfn::testing::given_process;
///
/// let placed = Incoming::Event(Recorded::new(1, "o1", "Placed", Event::Placed {}));
/// given_process(&Notes, []).when(&placed).then([Action::record(Seen::Noted {})]);
/// given_process(&Notes, [Seen::Noted {}]).when(&placed).then([]);
/// ```
pub fn given_process<P: crate::process::ProcessManager>(
    pm: &P,
    events: impl IntoIterator<Item = P::Event>,
) -> GivenProcess<'_, P> {
    let state = events
        .into_iter()
        .fold(P::State::default(), |state, event| pm.evolve(state, &event));
    GivenProcess { pm, state }
}

/// A process manager instance's state built from the given events.
pub struct GivenProcess<'p, P: crate::process::ProcessManager> {
    pm: &'p P,
    state: P::State,
}

type SourceEvent<P> =
    <<P as crate::process::ProcessManager>::Source as crate::aggregate::Aggregate>::Event;

impl<'p, P: crate::process::ProcessManager> GivenProcess<'p, P> {
    /// Reacts to one input in that state.
    pub fn when(self, input: &crate::process::Incoming<SourceEvent<P>>) -> ThenProcess<P> {
        ThenProcess {
            actions: self.pm.react(&self.state, input),
        }
    }

    /// The state itself, for assertions on it.
    pub fn state(&self) -> &P::State {
        &self.state
    }
}

/// What the process manager decided to do.
#[must_use = "a given/when without a `then` checks nothing"]
pub struct ThenProcess<P: crate::process::ProcessManager> {
    actions: Vec<crate::process::Action<P::Event>>,
}

impl<P: crate::process::ProcessManager> ThenProcess<P>
where
    P::Event: Debug + PartialEq,
{
    /// Asserts exactly these actions, in order: events recorded, commands sent, timers.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = crate::process::Action<P::Event>>) {
        let expected: Vec<_> = expected.into_iter().collect();
        assert_eq!(
            self.actions, expected,
            "the process manager reacted otherwise"
        );
    }

    /// The actions, for assertions of their own.
    pub fn actions(self) -> Vec<crate::process::Action<P::Event>> {
        self.actions
    }
}

/// Starts a scenario of an atomic [`Decision`](crate::decision::Decision) from each aggregate's
/// past events; aggregates not listed have no events (the default state).
///
/// ```
/// # use jetfn::{Aggregate, Rejection};
/// # use jetfn::decision::{Decision, Events, States};
/// # #[derive(Default)] struct Counter { value: u64 }
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # enum Event { Added { by: u64 }, Removed { by: u64 } }
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Command = Command; type Event = Event;
/// #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
/// #     fn evolve(self, e: &Event) -> Self { match e {
/// #         Event::Added { by } => Counter { value: self.value + by },
/// #         Event::Removed { by } => Counter { value: self.value - by },
/// #     } }
/// # }
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] struct Move { from: String, to: String }
/// # struct Mover;
/// # impl Decision for Mover {
/// #     const NAME: &'static str = "mover";
/// #     type Aggregate = Counter; type Command = Move;
/// #     fn aggregates(m: &Move) -> Vec<String> { vec![m.from.clone(), m.to.clone()] }
/// #     fn decide(s: &States<'_, Counter>, m: Move) -> Result<Events<Counter>, Rejection> {
/// #         if s.get(&m.from).map_or(0, |c| c.value) == 0 { return Err("nothing to move".into()) }
/// #         Ok(Events::new().with(m.from, [Event::Removed { by: 1 }]).with(m.to, [Event::Added { by: 1 }]))
/// #     }
/// # }
/// use jetfn::testing::given_aggregates;
///
/// given_aggregates::<Mover>([("a", vec![Event::Added { by: 1 }])])
///     .when(Move { from: "a".into(), to: "b".into() })
///     .then([("a", vec![Event::Removed { by: 1 }]), ("b", vec![Event::Added { by: 1 }])]);
/// ```
pub fn given_aggregates<D: Decision>(
    histories: impl IntoIterator<Item = (impl Into<String>, Vec<<D::Aggregate as Aggregate>::Event>)>,
) -> GivenAggregates<D>
where
    D::Aggregate: Aggregate,
{
    histories
        .into_iter()
        .fold(given_decision::<D>(), |given, (id, events)| {
            given.with::<D::Aggregate>(id, events)
        })
}

/// Starts a scenario of a [`Decision`](crate::decision::Decision) over any of its aggregate
/// types, one type at a time with [`GivenAggregates::with`]; aggregates not listed have no
/// events (the default state). For a decision over several types:
///
/// ```
/// # use jetfn::{Aggregate, Rejection};
/// # use jetfn::decision::{Decision, Events, States};
/// # #[derive(Default)] struct Tally { value: u64 }
/// # #[derive(Default)] struct Log { lines: u64 }
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Never {}
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # enum Counted { Added { by: u64 } }
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # enum Logged { Noted { line: String } }
/// # impl Aggregate for Tally {
/// #     const NAME: &'static str = "tally";
/// #     type Command = Never; type Event = Counted;
/// #     fn decide(&self, c: Never) -> Result<Vec<Counted>, Rejection> { match c {} }
/// #     fn evolve(self, Counted::Added { by }: &Counted) -> Self { Tally { value: self.value + by } }
/// # }
/// # impl Aggregate for Log {
/// #     const NAME: &'static str = "log";
/// #     type Command = Never; type Event = Logged;
/// #     fn decide(&self, c: Never) -> Result<Vec<Logged>, Rejection> { match c {} }
/// #     fn evolve(self, _: &Logged) -> Self { Log { lines: self.lines + 1 } }
/// # }
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] struct Add { tally: String, log: String }
/// # struct Noted;
/// # impl Decision for Noted {
/// #     const NAME: &'static str = "noted";
/// #     type Aggregate = (Tally, Log); type Command = Add;
/// #     fn aggregates(a: &Add) -> Vec<(&'static str, String)> {
/// #         vec![(Tally::NAME, a.tally.clone()), (Log::NAME, a.log.clone())]
/// #     }
/// #     fn decide(s: &States<'_, (Tally, Log)>, a: Add) -> Result<Events<(Tally, Log)>, Rejection> {
/// #         let value = s.get::<Tally>(&a.tally).map_or(0, |t| t.value);
/// #         Ok(Events::new()
/// #             .with(a.tally, [Counted::Added { by: 1 }])
/// #             .with(a.log, [Logged::Noted { line: format!("{} + 1", value) }]))
/// #     }
/// # }
/// use jetfn::testing::given_decision;
///
/// let events = given_decision::<Noted>()
///     .with::<Tally>("t", [Counted::Added { by: 2 }])
///     .when(Add { tally: "t".into(), log: "l".into() })
///     .then_events();
/// assert_eq!(events.aggregates(), [("tally", "t"), ("log", "l")]);
/// assert_eq!(events.of::<Log>("l"), [Logged::Noted { line: "2 + 1".into() }]);
/// ```
pub fn given_decision<D: Decision>() -> GivenAggregates<D> {
    GivenAggregates {
        states: Vec::new(),
        _decision: PhantomData,
    }
}

/// A state of any aggregate type.
type AnyState = Box<dyn Any + Send + Sync>;

/// Makes an aggregate type's default state.
type MakeDefault = fn() -> AnyState;

/// The states built from each aggregate's given events.
pub struct GivenAggregates<D: Decision> {
    states: Vec<(&'static str, String, AnyState)>,
    _decision: PhantomData<fn() -> D>,
}

impl<D: Decision> GivenAggregates<D> {
    /// Aggregate `id` of type `T` had these events.
    pub fn with<T: Aggregate>(
        mut self,
        id: impl Into<String>,
        events: impl IntoIterator<Item = T::Event>,
    ) -> Self {
        let events: Vec<T::Event> = events.into_iter().collect();
        self.states
            .push((T::NAME, id.into(), Box::new(replay::<T>(&events))));
        self
    }

    /// Decides a command over the aggregates it names (unlisted ones in the default state).
    pub fn when(self, command: D::Command) -> ThenAggregates<D> {
        struct Defaults(Vec<(&'static str, MakeDefault)>);
        impl Visit for Defaults {
            fn visit<A: Aggregate>(&mut self) {
                self.0.push((A::NAME, || Box::new(A::default())));
            }
        }
        let mut defaults = Defaults(Vec::new());
        D::Aggregate::visit(&mut defaults);
        let missing: Vec<(&'static str, String, AnyState)> = D::aggregates(&command)
            .into_iter()
            .map(D::Aggregate::key)
            .filter(|(t, id)| {
                !self
                    .states
                    .iter()
                    .any(|(k, known, _)| k == t && known == id)
            })
            .filter_map(|(t, id)| {
                let default = defaults.0.iter().find(|(name, _)| *name == t)?.1;
                Some((t, id, default()))
            })
            .collect();
        let entries = self
            .states
            .iter()
            .chain(&missing)
            .map(|(aggregate, id, state)| StateEntry {
                aggregate,
                id,
                state: &**state,
            })
            .collect();
        ThenAggregates {
            outcome: D::decide(&States::erased(entries), command),
        }
    }
}

/// What the decision decided.
#[must_use = "a given/when without a `then_*` checks nothing"]
pub struct ThenAggregates<D: Decision> {
    outcome: Result<Events<D::Aggregate>, Rejection>,
}

impl<D: Decision> ThenAggregates<D> {
    /// Asserts the decision was rejected with a message containing `fragment`.
    #[track_caller]
    pub fn then_rejected(self, fragment: &str) {
        assert_rejected(self.outcome, fragment);
    }

    /// Asserts the decision was accepted and returns what it wrote, for assertions of their
    /// own ([`Events::of`], [`Events::aggregates`]).
    #[track_caller]
    pub fn then_events(self) -> Events<D::Aggregate> {
        match self.outcome {
            Ok(events) => events,
            Err(rejection) => panic!("expected events, but rejected: {rejection}"),
        }
    }
}

impl<D: Decision> ThenAggregates<D>
where
    D::Aggregate: Aggregate,
    <D::Aggregate as Aggregate>::Event: Debug + PartialEq,
{
    /// Asserts the decision wrote exactly these events to exactly these aggregates.
    #[track_caller]
    pub fn then<'a>(
        self,
        expected: impl IntoIterator<Item = (&'a str, Vec<<D::Aggregate as Aggregate>::Event>)>,
    ) {
        let mut expected: Vec<(String, Vec<_>)> = expected
            .into_iter()
            .map(|(id, events)| (id.to_owned(), events))
            .collect();
        match self.outcome {
            Ok(events) => {
                let mut decided = events.into_parts();
                decided.sort_by(|a, b| a.0.cmp(&b.0));
                expected.sort_by(|a, b| a.0.cmp(&b.0));
                assert_eq!(decided, expected, "the decision wrote other events");
            }
            Err(rejection) => panic!("expected events {expected:?}, but rejected: {rejection}"),
        }
    }
}

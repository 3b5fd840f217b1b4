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
use std::fmt::Debug;

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
        match self.outcome {
            Ok(events) => panic!("expected a rejection containing {fragment:?}, got {events:?}"),
            Err(rejection) => assert!(
                rejection.message().contains(fragment),
                "expected a rejection containing {fragment:?}, got {:?}",
                rejection.message()
            ),
        }
    }
}

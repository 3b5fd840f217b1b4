//! The domain model: aggregates decide events from commands and evolve from events.
//!
//! An aggregate is pure code. It never does I/O: the runtime loads its events, calls
//! [`Aggregate::decide`], appends what it returns and replies. That keeps domain rules testable
//! without servers (see [`crate::testing`]).

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// An event-sourced aggregate: a state type with its commands and events.
///
/// * `Command` is an enum deserialized with serde's default (externally tagged) representation.
///   The variant name, as serde sees it, is the `<command>` token of the command subject
///   `cmd.<aggregate>.<id>.<command>`, and the request body holds the variant's fields. Use
///   `#[serde(rename_all = "snake_case", deny_unknown_fields)]` so `deposit` maps to
///   `Deposit { amount }` and unknown fields are refused.
/// * `Event` is an enum too. Its variant name is the stored event type (`ce-type` header) and its
///   fields are the stored JSON payload.
/// * Both derive `schemars::JsonSchema`, so the contract is published as JSON Schema; put the
///   rules there too (`#[schemars(range(min = 1))]`), and in the types' deserialization.
///
/// ```
/// use jetfn::{Aggregate, Rejection};
/// use schemars::JsonSchema;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default)]
/// struct Counter { value: u64 }
///
/// #[derive(Deserialize, JsonSchema)]
/// #[serde(rename_all = "snake_case", deny_unknown_fields)]
/// enum Command { Add { by: u64 } }
///
/// #[derive(Serialize, Deserialize, JsonSchema)]
/// enum Event { Added { by: u64 } }
///
/// impl Aggregate for Counter {
///     const NAME: &'static str = "counter";
///     type Command = Command;
///     type Event = Event;
///
///     fn decide(&self, command: Command) -> Result<Vec<Event>, Rejection> {
///         match command {
///             Command::Add { by: 0 } => Err(Rejection::new("adding nothing is not allowed")),
///             Command::Add { by } => Ok(vec![Event::Added { by }]),
///         }
///     }
///
///     fn evolve(self, event: &Event) -> Self {
///         match event {
///             Event::Added { by } => Counter { value: self.value + by },
///         }
///     }
/// }
/// ```
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The aggregate type's name: the `<aggregate>` token of command and event subjects.
    /// It must match `[a-z0-9_-]+`.
    const NAME: &'static str;

    /// What clients ask for. Deserialized from the subject's command token and the body; its
    /// JSON Schema is published in `schemas/` and in `$SRV.INFO`.
    type Command: DeserializeOwned + JsonSchema + Send;

    /// What happened. Stored one message per event; its JSON Schema is published in `schemas/`.
    type Event: Serialize + DeserializeOwned + JsonSchema + Send + Sync;

    /// Decides which events a command causes in the current state, or rejects it.
    ///
    /// Returning no events is a successful no-op. All events of one call are appended
    /// atomically: either all of them are stored or none.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Rejection>;

    /// Applies one event to the state. It must accept every event that `decide` ever produced,
    /// so it never fails.
    fn evolve(self, event: &Self::Event) -> Self;

    /// The schema version of an event type, stored in the `jetfn-event-version` header so
    /// consumers can route without decoding the payload. Defaults to 1.
    fn event_version(_event_type: &str) -> u32 {
        1
    }
}

/// The domain's refusal of a command: a business rule said no.
///
/// Clients receive it as an error reply of kind `rejected` (code 422) with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    message: String,
}

impl Rejection {
    /// A rejection with a message for the client.
    pub fn new(message: impl Into<String>) -> Self {
        Rejection {
            message: message.into(),
        }
    }

    /// The message the client receives.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

impl From<&str> for Rejection {
    fn from(message: &str) -> Self {
        Rejection::new(message)
    }
}

impl From<String> for Rejection {
    fn from(message: String) -> Self {
        Rejection::new(message)
    }
}

/// Folds events into a state, starting from the default state.
pub fn replay<'a, A: Aggregate>(events: impl IntoIterator<Item = &'a A::Event>) -> A {
    events.into_iter().fold(A::default(), A::evolve)
}

//! Process managers: workflows across aggregates and time, with exactly-once effects.
//!
//! A [`ProcessManager`] is pure code, like an aggregate. It follows the events of one aggregate
//! type, groups them into instances by a correlation id, and reacts to each input (an event, the
//! reply to a command it sent, a timer) with [`Action`]s: record its own events, send commands,
//! set or cancel timers, end. The runtime ([`process_manager_function`]) owns the I/O:
//!
//! 1. It reads the source events through a durable JetStream consumer.
//! 2. Each instance is event-sourced on its own literal subject `pm.<name>.<correlation id>`
//!    (stream `PM_<NAME>`), with the same optimistic concurrency as aggregates. A step's events,
//!    its outgoing commands and its timer changes are one append: one message, or an atomic
//!    batch. So a step either happened completely or not at all.
//! 3. A second durable consumer over that stream is the outbox: it sends each recorded command
//!    with a **deterministic command id** (`pm.<name>.<correlation>.<step>.<n>`), so a
//!    redelivery or a crash at any point sends the same id again and the target's idempotency
//!    answers with the first reply. Accepted and rejected replies are the next step's input;
//!    unavailable or unanswered commands are sent again with the same id, with backoff.
//! 4. Timers are JetStream message schedules in a stream of their own (`PM_<NAME>_TIMERS`); a
//!    fired timer is an input like any other, ignored unless the instance still has that very
//!    timer armed.
//!
//! Inputs of one instance are handled one at a time per process; instances run concurrently.

mod instance;
mod runner;
mod stats;
mod timers;

pub use instance::StepError;
pub use runner::{ProcessManagerFunction, RunningProcessManager, process_manager_function};

use crate::aggregate::Aggregate;
use crate::projection::Recorded;
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// A workflow across aggregates: pure code the runtime drives.
///
/// ```
/// use jetfn::process::{Action, Incoming, ProcessManager};
/// use jetfn::Recorded;
/// # use jetfn::{Aggregate, Rejection};
/// # #[derive(Default)] struct Order;
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
/// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # enum Event { Placed { customer: String } }
/// # impl Aggregate for Order {
/// #     const NAME: &'static str = "order";
/// #     type Command = Command; type Event = Event;
/// #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
/// #     fn evolve(self, _: &Event) -> Self { self }
/// # }
/// use serde_json::json;
///
/// struct Welcome;
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// enum WelcomeEvent { Greeted {} }
///
/// impl ProcessManager for Welcome {
///     const NAME: &'static str = "welcome";
///     type Source = Order;
///     type State = bool;
///     type Event = WelcomeEvent;
///
///     fn correlate(&self, event: &Recorded<Event>) -> Option<String> {
///         Some(event.aggregate_id.clone())
///     }
///     fn react(&self, greeted: &bool, input: &Incoming<Event>) -> Vec<Action<WelcomeEvent>> {
///         match input {
///             Incoming::Event(e) if !greeted => vec![
///                 Action::record(WelcomeEvent::Greeted {}),
///                 Action::send("mail", &e.aggregate_id, "send", json!({"template": "welcome"})),
///             ],
///             Incoming::Reply { .. } => vec![Action::complete()],
///             _ => vec![],
///         }
///     }
///     fn evolve(&self, _: bool, _: &WelcomeEvent) -> bool {
///         true
///     }
/// }
/// ```
pub trait ProcessManager: Send + Sync + 'static {
    /// The name: the `<name>` token of `pm.<name>.<correlation id>`, the service name and the
    /// consumers' prefix. `[a-z0-9-]+`.
    const NAME: &'static str;

    /// The aggregate type whose events start and drive instances.
    type Source: Aggregate;

    /// An instance's state, folded from its own events.
    type State: Default + Send + Sync;

    /// What happened to an instance: its own events, stored on `pm.<name>.<correlation id>`.
    type Event: Serialize + DeserializeOwned + JsonSchema + Send + Sync;

    /// The instance a source event concerns, or `None` to ignore the event. The id must match
    /// `[A-Za-z0-9_-]{1,128}`.
    fn correlate(&self, event: &Recorded<<Self::Source as Aggregate>::Event>) -> Option<String>;

    /// What to do about one input in the instance's current state. Pure: no I/O, no clock.
    fn react(
        &self,
        state: &Self::State,
        input: &Incoming<<Self::Source as Aggregate>::Event>,
    ) -> Vec<Action<Self::Event>>;

    /// Applies one of the instance's own events to its state.
    fn evolve(&self, state: Self::State, event: &Self::Event) -> Self::State;
}

/// An input of a process manager instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming<E> {
    /// A source event that [`ProcessManager::correlate`] assigned to the instance.
    Event(Recorded<E>),
    /// The final reply to a command the instance sent.
    Reply {
        /// The command it answers.
        sent: Sent,
        /// What the target function said.
        outcome: Outcome,
    },
    /// A timer the instance set, still armed, came due.
    Timer {
        /// The timer's name.
        name: String,
    },
}

/// A command an instance sent, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sent {
    /// The label the process manager gave it (defaults to the command name).
    pub label: String,
    /// The target aggregate type.
    pub aggregate: String,
    /// The target aggregate id.
    pub id: String,
    /// The command name.
    pub command: String,
    /// The command body.
    pub body: Value,
    /// The deterministic command id it is sent with.
    pub command_id: String,
}

/// The final answer to a sent command. `unavailable` and `conflict` are never final: the runtime
/// sends the command again with the same id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The command was applied.
    Accepted {
        /// The stream sequence the target reported (a consistency token).
        seq: u64,
    },
    /// The command was refused by the domain, or was invalid.
    Rejected {
        /// The target's message.
        message: String,
        /// The rejection code, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The workflow reached its goal.
    Completed,
    /// The workflow failed and undid what it had done.
    Compensated,
}

/// A command to send, with a label to recognise its reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The label (defaults to the command name).
    pub label: String,
    /// The target aggregate type.
    pub aggregate: String,
    /// The target aggregate id.
    pub id: String,
    /// The command name.
    pub command: String,
    /// The command body.
    pub body: Value,
}

/// What a process manager wants done in one step. Everything a step returns is stored in one
/// atomic write before any of it takes effect.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<E> {
    /// Record one of the instance's own events (and evolve the state with it).
    Record(E),
    /// Send a command; its final reply comes back as [`Incoming::Reply`].
    Send(Outgoing),
    /// Arm timer `name` to fire `after` from now, replacing an armed timer of that name.
    SetTimer {
        /// `[A-Za-z0-9_-]+`.
        name: String,
        /// From now.
        after: Duration,
    },
    /// Disarm timer `name` (nothing if it is not armed).
    CancelTimer {
        /// The timer's name.
        name: String,
    },
    /// End the instance: later inputs are ignored and its armed timers are cancelled.
    End(Ending),
}

impl<E> Action<E> {
    /// Records `event`.
    pub fn record(event: E) -> Self {
        Action::Record(event)
    }

    /// Sends `command` with `body` to aggregate `id` of type `aggregate`, labelled with the
    /// command name.
    pub fn send(aggregate: &str, id: &str, command: &str, body: Value) -> Self {
        Action::Send(Outgoing {
            label: command.to_owned(),
            aggregate: aggregate.to_owned(),
            id: id.to_owned(),
            command: command.to_owned(),
            body,
        })
    }

    /// The same action with label `label`, if it is a [`Action::Send`]: the reply's
    /// [`Sent::label`] tells two commands of the same name apart.
    pub fn labelled(self, label: &str) -> Self {
        match self {
            Action::Send(outgoing) => Action::Send(Outgoing {
                label: label.to_owned(),
                ..outgoing
            }),
            other => other,
        }
    }

    /// Arms timer `name` to fire `after` from now.
    pub fn timer(name: &str, after: Duration) -> Self {
        Action::SetTimer {
            name: name.to_owned(),
            after,
        }
    }

    /// Disarms timer `name`.
    pub fn cancel_timer(name: &str) -> Self {
        Action::CancelTimer {
            name: name.to_owned(),
        }
    }

    /// Ends the instance as completed.
    pub fn complete() -> Self {
        Action::End(Ending::Completed)
    }

    /// Ends the instance as compensated (failed and undone).
    pub fn compensated() -> Self {
        Action::End(Ending::Compensated)
    }
}

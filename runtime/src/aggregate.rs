//! The domain model: aggregates decide events from commands and evolve from events.
//!
//! An aggregate is pure code. It never does I/O: the runtime loads its events, calls
//! [`Aggregate::decide`], appends what it returns and replies. That keeps domain rules testable
//! without servers (see [`crate::testing`]).

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
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
    type Event: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static;

    /// Decides which events a command causes in the current state, or rejects it.
    ///
    /// Returning no events is a successful no-op. All events of one call are appended
    /// atomically: either all of them are stored or none.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Rejection>;

    /// Applies one event to the state. It must accept every event that `decide` ever produced,
    /// so it never fails.
    fn evolve(self, event: &Self::Event) -> Self;

    /// The current schema version of an event type, stored in the `jetfn-event-version` header
    /// so consumers can route without decoding the payload. Defaults to 1. Raise it when an
    /// event's shape changes, and register an upcaster from the old version.
    fn event_version(_event_type: &str) -> u32 {
        1
    }

    /// Upcasters that turn stored payloads of older event versions into the current shape, on
    /// load and in projections. Called once per function start.
    fn upcasters() -> Upcasters {
        Upcasters::default()
    }

    /// Opts in to snapshots of the state, e.g. `Some(Snapshots::serde(1))` for a state that
    /// derives `Serialize` and `Deserialize`. A cold load then reads the latest snapshot and
    /// only the events after it. Raise the version whenever `evolve` or the state's shape
    /// changes: snapshots of another version are ignored. Defaults to none.
    fn snapshots() -> Option<Snapshots<Self>> {
        None
    }
}

/// How an aggregate's state is written to and read from a snapshot. See
/// [`Aggregate::snapshots`].
pub struct Snapshots<A> {
    version: u32,
    encode: fn(&A) -> Result<Value, String>,
    decode: fn(Value) -> Result<A, String>,
}

impl<A> fmt::Debug for Snapshots<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshots")
            .field("version", &self.version)
            .finish()
    }
}

impl<A: Serialize + DeserializeOwned> Snapshots<A> {
    /// Snapshots as the state's serde JSON, tagged with `version`.
    pub fn serde(version: u32) -> Self {
        Snapshots {
            version,
            encode: |state| serde_json::to_value(state).map_err(|e| e.to_string()),
            decode: |value| serde_json::from_value(value).map_err(|e| e.to_string()),
        }
    }
}

impl<A> Snapshots<A> {
    /// The snapshot version.
    pub fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn encode(&self, state: &A) -> Result<Value, String> {
        (self.encode)(state)
    }

    pub(crate) fn decode(&self, value: Value) -> Result<A, String> {
        (self.decode)(value)
    }
}

type Upcast = Box<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// Upcasters by (event type, from version): each turns a payload of version `v` into `v + 1`.
///
/// ```
/// use jetfn::aggregate::Upcasters;
/// use serde_json::json;
///
/// // MoneyDeposited v1 was {"cents": n}; v2 is {"amount": n, "currency": "EUR"}.
/// let upcasters = Upcasters::default().add("MoneyDeposited", 1, |v1| {
///     let cents = v1["cents"].as_u64().ok_or("cents is missing")?;
///     Ok(json!({"amount": cents, "currency": "EUR"}))
/// });
/// let v2 = upcasters.upcast("MoneyDeposited", 1, 2, json!({"cents": 5})).unwrap();
/// assert_eq!(v2, json!({"amount": 5, "currency": "EUR"}));
/// ```
#[derive(Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Upcast>,
}

impl Upcasters {
    /// Registers the step from `from_version` to `from_version + 1` of `event_type`.
    pub fn add(
        mut self,
        event_type: &str,
        from_version: u32,
        upcast: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps
            .insert((event_type.to_owned(), from_version), Box::new(upcast));
        self
    }

    /// Brings a payload from `version` to `current`, one registered step at a time.
    pub fn upcast(
        &self,
        event_type: &str,
        mut version: u32,
        current: u32,
        mut payload: Value,
    ) -> Result<Value, String> {
        while version < current {
            let step = self
                .steps
                .get(&(event_type.to_owned(), version))
                .ok_or_else(|| {
                    format!(
                        "no upcaster registered for {event_type} from version {version} to {}",
                        version + 1
                    )
                })?;
            payload = step(payload)
                .map_err(|e| format!("upcasting {event_type} from version {version}: {e}"))?;
            version += 1;
        }
        Ok(payload)
    }
}

impl Upcasters {
    /// The registered steps, sorted: part of what a snapshot must agree with.
    pub(crate) fn steps(&self) -> Vec<(String, u32)> {
        let mut steps: Vec<_> = self.steps.keys().cloned().collect();
        steps.sort();
        steps
    }
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<_> = self.steps.keys().collect();
        steps.sort();
        f.debug_struct("Upcasters").field("steps", &steps).finish()
    }
}

/// Decodes a stored event of aggregate `A`: checks its version, upcasts older payloads, and
/// builds the event. Errors say what is wrong, for replies and dead letters.
pub(crate) fn decode_stored<A: Aggregate>(
    upcasters: &Upcasters,
    event_type: &str,
    version: u32,
    payload: &[u8],
) -> Result<A::Event, String> {
    let current = A::event_version(event_type);
    if version > current {
        return Err(format!(
            "{event_type} has schema version {version}, newer than this code knows ({current}); \
             deploy the newer function"
        ));
    }
    let fields: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let fields = upcasters.upcast(event_type, version, current, fields)?;
    crate::codec::decode_variant(event_type, fields).map_err(|e| format!("{event_type}: {e}"))
}

/// The domain's refusal of a command: a business rule said no.
///
/// Clients receive it as an error reply of kind `rejected` (code 422) with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    message: String,
    code: Option<String>,
}

impl Rejection {
    /// A rejection with a message for the client.
    pub fn new(message: impl Into<String>) -> Self {
        Rejection {
            message: message.into(),
            code: None,
        }
    }

    /// Adds a machine-readable code (for example `insufficient_funds`), sent as `error.code`
    /// so clients can branch on it without parsing the message.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The message the client receives.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The machine-readable code, if any.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
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

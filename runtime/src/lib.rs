//! # jetfn
//!
//! Event-sourced, CQRS systems as small functions on NATS JetStream.
//!
//! A **command function** takes commands as NATS requests on `cmd.<aggregate>.<id>.<command>`,
//! loads the aggregate's events from a JetStream stream, lets pure domain code decide new events,
//! appends them with optimistic concurrency, and replies. Write the domain as an [`Aggregate`];
//! the runtime does the rest:
//!
//! ```no_run
//! # use jetfn::{Aggregate, Rejection};
//! # #[derive(Default)] struct Account;
//! # #[derive(serde::Deserialize, schemars::JsonSchema)] enum Command {}
//! # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)] enum Event {}
//! # impl Aggregate for Account {
//! #     const NAME: &'static str = "account";
//! #     type Command = Command; type Event = Event;
//! #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { match c {} }
//! #     fn evolve(self, e: &Event) -> Self { match *e {} }
//! # }
//! #[tokio::main]
//! async fn main() -> Result<(), jetfn::Error> {
//!     jetfn::command_function::<Account>().run().await
//! }
//! ```
//!
//! Modules, one concept each:
//! * [`aggregate`]: the domain model ([`Aggregate`], [`Rejection`]);
//! * [`command`]: command functions, the reply contract and retries;
//! * [`decision`]: atomic decisions across aggregates, appended in one atomic batch;
//! * [`client`]: a typed client that sends commands with idempotency keys and retries;
//! * [`store`]: the JetStream event store (load by direct get, append with OCC);
//! * [`projection`]: projection functions, exactly-once into Redis, rebuilds, dead letters;
//! * [`process`]: process managers, workflows across aggregates with exactly-once effects and
//!   durable timers;
//! * [`readmodel`]: the Redis key layout, the atomic apply step and read-your-writes;
//! * [`schema`]: JSON Schemas of commands, events and replies, generated from the types;
//! * [`config`]: configuration from `jetfn.toml` and the environment;
//! * [`telemetry`]: logging and signals;
//! * [`testing`]: given/when/then for domain rules, without servers.

mod affinity;
pub mod aggregate;
pub mod client;
mod codec;
pub mod command;
pub mod config;
pub mod decision;
mod direct;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod permissions;
pub mod process;
pub mod projection;
pub mod readmodel;
mod running;
pub mod schema;
mod service;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod wire;

/// With feature `mimalloc` (a default), every binary built on jetfn allocates with mimalloc:
/// about a quarter less CPU per command than glibc's malloc (see `runtime/Cargo.toml`). Fuzz
/// builds keep the system allocator, which the sanitizers watch.
#[cfg(all(feature = "mimalloc", not(fuzzing)))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use aggregate::{Aggregate, Rejection};
pub use command::decision::decision_function;
pub use command::{Reply, command_function};
pub use config::Config;
pub use decision::Decision;
pub use process::{Action, Incoming, ProcessManager, process_manager_function};
pub use projection::{Projection, Recorded, Refusal, projection_function};
pub use readmodel::RedisWrites;

/// Why a function could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// NATS could not be reached or refused the credentials.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The configured URL, without credentials.
        url: String,
        /// Why.
        reason: String,
    },
    /// The event store is unusable (server too old, stream incompatible, JetStream down).
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Registering or running the NATS service failed.
    #[error("{0}")]
    Service(String),
    /// `Aggregate::NAME` or `Projection::NAME` is not a valid name.
    #[error(transparent)]
    Name(#[from] wire::NameError),
    /// Redis is unusable, or the read model refused to go on.
    #[error("redis: {0}")]
    Redis(#[from] readmodel::ReadModelError),
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
}

//! # jetfn-devtools
//!
//! Private servers for development and tests, shared by `jetfn dev` and the test harness: one
//! way to find, start, probe and stop them.
//!
//! - [`nats_server_binary`] and [`redis_server_binary`] find the servers (a `nats-server` recent
//!   enough for jetfn, any `redis-server`), with install hints when there is none.
//! - [`NatsServer`]: a `nats-server` with JetStream on a free loopback port, its store in a
//!   directory of its own (a temporary one unless [`Builder::dir`] names one);
//!   [`NatsServer::restart`] keeps the data and the port.
//! - [`RedisServer`]: a `redis-server` on a free loopback port that keeps nothing on disk
//!   (unless [`Builder::persistent`]); [`RedisServer::restart_empty`] simulates losing the
//!   cache.
//! - [`NatsCluster`]: several of them at once, a JetStream cluster on loopback;
//!   [`rewrite_ports`] runs the configurations of `deploy/nats/` on free ports.
//! - [`process`]: log files, signals and bounded waits on child processes.
//!
//! A server is ready when a real client reaches *this* server (by name or process id) and it
//! answers (JetStream account info, `PING`). Dropping a server kills it and waits for it, also
//! when a test panics (then the tail of its log is printed to stderr).
//!
//! ```no_run
//! # async fn demo() -> Result<(), jetfn_devtools::Error> {
//! let nats = jetfn_devtools::NatsServer::start().await?;
//! let client = nats.connect().await?;
//! # Ok(()) }
//! ```

mod cluster;
mod discover;
pub mod process;
mod server;

pub use cluster::{NatsCluster, free_ports, rewrite_ports};
pub use discover::{
    MIN_NATS_SERVER_VERSION, NATS_SERVER_PIP_REQUIREMENT, Version, is_executable_file,
    nats_server_binary, redis_server_binary,
};
pub use server::{Builder, Flavor, Nats, NatsServer, Redis, RedisServer, Server};

/// Why a server could not be found, started, stopped or reached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No usable server binary; the message says what was found and how to install one.
    #[error("{0}")]
    NotFound(String),
    /// A file, directory or process operation failed.
    #[error("{what}: {reason}")]
    Io {
        /// What was being done, e.g. `creating /tmp/x`.
        what: String,
        /// The operating system's error.
        reason: String,
    },
    /// The server exited during start-up or was not ready in time; the message ends with the
    /// tail of its log.
    #[error("{0}")]
    Start(String),
    /// A client could not connect to a running server.
    #[error("{0}")]
    Connect(String),
}

impl Error {
    /// An [`Error::Io`] for `what`.
    pub(crate) fn io(what: impl Into<String>, error: impl std::fmt::Display) -> Error {
        Error::Io {
            what: what.into(),
            reason: error.to_string(),
        }
    }
}

/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

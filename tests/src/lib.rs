//! Test harness for jetfn: real, private servers and real processes, no mocks.
//!
//! - [`NatsServer`]: a `nats-server` (>= 2.12, JetStream on) on a free
//!   loopback port with a temporary store; [`NatsServer::restart`] keeps the
//!   data.
//! - [`RedisServer`]: a `redis-server` on a free loopback port that keeps
//!   nothing; [`RedisServer::restart_empty`] simulates losing the cache, and
//!   [`RedisServer::builder`]`.persistent()` keeps an AOF across restarts.
//! - [`FunctionProcess`]: a built workspace binary (e.g. `account`) as a child
//!   process, with SIGTERM / SIGKILL / bounded waits and its log.
//! - [`latency::SlowLink`]: a relay that delays what a server sends, as a distant
//!   server would.
//!
//! The servers come from [`jetfn_devtools`], the launcher `jetfn dev` uses too.
//! Everything is cleaned up on drop, also when a test panics; the log tail of
//! each server or process is then printed to stderr. The binaries are found
//! by [`nats_server_binary`], [`redis_server_binary`] and [`binary_path`];
//! `./just test` installs missing servers and builds the workspace first.
//!
//! ```no_run
//! use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! jetfn_tests::init_tracing();
//! let nats = NatsServer::start().await?;
//! let redis = RedisServer::start().await?;
//! let account = FunctionProcess::spawn(
//!     "account",
//!     &[("NATS_URL", nats.url()), ("REDIS_URL", redis.url())],
//! )?;
//! # Ok(()) }
//! ```

mod binaries;
pub mod commands;
pub mod faults;
pub mod latency;
mod process;
pub mod raw;
pub mod readmodels;
pub mod schemas;
pub mod topology;
pub mod workload;

pub use binaries::binary_path;
pub use jetfn_devtools::{
    MIN_NATS_SERVER_VERSION, NATS_SERVER_PIP_REQUIREMENT, NatsCluster, NatsServer, RedisServer,
    Version, free_ports, nats_server_binary, redis_server_binary, rewrite_ports,
};
pub use process::FunctionProcess;

/// Installs a `tracing` subscriber for tests, once per process (later calls
/// do nothing): output goes through the test writer (captured per test), and
/// the filter comes from `RUST_LOG`, defaulting to `warn`.
pub fn init_tracing() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Another subscriber may already be installed; that one then wins.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

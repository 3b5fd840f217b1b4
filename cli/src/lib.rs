//! The `jetfn` command-line tool: send commands, follow events, see what runs, handle dead
//! letters, rebuild projections and deploy JetStream resources.
//!
//! One module per subcommand; `common` holds the connection, errors and output helpers. The
//! binary (`src/main.rs`) only calls [`main`]; the library exists so that the integration tests
//! use the CLI's own code (for example [`deploy::files`]) instead of copies.

mod common;
pub mod deploy;
mod dev;
mod dlq;
mod projection;
mod send;
mod status;
mod tail;

use clap::{Parser, Subcommand};
pub use common::Global;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  jetfn send account.alice.open '{\"owner\":\"Alice\",\"initial_deposit\":100}'
  jetfn tail account --all
  jetfn status
  jetfn dlq list account-balances
  jetfn projection rebuild account-balances
  jetfn deploy diff --dir deploy/jetstream
  jetfn dev                      # private NATS + Redis and the functions, until Ctrl-C

The server is --server, else $NATS_URL, else nats.url of the jetfn configuration
(jetfn.toml or $JETFN_CONFIG, JETFN_NATS__URL), else the server of a running `just dev`
(.jetfn/nats.url), else nats://127.0.0.1:4222.";

/// Command-line tool for jetfn functions on NATS JetStream.
#[derive(Parser)]
#[command(name = "jetfn", version, after_help = EXAMPLES, propagate_version = true)]
struct Cli {
    /// NATS server URL (comma-separated for several)
    #[arg(
        short = 's',
        long,
        env = "NATS_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    server: Option<String>,

    /// Print machine-readable JSON instead of text (tail, status, dlq, projection, deploy)
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send a command to a command function and print its reply
    Send(send::Args),
    /// Follow an aggregate type's events live
    Tail(tail::Args),
    /// Show running functions, streams and projections
    Status(status::Args),
    /// List or replay a projection's dead letters
    Dlq(dlq::Args),
    /// Operate projections (rebuild)
    Projection(projection::Args),
    /// Compare or apply declarative JetStream resources (streams, KV buckets, consumers)
    Deploy(deploy::Args),
    /// Run a local development environment: NATS, Redis and the functions, until Ctrl-C
    Dev(dev::Args),
}

/// Parses the command line and runs the subcommand; the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let global = Global {
        server: cli.server,
        json: cli.json,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("jetfn: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    // `send` reserves 1 for error replies: anything else that goes wrong there is a 2.
    let failure_code = match cli.command {
        Command::Send(_) => 2,
        _ => 1,
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Send(args) => send::run(&global, args).await,
            Command::Tail(args) => tail::run(&global, args).await,
            Command::Status(args) => status::run(&global, args).await,
            Command::Dlq(args) => dlq::run(&global, args).await,
            Command::Projection(args) => projection::run(&global, args).await,
            Command::Deploy(args) => deploy::run(&global, args).await,
            Command::Dev(args) => dev::run(&global, args).await,
        }
    });
    // Do not wait for lingering tasks (a NATS connection's reader) at exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("jetfn: {err:#}");
            ExitCode::from(common::exit_code(&err, failure_code))
        }
    }
}

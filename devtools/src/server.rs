//! The one launcher: a private `nats-server` (JetStream on) or `redis-server` on a free
//! loopback port, its state in a directory of its own, started until a real client reaches it,
//! stopped politely or killed, restarted on the same port with its data.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use tempfile::TempDir;

use crate::process::{
    Owned, POLL, free_port, kill_and_reap, log_note, log_stdio, log_tail, read_log,
    report_log_if_panicking, stop_gracefully, try_wait,
};
use crate::{Error, Result};

/// How long a server may take to become ready. A cluster node is ready once its JetStream has a
/// meta leader, and on a loaded 2-core machine (the full test suite in parallel) that election
/// was seen to take 8 s after the routes were up: 10 s failed a start that was only slow.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many times a start is tried before giving up (on a fresh port each time for a first
/// start, on the same port for a restart).
const START_ATTEMPTS: u32 = 3;
/// How long a polite stop (SIGTERM) may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long one command on a [`RedisServer::connect`] connection may take. Tests read whole
/// change feeds with it while the full suite runs in parallel: a read that takes a second there
/// is slow, not wrong, and a test that gave up on it would fail for no fault of the code.
const CHECK_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The label of log notes unless [`Builder::label`] sets one.
const DEFAULT_LABEL: &str = "jetfn-devtools";

mod sealed {
    pub trait Sealed {}
}

/// What differs between the servers: how to find, configure and probe them. Implemented by
/// [`Nats`] and [`Redis`] only.
pub trait Flavor: sealed::Sealed + Send + Sync + Sized + 'static {
    /// The program, e.g. `nats-server`.
    const PROGRAM: &'static str;
    /// The URL scheme, e.g. `nats`.
    const SCHEME: &'static str;
    /// The short name: the data directory, the log is `<NAME>.log`.
    const NAME: &'static str;
    /// Finds the binary (blocking: it may run `--version`).
    fn binary() -> Result<PathBuf>;
    /// Prepares the state directory `dir` before each launch.
    fn prepare(&self, dir: &Path) -> Result<()>;
    /// The command-line arguments for `port`, with the state in `dir`.
    fn arguments(&self, port: u16, dir: &Path) -> Vec<OsString>;
    /// Succeeds once the server at `url`, process `pid`, serves.
    fn probe(&self, url: &str, pid: u32) -> impl Future<Output = Result<(), String>> + Send;
}

/// Where a server keeps its state.
#[derive(Debug)]
enum Dir {
    /// Removed when the server is dropped.
    Temporary(TempDir),
    /// Kept (e.g. `.jetfn/` of `jetfn dev`).
    Given(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temporary(dir) => dir.path(),
            Dir::Given(dir) => dir,
        }
    }
}

/// How to start a server: [`NatsServer::builder`] or [`RedisServer::builder`].
#[derive(Debug)]
pub struct Builder<F> {
    flavor: F,
    dir: Option<PathBuf>,
    label: String,
    own_process_group: bool,
}

impl<F: Flavor> Builder<F> {
    fn new(flavor: F) -> Builder<F> {
        Builder {
            flavor,
            dir: None,
            label: DEFAULT_LABEL.to_owned(),
            own_process_group: false,
        }
    }

    /// Keeps the state in `dir` (created if missing, never removed): `<dir>/nats/` or
    /// `<dir>/redis/`, and the log `<dir>/nats.log` or `<dir>/redis.log`. Without it the
    /// state lives in a temporary directory that is removed when the server is dropped.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Who writes the `=== LABEL: starting ... ===` lines of the log.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Runs the server in a process group of its own, so a Ctrl-C in the terminal reaches only
    /// the caller, which then stops things in order.
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// Starts the server on a free port and waits (at most 30 s) until it serves. If it exits
    /// during start-up (e.g. the port was taken meanwhile) it is tried again on a new port, up
    /// to 3 attempts. Errors include the tail of the server log.
    pub async fn start(self) -> Result<Server<F>> {
        let binary = tokio::task::spawn_blocking(F::binary)
            .await
            .map_err(|e| Error::io(format!("looking for {}", F::PROGRAM), e))??;
        let dir = match self.dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                Dir::Given(dir)
            }
            None => Dir::Temporary(
                tempfile::Builder::new()
                    .prefix(&format!("jetfn-{}-", F::NAME))
                    .tempdir()
                    .map_err(|e| {
                        Error::io(
                            format!("creating a temporary directory for {}", F::PROGRAM),
                            e,
                        )
                    })?,
            ),
        };
        let mut server = Server {
            flavor: self.flavor,
            binary,
            port: 0,
            dir,
            label: self.label,
            own_process_group: self.own_process_group,
            child: None,
        };
        let log = server.log_path();
        std::fs::write(&log, "")
            .map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        server.launch_retrying(true).await?;
        Ok(server)
    }
}

/// Why one launch attempt failed.
struct Failed {
    /// The server exited by itself (typically: the port was taken), so trying again may help.
    exited: bool,
    error: Error,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed {
            exited: false,
            error,
        }
    }
}

/// A private server process: [`NatsServer`] or [`RedisServer`].
///
/// Dropping it SIGKILLs the server, waits for it, and removes its temporary directory, also
/// when a test panics (and then the tail of the server log is printed to stderr).
pub struct Server<F: Flavor> {
    flavor: F,
    binary: PathBuf,
    port: u16,
    dir: Dir,
    label: String,
    own_process_group: bool,
    child: Option<Child>,
}

impl<F: Flavor> Server<F> {
    /// `nats://127.0.0.1:PORT` or `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", F::SCHEME, self.port)
    }

    /// The TCP port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The binary that runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Everything the server logged so far (across restarts).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", F::NAME))
    }

    /// The server's data directory (the JetStream store, Redis's `--dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(F::NAME)
    }

    /// Stops the server politely (SIGTERM, so it flushes its data; SIGKILL after 10 s). The
    /// port and the data are kept for [`restart`](Self::restart). Does nothing if it is
    /// already stopped.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = stop_gracefully(&mut child, STOP_GRACE).await?;
            self.note(&format!("{} stopped ({status})", F::PROGRAM))?;
        }
        Ok(())
    }

    /// Kills the server (SIGKILL), as a crash would; the port and the data are kept for
    /// [`restart`](Self::restart). Does nothing if it is already stopped.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = kill_and_reap(&mut child)?;
            self.note(&format!("{} killed ({status})", F::PROGRAM))?;
        }
        Ok(())
    }

    /// Stops the server (if running) and starts it again on the same port with the same data,
    /// then waits until it is ready. Clients reconnect by themselves.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.launch_retrying(false).await
    }

    fn note(&self, note: &str) -> Result<()> {
        log_note(&self.log_path(), &self.label, note)
    }

    /// Launches until ready: on a fresh port each attempt (`new_port`), or on the same port
    /// after a short pause (the old socket may linger).
    async fn launch_retrying(&mut self, new_port: bool) -> Result<()> {
        let mut attempt = 1;
        loop {
            if new_port {
                self.port = free_port()?;
            }
            match self.launch(attempt).await {
                Ok(()) => return Ok(()),
                Err(e) if e.exited && attempt < START_ATTEMPTS => {
                    attempt += 1;
                    if !new_port {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Err(e) => {
                    return Err(Error::Start(format!(
                        "starting {} {} on port {} (attempt {attempt} of {START_ATTEMPTS}): {}",
                        F::PROGRAM,
                        self.binary.display(),
                        self.port,
                        e.error
                    )));
                }
            }
        }
    }

    async fn launch(&mut self, attempt: u32) -> Result<(), Failed> {
        let log = self.log_path();
        self.note(&format!(
            "starting {} on 127.0.0.1:{} (attempt {attempt})",
            F::PROGRAM,
            self.port
        ))?;
        self.flavor.prepare(self.dir.path())?;
        let (stdout, stderr) = log_stdio(&log)?;
        let mut command = Command::new(&self.binary);
        command
            .args(self.flavor.arguments(self.port, self.dir.path()))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if self.own_process_group {
            command.process_group(0);
        }
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("spawning {}", self.binary.display()), e))?;
        // Killed if start-up fails, or if the caller drops this future (e.g. on Ctrl-C).
        let mut owned = Owned::new(child);
        self.wait_ready(&mut owned, &log).await?;
        self.child = owned.release();
        Ok(())
    }

    /// Polls the probe every 20 ms until it succeeds, the child exits, or 30 s pass.
    async fn wait_ready(&self, owned: &mut Owned, log: &Path) -> Result<(), Failed> {
        let url = self.url();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let Some(child) = owned.child() else {
                return Err(Error::Start(format!("{} is gone", F::PROGRAM)).into());
            };
            if let Some(status) = try_wait(child)? {
                return Err(Failed {
                    exited: true,
                    error: Error::Start(format!(
                        "{} exited during start-up ({status}); {}",
                        F::PROGRAM,
                        log_tail(log)
                    )),
                });
            }
            let pid = child.id();
            let last_error =
                match tokio::time::timeout(PROBE_TIMEOUT, self.flavor.probe(&url, pid)).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(_) => format!("readiness probe timed out after {PROBE_TIMEOUT:?}"),
                };
            if Instant::now() >= deadline {
                return Err(Error::Start(format!(
                    "{} not ready within {READY_TIMEOUT:?} (last probe error: {last_error}); {}",
                    F::PROGRAM,
                    log_tail(log)
                ))
                .into());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl<F: Flavor> Drop for Server<F> {
    fn drop(&mut self) {
        report_log_if_panicking(&format!("{} log", F::PROGRAM), &self.log_path());
        if let Some(mut child) = self.child.take() {
            let _ = kill_and_reap(&mut child);
        }
    }
}

impl<F: Flavor> std::fmt::Debug for Server<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(F::PROGRAM)
            .field("url", &self.url())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// A `nats-server` with JetStream: see [`NatsServer`].
#[derive(Debug)]
pub struct Nats {
    name: String,
    /// Extra configuration text, written to `nats.conf` and passed with `-c`.
    config: Option<String>,
    /// The user and password the readiness probe logs in with.
    login: Option<(String, String)>,
    /// JetStream on (`-js -sd`); off for a leaf node that uses its hub's.
    jetstream: bool,
    /// The CA, certificate and key the readiness probe connects with over TLS.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// The `.creds` file the readiness probe logs in with (decentralised auth).
    credentials: Option<PathBuf>,
}

/// A private `nats-server` with JetStream enabled, listening on a free loopback port, with its
/// store in the `nats/` directory of its state directory.
///
/// ```no_run
/// # async fn demo() -> Result<(), jetfn_devtools::Error> {
/// let nats = jetfn_devtools::NatsServer::start().await?;
/// let js = async_nats::jetstream::new(nats.connect().await?);
/// # Ok(()) }
/// ```
pub type NatsServer = Server<Nats>;

impl sealed::Sealed for Nats {}

impl Flavor for Nats {
    const PROGRAM: &'static str = "nats-server";
    const SCHEME: &'static str = "nats";
    const NAME: &'static str = "nats";

    fn binary() -> Result<PathBuf> {
        crate::nats_server_binary()
    }

    fn prepare(&self, dir: &Path) -> Result<()> {
        let store = dir.join(Self::NAME);
        std::fs::create_dir_all(&store)
            .map_err(|e| Error::io(format!("creating {}", store.display()), e))?;
        if let Some(text) = &self.config {
            let path = dir.join("nats.conf");
            std::fs::write(&path, text)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }

    fn arguments(&self, port: u16, dir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if self.config.is_some() {
            args.extend(["-c".into(), dir.join("nats.conf").into()]);
        }
        args.extend(["-a", "127.0.0.1", "-p", &port.to_string()].map(OsString::from));
        if self.jetstream {
            args.extend(["-js", "-sd"].map(OsString::from));
            args.push(dir.join(Self::NAME).into());
        }
        args.extend(["--server_name", &self.name].map(OsString::from));
        args
    }

    /// Ready = we reach *our* server (not another one that grabbed the port) and JetStream
    /// answers (when it runs one; in a cluster that takes a meta leader, so start the nodes
    /// together).
    async fn probe(&self, url: &str, _pid: u32) -> Result<(), String> {
        let mut options = match (&self.login, &self.credentials) {
            (_, Some(creds)) => async_nats::ConnectOptions::with_credentials_file(creds)
                .await
                .map_err(|e| format!("credentials {}: {e}", creds.display()))?,
            (Some((user, password)), None) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            (None, None) => async_nats::ConnectOptions::new(),
        };
        if let Some((ca, cert, key)) = &self.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(ca.clone())
                .add_client_certificate(cert.clone(), key.clone());
        }
        let client = options
            .connection_timeout(Duration::from_millis(500))
            .connect(url)
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let info = client.server_info();
        if info.server_name != self.name {
            return Err(format!(
                "{url} is answered by another server ({:?}), not ours",
                info.server_name
            ));
        }
        if !self.jetstream {
            return Ok(());
        }
        async_nats::jetstream::new(client)
            .query_account()
            .await
            .map_err(|e| format!("JetStream account info: {e}"))?;
        Ok(())
    }
}

/// A name no other server of this machine has: `jetfn-<pid>-<n>`.
fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "jetfn-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Builder<Nats> {
    /// The server name (`--server_name`); unique per process by default.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.flavor.name = name.into();
        self
    }

    /// Extra nats-server configuration text (e.g. an `authorization` block), written to
    /// `nats.conf` in the state directory and passed with `-c`. The launcher still chooses the
    /// address, port, store and server name: its command-line flags override the file.
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.flavor.config = Some(text.into());
        self
    }

    /// The user and password the readiness probe connects with, when the configuration
    /// requires authentication; that user must be allowed to publish `$JS.API.INFO` and
    /// subscribe to `_INBOX.>`.
    pub fn login(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.flavor.login = Some((user.into(), password.into()));
        self
    }

    /// The readiness probe connects over TLS, trusting the PEM CA file `ca` and presenting the
    /// client certificate `cert` with key `key`, for a configuration whose `tls` block requires
    /// them. [`Server::connect`] stays plain: such a server's clients bring their own options.
    pub fn probe_tls(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.flavor.tls = Some((ca.into(), cert.into(), key.into()));
        self
    }

    /// The readiness probe logs in with the `.creds` file `path` (JWT and nkey seed), for an
    /// operator-mode configuration; its account must have JetStream.
    pub fn probe_credentials(mut self, path: impl Into<PathBuf>) -> Self {
        self.flavor.credentials = Some(path.into());
        self
    }

    /// Runs no JetStream (no `-js`), as a leaf node that uses its hub's does; ready as soon as a
    /// client reaches it.
    pub fn without_jetstream(mut self) -> Self {
        self.flavor.jetstream = false;
        self
    }
}

impl Server<Nats> {
    /// How to start one: state directory, name, configuration.
    pub fn builder() -> Builder<Nats> {
        Builder::new(Nats {
            name: unique_name(),
            config: None,
            login: None,
            jetstream: true,
            tls: None,
            credentials: None,
        })
    }

    /// Starts `nats-server -a 127.0.0.1 -p PORT -js -sd DIR/nats` on a free port, in a
    /// temporary directory; see [`Builder::start`].
    pub async fn start() -> Result<NatsServer> {
        Self::builder().start().await
    }

    /// Like [`start`](Self::start), with `extra_config` (see [`Builder::config`]) and the
    /// `login` (user, password) of the readiness probe (see [`Builder::login`]).
    /// [`connect`](Self::connect) stays anonymous.
    pub async fn start_with_config(
        extra_config: &str,
        login: Option<(&str, &str)>,
    ) -> Result<NatsServer> {
        let mut builder = Self::builder().config(extra_config);
        if let Some((user, password)) = login {
            builder = builder.login(user, password);
        }
        builder.start().await
    }

    /// The unique server name (`--server_name`), which `Client::server_info().server_name`
    /// reports.
    pub fn name(&self) -> &str {
        &self.flavor.name
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir()
    }

    /// Connects a new (anonymous) client to this server.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url()).await.map_err(|e| {
            Error::Connect(format!("connecting to nats-server at {}: {e}", self.url()))
        })
    }
}

/// A `redis-server`: see [`RedisServer`].
#[derive(Debug)]
pub struct Redis {
    /// AOF with `appendfsync always` instead of nothing on disk.
    persistent: bool,
    /// The next start keeps the data directory (a snapshot saved by `stop_saving`).
    keep_once: std::sync::atomic::AtomicBool,
    /// A TLS port beside the plain one: (port, certificate, key, CA), files in PEM.
    tls: Option<(u16, PathBuf, PathBuf, PathBuf)>,
}

/// A private `redis-server` on a free loopback port, working in the `redis/` directory of its
/// state directory. By default it keeps nothing on disk (`--save "" --appendonly no`, and the
/// directory is emptied at every start); with [`Builder::persistent`] it writes an append-only
/// file synced on every write, so [`restart`](Server::restart) and a
/// [`kill`](Server::kill) keep the data.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = jetfn_devtools::RedisServer::start().await?;
/// let mut con = redis.connect().await?;
/// let pong: String = redis::cmd("PING").query_async(&mut con).await?;
/// # Ok(()) }
/// ```
pub type RedisServer = Server<Redis>;

impl sealed::Sealed for Redis {}

impl Flavor for Redis {
    const PROGRAM: &'static str = "redis-server";
    const SCHEME: &'static str = "redis";
    const NAME: &'static str = "redis";

    fn binary() -> Result<PathBuf> {
        crate::redis_server_binary()
    }

    fn prepare(&self, dir: &Path) -> Result<()> {
        let data = dir.join(Self::NAME);
        if !self.persistent
            && !self
                .keep_once
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            && data.exists()
        {
            std::fs::remove_dir_all(&data)
                .map_err(|e| Error::io(format!("emptying {}", data.display()), e))?;
        }
        std::fs::create_dir_all(&data)
            .map_err(|e| Error::io(format!("creating {}", data.display()), e))
    }

    fn arguments(&self, port: u16, dir: &Path) -> Vec<OsString> {
        let persistence: &[&str] = if self.persistent {
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]
        } else {
            &["--save", "", "--appendonly", "no"]
        };
        let mut args: Vec<OsString> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
            .map(OsString::from)
            .into();
        args.extend(persistence.iter().map(OsString::from));
        args.extend(["--daemonize", "no", "--dir"].map(OsString::from));
        args.push(dir.join(Self::NAME).into());
        if let Some((port, cert, key, ca)) = &self.tls {
            args.extend(["--tls-port".into(), port.to_string().into()]);
            args.extend(["--tls-cert-file".into(), cert.into()]);
            args.extend(["--tls-key-file".into(), key.into()]);
            args.extend(["--tls-ca-cert-file".into(), ca.into()]);
            args.extend(["--tls-auth-clients", "no"].map(OsString::from));
        }
        args
    }

    /// Ready = `PING` answers `PONG`, from the process we started.
    async fn probe(&self, url: &str, pid: u32) -> Result<(), String> {
        let client = redis::Client::open(url).map_err(|e| format!("{url}: {e}"))?;
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(|e| format!("PING: {e}"))?;
        if pong != "PONG" {
            return Err(format!("PING answered {pong:?}"));
        }
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut con)
            .await
            .map_err(|e| format!("INFO server: {e}"))?;
        let theirs = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("process_id:"))
            .unwrap_or("?");
        if theirs != pid.to_string() {
            return Err(format!(
                "{url} is answered by another redis-server (pid {theirs}), not ours ({pid})"
            ));
        }
        Ok(())
    }
}

impl Builder<Redis> {
    /// Keeps the data: an append-only file synced on every write (`appendfsync always`), kept
    /// across [`restart`](Server::restart) and [`kill`](Server::kill).
    pub fn persistent(mut self) -> Self {
        self.flavor.persistent = true;
        self
    }

    /// Also listens for TLS on a second free port ([`Server::tls_url`]), with the PEM files
    /// `cert` and `key`, trusting `ca` (client certificates are not required). The plain port
    /// stays, for the readiness probe and for tests that look inside.
    pub fn tls(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        ca: impl Into<PathBuf>,
    ) -> Result<Self> {
        self.flavor.tls = Some((free_port()?, cert.into(), key.into(), ca.into()));
        Ok(self)
    }
}

impl Server<Redis> {
    /// How to start one: state directory, persistence.
    pub fn builder() -> Builder<Redis> {
        Builder::new(Redis {
            persistent: false,
            keep_once: std::sync::atomic::AtomicBool::new(false),
            tls: None,
        })
    }

    /// Starts a `redis-server` that keeps nothing on disk on a free port, in a temporary
    /// directory; see [`Builder::start`].
    pub async fn start() -> Result<RedisServer> {
        Self::builder().start().await
    }

    /// `rediss://127.0.0.1:PORT` of the TLS port, when [`Builder::tls`] asked for one.
    pub fn tls_url(&self) -> Option<String> {
        self.flavor
            .tls
            .as_ref()
            .map(|(port, ..)| format!("rediss://127.0.0.1:{port}"))
    }

    /// A `redis::Client` for this server.
    pub fn client(&self) -> Result<redis::Client> {
        redis::Client::open(self.url())
            .map_err(|e| Error::Connect(format!("redis client for {}: {e}", self.url())))
    }

    /// Opens a new multiplexed async connection to this server. A command may take up to
    /// 30 s: a check's long read on a loaded machine is slow, not wrong
    /// (the crate's default gives up after 500 ms).
    pub async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(CHECK_RESPONSE_TIMEOUT));
        self.client()?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| {
                Error::Connect(format!("connecting to redis-server at {}: {e}", self.url()))
            })
    }

    /// Stops the server as an operator would: `SHUTDOWN SAVE` writes its data to disk, then it
    /// exits (SIGKILL after 10 s). [`start_again`](Self::start_again) brings it back with that
    /// data, also when it keeps nothing on disk otherwise.
    pub async fn stop_saving(&mut self) -> Result<()> {
        let mut connection = self.connect().await?;
        // The server closes the connection instead of answering.
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query_async(&mut connection)
            .await;
        self.stop().await
    }

    /// Starts a server stopped by [`stop_saving`](Self::stop_saving) again, on the same port,
    /// with the data it saved, and waits until it answers `PING`.
    pub async fn start_again(&mut self) -> Result<()> {
        self.flavor
            .keep_once
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.launch_retrying(false).await
    }

    /// Kills the server (SIGKILL) and starts a new one on the same port with no data at all,
    /// then waits until it answers `PING`. Simulates a cache that lost everything.
    pub async fn restart_empty(&mut self) -> Result<()> {
        self.kill()?;
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .map_err(|e| Error::io(format!("emptying {}", data.display()), e))?;
        }
        self.launch_retrying(false).await
    }
}

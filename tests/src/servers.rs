//! Private, throw-away `nats-server` (with JetStream) and `redis-server`
//! instances on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use crate::binaries::{nats_server_binary, redis_server_binary};
use crate::child::{
    POLL, free_port, kill_and_reap, log_note, log_stdio, log_tail, read_log,
    report_log_if_panicking, stop_gracefully,
};

/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many times a start is tried (each on a fresh port) before giving up.
const START_ATTEMPTS: u32 = 3;
/// How long a polite stop (SIGTERM) may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why one launch attempt failed.
struct LaunchError {
    /// The server process exited by itself (typically: the port was taken),
    /// so trying again may help.
    exited: bool,
    error: anyhow::Error,
}

impl From<anyhow::Error> for LaunchError {
    fn from(error: anyhow::Error) -> Self {
        LaunchError {
            exited: false,
            error,
        }
    }
}

/// Polls `probe` every 20 ms until it succeeds, the child exits, or
/// `READY_TIMEOUT` passes; returns the ready child. On failure the child is
/// killed and reaped.
async fn wait_ready<F, Fut>(
    what: &str,
    mut child: Child,
    log: &Path,
    probe: F,
) -> Result<Child, LaunchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    match probe_until_ready(what, &mut child, log, probe).await {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = kill_and_reap(&mut child);
            Err(e)
        }
    }
}

/// The polling loop of [`wait_ready`].
async fn probe_until_ready<F, Fut>(
    what: &str,
    child: &mut Child,
    log: &Path,
    mut probe: F,
) -> Result<(), LaunchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_error = anyhow!("no readiness probe ran");
    loop {
        if let Some(status) = child.try_wait().map_err(anyhow::Error::from)? {
            return Err(LaunchError {
                exited: true,
                error: anyhow!("{what} exited during startup ({status}); {}", log_tail(log)),
            });
        }
        match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = anyhow!("readiness probe timed out after {PROBE_TIMEOUT:?}"),
        }
        if Instant::now() >= deadline {
            let _ = kill_and_reap(child);
            return Err(LaunchError {
                exited: false,
                error: anyhow!(
                    "{what} not ready within {READY_TIMEOUT:?} (last probe error: {last_error:#}); {}",
                    log_tail(log)
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A private `nats-server` with JetStream enabled, listening on a free
/// loopback port, with its store in a temporary directory.
///
/// Dropping it SIGKILLs the server, waits for it, and removes the directory —
/// also when the test panics (and then the tail of the server log is printed
/// to stderr).
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let nats = jetfn_tests::NatsServer::start().await?;
/// let client = nats.connect().await?;
/// let js = async_nats::jetstream::new(client);
/// js.query_account().await?;
/// # Ok(()) }
/// ```
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    name: String,
    child: Option<Child>,
    dir: TempDir,
    /// A configuration file passed with `-c` (see [`NatsServer::start_with_config`]).
    config: Option<PathBuf>,
    /// The user and password the readiness probe logs in with.
    login: Option<(String, String)>,
}

impl NatsServer {
    /// Starts `nats-server -a 127.0.0.1 -p PORT -js -sd DIR` on a free port
    /// and waits (at most 10 s) until it accepts connections and JetStream
    /// answers an account-info request. If the server dies during startup
    /// (e.g. the port was taken meanwhile) it is retried on a new port, up to
    /// 3 attempts. Errors include the tail of the server log.
    pub async fn start() -> Result<NatsServer> {
        Self::start_inner(None, None).await
    }

    /// Like [`start`](NatsServer::start), with `extra_config` (nats-server configuration text,
    /// e.g. an `authorization` block) written to `nats.conf` in the server's temporary directory
    /// and passed with `-c`. The harness still chooses the address, port, JetStream store and
    /// server name: its command-line flags override the file. [`restart`](NatsServer::restart)
    /// uses the same file.
    ///
    /// When the configuration requires authentication, `login` (user, password) is what the
    /// readiness probe connects with; that user must be allowed to publish `$JS.API.INFO` and
    /// subscribe to `_INBOX.>`. [`connect`](NatsServer::connect) stays anonymous.
    pub async fn start_with_config(
        extra_config: &str,
        login: Option<(&str, &str)>,
    ) -> Result<NatsServer> {
        let login = login.map(|(user, password)| (user.to_owned(), password.to_owned()));
        Self::start_inner(Some(extra_config), login).await
    }

    async fn start_inner(
        extra_config: Option<&str>,
        login: Option<(String, String)>,
    ) -> Result<NatsServer> {
        let binary = nats_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("jetfn-nats-")
            .tempdir()
            .context("creating a temporary directory for nats-server")?;
        std::fs::create_dir_all(dir.path().join("store"))
            .context("creating the JetStream store directory")?;
        let mut server = NatsServer {
            binary,
            port: 0,
            name: format!("jetfn-test-{}", uuid::Uuid::new_v4().simple()),
            child: None,
            dir,
            config: None,
            login,
        };
        if let Some(text) = extra_config {
            let path = server.dir.path().join("nats.conf");
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            server.config = Some(path);
        }
        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            match server.launch(attempt).await {
                Ok(()) => return Ok(server),
                Err(e) if e.exited && attempt < START_ATTEMPTS => attempt += 1,
                Err(e) => {
                    return Err(e.error.context(format!(
                        "starting nats-server {} (attempt {attempt} of {START_ATTEMPTS})",
                        server.binary.display()
                    )));
                }
            }
        }
    }

    async fn launch(&mut self, attempt: u32) -> Result<(), LaunchError> {
        let log = self.log_path();
        log_note(
            &log,
            &format!(
                "starting nats-server on 127.0.0.1:{} (attempt {attempt})",
                self.port
            ),
        )?;
        let (stdout, stderr) = log_stdio(&log)?;
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store_dir())
            .args(["--server_name", &self.name])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        let url = self.url();
        let name = self.name.clone();
        let login = self.login.clone();
        let child = wait_ready("nats-server", child, &log, || {
            probe_nats(url.clone(), name.clone(), login.clone())
        })
        .await?;
        self.child = Some(child);
        Ok(())
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The unique server name (`--server_name`), which
    /// `Client::server_info().server_name` reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connects a new client to this server.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connecting to nats-server at {}", self.url()))
    }

    /// Stops the server politely (SIGTERM, so JetStream flushes its store;
    /// SIGKILL after 10 s). The port and store are kept for [`restart`].
    /// Does nothing if it is already stopped.
    ///
    /// [`restart`]: NatsServer::restart
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = stop_gracefully(&mut child, STOP_GRACE).await?;
            log_note(&self.log_path(), &format!("nats-server stopped ({status})"))?;
        }
        Ok(())
    }

    /// Stops the server (if running) and starts it again on the same port
    /// with the same JetStream store, then waits until it is ready. Data in
    /// JetStream survives; clients reconnect by themselves.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let mut attempt = 1;
        loop {
            match self.launch(attempt).await {
                Ok(()) => return Ok(()),
                // The old socket may linger for a moment: try the same port again.
                Err(e) if e.exited && attempt < START_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(e
                        .error
                        .context(format!("restarting nats-server on port {}", self.port)));
                }
            }
        }
    }

    /// Everything the server logged so far (across restarts).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        report_log_if_panicking("nats-server log", &self.log_path());
        if let Some(mut child) = self.child.take() {
            let _ = kill_and_reap(&mut child);
        }
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Ready = we reach *our* server (not another one that grabbed the port) and
/// JetStream answers.
async fn probe_nats(url: String, name: String, login: Option<(String, String)>) -> Result<()> {
    let options = match login {
        Some((user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        None => async_nats::ConnectOptions::new(),
    };
    let client = options
        .connection_timeout(Duration::from_millis(500))
        .connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let info = client.server_info();
    if info.server_name != name {
        bail!(
            "{url} is answered by another server ({:?}), not ours",
            info.server_name
        );
    }
    async_nats::jetstream::new(client)
        .query_account()
        .await
        .context("JetStream account info")?;
    Ok(())
}

/// A private `redis-server` on a free loopback port that keeps nothing on
/// disk (`--save "" --appendonly no`), working in a temporary directory.
///
/// Dropping it SIGKILLs the server, waits for it, and removes the directory —
/// also when the test panics (and then the tail of the log is printed).
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let redis = jetfn_tests::RedisServer::start().await?;
/// let mut con = redis.connect().await?;
/// let pong: String = redis::cmd("PING").query_async(&mut con).await?;
/// assert_eq!(pong, "PONG");
/// # Ok(()) }
/// ```
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no
    /// --dir DIR --logfile DIR/redis.log` on a free port and waits (at most
    /// 10 s) until `PING` answers `PONG` from this very process. Retried on a
    /// new port (3 attempts) if the server dies during startup.
    pub async fn start() -> Result<RedisServer> {
        let binary = redis_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("jetfn-redis-")
            .tempdir()
            .context("creating a temporary directory for redis-server")?;
        let mut server = RedisServer {
            binary,
            port: 0,
            child: None,
            dir,
        };
        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            match server.launch(attempt, false).await {
                Ok(()) => return Ok(server),
                Err(e) if e.exited && attempt < START_ATTEMPTS => attempt += 1,
                Err(e) => {
                    return Err(e.error.context(format!(
                        "starting redis-server {} (attempt {attempt} of {START_ATTEMPTS})",
                        server.binary.display()
                    )));
                }
            }
        }
    }

    async fn launch(&mut self, attempt: u32, keep_data: bool) -> Result<(), LaunchError> {
        let log = self.log_path();
        let data = self.data_dir();
        // A fresh, empty data directory, unless a stopped server saved its data for this start.
        if data.exists() && !keep_data {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("emptying {}", data.display()))?;
        }
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        log_note(
            &log,
            &format!(
                "starting redis-server on 127.0.0.1:{} (attempt {attempt})",
                self.port
            ),
        )?;
        let (stdout, stderr) = log_stdio(&log)?;
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&data)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        let url = self.url();
        let pid = child.id();
        let child = wait_ready("redis-server", child, &log, || {
            probe_redis(url.clone(), pid)
        })
        .await?;
        self.child = Some(child);
        Ok(())
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A `redis::Client` for this server.
    pub fn client(&self) -> Result<redis::Client> {
        redis::Client::open(self.url()).with_context(|| format!("redis client for {}", self.url()))
    }

    /// Opens a new multiplexed async connection to this server.
    pub async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        self.client()?
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to redis-server at {}", self.url()))
    }

    /// Kills the server (SIGKILL) and starts a new one on the same port with
    /// no data at all, then waits until it answers `PING`. Simulates a cache
    /// that lost everything.
    pub async fn restart_empty(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = kill_and_reap(&mut child)?;
            log_note(&self.log_path(), &format!("redis-server killed ({status})"))?;
        }
        self.relaunch(false).await
    }

    /// Stops the server as an operator would: `SHUTDOWN SAVE` writes its data to disk, then it
    /// exits; waits (at most 10 s, then SIGKILL) until it has. [`RedisServer::start_again`]
    /// brings it back with that data.
    pub async fn stop_saving(&mut self) -> Result<()> {
        let mut connection = self.connect().await?;
        // The server closes the connection instead of answering.
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query_async(&mut connection)
            .await;
        if let Some(mut child) = self.child.take() {
            let status = stop_gracefully(&mut child, STOP_GRACE).await?;
            log_note(
                &self.log_path(),
                &format!("redis-server stopped ({status})"),
            )?;
        }
        Ok(())
    }

    /// Starts a server stopped by [`RedisServer::stop_saving`] again, on the same port, with the
    /// data it saved, and waits until it answers `PING`.
    pub async fn start_again(&mut self) -> Result<()> {
        self.relaunch(true).await
    }

    /// Launches on the same port, retrying while the port is still held by the old process.
    async fn relaunch(&mut self, keep_data: bool) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.launch(attempt, keep_data).await {
                Ok(()) => return Ok(()),
                Err(e) if e.exited && attempt < START_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(e
                        .error
                        .context(format!("restarting redis-server on port {}", self.port)));
                }
            }
        }
    }

    /// Everything the server logged so far (across restarts).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        report_log_if_panicking("redis-server log", &self.log_path());
        if let Some(mut child) = self.child.take() {
            let _ = kill_and_reap(&mut child);
        }
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Ready = `PING` answers `PONG`, from the process we started.
async fn probe_redis(url: String, pid: u32) -> Result<()> {
    let client = redis::Client::open(url.as_str())?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let pong: String = redis::cmd("PING").query_async(&mut con).await?;
    if pong != "PONG" {
        bail!("PING answered {pong:?}");
    }
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await?;
    let theirs = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("process_id:"))
        .unwrap_or("?");
    if theirs != pid.to_string() {
        bail!("{url} is answered by another redis-server (pid {theirs}), not ours ({pid})");
    }
    Ok(())
}

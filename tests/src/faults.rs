//! Helpers for the fault suites: clients that resend a command under the same command id
//! (`Nats-Msg-Id`) until it is answered, a load of such clients, and the check that every
//! acknowledged command's events are in the stream exactly once.

use crate::FunctionProcess;
use crate::commands::{ACCOUNT_STREAM, StoredMessage, stored_messages};
use crate::readmodels::{FeedOrder, check_read_side, live_generation, wait_until_caught_up};
use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use jetfn::Reply;
use jetfn::command::ErrorKind;
use jetfn::wire::header;
use jetfn::wire::{AggregateNames, CommandSubjects};
use jetfn_devtools::RedisServer;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a client waits for one reply before it resends.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client keeps resending one command before it gives up (an error).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(90);
/// The first pause between resends; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// The longest pause between resends.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// The subject of command `command` on account `id`.
pub fn account_subject(id: &str, command: &str) -> String {
    CommandSubjects::new(None, "account").subject(id, command)
}

/// The subject account `id`'s events are stored on.
pub fn account_event_subject(id: &str) -> String {
    AggregateNames::new("account", &jetfn::Config::default())
        .map(|names| names.event_subject(id))
        .unwrap_or_default()
}

/// How resending one command went.
#[derive(Debug, Clone)]
pub struct Answered {
    /// The final answer: anything but `unavailable` or `conflict`.
    pub reply: Reply,
    /// Requests sent (1 when the first was answered).
    pub attempts: u32,
    /// `conflict` answers that were resent.
    pub conflicts: u32,
    /// `unavailable` answers that were resent.
    pub unavailable: u32,
    /// Requests without an answer (timeout, no responders, no connection) that were resent.
    pub unanswered: u32,
    /// When the first request was sent.
    pub first_sent: Instant,
    /// When the final answer came.
    pub answered_at: Instant,
}

/// Sends `body` to `subject` with command id `command_id` until the answer is neither
/// `unavailable` nor `conflict`, resending the very same command id after a timeout, a missing
/// responder, a lost connection, `unavailable` or `conflict`, with a backoff from 20 ms to
/// 500 ms. Fails after [`ANSWER_WITHIN`], naming the last thing that came back.
pub async fn send_until_answered(
    client: &async_nats::Client,
    subject: &str,
    body: &Value,
    command_id: &str,
) -> Result<Answered> {
    let payload = bytes::Bytes::from(body.to_string());
    let first_sent = Instant::now();
    let mut answered = Answered {
        reply: Reply::failed(ErrorKind::Unavailable, "not sent"),
        attempts: 0,
        conflicts: 0,
        unavailable: 0,
        unanswered: 0,
        first_sent,
        answered_at: first_sent,
    };
    let mut backoff = FIRST_BACKOFF;
    let last = loop {
        answered.attempts += 1;
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, command_id);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload.clone())
            .timeout(Some(REQUEST_TIMEOUT));
        let last = match client.send_request(subject.to_owned(), request).await {
            Ok(message) => {
                let reply: Reply = serde_json::from_slice(&message.payload).with_context(|| {
                    format!(
                        "reply to {command_id}: {:?}",
                        String::from_utf8_lossy(&message.payload)
                    )
                })?;
                match reply.error_kind() {
                    Some(ErrorKind::Conflict) => answered.conflicts += 1,
                    Some(ErrorKind::Unavailable) => answered.unavailable += 1,
                    _ => {
                        answered.reply = reply;
                        answered.answered_at = Instant::now();
                        return Ok(answered);
                    }
                }
                format!("{reply:?}")
            }
            Err(err) => {
                answered.unanswered += 1;
                err.to_string()
            }
        };
        if first_sent.elapsed() >= ANSWER_WITHIN {
            break last;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    bail!(
        "{command_id} on {subject} not answered within {ANSWER_WITHIN:?} ({} attempts; last: {last})",
        answered.attempts
    )
}

/// One command the load had accepted.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The account.
    pub account: String,
    /// The command id.
    pub command_id: String,
    /// The money the command added to the account.
    pub amount: u64,
    /// The event types the reply names.
    pub events: Vec<String>,
    /// The reply's sequence (of the command's last event).
    pub seq: u64,
    /// How resending went.
    pub answered: Answered,
}

/// Turns an answer into an [`Acked`], or an error if the command was not accepted.
pub fn expect_accepted(
    account: &str,
    command_id: &str,
    amount: u64,
    answered: Answered,
) -> Result<Acked> {
    match &answered.reply {
        Reply::Accepted(accepted) => Ok(Acked {
            account: account.to_owned(),
            command_id: command_id.to_owned(),
            amount,
            events: accepted.events.clone(),
            seq: accepted.seq,
            answered,
        }),
        Reply::Failed(failure) => bail!("{command_id} on {account} was not accepted: {failure:?}"),
    }
}

/// Account commands from concurrent clients, each resending with the same command id until
/// accepted, until told to finish: each client opens an account with a first deposit (two
/// events, one atomic batch), deposits into it, and every 25th command opens another.
pub struct Load {
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Result<Vec<Acked>>>,
}

impl Load {
    /// Starts `clients` clients, each sending at most `max_per_client` commands, one after the
    /// other as fast as they are answered; accounts and command ids start with `name`.
    pub fn start(
        client: &async_nats::Client,
        name: &str,
        clients: usize,
        max_per_client: usize,
    ) -> Load {
        Self::start_paced(client, name, clients, max_per_client, Duration::ZERO)
    }

    /// Like [`Load::start`], each client pausing `pause` after each accepted command.
    pub fn start_paced(
        client: &async_nats::Client,
        name: &str,
        clients: usize,
        max_per_client: usize,
        pause: Duration,
    ) -> Load {
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for n in 0..clients {
            let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
            let prefix = format!("{name}-{n}");
            tasks.spawn(async move {
                let mut done = Vec::new();
                let mut account = String::new();
                for i in 0..max_per_client {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let command_id = format!("{prefix}-c{i}");
                    let (command, body, amount) = if i % 25 == 0 {
                        account = format!("{prefix}-a{}", i / 25);
                        let amount = 100 + n as u64;
                        let body =
                            json!({"owner": format!("Owner {account}"), "initial_deposit": amount});
                        ("open", body, amount)
                    } else {
                        let amount = 1 + (i % 9) as u64;
                        ("deposit", json!({"amount": amount}), amount)
                    };
                    let subject = account_subject(&account, command);
                    let answered =
                        send_until_answered(&client, &subject, &body, &command_id).await?;
                    done.push(expect_accepted(&account, &command_id, amount, answered)?);
                    acked.fetch_add(1, Ordering::Relaxed);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                Ok(done)
            });
        }
        Load { acked, stop, tasks }
    }

    /// Commands accepted so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `count` commands were accepted in all; fails after `timeout`, or at once if a
    /// client failed.
    pub async fn wait_for_acks(&mut self, count: usize, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        while self.acked() < count {
            if let Some(joined) = self.tasks.try_join_next() {
                let done = joined.context("a load client panicked")??;
                bail!(
                    "a load client finished after {} commands, before {count} were accepted",
                    done.len()
                );
            }
            if started.elapsed() >= timeout {
                bail!(
                    "{} of {count} commands accepted after {timeout:?}",
                    self.acked()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Tells the clients to stop after their current command and returns what they had
    /// accepted, or the first client's error.
    pub async fn finish(mut self) -> Result<Vec<Acked>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            all.extend(joined.context("a load client panicked")??);
        }
        Ok(all)
    }
}

/// What the stream holds of the acknowledged commands.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Commands acknowledged.
    pub acked: usize,
    /// Events their replies name.
    pub expected: usize,
    /// Events in the stream.
    pub stored: usize,
    /// Events stored more than once (beyond the first copy).
    pub duplicates: usize,
    /// Acknowledged commands whose events are missing, in part or whole.
    pub lost: usize,
    /// Stored events of no acknowledged command.
    pub strays: usize,
    /// Requests resent in all.
    pub resends: u64,
    /// `conflict` answers resent.
    pub conflicts: u64,
    /// `unavailable` answers resent.
    pub unavailable: u64,
    /// Requests that timed out or found no responder, resent.
    pub unanswered: u64,
    /// The longest time from a command's first request to its acceptance.
    pub longest_wait: Duration,
    /// What is wrong, one line each (at most 20).
    pub problems: Vec<String>,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acked {} commands, {} events expected, {} stored, {} duplicates, {} lost, {} strays; \
             {} resends ({} conflict, {} unavailable, {} unanswered); longest wait {:.2?}",
            self.acked,
            self.expected,
            self.stored,
            self.duplicates,
            self.lost,
            self.strays,
            self.resends,
            self.conflicts,
            self.unavailable,
            self.unanswered,
            self.longest_wait
        )
    }
}

impl Figures {
    /// Nothing lost, repeated or stray, and no other problem.
    pub fn exact(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.strays == 0 && self.problems.is_empty()
    }

    fn problem(&mut self, problem: String) {
        if self.problems.len() < 20 {
            self.problems.push(problem);
        }
    }
}

/// Reads the whole account stream and compares it with the acknowledged commands: each one's
/// events, by the `jetfn-command-id` header, stored exactly once, on its account's subject, of
/// the types its reply named, the last at the reply's sequence; and no event of a command that
/// was not acknowledged. Also returns the events read.
pub async fn check_exactly_once(
    client: &async_nats::Client,
    acked: &[Acked],
) -> Result<(Figures, Vec<StoredMessage>)> {
    let events = stored_messages(client, ACCOUNT_STREAM, None).await?;
    let mut by_command: BTreeMap<String, Vec<&StoredMessage>> = BTreeMap::new();
    for event in &events {
        by_command
            .entry(event.header(header::COMMAND_ID))
            .or_default()
            .push(event);
    }
    let mut figures = Figures {
        acked: acked.len(),
        stored: events.len(),
        ..Figures::default()
    };
    let mut known = HashSet::new();
    for command in acked {
        known.insert(command.command_id.as_str());
        let answered = &command.answered;
        figures.expected += command.events.len();
        figures.resends += u64::from(answered.attempts - 1);
        figures.conflicts += u64::from(answered.conflicts);
        figures.unavailable += u64::from(answered.unavailable);
        figures.unanswered += u64::from(answered.unanswered);
        figures.longest_wait = figures
            .longest_wait
            .max(answered.answered_at - answered.first_sent);
        let stored = by_command
            .get(&command.command_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let want = command.events.len();
        if stored.len() < want {
            figures.lost += 1;
            figures.problem(format!(
                "{} acknowledged {want} events, {} stored",
                command.command_id,
                stored.len()
            ));
            continue;
        }
        if stored.len() > want {
            figures.duplicates += stored.len() - want;
            figures.problem(format!(
                "{} acknowledged {want} events, {} stored at {:?}",
                command.command_id,
                stored.len(),
                stored.iter().map(|e| e.seq).collect::<Vec<_>>()
            ));
            continue;
        }
        let subject = account_event_subject(&command.account);
        let types: Vec<String> = stored.iter().map(|e| e.header(header::CE_TYPE)).collect();
        let last = stored.last().map_or(0, |e| e.seq);
        if types != command.events
            || last != command.seq
            || stored.iter().any(|e| e.subject != subject)
        {
            figures.problem(format!(
                "{}: reply says {:?} ending at {} on {subject}, the stream has {types:?} ending at \
                 {last} on {:?}",
                command.command_id,
                command.events,
                command.seq,
                stored
                    .iter()
                    .map(|e| e.subject.as_str())
                    .collect::<Vec<_>>()
            ));
        }
    }
    for (command_id, stored) in &by_command {
        if !known.contains(command_id.as_str()) {
            figures.strays += stored.len();
            figures.problem(format!(
                "{} stored events of unacknowledged command {command_id:?}",
                stored.len()
            ));
        }
    }
    Ok((figures, events))
}

/// The log line of a command function that serves.
pub const FUNCTION_READY: &str = "command function ready";
/// The log line of a projection that runs.
pub const PROJECTION_READY: &str = "projection function ready";

/// Spawns function binary `name` (`account`, `account-projection`) with `env` and waits until
/// it logs that it serves.
pub async fn function_process(
    name: &str,
    env: &[(&str, String)],
    patience: Duration,
) -> Result<FunctionProcess> {
    let ready = if name.ends_with("projection") {
        PROJECTION_READY
    } else {
        FUNCTION_READY
    };
    let mut process = FunctionProcess::spawn(name, env)?;
    process.wait_for_log(ready, patience).await?;
    Ok(process)
}

/// Prints the figures of `test`, then panics unless every acknowledged command's events are
/// stored exactly once (none lost, none repeated, none of an unacknowledged command).
pub async fn assert_exactly_once(
    test: &str,
    client: &async_nats::Client,
    acked: &[Acked],
) -> Figures {
    let (figures, _) = match check_exactly_once(client, acked).await {
        Ok(checked) => checked,
        Err(e) => panic!("{test}: reading the stream: {e:#}"),
    };
    println!("{test}: {figures}");
    assert!(
        figures.exact(),
        "{test}: {figures}\n{}",
        figures.problems.join("\n")
    );
    figures
}

/// Waits until the projection (one partition) has caught up with the stream, then panics unless
/// the live read model and its change feed equal a fold of the stream.
pub async fn assert_read_model_exact(
    client: &async_nats::Client,
    redis: &RedisServer,
    patience: Duration,
) {
    let checked = async {
        wait_until_caught_up(client, redis, 1, patience).await?;
        let live = live_generation(redis).await?;
        check_read_side(client, redis, live, 1, FeedOrder::Stream).await
    };
    if let Err(e) = checked.await {
        panic!("the read model is not exact: {e:#}");
    }
}

/// The first acceptance at or after `since`, as time after `since`.
pub fn first_ack_after(acked: &[Acked], since: Instant) -> Option<Duration> {
    acked
        .iter()
        .map(|a| a.answered.answered_at)
        .filter(|at| *at >= since)
        .min()
        .map(|at| at - since)
}

/// Commands sent before `at` and accepted after it: those a fault caught in flight.
pub fn in_flight_at(acked: &[Acked], at: Instant) -> Vec<&Acked> {
    acked
        .iter()
        .filter(|a| a.answered.first_sent <= at && a.answered.answered_at > at)
        .collect()
}

/// A duration for a figure line: seconds with two decimals, or `never`.
pub fn secs(duration: Option<Duration>) -> String {
    duration.map_or("never".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()))
}

/// Panics, naming the process and showing its log, unless it still runs.
pub fn assert_running(process: &mut FunctionProcess) {
    let status = match process.try_status() {
        Ok(status) => status,
        Err(e) => panic!("{}: {e:#}", process.name()),
    };
    assert!(
        status.is_none(),
        "{} exited ({status:?}) instead of riding out the fault; log:\n{}",
        process.name(),
        process.log()
    );
}

/// The longest time between two consecutive acceptances (or from `from` to the first one)
/// within `from..=to`: how long no command got through.
pub fn longest_silence(acked: &[Acked], from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = acked
        .iter()
        .map(|a| a.answered.answered_at)
        .filter(|at| *at >= from && *at <= to)
        .collect();
    times.sort();
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for at in times {
        longest = longest.max(at - previous);
        previous = at;
    }
    longest
}

//! Workload helpers: valid account commands sent by many concurrent clients, a small
//! deterministic random number generator, bounded polling, and the account stream's last
//! sequence.

use crate::commands::{ACCOUNT_STREAM, send, stream};
use anyhow::{Context, Result, bail};
use jetfn::Reply;
use jetfn::command::ErrorKind;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The stream's last sequence (0 when the stream is empty or missing).
pub async fn stream_last_seq(client: &async_nats::Client) -> Result<u64> {
    let mut stream = stream(client, ACCOUNT_STREAM).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// Polls `probe` every 50 ms until it yields a value or `timeout` passes; the error names `what`
/// and the last thing the probe said.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        let last = match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "not yet".to_owned(),
            Err(err) => format!("{err:#}"),
        };
        if started.elapsed() >= timeout {
            bail!("{what}: not within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a workload sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Produced {
    /// Accepted commands.
    pub accepted: u64,
    /// Rejected commands (some are sent on purpose).
    pub rejected: u64,
    /// Events the accepted commands wrote, by their replies.
    pub events: u64,
}

/// A small deterministic random number generator (splitmix64): the same seed gives the same
/// numbers, so a workload is reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// An index in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    New,
    Open(u64),
    Closed,
}

struct Slot {
    id: String,
    renewals: u32,
    state: State,
}

/// Sends real account commands over NATS from `tasks` concurrent clients, each owning its share of
/// `accounts` account slots, until the replies report at least `min_events` events: opens with
/// and without initial deposits, deposits, withdrawals within the balance, closes after
/// withdrawing to zero (a closed slot continues with a new account), and now and then an
/// overdraft that must be rejected. Balances are tracked on the client side only, to keep the
/// commands valid. Any reply other than accepted or an expected rejection is an error.
pub async fn produce_events(
    client: &async_nats::Client,
    tasks: usize,
    accounts: usize,
    min_events: u64,
) -> Result<Produced> {
    let events = Arc::new(AtomicU64::new(0));
    let mut joins = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let slots: Vec<Slot> = (0..accounts)
            .filter(|n| n % tasks == task)
            .map(|n| Slot {
                id: format!("acc{n}"),
                renewals: 0,
                state: State::New,
            })
            .collect();
        if slots.is_empty() {
            continue;
        }
        joins.spawn(client_task(
            client.clone(),
            task as u64,
            slots,
            events.clone(),
            min_events,
        ));
    }
    let mut produced = Produced::default();
    while let Some(joined) = joins.join_next().await {
        let one = joined.context("a workload task panicked")??;
        produced.accepted += one.accepted;
        produced.rejected += one.rejected;
        produced.events += one.events;
    }
    Ok(produced)
}

async fn client_task(
    client: async_nats::Client,
    task: u64,
    mut slots: Vec<Slot>,
    shared_events: Arc<AtomicU64>,
    min_events: u64,
) -> Result<Produced> {
    let mut rng = Rng::new(0x5eed_0000 + task);
    let mut produced = Produced::default();
    while shared_events.load(Ordering::Relaxed) < min_events {
        let n = rng.below(slots.len());
        let slot = &mut slots[n];
        let id = slot.id.clone();
        // (command, body, expect rejection, state after acceptance)
        let mut steps: Vec<(&str, serde_json::Value, bool, State)> = Vec::new();
        match slot.state {
            State::New => {
                let deposit = if rng.next_u64().is_multiple_of(3) {
                    0
                } else {
                    rng.between(1, 1000)
                };
                let body = if deposit == 0 {
                    json!({"owner": format!("Owner of {id}")})
                } else {
                    json!({"owner": format!("Owner of {id}"), "initial_deposit": deposit})
                };
                steps.push(("open", body, false, State::Open(deposit)));
            }
            State::Open(balance) => match rng.next_u64() % 100 {
                0..=1 => {
                    if balance > 0 {
                        steps.push((
                            "withdraw",
                            json!({"amount": balance}),
                            false,
                            State::Open(0),
                        ));
                    }
                    steps.push(("close", json!({}), false, State::Closed));
                }
                2 => steps.push((
                    "withdraw",
                    json!({"amount": balance + 1}),
                    true,
                    State::Open(balance),
                )),
                r if r < 55 || balance == 0 => {
                    let amount = rng.between(1, 500);
                    steps.push((
                        "deposit",
                        json!({"amount": amount}),
                        false,
                        State::Open(balance + amount),
                    ));
                }
                _ => {
                    let amount = rng.between(1, balance);
                    steps.push((
                        "withdraw",
                        json!({"amount": amount}),
                        false,
                        State::Open(balance - amount),
                    ));
                }
            },
            State::Closed => {
                slot.renewals += 1;
                let base = slot.id.split('-').next().unwrap_or_default().to_owned();
                slot.id = format!("{base}-r{}", slot.renewals);
                slot.state = State::New;
                continue;
            }
        }
        for (command, body, expect_rejection, after) in steps {
            let sent = send(&client, &id, command, body.clone(), None)
                .await
                .with_context(|| format!("{command} {body} on {id}"))?;
            match (&sent.reply, expect_rejection) {
                (Reply::Accepted(accepted), false) => {
                    produced.accepted += 1;
                    let written = accepted.events.len() as u64;
                    produced.events += written;
                    shared_events.fetch_add(written, Ordering::Relaxed);
                    slot.state = after;
                }
                (Reply::Failed(failure), true) if failure.kind == ErrorKind::Rejected => {
                    produced.rejected += 1;
                }
                (reply, _) => bail!(
                    "{command} {body} on {id} (expected {}): got {reply:?}",
                    if expect_rejection {
                        "a rejection"
                    } else {
                        "acceptance"
                    }
                ),
            }
        }
    }
    Ok(produced)
}

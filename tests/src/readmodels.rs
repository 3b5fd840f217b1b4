//! Helpers for projection tests: run the account projection, and check its Redis read model
//! against a fold of the stream, key by key.

use crate::commands::{ACCOUNT_STREAM, StoredMessage, stored_messages};
use crate::{NatsServer, RedisServer};
use anyhow::{Context, Result, bail, ensure};
use jetfn::projection::RunningProjection;
use jetfn::readmodel::{Keys, ReadModel};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The account projection's name.
pub const PROJECTION: &str = "account-balances";

/// A configuration for the account function and projection against these servers.
pub fn projection_config(nats: &NatsServer, redis: &RedisServer) -> jetfn::Config {
    let mut config = crate::commands::account_config(nats);
    config.redis.url = jetfn::config::Secret::new(redis.url());
    config.projection.rebuild_grace = Duration::from_millis(500);
    config
}

/// Starts the account projection in this process.
pub async fn start_projection(config: jetfn::Config) -> Result<RunningProjection> {
    jetfn::projection_function(account_projection::AccountBalances)
        .with_config(config)
        .start()
        .await
        .context("starting the account projection")
}

/// One account as the read model should show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpectedAccount {
    /// Holder.
    pub owner: String,
    /// Balance.
    pub balance: i64,
    /// `open` or `closed`.
    pub status: String,
    /// Events applied.
    pub version: u64,
    /// Last event's sequence.
    pub seq: u64,
}

/// The read model a fold of the stream predicts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    /// By account id.
    pub accounts: BTreeMap<String, ExpectedAccount>,
    /// The stream's last sequence.
    pub last_seq: u64,
}

impl Expected {
    /// Folds every account event of the stream.
    pub fn fold(events: &[StoredMessage]) -> Result<Expected> {
        let mut expected = Expected::default();
        for event in events {
            expected.last_seq = expected.last_seq.max(event.seq);
            let Some(id) = event.subject.strip_prefix("evt.account.") else {
                continue;
            };
            let account = expected.accounts.entry(id.to_owned()).or_default();
            let amount = || event.payload["amount"].as_i64().context("amount");
            match event.header("ce-type").as_str() {
                "AccountOpened" => {
                    account.owner = event.payload["owner"].as_str().context("owner")?.to_owned();
                    account.status = "open".into();
                }
                "MoneyDeposited" => account.balance += amount()?,
                "MoneyWithdrawn" => account.balance -= amount()?,
                "AccountClosed" => account.status = "closed".into(),
                // Anything else is not an account event this projection applies.
                _ => continue,
            }
            account.version += 1;
            account.seq = event.seq;
        }
        Ok(expected)
    }

    /// Open accounts by balance.
    pub fn open_by_balance(&self) -> BTreeMap<String, i64> {
        self.accounts
            .iter()
            .filter(|(_, a)| a.status == "open")
            .map(|(id, a)| (id.clone(), a.balance))
            .collect()
    }
}

/// Reads the stream and compares every key of the live read model with the fold of it. Also
/// checks that every partition's checkpoint equals the stream's last sequence.
pub async fn check_read_model(
    client: &async_nats::Client,
    redis: &RedisServer,
    partitions: u32,
) -> Result<()> {
    let events = stored_messages(client, ACCOUNT_STREAM, None).await?;
    let expected = Expected::fold(&events)?;
    let model = ReadModel::connect(&redis.url(), PROJECTION).await?;
    let generation = model
        .active_generation()
        .await?
        .context("no active read-model version")?;
    let keys = Keys::new(PROJECTION);
    let mut connection = redis.connect().await?;

    let checkpoints = model.checkpoints(generation).await?;
    ensure!(
        checkpoints.len() == partitions as usize,
        "expected {partitions} checkpoints, found {checkpoints:?}"
    );
    for (partition, seq) in &checkpoints {
        ensure!(
            *seq == expected.last_seq,
            "partition {partition} checkpoint {seq} != stream last sequence {}",
            expected.last_seq
        );
    }

    let pattern = format!("{}*", keys.key(generation, "account:"));
    let stored_accounts: Vec<String> = connection.keys(pattern).await?;
    ensure!(
        stored_accounts.len() == expected.accounts.len(),
        "{} account hashes in Redis, {} accounts in the stream",
        stored_accounts.len(),
        expected.accounts.len()
    );
    for (id, account) in &expected.accounts {
        let key = keys.key(generation, &format!("account:{id}"));
        let hash: BTreeMap<String, String> = connection.hgetall(&key).await?;
        let want = BTreeMap::from([
            ("owner".to_owned(), account.owner.clone()),
            ("balance".to_owned(), account.balance.to_string()),
            ("status".to_owned(), account.status.clone()),
            ("version".to_owned(), account.version.to_string()),
            ("seq".to_owned(), account.seq.to_string()),
        ]);
        if hash != want {
            bail!("{key}: Redis has {hash:?}, the stream folds to {want:?}");
        }
    }

    let ranked: Vec<(String, i64)> = connection
        .zrange_withscores(
            keys.key(generation, account_projection::OPEN_BY_BALANCE),
            0,
            -1,
        )
        .await?;
    let ranked: BTreeMap<String, i64> = ranked.into_iter().collect();
    ensure!(
        ranked == expected.open_by_balance(),
        "open-by-balance {ranked:?} != {:?}",
        expected.open_by_balance()
    );

    let totals: BTreeMap<String, i64> = connection
        .hgetall(keys.key(generation, account_projection::TOTALS))
        .await?;
    let open = expected.open_by_balance();
    let want_open = open.len() as i64;
    let want_total: i64 = open.values().sum();
    ensure!(
        totals.get("open_accounts").copied().unwrap_or(0) == want_open
            && totals.get("total_balance").copied().unwrap_or(0) == want_total,
        "totals {totals:?} != open_accounts {want_open}, total_balance {want_total}"
    );
    Ok(())
}

/// Waits (bounded) until all `partitions` checkpoints of the live read model reach the stream's
/// last sequence.
pub async fn wait_until_caught_up(
    client: &async_nats::Client,
    redis: &RedisServer,
    partitions: u32,
    timeout: Duration,
) -> Result<()> {
    let model = ReadModel::connect(&redis.url(), PROJECTION).await?;
    let started = Instant::now();
    let mut stream = crate::commands::stream(client, ACCOUNT_STREAM).await?;
    loop {
        let last = stream.info().await?.state.last_sequence;
        match model.wait_for(last, Duration::from_millis(200)).await {
            Ok(()) => {
                let generation = model.active_generation().await?.unwrap_or(0);
                if model.checkpoints(generation).await?.len() == partitions as usize {
                    return Ok(());
                }
                ensure!(
                    started.elapsed() < timeout,
                    "not all {partitions} partitions reported"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) if started.elapsed() < timeout => {}
            Err(err) => bail!("not caught up after {timeout:?}: {err}"),
        }
    }
}

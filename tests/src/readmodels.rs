//! Helpers for projection tests: run the account function and projection ([`ReadSide`]), ask
//! what the read model, its change feed and the projection's consumer say, and check the read
//! model against a fold of the stream, key by key.

use crate::commands::{ACCOUNT_STREAM, StoredMessage, start_account, stored_messages, stream};
use crate::{NatsServer, RedisServer};
use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::consumer::pull;
use jetfn::command::RunningFunction;
use jetfn::projection::RunningProjection;
use jetfn::readmodel::{Keys, ReadModel};
use redis::AsyncCommands;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// The account function and the account projection running in this process against private
/// servers, plus a client: how most read-side tests start. The fields are public so that a test
/// can move the function or the projection out to stop it.
pub struct ReadSide {
    /// The NATS server.
    pub nats: NatsServer,
    /// The Redis server.
    pub redis: RedisServer,
    /// The configuration the function and the projection run with.
    pub config: jetfn::Config,
    /// A client of `nats`.
    pub client: async_nats::Client,
    /// The account command function.
    pub function: RunningFunction,
    /// The account projection.
    pub projection: RunningProjection,
}

impl ReadSide {
    /// Installs test tracing, starts both servers, then the function and the projection with
    /// [`projection_config`], and connects a client.
    pub async fn start() -> Result<ReadSide> {
        Self::start_with(|_| {}).await
    }

    /// Like [`ReadSide::start`], with `tweak` applied to the configuration before the function
    /// and the projection start.
    pub async fn start_with(tweak: impl FnOnce(&mut jetfn::Config)) -> Result<ReadSide> {
        crate::init_tracing();
        let nats = NatsServer::start().await?;
        let redis = RedisServer::start().await?;
        let mut config = projection_config(&nats, &redis);
        tweak(&mut config);
        let function = start_account(config.clone()).await?;
        let projection = start_projection(config.clone()).await?;
        let client = nats.connect().await?;
        Ok(ReadSide {
            nats,
            redis,
            config,
            client,
            function,
            projection,
        })
    }
}

/// The live version of the account read model, or an error while no version is live.
pub async fn live_generation(redis: &RedisServer) -> Result<u64> {
    ReadModel::connect(&redis.url(), PROJECTION)
        .await?
        .active_generation()
        .await?
        .context("no active read-model version")
}

/// The live version of the account read model and its least checkpoint (0 while a partition has
/// none), or `None` while no version is live.
pub async fn read_model_checkpoint(redis_url: &str, partitions: u32) -> Result<Option<(u64, u64)>> {
    let model = ReadModel::connect(redis_url, PROJECTION).await?;
    let Some(generation) = model.active_generation().await? else {
        return Ok(None);
    };
    let checkpoints = model.checkpoints(generation).await?;
    let least = if checkpoints.len() < partitions as usize {
        0
    } else {
        checkpoints.iter().map(|(_, seq)| *seq).min().unwrap_or(0)
    };
    Ok(Some((generation, least)))
}

/// The stream sequence up to which the durable consumer `name` of the account stream has every
/// message acknowledged.
pub async fn consumer_ack_floor(client: &async_nats::Client, name: &str) -> Result<u64> {
    let stream = stream(client, ACCOUNT_STREAM).await?;
    let mut consumer = stream
        .get_consumer::<pull::Config>(name)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
    let info = consumer.info().await?;
    Ok(info.ack_floor.stream_sequence)
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
        let names = jetfn::wire::AggregateNames::new("account", &jetfn::Config::default())?;
        let prefix = format!("{}.", names.event_prefix);
        for event in events {
            expected.last_seq = expected.last_seq.max(event.seq);
            let Some(id) = event.subject.strip_prefix(&prefix) else {
                continue;
            };
            let account = expected.accounts.entry(id.to_owned()).or_default();
            let amount = || event.payload["amount"].as_i64().context("amount");
            match event.header(jetfn::wire::header::CE_TYPE).as_str() {
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
    let generation = live_generation(redis).await?;
    let model = ReadModel::connect(&redis.url(), PROJECTION).await?;
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

/// How the entries of a change feed must be ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedOrder {
    /// The whole feed in stream order, as one partition writes it.
    Stream,
    /// Each account's entries in stream order; partitions interleave the accounts.
    PerAccount,
}

/// Checks the change feed of read-model version `generation` against the account stream: every
/// stream sequence has exactly one entry (the stream holds only account events, each of which
/// writes, and denies deletes, so its sequences have no gaps), except the oldest ones once the
/// feed holds its configured length (those it trimmed), each entry names its account, each
/// account's entries are in stream order and, with [`FeedOrder::Stream`], so is the whole feed.
/// The error names what is missing, repeated, extra or out of order.
pub async fn check_change_feed(
    client: &async_nats::Client,
    redis: &RedisServer,
    generation: u64,
    order: FeedOrder,
) -> Result<()> {
    let mut connection = redis.connect().await?;
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(Keys::new(PROJECTION).changes(generation))
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await?;
    let mut feed = Vec::with_capacity(entries.len());
    for (entry, fields) in &entries {
        let seq: u64 = fields
            .get("seq")
            .and_then(|seq| seq.parse().ok())
            .with_context(|| format!("change feed entry {entry} has no seq"))?;
        let id = fields
            .get("id")
            .with_context(|| format!("change feed entry {entry} has no id"))?;
        feed.push((seq, id.as_str()));
    }

    let state = stream(client, ACCOUNT_STREAM)
        .await?
        .info()
        .await?
        .state
        .clone();
    let events: BTreeSet<u64> = if state.messages == 0 {
        BTreeSet::new()
    } else {
        ensure!(
            state.messages == state.last_sequence + 1 - state.first_sequence,
            "the stream has gaps: {state:?}"
        );
        (state.first_sequence..=state.last_sequence).collect()
    };

    let mut counts = BTreeMap::<u64, u32>::new();
    let mut last_by_account = HashMap::<&str, u64>::new();
    let mut account_disorder = Vec::new();
    for (seq, id) in &feed {
        *counts.entry(*seq).or_default() += 1;
        if let Some(previous) = last_by_account.insert(id, *seq)
            && previous >= *seq
        {
            account_disorder.push(format!("account {id}: {previous} before {seq}"));
        }
    }
    let repeated: Vec<u64> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(seq, _)| *seq)
        .collect();
    let missing = not_trimmed(
        events
            .iter()
            .copied()
            .filter(|seq| !counts.contains_key(seq))
            .collect(),
        feed.len(),
        counts.keys().next().copied(),
        jetfn::Config::default().projection.change_feed_len,
    );
    let extra: Vec<u64> = counts
        .keys()
        .copied()
        .filter(|seq| !events.contains(seq))
        .collect();
    let stream_disorder = match order {
        FeedOrder::Stream => feed.windows(2).filter(|w| w[0].0 >= w[1].0).count(),
        FeedOrder::PerAccount => 0,
    };
    if repeated.is_empty()
        && missing.is_empty()
        && extra.is_empty()
        && account_disorder.is_empty()
        && stream_disorder == 0
    {
        return Ok(());
    }
    let first = |seqs: &[u64]| seqs.iter().take(10).copied().collect::<Vec<_>>();
    bail!(
        "change feed of version {generation} has {} entries for stream {}..={} ({} events): \
         missing {} {:?}, repeated {} {:?}, extra {} {:?}, {stream_disorder} out of stream \
         order, {} out of account order {:?}",
        feed.len(),
        state.first_sequence,
        state.last_sequence,
        events.len(),
        missing.len(),
        first(&missing),
        repeated.len(),
        first(&repeated),
        extra.len(),
        first(&extra),
        account_disorder.len(),
        account_disorder.iter().take(10).collect::<Vec<_>>()
    )
}

/// The events `missing` from a change feed of `held` entries, the oldest at `oldest`, that it did
/// not trim. The feed keeps about its last `kept` entries (`XTRIM MAXLEN ~`, which never trims
/// below that): once it holds that many, the events older than all of them were trimmed, not
/// lost. A hole anywhere else is lost.
fn not_trimmed(missing: Vec<u64>, held: usize, oldest: Option<u64>, kept: u64) -> Vec<u64> {
    let trimmed = held as u64 >= kept && oldest.is_some_and(|o| missing.iter().all(|m| *m < o));
    if trimmed { Vec::new() } else { missing }
}

/// Checks version `generation` of the read model against the stream: its change feed with
/// [`check_change_feed`], then, with `partitions` checkpoints, every key of the live version with
/// [`check_read_model`]. A read-model error carries the change feed's verdict too.
pub async fn check_read_side(
    client: &async_nats::Client,
    redis: &RedisServer,
    generation: u64,
    partitions: u32,
    order: FeedOrder,
) -> Result<()> {
    let feed = check_change_feed(client, redis, generation, order).await;
    check_read_model(client, redis, partitions)
        .await
        .map_err(|e| e.context(format!("change feed: {feed:?}")))?;
    feed
}

/// Creates the Redis ACL user `user` with `password` and every right, and switches the default
/// user off: from then on only `user` gets in.
pub async fn only_acl_user(redis: &RedisServer, user: &str, password: &str) -> Result<()> {
    let mut connection = redis.connect().await?;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            user,
            "on",
            &format!(">{password}"),
            "~*",
            "&*",
            "+@all",
        ])
        .query_async(&mut connection)
        .await?;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query_async(&mut connection)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::not_trimmed;

    #[test]
    fn a_full_feed_may_lack_only_the_oldest_events() {
        // Trimmed: the feed is full and lacks only what precedes all it holds.
        assert_eq!(
            not_trimmed(vec![1, 2, 3], 100, Some(4), 100),
            Vec::<u64>::new()
        );
        // A hole after the oldest entry is lost, full feed or not.
        assert_eq!(not_trimmed(vec![1, 7], 100, Some(4), 100), vec![1, 7]);
        // A feed shorter than its length was never trimmed: what it lacks is lost.
        assert_eq!(not_trimmed(vec![1, 2], 99, Some(3), 100), vec![1, 2]);
        assert_eq!(not_trimmed(vec![1], 0, None, 100), vec![1]);
    }
}

//! The projection path end to end (issue 10): the release `account-projection` binary as child
//! processes catching up a seeded backlog and following live commands, next to a raw JetStream
//! pull read of the same backlog and raw pipelined Redis writes, measured in the same run.
//!
//! Run with `just bench` (it builds the release binaries first). Prints a table
//! `what | jetfn | raw | ratio | target`; ratios are jetfn ÷ raw. Results are reported, never
//! asserted. Sizes can be lowered for a quick look with `JETFN_BENCH_SCALE` (e.g. `0.2`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use common::*;
use futures::TryStreamExt;
use jetfn::readmodel::{Keys, ReadModel};
use jetfn_tests::readmodels::PROJECTION;
use jetfn_tests::workload::poll;
use jetfn_tests::{FunctionProcess, NatsServer, RedisServer};
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Scales every count (`JETFN_BENCH_SCALE`, default 1).
fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("JETFN_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(1)
}

const PROJECTION_BINARY: &str = "account-projection";
/// Every how many live commands the freshness run also times `ReadModel::wait_for`.
const WAIT_FOR_EVERY: usize = 20;
/// Accounts in the backlog; each has `EVENTS_PER_ACCOUNT` events.
const ACCOUNTS: usize = 5_000;

/// Private servers, the account function (it provisions the stream and serves live commands)
/// and a seeded backlog.
struct Setup {
    nats: NatsServer,
    redis: RedisServer,
    client: async_nats::Client,
    function: FunctionProcess,
    accounts: usize,
    last_seq: u64,
}

impl Setup {
    async fn start() -> Result<Setup> {
        let nats = NatsServer::start().await?;
        let redis = RedisServer::start().await?;
        let client = nats.connect().await?;
        let function = spawn_ready("account", &[("NATS_URL", nats.url())]).await?;
        // About 50,000 events: every account opened, then deposits round-robin, so the
        // partitions' events interleave as they would live.
        let accounts = scaled(ACCOUNTS);
        let per_account = 10;
        let events = (0..per_account).flat_map(move |round| {
            (0..accounts).map(move |k| {
                let id = format!("p{k}");
                let event = if round == 0 {
                    account::Event::AccountOpened {
                        owner: format!("Owner of {id}"),
                    }
                } else {
                    account::Event::MoneyDeposited { amount: 1 }
                };
                (id, event)
            })
        });
        let seeded = Instant::now();
        let last_seq = seed(&client, "backlog", events).await?;
        eprintln!(
            "  seeded {last_seq} events in {:.1} s",
            seeded.elapsed().as_secs_f64()
        );
        Ok(Setup {
            nats,
            redis,
            client,
            function,
            accounts,
            last_seq,
        })
    }

    fn projection_envs(&self, partitions: u32) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_URL", self.nats.url()),
            ("REDIS_URL", self.redis.url()),
            ("JETFN_PROJECTION__PARTITIONS", partitions.to_string()),
        ]
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let began = Instant::now();
    let binary = release_binary(PROJECTION_BINARY)?;
    release_binary("account")?;
    let mut table = Table::default();

    eprintln!("7. catch-up, 1 partition ...");
    let one = Setup::start().await?;
    println!(
        "# projection path: jetfn `account-projection` ({}) vs raw JetStream and Redis\n\
         nats-server {} (file storage), {}, backlog of {} events over {} accounts\n",
        binary.display(),
        one.client.server_info().version,
        machine(),
        one.last_seq,
        one.accounts
    );
    let one_run = catch_up(&one, 1, 1).await?;
    let (rate_one, raw_read_one, raw_redis) = (one_run.rate, one_run.raw_read, one_run.raw_redis);
    let least_one = one_run.least;
    let amplification_one = amplification(&one.client, one.last_seq).await?;

    eprintln!("9. live freshness at 1,000 commands/s ...");
    let freshness_one = freshness(&one).await?;
    let ceiling_one = one_run.ceiling();
    let (cpu_one, busy_one, raw_cpu_one) = (one_run.cpu, one_run.busy, one_run.raw_cpu);
    let script_one = one_run.script;
    eprintln!("7. catch-up after a restart, 1 partition ...");
    let (restart_one, running) = restart_catch_up(&one, one_run.processes, 1).await?;
    for process in running {
        stop(process).await?;
    }
    let backlog = one.last_seq;
    let Setup {
        function,
        nats,
        redis,
        ..
    } = one;
    stop(function).await?;
    drop((nats, redis));

    eprintln!("7. catch-up, 4 partitions on 2 instances ...");
    let four = Setup::start().await?;
    let four_run = catch_up(&four, 4, 2).await?;
    let (rate_four, raw_read_four) = (four_run.rate, four_run.raw_read);
    let amplification_four = amplification(&four.client, four.last_seq).await?;
    let mirrored_four = mirrored(&four.client, &account_names()?.stream, 4, four.last_seq).await?;
    // A token passes only when all four partitions reach it, three of them by claiming it.
    eprintln!("9. live freshness at 1,000 commands/s, 4 partitions on 2 instances ...");
    let freshness_four = freshness(&four).await?;
    eprintln!("7. catch-up after a restart, 4 partitions on 2 instances ...");
    let (restart_four, running) = restart_catch_up(&four, four_run.processes, 4).await?;
    for process in running {
        stop(process).await?;
    }
    let Setup { function, .. } = four;
    stop(function).await?;

    table.ratio(
        &format!("catch-up of {backlog} events, 1 partition (raw: pull read, batch 500, no acks)"),
        rate(rate_one, "events"),
        rate(raw_read_one, "events"),
        ">= 0.50",
    );
    table.ratio(
        "  the least a projection can do: the pull read, each event's writes and change-feed \
         entry pipelined to Redis, no checkpoint, checks or order (raw: pull read)",
        rate(least_one, "events"),
        rate(raw_read_one, "events"),
        "-",
    );
    table.ratio(
        "  catch-up, 1 partition (raw: that least)",
        rate(rate_one, "events"),
        rate(least_one, "events"),
        "-",
    );
    table.plain(
        "CPU per event in that catch-up: Redis / projection / nats-server",
        format!(
            "{:.1} / {:.1} / {:.1} µs ({busy_one:.2} cores busy)",
            cpu_one[0], cpu_one[1], cpu_one[2]
        ),
        "-",
    );
    table.plain(
        "  the same in the raw pull read: nats-server / reader",
        format!("{:.1} / {:.1} µs", raw_cpu_one[0], raw_cpu_one[1]),
        "-",
    );
    table.ratio(
        "  the pull read through a consumer set up as a partition's (ack all, one ack per 500, max_ack_pending 1500, filtered, pinned) (raw: pull read)",
        rate(one_run.acked_read, "events"),
        rate(raw_read_one, "events"),
        "-",
    );
    table.plain(
        "  CPU per event in it: nats-server / reader",
        format!(
            "{:.1} / {:.1} µs",
            one_run.acked_cpu[0], one_run.acked_cpu[1]
        ),
        "-",
    );
    table.ratio(
        "  the most the cores give at the catch-up's CPU per event (raw: pull read)",
        rate(ceiling_one, "events"),
        rate(raw_read_one, "events"),
        "-",
    );
    table.plain(
        "  Redis's time per event in the apply steps (its own clock, so also while it waits for a core): all told / in the Redis commands they call (the rest is the Lua interpreter's)",
        format!(
            "{:.1} / {:.1} µs",
            script_one.total, script_one.commands
        ),
        "-",
    );
    table.ratio(
        "  the most Redis's one thread gives at its CPU per event in the catch-up (raw: pull read)",
        rate(1e6 / cpu_one[0].max(f64::MIN_POSITIVE), "events"),
        rate(raw_read_one, "events"),
        "-",
    );
    table.ratio(
        "catch-up, 4 partitions on 2 instances (raw: pull read of that run's backlog)",
        rate(rate_four, "events"),
        rate(raw_read_four, "events"),
        "-",
    );
    table.ratio(
        "catch-up, 4 partitions on 2 instances vs 1 partition",
        rate(rate_four, "events"),
        rate(rate_one, "events"),
        ">= 1.00",
    );
    table.ratio(
        "catch-up after a restart (a second backlog, the view already filled), 4 partitions on 2 instances vs 1 partition",
        rate(restart_four, "events"),
        rate(restart_one, "events"),
        "-",
    );
    table.ratio(
        "catch-up, 1 partition (raw: pipelined Redis HSET, MULTI of 100)",
        rate(rate_one, "events"),
        rate(raw_redis, "writes"),
        "-",
    );
    table.plain(
        "events delivered per event stored, 1 partition",
        format!("{amplification_one:.2}"),
        "-",
    );
    table.plain(
        "events delivered per event stored, 4 partitions",
        format!("{amplification_four:.2}"),
        "<= 1.20",
    );
    table.plain(
        "  plus the server's read to fill the partitioned view (shared by projections with 4 partitions)",
        format!("{mirrored_four:.2}"),
        "-",
    );
    table.plain(
        &format!(
            "live freshness p50 / p99, reply to read model (ReadModel::wait_for, 1 in {WAIT_FOR_EVERY}), at {:.0} commands/s",
            freshness_one.achieved
        ),
        format!(
            "{} / {}",
            ms(freshness_one.wait_for.p50()).text,
            ms(freshness_one.wait_for.p99()).text
        ),
        "p99 < 5 ms",
    );
    table.plain(
        "  the same with 4 partitions on 2 instances",
        format!(
            "{} / {}",
            ms(freshness_four.wait_for.p50()).text,
            ms(freshness_four.wait_for.p99()).text
        ),
        "-",
    );
    table.plain(
        "live freshness p50 / p99, reply to change-feed entry (XREAD BLOCK follower)",
        format!(
            "{} / {}{}",
            ms(freshness_one.feed.p50()).text,
            ms(freshness_one.feed.p99()).text,
            if freshness_one.unseen > 0 {
                format!(" ({} not seen)", freshness_one.unseen)
            } else {
                String::new()
            }
        ),
        "p99 < 5 ms",
    );
    table.plain(
        "  command reply p50 / p99 at that rate",
        format!(
            "{} / {}{}",
            ms(freshness_one.reply.p50()).text,
            ms(freshness_one.reply.p99()).text,
            if freshness_one.failed > 0 {
                format!(" ({} not accepted)", freshness_one.failed)
            } else {
                String::new()
            }
        ),
        "-",
    );

    println!();
    table.print();
    println!(
        "\nratios are jetfn ÷ raw, both measured in this run; catch-up is timed from spawning the \
         projection process(es) until every checkpoint equals the stream's last sequence; total \
         bench time {:.0} s",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What one catch-up measured.
struct CatchUp {
    /// Events per second, from spawn until every checkpoint reached the end.
    rate: f64,
    /// The projection processes, still running.
    processes: Vec<FunctionProcess>,
    /// The raw pull read of the same backlog, events/s.
    raw_read: f64,
    /// The raw pull read through a consumer with a projection's settings, events/s.
    acked_read: f64,
    /// CPU per event in it, µs: nats-server, the reader.
    acked_cpu: [f64; 2],
    /// Raw pipelined Redis writes/s.
    raw_redis: f64,
    /// The least a projection can do with the backlog, events/s (see `raw_least_projection`).
    least: f64,
    /// CPU per event in the catch-up, µs: Redis, the projection process(es), nats-server.
    cpu: [f64; 3],
    /// The machine's busy cores during the catch-up, on average.
    busy: f64,
    /// CPU per event in the raw pull read, µs: nats-server, the reader.
    raw_cpu: [f64; 2],
    /// Redis's time in the apply steps.
    script: ScriptTime,
}

impl CatchUp {
    /// The most events/s the machine's cores could give at the catch-up's CPU per event, were
    /// they all busy with nothing else.
    fn ceiling(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        cores * 1e6 / self.cpu.iter().sum::<f64>().max(f64::MIN_POSITIVE)
    }
}

/// Raw limits on the setup's backlog, then `instances` projection processes with `partitions`
/// partitions, timed from spawn until every checkpoint reaches the stream's last sequence, with
/// the CPU each part used.
async fn catch_up(setup: &Setup, partitions: u32, instances: usize) -> Result<CatchUp> {
    let names = account_names()?;
    let nats_pid = setup.nats.pid().context("nats-server has no pid")?;
    let reading = CpuUse::start(&[nats_pid, std::process::id()])?;
    let raw_read = raw_pull_read(&setup.client, &names.stream, setup.last_seq).await?;
    let (used, _) = reading.since_start()?;
    let raw_cpu = [0, 1].map(|i| micros_each(used[i], setup.last_seq));
    let reading = CpuUse::start(&[nats_pid, std::process::id()])?;
    let acked_read = raw_acked_pull_read(
        &setup.client,
        &names.stream,
        &names.event_filter(),
        setup.last_seq,
    )
    .await?;
    let (used, _) = reading.since_start()?;
    let acked_cpu = [0, 1].map(|i| micros_each(used[i], setup.last_seq));
    // Also empties Redis again.
    let raw_redis = raw_redis_hset(&setup.redis.url(), 1000).await?;
    let least =
        raw_least_projection(&setup.client, &setup.redis.url(), &names, setup.last_seq).await?;

    let model = ReadModel::connect(&setup.redis.url(), PROJECTION).await?;
    let mut redis = setup.redis.connect().await?;
    // Redis's command statistics from here on are the catch-up's own.
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await?;
    let timed = timed_catch_up(setup, &model, partitions, instances, 0, setup.last_seq).await?;
    let (rate, took, cpu, busy) = (timed.rate, timed.took, timed.cpu, timed.busy);
    let processes = timed.processes;
    eprintln!(
        "  {partitions} partition(s), {instances} instance(s): {rate:.0} events/s \
         (raw pull read {raw_read:.0}/s, raw Redis {raw_redis:.0} writes/s, the least a \
         projection can do {least:.0}/s)"
    );
    let script = script_time(&mut redis, setup.last_seq).await?;
    eprintln!(
        "  redis: the apply steps ran {:.0}% of the catch-up, {:.1} µs per event, of which its \
         commands {:.1} µs",
        script.total * setup.last_seq as f64 / 1e4 / took.as_secs_f64(),
        script.total,
        script.commands
    );
    eprintln!(
        "  CPU per event: Redis {:.1} µs, projection {:.1} µs, nats-server {:.1} µs; {busy:.2} \
         cores busy (raw pull read: nats-server {:.1} µs, reader {:.1} µs)",
        cpu[0], cpu[1], cpu[2], raw_cpu[0], raw_cpu[1]
    );
    Ok(CatchUp {
        rate,
        processes,
        raw_read,
        acked_read,
        acked_cpu,
        raw_redis,
        least,
        cpu,
        busy,
        raw_cpu,
        script,
    })
}

/// Redis's time in the apply steps, µs per event.
#[derive(Debug, Clone, Copy)]
struct ScriptTime {
    /// In the scripts (`EVALSHA`), all told.
    total: f64,
    /// In the commands the scripts called; the rest is the Lua interpreter's.
    commands: f64,
}

/// Reads Redis's command statistics since the last reset, over `events` events: every command
/// but the scripts themselves and the bench's own reads ran inside the apply steps.
async fn script_time(
    redis: &mut redis::aio::MultiplexedConnection,
    events: u64,
) -> Result<ScriptTime> {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await?;
    let (mut total, mut commands) = (0.0, 0.0);
    for line in stats.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let usec = fields
            .split(',')
            .find_map(|kv| kv.strip_prefix("usec="))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        match name {
            "evalsha" | "eval" => total += usec,
            // Calls outside the scripts: the bench's, and the projection's at its start and
            // while it waits (a few GET and HGET there count as the scripts', unnoticeably).
            "config|resetstat" | "info" | "xread" | "xrevrange" | "hgetall" | "setnx" | "scan"
            | "unlink" | "ping" | "client|setinfo" | "hello" | "script|load" | "select" => {}
            _ => commands += usec,
        }
    }
    let each = |usec: f64| usec / events.max(1) as f64;
    Ok(ScriptTime {
        total: each(total),
        commands: each(commands),
    })
}

/// A catch-up timed from spawn, with the CPU each part used.
struct Timed {
    /// Events/s.
    rate: f64,
    took: Duration,
    /// CPU per event, µs: Redis, the projection process(es), nats-server.
    cpu: [f64; 3],
    /// Cores busy on average.
    busy: f64,
    processes: Vec<FunctionProcess>,
}

/// Spawns the processes with [`spawn_until_caught_up`] and times the events after `from` up to
/// `last_seq`, reading the CPU time of Redis, nats-server and the processes meanwhile.
async fn timed_catch_up(
    setup: &Setup,
    model: &ReadModel,
    partitions: u32,
    instances: usize,
    from: u64,
    last_seq: u64,
) -> Result<Timed> {
    let catching_up = CpuUse::start(&[
        setup.redis.pid().context("redis-server has no pid")?,
        setup.nats.pid().context("nats-server has no pid")?,
    ])?;
    let started = Instant::now();
    let processes = spawn_until_caught_up(setup, model, partitions, instances, last_seq).await?;
    let took = started.elapsed();
    let (used, busy) = catching_up.since_start()?;
    let projecting: Duration = processes
        .iter()
        .map(|p| cpu_time(p.pid()))
        .sum::<Result<_>>()?;
    let events = last_seq - from;
    let per_event = |cpu| micros_each(cpu, events);
    Ok(Timed {
        rate: events as f64 / took.as_secs_f64(),
        took,
        cpu: [
            per_event(used[0]),
            per_event(projecting),
            per_event(used[1]),
        ],
        busy,
        processes,
    })
}

/// Spawns `instances` projection processes with `partitions` partitions and waits until every
/// checkpoint reaches `last_seq`. Returns the processes, still running.
async fn spawn_until_caught_up(
    setup: &Setup,
    model: &ReadModel,
    partitions: u32,
    instances: usize,
    last_seq: u64,
) -> Result<Vec<FunctionProcess>> {
    let started = Instant::now();
    let mut processes = Vec::new();
    for _ in 0..instances {
        processes.push(FunctionProcess::spawn(
            PROJECTION_BINARY,
            &setup.projection_envs(partitions),
        )?);
    }
    let deadline = Duration::from_secs(120);
    loop {
        if let Some(generation) = model.active_generation().await? {
            let checkpoints = model.checkpoints(generation).await?;
            if checkpoints.len() == partitions as usize
                && checkpoints.iter().all(|(_, seq)| *seq >= last_seq)
            {
                return Ok(processes);
            }
        }
        if started.elapsed() > deadline {
            bail!(
                "the projection did not catch up within {deadline:?}; log: {}",
                processes
                    .first()
                    .map(FunctionProcess::log)
                    .unwrap_or_default()
            );
        }
        for process in &mut processes {
            if let Some(status) = process.try_status()? {
                bail!("the projection exited ({status}): {}", process.log());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A restart's catch-up: stops `running`, lets a second backlog (9 deposits per account) build
/// up while no projection runs, with the partitioned view, if any, filled by the server as it
/// would be in a deployment, then respawns the processes and times them from spawn until every
/// checkpoint reaches the new end. Returns events/s and the processes, still running.
async fn restart_catch_up(
    setup: &Setup,
    running: Vec<FunctionProcess>,
    partitions: u32,
) -> Result<(f64, Vec<FunctionProcess>)> {
    let instances = running.len();
    for process in running {
        stop(process).await?;
    }
    // The stopped standbys' last pull requests wait at the server until they expire (2.5 s
    // with the default pin timeout). An event that arrives before then makes nats-server pin a
    // dead one, and the new processes stall until a standby sees that and releases the pin
    // (about a second; the pin timeout before 2026-12-03). This row measures catch-up
    // throughput, so its backlog starts once those requests are gone.
    // The projection's pulls expire after half the pin timeout.
    let pull_expiry = jetfn::Config::default().projection.pin_timeout / 2;
    tokio::time::sleep(pull_expiry + Duration::from_millis(500)).await;
    let accounts = setup.accounts;
    let deposits = (0..9).flat_map(move |_| {
        (0..accounts).map(|k| {
            (
                format!("p{k}"),
                account::Event::MoneyDeposited { amount: 1 },
            )
        })
    });
    let last_seq = seed(&setup.client, "restart", deposits).await?;
    if partitions > 1 {
        view_filled(&setup.client, partitions).await?;
    }
    let model = ReadModel::connect(&setup.redis.url(), PROJECTION).await?;
    let from = last_seq - 9 * accounts as u64;
    let timed = timed_catch_up(setup, &model, partitions, instances, from, last_seq).await?;
    eprintln!(
        "  restart after {} more events, {partitions} partition(s), {instances} instance(s): \
         {:.0} events/s; CPU per event: Redis {:.1} µs, projection {:.1} µs, nats-server {:.1} \
         µs; {:.2} cores busy",
        last_seq - from,
        timed.rate,
        timed.cpu[0],
        timed.cpu[1],
        timed.cpu[2],
        timed.busy
    );
    Ok((timed.rate, timed.processes))
}

/// Waits until the partitioned view holds every message of the event stream.
async fn view_filled(client: &async_nats::Client, partitions: u32) -> Result<()> {
    let js = jetstream::new(client.clone());
    let stream = account_names()?.stream;
    let view = jetfn::wire::names::partition_view(&stream, "account", partitions);
    poll(
        &format!("the partitioned view {view} filled"),
        Duration::from_secs(60),
        || async {
            let stored = js.get_stream(&stream).await?.info().await?.state.messages;
            let held = js.get_stream(&view).await?.info().await?.state.messages;
            Ok((held >= stored).then_some(()))
        },
    )
    .await
}

/// Events the partitioned view of `stream` for `partitions` holds, per event in the stream: each
/// was read once more by the server to source it into the view.
async fn mirrored(
    client: &async_nats::Client,
    stream: &str,
    partitions: u32,
    stored: u64,
) -> Result<f64> {
    let js = jetstream::new(client.clone());
    let view = jetfn::wire::names::partition_view(stream, "account", partitions);
    let mut view = js.get_stream(&view).await?;
    let held = view.info().await?.state.messages;
    Ok(held as f64 / stored.max(1) as f64)
}

/// Messages delivered to the projection's consumers (on any stream, counting redeliveries), per
/// message in the event stream.
async fn amplification(client: &async_nats::Client, stored: u64) -> Result<f64> {
    let js = jetstream::new(client.clone());
    let prefix = format!("{PROJECTION}-");
    let mut delivered = 0;
    let streams: Vec<_> = js.streams().try_collect().await?;
    for info in streams {
        let stream = js.get_stream(&info.config.name).await?;
        let consumers: Vec<_> = stream.consumers().try_collect().await?;
        for consumer in consumers {
            if consumer.name.starts_with(&prefix) {
                delivered += consumer.delivered.consumer_sequence;
            }
        }
    }
    Ok(delivered as f64 / stored.max(1) as f64)
}

struct Freshness {
    achieved: f64,
    reply: Samples,
    wait_for: Samples,
    feed: Samples,
    unseen: usize,
    failed: usize,
}

/// Deposits at a steady 1,000/s (1 s warm-up, then 5 s measured) to 1,000 of the backlog's
/// accounts, with the projection live. For each accepted command: the time from its reply until
/// a follower of the change feed saw its `seq` and, for every `WAIT_FOR_EVERY`th command, until
/// `ReadModel::wait_for(seq)` returns.
async fn freshness(setup: &Setup) -> Result<Freshness> {
    let model = ReadModel::connect(&setup.redis.url(), PROJECTION).await?;
    let generation = model
        .active_generation()
        .await?
        .context("no live read-model version")?;
    let feed_key = Keys::new(PROJECTION).changes(generation);

    // The change-feed follower, on its own connection (XREAD BLOCK holds it).
    let seen: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let follower = {
        let seen = seen.clone();
        let mut connection = setup.redis.connect().await?;
        tokio::spawn(async move {
            let mut last = "$".to_owned();
            loop {
                let options = StreamReadOptions::default().block(100).count(1000);
                let reply: StreamReadReply = connection
                    .xread_options(&[&feed_key], &[&last], &options)
                    .await?;
                let now = Instant::now();
                for key in reply.keys {
                    for entry in key.ids {
                        if let Some(seq) = entry.get::<u64>("seq") {
                            seen.lock().expect("not poisoned").insert(seq, now);
                        }
                        last = entry.id;
                    }
                }
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let warm_up = 1000;
    // Load every account used into the function's cache first: a cold load of a short history
    // in this interleaved stream is slow (see the command-path bench), and a thousand of them
    // would otherwise back up the function for seconds.
    let warmed = Instant::now();
    let touch: Vec<_> = (0..setup.accounts.min(warm_up))
        .map(|k| deposit(&format!("p{k}"), 1))
        .collect();
    let run = concurrent(&setup.client, 64, touch).await;
    eprintln!(
        "  loaded {} accounts in {:.1} s (failures: {})",
        run.count(Outcome::Accepted(0)),
        warmed.elapsed().as_secs_f64(),
        run.failures()
    );
    let total = warm_up + scaled(5000);
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    let mut tasks = tokio::task::JoinSet::new();
    let mut measured_from = Instant::now();
    for k in 0..total {
        ticks.tick().await;
        if k == warm_up {
            measured_from = Instant::now();
        }
        let client = setup.client.clone();
        let model = model.clone();
        // The warm-up touches every account used, so each instance serves them warm.
        let (subject, body) = deposit(&format!("p{}", k % setup.accounts.min(warm_up)), 1);
        tasks.spawn(async move {
            let sent = Instant::now();
            let outcome = command(&client, &subject, body, COMMAND_TIMEOUT).await;
            let replied = Instant::now();
            let Outcome::Accepted(seq) = outcome else {
                return (k, None);
            };
            // wait_for on a sample only: each waiting call polls Redis, and a thousand of them
            // at once would load this process and Redis more than the projection does.
            let waited = if k % WAIT_FOR_EVERY == 0 {
                let visible = model.wait_for(seq, Duration::from_secs(5)).await.ok();
                Some(visible.map(|()| replied.elapsed()))
            } else {
                None
            };
            (k, Some((seq, replied - sent, replied, waited)))
        });
    }
    let achieved = (total - warm_up) as f64 / measured_from.elapsed().as_secs_f64();
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        results.push(done?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    follower.abort();
    let seen = seen.lock().expect("not poisoned").clone();
    let (mut reply, mut waits, mut feed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut unseen, mut failed) = (0, 0);
    for (k, result) in results {
        if k < warm_up {
            continue;
        }
        let Some((seq, took, replied, waited)) = result else {
            failed += 1;
            continue;
        };
        reply.push(took);
        match waited {
            Some(Some(waited)) => waits.push(waited),
            Some(None) => failed += 1,
            None => {}
        }
        match seen.get(&seq) {
            Some(at) => feed.push(at.saturating_duration_since(replied)),
            None => unseen += 1,
        }
    }
    Ok(Freshness {
        achieved,
        reply: Samples::new(reply),
        wait_for: Samples::new(waits),
        feed: Samples::new(feed),
        unseen,
        failed,
    })
}

//! `jetfn projection rebuild`: asks a running projection to rebuild its read model, and shows
//! the progress it publishes until the new version is live.

use crate::common::{
    Global, ask_projection, format_duration, parse_duration, projection_name, say, say_json,
};
use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jetfn::wire::names;
use serde::Deserialize;
use serde_json::json;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXAMPLES: &str = "\
Examples:
  jetfn projection rebuild account-balances
  jetfn projection rebuild account-balances --json     # only the result, as JSON

The request goes to jetfn.projection.<name>.rebuild, served by the running projection. It
builds version G+1 of the read model from the first event while version G keeps serving, and
publishes its progress on jetfn.projection.<name>.rebuild.progress; when it has caught up it
switches readers to G+1. On a terminal a progress bar shows the events applied, the rate and
the ETA; otherwise one progress line is printed about every second.";

/// Arguments of `jetfn projection`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Rebuild a projection's read model without downtime, showing progress
    #[command(after_help = EXAMPLES)]
    Rebuild {
        /// The projection, e.g. account-balances
        name: String,
        /// How long to wait for the projection to accept the request
        #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
        /// Give up when no progress arrives for this long
        #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
        idle_timeout: Duration,
    },
}

/// One progress message.
#[derive(Deserialize)]
struct Progress {
    /// Absent on a failure report.
    #[serde(default)]
    generation: Option<u64>,
    #[serde(default)]
    reached: u64,
    #[serde(default)]
    target: u64,
    #[serde(default)]
    events_per_second: f64,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    error: Option<String>,
}

/// Runs `rebuild`.
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let Command::Rebuild {
        name,
        timeout,
        idle_timeout,
    } = args.command;
    let name = projection_name(&name)?;
    let (client, config) = global.connect().await?;
    let progress_subject = names::rebuild_progress(name);
    // Subscribe first, so no progress (not even a quick `done`) is missed.
    let mut progress = client
        .subscribe(progress_subject.clone())
        .await
        .with_context(|| format!("subscribing to {progress_subject}"))?;
    client.flush().await.context("subscribing to progress")?;

    let started = ask_projection(
        &client,
        &config,
        name,
        names::REBUILD,
        &format!("rebuilding {name}"),
        timeout,
    )
    .await?;
    let generation = started
        .get("generation")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow!("the rebuild reply has no generation: {started}"))?;

    let display = Display::new(name, generation, global.json);
    let mut last = None;
    loop {
        let message = match tokio::time::timeout(idle_timeout, progress.next()).await {
            Ok(Some(message)) => message,
            Ok(None) => {
                display.abandon();
                return Err(anyhow!("the connection to NATS closed during the rebuild"));
            }
            Err(_) => {
                display.abandon();
                return Err(anyhow!(
                    "no rebuild progress from {name} for {} (last: {}); the rebuild may still \
                     be running: see `jetfn status`",
                    format_duration(idle_timeout),
                    last.map(|(r, t)| format!("{r}/{t} events"))
                        .unwrap_or_else(|| "none".into())
                ));
            }
        };
        let Ok(update) = serde_json::from_slice::<Progress>(&message.payload) else {
            continue;
        };
        // Another rebuild's report (a failure report may not name its generation).
        if update.generation.is_some_and(|g| g != generation) {
            continue;
        }
        if let Some(error) = update.error {
            display.abandon();
            return Err(anyhow!(
                "rebuilding {name} (generation {generation}) failed: {error}"
            ));
        }
        if update.generation.is_none() {
            continue;
        }
        last = Some((update.reached, update.target));
        display.update(&update);
        if update.done {
            display.finish(&update);
            break;
        }
    }
    if global.json {
        say_json(&json!({ "projection": name, "generation": generation, "done": true }));
    } else {
        say(format!("{name}: rebuilt, generation {generation} is live"));
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal, plain lines otherwise, nothing with `--json`.
enum Display {
    Bar(ProgressBar),
    Lines {
        prefix: String,
        last_line: std::cell::Cell<Option<Instant>>,
    },
    Quiet,
}

impl Display {
    fn new(name: &str, generation: u64, json: bool) -> Display {
        let prefix = format!("{name} g{generation}");
        if json {
            return Display::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            eprintln!("{prefix}: rebuild started");
            return Display::Lines {
                prefix,
                last_line: std::cell::Cell::new(None),
            };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} [{wide_bar:.cyan/blue}] {pos}/{len} events, {msg}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(prefix);
        bar.enable_steady_tick(Duration::from_millis(200));
        Display::Bar(bar)
    }

    fn update(&self, progress: &Progress) {
        match self {
            Display::Bar(bar) => {
                bar.set_length(progress.target.max(progress.reached));
                bar.set_position(progress.reached);
                bar.set_message(format!("{:.0} events/s", progress.events_per_second));
            }
            Display::Lines { prefix, last_line } => {
                let due = last_line
                    .get()
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
                if due || progress.done {
                    last_line.set(Some(Instant::now()));
                    eprintln!(
                        "{prefix}: {}/{} events ({:.0} events/s){}",
                        progress.reached,
                        progress.target,
                        progress.events_per_second,
                        if progress.done { ", done" } else { "" }
                    );
                }
            }
            Display::Quiet => {}
        }
    }

    fn finish(&self, progress: &Progress) {
        if let Display::Bar(bar) = self {
            bar.set_position(progress.reached);
            bar.finish();
        }
    }

    fn abandon(&self) {
        if let Display::Bar(bar) = self {
            bar.abandon();
        }
    }
}

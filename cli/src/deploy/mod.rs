//! `jetfn deploy diff|apply`: JetStream resources (streams, KV buckets, durable pull consumers)
//! declared as JSON files, one per file, compared with the server and applied idempotently.
//! Nothing is ever deleted; destructive changes need `--force`, and changes JetStream cannot make
//! in place (the storage type) are refused even then. Every file is checked against the server
//! before the first change (`check`), so a refused later file does not leave earlier ones applied.

mod check;
pub mod files;
mod plan;

use crate::common::{Global, say, say_json};
use anyhow::{Result, bail};
use plan::{Action, Item, Problem};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  jetfn deploy diff                              # what apply would do, field by field
  jetfn deploy apply                             # create or update; again: \"no changes\"
  jetfn deploy apply --dir ops/jetstream --force # also destructive changes

Each *.json file of the directory (not *.schema.json) declares one resource; the format is the
JSON Schema deploy/jetstream/resource.schema.json:
  {\"kind\":\"stream\",\"config\":{\"name\":\"ACCOUNT_EVENTS\",\"subjects\":[\"evt.account.*\"],
   \"storage\":\"file\",\"num_replicas\":1,\"duplicate_window\":120000000000,\"allow_direct\":true}}
  {\"kind\":\"kv\",\"config\":{\"bucket\":\"jetfn-ledger-account\",\"history\":1,
   \"max_age\":604800000000000,\"storage\":\"file\",\"num_replicas\":1}}
  {\"kind\":\"consumer\",\"stream\":\"ACCOUNT_EVENTS\",\"config\":{\"durable_name\":\"audit\",
   \"ack_policy\":\"explicit\",\"filter_subject\":\"evt.account.*\"}}
config is the JSON of async_nats::jetstream::stream::Config, kv::Config (the fields above plus
description, max_bytes, max_value_size, compression) or consumer::pull::Config; durations are
nanoseconds. Only the fields a file sets are compared and changed.

Destructive changes are refused without --force: changing retention, removing a subject,
lowering num_replicas, and setting max_bytes, max_msgs, max_age or max_msgs_per_subject
(history for KV) below what the stream holds or from unlimited to a limit. A storage change
cannot be made in place and is refused even with --force; so are changes to a consumer's
deliver_policy, opt_start_seq, opt_start_time, ack_policy, replay_policy and max_waiting.
Resources on the server that no file declares are listed as \"not managed\" and never deleted.

Before the first change every file is checked against the server, and if any resource would be
refused nothing is applied: names and subjects, a subject another stream stores or another file
declares, a consumer filter outside its stream's subjects, a consumer's stream that neither
exists nor is declared, a bucket's history (1-64), replicas above 1 on a server that is not
clustered, the account's stream limit. `diff` shows the same refusals. What the server can only
judge by trying (disk space, cluster placement) may still fail: the error then names the file
and lists what was applied before it and what was not.";

/// Arguments of `jetfn deploy`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Show what apply would create or change, field by field
    #[command(after_help = EXAMPLES)]
    Diff(Options),
    /// Create or update the declared resources (idempotent)
    #[command(after_help = EXAMPLES)]
    Apply(Options),
}

/// What `diff` and `apply` work on.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// The directory of resource files
    #[arg(long, default_value = "deploy/jetstream", value_name = "DIR")]
    pub dir: PathBuf,

    /// Allow destructive changes (never deletions, never storage changes)
    #[arg(long)]
    pub force: bool,
}

/// Runs `diff` or `apply`.
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Diff(options) => diff(global, &options).await,
        Command::Apply(options) => apply(global, &options).await,
    }
}

/// `jetfn deploy diff`: prints what [`apply`] would create or change, and changes nothing.
pub async fn diff(global: &Global, options: &Options) -> Result<ExitCode> {
    compare(global, options, false).await
}

/// `jetfn deploy apply`: creates or updates the resources declared in `options.dir`; refuses
/// destructive changes without `options.force` and changes nothing then.
pub async fn apply(global: &Global, options: &Options) -> Result<ExitCode> {
    compare(global, options, true).await
}

async fn compare(global: &Global, options: &Options, apply: bool) -> Result<ExitCode> {
    let declared = files::load(&options.dir)?;
    if declared.is_empty() {
        eprintln!(
            "jetfn: no resource files (*.json) in {}",
            options.dir.display()
        );
    }
    let (client, config) = global.connect().await?;
    let js = config.nats.jetstream(client.clone());
    let items = plan::plan(&js, &declared).await?;
    let not_managed = plan::not_managed(&js, &declared).await?;
    let refusals = check::check(&client, &js, &items).await?;
    let pending: Vec<&Item> = items
        .iter()
        .filter(|i| i.action != Action::Unchanged)
        .collect();
    let report = Report {
        items: &items,
        not_managed: &not_managed,
        refusals: &refusals,
        force: options.force,
    };

    if !apply {
        if global.json {
            say_json(&report.document(false));
        } else {
            print_plan(&pending, &not_managed, options.force);
            for refusal in &refusals {
                say(refusal_line(refusal));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    // Everything is judged before the first change: a refused later file stops the whole apply.
    if !refusals.is_empty() {
        if global.json {
            say_json(&report.document(false));
        }
        for refusal in &refusals {
            eprintln!("{}", refusal_line(refusal));
        }
        bail!(
            "the server would refuse {} resource(s); nothing was applied",
            refusals.len()
        );
    }

    let blocked: Vec<String> = pending
        .iter()
        .flat_map(|item| {
            item.blocked(options.force)
                .map(move |change| line(item, change, options.force))
        })
        .collect();
    if !blocked.is_empty() {
        if global.json {
            say_json(&report.document(false));
        }
        for refusal in &blocked {
            eprintln!("{refusal}");
        }
        let impossible = pending.iter().any(|i| {
            i.changes
                .iter()
                .any(|c| matches!(c.problem, Some(Problem::Impossible(_))))
        });
        let hint = if impossible {
            "some cannot be made in place, not even with --force"
        } else {
            "review them with `jetfn deploy diff`; --force applies destructive changes"
        };
        bail!(
            "refused {} change(s); nothing was applied ({hint})",
            blocked.len()
        );
    }
    for (done, item) in pending.iter().enumerate() {
        if let Err(err) = plan::apply(&js, item).await {
            let names = |items: &[&Item]| {
                let labels: Vec<&str> = items.iter().map(|i| i.label.as_str()).collect();
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            };
            bail!(
                "{}: {err:#}. Applied before it: {}. Not applied: {} and what follows: {}",
                item.file.display(),
                names(&pending[..done]),
                item.label,
                names(&pending[done + 1..])
            );
        }
        if !global.json {
            match item.action {
                Action::Create => say(format!("{}: created", item.label)),
                _ => {
                    for change in &item.changes {
                        say(format!("{}: updated {}", item.label, change_text(change)));
                    }
                }
            }
        }
    }
    if global.json {
        say_json(&report.document(true));
        return Ok(ExitCode::SUCCESS);
    }
    if pending.is_empty() {
        say("no changes");
    }
    print_not_managed(&not_managed);
    Ok(ExitCode::SUCCESS)
}

fn print_plan(pending: &[&Item], not_managed: &[String], force: bool) {
    if pending.is_empty() {
        say("no changes");
    }
    for item in pending {
        match item.action {
            Action::Create => say(format!(
                "{}: create (from {})",
                item.label,
                item.file.display()
            )),
            _ => {
                for change in &item.changes {
                    say(line(item, change, force));
                }
            }
        }
    }
    print_not_managed(not_managed);
}

fn print_not_managed(not_managed: &[String]) {
    for label in not_managed {
        say(format!(
            "{label}: not managed (no file declares it; left alone)"
        ));
    }
}

/// `stream S: field from -> to`, with why it needs care.
fn line(item: &Item, change: &plan::Change, force: bool) -> String {
    let note = match &change.problem {
        None => String::new(),
        Some(Problem::Impossible(why)) => format!("  [refused: {why}]"),
        Some(Problem::Destructive(why)) if force => {
            format!("  [destructive, allowed by --force: {why}]")
        }
        Some(Problem::Destructive(why)) => {
            format!("  [destructive, refused without --force: {why}]")
        }
    };
    format!("{}: {}{note}", item.label, change_text(change))
}

fn change_text(change: &plan::Change) -> String {
    format!("{} {} -> {}", change.field, change.from, change.to)
}

/// `FILE: LABEL: refused: REASON`.
fn refusal_line(refusal: &check::Refusal) -> String {
    format!(
        "{}: {}: refused: {}",
        refusal.file.display(),
        refusal.label,
        refusal.reason
    )
}

/// What `--json` prints.
struct Report<'a> {
    items: &'a [Item],
    not_managed: &'a [String],
    refusals: &'a [check::Refusal],
    force: bool,
}

impl Report<'_> {
    fn document(&self, applied: bool) -> Value {
        let refusals: Vec<Value> = self
            .refusals
            .iter()
            .map(|r| {
                json!({
                    "resource": r.label,
                    "file": r.file.display().to_string(),
                    "reason": r.reason,
                })
            })
            .collect();
        let mut document = document(self.items, self.not_managed, self.force, applied);
        document["refusals"] = Value::Array(refusals);
        document
    }
}

fn document(items: &[Item], not_managed: &[String], force: bool, applied: bool) -> Value {
    let resources: Vec<Value> = items
        .iter()
        .map(|item| {
            let changes: Vec<Value> = item
                .changes
                .iter()
                .map(|c| {
                    let (destructive, refused, reason) = match &c.problem {
                        None => (false, false, None),
                        Some(Problem::Destructive(why)) => (true, !force, Some(why)),
                        Some(Problem::Impossible(why)) => (true, true, Some(why)),
                    };
                    json!({
                        "field": c.field,
                        "from": c.from,
                        "to": c.to,
                        "destructive": destructive,
                        "refused": refused,
                        "reason": reason,
                    })
                })
                .collect();
            json!({
                "resource": item.label,
                "file": item.file.display().to_string(),
                "action": match item.action {
                    Action::Create => "create",
                    Action::Update => "update",
                    Action::Unchanged => "unchanged",
                },
                "changes": changes,
            })
        })
        .collect();
    json!({
        "resources": resources,
        "not_managed": not_managed,
        "applied": applied,
    })
}

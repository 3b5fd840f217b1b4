//! `jetfn dlq list|replay`: a projection's dead letters.

use crate::common::{
    Global, ask_projection, parse_duration, projection_name, say, say_json, table,
};
use anyhow::{Result, anyhow};
use jetfn::projection::DeadLetters;
use jetfn::wire::names;
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  jetfn dlq list account-balances
  jetfn dlq list account-balances --json
  jetfn dlq replay account-balances

Dead letters are events a projection could not apply (undecodable, or refused) after
projection.max_attempts attempts. They live in the stream JETFN_DLQ (projection.dead_letter_stream)
on jetfn.dlq.<projection>. `replay` asks a running instance of the projection
(jetfn.projection.<name>.dlq.replay) to apply them again with its current code; those that apply
are removed, the others stay.";

/// Arguments of `jetfn dlq`.
#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List a projection's dead letters, oldest first
    #[command(after_help = EXAMPLES)]
    List {
        /// The projection, e.g. account-balances
        projection: String,
    },
    /// Ask the running projection to apply its dead letters again
    #[command(after_help = EXAMPLES)]
    Replay {
        /// The projection, e.g. account-balances
        projection: String,
        /// How long to wait for the replay to finish
        #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
    },
}

/// Runs `list` or `replay`.
pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    match args.command {
        Command::List { projection } => list(global, projection_name(&projection)?).await,
        Command::Replay {
            projection,
            timeout,
        } => replay(global, projection_name(&projection)?, timeout).await,
    }
}

async fn list(global: &Global, projection: &str) -> Result<ExitCode> {
    let config = global.config()?;
    let letters = DeadLetters::connect(&config)
        .await?
        .list(projection)
        .await?;
    if global.json {
        let letters: Vec<Value> = letters
            .iter()
            .map(|l| {
                json!({
                    "dlq_seq": l.dlq_seq,
                    "projection": l.projection,
                    "stream": l.stream,
                    "subject": l.subject,
                    "seq": l.seq,
                    "type": l.event_type,
                    "deliveries": l.deliveries,
                    "error": l.error,
                    "payload": serde_json::from_slice::<Value>(&l.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&l.payload).into_owned())
                    }),
                })
            })
            .collect();
        say_json(&Value::Array(letters));
        return Ok(ExitCode::SUCCESS);
    }
    if letters.is_empty() {
        say(format!(
            "no dead letters for {projection} (stream {})",
            config.projection.dead_letter_stream
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.dlq_seq.to_string(),
                l.subject.clone(),
                l.seq.to_string(),
                l.event_type.clone(),
                l.deliveries.to_string(),
                l.error.clone(),
            ]
        })
        .collect();
    say(table(
        &["DLQ_SEQ", "SUBJECT", "SEQ", "TYPE", "DELIVERIES", "ERROR"],
        &rows,
    ));
    Ok(ExitCode::SUCCESS)
}

async fn replay(global: &Global, projection: &str, timeout: Duration) -> Result<ExitCode> {
    let (client, config) = global.connect().await?;
    let body = ask_projection(
        &client,
        &config,
        projection,
        names::DLQ_REPLAY,
        &format!("replaying the dead letters of {projection}"),
        timeout,
    )
    .await?;
    let replayed = body
        .get("replayed")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("the replay reply has no \"replayed\" count: {body}"))?;
    if global.json {
        say_json(&json!({ "projection": projection, "replayed": replayed }));
    } else {
        let noun = if replayed == 1 {
            "dead letter"
        } else {
            "dead letters"
        };
        say(format!("{projection}: replayed {replayed} {noun}"));
    }
    Ok(ExitCode::SUCCESS)
}

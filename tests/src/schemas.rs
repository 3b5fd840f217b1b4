//! The committed JSON Schemas of the example functions, as the Rust types generate them.
//!
//! `just schemas` writes [`generated`] to `schemas/`; the `schemas` test fails when the files on
//! disk differ, so a changed command or event type cannot ship without its schema.

use anyhow::{Context, Result};
use jetfn::schema::{
    command_schemas, decision_command_schemas, event_schemas, process_event_schemas, reply_schema,
    schema_of,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Every schema file: its path under `schemas/` and its content.
pub fn generated() -> Vec<(PathBuf, String)> {
    let mut files: Vec<(PathBuf, Value)> = Vec::new();
    for (name, schema) in command_schemas::<account::Account>() {
        files.push((format!("account/commands/{name}.json").into(), schema));
    }
    for (name, schema) in event_schemas::<account::Account>() {
        files.push((format!("account/events/{name}.json").into(), schema));
    }
    for (name, schema) in command_schemas::<transfer::Transfer>() {
        files.push((format!("transfer/commands/{name}.json").into(), schema));
    }
    for (name, schema) in event_schemas::<transfer::Transfer>() {
        files.push((format!("transfer/events/{name}.json").into(), schema));
    }
    for (name, schema) in process_event_schemas::<transfer_manager::TransferManager>() {
        files.push((format!("pm.transfer/events/{name}.json").into(), schema));
    }
    files.push((
        "transfer-status/transfer.json".into(),
        schema_of::<transfer::status::TransferRecord>(
            "transfer-status:transfer",
            "Read model {transfer-status}:g<G>:transfer:<id>",
        ),
    ));
    for (name, schema) in decision_command_schemas::<bank::Bank>() {
        files.push((format!("bank/commands/{name}.json").into(), schema));
    }
    for (name, schema) in decision_command_schemas::<signup::Signup>() {
        files.push((format!("signup/commands/{name}.json").into(), schema));
    }
    for (name, schema) in event_schemas::<signup::User>() {
        files.push((format!("user/events/{name}.json").into(), schema));
    }
    for (name, schema) in event_schemas::<signup::Username>() {
        files.push((format!("username/events/{name}.json").into(), schema));
    }
    files.push(("reply.json".into(), reply_schema()));
    files.push((
        "account-balances/account.json".into(),
        schema_of::<account_projection::AccountRecord>(
            "account-balances:account",
            "Read model {account-balances}:g<G>:account:<id>",
        ),
    ));
    files.push((
        "account-balances/totals.json".into(),
        schema_of::<account_projection::TotalsRecord>(
            "account-balances:totals",
            "Read model {account-balances}:g<G>:accounts:totals",
        ),
    ));
    files
        .into_iter()
        .map(|(path, schema)| {
            let text = serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n";
            (path, text)
        })
        .collect()
}

/// The workspace's `schemas/` directory.
pub fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

/// Writes every generated schema under `dir`, removing stale `.json` files there.
pub fn write_all(dir: &Path) -> Result<usize> {
    let files = generated();
    for stale in json_files(dir)? {
        if !files.iter().any(|(path, _)| dir.join(path) == stale) {
            std::fs::remove_file(&stale)
                .with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    for (path, text) in &files {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(files.len())
}

/// Every `.json` file under `dir`, recursively.
pub fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if !dir.exists() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(json_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "json") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

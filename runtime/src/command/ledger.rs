//! The command ledger: a JetStream KV bucket from command id to its first reply.
//!
//! JetStream's duplicate window catches a repeated event publish for minutes; the ledger answers
//! repeated commands for days (its TTL), including rejections and commands that decided nothing,
//! which leave no event behind. Accepted commands are also recognised from the `jetfn-command-id`
//! header of their stored events, so a lost ledger write never causes a double append.

use super::reply::Reply;
use crate::store::StoreError;
use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the ledger remembers about a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Fingerprint of the command name and body, to spot a reused id.
    pub fingerprint: String,
    /// The first reply.
    pub reply: Reply,
}

#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    kv: kv::Store,
}

impl Ledger {
    /// Opens the bucket, creating it if it does not exist.
    pub async fn open(
        client: async_nats::Client,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Ledger, StoreError> {
        let js = jetstream::new(client);
        // An existing bucket is left as it is (an operator may have raised its replicas).
        if let Ok(kv) = js.get_key_value(bucket).await {
            return Ok(Ledger { kv });
        }
        let kv = js
            .create_key_value(kv::Config {
                bucket: bucket.to_owned(),
                description: "jetfn command ledger: command id -> first reply".into(),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("ledger bucket {bucket}: {e}")))?;
        Ok(Ledger { kv })
    }

    pub async fn get(&self, id: &str, command_id: &str) -> Result<Option<Entry>, String> {
        let Some(bytes) = self
            .kv
            .get(key(id, command_id))
            .await
            .map_err(|e| format!("ledger read failed: {e}"))?
        else {
            return Ok(None);
        };
        // An unreadable entry (written by a future version, say) is treated as absent: the
        // stored events still guard against double appends.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    pub async fn put(&self, id: &str, command_id: &str, entry: &Entry) -> Result<(), String> {
        let bytes = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        self.kv
            .put(key(id, command_id), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| format!("ledger write failed: {e}"))
    }
}

/// `<aggregate id>.<command id>`, with every byte outside `[A-Za-z0-9_-]` of the command id
/// written as `=XX`, which keeps keys valid and distinct.
pub(crate) fn key(id: &str, command_id: &str) -> String {
    let mut key = String::with_capacity(id.len() + command_id.len() + 8);
    key.push_str(id);
    key.push('.');
    for byte in command_id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            key.push(char::from(byte));
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_everything_outside_the_safe_set() {
        assert_eq!(key("a1", "cmd-1_x"), "a1.cmd-1_x");
        assert_eq!(key("a1", "a.b=c/d"), "a1.a=2Eb=3Dc=2Fd");
    }

    #[test]
    fn different_command_ids_never_share_a_key() {
        assert_ne!(key("a", "x.y"), key("a", "x=2Ey"));
    }
}

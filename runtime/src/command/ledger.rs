//! The command ledger: a JetStream KV bucket from command id to its first reply.
//!
//! JetStream's duplicate window catches a repeated event publish for minutes; the ledger answers
//! repeated commands for days (its TTL), including rejections and commands that decided nothing,
//! which leave no event behind. Accepted commands are also recognised from the `jetfn-command-id`
//! header of their stored events, so their ledger entry may be written after the reply (see
//! [`super::writer`]); rejections and empty decisions are recorded before it.
//!
//! Reads are direct gets of the bucket's stream over the function's one reply subscription,
//! with the reads of concurrent commands sent together (see [`super::batched`]), so a lookup is
//! at most one round trip and needs no KV watcher or consumer.

use super::batched::BatchedReads;
use super::kv::{self, JsonBucket};
use super::reply::Reply;
use crate::direct::DirectGets;
use crate::store::StoreError;
use async_nats::jetstream;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// What the ledger remembers about a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Fingerprint of the command name and body, to spot a reused id.
    pub fingerprint: String,
    /// The first reply.
    pub reply: Reply,
}

/// Where first replies are remembered: a KV bucket in production, memory in unit tests.
pub(crate) trait CommandLedger: Send + Sync + 'static {
    /// The entry of `command_id` on aggregate `id`, if any.
    fn get<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Entry>, StoreError>>;

    /// Records an entry, waiting for the store to acknowledge it.
    fn put<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
        entry: &'a Entry,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Counters for `$SRV.STATS`, if it keeps any.
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// The key read at start to check that the ledger can be read (any key would do).
const PROBE: (&str, &str) = ("jetfn-start", "probe");

/// The ledger in a JetStream KV bucket.
#[derive(Debug, Clone)]
pub(crate) struct KvLedger {
    bucket: JsonBucket,
    reads: Arc<BatchedReads>,
}

impl KvLedger {
    /// Opens the bucket, creating it if it does not exist.
    pub async fn open(
        js: jetstream::Context,
        api_prefix: &str,
        reads: Arc<DirectGets>,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<KvLedger, StoreError> {
        let config = jetstream::kv::Config {
            bucket: bucket.to_owned(),
            description: "jetfn command ledger: command id -> first reply".into(),
            history: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let store = JsonBucket::open(js, api_prefix, reads, config).await?;
        let (direct_get, replies) = store.direct_gets();
        let direct_get = direct_get.to_owned();
        let reads = Arc::new(BatchedReads::start(replies.clone(), direct_get.clone()));
        let ledger = KvLedger {
            bucket: store,
            reads,
        };
        // One read now, so a function that may not read its ledger says so at start instead of
        // failing every command.
        if let Err(err) = ledger.get(PROBE.0, PROBE.1).await {
            return Err(StoreError::Unavailable(format!(
                "the ledger {bucket} cannot be read: {err} (it needs publish on {direct_get}, \
                 see deploy/README.md)"
            )));
        }
        Ok(ledger)
    }
}

impl CommandLedger for KvLedger {
    fn get<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Entry>, StoreError>> {
        // An unreadable entry is absent: the stored events still guard against double appends.
        Box::pin(async move {
            let message = self
                .reads
                .last(self.bucket.subject(&key(id, command_id)))
                .await?;
            Ok(message.and_then(|message| kv::value(&message)))
        })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
        entry: &'a Entry,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.bucket.put(&key(id, command_id), entry).await })
    }

    fn stats(&self) -> serde_json::Value {
        self.reads.to_json()
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

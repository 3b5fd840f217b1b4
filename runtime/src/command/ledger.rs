//! The command ledger: a JetStream KV bucket from command id to its first reply.
//!
//! JetStream's duplicate window catches a repeated event publish for minutes; the ledger answers
//! repeated commands for days (its TTL), including rejections and commands that decided nothing,
//! which leave no event behind. Accepted commands are also recognised from the `jetfn-command-id`
//! header of their stored events, so their ledger entry may be written after the reply (see
//! [`super::writer`]); rejections and empty decisions are recorded before it.
//!
//! Reads are direct gets of the bucket's stream over the function's one reply subscription, so
//! a lookup is one round trip and needs no KV watcher or consumer.

use super::reply::Reply;
use crate::direct::DirectGets;
use crate::store::StoreError;
use crate::wire::{header, names};
use async_nats::jetstream::{self, kv};
use async_nats::{Message, StatusCode};
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
}

/// The ledger in a JetStream KV bucket.
#[derive(Debug, Clone)]
pub(crate) struct KvLedger {
    js: jetstream::Context,
    bucket: String,
    direct_get: String,
    reads: Arc<DirectGets>,
}

impl KvLedger {
    /// Opens the bucket, creating it if it does not exist.
    pub async fn open(
        client: async_nats::Client,
        reads: Arc<DirectGets>,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<KvLedger, StoreError> {
        let js = jetstream::new(client);
        open_bucket(
            &js,
            kv::Config {
                bucket: bucket.to_owned(),
                description: "jetfn command ledger: command id -> first reply".into(),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(KvLedger {
            js,
            bucket: bucket.to_owned(),
            direct_get: names::direct_get(&names::kv_stream(bucket)),
            reads,
        })
    }
}

/// Opens a KV bucket, creating it with `config` when it does not exist. An existing bucket is
/// left as it is (an operator may have raised its replicas).
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<(), StoreError> {
    if js.get_key_value(&config.bucket).await.is_ok() {
        return Ok(());
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(_) => Ok(()),
        // Another instance may have created it in between.
        Err(err) => match js.get_key_value(&bucket).await {
            Ok(_) => Ok(()),
            Err(_) => Err(StoreError::Unavailable(format!(
                "KV bucket {bucket}: {err}"
            ))),
        },
    }
}

/// Reads the value of one key with a direct get of the bucket's stream; `None` when the key is
/// absent or removed.
pub(crate) async fn direct_get_value(
    reads: &DirectGets,
    direct_get: &str,
    subject: &str,
) -> Result<Option<bytes::Bytes>, StoreError> {
    // The last-by-subject form in the subject itself, so least-privilege permissions can name
    // the bucket's keys.
    let mut replies = reads
        .request(&format!("{direct_get}.{subject}"), Vec::new())
        .await?;
    let message: Message = replies.next().await?;
    match message.status {
        None | Some(StatusCode::OK) => {
            let operation = header::get(message.headers.as_ref(), header::KV_OPERATION);
            if operation.is_some_and(|op| op != "PUT") {
                return Ok(None);
            }
            Ok(Some(message.payload))
        }
        Some(StatusCode::NOT_FOUND) => Ok(None),
        Some(status) => Err(StoreError::Unavailable(format!(
            "KV read of {subject} failed: {status} {}",
            message.description.as_deref().unwrap_or_default()
        ))),
    }
}

impl CommandLedger for KvLedger {
    fn get<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Entry>, StoreError>> {
        Box::pin(async move {
            let subject = names::kv_subject(&self.bucket, &key(id, command_id));
            let value = direct_get_value(&self.reads, &self.direct_get, &subject).await?;
            // An unreadable entry (written by a future version, say) is treated as absent: the
            // stored events still guard against double appends.
            Ok(value.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
        })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        command_id: &'a str,
        entry: &'a Entry,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let bytes =
                serde_json::to_vec(entry).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let subject = names::kv_subject(&self.bucket, &key(id, command_id));
            let failed = |e: String| StoreError::Unavailable(format!("ledger write failed: {e}"));
            self.js
                .publish(subject, bytes.into())
                .await
                .map_err(|e| failed(e.to_string()))?
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        })
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

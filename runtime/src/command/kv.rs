//! A KV bucket holding JSON values, as the ledger and the snapshots use it: opened (created when
//! missing, never changed), read with one direct get over the function's reply subscription,
//! written with an acknowledged publish.

use crate::direct::DirectGets;
use crate::store::StoreError;
use crate::wire::{header, names};
use async_nats::jetstream::{self, kv};
use async_nats::{Message, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// One bucket of JSON values.
#[derive(Debug, Clone)]
pub(crate) struct JsonBucket {
    js: jetstream::Context,
    bucket: String,
    api_prefix: String,
    direct_get: String,
    reads: Arc<DirectGets>,
}

impl JsonBucket {
    /// Opens the bucket through `js`, whose API prefix `api_prefix` may name another domain, creating it
    /// with `config` when it does not exist. An existing bucket is left as it is (an operator may
    /// have raised its replicas).
    pub async fn open(
        js: jetstream::Context,
        api_prefix: &str,
        reads: Arc<DirectGets>,
        config: kv::Config,
    ) -> Result<JsonBucket, StoreError> {
        let bucket = config.bucket.clone();
        if js.get_key_value(&bucket).await.is_err()
            && let Err(err) = js.create_key_value(config).await
            // Another instance may have created it in between.
            && js.get_key_value(&bucket).await.is_err()
        {
            return Err(StoreError::Unavailable(format!(
                "KV bucket {bucket}: {err}"
            )));
        }
        let api_prefix = api_prefix.to_owned();
        Ok(JsonBucket {
            js,
            direct_get: names::direct_get(&api_prefix, &names::kv_stream(&bucket)),
            api_prefix,
            bucket,
            reads,
        })
    }

    /// The value of `key`; `None` when it is absent, removed, or unreadable (written by a
    /// future version, say).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let subject = self.subject(key);
        // The last-by-subject form in the subject itself, so least-privilege permissions can
        // name the bucket's keys.
        let mut replies = self
            .reads
            .request(&format!("{}.{subject}", self.direct_get), Vec::new())
            .await?;
        let message = replies.next().await?;
        match message.status {
            None | Some(StatusCode::OK) => Ok(value(&message)),
            Some(StatusCode::NOT_FOUND) => Ok(None),
            Some(status) => Err(StoreError::Unavailable(format!(
                "KV read of {subject} failed: {status} {}",
                message.description.as_deref().unwrap_or_default()
            ))),
        }
    }

    /// The subject that stores `key`.
    pub fn subject(&self, key: &str) -> String {
        names::kv_subject(&self.bucket, key)
    }

    /// The direct get subject of the bucket's stream, and the reply subscription reads use.
    pub fn direct_gets(&self) -> (&str, &Arc<DirectGets>) {
        (&self.direct_get, &self.reads)
    }

    /// Stores `value` under `key`, waiting for JetStream's acknowledgement.
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec(value).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let failed = |e: String| {
            StoreError::Unavailable(format!("write to KV bucket {} failed: {e}", self.bucket))
        };
        self.js
            .publish(
                names::kv_put_subject(&self.api_prefix, &self.bucket, key),
                bytes.into(),
            )
            .await
            .map_err(|e| failed(e.to_string()))?
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(())
    }
}

/// The value a stored entry holds; `None` for a removed key or a value that does not decode.
pub(crate) fn value<T: DeserializeOwned>(message: &Message) -> Option<T> {
    let operation = header::get(message.headers.as_ref(), header::KV_OPERATION);
    if operation.is_some_and(|op| op != "PUT") {
        return None;
    }
    serde_json::from_slice(&message.payload).ok()
}

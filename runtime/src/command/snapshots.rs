//! Snapshots: an aggregate's folded state at a stream sequence, in a KV bucket, for cold loads.
//!
//! A snapshot records the state's JSON, the stream sequence and version it was folded up to,
//! and a *format* string: the aggregate's snapshot version, its event versions and its
//! registered upcasters. A snapshot whose format differs from the running code's is ignored
//! (the aggregate is loaded from its events), so a snapshot is never misread after the state's
//! shape, an event version or an upcaster changed.

use super::kv::JsonBucket;
use crate::aggregate::{Aggregate, Upcasters};
use crate::codec::variant_names;
use crate::direct::DirectGets;
use crate::store::StoreError;
use async_nats::jetstream::{self, kv};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One stored snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    /// What code wrote it; see [`format_of`].
    pub format: String,
    /// The stream sequence of the last event folded in.
    pub seq: u64,
    /// The number of events folded in.
    pub version: u64,
    /// The state.
    pub state: serde_json::Value,
}

/// The format of `A`'s snapshots under the running code.
pub(crate) fn format_of<A: Aggregate>(snapshot_version: u32, upcasters: &Upcasters) -> String {
    let events: Vec<String> = variant_names::<A::Event>()
        .iter()
        .map(|t| format!("{t}={}", A::event_version(t)))
        .collect();
    let steps: Vec<String> = upcasters
        .steps()
        .iter()
        .map(|(t, v)| format!("{t}@{v}"))
        .collect();
    format!(
        "v{snapshot_version};events:{};upcasters:{}",
        events.join(","),
        steps.join(",")
    )
}

/// Where snapshots are kept: a KV bucket in production, memory in unit tests.
pub(crate) trait SnapshotStore: Send + Sync + 'static {
    /// The latest snapshot of aggregate `id`.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SnapshotRecord>, StoreError>>;
    /// Stores a snapshot of aggregate `id`.
    fn put<'a>(
        &'a self,
        id: &'a str,
        record: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Snapshots in a JetStream KV bucket, one key per aggregate, latest only.
pub(crate) struct KvSnapshots {
    bucket: JsonBucket,
}

impl KvSnapshots {
    /// Opens the bucket, creating it if it does not exist.
    pub async fn open(
        js: jetstream::Context,
        api_prefix: &str,
        reads: Arc<DirectGets>,
        bucket: &str,
        replicas: usize,
    ) -> Result<KvSnapshots, StoreError> {
        let config = kv::Config {
            bucket: bucket.to_owned(),
            description: "jetfn snapshots: aggregate id -> folded state".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let bucket = JsonBucket::open(js, api_prefix, reads, config).await?;
        Ok(KvSnapshots { bucket })
    }
}

impl SnapshotStore for KvSnapshots {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SnapshotRecord>, StoreError>> {
        // An unreadable snapshot is no snapshot: the events are the truth.
        Box::pin(async move { self.bucket.get(id).await })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        record: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.bucket.put(id, record).await })
    }
}

//! The transfer status read model in Redis (projection `transfer-status`).
//!
//! Key (inside the live version's prefix `{transfer-status}:g<G>:`): `transfer:<id>` (hash):
//! `from`, `to`, `amount`, `status` (`pending`, `completed` or `failed`), `reason` (when
//! failed) and `seq` (the stream sequence of the last event it reflects). A frontend that
//! started a transfer waits for the start reply's `seq` (the consistency token), then for
//! `status` to leave `pending`.

use crate::{Event, Transfer};
use jetfn::{Projection, Recorded, RedisWrites, Refusal};
use schemars::JsonSchema;

/// The hash `transfer:<id>` as a frontend reads it (`HGETALL`); every value is a string.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[allow(dead_code)] // describes Redis data for the schema; never built in Rust
pub struct TransferRecord {
    /// The account the money leaves.
    from: String,
    /// The account the money goes to.
    to: String,
    /// Minor units.
    #[schemars(regex(pattern = r"^[0-9]+$"))]
    amount: String,
    /// `pending`, `completed` or `failed`.
    #[schemars(regex(pattern = r"^(pending|completed|failed)$"))]
    status: String,
    /// Why it failed (only when failed).
    reason: Option<String>,
    /// The stream sequence of the last event it reflects.
    #[schemars(regex(pattern = r"^[0-9]+$"))]
    seq: String,
}

/// The projection `transfer-status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransferStatus;

/// The hash of one transfer.
pub fn transfer_key(id: &str) -> String {
    format!("transfer:{id}")
}

impl Projection for TransferStatus {
    const NAME: &'static str = "transfer-status";
    type Source = Transfer;

    fn apply(&self, event: &Recorded<Event>, writes: &mut RedisWrites) -> Result<(), Refusal> {
        let key = transfer_key(&event.aggregate_id);
        match &event.event {
            Event::TransferStarted { from, to, amount } => {
                writes
                    .hset(&key, "from", from)
                    .hset(&key, "to", to)
                    .hset(&key, "amount", *amount)
                    .hset(&key, "status", "pending");
            }
            Event::TransferCompleted {} => {
                writes.hset(&key, "status", "completed");
            }
            Event::TransferFailed { reason } => {
                writes
                    .hset(&key, "status", "failed")
                    .hset(&key, "reason", reason);
            }
        }
        writes.hset(&key, "seq", event.seq);
        Ok(())
    }
}

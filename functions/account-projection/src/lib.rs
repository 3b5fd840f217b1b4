//! Account read models in Redis, for frontends.
//!
//! Keys (inside the live version's prefix `{account-balances}:g<G>:`):
//! * `account:<id>` (hash): `owner`, `balance`, `status` (`open`/`closed`), `version` (events
//!   applied), `seq` (stream sequence of the last one);
//! * `accounts:open-by-balance` (sorted set): open accounts scored by balance;
//! * `accounts:totals` (hash): `open_accounts`, `total_balance`.
//!
//! The account function keeps amounts and balances at most 10^15, so every number here is exact
//! (also as a sorted-set score and in JavaScript). An event beyond what Redis holds exactly (one
//! stored before that limit, or a total that would leave 64 bits) is refused by the runtime's
//! write helpers or the apply step and dead-lettered; later events still apply.

use account::{Account, Event};
use jetfn::{Projection, Recorded, RedisWrites, Refusal};
use schemars::JsonSchema;

/// The hash `account:<id>` as a frontend reads it (`HGETALL`). Redis returns every value as a
/// string; numbers are decimal integers.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[allow(dead_code)] // describes Redis data for the schema; never built in Rust
pub struct AccountRecord {
    /// The holder's name.
    owner: String,
    /// The balance in minor units.
    #[schemars(regex(pattern = r"^-?[0-9]+$"))]
    balance: String,
    /// `open` or `closed`.
    #[schemars(regex(pattern = r"^(open|closed)$"))]
    status: String,
    /// How many of the account's events the record reflects.
    #[schemars(regex(pattern = r"^[0-9]+$"))]
    version: String,
    /// The stream sequence of the last event it reflects: compare with a command reply's `seq`.
    #[schemars(regex(pattern = r"^[0-9]+$"))]
    seq: String,
}

/// The hash `accounts:totals`.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[allow(dead_code)] // describes Redis data for the schema; never built in Rust
pub struct TotalsRecord {
    /// Open accounts.
    #[schemars(regex(pattern = r"^-?[0-9]+$"))]
    open_accounts: String,
    /// The sum of open accounts' balances, in minor units.
    #[schemars(regex(pattern = r"^-?[0-9]+$"))]
    total_balance: String,
}

/// The projection `account-balances`.
#[derive(Debug, Default, Clone, Copy)]
pub struct AccountBalances;

/// The sorted set of open accounts by balance.
pub const OPEN_BY_BALANCE: &str = "accounts:open-by-balance";
/// The totals hash.
pub const TOTALS: &str = "accounts:totals";

/// The hash of one account.
pub fn account_key(id: &str) -> String {
    format!("account:{id}")
}

impl Projection for AccountBalances {
    const NAME: &'static str = "account-balances";
    type Source = Account;

    fn apply(&self, event: &Recorded<Event>, writes: &mut RedisWrites) -> Result<(), Refusal> {
        let id = event.aggregate_id.as_str();
        let key = account_key(id);
        match &event.event {
            Event::AccountOpened { owner } => {
                writes
                    .hset(&key, "owner", owner)
                    .hset(&key, "status", "open")
                    .hset(&key, "balance", 0)
                    .zadd(OPEN_BY_BALANCE, id, 0)
                    .hincr(TOTALS, "open_accounts", 1);
            }
            Event::MoneyDeposited { amount } => {
                let amount = i128::from(*amount);
                writes
                    .hincr(&key, "balance", amount)
                    .zincr(OPEN_BY_BALANCE, id, amount)
                    .hincr(TOTALS, "total_balance", amount);
            }
            Event::MoneyWithdrawn { amount } => {
                let amount = i128::from(*amount);
                writes
                    .hincr(&key, "balance", -amount)
                    .zincr(OPEN_BY_BALANCE, id, -amount)
                    .hincr(TOTALS, "total_balance", -amount);
            }
            Event::AccountClosed {} => {
                writes
                    .hset(&key, "status", "closed")
                    .zrem(OPEN_BY_BALANCE, id)
                    .hincr(TOTALS, "open_accounts", -1);
            }
        }
        writes
            .hincr(&key, "version", 1)
            .hset(&key, "seq", event.seq);
        Ok(())
    }
}

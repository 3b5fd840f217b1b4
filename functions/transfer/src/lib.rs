//! A money transfer between two accounts, as an aggregate: what was asked and how it ended.
//!
//! Commands (`cmd.transfer.<id>.<command>`): `start {from, to, amount}` asks for a transfer;
//! `complete {}` and `fail {reason}` record its outcome. The money itself moves in the
//! account aggregates, driven by the `transfer` process manager (crate `transfer-manager`),
//! which sends `complete` or `fail` when it is done. [`status`] is the read model.

pub mod status;

use account::Amount;
use jetfn::{Aggregate, Rejection};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A transfer's state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Where it is in its life.
    pub status: Status,
}

/// A transfer's life cycle.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not started.
    #[default]
    New,
    /// Started; the money is on its way.
    Pending,
    /// The money arrived.
    Completed,
    /// The money did not move, or was given back.
    Failed,
}

/// An account id, as in `cmd.account.<id>`: `[A-Za-z0-9_-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "String", into = "String")]
#[schemars(extend("pattern" = "^[A-Za-z0-9_-]{1,128}$"))]
pub struct AccountId(String);

impl TryFrom<String> for AccountId {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let valid = !value.is_empty()
            && value.len() <= 128
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "account id {value:?} must match [A-Za-z0-9_-]{{1,128}}"
            ));
        }
        Ok(AccountId(value))
    }
}

impl From<AccountId> for String {
    fn from(id: AccountId) -> String {
        id.0
    }
}

/// What clients (and the process manager) can ask of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Asks to move `amount` from account `from` to account `to`.
    Start {
        /// The account the money leaves.
        from: AccountId,
        /// The account the money goes to; not `from`.
        to: AccountId,
        /// How much, in minor units.
        amount: Amount,
    },
    /// Records that the money arrived (sent by the process manager).
    Complete {},
    /// Records that the transfer failed and no money moved in the end (sent by the process
    /// manager). Failing a failed transfer again changes nothing.
    Fail {
        /// Why.
        reason: String,
    },
}

/// What happened to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Event {
    /// A transfer was asked for.
    TransferStarted {
        /// The account the money leaves.
        from: String,
        /// The account the money goes to.
        to: String,
        /// Minor units.
        amount: u64,
    },
    /// The money arrived.
    TransferCompleted {},
    /// The transfer failed; no money moved in the end.
    TransferFailed {
        /// Why.
        reason: String,
    },
}

impl Aggregate for Transfer {
    const NAME: &'static str = "transfer";
    type Command = Command;
    type Event = Event;

    fn decide(&self, command: Command) -> Result<Vec<Event>, Rejection> {
        match (self.status, command) {
            (Status::New, Command::Start { from, to, .. }) if from == to => {
                Err(Rejection::new("from and to must be different accounts"))
            }
            (Status::New, Command::Start { from, to, amount }) => {
                Ok(vec![Event::TransferStarted {
                    from: from.0,
                    to: to.0,
                    amount: amount.get(),
                }])
            }
            (_, Command::Start { .. }) => Err(Rejection::new("transfer already exists")),
            (Status::New, _) => Err(Rejection::new("transfer is not started")),
            (Status::Pending, Command::Complete {}) => Ok(vec![Event::TransferCompleted {}]),
            (Status::Pending, Command::Fail { reason }) => {
                Ok(vec![Event::TransferFailed { reason }])
            }
            (Status::Completed, Command::Complete {}) | (Status::Failed, Command::Fail { .. }) => {
                Ok(vec![])
            }
            (Status::Completed, Command::Fail { .. }) => {
                Err(Rejection::new("transfer is already completed"))
            }
            (Status::Failed, Command::Complete {}) => {
                Err(Rejection::new("transfer has already failed"))
            }
        }
    }

    fn evolve(self, event: &Event) -> Self {
        let status = match event {
            Event::TransferStarted { .. } => Status::Pending,
            Event::TransferCompleted {} => Status::Completed,
            Event::TransferFailed { .. } => Status::Failed,
        };
        Transfer { status }
    }
}

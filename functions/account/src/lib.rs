//! A bank account: the example command function of jetfn.
//!
//! Commands (`cmd.account.<id>.<command>`): `open {owner, initial_deposit?}`,
//! `deposit {amount}`, `withdraw {amount}`, `close {}`. Amounts are integers from 1 to
//! [`MAX_AMOUNT`] (10^15) in minor units, and a balance never exceeds [`MAX_AMOUNT`] either: read
//! models hold such numbers exactly (Redis counters, sorted-set scores, JavaScript numbers).

use jetfn::{Aggregate, Rejection};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An account's state, folded from its events (and snapshotted: see [`Aggregate::snapshots`]).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Where the account is in its life.
    pub status: Status,
    /// The balance in minor units.
    pub balance: u64,
}

/// An account's life cycle.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Not opened yet.
    #[default]
    Unopened,
    /// Open for business.
    Open,
    /// Closed for good.
    Closed,
}

/// What clients can ask of an account (serializable too, for typed Rust clients).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Opens the account, optionally with a first deposit.
    Open {
        /// The holder's name.
        owner: Owner,
        /// A first deposit, recorded as a separate `MoneyDeposited` event.
        #[serde(default)]
        initial_deposit: Option<Amount>,
    },
    /// Adds money.
    Deposit {
        /// How much.
        amount: Amount,
    },
    /// Takes money out; never below zero.
    Withdraw {
        /// How much.
        amount: Amount,
    },
    /// Closes an empty account.
    Close {},
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Event {
    /// The account was opened.
    AccountOpened {
        /// The holder's name.
        owner: String,
    },
    /// Money came in.
    MoneyDeposited {
        /// Minor units.
        amount: u64,
    },
    /// Money went out.
    MoneyWithdrawn {
        /// Minor units.
        amount: u64,
    },
    /// The account was closed.
    AccountClosed {},
}

/// The largest amount, and the largest balance, in minor units: 10^15 (ten trillion in a currency
/// with cents). Below 2^53, so every read model and JavaScript frontend holds it exactly.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;

/// An amount of money in minor units: an integer from 1 to 10^15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "u64", into = "u64")]
#[schemars(extend("minimum" = 1, "maximum" = MAX_AMOUNT))]
pub struct Amount(u64);

impl Amount {
    /// The amount in minor units.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for Amount {
    type Error = String;

    fn try_from(value: u64) -> Result<Self, Self::Error> {
        if value == 0 {
            return Err("an amount must be at least 1 (minor units)".into());
        }
        if value > MAX_AMOUNT {
            return Err(format!(
                "an amount must be at most {MAX_AMOUNT} (10^15 minor units)"
            ));
        }
        Ok(Amount(value))
    }
}

/// An account holder's name: not blank, at most 200 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "String", into = "String")]
#[schemars(extend("minLength" = 1, "maxLength" = 200, "pattern" = "\\S"))]
pub struct Owner(String);

impl TryFrom<String> for Owner {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        if value.trim().is_empty() {
            return Err("owner must not be empty".into());
        }
        if value.chars().count() > 200 {
            return Err("owner must be at most 200 characters".into());
        }
        Ok(Owner(value))
    }
}

impl From<Amount> for u64 {
    fn from(amount: Amount) -> u64 {
        amount.0
    }
}

impl From<Owner> for String {
    fn from(owner: Owner) -> String {
        owner.0
    }
}

impl Owner {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Aggregate for Account {
    const NAME: &'static str = "account";
    type Command = Command;
    type Event = Event;

    fn decide(&self, command: Command) -> Result<Vec<Event>, Rejection> {
        match (self.status, command) {
            (
                Status::Unopened,
                Command::Open {
                    owner,
                    initial_deposit,
                },
            ) => {
                let mut events = vec![Event::AccountOpened { owner: owner.0 }];
                if let Some(amount) = initial_deposit {
                    events.push(Event::MoneyDeposited { amount: amount.0 });
                }
                Ok(events)
            }
            (_, Command::Open { .. }) => Err(Rejection::new("account already exists")),
            (Status::Unopened, _) => Err(Rejection::new("account is not open")),
            (Status::Closed, _) => Err(Rejection::new("account is closed")),
            (Status::Open, Command::Deposit { amount }) => {
                let balance = self.balance.saturating_add(amount.0);
                if balance > MAX_AMOUNT {
                    return Err(Rejection::new(format!(
                        "the balance would be {balance}, above the maximum of {MAX_AMOUNT}"
                    )));
                }
                Ok(vec![Event::MoneyDeposited { amount: amount.0 }])
            }
            (Status::Open, Command::Withdraw { amount }) if amount.0 > self.balance => Err(
                Rejection::new(format!("insufficient funds: balance is {}", self.balance)),
            ),
            (Status::Open, Command::Withdraw { amount }) => {
                Ok(vec![Event::MoneyWithdrawn { amount: amount.0 }])
            }
            (Status::Open, Command::Close {}) if self.balance != 0 => Err(Rejection::new(format!(
                "balance must be zero to close, is {}",
                self.balance
            ))),
            (Status::Open, Command::Close {}) => Ok(vec![Event::AccountClosed {}]),
        }
    }

    fn evolve(self, event: &Event) -> Self {
        match event {
            Event::AccountOpened { .. } => Account {
                status: Status::Open,
                ..self
            },
            Event::MoneyDeposited { amount } => Account {
                balance: self.balance.saturating_add(*amount),
                ..self
            },
            Event::MoneyWithdrawn { amount } => Account {
                balance: self.balance.saturating_sub(*amount),
                ..self
            },
            Event::AccountClosed {} => Account {
                status: Status::Closed,
                ..self
            },
        }
    }

    /// An account's state is two small fields: a snapshot every `command.snapshot_every` events
    /// keeps cold loads of long-lived accounts short.
    fn snapshots() -> Option<jetfn::aggregate::Snapshots<Self>> {
        Some(jetfn::aggregate::Snapshots::serde(1))
    }
}

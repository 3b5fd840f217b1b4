//! Atomic transfers between accounts: the example atomic decision of jetfn.
//!
//! `cmd.bank.<transfer id>.transfer {from, to, amount}` debits `from` and credits `to` in one
//! atomic append to the account stream: both events are stored, or neither, and only if neither
//! account changed since it was read. Projections see an ordinary `MoneyWithdrawn` on
//! `evt.account.<from>` and `MoneyDeposited` on `evt.account.<to>`.
//!
//! The transfer id keys idempotency: resending the same command id returns the first reply.

use account::{Account, Amount, Event, Status};
use jetfn::Rejection;
use jetfn::decision::{Decision, Events, States};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The bank's atomic decisions over accounts.
#[derive(Debug)]
pub struct Bank;

/// What clients can ask of the bank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Moves money from one open account to another, atomically.
    Transfer {
        /// The account debited.
        from: String,
        /// The account credited.
        to: String,
        /// How much, in minor units.
        amount: Amount,
    },
}

impl Decision for Bank {
    const NAME: &'static str = "bank";
    type Aggregate = Account;
    type Command = Command;

    fn aggregates(Command::Transfer { from, to, .. }: &Command) -> Vec<String> {
        vec![from.clone(), to.clone()]
    }

    fn decide(
        states: &States<'_, Account>,
        Command::Transfer { from, to, amount }: Command,
    ) -> Result<Events<Account>, Rejection> {
        if from == to {
            return Err(Rejection::new("cannot transfer to the same account"));
        }
        let open = |id: &str| match states.get(id) {
            Some(account) if account.status == Status::Open => Ok(account),
            _ => Err(Rejection::new(format!("account {id} is not open"))),
        };
        let (source, target) = (open(&from)?, open(&to)?);
        let amount = amount.get();
        if amount > source.balance {
            return Err(Rejection::new(format!(
                "insufficient funds: {from} has {}",
                source.balance
            ))
            .with_code("insufficient_funds"));
        }
        if target.balance.saturating_add(amount) > account::MAX_AMOUNT {
            return Err(Rejection::new(format!(
                "{to}'s balance would exceed the maximum of {}",
                account::MAX_AMOUNT
            )));
        }
        Ok(Events::new()
            .with(from, [Event::MoneyWithdrawn { amount }])
            .with(to, [Event::MoneyDeposited { amount }]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetfn::testing::given_aggregates;

    fn opened(balance: u64) -> Vec<Event> {
        let mut events = vec![Event::AccountOpened {
            owner: "someone".into(),
        }];
        if balance > 0 {
            events.push(Event::MoneyDeposited { amount: balance });
        }
        events
    }

    fn transfer(from: &str, to: &str, amount: u64) -> Command {
        Command::Transfer {
            from: from.into(),
            to: to.into(),
            amount: amount.try_into().unwrap(),
        }
    }

    #[test]
    fn a_transfer_debits_one_account_and_credits_the_other() {
        given_aggregates::<Bank>([("alice", opened(100)), ("bob", opened(0))])
            .when(transfer("alice", "bob", 30))
            .then([
                ("alice", vec![Event::MoneyWithdrawn { amount: 30 }]),
                ("bob", vec![Event::MoneyDeposited { amount: 30 }]),
            ]);
    }

    #[test]
    fn a_transfer_beyond_the_balance_is_rejected() {
        given_aggregates::<Bank>([("alice", opened(10)), ("bob", opened(0))])
            .when(transfer("alice", "bob", 11))
            .then_rejected("insufficient funds");
    }

    #[test]
    fn both_accounts_must_be_open() {
        given_aggregates::<Bank>([("alice", opened(10))])
            .when(transfer("alice", "bob", 1))
            .then_rejected("account bob is not open");
        given_aggregates::<Bank>([("bob", opened(10))])
            .when(transfer("alice", "bob", 1))
            .then_rejected("account alice is not open");
    }

    #[test]
    fn a_transfer_to_the_same_account_is_rejected() {
        given_aggregates::<Bank>([("alice", opened(10))])
            .when(transfer("alice", "alice", 1))
            .then_rejected("same account");
    }
}

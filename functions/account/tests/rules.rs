//! The account's business rules, as given/when/then specifications.

#![allow(clippy::unwrap_used)] // test helpers, not runtime paths

use account::{Account, Amount, Command, Event, MAX_AMOUNT};
use jetfn::testing::given;

fn amount(value: u64) -> Amount {
    Amount::try_from(value).unwrap()
}

fn open(owner: &str) -> Command {
    serde_json::from_value(serde_json::json!({"open": {"owner": owner}})).unwrap()
}

fn opened() -> Event {
    Event::AccountOpened {
        owner: "Ann".into(),
    }
}

fn deposited(amount: u64) -> Event {
    Event::MoneyDeposited { amount }
}

#[test]
fn opening_a_new_account_records_the_owner() {
    given::<Account>([])
        .when(open("Ann"))
        .then([Event::AccountOpened {
            owner: "Ann".into(),
        }]);
}

#[test]
fn opening_with_an_initial_deposit_records_both_events() {
    let command = serde_json::from_value(
        serde_json::json!({"open": {"owner": "Ann", "initial_deposit": 100}}),
    )
    .unwrap();
    given::<Account>([])
        .when(command)
        .then([opened(), deposited(100)]);
}

#[test]
fn opening_an_existing_account_is_rejected() {
    given::<Account>([opened()])
        .when(open("Bob"))
        .then_rejected("already exists");
}

#[test]
fn reopening_a_closed_account_is_rejected() {
    given::<Account>([opened(), Event::AccountClosed {}])
        .when(open("Bob"))
        .then_rejected("already exists");
}

#[test]
fn depositing_adds_money() {
    given::<Account>([opened()])
        .when(Command::Deposit { amount: amount(50) })
        .then([deposited(50)]);
}

#[test]
fn every_command_on_an_unopened_account_is_rejected() {
    for command in [
        Command::Deposit { amount: amount(1) },
        Command::Withdraw { amount: amount(1) },
        Command::Close {},
    ] {
        given::<Account>([]).when(command).then_rejected("not open");
    }
}

#[test]
fn every_command_on_a_closed_account_is_rejected() {
    for command in [
        Command::Deposit { amount: amount(1) },
        Command::Withdraw { amount: amount(1) },
        Command::Close {},
    ] {
        given::<Account>([opened(), Event::AccountClosed {}])
            .when(command)
            .then_rejected("closed");
    }
}

#[test]
fn withdrawing_up_to_the_balance_is_allowed() {
    given::<Account>([opened(), deposited(100)])
        .when(Command::Withdraw {
            amount: amount(100),
        })
        .then([Event::MoneyWithdrawn { amount: 100 }]);
}

#[test]
fn withdrawing_more_than_the_balance_is_rejected() {
    given::<Account>([opened(), deposited(100)])
        .when(Command::Withdraw {
            amount: amount(150),
        })
        .then_rejected("insufficient funds");
}

#[test]
fn closing_with_money_left_is_rejected() {
    given::<Account>([opened(), deposited(1)])
        .when(Command::Close {})
        .then_rejected("balance must be zero");
}

#[test]
fn closing_an_empty_account_is_allowed() {
    given::<Account>([opened(), deposited(5), Event::MoneyWithdrawn { amount: 5 }])
        .when(Command::Close {})
        .then([Event::AccountClosed {}]);
}

#[test]
fn a_deposit_that_would_overflow_is_rejected() {
    given::<Account>([opened(), deposited(u64::MAX)])
        .when(Command::Deposit { amount: amount(1) })
        .then_rejected("above the maximum");
}

#[test]
fn a_deposit_that_would_push_the_balance_past_the_maximum_is_rejected() {
    given::<Account>([opened(), deposited(MAX_AMOUNT - 10)])
        .when(Command::Deposit { amount: amount(11) })
        .then_rejected("above the maximum of 1000000000000000");
}

#[test]
fn a_deposit_up_to_the_maximum_balance_is_allowed() {
    given::<Account>([opened(), deposited(MAX_AMOUNT - 10)])
        .when(Command::Deposit { amount: amount(10) })
        .then([deposited(10)]);
}

#[test]
fn amounts_above_ten_to_the_fifteen_are_invalid() {
    assert_eq!(MAX_AMOUNT, 1_000_000_000_000_000);
    assert!(Amount::try_from(MAX_AMOUNT).is_ok());
    for body in [
        serde_json::json!({"deposit": {"amount": MAX_AMOUNT + 1}}),
        serde_json::json!({"withdraw": {"amount": u64::MAX}}),
        serde_json::json!({"open": {"owner": "Ann", "initial_deposit": MAX_AMOUNT + 1}}),
    ] {
        let err = serde_json::from_value::<Command>(body.clone()).unwrap_err();
        assert!(
            err.to_string().contains("at most 1000000000000000"),
            "{body}: {err}"
        );
    }
}

#[test]
fn the_balance_follows_deposits_and_withdrawals() {
    let state = given::<Account>([
        opened(),
        deposited(70),
        Event::MoneyWithdrawn { amount: 20 },
    ]);
    assert_eq!(state.state().balance, 50);
}

#[test]
fn amounts_must_be_positive() {
    assert!(Amount::try_from(0).is_err());
    let err = serde_json::from_value::<Command>(serde_json::json!({"deposit": {"amount": 0}}))
        .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}

#[test]
fn owners_must_be_non_blank_and_at_most_200_characters() {
    for bad in ["", "   ", &"x".repeat(201)] {
        let result = serde_json::from_value::<Command>(serde_json::json!({"open": {"owner": bad}}));
        assert!(result.is_err(), "{bad:?}");
    }
    let longest = "é".repeat(200);
    assert!(
        serde_json::from_value::<Command>(serde_json::json!({"open": {"owner": longest}})).is_ok()
    );
}

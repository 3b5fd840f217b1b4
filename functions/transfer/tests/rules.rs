//! The transfer aggregate's rules (protocol P71).

#![allow(clippy::unwrap_used)]

use jetfn::testing::given;
use transfer::{Command, Event, Transfer};

fn start(from: &str, to: &str, amount: u64) -> Command {
    serde_json::from_value(serde_json::json!({"start": {"from": from, "to": to, "amount": amount}}))
        .unwrap()
}

fn started() -> Event {
    Event::TransferStarted {
        from: "alice".into(),
        to: "bob".into(),
        amount: 10,
    }
}

#[test]
fn a_transfer_starts_once_between_two_accounts() {
    given::<Transfer>([])
        .when(start("alice", "bob", 10))
        .then([started()]);
    given::<Transfer>([started()])
        .when(start("alice", "bob", 10))
        .then_rejected("already exists");
    given::<Transfer>([])
        .when(start("alice", "alice", 10))
        .then_rejected("different accounts");
}

#[test]
fn bad_account_ids_and_amounts_are_refused_by_name() {
    let err = serde_json::from_value::<Command>(
        serde_json::json!({"start": {"from": "a b", "to": "bob", "amount": 1}}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("account id"), "{err}");
    let err = serde_json::from_value::<Command>(
        serde_json::json!({"start": {"from": "a", "to": "bob", "amount": 0}}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}

#[test]
fn an_outcome_is_recorded_once_and_never_changes() {
    given::<Transfer>([started()])
        .when(Command::Complete {})
        .then([Event::TransferCompleted {}]);
    given::<Transfer>([started(), Event::TransferCompleted {}])
        .when(Command::Complete {})
        .then([]);
    given::<Transfer>([started(), Event::TransferCompleted {}])
        .when(Command::Fail { reason: "x".into() })
        .then_rejected("already completed");
    given::<Transfer>([started(), Event::TransferFailed { reason: "x".into() }])
        .when(Command::Fail { reason: "y".into() })
        .then([]);
    given::<Transfer>([started(), Event::TransferFailed { reason: "x".into() }])
        .when(Command::Complete {})
        .then_rejected("already failed");
    given::<Transfer>([])
        .when(Command::Complete {})
        .then_rejected("not started");
}

//! Every step and compensation of a transfer, as given/when/then.

use jetfn::Recorded;
use jetfn::process::{Action, Incoming, Outcome, Sent};
use jetfn::testing::given_process;
use serde_json::json;
use std::time::Duration;
use transfer::Event as TransferEvent;
use transfer_manager::{DEADLINE, Step, TransferManager};

const PM: TransferManager = TransferManager {
    deadline: Duration::from_secs(30),
};

fn started() -> Step {
    Step::Started {
        id: "t1".into(),
        from: "alice".into(),
        to: "bob".into(),
        amount: 10,
    }
}

fn transfer_started() -> Incoming<TransferEvent> {
    Incoming::Event(Recorded::new(
        7,
        "t1",
        "TransferStarted",
        TransferEvent::TransferStarted {
            from: "alice".into(),
            to: "bob".into(),
            amount: 10,
        },
    ))
}

fn send(aggregate: &str, id: &str, command: &str, body: serde_json::Value) -> Action<Step> {
    Action::send(aggregate, id, command, body)
}

fn reply(label: &str, aggregate: &str, id: &str, outcome: Outcome) -> Incoming<TransferEvent> {
    Incoming::Reply {
        sent: Sent {
            label: label.into(),
            aggregate: aggregate.into(),
            id: id.into(),
            command: String::new(),
            body: json!({}),
            command_id: "pm.transfer.t1.0.1".into(),
        },
        outcome,
    }
}

fn accepted() -> Outcome {
    Outcome::Accepted { seq: 1 }
}

fn rejected(message: &str) -> Outcome {
    Outcome::Rejected {
        message: message.into(),
        code: None,
    }
}

fn deadline() -> Incoming<TransferEvent> {
    Incoming::Timer {
        name: DEADLINE.into(),
    }
}

#[test]
fn a_started_transfer_withdraws_from_the_sender_and_arms_the_deadline() {
    given_process(&PM, []).when(&transfer_started()).then([
        Action::record(started()),
        send("account", "alice", "withdraw", json!({"amount": 10})).labelled("debit"),
        Action::timer(DEADLINE, Duration::from_secs(30)),
    ]);
}

#[test]
fn a_transfer_started_event_seen_again_does_nothing() {
    given_process(&PM, [started()])
        .when(&transfer_started())
        .then([]);
}

#[test]
fn the_debit_deposits_to_the_receiver_and_disarms_the_deadline() {
    given_process(&PM, [started()])
        .when(&reply("debit", "account", "alice", accepted()))
        .then([
            Action::record(Step::Debited {}),
            Action::cancel_timer(DEADLINE),
            send("account", "bob", "deposit", json!({"amount": 10})).labelled("credit"),
        ]);
}

#[test]
fn a_refused_debit_fails_the_transfer_without_moving_money() {
    given_process(&PM, [started()])
        .when(&reply(
            "debit",
            "account",
            "alice",
            rejected("insufficient funds"),
        ))
        .then([
            Action::record(Step::DebitRefused {
                reason: "insufficient funds".into(),
            }),
            Action::cancel_timer(DEADLINE),
            send(
                "transfer",
                "t1",
                "fail",
                json!({"reason": "insufficient funds"}),
            )
            .labelled("fail"),
        ]);
}

#[test]
fn the_credit_completes_the_transfer() {
    given_process(&PM, [started(), Step::Debited {}])
        .when(&reply("credit", "account", "bob", accepted()))
        .then([
            Action::record(Step::Credited {}),
            send("transfer", "t1", "complete", json!({})).labelled("complete"),
        ]);
    given_process(&PM, [started(), Step::Debited {}, Step::Credited {}])
        .when(&reply("complete", "transfer", "t1", accepted()))
        .then([Action::record(Step::Marked {}), Action::complete()]);
}

#[test]
fn a_refused_credit_refunds_the_sender_then_fails_the_transfer() {
    let debited = [started(), Step::Debited {}];
    given_process(&PM, debited.clone())
        .when(&reply(
            "credit",
            "account",
            "bob",
            rejected("account is closed"),
        ))
        .then([
            Action::record(Step::CreditRefused {
                reason: "account is closed".into(),
            }),
            send("account", "alice", "deposit", json!({"amount": 10})).labelled("refund"),
        ]);
    let refused = Step::CreditRefused {
        reason: "account is closed".into(),
    };
    given_process(&PM, [started(), Step::Debited {}, refused.clone()])
        .when(&reply("refund", "account", "alice", accepted()))
        .then([
            Action::record(Step::Refunded {}),
            send(
                "transfer",
                "t1",
                "fail",
                json!({"reason": "account is closed"}),
            )
            .labelled("fail"),
        ]);
    given_process(
        &PM,
        [started(), Step::Debited {}, refused, Step::Refunded {}],
    )
    .when(&reply("fail", "transfer", "t1", accepted()))
    .then([Action::record(Step::Marked {}), Action::compensated()]);
}

#[test]
fn a_refused_refund_is_recorded_and_the_transfer_fails_with_its_reason() {
    let history = [
        started(),
        Step::Debited {},
        Step::CreditRefused {
            reason: "account is not open".into(),
        },
    ];
    given_process(&PM, history)
        .when(&reply(
            "refund",
            "account",
            "alice",
            rejected("account is closed"),
        ))
        .then([
            Action::record(Step::RefundRefused {
                reason: "account is closed".into(),
            }),
            send(
                "transfer",
                "t1",
                "fail",
                json!({"reason": "refund refused: account is closed"}),
            )
            .labelled("fail"),
        ]);
}

#[test]
fn the_deadline_before_the_debit_fails_the_transfer() {
    given_process(&PM, [started()]).when(&deadline()).then([
        Action::record(Step::TimedOut {}),
        send("transfer", "t1", "fail", json!({"reason": "timed out"})).labelled("fail"),
    ]);
}

#[test]
fn a_debit_answered_after_the_deadline_is_refunded() {
    let timed_out = [started(), Step::TimedOut {}, Step::Marked {}];
    given_process(&PM, timed_out.clone())
        .when(&reply("debit", "account", "alice", accepted()))
        .then([
            Action::record(Step::Debited {}),
            send("account", "alice", "deposit", json!({"amount": 10})).labelled("refund"),
        ]);
    given_process(
        &PM,
        [
            started(),
            Step::TimedOut {},
            Step::Marked {},
            Step::Debited {},
        ],
    )
    .when(&reply("refund", "account", "alice", accepted()))
    .then([Action::record(Step::Refunded {}), Action::compensated()]);
    given_process(&PM, timed_out)
        .when(&reply(
            "debit",
            "account",
            "alice",
            rejected("account is not open"),
        ))
        .then([
            Action::record(Step::DebitRefused {
                reason: "account is not open".into(),
            }),
            Action::cancel_timer(DEADLINE),
            Action::compensated(),
        ]);
}

#[test]
fn a_timed_out_transfer_whose_money_is_still_out_waits_after_it_is_marked() {
    given_process(&PM, [started(), Step::TimedOut {}])
        .when(&reply("fail", "transfer", "t1", accepted()))
        .then([Action::record(Step::Marked {})]);
}

#[test]
fn the_deadline_after_the_debit_is_ignored() {
    given_process(&PM, [started(), Step::Debited {}])
        .when(&deadline())
        .then([]);
}

#[test]
fn the_deadline_defaults_to_30_s() {
    assert_eq!(TransferManager::default().deadline, Duration::from_secs(30));
}

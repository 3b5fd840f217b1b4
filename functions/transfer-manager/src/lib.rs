//! The transfer process manager: moves the money of a started transfer between accounts.
//!
//! For each `TransferStarted` (instance = the transfer id) it
//! 1. withdraws the amount from `from` and arms the `deadline` timer;
//! 2. on the debit, deposits it to `to` (and disarms the deadline);
//! 3. if the deposit is rejected (`to` closed or never opened), deposits it back to `from`
//!    (the refund);
//! 4. records the outcome on the transfer: `complete` when the money arrived, `fail {reason}`
//!    when it did not move or was refunded; then ends.
//!
//! **The deadline** bounds how long a transfer waits for its debit. When it fires before the
//! withdrawal was answered (the account function is down or overloaded), the transfer is failed
//! at once with reason `timed out`. The withdrawal itself cannot be taken back unseen: it is
//! still retried with its same command id until answered, and if it turns out to have been
//! applied, the money is refunded to `from`. Once the debit is confirmed the deadline no longer
//! applies: the money has left `from`, and abandoning the deposit or the refund would lose it,
//! so they are retried with their command ids until answered.
//!
//! One outcome is not automatic: a refund rejected because `from` was closed in the meantime
//! (it must be empty to close, so only after the withdrawal emptied it). The instance records
//! `RefundRefused` with the reason, the transfer fails with it, and the amount is left for an
//! operator.

use jetfn::Recorded;
use jetfn::process::{Action, Incoming, Outcome, ProcessManager, Sent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;
use transfer::{Event as TransferEvent, Transfer};

/// The process manager, with its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferManager {
    /// How long a transfer waits for its debit.
    pub deadline: Duration,
}

impl Default for TransferManager {
    fn default() -> Self {
        TransferManager {
            deadline: Duration::from_secs(30),
        }
    }
}

impl TransferManager {
    /// The deadline from `TRANSFER_DEADLINE_SECS` (whole seconds, at least 1), 30 s if unset.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("TRANSFER_DEADLINE_SECS") {
            Err(_) => Ok(TransferManager::default()),
            Ok(text) => match text.parse::<u64>() {
                Ok(secs) if secs > 0 => Ok(TransferManager {
                    deadline: Duration::from_secs(secs),
                }),
                _ => Err(format!(
                    "TRANSFER_DEADLINE_SECS must be a whole number of seconds >= 1, is {text:?}"
                )),
            },
        }
    }
}

/// One leg of money movement.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Not asked for.
    #[default]
    NotSent,
    /// Sent, no final answer yet.
    Pending,
    /// Applied.
    Done,
    /// Refused.
    Refused,
}

/// An instance's state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    /// The transfer as started (`None` before).
    pub transfer: Option<Started>,
    /// The withdrawal from `from`.
    pub debit: Leg,
    /// The deposit to `to`.
    pub credit: Leg,
    /// The deposit back to `from`.
    pub refund: Leg,
    /// Whether the deadline fired before the debit was answered.
    pub timed_out: bool,
    /// Why the transfer fails, once known.
    pub reason: Option<String>,
    /// Whether the transfer aggregate has its outcome.
    pub marked: bool,
}

/// The transfer's details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The transfer id (the instance's correlation id).
    pub id: String,
    /// The account the money leaves.
    pub from: String,
    /// The account the money goes to.
    pub to: String,
    /// Minor units.
    pub amount: u64,
}

/// What happened to a transfer instance (stored on `pm.transfer.<transfer id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Step {
    /// The instance started for a transfer.
    Started {
        /// The transfer id.
        id: String,
        /// The account the money leaves.
        from: String,
        /// The account the money goes to.
        to: String,
        /// Minor units.
        amount: u64,
    },
    /// The amount left `from`.
    Debited {},
    /// `from` refused the withdrawal.
    DebitRefused {
        /// The account's reason.
        reason: String,
    },
    /// The amount arrived at `to`.
    Credited {},
    /// `to` refused the deposit.
    CreditRefused {
        /// The account's reason.
        reason: String,
    },
    /// The amount went back to `from`.
    Refunded {},
    /// `from` refused the refund: the amount is left for an operator.
    RefundRefused {
        /// The account's reason.
        reason: String,
    },
    /// The deadline fired before the debit was answered.
    TimedOut {},
    /// The transfer aggregate recorded the outcome.
    Marked {},
}

/// Labels of the commands the manager sends, to tell their replies apart.
mod label {
    pub const DEBIT: &str = "debit";
    pub const CREDIT: &str = "credit";
    pub const REFUND: &str = "refund";
    pub const COMPLETE: &str = "complete";
    pub const FAIL: &str = "fail";
}

/// The deadline timer's name.
pub const DEADLINE: &str = "deadline";

fn deposit(account: &str, amount: u64, as_label: &str) -> Action<Step> {
    Action::send("account", account, "deposit", json!({ "amount": amount })).labelled(as_label)
}

fn fail(transfer: &str, reason: &str) -> Action<Step> {
    Action::send("transfer", transfer, "fail", json!({ "reason": reason })).labelled(label::FAIL)
}

impl State {
    /// Whether no money of the transfer is away from `from` any more.
    fn settled(&self) -> bool {
        self.debit == Leg::Refused || matches!(self.refund, Leg::Done | Leg::Refused)
    }

    /// After the money settled on the failure path: fail the transfer unless the deadline did,
    /// and end once it is marked.
    fn finish_failed(&self, transfer: &str, reason: &str) -> Vec<Action<Step>> {
        if !self.timed_out {
            vec![fail(transfer, reason)]
        } else if self.marked {
            vec![Action::compensated()]
        } else {
            vec![]
        }
    }
}

impl ProcessManager for TransferManager {
    const NAME: &'static str = "transfer";
    type Source = Transfer;
    type State = State;
    type Event = Step;

    fn correlate(&self, event: &Recorded<TransferEvent>) -> Option<String> {
        matches!(event.event, TransferEvent::TransferStarted { .. })
            .then(|| event.aggregate_id.clone())
    }

    fn react(&self, state: &State, input: &Incoming<TransferEvent>) -> Vec<Action<Step>> {
        let started = match (input, &state.transfer) {
            (Incoming::Event(event), None) => {
                let TransferEvent::TransferStarted { from, to, amount } = &event.event else {
                    return vec![];
                };
                return vec![
                    Action::record(Step::Started {
                        id: event.aggregate_id.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        amount: *amount,
                    }),
                    Action::send("account", from, "withdraw", json!({ "amount": amount }))
                        .labelled(label::DEBIT),
                    Action::timer(DEADLINE, self.deadline),
                ];
            }
            (Incoming::Event(_), Some(_)) | (_, None) => return vec![],
            (_, Some(started)) => started,
        };
        match input {
            Incoming::Timer { name } if name == DEADLINE && state.debit == Leg::Pending => vec![
                Action::record(Step::TimedOut {}),
                fail(&started.id, "timed out"),
            ],
            Incoming::Reply { sent, outcome } => reply(state, started, sent, outcome),
            _ => vec![],
        }
    }

    fn evolve(&self, state: State, event: &Step) -> State {
        match event {
            Step::Started {
                id,
                from,
                to,
                amount,
            } => State {
                transfer: Some(Started {
                    id: id.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    amount: *amount,
                }),
                debit: Leg::Pending,
                ..state
            },
            Step::Debited {} if state.timed_out => State {
                debit: Leg::Done,
                refund: Leg::Pending,
                ..state
            },
            Step::Debited {} => State {
                debit: Leg::Done,
                credit: Leg::Pending,
                ..state
            },
            Step::DebitRefused { reason } => State {
                debit: Leg::Refused,
                reason: Some(reason.clone()),
                ..state
            },
            Step::Credited {} => State {
                credit: Leg::Done,
                ..state
            },
            Step::CreditRefused { reason } => State {
                credit: Leg::Refused,
                refund: Leg::Pending,
                reason: Some(reason.clone()),
                ..state
            },
            Step::Refunded {} => State {
                refund: Leg::Done,
                ..state
            },
            Step::RefundRefused { reason } => State {
                refund: Leg::Refused,
                reason: Some(format!("refund refused: {reason}")),
                ..state
            },
            Step::TimedOut {} => State {
                timed_out: true,
                reason: Some("timed out".into()),
                ..state
            },
            Step::Marked {} => State {
                marked: true,
                ..state
            },
        }
    }
}

/// The next step after a final reply.
fn reply(state: &State, started: &Started, sent: &Sent, outcome: &Outcome) -> Vec<Action<Step>> {
    let refused = |outcome: &Outcome| match outcome {
        Outcome::Rejected { message, .. } => Some(message.clone()),
        Outcome::Accepted { .. } => None,
    };
    match (sent.label.as_str(), refused(outcome)) {
        (label::DEBIT, None) if state.timed_out => vec![
            Action::record(Step::Debited {}),
            deposit(&started.from, started.amount, label::REFUND),
        ],
        (label::DEBIT, None) => vec![
            Action::record(Step::Debited {}),
            Action::cancel_timer(DEADLINE),
            deposit(&started.to, started.amount, label::CREDIT),
        ],
        (label::DEBIT, Some(reason)) => {
            let mut actions = vec![
                Action::record(Step::DebitRefused {
                    reason: reason.clone(),
                }),
                Action::cancel_timer(DEADLINE),
            ];
            actions.extend(state.finish_failed(&started.id, &reason));
            actions
        }
        (label::CREDIT, None) => vec![
            Action::record(Step::Credited {}),
            Action::send("transfer", &started.id, "complete", json!({})).labelled(label::COMPLETE),
        ],
        (label::CREDIT, Some(reason)) => vec![
            Action::record(Step::CreditRefused { reason }),
            deposit(&started.from, started.amount, label::REFUND),
        ],
        (label::REFUND, refusal) => {
            let reason = match &refusal {
                Some(refusal) => format!("refund refused: {refusal}"),
                None => state.reason.clone().unwrap_or_default(),
            };
            let mut actions = vec![Action::record(match refusal {
                None => Step::Refunded {},
                Some(reason) => Step::RefundRefused { reason },
            })];
            actions.extend(state.finish_failed(&started.id, &reason));
            actions
        }
        (label::COMPLETE, _) => vec![Action::record(Step::Marked {}), Action::complete()],
        (label::FAIL, _) => {
            let mut actions = vec![Action::record(Step::Marked {})];
            if state.settled() {
                actions.push(Action::compensated());
            }
            actions
        }
        _ => vec![],
    }
}

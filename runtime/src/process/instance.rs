//! One instance's stored history and what a step adds to it: pure, no I/O.
//!
//! An instance's subject holds the process manager's own events (their variant names as
//! `ce-type`) and the runtime's records, whose types start with `jetfn.`:
//!
//! * `jetfn.CommandSent` ([`Sent`]): a command to send, pending until its reply is recorded;
//! * `jetfn.ReplyReceived` (`{command_id, outcome, ..}`): the final reply to one;
//! * `jetfn.TimerSet` (`{name, token, at}`), `jetfn.TimerCancelled` (`{name, token}`),
//!   `jetfn.TimerFired` (`{name, token}`);
//! * `jetfn.Ended` (`{ending}`).
//!
//! Every record of one step carries the step's id as its command id (`jetfn-command-id`), so a
//! reload knows which inputs were already handled, at any age.

use super::{Action, Ending, Incoming, Outcome, ProcessManager, Sent};
use crate::aggregate::Aggregate;
use crate::codec::{decode_variant, encode_variant};
use crate::store::{NewEvent, StoredEvent};
use crate::wire::names;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// The prefix of the runtime's own record types.
const RECORD_PREFIX: &str = "jetfn.";
const COMMAND_SENT: &str = "jetfn.CommandSent";
const REPLY_RECEIVED: &str = "jetfn.ReplyReceived";
const TIMER_SET: &str = "jetfn.TimerSet";
const TIMER_CANCELLED: &str = "jetfn.TimerCancelled";
const TIMER_FIRED: &str = "jetfn.TimerFired";
const ENDED: &str = "jetfn.Ended";

/// Why an input could not become a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The instance's stored history cannot be folded (an event this code cannot read).
    #[error("instance {id}: {message}")]
    Corrupt {
        /// The correlation id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The process manager asked for something impossible (an invalid name or id).
    #[error("instance {id}: invalid action: {message}")]
    InvalidAction {
        /// The correlation id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// JetStream is unreachable or refused the write; the input is tried again later.
    #[error("instance {id}: {message}")]
    Unavailable {
        /// The correlation id.
        id: String,
        /// What failed.
        message: String,
    },
}

/// An armed timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TimerRecord {
    pub name: String,
    /// Which setting of the timer this is: `<step>.<index>`.
    pub token: String,
    /// When it is due (RFC 3339, whole seconds), for `TimerSet` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ReplyRecord {
    command_id: String,
    #[serde(flatten)]
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EndRecord {
    ending: Ending,
}

/// An instance folded from its history.
#[derive(Debug)]
pub(crate) struct Instance<S> {
    pub state: S,
    /// The stream sequence of its last record, 0 when new.
    pub last_seq: u64,
    /// How many records it has.
    pub version: u64,
    /// The ids of the steps recorded.
    pub steps: HashSet<String>,
    /// Commands sent whose final reply is not recorded, by command id.
    pub pending: BTreeMap<String, Sent>,
    /// Armed timers by name.
    pub timers: BTreeMap<String, TimerRecord>,
    pub ended: Option<Ending>,
}

impl<S: Default> Default for Instance<S> {
    fn default() -> Self {
        Instance {
            state: S::default(),
            last_seq: 0,
            version: 0,
            steps: HashSet::new(),
            pending: BTreeMap::new(),
            timers: BTreeMap::new(),
            ended: None,
        }
    }
}

/// What one step records, and what it means for the counters.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub records: Vec<NewEvent>,
    pub started: bool,
    pub ended: Option<Ending>,
    pub sends: usize,
    pub timers_set: usize,
}

/// Source-event types and payloads in `Incoming::Event` are the source aggregate's.
pub(crate) type Input<P> = Incoming<<<P as ProcessManager>::Source as Aggregate>::Event>;

impl<S: Default> Instance<S> {
    /// Folds an instance's stored history.
    pub fn fold<P: ProcessManager<State = S>>(
        pm: &P,
        id: &str,
        history: &[StoredEvent],
    ) -> Result<Self, StepError> {
        let mut instance = Instance::default();
        for stored in history {
            instance.apply(pm, id, stored)?;
        }
        Ok(instance)
    }

    fn apply<P: ProcessManager<State = S>>(
        &mut self,
        pm: &P,
        id: &str,
        stored: &StoredEvent,
    ) -> Result<(), StepError> {
        let corrupt = |message: String| StepError::Corrupt {
            id: id.to_owned(),
            message: format!("record at sequence {}: {message}", stored.seq),
        };
        self.last_seq = stored.seq;
        self.version += 1;
        if let Some(step) = &stored.command_id {
            self.steps.insert(step.clone());
        }
        let payload = || -> Result<serde_json::Value, StepError> {
            serde_json::from_slice(&stored.payload)
                .map_err(|e| corrupt(format!("payload is not JSON: {e}")))
        };
        let record = || -> Result<TimerRecord, StepError> { parse(stored).map_err(corrupt) };
        match stored.event_type.as_str() {
            COMMAND_SENT => {
                let sent: Sent = parse(stored).map_err(corrupt)?;
                self.pending.insert(sent.command_id.clone(), sent);
            }
            REPLY_RECEIVED => {
                let reply: ReplyRecord = parse(stored).map_err(corrupt)?;
                self.pending.remove(&reply.command_id);
            }
            TIMER_SET => {
                let timer = record()?;
                self.timers.insert(timer.name.clone(), timer);
            }
            TIMER_CANCELLED | TIMER_FIRED => {
                let timer = record()?;
                if self.armed(&timer.name, &timer.token) {
                    self.timers.remove(&timer.name);
                }
            }
            ENDED => {
                let end: EndRecord = parse(stored).map_err(corrupt)?;
                self.ended = Some(end.ending);
            }
            other if other.starts_with(RECORD_PREFIX) => {
                return Err(corrupt(format!("unknown runtime record {other}")));
            }
            event_type => {
                let event: P::Event = decode_variant(event_type, payload()?)
                    .map_err(|e| corrupt(format!("{event_type}: {e}")))?;
                self.state = pm.evolve(std::mem::take(&mut self.state), &event);
            }
        }
        Ok(())
    }

    /// Whether the timer `name` is armed with `token`.
    pub fn armed(&self, name: &str, token: &str) -> bool {
        self.timers.get(name).is_some_and(|t| t.token == token)
    }

    /// What handling `input` as step `step_id` records. Nothing when the instance has ended,
    /// when a reply answers no pending command, or when a timer is no longer armed with that
    /// token: such inputs are late and are ignored. `now` is when the step happens, in seconds
    /// since the Unix epoch (timers are due relative to it).
    pub fn plan<P: ProcessManager<State = S>>(
        &self,
        pm: &P,
        id: &str,
        input: &Input<P>,
        timer_token: Option<&str>,
        now: i64,
    ) -> Result<Plan, StepError> {
        let mut plan = Plan::default();
        if self.ended.is_some() {
            return Ok(plan);
        }
        match (input, timer_token) {
            (Incoming::Reply { sent, outcome }, _) => {
                if !self.pending.contains_key(&sent.command_id) {
                    return Ok(plan);
                }
                let record = ReplyRecord {
                    command_id: sent.command_id.clone(),
                    outcome: outcome.clone(),
                };
                plan.records.push(record_of(REPLY_RECEIVED, &record, id)?);
            }
            (Incoming::Timer { name }, Some(token)) => {
                if !self.armed(name, token) {
                    return Ok(plan);
                }
                let record = TimerRecord {
                    name: name.clone(),
                    token: token.to_owned(),
                    at: None,
                };
                plan.records.push(record_of(TIMER_FIRED, &record, id)?);
            }
            (Incoming::Timer { .. }, None) => return Ok(plan),
            (Incoming::Event(_), _) => {}
        }
        let step = self.steps.len();
        let mut timers = self.timers.clone();
        // A timer that fired is disarmed by firing.
        if let Incoming::Timer { name } = input {
            timers.remove(name);
        }
        let invalid = |message: String| StepError::InvalidAction {
            id: id.to_owned(),
            message,
        };
        let mut ended = None;
        for (index, action) in pm.react(&self.state, input).into_iter().enumerate() {
            if ended.is_some() {
                return Err(invalid("an action follows End in the same step".into()));
            }
            match action {
                Action::Record(event) => {
                    let (event_type, payload) =
                        encode_variant(&event).map_err(|e| invalid(e.to_string()))?;
                    if event_type.starts_with(RECORD_PREFIX) {
                        return Err(invalid(format!(
                            "event type {event_type} uses the runtime's prefix {RECORD_PREFIX}"
                        )));
                    }
                    plan.records.push(NewEvent {
                        event_type,
                        version: 1,
                        payload,
                    });
                }
                Action::Send(outgoing) => {
                    names::check_aggregate_name(&outgoing.aggregate)
                        .map_err(|e| invalid(e.to_string()))?;
                    names::check_id(&outgoing.id).map_err(invalid)?;
                    if !crate::config::is_name(&outgoing.command) {
                        return Err(invalid(format!(
                            "command name {:?} must match [A-Za-z0-9_-]+",
                            outgoing.command
                        )));
                    }
                    let sent = Sent {
                        command_id: command_id(P::NAME, id, step, index),
                        label: outgoing.label,
                        aggregate: outgoing.aggregate,
                        id: outgoing.id,
                        command: outgoing.command,
                        body: outgoing.body,
                    };
                    plan.records.push(record_of(COMMAND_SENT, &sent, id)?);
                    plan.sends += 1;
                }
                Action::SetTimer { name, after } => {
                    if !crate::config::is_name(&name) {
                        return Err(invalid(format!(
                            "timer name {name:?} must match [A-Za-z0-9_-]+"
                        )));
                    }
                    let record = TimerRecord {
                        name: name.clone(),
                        token: format!("{step}-{index}"),
                        at: Some(due_at(now, after).map_err(invalid)?),
                    };
                    plan.records.push(record_of(TIMER_SET, &record, id)?);
                    timers.insert(name, record);
                    plan.timers_set += 1;
                }
                Action::CancelTimer { name } => {
                    if let Some(armed) = timers.remove(&name) {
                        let record = TimerRecord { at: None, ..armed };
                        plan.records.push(record_of(TIMER_CANCELLED, &record, id)?);
                    }
                }
                Action::End(ending) => {
                    // The instance's armed timers go with it, in the same write.
                    for (_, armed) in std::mem::take(&mut timers) {
                        let record = TimerRecord { at: None, ..armed };
                        plan.records.push(record_of(TIMER_CANCELLED, &record, id)?);
                    }
                    plan.records
                        .push(record_of(ENDED, &EndRecord { ending }, id)?);
                    ended = Some(ending);
                }
            }
        }
        plan.started = self.last_seq == 0 && !plan.records.is_empty();
        plan.ended = ended;
        Ok(plan)
    }
}

/// Whether a stored record is a timer being set, and which.
pub(crate) fn timer_set(stored: &StoredEvent) -> Option<TimerRecord> {
    (stored.event_type == TIMER_SET)
        .then(|| parse(stored).ok())
        .flatten()
}

/// Whether a stored record is a timer being cancelled, and which.
pub(crate) fn timer_cancelled(stored: &StoredEvent) -> Option<TimerRecord> {
    (stored.event_type == TIMER_CANCELLED)
        .then(|| parse(stored).ok())
        .flatten()
}

/// Whether a stored record is a command to send, and which.
pub(crate) fn command_sent(stored: &StoredEvent) -> Option<Result<Sent, String>> {
    (stored.event_type == COMMAND_SENT)
        .then(|| parse(stored).map_err(|e| format!("at sequence {}: {e}", stored.seq)))
}

/// A runtime record's payload.
fn parse<T: serde::de::DeserializeOwned>(stored: &StoredEvent) -> Result<T, String> {
    serde_json::from_slice(&stored.payload).map_err(|e| format!("{}: {e}", stored.event_type))
}

fn record_of<T: Serialize>(event_type: &str, record: &T, id: &str) -> Result<NewEvent, StepError> {
    let payload = serde_json::to_vec(record).map_err(|e| StepError::InvalidAction {
        id: id.to_owned(),
        message: format!("{event_type}: {e}"),
    })?;
    Ok(NewEvent {
        event_type: event_type.to_owned(),
        version: 1,
        payload,
    })
}

/// The command id of the `index`th action of step `step` of instance `id`: the same on every
/// attempt and after any crash, and never the same for two commands.
/// `pm.<name>.<id>.<step>.<index>`, with the id hashed when that would exceed the command id
/// limit.
pub(crate) fn command_id(name: &str, id: &str, step: usize, index: usize) -> String {
    let full = format!("pm.{name}.{id}.{step}.{index}");
    if full.len() <= crate::command::MAX_COMMAND_ID_LEN {
        return full;
    }
    format!("pm.{name}.h{:016x}.{step}.{index}", fnv1a64(id))
}

fn fnv1a64(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// `now + after` as RFC 3339 in UTC, rounded up to whole seconds (`@at` schedules take
/// seconds).
fn due_at(now: i64, after: Duration) -> Result<String, String> {
    let after = i64::try_from(after.as_secs() + u64::from(after.subsec_nanos() > 0))
        .map_err(|_| format!("timer delay {after:?} is too long"))?;
    let at = now
        .checked_add(after)
        .and_then(|at| time::OffsetDateTime::from_unix_timestamp(at).ok())
        .ok_or_else(|| format!("timer delay {after} s is too long"))?;
    at.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recorded;
    use crate::aggregate::Rejection;
    use crate::process::Outcome;
    use bytes::Bytes;
    use serde_json::json;

    #[derive(Default)]
    struct Order;
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    enum OrderCommand {}
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    enum OrderEvent {
        Placed {},
    }
    impl Aggregate for Order {
        const NAME: &'static str = "order";
        type Command = OrderCommand;
        type Event = OrderEvent;
        fn decide(&self, c: OrderCommand) -> Result<Vec<OrderEvent>, Rejection> {
            match c {}
        }
        fn evolve(self, _: &OrderEvent) -> Self {
            self
        }
    }

    /// On an order: note it, ask for payment, arm a timer; on any reply or timer: end.
    struct Payment {
        bad_timer: bool,
    }
    #[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
    enum Noted {
        Asked {},
    }
    impl ProcessManager for Payment {
        const NAME: &'static str = "payment";
        type Source = Order;
        type State = u32;
        type Event = Noted;
        fn correlate(&self, e: &Recorded<OrderEvent>) -> Option<String> {
            Some(e.aggregate_id.clone())
        }
        fn react(&self, _: &u32, input: &Incoming<OrderEvent>) -> Vec<Action<Noted>> {
            match input {
                Incoming::Event(_) => vec![
                    Action::record(Noted::Asked {}),
                    Action::send("pay", "o1", "charge", json!({})),
                    Action::timer(
                        if self.bad_timer { "a b" } else { "t" },
                        Duration::from_secs(5),
                    ),
                ],
                _ => vec![Action::complete()],
            }
        }
        fn evolve(&self, asked: u32, _: &Noted) -> u32 {
            asked + 1
        }
    }

    fn stored(plan: &Plan, step: &str, first_seq: u64) -> Vec<StoredEvent> {
        plan.records
            .iter()
            .enumerate()
            .map(|(n, record)| StoredEvent {
                seq: first_seq + n as u64,
                event_type: record.event_type.clone(),
                version: 1,
                time: None,
                command_id: Some(step.to_owned()),
                fingerprint: None,
                previous_seq: None,
                index: 0,
                aggregate_version: None,
                payload: Bytes::from(record.payload.clone()),
            })
            .collect()
    }

    fn placed() -> Input<Payment> {
        Incoming::Event(Recorded::new(1, "o1", "Placed", OrderEvent::Placed {}))
    }

    /// The instance after the order was placed: the charge pending, timer `t` armed.
    fn started() -> (Instance<u32>, Vec<StoredEvent>, Sent) {
        let pm = Payment { bad_timer: false };
        let plan = Instance::<u32>::default()
            .plan(&pm, "o1", &placed(), None, 0)
            .unwrap();
        assert!(plan.started);
        assert_eq!((plan.sends, plan.timers_set), (1, 1));
        let history = stored(&plan, "evt-1", 1);
        let instance = Instance::fold(&pm, "o1", &history).unwrap();
        let sent = instance.pending.values().next().cloned().unwrap();
        (instance, history, sent)
    }

    #[test]
    fn a_step_records_events_commands_and_timers_and_the_fold_reads_them_back() {
        let (instance, _, sent) = started();
        assert_eq!(instance.state, 1);
        assert!(instance.steps.contains("evt-1"));
        assert_eq!(sent.command_id, "pm.payment.o1.0.1");
        assert_eq!(instance.timers["t"].token, "0-2");
        assert_eq!(
            instance.timers["t"].at.as_deref(),
            Some("1970-01-01T00:00:05Z")
        );
    }

    #[test]
    fn ending_cancels_the_armed_timers_in_the_same_write_and_later_inputs_are_ignored() {
        let pm = Payment { bad_timer: false };
        let (instance, mut history, sent) = started();
        let reply = Incoming::Reply {
            sent: sent.clone(),
            outcome: Outcome::Accepted { seq: 9 },
        };
        let plan = instance.plan(&pm, "o1", &reply, None, 0).unwrap();
        let types: Vec<_> = plan.records.iter().map(|r| r.event_type.as_str()).collect();
        assert_eq!(types, [REPLY_RECEIVED, TIMER_CANCELLED, ENDED]);
        history.extend(stored(&plan, "reply-x", 10));
        let ended = Instance::fold(&pm, "o1", &history).unwrap();
        assert!(ended.pending.is_empty() && ended.timers.is_empty());
        assert_eq!(ended.ended, Some(Ending::Completed));
        let timer = Incoming::Timer { name: "t".into() };
        let late = ended.plan(&pm, "o1", &timer, Some("0-2"), 0).unwrap();
        assert!(late.records.is_empty(), "a timer after the end counts");
    }

    #[test]
    fn a_reply_to_no_pending_command_and_a_stale_timer_token_are_ignored() {
        let pm = Payment { bad_timer: false };
        let (instance, _, sent) = started();
        let stray = Incoming::Reply {
            sent: Sent {
                command_id: "pm.payment.o1.7.0".into(),
                ..sent
            },
            outcome: Outcome::Accepted { seq: 1 },
        };
        assert!(
            instance
                .plan(&pm, "o1", &stray, None, 0)
                .unwrap()
                .records
                .is_empty()
        );
        let timer = Incoming::Timer { name: "t".into() };
        let stale = instance.plan(&pm, "o1", &timer, Some("0-1"), 0).unwrap();
        assert!(stale.records.is_empty());
        let due = instance.plan(&pm, "o1", &timer, Some("0-2"), 0).unwrap();
        assert_eq!(due.records[0].event_type, TIMER_FIRED);
    }

    #[test]
    fn an_invalid_timer_name_is_refused_naming_it() {
        let pm = Payment { bad_timer: true };
        let err = Instance::<u32>::default()
            .plan(&pm, "o1", &placed(), None, 0)
            .unwrap_err();
        assert!(err.to_string().contains(r#"timer name "a b""#), "{err}");
    }

    #[test]
    fn an_unknown_runtime_record_makes_the_instance_unreadable() {
        let pm = Payment { bad_timer: false };
        let (_, mut history, _) = started();
        history[0].event_type = "jetfn.Something".into();
        let err = Instance::fold(&pm, "o1", &history).unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown runtime record jetfn.Something"),
            "{err}"
        );
    }

    #[test]
    fn command_ids_are_deterministic_and_bounded() {
        assert_eq!(command_id("transfer", "t1", 2, 0), "pm.transfer.t1.2.0");
        let long = "x".repeat(128);
        let id = command_id("transfer", &long, 2, 1);
        assert!(id.len() <= crate::command::MAX_COMMAND_ID_LEN, "{id}");
        assert_eq!(id, command_id("transfer", &long, 2, 1));
        assert_ne!(id, command_id("transfer", &long, 2, 0));
    }

    #[test]
    fn timers_are_due_in_whole_seconds_of_utc() {
        assert_eq!(
            due_at(0, Duration::from_millis(1500)).unwrap(),
            "1970-01-01T00:00:02Z"
        );
        assert!(due_at(i64::MAX - 1, Duration::from_secs(10)).is_err());
    }
}

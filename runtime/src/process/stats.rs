//! Live numbers of one process manager instance, for `$SRV.STATS` and its status endpoint.

use super::Ending;
use super::instance::Plan;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since this process started, and gauges refreshed from the consumers.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub compensated: AtomicU64,
    pub steps: AtomicU64,
    pub commands_sent: AtomicU64,
    pub commands_retried: AtomicU64,
    pub commands_in_flight: AtomicU64,
    pub timers_set: AtomicU64,
    pub timers_fired: AtomicU64,
    pub timers_ignored: AtomicU64,
    pub dead_letters: AtomicU64,
    pub errors: AtomicU64,
    /// Source events not yet handled (the events consumer's pending and unacknowledged).
    pub events_pending: AtomicU64,
    /// Recorded commands and timers not yet sent (the outbox consumer's).
    pub outbox_pending: AtomicU64,
}

impl Stats {
    /// Counts a recorded step.
    pub fn recorded(&self, plan: &Plan) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        if plan.started {
            self.started.fetch_add(1, Ordering::Relaxed);
        }
        match plan.ended {
            Some(Ending::Completed) => self.completed.fetch_add(1, Ordering::Relaxed),
            Some(Ending::Compensated) => self.compensated.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        self.timers_set
            .fetch_add(plan.timers_set as u64, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (started, completed, compensated) = (
            get(&self.started),
            get(&self.completed),
            get(&self.compensated),
        );
        serde_json::json!({
            "instances": {
                "started": started,
                "completed": completed,
                "compensated": compensated,
                "open": started.saturating_sub(completed + compensated),
            },
            "steps": get(&self.steps),
            "commands": {
                "sent": get(&self.commands_sent),
                "retried": get(&self.commands_retried),
                "in_flight": get(&self.commands_in_flight),
                "pending": get(&self.outbox_pending),
            },
            "timers": {
                "set": get(&self.timers_set),
                "fired": get(&self.timers_fired),
                "ignored": get(&self.timers_ignored),
            },
            "events_pending": get(&self.events_pending),
            "dead_letters": get(&self.dead_letters),
            "errors": get(&self.errors),
        })
    }
}

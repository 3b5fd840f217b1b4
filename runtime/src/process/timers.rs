//! Durable timers as JetStream message schedules, in a stream of their own.
//!
//! Rules relied on, checked in nats-server's `server/stream.go` and `server/scheduler.go`
//! (2.12 and later; the README lists them):
//! * a message with `Nats-Schedule: @at <RFC 3339>` is a schedule; the stream must allow
//!   message schedules, and `Nats-Schedule-Target` must be a valid literal subject of the same
//!   stream, other than the schedule's own subject;
//! * the server adds a subject rollup to each schedule, so one subject holds one schedule: a new
//!   schedule on it replaces the old one;
//! * when due (at once if overdue, e.g. after a restart) the server publishes the schedule's
//!   payload and headers, minus `Nats-Schedule*`, `Nats-Expected-*` and `Nats-Msg-Id`, to the
//!   target, and then purges the schedule;
//! * purging the schedule's subject before it is due cancels it.
//!
//! A schedule lives in another stream than the instance, so it cannot be part of the step's
//! atomic write: the write records the timer (`jetfn.TimerSet` / `jetfn.TimerCancelled`) and the
//! outbox then publishes or purges the schedule. A schedule that fires although its timer was
//! cancelled or its instance ended (the purge came late, or was lost in a crash) is harmless:
//! a firing counts only while the instance has that very timer armed, by token.

use crate::Error;
use crate::wire::header;
use crate::wire::names::ProcessNames;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a fired timer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Firing {
    pub id: String,
    pub name: String,
    pub token: String,
}

/// The timer stream of one process manager.
#[derive(Debug, Clone)]
pub(crate) struct Timers {
    js: jetstream::Context,
    names: ProcessNames,
}

impl Timers {
    /// Creates the timer stream, or turns message schedules on in an existing one.
    pub async fn provision(
        js: jetstream::Context,
        names: ProcessNames,
        replicas: usize,
    ) -> Result<Timers, Error> {
        let desired = stream::Config {
            name: names.timer_stream.clone(),
            description: Some(format!("jetfn timers of process manager {}", names.name)),
            subjects: vec![names.timer_subjects()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_message_schedules: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let failed = |e: String| Error::Service(format!("timer stream {}: {e}", desired.name));
        match js.get_stream(&desired.name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| failed(e.to_string()))?;
                if !info.config.allow_message_schedules {
                    let mut config = info.config.clone();
                    config.allow_message_schedules = true;
                    js.update_stream(config)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                }
            }
            Err(_) => {
                js.get_or_create_stream(desired.clone())
                    .await
                    .map_err(|e| failed(e.to_string()))?;
            }
        }
        Ok(Timers { js, names })
    }

    /// Schedules `firing` at `at` (RFC 3339). Publishing the same timer again is dropped as a
    /// duplicate, or replaces the same schedule.
    pub async fn schedule(&self, firing: &Firing, at: &str) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert(header::SCHEDULE, format!("@at {at}").as_str());
        headers.insert(
            header::SCHEDULE_TARGET,
            self.names.timer_fired(&firing.id, &firing.name).as_str(),
        );
        headers.insert(
            header::MSG_ID,
            format!("{}.{}.{}", firing.id, firing.name, firing.token).as_str(),
        );
        let payload = serde_json::to_vec(firing).map_err(|e| e.to_string())?;
        let subject = self.names.timer_schedule(&firing.id, &firing.name);
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Cancels timer `name` of instance `id` by purging its schedule.
    pub async fn cancel(&self, id: &str, name: &str) -> Result<(), String> {
        let stream = self
            .js
            .get_stream(&self.names.timer_stream)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .purge()
            .filter(self.names.timer_schedule(id, name))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Removes a fired timer's message once it was handled.
    pub async fn forget(&self, seq: u64) {
        if let Ok(stream) = self.js.get_stream(&self.names.timer_stream).await {
            let _ = stream.delete_message(seq).await;
        }
    }
}

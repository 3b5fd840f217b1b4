//! A typed Rust client for command functions.
//!
//! ```no_run
//! # use jetfn::{Aggregate, Rejection};
//! # #[derive(Default)] struct Account;
//! # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! # #[serde(rename_all = "snake_case")] enum Command { Deposit { amount: u64 } }
//! # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)] enum Event {}
//! # impl Aggregate for Account {
//! #     const NAME: &'static str = "account";
//! #     type Command = Command; type Event = Event;
//! #     fn decide(&self, c: Command) -> Result<Vec<Event>, Rejection> { Ok(vec![]) }
//! #     fn evolve(self, e: &Event) -> Self { match *e {} }
//! # }
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use jetfn::client::CommandClient;
//! use jetfn::readmodel::ReadModel;
//! use std::time::Duration;
//!
//! let client = CommandClient::new(async_nats::connect("127.0.0.1:4222").await?);
//! let accepted = client.send::<Account>("alice", &Command::Deposit { amount: 50 }).await?;
//!
//! // Read your write: wait until the read model has applied it.
//! let model = ReadModel::connect("redis://127.0.0.1:6379", "account-balances").await?;
//! model.wait_for(accepted.seq, Duration::from_secs(2)).await?;
//! # Ok(()) }
//! ```

use crate::aggregate::Aggregate;
use crate::codec::encode_variant;
use crate::command::{Accepted, ErrorKind, Reply};
use crate::wire::{CommandSubjects, header};
use async_nats::HeaderMap;
use serde::Serialize;
use std::time::Duration;

/// Why a command was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The function answered with a failure (after retries, for `unavailable`).
    #[error("{kind} ({code}): {message}", code = kind.code())]
    Failed {
        /// The failure kind.
        kind: ErrorKind,
        /// The function's message.
        message: String,
    },
    /// No function answered in time, every attempt (the command may or may not be applied;
    /// sending it again with the same command id is safe).
    #[error("no reply: {0}")]
    NoReply(String),
    /// The command could not be encoded or the reply was not the documented JSON.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The failure kind, if the function answered.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Failed { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Sends commands with an idempotency key, a timeout, and retries of `unavailable` and of
/// unanswered requests under the same command id (so a retry never applies twice).
#[derive(Debug, Clone)]
pub struct CommandClient {
    nats: async_nats::Client,
    prefix: Option<String>,
    timeout: Duration,
    attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
}

/// The longest pause between two attempts, however many attempts are configured.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl CommandClient {
    /// A client with a 5 s timeout and 5 attempts.
    pub fn new(nats: async_nats::Client) -> Self {
        CommandClient {
            nats,
            prefix: None,
            timeout: Duration::from_secs(5),
            attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: MAX_BACKOFF,
        }
    }

    /// The functions' `command.subject_prefix`, if they use one.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// How long to wait for each reply.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times to try in all (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The first pause between attempts (doubling after each) and its ceiling (default 5 s).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The pause before attempt `attempt` (from 1): doubling, never above the ceiling.
    fn pause(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// Sends a command with a new command id.
    pub async fn send<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
    ) -> Result<Accepted, ClientError>
    where
        A::Command: Serialize,
    {
        let command_id = uuid::Uuid::now_v7().to_string();
        self.send_with_id::<A>(id, command, &command_id).await
    }

    /// Sends a command under `command_id`: sending the same id again returns the first reply.
    pub async fn send_with_id<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        command_id: &str,
    ) -> Result<Accepted, ClientError>
    where
        A::Command: Serialize,
    {
        let (name, body) =
            encode_variant(command).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let subject = CommandSubjects::new(self.prefix.as_deref(), A::NAME).subject(id, &name);
        let mut last = ClientError::NoReply("no attempt made".into());
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(self.pause(attempt)).await;
            }
            match self.request(&subject, command_id, body.clone()).await {
                Ok(Reply::Accepted(accepted)) => return Ok(accepted),
                Ok(Reply::Failed(failure)) if failure.kind == ErrorKind::Unavailable => {
                    last = ClientError::Failed {
                        kind: failure.kind,
                        message: failure.message,
                    };
                }
                Ok(Reply::Failed(failure)) => {
                    return Err(ClientError::Failed {
                        kind: failure.kind,
                        message: failure.message,
                    });
                }
                Err(err @ ClientError::NoReply(_)) => last = err,
                Err(err) => return Err(err),
            }
        }
        Err(last)
    }

    /// Sends command `command` with JSON `body` to aggregate `id` of type `aggregate` under
    /// `command_id`, once: the reply as it came, `unavailable` included.
    pub(crate) async fn send_once(
        &self,
        aggregate: &str,
        id: &str,
        command: &str,
        body: Vec<u8>,
        command_id: &str,
    ) -> Result<Reply, ClientError> {
        let subject = CommandSubjects::new(self.prefix.as_deref(), aggregate).subject(id, command);
        self.request(&subject, command_id, body).await
    }

    async fn request(
        &self,
        subject: &str,
        command_id: &str,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, command_id);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body.into())
            .timeout(Some(self.timeout));
        let message = self
            .nats
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|e| ClientError::NoReply(format!("{subject}: {e}")))?;
        serde_json::from_slice(&message.payload).map_err(|e| {
            ClientError::Protocol(format!(
                "reply {:?} is not the documented JSON: {e}",
                String::from_utf8_lossy(&message.payload)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_retry_pause_doubles_up_to_its_ceiling() {
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        let client = CommandClient::new(nats)
            .attempts(100)
            .backoff(Duration::from_millis(100), Duration::from_secs(1));
        let pauses: Vec<_> = [1, 2, 3, 4, 5, 60].map(|a| client.pause(a)).into();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            pauses,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
    }
}

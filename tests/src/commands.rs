//! Helpers for command function tests: start the account function, send commands as a plain
//! NATS client would, and read the stream back through JetStream's own API (not jetfn's loader),
//! so tests check what is really stored.

use crate::NatsServer;
use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use jetfn::Reply;
use jetfn::command::RunningFunction;
use jetfn::wire::{CommandSubjects, header};
use serde_json::Value;
use std::time::Duration;

/// The account function's stream, with default configuration.
pub const ACCOUNT_STREAM: &str = "ACCOUNT_EVENTS";

/// A configuration for the account function against `nats`, with short timeouts.
pub fn account_config(nats: &NatsServer) -> jetfn::Config {
    let mut config = jetfn::Config::default();
    config.nats.url = nats.url();
    config.nats.request_timeout = Duration::from_secs(5);
    config
}

/// [`account_config`] without aggregate affinity: every instance decides whichever accounts the
/// queue group sends it, as while instances come and go. For tests that make instances race.
pub fn account_config_without_affinity(nats: &NatsServer) -> jetfn::Config {
    let mut config = account_config(nats);
    config.command.affinity = false;
    config
}

/// Starts the account command function in this process.
pub async fn start_account(config: jetfn::Config) -> Result<RunningFunction> {
    jetfn::command_function::<account::Account>()
        .with_config(config)
        .start()
        .await
        .context("starting the account function")
}

/// Two instances of the account command function in this process, both with `config`.
pub async fn start_two_accounts(
    config: jetfn::Config,
) -> Result<(RunningFunction, RunningFunction)> {
    let first = start_account(config.clone()).await?;
    let second = start_account(config).await?;
    Ok((first, second))
}

/// A reply as a client sees it: the decoded body and the service error headers.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The decoded JSON body.
    pub reply: Reply,
    /// The raw JSON body.
    pub body: Value,
    /// `Nats-Service-Error-Code`, if present.
    pub error_code: Option<String>,
    /// `Nats-Service-Error`, if present.
    pub error_message: Option<String>,
}

impl Sent {
    /// The accepted reply, or a panic naming what came instead.
    #[track_caller]
    pub fn accepted(&self) -> &jetfn::command::Accepted {
        match &self.reply {
            Reply::Accepted(accepted) => accepted,
            Reply::Failed(failure) => panic!("expected success, got {failure:?}"),
        }
    }
}

/// Sends a command as raw NATS: subject, JSON body bytes and an optional `Nats-Msg-Id`.
pub async fn send_raw(
    client: &async_nats::Client,
    subject: &str,
    body: impl Into<bytes::Bytes>,
    command_id: Option<&str>,
) -> Result<Sent> {
    send_raw_within(client, subject, body, command_id, Duration::from_secs(10)).await
}

/// [`send_raw`], waiting up to `timeout` for the reply.
pub async fn send_raw_within(
    client: &async_nats::Client,
    subject: &str,
    body: impl Into<bytes::Bytes>,
    command_id: Option<&str>,
    timeout: Duration,
) -> Result<Sent> {
    let mut headers = HeaderMap::new();
    if let Some(id) = command_id {
        headers.insert(header::MSG_ID, id);
    }
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(body.into())
        .timeout(Some(timeout));
    let message = client
        .send_request(subject.to_owned(), request)
        .await
        .with_context(|| format!("request to {subject}"))?;
    let body: Value = serde_json::from_slice(&message.payload)
        .with_context(|| format!("reply body {:?}", String::from_utf8_lossy(&message.payload)))?;
    let reply = serde_json::from_value(body.clone()).context("reply shape")?;
    let get = |name: &'static str| header::get(message.headers.as_ref(), name).map(str::to_owned);
    Ok(Sent {
        reply,
        body,
        error_code: get(header::SERVICE_ERROR_CODE),
        error_message: get(header::SERVICE_ERROR),
    })
}

/// Sends `cmd.account.<id>.<command>` with a JSON body.
pub async fn send(
    client: &async_nats::Client,
    id: &str,
    command: &str,
    body: Value,
    command_id: Option<&str>,
) -> Result<Sent> {
    let subject = CommandSubjects::new(None, "account").subject(id, command);
    send_raw(client, &subject, body.to_string(), command_id).await
}

/// One message as stored in the stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Payload as JSON.
    pub payload: Value,
}

impl StoredMessage {
    /// A header value, or "" when absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    }
}

/// Opens a stream by name.
pub async fn stream(client: &async_nats::Client, name: &str) -> Result<Stream> {
    jetstream::new(client.clone())
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name}"))
}

/// Every message of a stream on `subject` (all subjects when `None`), read one by one with the
/// stream message API.
pub async fn stored_messages(
    client: &async_nats::Client,
    stream_name: &str,
    subject: Option<&str>,
) -> Result<Vec<StoredMessage>> {
    let mut stream = stream(client, stream_name).await?;
    let state = stream.info().await?.state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return Ok(messages);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream
            .get_raw_message(seq)
            .await
            .with_context(|| format!("message {seq}"))?;
        if subject.is_some_and(|s| s != message.subject.as_str()) {
            continue;
        }
        let payload = serde_json::from_slice(&message.payload)
            .with_context(|| format!("payload of message {seq}"))?;
        messages.push(StoredMessage {
            seq,
            subject: message.subject.to_string(),
            headers: message.headers,
            payload,
        });
    }
    Ok(messages)
}

/// Creates stream `name` as an operator would, taking only `subjects`, with atomic publish:
/// for tests of functions that refuse a stream they were not given.
pub async fn operator_stream(
    client: &async_nats::Client,
    name: &str,
    subjects: &[&str],
) -> Result<()> {
    jetstream::new(client.clone())
        .create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
    Ok(())
}

/// How many messages the stream holds.
pub async fn message_count(client: &async_nats::Client, stream_name: &str) -> Result<u64> {
    match jetstream::new(client.clone()).get_stream(stream_name).await {
        Ok(mut stream) => Ok(stream.info().await?.state.messages),
        Err(_) => Ok(0),
    }
}

/// The balance an account's stored events add up to.
pub fn balance(events: &[StoredMessage]) -> Result<u64> {
    let mut balance: u64 = 0;
    for event in events {
        let amount = || {
            event.payload["amount"]
                .as_u64()
                .with_context(|| format!("amount of event {}", event.seq))
        };
        match event.header(header::CE_TYPE).as_str() {
            "MoneyDeposited" => balance += amount()?,
            "MoneyWithdrawn" => balance -= amount()?,
            "AccountOpened" | "AccountClosed" => {}
            other => bail!("unexpected event type {other:?} at {}", event.seq),
        }
    }
    Ok(balance)
}

/// Starts the bank's atomic decision function in this process.
pub async fn start_bank(config: jetfn::Config) -> Result<RunningFunction> {
    jetfn::decision_function::<bank::Bank>()
        .with_config(config)
        .start()
        .await
        .context("starting the bank function")
}

/// Sends `cmd.bank.<id>.transfer {from, to, amount}`. The reply may wait behind many transfers
/// queued on the same accounts, so it is awaited for up to 60 s.
pub async fn transfer(
    client: &async_nats::Client,
    id: &str,
    from: &str,
    to: &str,
    amount: u64,
    command_id: Option<&str>,
) -> Result<Sent> {
    let subject = CommandSubjects::new(None, "bank").subject(id, "transfer");
    let body = serde_json::json!({"from": from, "to": to, "amount": amount});
    send_raw_within(
        client,
        &subject,
        body.to_string(),
        command_id,
        Duration::from_secs(60),
    )
    .await
}

/// The `$SRV.STATS.<service>` replies of `instances` instances (each answers), waiting up to 5 s
/// for each.
pub async fn service_stats(
    client: &async_nats::Client,
    service: &str,
    instances: usize,
) -> Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.STATS.{service}"), inbox, "".into())
        .await?;
    let mut stats = Vec::with_capacity(instances);
    while stats.len() < instances {
        let message = tokio::time::timeout(
            Duration::from_secs(5),
            futures::StreamExt::next(&mut replies),
        )
        .await
        .with_context(|| {
            format!(
                "{} of {instances} instances answered $SRV.STATS",
                stats.len()
            )
        })?
        .context("inbox subscription closed")?;
        stats.push(serde_json::from_slice(&message.payload)?);
    }
    Ok(stats)
}

//! One persistent, multiplexed reply subscription for JetStream direct gets.
//!
//! A direct get batch answers with several messages on the request's reply subject. Subscribing
//! a fresh inbox per read costs a SUB and an UNSUB on every command; instead one wildcard
//! subscription `<inbox>.*` is made at start, each read gets its own token under it, and a
//! dispatcher task routes each reply to the read waiting for it.

use crate::permissions;
use crate::store::StoreError;
use async_nats::{Client, Message};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

type Waiting = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>>;

/// Sends direct get requests and hands each reply to its caller.
#[derive(Debug)]
pub(crate) struct DirectGets {
    client: Client,
    prefix: String,
    next: AtomicU64,
    waiting: Waiting,
    timeout: Duration,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for DirectGets {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl DirectGets {
    /// Subscribes the reply inbox and starts the dispatcher.
    pub async fn start(client: Client, timeout: Duration) -> Result<DirectGets, StoreError> {
        let prefix = client.new_inbox();
        let mut replies = client
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot subscribe replies: {e}")))?;
        let waiting: Waiting = Arc::default();
        let routes = waiting.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let Some(token) = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    continue;
                };
                let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
                // A reply for a read that gave up is dropped.
                if let Some(sender) = routes.get(&token) {
                    let _ = sender.send(message);
                }
            }
        });
        Ok(DirectGets {
            client,
            prefix,
            next: AtomicU64::new(1),
            waiting,
            timeout,
            dispatcher,
        })
    }

    /// Sends `body` to `subject` and returns the stream of its replies.
    pub async fn request(&self, subject: &str, body: Vec<u8>) -> Result<Replies, StoreError> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, sender);
        let replies = Replies {
            token,
            waiting: self.waiting.clone(),
            receiver,
            subject: subject.to_owned(),
            timeout: self.timeout,
            violations: permissions::watch(),
        };
        self.client
            .publish_with_reply(
                subject.to_owned(),
                format!("{}.{token}", self.prefix),
                body.into(),
            )
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(replies)
    }
}

/// The replies to one request; dropping it forgets the request.
pub(crate) struct Replies {
    token: u64,
    waiting: Waiting,
    receiver: mpsc::UnboundedReceiver<Message>,
    subject: String,
    timeout: Duration,
    violations: tokio::sync::broadcast::Receiver<String>,
}

impl Replies {
    /// The next reply, or an error when none comes in time or the subject is denied.
    pub async fn next(&mut self) -> Result<Message, StoreError> {
        let next = async {
            tokio::select! {
                message = self.receiver.recv() => message.ok_or_else(|| StoreError::Unavailable("connection closed".into())),
                denied = permissions::denied(&mut self.violations, &self.subject) => {
                    Err(StoreError::Unavailable(format!("permission denied: {denied}")))
                }
            }
        };
        tokio::time::timeout(self.timeout, next)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "no reply from {} within {:?}",
                    self.subject, self.timeout
                ))
            })?
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.token);
    }
}

//! Reads of the last message on many subjects of one stream, batched into `multi_last` direct
//! gets.
//!
//! Every command asks the ledger whether its id is known, and under load many ask at once. One
//! direct get each costs a request and a reply through nats-server per command; a `multi_last`
//! direct get answers many subjects in one request, and when none of them has a message (new
//! command ids, the common case) in one `404 No Results` reply. One request is in flight at a
//! time: reads that arrive meanwhile queue and go together in the next, so an idle function
//! sends each read at once and a busy one sends one request per round trip.

use crate::direct::DirectGets;
use crate::store::StoreError;
use crate::wire::{header, jetstream as wire_js};
use async_nats::{Message, StatusCode};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// The most subjects in one request: well below the server's 1,024 results per request.
const MAX_SUBJECTS: usize = 256;

type Answer = oneshot::Sender<Result<Option<Message>, StoreError>>;

/// One read waiting for its batch.
struct Read {
    subject: String,
    answer: Answer,
}

/// Batches last-message reads of one stream; dropping it ends its task once the queue drains.
#[derive(Debug)]
pub(crate) struct BatchedReads {
    queue: mpsc::UnboundedSender<Read>,
    counts: Arc<Counts>,
}

/// Reads asked for, and requests sent for them.
#[derive(Debug, Default)]
struct Counts {
    reads: AtomicU64,
    requests: AtomicU64,
}

impl BatchedReads {
    /// Starts the task that sends the batches to `direct_get` (the stream's direct get subject)
    /// over `reads`.
    pub fn start(reads: Arc<DirectGets>, direct_get: String) -> BatchedReads {
        let (queue, waiting) = mpsc::unbounded_channel();
        let counts = Arc::<Counts>::default();
        tokio::spawn(send_batches(reads, direct_get, waiting, counts.clone()));
        BatchedReads { queue, counts }
    }

    /// `reads` asked for and `requests` sent for them since the start.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "reads": get(&self.counts.reads),
            "requests": get(&self.counts.requests),
        })
    }

    /// The last message stored on `subject`, or `None` when it has none. `subject` must be
    /// literal: a wildcard would match, and answer for, other subjects.
    pub async fn last(&self, subject: String) -> Result<Option<Message>, StoreError> {
        if subject.split('.').any(|token| token == "*" || token == ">") {
            return Err(StoreError::Unavailable(format!(
                "{subject} is not a literal subject"
            )));
        }
        let (answer, answered) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the reads have stopped".into());
        self.queue
            .send(Read { subject, answer })
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// Takes whatever reads are queued, up to [`MAX_SUBJECTS`], answers them with one request, and
/// repeats until every [`BatchedReads`] is gone.
async fn send_batches(
    reads: Arc<DirectGets>,
    direct_get: String,
    mut queue: mpsc::UnboundedReceiver<Read>,
    counts: Arc<Counts>,
) {
    let mut batch = Vec::with_capacity(MAX_SUBJECTS);
    while queue.recv_many(&mut batch, MAX_SUBJECTS).await > 0 {
        counts
            .reads
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut waiting: HashMap<String, Vec<Answer>> = HashMap::with_capacity(batch.len());
        for read in batch.drain(..) {
            // Two commands may ask for the same key at once: one subject answers both.
            waiting.entry(read.subject).or_default().push(read.answer);
        }
        answer(&reads, &direct_get, waiting, &counts).await;
    }
}

/// Answers every waiting read: with its subject's message, with `None` where the server found
/// none, or with the error that stopped the request.
async fn answer(
    reads: &DirectGets,
    direct_get: &str,
    mut waiting: HashMap<String, Vec<Answer>>,
    counts: &Counts,
) {
    while !waiting.is_empty() {
        counts.requests.fetch_add(1, Ordering::Relaxed);
        let subjects: Vec<&str> = waiting.keys().map(String::as_str).collect();
        let found = fetch(reads, direct_get, &subjects).await;
        let (messages, complete) = match found {
            Ok(found) => found,
            Err(err) => {
                let message = match err {
                    StoreError::Unavailable(message) => message,
                    other => other.to_string(),
                };
                for answer in waiting.into_values().flatten() {
                    let _ = answer.send(Err(StoreError::Unavailable(message.clone())));
                }
                return;
            }
        };
        let progressed = !messages.is_empty();
        for message in messages {
            let subject = header::get(message.headers.as_ref(), header::NATS_SUBJECT);
            if let Some(answers) = subject.and_then(|subject| waiting.remove(subject)) {
                for answer in answers {
                    let _ = answer.send(Ok(Some(message.clone())));
                }
            }
        }
        if complete {
            for answer in waiting.into_values().flatten() {
                let _ = answer.send(Ok(None));
            }
            return;
        }
        if !progressed {
            for answer in waiting.into_values().flatten() {
                let _ = answer.send(Err(StoreError::Unavailable(
                    "a multi_last direct get ended early without a message".into(),
                )));
            }
            return;
        }
        // The server stopped at its byte limit: ask again for the subjects it did not reach.
    }
}

/// One `multi_last` request: the messages found, and whether the server reached every subject.
async fn fetch(
    reads: &DirectGets,
    direct_get: &str,
    subjects: &[&str],
) -> Result<(Vec<Message>, bool), StoreError> {
    let body = wire_js::direct_get_multi_last(subjects);
    let mut replies = reads.request(direct_get, body).await?;
    let mut messages = Vec::new();
    loop {
        let message = replies.next().await?;
        match message.status {
            None | Some(StatusCode::OK) => messages.push(message),
            Some(status) if status.as_u16() == 204 => {
                let pending = header::get_u64(message.headers.as_ref(), header::NUM_PENDING);
                return Ok((messages, pending.unwrap_or(0) == 0));
            }
            // Only "No Results" means nothing matched; another 404 is a message that matched
            // and could not be loaded, which must not pass for an absent one.
            Some(StatusCode::NOT_FOUND)
                if message.description.as_deref() == Some("No Results") && messages.is_empty() =>
            {
                return Ok((messages, true));
            }
            Some(StatusCode::NO_RESPONDERS) => {
                return Err(StoreError::Unavailable(format!(
                    "no stream answers {direct_get} (missing, or without direct get)"
                )));
            }
            Some(status) => {
                return Err(StoreError::Unavailable(format!(
                    "direct get of the last messages on {} subjects failed: {status} {}",
                    subjects.len(),
                    message.description.as_deref().unwrap_or_default()
                )));
            }
        }
    }
}

//! NATS services (the micro protocol, ADR-32) that answer only inbox subjects.
//!
//! Every jetfn function is a NATS service: it answers `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` (bare, with its name, and with its name and instance id), and serves its
//! endpoints (commands, control requests) in a queue group.
//!
//! A responder publishes to whatever reply subject a request names, and a function's NATS user
//! needs `allow_responses` to answer at all. Together that would let any client aim a
//! function's answer at any subject the function may publish to: a `$SRV.PING` with reply
//! subject `evt.account.victim` would store a ping response as the victim's next event, and the
//! subject permissions cannot tell the two publishes apart. So every request here, discovery
//! and endpoint alike, is answered only when its reply subject lies under one of the configured
//! reply prefixes (`nats.reply_prefixes`, by default `_INBOX`); any other is dropped unanswered
//! and unprocessed, counted as an endpoint error, and logged.
//!
//! The response documents keep the protocol's shape (the `nats micro` CLI and `jetfn status`
//! read them): `io.nats.micro.v1.{ping,info,stats}_response`.

use crate::Error;
use crate::affinity::Affinity;
use crate::wire::names;
use async_nats::{Client, HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// The reply subjects a function answers.
#[derive(Debug, Clone)]
pub(crate) struct Replies {
    prefixes: Arc<[String]>,
}

impl Replies {
    /// Replies under these subject prefixes (`_INBOX` admits `_INBOX.<anything>`).
    pub fn new(prefixes: &[String]) -> Self {
        Replies {
            prefixes: prefixes.into(),
        }
    }

    /// Whether a request may be answered: it names no reply subject (fire and forget), or one
    /// strictly under a configured prefix.
    pub fn answers(&self, reply: Option<&str>) -> bool {
        reply.is_none_or(|reply| {
            self.prefixes.iter().any(|prefix| {
                reply
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
            })
        })
    }
}

/// Statistics data an endpoint reports in `$SRV.STATS`.
type StatsData = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What a service is called and how it answers.
pub(crate) struct ServiceSpec {
    /// The service name, `[A-Za-z0-9_-]+`.
    pub name: String,
    /// Its version (semver).
    pub version: String,
    /// A human description for `$SRV.INFO`.
    pub description: String,
    /// `$SRV.INFO` and `$SRV.PING` metadata.
    pub metadata: HashMap<String, String>,
    /// The queue group of its endpoints.
    pub queue_group: String,
    /// The reply subjects it answers.
    pub replies: Replies,
    /// The `data` of every endpoint in `$SRV.STATS`.
    pub stats: StatsData,
}

/// A registered service instance. Dropping it does not stop it; call [`Service::stop`].
pub(crate) struct Service {
    client: Client,
    identity: Arc<Identity>,
    endpoints: Arc<Mutex<Vec<Arc<EndpointState>>>>,
    stop: watch::Sender<bool>,
    verbs: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.identity.spec.name)
            .field("id", &self.identity.id)
            .finish_non_exhaustive()
    }
}

/// Who a service instance is, as every discovery response says.
struct Identity {
    spec: ServiceSpec,
    id: String,
    started: String,
}

impl Service {
    /// Validates the name and version, subscribes the discovery subjects and starts answering
    /// them.
    pub async fn start(client: &Client, spec: ServiceSpec) -> Result<Service, Error> {
        if !is_service_name(&spec.name) {
            return Err(Error::Service(format!(
                "cannot register NATS service {:?}: a service name is [A-Za-z0-9_-]+",
                spec.name
            )));
        }
        if !is_semver(&spec.version) {
            return Err(Error::Service(format!(
                "cannot register NATS service {}: version {:?} is not semver (1.2.3)",
                spec.name, spec.version
            )));
        }
        let started = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let identity = Arc::new(Identity {
            spec,
            id: uuid::Uuid::new_v4().simple().to_string(),
            started,
        });
        let mut subscriptions = Vec::with_capacity(9);
        for verb in Verb::ALL {
            for subject in
                names::service_verb_subjects(verb.token(), &identity.spec.name, &identity.id)
            {
                let subscriber = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| Error::Service(format!("cannot subscribe to {subject}: {e}")))?;
                subscriptions.push(subscriber.map(move |message| (verb, message)));
            }
        }
        let endpoints = Arc::default();
        let (stop, _) = watch::channel(false);
        let verbs = tokio::spawn(answer_verbs(
            client.clone(),
            identity.clone(),
            Arc::clone(&endpoints),
            futures::stream::select_all(subscriptions),
        ));
        Ok(Service {
            client: client.clone(),
            identity,
            endpoints,
            stop,
            verbs,
        })
    }

    /// Subscribes endpoint `name` on `subject` in the service's queue group.
    pub async fn endpoint(
        &self,
        name: &str,
        subject: String,
        metadata: HashMap<String, String>,
    ) -> Result<Endpoint, Error> {
        let requests = self
            .client
            .queue_subscribe(subject.clone(), self.identity.spec.queue_group.clone())
            .await
            .map_err(|e| Error::Service(format!("cannot subscribe to {name} requests: {e}")))?;
        let state = Arc::new(EndpointState {
            name: name.to_owned(),
            subject,
            metadata,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            processing_ns: AtomicU64::new(0),
            last_error: Mutex::default(),
        });
        if let Ok(mut endpoints) = self.endpoints.lock() {
            endpoints.push(state.clone());
        }
        Ok(Endpoint {
            requests,
            state,
            client: self.client.clone(),
            replies: self.identity.spec.replies.clone(),
            service: self.identity.spec.name.clone(),
            stopped: self.stop.subscribe(),
            stopping: false,
            unsubscribed: false,
            drained: false,
            affinity: None,
        })
    }

    /// This instance's id, as discovery reports it.
    pub fn id(&self) -> &str {
        &self.identity.id
    }

    /// Leaves discovery and unsubscribes the endpoints; requests they already received still
    /// come out of [`Endpoint::next`].
    pub async fn stop(self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Service {
    /// A service given up (a start that failed half-way, say) stops answering discovery.
    fn drop(&mut self) {
        self.verbs.abort();
    }
}

/// One endpoint's subscription: yields the requests it may answer.
///
/// [`Endpoint::next`] is cancel-safe (the serving loop polls it in a `select!`): a request taken
/// from a subscription is returned, or handed on without waiting, before any other await; the
/// steps of stopping are retried until each one has completed.
pub(crate) struct Endpoint {
    requests: Subscriber,
    state: Arc<EndpointState>,
    client: Client,
    replies: Replies,
    service: String,
    stopped: watch::Receiver<bool>,
    /// Told to stop.
    stopping: bool,
    /// Stopped taking requests from the subscription (drained), and with affinity, left.
    unsubscribed: bool,
    /// Stopped, and every request of the subscription taken.
    drained: bool,
    /// With aggregate affinity: where requests for other instances' aggregates go, and the
    /// requests other instances hand to this one.
    affinity: Option<Handing>,
}

/// An endpoint's side of aggregate affinity.
struct Handing {
    affinity: Arc<Affinity>,
    handed: Subscriber,
    taking: Taking,
}

/// How far the endpoint is in giving up the requests other instances hand it.
enum Taking {
    /// Serving.
    Open,
    /// Stopping: still taking them until the grace period ends.
    Grace(std::pin::Pin<Box<tokio::time::Sleep>>),
    /// The grace period ended: the subscription is to be drained.
    DrainDue,
    /// Drained: the last of them are coming.
    Draining,
    /// Every one taken.
    Closed,
}

impl Handing {
    fn closed(&self) -> bool {
        matches!(self.taking, Taking::Closed)
    }
}

impl Endpoint {
    /// Serves the requests for aggregates `affinity` gives to other instances there, and takes
    /// the requests they hand to this one from `handed`.
    pub fn with_affinity(mut self, affinity: Arc<Affinity>, handed: Subscriber) -> Self {
        self.affinity = Some(Handing {
            affinity,
            handed,
            taking: Taking::Open,
        });
        self
    }

    /// The next request whose reply subject may be answered; `None` once the endpoint was
    /// stopped and its buffered requests are taken.
    pub async fn next(&mut self) -> Option<Request> {
        loop {
            self.stop_steps().await;
            let message = tokio::select! {
                changed = self.stopped.changed(), if !self.stopping => {
                    self.stopping = changed.is_err() || *self.stopped.borrow();
                    continue;
                }
                message = self.requests.next(), if !self.drained => {
                    let Some(message) = message else {
                        // Stopped: the handed-on requests of the grace period may still come.
                        if self.unsubscribed && self.affinity.as_ref().is_some_and(|h| !h.closed()) {
                            self.drained = true;
                            continue;
                        }
                        return None;
                    };
                    if !self.replies.answers(message.reply.as_deref()) {
                        self.state.refused(&self.service, &message);
                        continue;
                    }
                    match self.hand_on(message) {
                        Some(message) => message,
                        None => continue,
                    }
                }
                message = handed_next(&mut self.affinity) => match message {
                    Some(message) => message,
                    None if self.drained && self.affinity.as_ref().is_none_or(Handing::closed) => {
                        return None;
                    }
                    None => continue,
                },
            };
            if self.replies.answers(message.reply.as_deref()) {
                self.state.requests.fetch_add(1, Ordering::Relaxed);
                return Some(Request {
                    message,
                    client: self.client.clone(),
                    state: self.state.clone(),
                    issued: Instant::now(),
                });
            }
            self.state.refused(&self.service, &message);
        }
    }

    /// The steps of stopping that are due, each marked done only once it completed (a cancelled
    /// [`Endpoint::next`] takes them again). The subscription is drained, not just unsubscribed:
    /// what the server sent before it took the `UNSUB` (a queue group's requests in flight) is
    /// still delivered. With affinity, the others learn that this instance leaves, and the
    /// requests they hand on meanwhile are taken for a grace period
    /// ([`crate::affinity::LEAVE_GRACE`]).
    async fn stop_steps(&mut self) {
        if self.stopping && !self.unsubscribed {
            let _ = self.requests.drain().await;
            if let Some(handing) = &mut self.affinity {
                let grace = handing.affinity.leave().await;
                handing.taking = Taking::Grace(Box::pin(tokio::time::sleep(grace)));
            }
            self.unsubscribed = true;
        }
        if let Some(handing) = &mut self.affinity
            && matches!(handing.taking, Taking::DrainDue)
        {
            let _ = handing.handed.drain().await;
            handing.taking = Taking::Draining;
        }
    }

    /// `message` if this instance serves it; else it is handed to its aggregate's instance
    /// (without waiting: `None`), unless that cannot be done at once.
    fn hand_on(&self, message: Message) -> Option<Message> {
        let Some(handing) = &self.affinity else {
            return Some(message);
        };
        match handing.affinity.hand_on(&message) {
            Some(to) => handing.affinity.send(to, message),
            None => Some(message),
        }
    }
}

/// The next request another instance handed on, if this endpoint takes them; pending forever
/// when it does not (or no longer does), so that `select!` waits on its other branches.
/// Cancel-safe: nothing is awaited but the subscription and the grace period's end.
async fn handed_next(handing: &mut Option<Handing>) -> Option<Message> {
    let Some(handing) = handing.as_mut().filter(|h| !h.closed()) else {
        return std::future::pending().await;
    };
    let grace_ends = async {
        match &mut handing.taking {
            Taking::Grace(grace) => grace.await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        () = grace_ends => {
            // Drained by the next stop step: what was handed on before the server took the
            // UNSUB still comes, then the end.
            handing.taking = Taking::DrainDue;
            None
        }
        message = handing.handed.next() => match message {
            Some(message) => handing.affinity.taken_over(message),
            None => {
                handing.taking = Taking::Closed;
                None
            }
        },
    }
}

/// A request to answer.
#[derive(Debug)]
pub(crate) struct Request {
    /// The request as received.
    pub message: Message,
    client: Client,
    state: Arc<EndpointState>,
    issued: Instant,
}

impl Request {
    /// Answers with `body` (nothing is sent when the request named no reply subject).
    pub async fn respond(&self, body: Bytes) -> Result<(), String> {
        self.respond_with_headers(body, HeaderMap::new()).await
    }

    /// Answers with `body` and `headers`.
    pub async fn respond_with_headers(
        &self,
        body: Bytes,
        headers: HeaderMap,
    ) -> Result<(), String> {
        let elapsed = u64::try_from(self.issued.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.state
            .processing_ns
            .fetch_add(elapsed, Ordering::Relaxed);
        let Some(reply) = self.message.reply.clone() else {
            return Ok(());
        };
        self.client
            .publish_with_headers(reply, headers, body)
            .await
            .map_err(|e| e.to_string())
    }
}

/// An endpoint's description and counters.
#[derive(Debug)]
struct EndpointState {
    name: String,
    subject: String,
    metadata: HashMap<String, String>,
    requests: AtomicU64,
    errors: AtomicU64,
    processing_ns: AtomicU64,
    last_error: Mutex<String>,
}

impl EndpointState {
    /// Counts and logs a request dropped for its reply subject.
    fn refused(&self, service: &str, message: &Message) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = "refused a reply subject outside nats.reply_prefixes".into();
        }
        tracing::warn!(
            service,
            subject = %message.subject,
            reply = message.reply.as_deref().unwrap_or_default(),
            "request refused unprocessed: its reply subject is not an inbox (nats.reply_prefixes)"
        );
    }

    fn info<'a>(&'a self, queue_group: &'a str) -> EndpointInfo<'a> {
        EndpointInfo {
            name: &self.name,
            subject: &self.subject,
            queue_group,
            metadata: &self.metadata,
        }
    }

    fn stats<'a>(&'a self, queue_group: &'a str, data: serde_json::Value) -> EndpointStats<'a> {
        let requests = self.requests.load(Ordering::Relaxed);
        let processing_time = self.processing_ns.load(Ordering::Relaxed);
        EndpointStats {
            name: &self.name,
            subject: &self.subject,
            queue_group,
            num_requests: requests,
            num_errors: self.errors.load(Ordering::Relaxed),
            processing_time,
            average_processing_time: processing_time.checked_div(requests).unwrap_or(0),
            last_error: self
                .last_error
                .lock()
                .map(|last| last.clone())
                .unwrap_or_default(),
            data,
        }
    }
}

/// The discovery verbs.
#[derive(Debug, Clone, Copy)]
enum Verb {
    Ping,
    Info,
    Stats,
}

impl Verb {
    const ALL: [Verb; 3] = [Verb::Ping, Verb::Info, Verb::Stats];

    fn token(self) -> &'static str {
        match self {
            Verb::Ping => "PING",
            Verb::Info => "INFO",
            Verb::Stats => "STATS",
        }
    }
}

/// Answers discovery requests until the service stops.
async fn answer_verbs(
    client: Client,
    identity: Arc<Identity>,
    endpoints: Arc<Mutex<Vec<Arc<EndpointState>>>>,
    mut requests: impl futures::Stream<Item = (Verb, Message)> + Unpin,
) {
    while let Some((verb, message)) = requests.next().await {
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        if !identity.spec.replies.answers(Some(&reply)) {
            tracing::warn!(
                service = %identity.spec.name,
                subject = %message.subject,
                reply = %reply,
                "discovery request refused: its reply subject is not an inbox (nats.reply_prefixes)"
            );
            continue;
        }
        let endpoints: Vec<Arc<EndpointState>> = endpoints
            .lock()
            .map(|list| list.clone())
            .unwrap_or_default();
        let body = match verb {
            Verb::Ping => serde_json::to_vec(&identity.ping()),
            Verb::Info => serde_json::to_vec(&identity.info(&endpoints)),
            Verb::Stats => serde_json::to_vec(&identity.stats(&endpoints)),
        };
        match body {
            Ok(body) => {
                if let Err(err) = client.publish(reply, body.into()).await {
                    tracing::debug!(error = %err, "discovery reply not sent");
                }
            }
            Err(err) => tracing::warn!(error = %err, "discovery reply not encoded"),
        }
    }
}

impl Identity {
    /// What every verb's response starts with: its type and the service's identity.
    fn head(&self, kind: &'static str) -> Head<'_> {
        Head {
            kind,
            name: &self.spec.name,
            id: &self.id,
            version: &self.spec.version,
            metadata: &self.spec.metadata,
        }
    }

    fn ping(&self) -> Head<'_> {
        self.head(names::SERVICE_PING_RESPONSE)
    }

    fn info<'a>(&'a self, endpoints: &'a [Arc<EndpointState>]) -> Info<'a> {
        Info {
            head: self.head(names::SERVICE_INFO_RESPONSE),
            description: &self.spec.description,
            endpoints: endpoints
                .iter()
                .map(|e| e.info(&self.spec.queue_group))
                .collect(),
        }
    }

    fn stats<'a>(&'a self, endpoints: &'a [Arc<EndpointState>]) -> Stats<'a> {
        Stats {
            head: self.head(names::SERVICE_STATS_RESPONSE),
            started: &self.started,
            endpoints: endpoints
                .iter()
                .map(|e| e.stats(&self.spec.queue_group, (self.spec.stats)()))
                .collect(),
        }
    }
}

/// A PING response, and the start of INFO and STATS responses.
#[derive(Serialize)]
struct Head<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    id: &'a str,
    version: &'a str,
    metadata: &'a HashMap<String, String>,
}

#[derive(Serialize)]
struct Info<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    description: &'a str,
    endpoints: Vec<EndpointInfo<'a>>,
}

#[derive(Serialize)]
struct EndpointInfo<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    metadata: &'a HashMap<String, String>,
}

#[derive(Serialize)]
struct Stats<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    started: &'a str,
    endpoints: Vec<EndpointStats<'a>>,
}

/// Times in nanoseconds, as the protocol has them.
#[derive(Serialize)]
struct EndpointStats<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    num_requests: u64,
    num_errors: u64,
    processing_time: u64,
    average_processing_time: u64,
    last_error: String,
    data: serde_json::Value,
}

fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `MAJOR.MINOR.PATCH`, optionally followed by `-pre` and `+build` parts.
fn is_semver(version: &str) -> bool {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inboxes() -> Replies {
        Replies::new(&["_INBOX".into(), "_INBOX_client".into()])
    }

    #[test]
    fn replies_go_only_strictly_under_a_configured_prefix() {
        let replies = inboxes();
        assert!(
            replies.answers(None),
            "fire and forget has nobody to answer"
        );
        assert!(replies.answers(Some("_INBOX.abc")));
        assert!(replies.answers(Some("_INBOX.user.abc.1")));
        assert!(replies.answers(Some("_INBOX_client.x")));
        for refused in [
            "evt.account.victim",
            "_INBOX",
            "_INBOX.",
            "_INBOXevil.x",
            "jetfn.projection.account-balances.rebuild",
            "",
        ] {
            assert!(!replies.answers(Some(refused)), "{refused:?} was answered");
        }
    }

    #[test]
    fn versions_are_semver_and_names_are_service_tokens() {
        for good in ["0.1.0", "1.22.333", "1.0.0-rc.1", "1.0.0+build.5"] {
            assert!(is_semver(good), "{good}");
        }
        for bad in ["1.0", "1.0.x", "", "1..0", "v1.0.0"] {
            assert!(!is_semver(bad), "{bad}");
        }
        assert!(is_service_name("account-balances_2"));
        assert!(!is_service_name("a.b") && !is_service_name("") && !is_service_name("a b"));
    }
}

//! Aggregate affinity: every aggregate's commands are served by one instance of a command
//! function.
//!
//! A queue group hands each request to a random instance. With several instances that makes
//! every instance's cached state of an aggregate stale whenever another instance served its last
//! command, and a stale state costs a refused append, a catch-up and a second append. So the
//! instances of a function (same aggregate, command subjects and queue group) announce
//! themselves to each other on [`names::affinity_members`], and each aggregate id has an owner
//! among the instances alive: the highest rendezvous weight of (instance, id). A request that
//! arrives at another instance is handed on, unchanged (payload, headers, the client's reply
//! subject), to the owner's [`names::affinity_inbox`]; the owner answers the client itself, and
//! never hands a request on again.
//!
//! Affinity is only about speed. Correctness never rests on it: while instances come and go,
//! two of them may serve one aggregate for a moment, and optimistic concurrency and the check
//! before a reply that appends nothing keep every outcome right, exactly as without affinity.
//!
//! What it costs: a handed-on command is one more core NATS message (no JetStream work). An
//! instance that stops gracefully says so, and keeps taking handed-on commands for
//! [`LEAVE_GRACE`]; one killed outright is noticed when its announcements stop, after
//! [`MEMBER_TTL`]: commands handed to it in between are lost unanswered, and their clients'
//! retries (the same command id) are served by an instance alive.

use crate::config::is_name;
use crate::wire::{CommandSubjects, names};
use async_nats::{Client, Message, Subject, Subscriber};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often an instance announces itself.
pub(crate) const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
/// How long an instance counts as alive after its last announcement.
pub(crate) const MEMBER_TTL: Duration = Duration::from_secs(1);
/// How long a leaving instance still takes the commands handed to it: the others stop handing
/// commands on as soon as its leave reaches them, a round trip, or later on a busy machine.
pub(crate) const LEAVE_GRACE: Duration = Duration::from_millis(500);
/// The most instances one function counts (announcements beyond are ignored).
const MAX_MEMBERS: usize = 256;
/// Requests waiting to be handed on; beyond, an instance serves them itself.
const OUTBOX: usize = 4096;

/// One instance's announcement.
#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    /// The instance id (its NATS service instance id).
    instance: String,
    /// The command subjects it serves.
    commands: String,
    /// Its queue group.
    queue_group: String,
    /// It stops: count it out at once.
    #[serde(default)]
    leaving: bool,
}

/// This instance's view of which instance serves which aggregate.
pub(crate) struct Affinity {
    client: Client,
    /// Requests to hand on, published in order by [`hand_over`].
    outbox: mpsc::Sender<(Subject, Message)>,
    aggregate: String,
    me: String,
    subjects: CommandSubjects,
    queue_group: String,
    /// The instances alive, sorted, this one included.
    members: RwLock<Arc<[String]>>,
    left: AtomicBool,
    /// Held while announcing, so that a leave is the instance's last announcement.
    announcing: tokio::sync::Mutex<()>,
    handed_on: AtomicU64,
    taken_over: AtomicU64,
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity")
            .field("me", &self.me)
            .field("members", &self.members())
            .finish_non_exhaustive()
    }
}

impl Affinity {
    /// Subscribes instance `me`'s inbox for handed-on commands; announcing starts with
    /// [`Affinity::join`].
    pub(crate) async fn start(
        client: &Client,
        aggregate: &str,
        me: &str,
        subjects: CommandSubjects,
        queue_group: &str,
    ) -> Result<(Arc<Affinity>, Subscriber), crate::Error> {
        let inbox = inbox_wildcard(aggregate, me);
        let handed = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| crate::Error::Service(format!("cannot subscribe to {inbox}: {e}")))?;
        let (outbox, queued) = mpsc::channel(OUTBOX);
        tokio::spawn(hand_over(client.clone(), queued));
        let affinity = Arc::new(Affinity {
            client: client.clone(),
            outbox,
            aggregate: aggregate.to_owned(),
            me: me.to_owned(),
            subjects,
            queue_group: queue_group.to_owned(),
            members: RwLock::new(Arc::from(vec![me.to_owned()])),
            left: AtomicBool::new(false),
            announcing: tokio::sync::Mutex::new(()),
            handed_on: AtomicU64::new(0),
            taken_over: AtomicU64::new(0),
        });
        Ok((affinity, handed))
    }

    /// The subjects this instance subscribes for affinity: its inbox, and the announcements.
    pub(crate) fn subscriptions(&self) -> [String; 2] {
        [
            inbox_wildcard(&self.aggregate, &self.me),
            names::affinity_members(&self.aggregate),
        ]
    }

    /// Starts announcing this instance and following the others' announcements. Call once the
    /// instance serves: from then on others hand it commands.
    pub(crate) async fn join(self: &Arc<Self>) -> Result<(), crate::Error> {
        let subject = names::affinity_members(&self.aggregate);
        let announcements =
            self.client.subscribe(subject.clone()).await.map_err(|e| {
                crate::Error::Service(format!("cannot subscribe to {subject}: {e}"))
            })?;
        tokio::spawn(follow(Arc::downgrade(self), announcements));
        Ok(())
    }

    /// Says that this instance stops: the others serve its aggregates from now on. Returns how
    /// long to keep taking the requests they hand on meanwhile: [`LEAVE_GRACE`], or nothing
    /// when no other instance is known.
    pub(crate) async fn leave(&self) -> Duration {
        // Under the lock, so that no announcement of the instance can follow its leave.
        let _announcing = self.announcing.lock().await;
        self.left.store(true, Ordering::Relaxed);
        if let Err(err) = self.publish(true).await {
            tracing::debug!(error = %err, "could not announce leaving");
        }
        if self.members().len() > 1 {
            LEAVE_GRACE
        } else {
            Duration::ZERO
        }
    }

    /// Where to hand on a request that arrived here: the owner's inbox subject, or `None` when
    /// this instance serves it (it owns the aggregate, or the subject names no valid command,
    /// which is answered here as `invalid`).
    pub(crate) fn hand_on(&self, message: &Message) -> Option<Subject> {
        if message.malformed().is_some() {
            return None;
        }
        let members = self.members();
        if members.len() < 2 {
            return None;
        }
        let (id, command) = self.subjects.parse(&message.subject).ok()?;
        if !is_name(command) {
            return None;
        }
        let owner = owner(&members, id)?;
        (owner != self.me).then(|| {
            let inbox = names::affinity_inbox(&self.aggregate, owner);
            Subject::from(format!("{inbox}.{}", message.subject))
        })
    }

    /// Hands `message` on to `to`, without waiting: the publishes go out in order from a task of
    /// their own. Gives the message back when that cannot be done at once (the queue is full or
    /// the connection closed, or it names no reply subject): then serve it here.
    pub(crate) fn send(&self, to: Subject, message: Message) -> Option<Message> {
        if message.reply.is_none() {
            return Some(message);
        }
        match self.outbox.try_send((to, message)) {
            Ok(()) => {
                self.handed_on.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(
                mpsc::error::TrySendError::Full((_, message))
                | mpsc::error::TrySendError::Closed((_, message)),
            ) => Some(message),
        }
    }

    /// A command handed to this instance, with its own subject again; `None` if the subject is
    /// not under this instance's inbox.
    pub(crate) fn taken_over(&self, mut message: Message) -> Option<Message> {
        let inbox = names::affinity_inbox(&self.aggregate, &self.me);
        let subject = message.subject.strip_prefix(&inbox)?.strip_prefix('.')?;
        message.subject = Subject::from(subject);
        tracing::trace!(subject = %message.subject, me = %self.me, "taken over");
        self.taken_over.fetch_add(1, Ordering::Relaxed);
        Some(message)
    }

    /// `$SRV.STATS` data: the instances counted alive and the commands handed on and taken over.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "instances": self.members().len(),
            "handed_on": self.handed_on.load(Ordering::Relaxed),
            "taken_over": self.taken_over.load(Ordering::Relaxed),
        })
    }

    fn members(&self) -> Arc<[String]> {
        match self.members.read() {
            Ok(members) => members.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Announces the instance, unless it left.
    async fn announce(&self) -> Result<(), String> {
        let _announcing = self.announcing.lock().await;
        if self.left.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.publish(false).await
    }

    async fn publish(&self, leaving: bool) -> Result<(), String> {
        let announcement = Announcement {
            instance: self.me.clone(),
            commands: self.subjects.wildcard(),
            queue_group: self.queue_group.clone(),
            leaving,
        };
        let body = serde_json::to_vec(&announcement).map_err(|e| e.to_string())?;
        self.client
            .publish(names::affinity_members(&self.aggregate), body.into())
            .await
            .map_err(|e| e.to_string())
    }

    /// Whether `announcement` comes from an instance of this same function.
    fn same_function(&self, announcement: &Announcement) -> bool {
        announcement.commands == self.subjects.wildcard()
            && announcement.queue_group == self.queue_group
            && announcement.instance.len() <= 64
            && is_name(&announcement.instance)
    }

    fn set_members(&self, seen: &HashMap<String, Instant>) {
        let mut members: Vec<String> = seen.keys().cloned().collect();
        members.push(self.me.clone());
        members.sort_unstable();
        members.dedup();
        let members: Arc<[String]> = Arc::from(members);
        let mut current = match self.members.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *current != members {
            tracing::info!(
                instances = members.len(),
                "command function instances changed"
            );
            *current = members;
        }
    }
}

/// Publishes the requests handed on, in the order they came, until the affinity is dropped.
async fn hand_over(client: Client, mut queued: mpsc::Receiver<(Subject, Message)>) {
    while let Some((to, message)) = queued.recv().await {
        let Some(reply) = message.reply else { continue };
        let sent = match message.headers {
            Some(headers) => {
                client
                    .publish_with_reply_and_headers(to, reply, headers, message.payload)
                    .await
            }
            None => client.publish_with_reply(to, reply, message.payload).await,
        };
        match sent {
            Ok(()) => tracing::trace!(subject = %message.subject, "handed on"),
            // Only a closed client fails here; nothing could answer the request then.
            Err(err) => {
                tracing::debug!(error = %err, subject = %message.subject, "could not hand on")
            }
        }
    }
}

/// Announces the instance every [`ANNOUNCE_EVERY`] and keeps its members current, until it
/// leaves or is dropped.
async fn follow(affinity: Weak<Affinity>, mut announcements: Subscriber) {
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut every = tokio::time::interval(ANNOUNCE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                let Some(affinity) = affinity.upgrade() else { return };
                if affinity.left.load(Ordering::Relaxed) {
                    return;
                }
                if let Err(err) = affinity.announce().await {
                    tracing::debug!(error = %err, "could not announce this instance");
                }
                seen.retain(|_, at| at.elapsed() < MEMBER_TTL);
                affinity.set_members(&seen);
            }
            message = announcements.next() => {
                let Some(message) = message else { return };
                let Some(affinity) = affinity.upgrade() else { return };
                let Ok(announcement) = serde_json::from_slice::<Announcement>(&message.payload)
                else {
                    continue;
                };
                if announcement.instance == affinity.me || !affinity.same_function(&announcement) {
                    continue;
                }
                let known = seen.contains_key(&announcement.instance);
                let member = if announcement.leaving {
                    seen.remove(&announcement.instance);
                    false
                } else if known || seen.len() < MAX_MEMBERS {
                    seen.insert(announcement.instance, Instant::now());
                    true
                } else {
                    false
                };
                if member != known {
                    affinity.set_members(&seen);
                }
            }
        }
    }
}

/// The subscription of instance `me`'s inbox for handed-on commands.
fn inbox_wildcard(aggregate: &str, me: &str) -> String {
    format!("{}.>", names::affinity_inbox(aggregate, me))
}

/// The owner of aggregate `id` among `members`: the highest rendezvous weight, so that when an
/// instance comes or goes only the aggregates it takes or held change hands.
pub(crate) fn owner<'m>(members: &'m [String], id: &str) -> Option<&'m str> {
    members
        .iter()
        .max_by_key(|member| weight(member, id))
        .map(String::as_str)
}

/// FNV-1a (64 bit) of `member`, a separator and `id`, finished with the SplitMix64 mixer (FNV
/// alone spreads similar ids poorly in the high bits).
fn weight(member: &str, id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = member
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(id.bytes());
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    fn accounts() -> impl Iterator<Item = String> {
        (0..10_000).map(|n| format!("acct-{n}"))
    }

    #[test]
    fn every_aggregate_has_one_owner_and_the_instances_share_them_evenly() {
        let two = members(&["4f1c0a", "9b27e3"]);
        let owned_by_first = accounts()
            .filter(|id| owner(&two, id) == Some("4f1c0a"))
            .count();
        assert!(
            (4_500..=5_500).contains(&owned_by_first),
            "{owned_by_first} of 10000"
        );
        assert_eq!(owner(&[], "acct-1"), None);
        assert_eq!(owner(&members(&["solo"]), "acct-1"), Some("solo"));
    }

    #[test]
    fn an_instance_joining_takes_aggregates_only_from_the_others_and_gives_them_back_on_leaving() {
        let two = members(&["4f1c0a", "9b27e3"]);
        let three = members(&["4f1c0a", "77aa01", "9b27e3"]);
        let mut moved = 0;
        for id in accounts() {
            let before = owner(&two, &id);
            let after = owner(&three, &id);
            if before != after {
                assert_eq!(
                    after,
                    Some("77aa01"),
                    "{id} moved between the old instances"
                );
                moved += 1;
            }
        }
        assert!((2_800..=3_900).contains(&moved), "{moved} of 10000 moved");
    }
}

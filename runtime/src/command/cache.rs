//! The state cache: each instance keeps the folded state of the aggregates it has served.
//!
//! An entry holds the state, the stream sequence it was folded up to, the aggregate's version
//! and the replies of its most recent commands. The next command for a cached aggregate decides
//! at once and appends with the cached sequence as its expectation; a conflict catches up from
//! that sequence. Each entry is also the aggregate's lock inside the instance: commands for one
//! aggregate run one after another.
//!
//! The cache is an LRU bounded by `command.cache_entries`. An entry in use (locked, or waited
//! for) is never evicted; waiting is bounded by `command.max_queued_per_aggregate`.

use super::ledger::Entry;
use lru::LruCache;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an instance knows of one aggregate.
#[derive(Debug)]
pub(crate) struct Cached<A> {
    /// The folded state.
    pub state: A,
    /// The stream sequence of the last event folded in (0 for none).
    pub last_seq: u64,
    /// The number of events folded in.
    pub version: u64,
    /// The version the latest snapshot was taken at (or loaded from).
    pub snapshot_version: u64,
    /// The version up to which a snapshot *and* the ledger entries of the commands it covers
    /// are known to be stored; the writer raises it. Commands up to it may be forgotten here.
    pub ledgered: Arc<AtomicU64>,
    /// Replies of the most recent commands that stored no event, by command id.
    pub recent: Recent,
    /// Replies of the commands whose events were folded in, by command id: they are recognised
    /// from their events at any age, as a full load would (after a snapshot, only those after
    /// it; before it, the ledger answers for its TTL).
    pub applied: HashMap<String, Entry>,
}

impl<A> Cached<A> {
    /// The first reply of `command_id`, if this entry knows it.
    pub fn reply_of(&self, command_id: &str) -> Option<&Entry> {
        self.applied
            .get(command_id)
            .or_else(|| self.recent.get(command_id))
    }
}

impl<A: Default> Cached<A> {
    /// An aggregate with no events.
    pub fn empty(recent: usize, ttl: Duration) -> Self {
        Cached {
            state: A::default(),
            last_seq: 0,
            version: 0,
            snapshot_version: 0,
            ledgered: Arc::default(),
            recent: Recent::new(recent, ttl),
            applied: HashMap::new(),
        }
    }
}

/// The last few command ids of an aggregate with their first replies, each kept no longer than
/// the ledger keeps it (`ledger.ttl`), so a cached answer never outlives the documented one.
#[derive(Debug)]
pub(crate) struct Recent {
    entries: VecDeque<(String, Entry, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl Recent {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Recent {
            entries: VecDeque::with_capacity(capacity.min(8)),
            capacity,
            ttl,
        }
    }

    pub fn get(&self, command_id: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .rev()
            .find(|(id, _, at)| id == command_id && at.elapsed() < self.ttl)
            .map(|(_, entry, _)| entry)
    }

    pub fn remember(&mut self, command_id: &str, entry: Entry) {
        if self.capacity == 0 || self.get(command_id).is_some() {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries
            .push_back((command_id.to_owned(), entry, Instant::now()));
    }
}

/// One aggregate's lock and cached state.
pub(crate) type Slot<A> = Arc<tokio::sync::Mutex<Option<Cached<A>>>>;

/// Too many commands wait for one aggregate.
#[derive(Debug)]
pub(crate) struct QueueFull;

/// The LRU of slots, with its counters.
pub(crate) struct StateCache<A> {
    slots: Mutex<LruCache<String, Slot<A>>>,
    capacity: usize,
    max_queued: usize,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

impl<A> StateCache<A> {
    pub fn new(capacity: usize, max_queued: usize) -> Self {
        StateCache {
            slots: Mutex::new(LruCache::unbounded()),
            capacity,
            max_queued,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The slot of aggregate `id`, created empty if needed; refused when too many commands
    /// already wait for it.
    pub fn slot(&self, id: &str) -> Result<Slot<A>, QueueFull> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match slots.get(id) {
            Some(slot) => slot.clone(),
            None => {
                let slot = Slot::<A>::default();
                slots.put(id.to_owned(), slot.clone());
                slot
            }
        };
        // Besides the cache's own reference and this one, one per task holding or waiting.
        if Arc::strong_count(&slot) - 2 >= self.max_queued {
            return Err(QueueFull);
        }
        self.evict(&mut slots);
        Ok(slot)
    }

    /// Drops least recently used slots nobody holds until the cache is within its bound.
    fn evict(&self, slots: &mut LruCache<String, Slot<A>>) {
        while slots.len() > self.capacity {
            let unused = slots
                .iter()
                .rev()
                .find(|(_, slot)| Arc::strong_count(slot) == 1)
                .map(|(id, _)| id.clone());
            let Some(id) = unused else { return };
            slots.pop(&id);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Counts a lookup.
    pub fn count(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The numbers for `$SRV.STATS`.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "hits": get(&self.hits),
            "misses": get(&self.misses),
            "evictions": get(&self.evictions),
            "entries": self.len(),
            "capacity": self.capacity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_least_recently_used_idle_entry_is_evicted_first() {
        let cache = StateCache::<u32>::new(2, 8);
        for id in ["a", "b"] {
            *cache.slot(id).unwrap().lock().await = Some(Cached::empty(1, Duration::from_secs(60)));
        }
        cache.slot("a").unwrap();
        cache.slot("c").unwrap();
        assert_eq!(cache.len(), 2);
        assert!(
            cache.slot("a").unwrap().lock().await.is_some(),
            "a was used last"
        );
        assert!(
            cache.slot("b").unwrap().lock().await.is_none(),
            "b was evicted"
        );
        assert!(cache.evictions.load(Ordering::Relaxed) >= 1);
    }

    #[tokio::test]
    async fn an_entry_in_use_is_never_evicted() {
        let cache = StateCache::<u32>::new(0, 8);
        let held = cache.slot("a").unwrap();
        *held.lock().await = Some(Cached::empty(1, Duration::from_secs(60)));
        cache.slot("b").unwrap();
        let again = cache.slot("a").unwrap();
        assert!(Arc::ptr_eq(&held, &again));
    }

    #[test]
    fn a_full_queue_is_refused() {
        let cache = StateCache::<u32>::new(10, 2);
        let _waiting: Vec<_> = (0..2).map(|_| cache.slot("hot").unwrap()).collect();
        assert!(cache.slot("hot").is_err());
        assert!(cache.slot("cold").is_ok());
    }

    #[test]
    fn recent_commands_keep_the_newest() {
        let entry = |n: u64| Entry {
            fingerprint: format!("f{n}"),
            reply: crate::command::Reply::failed(crate::command::ErrorKind::Rejected, "no"),
        };
        let mut recent = Recent::new(2, Duration::from_secs(60));
        recent.remember("c1", entry(1));
        recent.remember("c2", entry(2));
        recent.remember("c3", entry(3));
        assert!(recent.get("c1").is_none());
        assert_eq!(recent.get("c3").unwrap().fingerprint, "f3");
    }
}

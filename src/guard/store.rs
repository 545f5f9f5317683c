//! The shared producer-state store: per (producer id, topic, partition), the broker's view (see
//! [`crate::eos`]) plus the batches forwarded and not yet answered.
//!
//! Bounded: at most `max_tracked` entries; past that the least recently used eighth is evicted in one
//! pass (so eviction costs O(n log n) once per n/8 inserts). Entries idle longer than `idle_expiry` are
//! dropped by [`ProducerStore::expire_idle`]. After eviction the proxy simply does not know the producer:
//! [`crate::eos::check`] then answers `Unknown` and the batch is passed on (never refused for lack of state).
//!
//! Memory per entry is what issue #6 budgets (200 bytes): entries sit densely in a per-shard `Vec` (the
//! slab) of 120-byte slots: a 16-byte key (the topic interned as a number), the 88-byte window, the
//! in-flight list behind a pointer that is null while nothing is in flight (most of the time) and the
//! last-use time. The hash index holds 4-byte slab positions, so its slack (a hash table runs 44% to 88%
//! full) costs a few bytes per entry rather than a whole entry's worth, and the slab's unused capacity is
//! never touched, so never resident. `examples/state_memory` measures it.
//!
//! Time is passed in by the caller (milliseconds on a monotonic clock), so this module reads no clock.

use crate::eos::{Acked, Batch, PartitionState, Verdict};
use dashmap::DashMap;
use entry::{Entry, HAS_STATE};
use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A topic name as a number, handed out by [`ProducerStore::key`]. Numbers are never reused, so a key
/// held across a reclaim of unused names can never come to mean another topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub producer_id: i64,
    pub topic: TopicId,
    pub partition: i32,
}

/// Topic names and their numbers. Bounded: when full, names no entry uses any more are dropped.
struct Topics {
    ids: DashMap<Box<str>, TopicId>,
    names: DashMap<TopicId, Arc<str>>,
    next: AtomicU32,
    max: usize,
    /// New names refused while full.
    refused: AtomicU64,
    /// Names dropped because no entry used them any more (to make room).
    evicted: AtomicU64,
}

/// One lock's worth of entries.
#[derive(Default)]
struct Shard {
    /// Positions in `slots` of the live entries, by the key's hash.
    index: HashTable<u32>,
    slots: Vec<(Key, Entry)>,
    /// Positions in `slots` that are free for reuse.
    free: Vec<u32>,
}

impl Shard {
    fn find(&self, hash: u64, key: &Key) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| slots[i as usize].0 == *key)
            .map(|&i| i as usize)
    }

    /// The entry for `key`, inserted by `make` if missing. Returns its position and whether it is new.
    fn find_or_insert(
        &mut self,
        hash: u64,
        key: &Key,
        hasher: &RandomState,
        make: impl FnOnce() -> Entry,
    ) -> (usize, bool) {
        if let Some(i) = self.find(hash, key) {
            return (i, false);
        }
        let entry = (*key, make());
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = entry;
                i
            }
            None => {
                self.slots.push(entry);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.index
            .insert_unique(hash, i, |&j| hasher.hash_one(slots[j as usize].0));
        (i as usize, true)
    }

    fn remove(&mut self, hash: u64, key: &Key) -> bool {
        let slots = &self.slots;
        let Ok(found) = self
            .index
            .find_entry(hash, |&i| slots[i as usize].0 == *key)
        else {
            return false;
        };
        let (i, _) = found.remove();
        self.vacate(i);
        true
    }

    /// Frees slot `i` (already out of the index).
    fn vacate(&mut self, i: u32) {
        self.slots[i as usize].1.in_flight = None;
        self.free.push(i);
    }

    /// Keeps the entries `keep` says yes to; returns how many went.
    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) -> usize {
        let mut gone = Vec::new();
        let slots = &self.slots;
        self.index.retain(|&mut i| {
            let k = keep(&slots[i as usize].1);
            if !k {
                gone.push(i);
            }
            k
        });
        for &i in &gone {
            self.vacate(i);
        }
        gone.len()
    }

    fn live(&self) -> impl Iterator<Item = &(Key, Entry)> + '_ {
        self.index.iter().map(|&i| &self.slots[i as usize])
    }
}

pub struct ProducerStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    len: AtomicUsize,
    topics: Topics,
    /// producer id -> epoch handed out by an InitProducerId answer seen through this proxy: a state created
    /// for that producer at that epoch from sequence 0 is complete from the start.
    issued: DashMap<i64, i16>,
    owners: DashMap<i64, Owner>,
    max_tracked: usize,
    idle_expiry_ms: u64,
    evictions: AtomicU64,
}

/// Copy of one entry, for inspection (tests, /producers).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub key: Key,
    /// The topic's name (empty if the name was dropped while the entry lived on; see the store's topic table).
    pub topic: Arc<str>,
    pub state: Option<PartitionState>,
    pub in_flight: Vec<Batch>,
    /// Milliseconds since the entry was last used.
    pub idle_ms: u64,
}

/// A bounded page of the store (see [`ProducerStore::page`]): producer id -> (partitions tracked, the
/// first of them), in producer-id order.
#[derive(Debug, Default)]
pub struct Page {
    pub producers: std::collections::BTreeMap<i64, (usize, Vec<Snapshot>)>,
    /// More producers follow the last one in the page.
    pub more: bool,
}

/// Who a producer id belongs to: client id and transactional id, as last seen in its requests.
type Owner = (Option<Arc<str>>, Option<Arc<str>>);

impl ProducerStore {
    pub fn new(max_tracked: usize, idle_expiry_ms: u64) -> Self {
        let max_tracked = max_tracked.max(1);
        // As DashMap does: a few shards per core keep lock contention negligible.
        let shards = std::thread::available_parallelism()
            .map_or(4, usize::from)
            .saturating_mul(4)
            .next_power_of_two();
        ProducerStore {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
            topics: Topics {
                ids: DashMap::new(),
                names: DashMap::new(),
                next: AtomicU32::new(0),
                // As many topics as entries can use, and not fewer than a large cluster has.
                max: max_tracked.clamp(10_000, 1 << 22),
                refused: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
            },
            issued: DashMap::new(),
            owners: DashMap::new(),
            max_tracked,
            idle_expiry_ms,
            evictions: AtomicU64::new(0),
        }
    }

    /// The key for a producer on a topic partition. `None` only if the table of topic names is full of
    /// names in use (more distinct topics than `max_tracked`, or 2^32 names over the process's life): the
    /// batch is then passed on untracked.
    pub fn key(&self, producer_id: i64, topic: &str, partition: i32) -> Option<Key> {
        let topic = match self.topics.ids.get(topic) {
            Some(id) => *id,
            None => self.intern(topic)?,
        };
        Some(Key {
            producer_id,
            topic,
            partition,
        })
    }

    fn intern(&self, topic: &str) -> Option<TopicId> {
        if self.topics.ids.len() >= self.topics.max {
            // A scan of every entry: done at most once per max/8 refused names, so a client sending
            // endless new names cannot make every request pay for it.
            let refused = self.topics.refused.fetch_add(1, Ordering::Relaxed);
            if refused % (self.topics.max as u64 / 8).max(1) != 0 {
                return None;
            }
            self.reclaim_topic_names();
            if self.topics.ids.len() >= self.topics.max {
                tracing::warn!(
                    topics = self.topics.max,
                    "producer state: too many distinct topic names in use; batches for new topics pass untracked"
                );
                return None;
            }
        }
        let entry = self.topics.ids.entry(topic.into()).or_try_insert_with(|| {
            // Numbers are never reused: past 2^32 names, stop naming new topics.
            let n = self
                .topics
                .next
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
                .map_err(|_| ())?;
            let id = TopicId(n);
            self.topics.names.insert(id, Arc::from(topic));
            Ok::<TopicId, ()>(id)
        });
        entry.ok().map(|e| *e)
    }

    /// Drops the names no entry refers to.
    fn reclaim_topic_names(&self) {
        let mut used = std::collections::HashSet::new();
        for shard in self.shards.iter() {
            used.extend(lock(shard).live().map(|(k, _)| k.topic));
        }
        let before = self.topics.ids.len();
        self.topics.ids.retain(|_, id| used.contains(id));
        self.topics.names.retain(|id, _| used.contains(id));
        let gone = before.saturating_sub(self.topics.ids.len());
        self.topics
            .evicted
            .fetch_add(gone as u64, Ordering::Relaxed);
    }

    /// A topic was deleted and created again under `name` (a Metadata answer named it with a new topic
    /// id): its producer state belongs to the old topic. The name gets a new number at its next use, so
    /// no batch of the new topic is ever checked against the old one's windows (the old entries are no
    /// longer reachable and leave by idle expiry or eviction). Returns whether the name was in use.
    pub fn forget_topic(&self, name: &str) -> bool {
        self.topics.ids.remove(name).is_some()
    }

    /// The name behind a topic number (empty if dropped).
    pub fn topic_name(&self, topic: TopicId) -> Arc<str> {
        self.topics
            .names
            .get(&topic)
            .map_or_else(|| Arc::from(""), |n| n.clone())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's hash and its shard (the shard from hash bits the index does not lean on).
    fn locate(&self, key: &Key) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        let shard = ((hash >> 40) as usize) & (self.shards.len() - 1);
        (hash, lock(&self.shards[shard]))
    }

    /// Approximate bytes held: entry slots and index (by capacity), in-flight lists, topic names and
    /// owner records with their strings.
    pub fn approx_bytes(&self) -> usize {
        const SLOT: usize = 2 * std::mem::size_of::<usize>() + 8;
        let mut bytes = 0;
        for shard in self.shards.iter() {
            let shard = lock(shard);
            bytes += shard.slots.capacity() * std::mem::size_of::<(Key, Entry)>()
                + shard.index.capacity() * (std::mem::size_of::<u32>() + 1)
                + shard.free.capacity() * std::mem::size_of::<u32>();
            bytes += shard
                .live()
                .map(|(_, e)| std::mem::size_of_val(e.in_flight()))
                .sum::<usize>();
        }
        bytes += self
            .topics
            .names
            .iter()
            .map(|n| 2 * (n.len() + SLOT) + 16)
            .sum::<usize>();
        bytes += self
            .owners
            .iter()
            .map(|o| {
                SLOT + std::mem::size_of::<Owner>()
                    + o.0.as_ref().map_or(0, |s| s.len() + 16)
                    + o.1.as_ref().map_or(0, |s| s.len() + 16)
            })
            .sum::<usize>();
        bytes
    }

    /// Topic names dropped to make room for new ones.
    pub fn topic_name_evictions(&self) -> u64 {
        self.topics.evicted.load(Ordering::Relaxed)
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Remembers that the cluster handed out `producer_id` at `epoch` (InitProducerId answer).
    pub fn issued(&self, producer_id: i64, epoch: i16) {
        if self.issued.len() >= self.max_tracked {
            self.issued.clear();
        }
        self.issued.insert(producer_id, epoch);
    }

    /// Remembers which client (and transactional id) a producer id writes for, for `/producers`.
    pub fn set_owner(
        &self,
        producer_id: i64,
        client_id: Option<&str>,
        transactional_id: Option<&str>,
    ) {
        // Kept for display only, so cut to a label's length: bytes per producer stay bounded whatever
        // the client calls itself.
        let client_id = client_id.map(crate::metrics::bounded_label);
        let transactional_id = transactional_id.map(crate::metrics::bounded_label);
        let same = self
            .owners
            .get(&producer_id)
            .is_some_and(|o| o.0.as_deref() == client_id && o.1.as_deref() == transactional_id);
        if !same {
            if self.owners.len() >= self.max_tracked {
                self.owners.clear();
            }
            self.owners.insert(
                producer_id,
                (client_id.map(Arc::from), transactional_id.map(Arc::from)),
            );
        }
    }

    pub fn owner(&self, producer_id: i64) -> Option<(Option<String>, Option<String>)> {
        self.owners.get(&producer_id).map(|o| {
            (
                o.0.as_deref().map(str::to_string),
                o.1.as_deref().map(str::to_string),
            )
        })
    }

    /// Decides on a batch and, if it is to be forwarded, records it as in flight.
    pub fn check_and_track(&self, key: &Key, batch: Batch, now_ms: u64) -> Verdict {
        {
            let (hash, mut shard) = self.locate(key);
            if let Some(i) = shard.find(hash, key) {
                return shard.slots[i].1.decide(batch, now_ms);
            }
        }
        self.make_room();
        // Another connection may have inserted it in between: then this decides against what is there.
        let (mut shard, i) = self.upsert(key, now_ms);
        shard.slots[i].1.decide(batch, now_ms)
    }

    /// The entry for `key`, inserted if missing, under its shard's lock.
    fn upsert(&self, key: &Key, now_ms: u64) -> (MutexGuard<'_, Shard>, usize) {
        let (hash, mut shard) = self.locate(key);
        let (i, new) = shard.find_or_insert(hash, key, &self.hasher, || Entry::new(now_ms));
        if new {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        (shard, i)
    }

    /// Puts `batch` in flight although its verdict did not forward it (audit mode forwards gaps).
    pub fn track(&self, key: &Key, batch: Batch, now_ms: u64) {
        let (mut shard, i) = self.upsert(key, now_ms);
        shard.slots[i].1.track(batch);
    }

    /// The batch is no longer in flight (answered, failed, or its connection is gone).
    pub fn settle(&self, key: &Key, batch: Batch) {
        let (hash, mut shard) = self.locate(key);
        if let Some(i) = shard.find(hash, key) {
            shard.slots[i].1.untrack(batch);
        }
    }

    /// Drops what is known of `key`: the broker's state for it moved in a way the proxy could not follow
    /// (see [`crate::audit::Kind::DuplicatePartition`]), so the next verdicts come from the broker.
    pub fn forget(&self, key: &Key) {
        let (hash, mut shard) = self.locate(key);
        if shard.remove(hash, key) {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether `batch` is still in flight.
    pub fn in_flight(&self, key: &Key, batch: Batch) -> bool {
        let (hash, shard) = self.locate(key);
        shard
            .find(hash, key)
            .is_some_and(|i| shard.slots[i].1.in_flight().contains(&batch))
    }

    /// The broker accepted `batch`: learn it (and settle it). Returns true if it moved the producer to a
    /// new epoch on this partition.
    pub fn acknowledge(&self, key: &Key, batch: Batch, acked: Acked, now_ms: u64) -> bool {
        let fresh = self
            .issued
            .get(&key.producer_id)
            .is_some_and(|e| *e == batch.epoch);
        // Inserted without making room: an entry evicted while its batch was in flight is worth
        // learning again, and the bound is back in force at the next new entry.
        let (mut shard, i) = self.upsert(key, now_ms);
        let e = &mut shard.slots[i].1;
        e.touch(now_ms);
        e.untrack(batch);
        let bumped = e.state().is_some_and(|s| s.epoch < batch.epoch);
        if e.state().is_none() {
            e.state = if fresh && batch.first_seq == 0 {
                PartitionState::new_complete(batch.epoch)
            } else {
                PartitionState::new(batch.epoch)
            };
            e.stamp |= HAS_STATE;
        }
        e.state.acknowledge(batch.epoch, acked);
        bumped
    }

    /// Drops entries idle for longer than the idle expiry; returns how many.
    pub fn expire_idle(&self, now_ms: u64) -> usize {
        let limit = self.idle_expiry_ms;
        let mut gone = 0;
        for shard in self.shards.iter() {
            gone += lock(shard).retain(|e| {
                e.in_flight.is_some() || now_ms.saturating_sub(e.last_used_ms()) < limit
            });
        }
        self.len.fetch_sub(gone, Ordering::Relaxed);
        gone
    }

    /// At the bound, evicts the least recently used eighth.
    fn make_room(&self) {
        if self.len() < self.max_tracked {
            return;
        }
        let mut ages: Vec<(u64, Key)> = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            ages.extend(lock(shard).live().map(|(k, e)| (e.last_used_ms(), *k)));
        }
        ages.sort_unstable_by_key(|(t, _)| *t);
        let n = (self.max_tracked / 8).max(1).min(ages.len());
        let mut gone = 0;
        for (_, key) in ages.into_iter().take(n) {
            let (hash, mut shard) = self.locate(&key);
            if shard.remove(hash, &key) {
                gone += 1;
            }
        }
        self.len.fetch_sub(gone, Ordering::Relaxed);
        self.evictions.fetch_add(gone as u64, Ordering::Relaxed);
    }

    /// One page of entries for inspection, bounded whatever the store holds: the `producers` lowest
    /// producer ids above `after`, with at most `per_producer` partitions each (and how many there
    /// are), plus whether more producers follow. Memory is bounded by the page, not by the store.
    pub fn page(&self, after: i64, producers: usize, per_producer: usize, now_ms: u64) -> Page {
        let mut page = Page::default();
        let producers = producers.max(1);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (key, e) in shard.live() {
                let pid = key.producer_id;
                if pid <= after {
                    continue;
                }
                if page.producers.len() >= producers && !page.producers.contains_key(&pid) {
                    page.more = true;
                    match page.producers.last_key_value() {
                        Some((&highest, _)) if pid < highest => {
                            page.producers.pop_last();
                        }
                        _ => continue,
                    }
                }
                let (count, list) = page.producers.entry(pid).or_default();
                *count += 1;
                if list.len() < per_producer {
                    list.push(Snapshot {
                        key: *key,
                        topic: self.topic_name(key.topic),
                        state: e.state().cloned(),
                        in_flight: e.in_flight().to_vec(),
                        idle_ms: now_ms.saturating_sub(e.last_used_ms()),
                    });
                }
            }
        }
        page
    }

    pub fn snapshot(&self, now_ms: u64) -> Vec<Snapshot> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let shard = lock(shard);
            out.extend(shard.live().map(|(key, e)| Snapshot {
                key: *key,
                topic: self.topic_name(key.topic),
                state: e.state().cloned(),
                in_flight: e.in_flight().to_vec(),
                idle_ms: now_ms.saturating_sub(e.last_used_ms()),
            }));
        }
        out
    }
}

/// A shard's lock. A panic while holding it cannot leave an entry half-written in a way that matters
/// more than losing the process would (every update is a few plain stores), so poisoning is ignored.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

mod entry;
#[cfg(test)]
mod tests;

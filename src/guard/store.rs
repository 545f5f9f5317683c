//! The shared producer-state store: per (producer id, topic, partition), the broker's view (see
//! [`crate::eos`]) plus the batches forwarded and not yet answered.
//!
//! Bounded: at most `max_tracked` entries; past that the least recently used eighth is evicted in one
//! pass (so eviction costs O(n log n) once per n/8 inserts). Entries idle longer than `idle_expiry` are
//! dropped by [`ProducerStore::expire_idle`]. After eviction the proxy simply does not know the producer:
//! [`crate::eos::check`] then answers `Unknown` and the batch is passed on (never refused for lack of state).
//!
//! Time is passed in by the caller (milliseconds on a monotonic clock), so this module reads no clock.

use crate::eos::{self, Acked, Batch, PartitionState, Verdict};
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// At most this many batches per producer and partition are tracked as in flight (a well-behaved
/// producer has at most 5); beyond that the oldest is forgotten, which only weakens retry detection.
const MAX_IN_FLIGHT: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub producer_id: i64,
    pub topic: Arc<str>,
    pub partition: i32,
}

#[derive(Debug)]
struct Entry {
    state: Option<PartitionState>,
    in_flight: Vec<Batch>,
    last_used_ms: u64,
}

pub struct ProducerStore {
    map: DashMap<Key, Entry>,
    topics: DashMap<Box<str>, Arc<str>>,
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
    pub state: Option<PartitionState>,
    pub in_flight: Vec<Batch>,
    /// Milliseconds since the entry was last used.
    pub idle_ms: u64,
}

/// Who a producer id belongs to: client id and transactional id, as last seen in its requests.
type Owner = (Option<Arc<str>>, Option<Arc<str>>);

impl ProducerStore {
    pub fn new(max_tracked: usize, idle_expiry_ms: u64) -> Self {
        ProducerStore {
            map: DashMap::new(),
            topics: DashMap::new(),
            issued: DashMap::new(),
            owners: DashMap::new(),
            max_tracked: max_tracked.max(1),
            idle_expiry_ms,
            evictions: AtomicU64::new(0),
        }
    }

    /// The key for a topic name, sharing one allocation per topic.
    pub fn key(&self, producer_id: i64, topic: &str, partition: i32) -> Key {
        let topic = match self.topics.get(topic) {
            Some(t) => t.clone(),
            None => self
                .topics
                .entry(topic.into())
                .or_insert_with(|| Arc::from(topic))
                .clone(),
        };
        Key {
            producer_id,
            topic,
            partition,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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
        if let Some(mut e) = self.map.get_mut(key) {
            e.last_used_ms = now_ms;
            let verdict = eos::check(e.state.as_ref(), &e.in_flight, batch);
            if verdict.forwards() {
                if e.in_flight.len() >= MAX_IN_FLIGHT {
                    e.in_flight.remove(0);
                }
                e.in_flight.push(batch);
            }
            return verdict;
        }
        self.make_room();
        self.map.insert(
            key.clone(),
            Entry {
                state: None,
                in_flight: vec![batch],
                last_used_ms: now_ms,
            },
        );
        Verdict::Unknown
    }

    /// The batch is no longer in flight (answered, failed, or its connection is gone).
    pub fn settle(&self, key: &Key, batch: Batch) {
        if let Some(mut e) = self.map.get_mut(key) {
            remove_in_flight(&mut e.in_flight, batch);
        }
    }

    /// Whether `batch` is still in flight.
    pub fn in_flight(&self, key: &Key, batch: Batch) -> bool {
        self.map
            .get(key)
            .is_some_and(|e| e.in_flight.contains(&batch))
    }

    /// The broker accepted `batch`: learn it (and settle it). Returns true if it moved the producer to a
    /// new epoch on this partition.
    pub fn acknowledge(&self, key: &Key, batch: Batch, acked: Acked, now_ms: u64) -> bool {
        let fresh = self
            .issued
            .get(&key.producer_id)
            .is_some_and(|e| *e == batch.epoch);
        let mut e = self.map.entry(key.clone()).or_insert_with(|| Entry {
            state: None,
            in_flight: Vec::new(),
            last_used_ms: now_ms,
        });
        e.last_used_ms = now_ms;
        remove_in_flight(&mut e.in_flight, batch);
        let bumped = e.state.as_ref().is_some_and(|s| s.epoch < batch.epoch);
        let state = e.state.get_or_insert_with(|| {
            if fresh && batch.first_seq == 0 {
                PartitionState::new_complete(batch.epoch)
            } else {
                PartitionState::new(batch.epoch)
            }
        });
        state.acknowledge(batch.epoch, acked);
        bumped
    }

    /// Drops entries idle for longer than the idle expiry; returns how many.
    pub fn expire_idle(&self, now_ms: u64) -> usize {
        let before = self.map.len();
        let limit = self.idle_expiry_ms;
        self.map.retain(|_, e| {
            !e.in_flight.is_empty() || now_ms.saturating_sub(e.last_used_ms) < limit
        });
        before - self.map.len()
    }

    fn make_room(&self) {
        if self.map.len() < self.max_tracked {
            return;
        }
        let mut ages: Vec<(u64, Key)> = self
            .map
            .iter()
            .map(|e| (e.last_used_ms, e.key().clone()))
            .collect();
        ages.sort_unstable_by_key(|(t, _)| *t);
        let n = (self.max_tracked / 8).max(1).min(ages.len());
        for (_, key) in ages.into_iter().take(n) {
            self.map.remove(&key);
        }
        self.evictions.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self, now_ms: u64) -> Vec<Snapshot> {
        self.map
            .iter()
            .map(|e| Snapshot {
                key: e.key().clone(),
                state: e.state.clone(),
                in_flight: e.in_flight.clone(),
                idle_ms: now_ms.saturating_sub(e.last_used_ms),
            })
            .collect()
    }
}

/// Removes `batch` from an in-flight list, and frees the list's memory once it is empty (most of the
/// time nothing is in flight, and a million idle entries should not each keep a heap allocation).
fn remove_in_flight(list: &mut Vec<Batch>, batch: Batch) {
    if let Some(i) = list.iter().position(|b| *b == batch) {
        list.remove(i);
    }
    if list.is_empty() && list.capacity() > 0 {
        *list = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(first: i32, last: i32) -> Batch {
        Batch {
            epoch: 0,
            first_seq: first,
            last_seq: last,
        }
    }

    fn acked(first: i32, last: i32, offset: i64) -> Acked {
        Acked {
            first_seq: first,
            last_seq: last,
            first_offset: offset,
            timestamp: -1,
            acks_all: true,
        }
    }

    #[test]
    fn tracks_in_flight_and_learns_from_acks() {
        let s = ProducerStore::new(100, 1000);
        let k = s.key(7, "t", 0);
        assert_eq!(s.check_and_track(&k, b(0, 4), 0), Verdict::Unknown);
        assert_eq!(
            s.check_and_track(&k, b(0, 4), 1),
            Verdict::DuplicateInFlight
        );
        s.acknowledge(&k, b(0, 4), acked(0, 4, 10), 2);
        assert!(!s.in_flight(&k, b(0, 4)));
        assert_eq!(
            s.check_and_track(&k, b(0, 4), 3),
            Verdict::Duplicate(acked(0, 4, 10))
        );
        assert_eq!(s.check_and_track(&k, b(5, 9), 4), Verdict::InOrder);
        s.settle(&k, b(5, 9));
        assert!(!s.in_flight(&k, b(5, 9)));
    }

    #[test]
    fn issued_producers_start_complete() {
        let s = ProducerStore::new(100, 1000);
        s.issued(9, 0);
        let k = s.key(9, "t", 0);
        s.check_and_track(&k, b(0, 0), 0);
        s.acknowledge(&k, b(0, 0), acked(0, 0, 0), 0);
        // A gap right after: decided at the proxy, since the window is known to be complete.
        assert_eq!(
            s.check_and_track(&k, b(5, 5), 1),
            Verdict::OutOfOrder {
                expected: 1,
                received: 5
            }
        );
        // Not issued through this proxy: the broker may know more, so it decides.
        let k2 = s.key(10, "t", 0);
        s.check_and_track(&k2, b(0, 0), 0);
        s.acknowledge(&k2, b(0, 0), acked(0, 0, 0), 0);
        assert_eq!(s.check_and_track(&k2, b(5, 5), 1), Verdict::Unknown);
    }

    #[test]
    fn bounded_with_lru_eviction_and_idle_expiry() {
        let s = ProducerStore::new(16, 1000);
        for pid in 0..40 {
            let k = s.key(pid, "t", 0);
            s.check_and_track(&k, b(0, 0), pid as u64);
            s.settle(&k, b(0, 0));
        }
        assert!(s.len() <= 16, "{}", s.len());
        assert!(s.evictions() >= 24);
        // the most recent survive
        assert!(s.snapshot(0).iter().any(|e| e.key.producer_id == 39));
        assert!(!s.snapshot(0).iter().any(|e| e.key.producer_id == 0));
        let n = s.len();
        assert_eq!(
            s.expire_idle(38 + 1000),
            n - 1,
            "all but the newest are idle"
        );
        assert_eq!(s.len(), 1);
    }
}

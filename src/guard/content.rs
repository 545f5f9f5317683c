//! The content window: what each client identity recently had written on each partition, by content,
//! so that the same batch sent again is recognised whatever producer id, epoch or sequence it carries
//! (issue #15). It learns only from the broker's answers: a batch is remembered once the broker
//! confirmed it, with the offset it got.
//!
//! It serves two cases the broker cannot see:
//! - a client without idempotence retrying a batch whose answer it lost (the proxy read the answer;
//!   the client did not): every retry is a duplicate on the broker, and the proxy can answer it with
//!   the original offset;
//! - an idempotent producer sending written records again under a new epoch or producer id (librdkafka
//!   after an epoch bump): the broker writes them again, and the proxy can say so.
//!
//! Keys are 128-bit keyed hashes of (identity, topic, partition, content digest): the hash keys are
//! random per process, so nobody can craft a collision offline. Entries are bounded in number (FIFO
//! eviction, counted) and expire after the window; about [`ENTRY_BYTES`] bytes each.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the broker confirmed for a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_offset: i64,
    pub log_append_time: i64,
    pub at: Instant,
}

/// A batch's place in the window: who sent it where, and what it says.
pub type ContentKey = u128;

const SHARDS: usize = 16;
/// Approximate bytes per entry: the map's key, value and control bytes at its load factor, and the
/// expiry queue's slot.
pub const ENTRY_BYTES: usize = 96;

#[derive(Default)]
struct Shard {
    map: HashMap<ContentKey, Written>,
    order: VecDeque<(ContentKey, Instant)>,
}

pub struct ContentWindow {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    window: Duration,
    hasher: std::collections::hash_map::RandomState,
    len: AtomicUsize,
    evictions: AtomicU64,
}

impl ContentWindow {
    /// At most `max_entries` batches, each for at most `window`.
    pub fn new(max_entries: usize, window: Duration) -> ContentWindow {
        ContentWindow {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: max_entries.div_ceil(SHARDS).max(1),
            window,
            hasher: Default::default(),
            len: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// The key of `digest` sent by `identity` to `topic`/`partition`.
    /// A client identity's own key (the upgraded producer it shares across its connections), from
    /// the same random per-process keys.
    pub fn identity(&self, identity: &impl Hash) -> u128 {
        let half = |salt: u8| self.hasher.hash_one((salt, identity));
        u128::from(half(3)) << 64 | u128::from(half(4))
    }

    pub fn key(
        &self,
        identity: &impl Hash,
        topic: &str,
        partition: i32,
        digest: [u64; 2],
    ) -> ContentKey {
        let half = |salt: u8| {
            self.hasher
                .hash_one((salt, identity, topic, partition, digest))
        };
        u128::from(half(1)) << 64 | u128::from(half(2))
    }

    fn shard(&self, key: ContentKey) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }

    /// What the broker confirmed for this content within the window, if anything.
    pub fn seen(&self, key: ContentKey, now: Instant) -> Option<Written> {
        let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        shard
            .map
            .get(&key)
            .filter(|w| now.saturating_duration_since(w.at) < self.window)
            .copied()
    }

    /// Remembers a confirmed batch. The first confirmation of a content stays: it is the original.
    pub fn remember(&self, key: ContentKey, written: Written) {
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let now = written.at;
        // Expired entries go first, then the oldest while over the budget.
        while let Some(&(k, at)) = shard.order.front() {
            let expired = now.saturating_duration_since(at) >= self.window;
            if !expired && shard.map.len() < self.per_shard {
                break;
            }
            shard.order.pop_front();
            if shard.map.get(&k).is_some_and(|w| w.at == at) {
                shard.map.remove(&k);
                self.len.fetch_sub(1, Ordering::Relaxed);
                if !expired {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        match shard.map.get(&key) {
            Some(w) if now.saturating_duration_since(w.at) < self.window => {}
            old => {
                if old.is_none() {
                    self.len.fetch_add(1, Ordering::Relaxed);
                }
                shard.map.insert(key, written);
                shard.order.push_back((key, now));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn approx_bytes(&self) -> usize {
        self.len() * ENTRY_BYTES
    }

    /// Entries dropped to stay within the budget (not those that expired).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(offset: i64, at: Instant) -> Written {
        Written {
            producer_id: -1,
            epoch: -1,
            base_offset: offset,
            log_append_time: -1,
            at,
        }
    }

    #[test]
    fn the_first_confirmation_is_kept_until_the_window_ends() {
        let w = ContentWindow::new(100, Duration::from_secs(10));
        let t0 = Instant::now();
        let k = w.key(&"client@10.0.0.1", "t", 0, [1, 2]);
        assert_eq!(w.seen(k, t0), None);
        w.remember(k, written(5, t0));
        w.remember(k, written(9, t0 + Duration::from_secs(1)));
        assert_eq!(
            w.seen(k, t0 + Duration::from_secs(2))
                .map(|s| s.base_offset),
            Some(5)
        );
        assert_eq!(w.seen(k, t0 + Duration::from_secs(11)), None, "expired");
        // Another identity, partition or content is another key.
        assert_ne!(k, w.key(&"client@10.0.0.2", "t", 0, [1, 2]));
        assert_ne!(k, w.key(&"client@10.0.0.1", "t", 1, [1, 2]));
        assert_ne!(k, w.key(&"client@10.0.0.1", "t", 0, [1, 3]));
    }

    #[test]
    fn the_budget_evicts_the_oldest_and_counts_it() {
        let w = ContentWindow::new(SHARDS * 2, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let k = w.key(&"c", "t", 0, [i, 0]);
            w.remember(k, written(i as i64, t0 + Duration::from_millis(i)));
        }
        assert!(w.len() <= SHARDS * 2, "{}", w.len());
        assert!(w.evictions() >= 1000 - (SHARDS as u64 * 2));
        let newest = w.key(&"c", "t", 0, [999, 0]);
        assert!(w.seen(newest, t0 + Duration::from_secs(1)).is_some());
        assert_eq!(w.approx_bytes(), w.len() * ENTRY_BYTES);
    }
}

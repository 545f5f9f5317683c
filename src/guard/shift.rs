//! Sequences shifted for idempotent producers whose repeats the proxy answered.
//!
//! When an idempotent producer re-sends, under a new epoch or producer id, records it had written
//! (librdkafka after an epoch bump: librdkafka #4953), and the policy says `duplicate_content: answer`,
//! the proxy answers that batch with the original offset instead of writing it again. The broker then
//! never sees those sequences: every later batch of that producer, epoch and partition must reach it
//! shifted down by the records answered, or the broker would see a gap and refuse it as out of order.
//! This table keeps, per producer, epoch and partition, the holes the proxy answered (in the
//! client's sequences); a batch's sequence upstream is its own minus the records of the holes below it.
//!
//! Bounded: at most `max` producer-partitions, the oldest forgotten first. A producer whose holes
//! were forgotten gets OUT_OF_ORDER_SEQUENCE_NUMBER for its next batch and recovers as from any gap
//! (an idempotent client bumps its epoch, whose sequences start again at 0 with no holes).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Holes kept per producer-partition; past this, no more repeats are answered there (they are
/// reported and forwarded).
pub const MAX_HOLES: usize = 64;
/// Bytes one producer-partition costs besides its topic name, about (key, map entry, order entry).
pub const ENTRY_BYTES: usize = 96;

type Key = (i64, i16, Arc<str>, i32);

pub struct Shifts {
    inner: Mutex<Inner>,
    /// Entries, read without the lock: no holes at all is the common case.
    len: AtomicUsize,
    max: usize,
}

#[derive(Default)]
struct Inner {
    holes: HashMap<Key, Vec<(i32, i32)>>,
    order: VecDeque<Key>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shifts {
    pub fn new(max: usize) -> Shifts {
        Shifts {
            inner: Mutex::default(),
            len: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    /// Records that the proxy answered `count` records from sequence `start` itself. `false` if the
    /// producer-partition has [`MAX_HOLES`] already (the caller then forwards instead of answering).
    pub fn add(
        &self,
        (pid, epoch): (i64, i16),
        (topic, partition): (&str, i32),
        start: i32,
        count: i32,
    ) -> bool {
        let mut inner = lock(&self.inner);
        let key: Key = (pid, epoch, Arc::from(topic), partition);
        if let Some(h) = inner.holes.get_mut(&key) {
            if h.iter().any(|(s, _)| *s == start) {
                return true; // answered before: the same hole
            }
            if h.len() >= MAX_HOLES {
                return false;
            }
            h.push((start, count));
            return true;
        }
        if inner.holes.len() >= self.max {
            if let Some(old) = inner.order.pop_front() {
                inner.holes.remove(&old);
            }
        }
        inner.order.push_back(key.clone());
        inner.holes.insert(key, vec![(start, count)]);
        self.len.store(inner.holes.len(), Ordering::Relaxed);
        true
    }

    /// Whether no sequence is shifted anywhere (the common case: nothing to look up).
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// The sequence a batch starting at `seq` goes upstream with (`seq` itself if nothing was answered
    /// below it).
    pub fn upstream_sequence(
        &self,
        (pid, epoch): (i64, i16),
        (topic, partition): (&str, i32),
        seq: i32,
    ) -> i32 {
        if self.is_empty() {
            return seq;
        }
        let inner = lock(&self.inner);
        let key: Key = (pid, epoch, Arc::from(topic), partition);
        let below: i64 = inner.holes.get(&key).map_or(0, |h| {
            h.iter()
                .filter(|(s, _)| *s < seq)
                .map(|(_, n)| i64::from(*n))
                .sum()
        });
        (i64::from(seq) - below).rem_euclid(i64::from(i32::MAX) + 1) as i32
    }

    pub fn approx_bytes(&self) -> usize {
        let inner = lock(&self.inner);
        inner
            .holes
            .iter()
            .map(|((_, _, t, _), h)| ENTRY_BYTES + t.len() + 8 * h.capacity())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_batches_go_up_shifted_by_the_answered_records() {
        let s = Shifts::new(10);
        let (p, t) = ((7, 1), ("t", 0));
        assert_eq!(s.upstream_sequence(p, t, 5), 5, "nothing answered");
        assert!(s.add(p, t, 0, 3));
        assert_eq!(
            s.upstream_sequence(p, t, 0),
            0,
            "the hole itself (a retry is answered)"
        );
        assert_eq!(
            s.upstream_sequence(p, t, 3),
            0,
            "the next batch is the broker's first"
        );
        assert!(s.add(p, t, 5, 2));
        assert_eq!(s.upstream_sequence(p, t, 7), 2);
        assert_eq!(
            s.upstream_sequence((7, 2), t, 7),
            7,
            "another epoch is not shifted"
        );
        assert!(s.add(p, t, 5, 2), "the same hole again");
        assert_eq!(s.upstream_sequence(p, t, 7), 2);
    }

    #[test]
    fn bounded() {
        let s = Shifts::new(2);
        for pid in 0..3 {
            assert!(s.add((pid, 0), ("t", 0), 0, 1));
        }
        assert_eq!(
            s.upstream_sequence((0, 0), ("t", 0), 1),
            1,
            "the oldest was forgotten"
        );
        assert_eq!(s.upstream_sequence((2, 0), ("t", 0), 1), 0);
        for i in 1..MAX_HOLES as i32 {
            assert!(s.add((2, 0), ("t", 0), i * 10, 1));
        }
        assert!(
            !s.add((2, 0), ("t", 0), 10_000, 1),
            "at most MAX_HOLES holes"
        );
    }
}

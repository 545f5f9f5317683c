//! Failed heads: per producer and partition, the first batch the broker refused while later batches of
//! the same producer were pipelined behind it.
//!
//! The broker answers OUT_OF_ORDER_SEQUENCE_NUMBER (45) to every batch pipelined behind one it refused
//! (it never saw the sequences in between). Those answers are echoes of the first failure, not gaps of
//! their own: recorded as one `out_of_order_cascade` event per failure, so that `out_of_order_sequence`
//! means a real gap. The proxy's own verdicts follow the same rule: a batch pipelined behind one the
//! broker has not accepted (in flight, or refused and not yet retried) is not out of order; it goes to
//! the broker, which judges it.
//!
//! Bounded: at most [`MAX_HEADS`] entries (the oldest eighth goes past that); a head is forgotten when
//! the broker accepts a batch of that producer and partition, or after [`CASCADE_WINDOW`].

use super::store::Key;
use crate::eos::Batch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MAX_HEADS: usize = 10_000;
/// How long after a failure answers behind it still count as its echo.
pub const CASCADE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub epoch: i16,
    pub first_seq: i32,
    pub error_code: i16,
    /// Answers seen behind it so far.
    pub behind: u32,
    at: Instant,
}

/// What a refused batch is, relative to the failures before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first failure on this producer and partition: audit it as it is.
    Head,
    /// Pipelined behind `head`: the first echo (audit one cascade event) or a later one (nothing).
    Behind { head: Head, first_echo: bool },
}

#[derive(Default)]
pub struct FailedHeads {
    heads: Mutex<HashMap<Key, Head>>,
    evicted: std::sync::atomic::AtomicU64,
    /// Mirrors the map's size, so the common path (no failures anywhere) takes no lock.
    len: AtomicUsize,
}

impl FailedHeads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Head>> {
        self.heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn behind(head: &Head, batch: Batch, now: Instant) -> bool {
        head.epoch == batch.epoch
            && head.first_seq < batch.first_seq
            && now.saturating_duration_since(head.at) < CASCADE_WINDOW
    }

    /// The broker refused `batch` with `error_code`.
    pub fn refused(&self, key: &Key, batch: Batch, error_code: i16, now: Instant) -> Failure {
        let mut heads = self.lock();
        if let Some(head) = heads.get_mut(key) {
            if Self::behind(head, batch, now) {
                head.behind += 1;
                return Failure::Behind {
                    head: *head,
                    first_echo: head.behind == 1,
                };
            }
        }
        if heads.len() >= MAX_HEADS && !heads.contains_key(key) {
            let mut ages: Vec<Instant> = heads.values().map(|h| h.at).collect();
            let cut = (ages.len() / 8).max(1);
            let (_, nth, _) = ages.select_nth_unstable(cut - 1);
            let cutoff = *nth;
            let before = heads.len();
            heads.retain(|_, h| h.at > cutoff);
            self.evicted
                .fetch_add((before - heads.len()) as u64, Ordering::Relaxed);
        }
        heads.insert(
            *key,
            Head {
                epoch: batch.epoch,
                first_seq: batch.first_seq,
                error_code,
                behind: 0,
                at: now,
            },
        );
        self.len.store(heads.len(), Ordering::Relaxed);
        Failure::Head
    }

    /// The head `batch` is pipelined behind, if the broker refused one before it.
    pub fn head_before(&self, key: &Key, batch: Batch, now: Instant) -> Option<Head> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.lock()
            .get(key)
            .filter(|h| Self::behind(h, batch, now))
            .copied()
    }

    /// The broker accepted a batch of this producer and partition: the failure is over.
    pub fn accepted(&self, key: &Key) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut heads = self.lock();
        heads.remove(key);
        self.len.store(heads.len(), Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Records dropped to stay within [`MAX_HEADS`].
    pub fn evictions(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::store::ProducerStore;

    fn b(epoch: i16, first: i32) -> Batch {
        Batch {
            epoch,
            first_seq: first,
            last_seq: first + 9,
        }
    }

    #[test]
    fn echoes_are_one_cascade_and_end_on_success() {
        let store = ProducerStore::new(10, 60_000);
        let key = store.key(1, "t", 0).unwrap();
        let heads = FailedHeads::default();
        let t0 = Instant::now();
        assert_eq!(heads.refused(&key, b(0, 0), 51, t0), Failure::Head);
        let first = heads.refused(&key, b(0, 10), 45, t0);
        assert!(matches!(first, Failure::Behind { first_echo: true, head } if head.first_seq == 0));
        let second = heads.refused(&key, b(0, 20), 45, t0);
        assert!(matches!(second, Failure::Behind { first_echo: false, head } if head.behind == 2));
        assert!(heads.head_before(&key, b(0, 30), t0).is_some());
        assert!(
            heads.head_before(&key, b(1, 30), t0).is_none(),
            "another epoch"
        );
        assert!(
            heads
                .head_before(&key, b(0, 30), t0 + CASCADE_WINDOW)
                .is_none(),
            "too late to be an echo"
        );
        heads.accepted(&key);
        assert!(heads.is_empty());
        assert_eq!(
            heads.refused(&key, b(0, 30), 45, t0),
            Failure::Head,
            "a new failure"
        );
    }

    #[test]
    fn bounded() {
        let store = ProducerStore::new(100_000, 60_000);
        let heads = FailedHeads::default();
        let t0 = Instant::now();
        for pid in 0..(MAX_HEADS as i64 + 500) {
            let key = store.key(pid, "t", 0).unwrap();
            heads.refused(&key, b(0, 0), 45, t0 + Duration::from_micros(pid as u64));
        }
        assert!(heads.len() <= MAX_HEADS);
    }
}

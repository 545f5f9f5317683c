//! Transaction tracker: transactional.id -> (producer id, epoch), learned from InitProducerId answers and
//! from EndTxn v5+ answers (transactions v2 bump the epoch on every commit and abort, and hand out a new
//! producer id when the epoch runs out).

use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A transaction in progress, from its first write (or partition/offset registration) to its EndTxn.
#[derive(Debug, Clone)]
pub struct OpenTxn {
    pub started: Instant,
    pub client_id: String,
    /// Flagged by the watchdog as open for too long.
    pub hanging: bool,
}

/// What the end of a transaction looked like.
#[derive(Debug, Clone)]
pub struct EndedTxn {
    pub duration: Duration,
    pub client_id: String,
    pub was_hanging: bool,
}

/// Java's default transaction.timeout.ms, for transactions whose InitProducerId the proxy did not see.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Transactional ids longer than this are not tracked (the broker still fences them): the tracker's
/// memory is bounded by entries times this, whatever clients send.
pub const MAX_TRANSACTIONAL_ID_BYTES: usize = 1024;

/// What the proxy knows of one transactional id.
#[derive(Debug, Clone, Copy)]
struct Known {
    producer_id: i64,
    epoch: i16,
    timeout: Option<Duration>,
    /// Two-phase commit (KIP-939): the coordinator never times its transactions out, by design.
    two_phase: bool,
    last_used: Instant,
}

/// Three bounded tables: transactional id -> (producer id, epoch, timeout) and the open transactions.
/// Each holds at most `max` entries; past that the least recently used eighth of the known ids, or the
/// oldest open transaction, goes, and the eviction is counted ([`TxnTracker::evictions`]).
pub struct TxnTracker {
    known: DashMap<Box<str>, Known>,
    open: DashMap<Box<str>, OpenTxn>,
    max: usize,
    evictions: AtomicU64,
}

/// The outcome of [`TxnTracker::begin`].
#[derive(Debug)]
pub struct Begun {
    /// A new transaction was opened (false: it was open already, or its id is not tracked).
    pub opened: bool,
    /// The oldest open transaction, evicted to make room: (transactional id, what it was).
    pub evicted: Option<(String, OpenTxn)>,
}

impl TxnTracker {
    pub fn new(max: usize) -> Self {
        TxnTracker {
            known: DashMap::new(),
            open: DashMap::new(),
            max: max.max(1),
            evictions: AtomicU64::new(0),
        }
    }

    fn trackable(txn_id: &str) -> bool {
        !txn_id.is_empty() && txn_id.len() <= MAX_TRANSACTIONAL_ID_BYTES
    }

    /// Entries evicted from either table since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// At the bound, drops the least recently used eighth of the known ids.
    fn make_room(&self) {
        if self.known.len() < self.max {
            return;
        }
        let mut ages: Vec<Instant> = self.known.iter().map(|e| e.last_used).collect();
        let cut = (ages.len() / 8).max(1);
        let (_, nth, _) = ages.select_nth_unstable(cut - 1);
        let cutoff = *nth;
        let before = self.known.len();
        self.known.retain(|_, k| k.last_used > cutoff);
        let gone = before.saturating_sub(self.known.len());
        self.evictions.fetch_add(gone as u64, Ordering::Relaxed);
    }

    fn upsert(&self, txn_id: &str, update: impl FnOnce(&mut Known)) {
        if !Self::trackable(txn_id) {
            return;
        }
        if let Some(mut k) = self.known.get_mut(txn_id) {
            k.last_used = Instant::now();
            update(&mut k);
            return;
        }
        self.make_room();
        let mut k = Known {
            producer_id: -1,
            epoch: -1,
            timeout: None,
            two_phase: false,
            last_used: Instant::now(),
        };
        update(&mut k);
        self.known.insert(txn_id.into(), k);
    }

    /// The coordinator handed `txn_id` this producer id and epoch. An older epoch of the same producer
    /// id (a late answer) does not move it back.
    pub fn learn(&self, txn_id: &str, producer_id: i64, epoch: i16) {
        if producer_id < 0 {
            return;
        }
        self.upsert(txn_id, |k| {
            if k.producer_id != producer_id || epoch >= k.epoch {
                k.producer_id = producer_id;
                k.epoch = epoch;
            }
        });
    }

    pub fn current(&self, txn_id: &str) -> Option<(i64, i16)> {
        self.known
            .get(txn_id)
            .filter(|k| k.producer_id >= 0)
            .map(|k| (k.producer_id, k.epoch))
    }

    /// `Some(current epoch)` if (producer id, epoch) is older than what the coordinator handed out last
    /// for this transactional id, by more than `tolerance` epochs.
    pub fn stale(&self, txn_id: &str, producer_id: i64, epoch: i16, tolerance: i16) -> Option<i16> {
        let (pid, current) = self.current(txn_id)?;
        (pid == producer_id && i32::from(epoch) < i32::from(current) - i32::from(tolerance))
            .then_some(current)
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Approximate bytes held (entries, keys, and the map's own slots).
    pub fn approx_bytes(&self) -> usize {
        const SLOT: usize = 2 * std::mem::size_of::<usize>() + 8;
        let known: usize = self
            .known
            .iter()
            .map(|e| e.key().len() + std::mem::size_of::<Known>() + SLOT)
            .sum();
        let open: usize = self
            .open
            .iter()
            .map(|e| e.key().len() + e.client_id.len() + std::mem::size_of::<OpenTxn>() + SLOT)
            .sum();
        known + open
    }

    /// The transaction timeout the coordinator applies to this transactional id.
    pub fn set_timeout(&self, txn_id: &str, timeout: Duration) {
        self.upsert(txn_id, |k| k.timeout = Some(timeout));
    }

    /// Whether the id's transactions are two-phase (they never time out, so never hang by timeout).
    pub fn set_two_phase(&self, txn_id: &str, two_phase: bool) {
        self.upsert(txn_id, |k| k.two_phase = two_phase);
    }

    fn two_phase(&self, txn_id: &str) -> bool {
        self.known.get(txn_id).is_some_and(|k| k.two_phase)
    }

    pub fn timeout(&self, txn_id: &str) -> Duration {
        self.known
            .get(txn_id)
            .and_then(|k| k.timeout)
            .unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Opens a transaction the broker confirmed (a write or registration it accepted). At the bound the
    /// oldest open transaction is evicted (and returned, so its gauges can follow).
    pub fn begin(&self, txn_id: &str, client_id: &str, now: Instant) -> Begun {
        let mut begun = Begun {
            opened: false,
            evicted: None,
        };
        if !Self::trackable(txn_id) || self.open.contains_key(txn_id) {
            return begun;
        }
        if self.open.len() >= self.max {
            let oldest = self
                .open
                .iter()
                .min_by_key(|e| e.started)
                .map(|e| e.key().clone());
            if let Some((id, txn)) = oldest.and_then(|k| self.open.remove(&k)) {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                begun.evicted = Some((id.into(), txn));
            }
        }
        self.open.insert(
            txn_id.into(),
            OpenTxn {
                started: now,
                client_id: crate::metrics::bounded_label(client_id).to_string(),
                hanging: false,
            },
        );
        begun.opened = true;
        begun
    }
    pub fn end(&self, txn_id: &str, now: Instant) -> Option<EndedTxn> {
        self.open.remove(txn_id).map(|(_, o)| EndedTxn {
            duration: now.saturating_duration_since(o.started),
            client_id: o.client_id,
            was_hanging: o.hanging,
        })
    }

    /// Transactions open longer than their timeout plus `margin` and not yet flagged: flags and returns
    /// them (transactional id, client id, how long open). Two-phase transactions have no timeout: an
    /// external coordinator decides when they end.
    pub fn newly_hanging(&self, margin: Duration, now: Instant) -> Vec<(String, String, Duration)> {
        let mut out = Vec::new();
        for mut e in self.open.iter_mut() {
            let open_for = now.saturating_duration_since(e.started);
            if !e.hanging && !self.two_phase(e.key()) && open_for > self.timeout(e.key()) + margin {
                e.hanging = true;
                out.push((e.key().to_string(), e.client_id.clone(), open_for));
            }
        }
        out
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_transactions_and_the_watchdog() {
        let t = TxnTracker::new(10);
        let t0 = Instant::now();
        t.set_timeout("a", Duration::from_secs(10));
        assert!(t.begin("a", "c1", t0).opened);
        assert!(!t.begin("a", "c1", t0).opened, "already open");
        assert!(t.begin("b", "c2", t0).opened);
        let later = t0 + Duration::from_secs(15);
        // a: 15 s > 10 s + 2 s margin; b: default 60 s timeout, not yet
        // c: two-phase commit, open for ever by design
        t.set_timeout("c", Duration::from_secs(1));
        t.set_two_phase("c", true);
        assert!(t.begin("c", "c3", t0).opened);
        let hanging = t.newly_hanging(Duration::from_secs(2), later);
        assert_eq!(hanging.len(), 1);
        assert_eq!(hanging[0].0, "a");
        let much_later = t0 + Duration::from_secs(86_400);
        let hanging = t.newly_hanging(Duration::from_secs(2), much_later);
        assert_eq!(hanging.len(), 1, "b only: {hanging:?}");
        assert_eq!(hanging[0].0, "b");
        assert!(
            t.newly_hanging(Duration::from_secs(2), later).is_empty(),
            "flagged once"
        );
        let ended = t.end("a", later).unwrap();
        assert!(ended.was_hanging);
        assert_eq!(ended.duration, Duration::from_secs(15));
        assert!(t.end("a", later).is_none());
        assert_eq!(t.open_count(), 2, "b and c");
    }

    #[test]
    fn epochs_move_forward_and_new_ids_replace() {
        let t = TxnTracker::new(10);
        t.learn("tx", 5, 3);
        t.learn("tx", 5, 2);
        assert_eq!(t.current("tx"), Some((5, 3)));
        assert_eq!(t.stale("tx", 5, 2, 0), Some(3));
        assert_eq!(
            t.stale("tx", 5, 2, 1),
            None,
            "EndTxn v5 retry with the previous epoch"
        );
        assert_eq!(t.stale("tx", 5, 3, 0), None);
        assert_eq!(
            t.stale("tx", 4, 0, 0),
            None,
            "another producer id: not ours to judge"
        );
        t.learn("tx", 8, 0);
        assert_eq!(t.current("tx"), Some((8, 0)));
        assert_eq!(t.stale("other", 5, 0, 0), None);
    }

    /// Past the bound, the oldest open transaction and the least recently used ids go, counted; a new
    /// transaction is always tracked (20,000 refused or abandoned ones must not blind the tracker).
    #[test]
    fn tables_are_bounded_and_evictions_counted() {
        let t = TxnTracker::new(16);
        let t0 = Instant::now();
        for i in 0..100 {
            let id = format!("fake-{i}");
            t.learn(&id, i, 0);
            let begun = t.begin(&id, "c", t0 + Duration::from_millis(i as u64));
            assert!(begun.opened);
            if i >= 16 {
                let (gone, _) = begun.evicted.expect("oldest evicted");
                assert_eq!(gone, format!("fake-{}", i - 16));
            }
        }
        assert!(t.len() <= 16);
        assert_eq!(t.open_count(), 16);
        assert!(t.evictions() >= 84 + 84, "{}", t.evictions());
        assert!(t.begin("real", "c", t0 + Duration::from_secs(1)).opened);
        assert!(t.end("real", t0 + Duration::from_secs(2)).is_some());
        // ids too long to be worth their bytes are not tracked
        let long = "x".repeat(MAX_TRANSACTIONAL_ID_BYTES + 1);
        t.learn(&long, 1, 1);
        assert_eq!(t.current(&long), None);
        assert!(!t.begin(&long, "c", t0).opened);
    }
}

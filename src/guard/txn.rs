//! Transaction tracker: transactional.id -> (producer id, epoch), learned from InitProducerId answers and
//! from EndTxn v5+ answers (transactions v2 bump the epoch on every commit and abort, and hand out a new
//! producer id when the epoch runs out).

use dashmap::DashMap;
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

pub struct TxnTracker {
    map: DashMap<Box<str>, (i64, i16)>,
    timeouts: DashMap<Box<str>, Duration>,
    open: DashMap<Box<str>, OpenTxn>,
    max: usize,
}

impl TxnTracker {
    pub fn new(max: usize) -> Self {
        TxnTracker {
            map: DashMap::new(),
            timeouts: DashMap::new(),
            open: DashMap::new(),
            max: max.max(1),
        }
    }

    /// Records what the coordinator answered for `txn_id`. A different producer id replaces the old one
    /// (a new id after epoch exhaustion); for the same id the epoch only moves forward.
    pub fn learn(&self, txn_id: &str, producer_id: i64, epoch: i16) {
        if producer_id < 0 {
            return;
        }
        if let Some(mut e) = self.map.get_mut(txn_id) {
            if e.0 != producer_id || epoch >= e.1 {
                *e = (producer_id, epoch);
            }
            return;
        }
        if self.map.len() >= self.max {
            // Coarse but bounded: forgetting only means a zombie is left for the broker to fence.
            self.map.clear();
        }
        self.map.insert(txn_id.into(), (producer_id, epoch));
    }

    pub fn current(&self, txn_id: &str) -> Option<(i64, i16)> {
        self.map.get(txn_id).map(|e| *e)
    }

    /// The current epoch if (`producer_id`, `epoch`) is older than what the coordinator handed out for
    /// `txn_id` by more than `tolerance` (EndTxn v5 retries may carry the previous epoch: tolerance 1).
    pub fn stale(&self, txn_id: &str, producer_id: i64, epoch: i16, tolerance: i16) -> Option<i16> {
        let (pid, current) = self.current(txn_id)?;
        (pid == producer_id && i32::from(epoch) < i32::from(current) - i32::from(tolerance))
            .then_some(current)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The transaction timeout the producer asked for in InitProducerId.
    pub fn set_timeout(&self, txn_id: &str, timeout: Duration) {
        if self.timeouts.len() >= self.max {
            self.timeouts.clear();
        }
        self.timeouts.insert(txn_id.into(), timeout);
    }

    pub fn timeout(&self, txn_id: &str) -> Duration {
        self.timeouts.get(txn_id).map_or(DEFAULT_TIMEOUT, |t| *t)
    }

    /// A transaction write or registration: opens the transaction if it is not open. Returns true if it
    /// was opened now.
    pub fn begin(&self, txn_id: &str, client_id: &str, now: Instant) -> bool {
        if self.open.contains_key(txn_id) {
            return false;
        }
        if self.open.len() >= self.max {
            return false;
        }
        self.open.insert(
            txn_id.into(),
            OpenTxn {
                started: now,
                client_id: client_id.to_string(),
                hanging: false,
            },
        );
        true
    }

    /// EndTxn answered (or a new InitProducerId aborted it): closes the transaction if it was open.
    pub fn end(&self, txn_id: &str, now: Instant) -> Option<EndedTxn> {
        self.open.remove(txn_id).map(|(_, o)| EndedTxn {
            duration: now.saturating_duration_since(o.started),
            client_id: o.client_id,
            was_hanging: o.hanging,
        })
    }

    /// Transactions open longer than their timeout plus `margin` and not yet flagged: flags and returns
    /// them (transactional id, client id, how long open).
    pub fn newly_hanging(&self, margin: Duration, now: Instant) -> Vec<(String, String, Duration)> {
        let mut out = Vec::new();
        for mut e in self.open.iter_mut() {
            let open_for = now.saturating_duration_since(e.started);
            if !e.hanging && open_for > self.timeout(e.key()) + margin {
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
        self.map.is_empty()
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
        assert!(t.begin("a", "c1", t0));
        assert!(!t.begin("a", "c1", t0), "already open");
        assert!(t.begin("b", "c2", t0));
        let later = t0 + Duration::from_secs(15);
        // a: 15 s > 10 s + 2 s margin; b: default 60 s timeout, not yet
        let hanging = t.newly_hanging(Duration::from_secs(2), later);
        assert_eq!(hanging.len(), 1);
        assert_eq!(hanging[0].0, "a");
        assert!(
            t.newly_hanging(Duration::from_secs(2), later).is_empty(),
            "flagged once"
        );
        let ended = t.end("a", later).unwrap();
        assert!(ended.was_hanging);
        assert_eq!(ended.duration, Duration::from_secs(15));
        assert!(t.end("a", later).is_none());
        assert_eq!(t.open_count(), 1);
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
}

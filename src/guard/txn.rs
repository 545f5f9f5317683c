//! Transaction tracker: transactional.id -> (producer id, epoch), learned from InitProducerId answers and
//! from EndTxn v5+ answers (transactions v2 bump the epoch on every commit and abort, and hand out a new
//! producer id when the epoch runs out).

use dashmap::DashMap;

pub struct TxnTracker {
    map: DashMap<Box<str>, (i64, i16)>,
    max: usize,
}

impl TxnTracker {
    pub fn new(max: usize) -> Self {
        TxnTracker {
            map: DashMap::new(),
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

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! One slab slot of the producer-state store: the broker's view of a (producer, topic, partition)
//! and the batches forwarded and not yet answered, packed to stay within the per-entry budget.

use crate::eos::{self, Batch, PartitionState, Verdict};

/// At most this many batches per producer and partition are tracked as in flight (a well-behaved
/// producer has at most 5); beyond that the oldest is forgotten, which only weakens retry detection.
pub(super) const MAX_IN_FLIGHT: usize = 8;

/// Batches forwarded and not answered yet, oldest first.
#[derive(Debug)]
pub(super) struct InFlight {
    len: u8,
    batches: [Batch; MAX_IN_FLIGHT],
}

impl InFlight {
    fn one(batch: Batch) -> Box<InFlight> {
        Box::new(InFlight {
            len: 1,
            batches: [batch; MAX_IN_FLIGHT],
        })
    }

    fn as_slice(&self) -> &[Batch] {
        &self.batches[..self.len as usize]
    }

    fn push(&mut self, batch: Batch) {
        if self.len as usize == MAX_IN_FLIGHT {
            self.batches.copy_within(1.., 0);
            self.len -= 1;
        }
        self.batches[self.len as usize] = batch;
        self.len += 1;
    }

    fn remove(&mut self, batch: Batch) {
        if let Some(i) = self.as_slice().iter().position(|b| *b == batch) {
            self.batches.copy_within(i + 1..self.len as usize, i);
            self.len -= 1;
        }
    }
}

/// Bit 63 of `Entry::stamp`: the entry holds an acknowledged state. (Kept in the time stamp rather than as
/// an `Option<PartitionState>`, which would cost 8 bytes per entry; milliseconds never reach 2^63.)
pub(super) const HAS_STATE: u64 = 1 << 63;

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) state: PartitionState,
    pub(super) in_flight: Option<Box<InFlight>>,
    /// Last use in milliseconds, and [`HAS_STATE`].
    pub(super) stamp: u64,
}

impl Entry {
    pub(super) fn new(now_ms: u64) -> Self {
        Entry {
            state: PartitionState::new(0),
            in_flight: None,
            stamp: now_ms & !HAS_STATE,
        }
    }

    pub(super) fn state(&self) -> Option<&PartitionState> {
        (self.stamp & HAS_STATE != 0).then_some(&self.state)
    }

    pub(super) fn last_used_ms(&self) -> u64 {
        self.stamp & !HAS_STATE
    }

    pub(super) fn touch(&mut self, now_ms: u64) {
        self.stamp = (self.stamp & HAS_STATE) | (now_ms & !HAS_STATE);
    }

    pub(super) fn in_flight(&self) -> &[Batch] {
        self.in_flight.as_deref().map_or(&[], InFlight::as_slice)
    }

    /// The verdict on `batch`, tracking it as in flight if it is to be forwarded.
    pub(super) fn decide(&mut self, batch: Batch, now_ms: u64) -> Verdict {
        self.touch(now_ms);
        let verdict = eos::check(self.state(), self.in_flight(), batch);
        if verdict.forwards() {
            self.track(batch);
        }
        verdict
    }

    pub(super) fn track(&mut self, batch: Batch) {
        match &mut self.in_flight {
            Some(list) => list.push(batch),
            None => self.in_flight = Some(InFlight::one(batch)),
        }
    }

    /// Takes `batch` out of flight, and frees the list once it is empty (most of the time nothing is in
    /// flight, and a million idle entries should not each keep a heap allocation).
    pub(super) fn untrack(&mut self, batch: Batch) {
        if let Some(list) = &mut self.in_flight {
            list.remove(batch);
            if list.len == 0 {
                self.in_flight = None;
            }
        }
    }
}

//! Pure producer-state logic: what the broker keeps per (producer id, partition), and the verdict for an
//! incoming batch. No I/O, no clocks: the caller supplies everything, so the rules are testable alone.
//!
//! The broker keeps, per producer and partition, the epoch and the last [`WINDOW`] acknowledged batches
//! (cleared whenever the epoch changes), and decides in this order: duplicate, then epoch, then sequence.
//! [`check`] follows the same order, with one addition the broker does not need: batches the proxy has
//! forwarded but whose response has not come back yet ("in flight"), so that pipelined batches (up to five
//! per connection) are in order, and a retry of a batch still in flight is recognised.
//!
//! State moves only on what the broker confirmed: [`PartitionState::acknowledge`] is called with the
//! offsets of a successful produce response; a refused batch is never recorded.

#[cfg(test)]
mod model;

/// Batches remembered per producer and partition, like the broker's NUM_BATCHES_TO_RETAIN.
pub const WINDOW: usize = 5;

/// `seq + delta`, wrapping past i32::MAX to 0 as the broker does (DefaultRecordBatch.incrementSequence).
pub fn seq_add(seq: i32, delta: i32) -> i32 {
    let s = i64::from(seq) + i64::from(delta);
    if s > i64::from(i32::MAX) {
        (s - i64::from(i32::MAX) - 1) as i32
    } else {
        s as i32
    }
}

/// The sequence that must follow `last`.
pub fn next_seq(last: i32) -> i32 {
    seq_add(last, 1)
}

/// Whether sequence `seq` comes after `last` (modulo the 2^31 sequence space, half of it ahead).
pub fn is_ahead(seq: i32, last: i32) -> bool {
    let d = (i64::from(seq) - i64::from(last)).rem_euclid(1 << 31);
    d != 0 && d < (1 << 30)
}

/// The producer fields of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Batch {
    pub epoch: i16,
    pub first_seq: i32,
    pub last_seq: i32,
}

/// An acknowledged batch, as remembered for answering its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub first_seq: i32,
    pub last_seq: i32,
    pub first_offset: i64,
    /// What a duplicate is answered with as log_append_time: the original's append time on LogAppendTime
    /// topics, the batch's max timestamp otherwise (what the broker answers for duplicates).
    pub timestamp: i64,
    /// Whether the original was acknowledged with acks=all. A retry asking for acks=all is only answered
    /// locally if the original had it too.
    pub acks_all: bool,
}

impl Acked {
    /// A batch the broker wrote at `first_offset`: its answer's `log_append_time` (-1 on CreateTime
    /// topics) decides the timestamp a duplicate is answered with, else the batch's `max_timestamp`.
    pub fn written(
        batch: Batch,
        first_offset: i64,
        log_append_time: i64,
        max_timestamp: i64,
        acks_all: bool,
    ) -> Acked {
        Acked {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            first_offset,
            timestamp: if log_append_time >= 0 {
                log_append_time
            } else {
                max_timestamp
            },
            acks_all,
        }
    }
}

/// One acknowledged batch as stored, 12 bytes. Its first sequence is not stored: the window is contiguous
/// (see [`PartitionState::acknowledge`]), so it follows the previous batch's last sequence. Offset and
/// timestamp are stored as differences from the previous batch (the oldest's are in the state itself),
/// which keeps them exact: a difference that does not fit restarts the window instead (see `push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    last_seq: i32,
    /// first offset minus the previous batch's first offset (0 for the oldest).
    offset_step: u32,
    /// timestamp minus the previous batch's timestamp (0 for the oldest).
    timestamp_step: i32,
}

const EMPTY: Slot = Slot {
    last_seq: 0,
    offset_step: 0,
    timestamp_step: 0,
};

/// The broker's view of one producer on one partition: 88 bytes, most of the memory the proxy spends
/// per tracked producer-partition (issue #6 target: 200 bytes all in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// First offset and timestamp of the oldest batch in the window.
    base_offset: i64,
    base_timestamp: i64,
    /// First sequence of the oldest batch in the window.
    base_seq: i32,
    pub epoch: i16,
    /// Batches acknowledged since this state was created, capped at WINDOW. Until it reaches WINDOW the
    /// broker may remember older batches of this epoch that the proxy never saw (the producer was new
    /// to the proxy, or its state was evicted or lost in a restart), so a batch that does not follow is
    /// not called out of order: it may be a retry the broker will answer itself.
    learned: u8,
    len: u8,
    /// Bit i: the i-th batch, oldest first, was acknowledged with acks=all.
    acks_all: u8,
    /// Oldest first.
    slots: [Slot; WINDOW],
}

impl PartitionState {
    pub fn new(epoch: i16) -> Self {
        PartitionState {
            base_offset: 0,
            base_timestamp: 0,
            base_seq: 0,
            epoch,
            learned: 0,
            len: 0,
            acks_all: 0,
            slots: [EMPTY; WINDOW],
        }
    }

    /// A state known to be complete from the start: the producer was handed this epoch by an
    /// InitProducerId answer the proxy saw, so the broker remembers nothing the proxy does not.
    pub fn new_complete(epoch: i16) -> Self {
        let mut s = PartitionState::new(epoch);
        s.learned = WINDOW as u8;
        s
    }

    /// Acknowledged batches of the current epoch, oldest first.
    pub fn window(&self) -> impl Iterator<Item = Acked> + '_ {
        let mut prev: Option<Acked> = None;
        self.slots[..self.len as usize]
            .iter()
            .enumerate()
            .map(move |(i, slot)| {
                let acked = match prev {
                    None => Acked {
                        first_seq: self.base_seq,
                        last_seq: slot.last_seq,
                        first_offset: self.base_offset,
                        timestamp: self.base_timestamp,
                        acks_all: false,
                    },
                    Some(p) => Acked {
                        first_seq: next_seq(p.last_seq),
                        last_seq: slot.last_seq,
                        first_offset: p.first_offset.wrapping_add(i64::from(slot.offset_step)),
                        timestamp: p.timestamp.wrapping_add(i64::from(slot.timestamp_step)),
                        acks_all: false,
                    },
                };
                prev = Some(acked);
                Acked {
                    acks_all: self.acks_all & (1 << i) != 0,
                    ..acked
                }
            })
    }

    pub fn last(&self) -> Option<Acked> {
        self.window().last()
    }

    /// Whether the window holds everything the broker's does (see `learned`).
    pub fn is_complete(&self) -> bool {
        self.learned as usize >= WINDOW
    }

    /// Records a batch the broker accepted. An epoch change clears the window, as on the broker. A batch
    /// behind the last known one (the broker answered a retry of an old batch as a duplicate) teaches
    /// nothing new and is not recorded, so the window stays in sequence order and contiguous.
    pub fn acknowledge(&mut self, epoch: i16, acked: Acked) {
        if epoch != self.epoch {
            let learned = self.learned;
            *self = PartitionState::new(epoch);
            // An epoch change clears the broker's window too: from here on we know all of it.
            self.learned = if learned as usize >= WINDOW || acked.first_seq == 0 {
                WINDOW as u8
            } else {
                0
            };
        } else if let Some(last) = self.last() {
            if !is_ahead(acked.first_seq, last.last_seq) {
                return;
            }
            if acked.first_seq != next_seq(last.last_seq) {
                // A jump: the broker acknowledged batches in between that the proxy never saw (its state
                // was lost). Keep only what is contiguous, as the broker's window would.
                self.restart();
            } else if !self.push(acked, last) {
                // Offset or timestamp too far from the previous batch to store as a difference (more
                // than 2^32 records written in between, or client timestamps ~25 days apart): start the
                // window again from this batch. Knowing less than the broker only means more batches
                // are left for the broker to judge, never a wrong answer.
                self.restart();
            } else {
                self.learned = self.learned.saturating_add(1).min(WINDOW as u8);
                return;
            }
        }
        self.learned = self.learned.saturating_add(1).min(WINDOW as u8);
        self.len = 1;
        self.base_seq = acked.first_seq;
        self.base_offset = acked.first_offset;
        self.base_timestamp = acked.timestamp;
        self.slots[0] = Slot {
            last_seq: acked.last_seq,
            offset_step: 0,
            timestamp_step: 0,
        };
        self.acks_all = u8::from(acked.acks_all);
    }

    /// An empty window at the same epoch that knows nothing the broker knows.
    fn restart(&mut self) {
        let epoch = self.epoch;
        *self = PartitionState::new(epoch);
    }

    /// Appends `acked`, which follows `last`, dropping the oldest batch when the window is full.
    /// False (and nothing changed) if its offset or timestamp cannot be stored as a difference.
    fn push(&mut self, acked: Acked, last: Acked) -> bool {
        let offset_step =
            u32::try_from(i128::from(acked.first_offset) - i128::from(last.first_offset));
        let timestamp_step =
            i32::try_from(i128::from(acked.timestamp) - i128::from(last.timestamp));
        let (Ok(offset_step), Ok(timestamp_step)) = (offset_step, timestamp_step) else {
            return false;
        };
        if self.len as usize == WINDOW {
            // The second oldest becomes the oldest: its absolute values move into the base.
            let second = self.slots[1];
            self.base_seq = next_seq(self.slots[0].last_seq);
            self.base_offset = self.base_offset.wrapping_add(i64::from(second.offset_step));
            self.base_timestamp = self
                .base_timestamp
                .wrapping_add(i64::from(second.timestamp_step));
            self.slots.copy_within(1.., 0);
            self.slots[0].offset_step = 0;
            self.slots[0].timestamp_step = 0;
            self.acks_all >>= 1;
            self.len -= 1;
        }
        let i = self.len as usize;
        self.slots[i] = Slot {
            last_seq: acked.last_seq,
            offset_step,
            timestamp_step,
        };
        if acked.acks_all {
            self.acks_all |= 1 << i;
        }
        self.len += 1;
        true
    }
}

/// What the proxy should do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No state for this producer and partition (new, evicted, or expired): the broker accepts any
    /// sequence from a producer it does not know, so forward and learn.
    Unknown,
    /// The next batch in sequence, or a legitimate epoch bump starting at sequence 0 (idempotent
    /// producers bump locally without InitProducerId; transactions v2 bump on every EndTxn): forward.
    InOrder,
    /// Same epoch and exactly the same first and last sequence as an acknowledged batch in the window:
    /// answer with the original's offset and timestamp, without forwarding.
    Duplicate(Acked),
    /// Same epoch and sequences as a batch forwarded but not answered yet: wait for its outcome.
    DuplicateInFlight,
    /// Epoch below the known one (a zombie): the broker would answer INVALID_PRODUCER_EPOCH (47).
    StaleEpoch { current: i16 },
    /// Epoch above the known one but not starting at sequence 0: the broker would answer
    /// OUT_OF_ORDER_SEQUENCE_NUMBER (45).
    EpochBumpNotAtZero { current: i16 },
    /// Same epoch, and the first sequence does not follow the last acknowledged (or in-flight) batch: a gap
    /// or a reorder; the broker would answer OUT_OF_ORDER_SEQUENCE_NUMBER (45).
    OutOfOrder { expected: i32, received: i32 },
}

impl Verdict {
    /// Whether the batch goes to the broker as it is.
    pub fn forwards(&self) -> bool {
        matches!(self, Verdict::Unknown | Verdict::InOrder)
    }
}

/// Decides what to do with `batch`, given the acknowledged state (if any) and the batches of the same
/// producer and partition still in flight. See [`Verdict`] for every outcome.
pub fn check(state: Option<&PartitionState>, in_flight: &[Batch], batch: Batch) -> Verdict {
    if in_flight.contains(&batch) {
        return Verdict::DuplicateInFlight;
    }
    let follows_in_flight = || {
        in_flight
            .iter()
            .any(|f| f.epoch == batch.epoch && next_seq(f.last_seq) == batch.first_seq)
    };
    let Some(state) = state else {
        return Verdict::Unknown;
    };
    if batch.epoch == state.epoch {
        if let Some(acked) = state
            .window()
            .find(|a| a.first_seq == batch.first_seq && a.last_seq == batch.last_seq)
        {
            return Verdict::Duplicate(acked);
        }
    }
    if batch.epoch < state.epoch {
        return Verdict::StaleEpoch {
            current: state.epoch,
        };
    }
    if batch.epoch > state.epoch {
        return if batch.first_seq == 0 || follows_in_flight() {
            Verdict::InOrder
        } else {
            Verdict::EpochBumpNotAtZero {
                current: state.epoch,
            }
        };
    }
    // Same epoch. An empty window (e.g. after a transactions-v2 marker bumped the epoch) means lastSeq -1.
    let expected = state.last().map_or(0, |a| next_seq(a.last_seq));
    if batch.first_seq == expected || follows_in_flight() {
        return Verdict::InOrder;
    }
    if !state.is_complete() {
        // The broker may remember batches the proxy never saw, so this may be a retry it will answer
        // itself: let the broker decide (its 45, if any, is audited from the response).
        return Verdict::Unknown;
    }
    let expected = in_flight
        .iter()
        .filter(|f| f.epoch == batch.epoch)
        .map(|f| next_seq(f.last_seq))
        .next_back()
        .unwrap_or(expected);
    Verdict::OutOfOrder {
        expected,
        received: batch.first_seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(epoch: i16, first: i32, last: i32) -> Batch {
        Batch {
            epoch,
            first_seq: first,
            last_seq: last,
        }
    }

    fn acked(first: i32, last: i32, offset: i64) -> Acked {
        Acked {
            first_seq: first,
            last_seq: last,
            first_offset: offset,
            timestamp: 7,
            acks_all: true,
        }
    }

    fn state(epoch: i16, batches: &[(i32, i32)]) -> PartitionState {
        let mut s = PartitionState::new(epoch);
        s.learned = WINDOW as u8; // a window known to be complete
        for (i, (f, l)) in batches.iter().enumerate() {
            s.acknowledge(epoch, acked(*f, *l, i as i64 * 100));
        }
        s
    }

    #[test]
    fn wraps_like_the_broker() {
        assert_eq!(seq_add(i32::MAX, 1), 0);
        assert_eq!(seq_add(i32::MAX - 1, 3), 1);
        assert_eq!(next_seq(5), 6);
    }

    #[test]
    fn every_outcome() {
        let s = state(2, &[(0, 9), (10, 19)]);
        assert_eq!(check(None, &[], b(0, 55, 60)), Verdict::Unknown);
        assert_eq!(check(Some(&s), &[], b(2, 20, 29)), Verdict::InOrder);
        assert_eq!(
            check(Some(&s), &[], b(2, 10, 19)),
            Verdict::Duplicate(acked(10, 19, 100))
        );
        // overlap is not a duplicate
        assert_eq!(
            check(Some(&s), &[], b(2, 10, 15)),
            Verdict::OutOfOrder {
                expected: 20,
                received: 10
            }
        );
        assert_eq!(
            check(Some(&s), &[], b(1, 20, 29)),
            Verdict::StaleEpoch { current: 2 }
        );
        assert_eq!(check(Some(&s), &[], b(3, 0, 4)), Verdict::InOrder);
        assert_eq!(
            check(Some(&s), &[], b(9, 0, 4)),
            Verdict::InOrder,
            "any higher epoch at 0"
        );
        assert_eq!(
            check(Some(&s), &[], b(3, 20, 29)),
            Verdict::EpochBumpNotAtZero { current: 2 }
        );
        assert_eq!(
            check(Some(&s), &[], b(2, 25, 29)),
            Verdict::OutOfOrder {
                expected: 20,
                received: 25
            }
        );
        // empty window at the same epoch: must start at 0
        let empty = PartitionState::new(4);
        assert_eq!(check(Some(&empty), &[], b(4, 0, 0)), Verdict::InOrder);
        let mut empty = empty;
        empty.learned = WINDOW as u8;
        assert_eq!(
            check(Some(&empty), &[], b(4, 3, 3)),
            Verdict::OutOfOrder {
                expected: 0,
                received: 3
            }
        );
    }

    #[test]
    fn in_flight_batches() {
        let s = state(0, &[(0, 9)]);
        let fl = [b(0, 10, 19), b(0, 20, 29)];
        assert_eq!(
            check(Some(&s), &fl, b(0, 20, 29)),
            Verdict::DuplicateInFlight
        );
        assert_eq!(
            check(Some(&s), &fl, b(0, 30, 39)),
            Verdict::InOrder,
            "pipelined"
        );
        assert_eq!(
            check(Some(&s), &fl, b(0, 45, 49)),
            Verdict::OutOfOrder {
                expected: 30,
                received: 45
            }
        );
        // pipelined right after an epoch bump that is still in flight
        let bump = [b(1, 0, 4)];
        assert_eq!(check(Some(&s), &bump, b(1, 5, 9)), Verdict::InOrder);
        // unknown producer with a batch in flight: still pass and learn
        assert_eq!(check(None, &fl, b(0, 30, 39)), Verdict::Unknown);
    }

    #[test]
    fn a_partial_window_lets_the_broker_judge_gaps() {
        // Learned after the state was lost: the broker may hold batches we never saw.
        let mut s = PartitionState::new(0);
        s.acknowledge(0, acked(40, 49, 400));
        assert!(!s.is_complete());
        assert_eq!(check(Some(&s), &[], b(0, 30, 39)), Verdict::Unknown);
        assert_eq!(check(Some(&s), &[], b(0, 70, 79)), Verdict::Unknown);
        assert_eq!(
            check(Some(&s), &[], b(0, 40, 49)),
            Verdict::Duplicate(acked(40, 49, 400))
        );
        // an older batch answered by the broker as a duplicate teaches nothing and keeps the order
        s.acknowledge(0, acked(30, 39, 300));
        assert_eq!(s.last().map(|a| a.first_seq), Some(40));
        // a jump (batches the proxy never saw in between) forgets what came before it
        let mut j = s.clone();
        j.acknowledge(0, acked(60, 69, 600));
        assert_eq!(
            j.window().map(|a| a.first_seq).collect::<Vec<_>>(),
            vec![60]
        );
        for i in 5..9 {
            s.acknowledge(0, acked(i * 10, i * 10 + 9, i64::from(i) * 100));
        }
        assert!(s.is_complete());
        assert_eq!(
            check(Some(&s), &[], b(0, 99, 99)),
            Verdict::OutOfOrder {
                expected: 90,
                received: 99
            }
        );
        // a new epoch starting at 0 clears the broker's window too: complete at once
        let mut s = PartitionState::new(0);
        s.acknowledge(1, acked(0, 4, 500));
        assert!(s.is_complete());
    }

    #[test]
    fn the_compact_window_is_exact_and_small() {
        assert_eq!(std::mem::size_of::<PartitionState>(), 88);
        // Offsets and timestamps far apart but within what a difference can hold come back exact,
        // also across the oldest batch dropping out of a full window.
        let mut s = PartitionState::new(0);
        let mut want = Vec::new();
        for i in 0..9i32 {
            let a = Acked {
                first_seq: i * 10,
                last_seq: i * 10 + 9,
                first_offset: (1 << 40) + i64::from(i) * i64::from(u32::MAX),
                timestamp: 1_700_000_000_000 + i64::from(i % 2) * i64::from(i32::MAX),
                acks_all: i % 3 != 0,
            };
            s.acknowledge(0, a);
            want.push(a);
        }
        assert_eq!(s.window().collect::<Vec<_>>(), want[4..].to_vec());
        assert!(s.is_complete());
    }

    #[test]
    fn a_difference_too_large_to_store_restarts_the_window() {
        let mut s = state(0, &[(0, 9), (10, 19)]);
        assert!(s.is_complete());
        // 2^32 records by other producers between two batches of this one
        let far = Acked {
            first_offset: 100 + (1 << 32),
            ..acked(20, 29, 0)
        };
        s.acknowledge(0, far);
        assert_eq!(s.window().collect::<Vec<_>>(), vec![far]);
        assert!(!s.is_complete(), "knows less than the broker now");
        // a retry of the batch before it is left for the broker to answer
        assert_eq!(check(Some(&s), &[], b(0, 10, 19)), Verdict::Unknown);
        assert_eq!(check(Some(&s), &[], b(0, 20, 29)), Verdict::Duplicate(far));
        // a timestamp more than i32::MAX ms later
        let late = Acked {
            timestamp: far.timestamp + i64::from(i32::MAX) + 1,
            first_offset: far.first_offset + 10,
            ..acked(30, 39, 0)
        };
        s.acknowledge(0, late);
        assert_eq!(s.window().collect::<Vec<_>>(), vec![late]);
    }

    #[test]
    fn window_keeps_the_last_five_and_clears_on_epoch_change() {
        let mut s = PartitionState::new(0);
        for i in 0..8 {
            s.acknowledge(0, acked(i * 10, i * 10 + 9, i64::from(i)));
        }
        let firsts: Vec<i32> = s.window().map(|a| a.first_seq).collect();
        assert_eq!(firsts, vec![30, 40, 50, 60, 70]);
        assert_eq!(
            check(Some(&s), &[], b(0, 20, 29)),
            Verdict::OutOfOrder {
                expected: 80,
                received: 20
            }
        );
        s.acknowledge(1, acked(0, 0, 99));
        assert_eq!(s.window().count(), 1);
        assert_eq!(s.epoch, 1);
    }
}

//! A deliberately naive reference model of the broker's producer-state rules (unbounded history, rules
//! read off eos-semantics.md section 2), and property tests that drive [`super::check`] against it with
//! random retries, reorders, gaps, epoch bumps, zombies, state loss and sequence wrap-around.

use super::*;
use proptest::prelude::*;

#[derive(Default)]
struct Model {
    /// Every acknowledged batch, all epochs, in order: (epoch, first, last, offset).
    history: Vec<(i16, i32, i32, i64)>,
    /// False until the broker has accepted a first batch from this producer.
    known: bool,
}

impl Model {
    fn verdict(&self, b: Batch) -> Verdict {
        if !self.known {
            return Verdict::Unknown;
        }
        let current = self.history.last().map(|h| h.0).unwrap_or(b.epoch);
        let recent: Vec<_> = self
            .history
            .iter()
            .rev()
            .take_while(|h| h.0 == current)
            .take(WINDOW)
            .collect();
        if b.epoch == current {
            if let Some(h) = recent
                .iter()
                .find(|h| h.1 == b.first_seq && h.2 == b.last_seq)
            {
                return Verdict::Duplicate(Acked {
                    first_seq: h.1,
                    last_seq: h.2,
                    first_offset: h.3,
                    timestamp: h.3 * 10,
                    acks_all: true,
                });
            }
        }
        if b.epoch < current {
            return Verdict::StaleEpoch { current };
        }
        if b.epoch > current {
            return if b.first_seq == 0 {
                Verdict::InOrder
            } else {
                Verdict::EpochBumpNotAtZero { current }
            };
        }
        let expected = recent
            .first()
            .map_or(0, |h| if h.2 == i32::MAX { 0 } else { h.2 + 1 });
        if b.first_seq == expected {
            Verdict::InOrder
        } else {
            Verdict::OutOfOrder {
                expected,
                received: b.first_seq,
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// The next batch of `n` records at the producer's current epoch and sequence.
    Next(i32),
    /// A retry of the k-th most recently sent batch (byte-identical: same epoch and sequences).
    Retry(usize),
    /// A batch that skips `gap` sequences.
    Gap(i32, i32),
    /// An epoch bump by `by` with sequences reset to 0 (idempotent local bump, or TV2 EndTxn).
    Bump(i16),
    /// A zombie: an older epoch writing its next sequence.
    Zombie(i32),
    /// The proxy lost its state (eviction, idle expiry, restart); the broker did not.
    Forget,
    /// Other producers write `n` records to the partition (moves offsets, and timestamps with them,
    /// sometimes further than the compact window can store as a difference).
    Traffic(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..20i32).prop_map(Op::Next),
        3 => (0..8usize).prop_map(Op::Retry),
        1 => (1..5i32, 1..30i32).prop_map(|(n, g)| Op::Gap(n, g)),
        1 => (1..3i16).prop_map(Op::Bump),
        1 => (1..5i32).prop_map(Op::Zombie),
        1 => Just(Op::Forget),
        1 => prop_oneof![1..1_000i64, (1i64 << 28)..(1i64 << 34)].prop_map(Op::Traffic),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn check_matches_the_reference_model(
        start_near_wrap in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut state: Option<PartitionState> = None;
        let mut model = Model::default();
        let mut epoch: i16 = 3;
        let mut next: i32 = if start_near_wrap { i32::MAX - 25 } else { 0 };
        let mut sent: Vec<Batch> = Vec::new();
        let mut offset: i64 = 0;
        for op in ops {
            let batch = match op {
                Op::Next(n) => Batch { epoch, first_seq: next, last_seq: seq_add(next, n - 1) },
                Op::Retry(k) => match sent.iter().rev().nth(k) {
                    Some(b) => *b,
                    None => continue,
                },
                Op::Gap(n, g) => {
                    let first = seq_add(next, g);
                    Batch { epoch, first_seq: first, last_seq: seq_add(first, n - 1) }
                }
                Op::Bump(by) => {
                    epoch = epoch.saturating_add(by);
                    next = 0;
                    Batch { epoch, first_seq: 0, last_seq: 0 }
                }
                Op::Zombie(n) => Batch { epoch: epoch - 1, first_seq: next, last_seq: seq_add(next, n - 1) },
                Op::Traffic(n) => {
                    offset += n;
                    continue;
                }
                Op::Forget => {
                    // Only the proxy forgets; the broker keeps its state.
                    state = None;
                    continue;
                }
            };
            let complete = state.as_ref().is_some_and(|s| s.is_complete());
            let got = check(state.as_ref(), &[], batch);
            let want = model.verdict(batch);
            // With a complete window the proxy says exactly what the broker would; with a partial one
            // (new to the proxy, or forgotten) it may also pass a batch on for the broker to judge.
            // Without state the proxy passes everything on (and never refuses for lack of state). With a
            // complete window it decides exactly like the broker; with a partial one it may also pass
            // on what the broker will answer itself (a duplicate) or refuse (a gap).
            let acceptable = match &state {
                None => got == Verdict::Unknown,
                Some(_) => got == want
                    || (got.forwards() && want.forwards())
                    || (!complete && got.forwards()
                        && matches!(want, Verdict::Duplicate(_) | Verdict::OutOfOrder { .. })),
            };
            prop_assert!(acceptable, "batch {:?}: proxy {:?}, broker {:?} (complete: {})", batch, got, want, complete);
            sent.push(batch);
            if got.forwards() {
                // The broker answers what the proxy forwards, by its own rules; the proxy learns from
                // successful answers only.
                let acked_offset = match want {
                    Verdict::Duplicate(original) => Some(original.first_offset),
                    Verdict::InOrder | Verdict::Unknown => {
                        model.history.push((batch.epoch, batch.first_seq, batch.last_seq, offset));
                        model.known = true;
                        let o = offset;
                        offset += i64::from(batch.last_seq.wrapping_sub(batch.first_seq)).rem_euclid(1 << 31) + 1;
                        if batch.epoch == epoch {
                            next = seq_add(batch.last_seq, 1);
                        }
                        Some(o)
                    }
                    _ => None, // refused by the broker: nothing learned
                };
                if let Some(first_offset) = acked_offset {
                    let acked = Acked {
                        first_seq: batch.first_seq,
                        last_seq: batch.last_seq,
                        first_offset,
                        timestamp: first_offset * 10,
                        acks_all: true,
                    };
                    state.get_or_insert_with(|| PartitionState::new(batch.epoch)).acknowledge(batch.epoch, acked);
                }
            }
        }
    }
}

//! The store against its rules (the slab store's property test against a plain map is among them).
use super::entry::MAX_IN_FLIGHT;
use super::*;
use crate::eos;

impl ProducerStore {
    fn key_for(&self, producer_id: i64, topic: &str, partition: i32) -> Key {
        self.key(producer_id, topic, partition)
            .expect("room for the topic name")
    }
}

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
fn pages_are_bounded_and_in_producer_order() {
    let store = ProducerStore::new(1000, 60_000);
    for pid in (1..=50).rev() {
        for p in 0..(pid % 4 + 1) as i32 {
            let key = store.key_for(pid, "t", p);
            store.check_and_track(&key, b(0, 0), 0);
        }
    }
    let first = store.page(-1, 10, 2, 0);
    assert!(first.more);
    assert_eq!(
        first.producers.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let (count, listed) = &first.producers[&7];
    assert_eq!((*count, listed.len()), (4, 2), "counts all, lists two");
    let last = store.page(40, 10, 2, 0);
    assert!(!last.more);
    assert_eq!(
        last.producers.keys().copied().collect::<Vec<_>>(),
        (41..=50).collect::<Vec<_>>()
    );
}

#[test]
fn tracks_in_flight_and_learns_from_acks() {
    let s = ProducerStore::new(100, 1000);
    let k = s.key_for(7, "t", 0);
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
    let k = s.key_for(9, "t", 0);
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
    let k2 = s.key_for(10, "t", 0);
    s.check_and_track(&k2, b(0, 0), 0);
    s.acknowledge(&k2, b(0, 0), acked(0, 0, 0), 0);
    assert_eq!(s.check_and_track(&k2, b(5, 5), 1), Verdict::Unknown);
}

#[test]
fn bounded_with_lru_eviction_and_idle_expiry() {
    let s = ProducerStore::new(16, 1000);
    for pid in 0..40 {
        let k = s.key_for(pid, "t", 0);
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

#[test]
fn topic_names_are_bounded_and_numbers_never_reused() {
    // 16 entries at most, so at most 10,000 names (the floor) before unused ones are dropped.
    let s = ProducerStore::new(16, 1000);
    let first = s.key_for(1, "t-0", 0);
    for i in 0..10_000 {
        let k = s.key_for(1, &format!("t-{i}"), 0);
        s.check_and_track(&k, b(0, 0), i);
    }
    assert_eq!(s.topics.ids.len(), 10_000);
    // Full: a new name drops the names no entry uses, and gets a number never used before.
    let new = s.key_for(1, "new", 0);
    assert!(s.topics.ids.len() <= 17, "{}", s.topics.ids.len());
    assert_eq!(new.topic, TopicId(10_000));
    // A key held from before the drop still means its topic or nothing, never another one.
    assert_eq!(&*s.topic_name(first.topic), "");
    assert_ne!(s.key_for(1, "t-0", 0).topic, first.topic);

    // Every name in use: new names are refused (batches pass untracked), nothing else breaks.
    let s = ProducerStore::new(10_000, 1000);
    for i in 0..10_000 {
        let k = s.key_for(1, &format!("t-{i}"), 0);
        s.check_and_track(&k, b(0, 0), 0);
    }
    assert_eq!(s.key(1, "one-too-many", 0), None);
    assert!(s.key(1, "t-5", 0).is_some());
}

/// The slab, free list and index against a plain HashMap doing the same work: every verdict, every
/// surviving entry's state and in-flight list, and the count agree, through evictions (max 8 entries),
/// idle expiry and slots reused after both.
mod against_a_map {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Check(i64, u8, i32, i32),
        Settle(i64, u8, i32, i32),
        Ack(i64, u8, i32, i32),
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        let k = (0..12i64, 0..3u8, 0..2i32, 0..6i32);
        prop_oneof![
            4 => k.clone().prop_map(|(p, t, q, s)| Op::Check(p, t, q, s)),
            2 => k.clone().prop_map(|(p, t, q, s)| Op::Settle(p, t, q, s)),
            3 => k.prop_map(|(p, t, q, s)| Op::Ack(p, t, q, s)),
            1 => Just(Op::Expire),
        ]
    }

    type Model = HashMap<Key, (Option<PartitionState>, Vec<Batch>)>;

    fn sync(store: &ProducerStore, model: &mut Model) {
        // Evictions and expiry are the store's to decide: follow them, then compare what is left.
        let snap = store.snapshot(0);
        let live: HashMap<Key, &Snapshot> = snap.iter().map(|e| (e.key, e)).collect();
        assert_eq!(live.len(), snap.len(), "a key listed twice");
        assert_eq!(store.len(), snap.len());
        model.retain(|k, _| live.contains_key(k));
        for (k, e) in &live {
            let (state, in_flight) = model.get(k).expect("an entry the model never made");
            assert_eq!(&e.state, state, "{k:?}");
            assert_eq!(&e.in_flight, in_flight, "{k:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn slab_store_matches_a_map(ops in proptest::collection::vec(op(), 1..200)) {
            let store = ProducerStore::new(8, 50);
            let mut model: Model = HashMap::new();
            for (now, op) in ops.into_iter().enumerate() {
                let now = now as u64;
                let key = |p: i64, t: u8, q: i32| store.key_for(p, &format!("t{t}"), q);
                let batch = |s: i32| Batch { epoch: 0, first_seq: s * 10, last_seq: s * 10 + 9 };
                match op {
                    Op::Check(p, t, q, s) => {
                        let k = key(p, t, q);
                        let got = store.check_and_track(&k, batch(s), now);
                        let m = model.entry(k).or_default();
                        let want = eos::check(m.0.as_ref(), &m.1, batch(s));
                        prop_assert_eq!(got, want);
                        if want.forwards() {
                            if m.1.len() == MAX_IN_FLIGHT {
                                m.1.remove(0);
                            }
                            m.1.push(batch(s));
                        }
                    }
                    Op::Settle(p, t, q, s) => {
                        let k = key(p, t, q);
                        store.settle(&k, batch(s));
                        if let Some(m) = model.get_mut(&k) {
                            if let Some(i) = m.1.iter().position(|b| *b == batch(s)) {
                                m.1.remove(i);
                            }
                        }
                    }
                    Op::Ack(p, t, q, s) => {
                        let k = key(p, t, q);
                        let acked = Acked {
                            first_seq: s * 10,
                            last_seq: s * 10 + 9,
                            first_offset: i64::from(s) * 100,
                            timestamp: now as i64,
                            acks_all: true,
                        };
                        store.acknowledge(&k, batch(s), acked, now);
                        let m = model.entry(k).or_default();
                        if let Some(i) = m.1.iter().position(|b| *b == batch(s)) {
                            m.1.remove(i);
                        }
                        m.0.get_or_insert_with(|| PartitionState::new(0)).acknowledge(0, acked);
                    }
                    Op::Expire => {
                        store.expire_idle(now);
                    }
                }
                sync(&store, &mut model);
            }
        }
    }
}

#[test]
fn a_recreated_topic_starts_without_the_old_ones_state() {
    let s = ProducerStore::new(100, 1000);
    let old = s.key_for(7, "t", 0);
    s.check_and_track(&old, b(0, 4), 0);
    s.acknowledge(&old, b(0, 4), acked(0, 4, 10), 1);
    assert!(matches!(
        s.check_and_track(&old, b(0, 4), 2),
        Verdict::Duplicate(_)
    ));
    assert!(s.forget_topic("t"));
    let new = s.key_for(7, "t", 0);
    assert_ne!(new.topic, old.topic, "the name has a new number");
    assert_eq!(
        s.check_and_track(&new, b(0, 4), 3),
        Verdict::Unknown,
        "the old topic's window does not answer for the new one"
    );
    assert!(!s.forget_topic("never-seen"));
}

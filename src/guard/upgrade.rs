//! The idempotence upgrade (`produce.idempotence: upgrade`): batches of a client without idempotence
//! go upstream as an idempotent producer's, under a producer id the proxy obtained for that client.
//!
//! Who shares one upstream producer: a client identity, the same one the content window uses
//! (principal, client id, address), across all of its connections. A client without idempotence
//! retries a batch after a reconnect on a new connection; only a producer that outlives the
//! connection can re-send that retry under the sequence its first attempt carried, so that the broker
//! deduplicates it.
//!
//! Per partition, a [`Lane`] hands out sequences in the order batches go upstream and follows what the
//! broker made of them, the way the Java producer does for its own batches:
//! - written: the lane's acknowledged sequence moves on;
//! - refused (not written: NOT_LEADER_OR_FOLLOWER, an out-of-order echo, ...): the lane stops handing
//!   out sequences (new batches are answered with a retriable error) until nothing of it is in flight,
//!   then goes back to the sequence after the last written batch: the client's retries fill it again;
//! - fate unknown (a timeout, a connection that broke before the answer): the batch's stamp is kept
//!   with its content digest; the client's retry of it is sent under that same stamp, so the broker
//!   writes it once. If the lane must move on without that retry, it bumps its epoch and starts at
//!   sequence 0 (the Java producer's per-partition epoch bump for an idempotent producer, KIP-360; the
//!   broker accepts a higher epoch starting at 0). A retry that arrives after that is written again:
//!   its fate was unknown, as it would be for the Java producer (audited).
//!
//! State is bounded: at most `max_producers` upgraded producers (the least recently used one without
//! batches in flight is dropped first; its client gets a new producer id when it comes back), at most
//! [`MAX_LANES_PER_PRODUCER`] partitions each, at most [`MAX_UNRESOLVED`] stamps per lane.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Partitions one upgraded producer may write (a lane each).
pub const MAX_LANES_PER_PRODUCER: usize = 10_000;
/// Batches per lane in flight or of unknown fate (the broker deduplicates the last five per producer
/// and partition; more in flight than that cannot be deduplicated anyway).
pub const MAX_UNRESOLVED: usize = 32;
/// Bytes one lane costs besides its topic name and stamps, about (the map entry and its key, the
/// lane's counters, the two stamp vectors' headers).
pub const LANE_BYTES: usize = 120;
/// Bytes of one unresolved stamp.
pub const STAMP_BYTES: usize = std::mem::size_of::<Stamp>();
/// Bytes of one upgraded producer besides its lanes (its map entry, the shared handle, the lock).
pub const PRODUCER_BYTES: usize = 128;

/// A batch the upgrade can stamp: its record count and content digest.
pub type Candidate = (i32, [u64; 2]);

/// The sequence after `seq + count - 1`, wrapping at i32::MAX to 0 as Kafka's sequences do.
fn after(seq: i32, count: i32) -> i32 {
    ((i64::from(seq) + i64::from(count.max(1))) % (i64::from(i32::MAX) + 1)) as i32
}

/// What went upstream for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: i16,
    pub seq: i32,
    pub count: i32,
    /// The batch's content digest: how its retry is recognised.
    pub digest: [u64; 2],
    /// A retry re-sent under the stamp its first attempt had (that attempt's fate was unknown).
    pub resent: bool,
}

/// What the broker made of a stamped batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Written,
    NotWritten,
    Unknown,
}

/// The fate a Produce error code means for a batch (see the Java producer's `canRetry` and the
/// broker's append path): timeouts and storage errors may follow an append; everything else the
/// broker returns before writing.
pub fn fate(error_code: i16) -> Fate {
    use crate::protocol::codes;
    match error_code {
        codes::NONE | codes::DUPLICATE_SEQUENCE_NUMBER => Fate::Written,
        codes::REQUEST_TIMED_OUT
        | codes::NOT_ENOUGH_REPLICAS_AFTER_APPEND
        | codes::NETWORK_EXCEPTION
        | codes::KAFKA_STORAGE_ERROR
        | codes::UNKNOWN_SERVER_ERROR => Fate::Unknown,
        _ => Fate::NotWritten,
    }
}

/// What a lane decided for a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Send it under this stamp.
    Stamp(Stamp),
    /// The lane is recovering from a refusal with batches still in flight: answer the client with a
    /// retriable error; its retry gets a sequence once the lane is drained.
    Busy,
    /// The lane cannot take more unresolved batches.
    Full,
}

/// One partition of an upgraded producer.
#[derive(Debug, Default)]
pub struct Lane {
    epoch: i16,
    next_seq: i32,
    /// The sequence after the last batch the broker wrote.
    acked_next: i32,
    in_flight: Vec<Stamp>,
    unknown: Vec<Stamp>,
    /// A batch was refused or its fate is unknown: no new sequences until the lane is drained.
    broken: bool,
    /// Since the last restart: the broker lost the producer's state (UNKNOWN_PRODUCER_ID), or a
    /// re-sent stamp came back refused (its first attempt may still be in the log).
    must_bump: bool,
}

/// What a restart of a lane did (for the audit and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Went back to the sequence after the last written batch.
    Rewound { from: i32, to: i32 },
    /// Bumped its epoch and started at sequence 0; `abandoned` stamps of unknown fate were dropped.
    Bumped { epoch: i16, abandoned: usize },
    /// The epoch is exhausted: the producer needs a new producer id.
    Exhausted,
}

impl Lane {
    /// A sequence for a batch with `count` records and content `digest`, or why not. `restarted` says
    /// what a restart of the lane did first, if one was due.
    pub fn reserve(&mut self, count: i32, digest: [u64; 2]) -> (Reserve, Option<Restart>) {
        if let Some(i) = self
            .unknown
            .iter()
            .position(|s| s.digest == digest && s.count == count && s.epoch == self.epoch)
        {
            // The retry of a batch whose fate is unknown: its own stamp again, so the broker writes
            // it once (it answers a duplicate with the original offset).
            let mut s = self.unknown.remove(i);
            s.resent = true;
            self.in_flight.push(s);
            return (Reserve::Stamp(s), None);
        }
        let mut restarted = None;
        if self.broken {
            if !self.in_flight.is_empty() {
                return (Reserve::Busy, None);
            }
            if self.unknown.is_empty() && !self.must_bump {
                // Nothing to report when every batch of unknown fate was retried and written.
                restarted = (self.next_seq != self.acked_next).then_some(Restart::Rewound {
                    from: self.next_seq,
                    to: self.acked_next,
                });
                self.next_seq = self.acked_next;
            } else if self.epoch == i16::MAX {
                return (Reserve::Busy, Some(Restart::Exhausted));
            } else {
                self.epoch += 1;
                restarted = Some(Restart::Bumped {
                    epoch: self.epoch,
                    abandoned: self.unknown.len(),
                });
                self.unknown.clear();
                self.next_seq = 0;
                self.acked_next = 0;
                self.must_bump = false;
            }
            self.broken = false;
        }
        if self.in_flight.len() + self.unknown.len() >= MAX_UNRESOLVED {
            return (Reserve::Full, restarted);
        }
        let s = Stamp {
            epoch: self.epoch,
            seq: self.next_seq,
            count,
            digest,
            resent: false,
        };
        self.next_seq = after(self.next_seq, count);
        self.in_flight.push(s);
        (Reserve::Stamp(s), restarted)
    }

    /// The broker's answer for a stamped batch (`Fate::Unknown` also for no answer at all).
    /// `unknown_producer`: the broker no longer knows the producer (UNKNOWN_PRODUCER_ID).
    pub fn settle(&mut self, stamp: Stamp, fate: Fate, unknown_producer: bool) {
        let Some(i) = self.in_flight.iter().position(|s| *s == stamp) else {
            return;
        };
        self.in_flight.remove(i);
        if stamp.epoch != self.epoch {
            return; // from before a bump: the lane has moved on
        }
        match fate {
            Fate::Written => {
                let end = after(stamp.seq, stamp.count);
                // Only forward: answers of one connection come in order, but two connections of one
                // client may interleave.
                if seq_after(end, self.acked_next) {
                    self.acked_next = end;
                }
            }
            Fate::NotWritten if stamp.resent => {
                // Refused now, but its first attempt may be in the log (an out-of-order answer for a
                // sequence the broker no longer caches): only a new epoch is safe.
                self.unknown.push(stamp);
                self.must_bump = true;
                self.broken = true;
            }
            Fate::NotWritten => {
                self.broken = true;
                self.must_bump |= unknown_producer;
            }
            Fate::Unknown => {
                self.unknown.push(stamp);
                self.broken = true;
            }
        }
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }
}

/// Whether sequence `a` comes after `b` (within half the sequence space, as they wrap).
fn seq_after(a: i32, b: i32) -> bool {
    let d = (i64::from(a) - i64::from(b)).rem_euclid(i64::from(i32::MAX) + 1);
    d != 0 && d < (1 << 30)
}

/// One client identity's upstream producer.
#[derive(Debug)]
pub struct Producer {
    pub producer_id: i64,
    lanes: HashMap<(Arc<str>, i32), Lane>,
    last_used: Instant,
}

impl Producer {
    pub fn new(producer_id: i64) -> Producer {
        Producer {
            producer_id,
            lanes: HashMap::new(),
            last_used: Instant::now(),
        }
    }

    /// The lane of a partition (`None`: the producer has [`MAX_LANES_PER_PRODUCER`] already).
    pub fn lane(&mut self, topic: &str, partition: i32) -> Option<&mut Lane> {
        self.last_used = Instant::now();
        let full = self.lanes.len() >= MAX_LANES_PER_PRODUCER;
        let key = (Arc::<str>::from(topic), partition);
        if full && !self.lanes.contains_key(&key) {
            return None;
        }
        Some(self.lanes.entry(key).or_default())
    }

    /// Stamped batches that got no answer of the broker's: each lane learns `fate`.
    pub(super) fn settle_all(&mut self, stamps: impl Iterator<Item = Stamped>, fate: Fate) {
        for s in stamps {
            if let Some(lane) = self.lane(&s.name, s.partition) {
                lane.settle(s.stamp, fate, false);
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.lanes.values().all(Lane::is_idle)
    }
}

/// Every upgraded producer, by client identity.
pub struct Upgrades {
    producers: Mutex<HashMap<u128, Arc<Mutex<Producer>>>>,
    max_producers: usize,
    /// Producer ids are obtained one at a time (a client's many connections ask once).
    pub obtaining: tokio::sync::Mutex<()>,
    evictions: std::sync::atomic::AtomicU64,
}

impl Upgrades {
    pub fn new(max_producers: usize) -> Upgrades {
        Upgrades {
            producers: Mutex::new(HashMap::new()),
            max_producers: max_producers.max(1),
            obtaining: tokio::sync::Mutex::new(()),
            evictions: Default::default(),
        }
    }

    pub fn get(&self, identity: u128) -> Option<Arc<Mutex<Producer>>> {
        lock(&self.producers).get(&identity).cloned()
    }

    /// Keeps a producer id obtained for `identity`. At the budget, the least recently used producer
    /// with nothing in flight goes (its client gets a new producer id when it writes again); if every
    /// one is busy, the new one is not kept (`None`: its batches go upstream as they came).
    pub fn insert(&self, identity: u128, producer_id: i64) -> Option<Arc<Mutex<Producer>>> {
        let mut all = lock(&self.producers);
        if all.len() >= self.max_producers && !all.contains_key(&identity) {
            let oldest = all
                .iter()
                .filter_map(|(k, p)| p.try_lock().ok().map(|p| (k, p.last_used, p.is_idle())))
                .filter(|(_, _, idle)| *idle)
                .min_by_key(|(_, used, _)| *used)
                .map(|(k, _, _)| *k);
            let k = oldest?;
            all.remove(&k);
            self.evictions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let p = Arc::new(Mutex::new(Producer::new(producer_id)));
        all.insert(identity, p.clone());
        Some(p)
    }

    /// About the bytes kept: [`PRODUCER_BYTES`] per producer, [`LANE_BYTES`] per partition and
    /// [`STAMP_BYTES`] per unresolved batch (the topic names are counted within the lanes).
    pub fn approx_bytes(&self) -> usize {
        let all = lock(&self.producers);
        all.values()
            .map(|p| {
                PRODUCER_BYTES
                    + p.try_lock().map_or(0, |p| {
                        p.lanes
                            .iter()
                            .map(|((t, _), l)| {
                                LANE_BYTES
                                    + t.len()
                                    + STAMP_BYTES * (l.in_flight.capacity() + l.unknown.capacity())
                            })
                            .sum()
                    })
            })
            .sum()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A batch that went upstream under a stamp, as the answer needs it.
pub(super) struct Stamped {
    pub wire: crate::protocol::produce::OwnedWireTopic,
    pub name: String,
    pub partition: i32,
    pub stamp: Stamp,
}

/// The retriable error a client gets for a batch the proxy holds back while it re-sequences (or that
/// the broker refused only because an earlier batch failed): NOT_ENOUGH_REPLICAS, which every client
/// retries without refreshing metadata, and which the broker too returns before writing anything.
pub const HOLD_BACK: i16 = crate::protocol::codes::NOT_ENOUGH_REPLICAS;

/// The proxy's own [`HOLD_BACK`] answer for a batch, saying `why`.
fn held_back(why: String) -> super::Outcome {
    super::Outcome::Local(super::LocalAnswer {
        error_code: HOLD_BACK,
        base_offset: -1,
        log_append_time: -1,
        message: Some(format!("kafka-eos-proxy: {why}; retry")),
    })
}

impl super::Guard {
    /// Gives every batch the upgrade applies to a stamp of `producer` (sequences in request order), or
    /// a retriable answer if its partition is re-sequencing. Restarts are audited.
    pub fn stamp(
        &self,
        plan: &mut super::ProducePlan,
        producer: &Arc<Mutex<Producer>>,
        conn: &crate::client::Client,
    ) {
        let mut p = lock(producer);
        let producer_id = p.producer_id;
        let (mut stamped, mut resent) = (0u64, 0u64);
        plan.stamps = plan
            .upgradable
            .iter()
            .map(|t| vec![None; t.len()])
            .collect();
        for t in 0..plan.upgradable.len() {
            let Some(name) = plan.topics[t].1.clone() else {
                continue;
            };
            for i in 0..plan.upgradable[t].len() {
                let Some((count, digest)) = plan.upgradable[t][i] else {
                    continue;
                };
                let partition = plan.partitions[t][i];
                let (reserve, restart) = match p.lane(&name, partition) {
                    Some(lane) => lane.reserve(count, digest),
                    None => (Reserve::Full, None),
                };
                if let Some(r) = restart {
                    self.audit_restart(conn, producer_id, (&name, partition), r);
                }
                match reserve {
                    Reserve::Stamp(s) => {
                        plan.stamps[t][i] = Some(s);
                        stamped += 1;
                        resent += u64::from(s.resent);
                    }
                    Reserve::Busy | Reserve::Full => {
                        plan.outcomes[t][i] = held_back(format!(
                            "partition {name}-{partition} of the upgraded producer {producer_id} \
                             is re-sequencing after a failed batch"
                        ));
                    }
                }
            }
        }
        drop(p);
        plan.upgraded = Some((producer.clone(), producer_id));
        if let (Some(m), true) = (&self.metrics, stamped > 0) {
            let labels = crate::metrics::producer_labels(conn.client_id_kept().unwrap_or(""), "");
            if m.producers.admit(labels[0], labels[1]) {
                m.producers
                    .upgraded_batches
                    .with_label_values(&labels)
                    .inc_by(stamped);
                if resent > 0 {
                    m.producers
                        .upgrade_resent
                        .with_label_values(&labels)
                        .inc_by(resent);
                }
            }
        }
    }

    /// No upstream producer could be had (`why`): every batch the upgrade applies to is answered with
    /// [`HOLD_BACK`] (the client retries; nothing is written without idempotence).
    pub fn hold_upgradable(&self, plan: &mut super::ProducePlan, why: &str) {
        for (t, topic) in plan.upgradable.iter().enumerate() {
            for (i, u) in topic.iter().enumerate() {
                if u.is_some() {
                    plan.outcomes[t][i] = held_back(why.to_string());
                }
            }
        }
    }

    fn audit_restart(
        &self,
        conn: &crate::client::Client,
        producer_id: i64,
        (topic, partition): (&str, i32),
        restart: Restart,
    ) {
        use crate::audit::{Action, AuditEvent, Kind, Source};
        let (epoch, detail) = match restart {
            Restart::Rewound { from, to } => (
                None,
                format!(
                    "a batch was refused: sequences {to}..{from} were not written; the partition \
                     goes on at sequence {to} (the client's retries fill it)"
                ),
            ),
            Restart::Bumped { epoch, abandoned } => (
                Some(epoch),
                format!(
                    "the partition could not go on in its epoch ({abandoned} batch(es) of unknown \
                     fate not retried): epoch {epoch}, sequence 0; a late retry of one of them is \
                     written again"
                ),
            ),
            Restart::Exhausted => (
                None,
                "the epoch is exhausted (32767 bumps): batches are held back".to_string(),
            ),
        };
        if let Some(m) = &self.metrics {
            let labels = crate::metrics::producer_labels(conn.client_id_kept().unwrap_or(""), "");
            if m.producers.admit(labels[0], labels[1]) {
                let how = match restart {
                    Restart::Rewound { .. } => "rewound",
                    _ => "epoch_bump",
                };
                m.producers
                    .upgrade_restarts
                    .with_label_values(&[labels[0], labels[1], how])
                    .inc();
            }
        }
        self.audit.emit(AuditEvent {
            api_key: kafka_protocol::messages::ApiKey::Produce as i16,
            producer_id,
            producer_epoch: epoch.unwrap_or(-1),
            topic: Some(topic.to_string()),
            partition: Some(partition),
            detail: Some(detail),
            ..AuditEvent::new(Kind::UpgradeResequenced, Source::Proxy, Action::Observed)
                .from_conn(conn)
        });
    }

    /// The broker's answer for stamped batches: each lane learns its batch's fate; a refusal the
    /// client would not understand from a producer it is not (an out-of-order echo, an unknown
    /// producer, a fenced epoch) becomes [`HOLD_BACK`], and a duplicate of a written batch a success.
    pub(super) fn settle_stamps(
        &self,
        tracking: &mut super::ProduceTracking,
        resp: &mut kafka_protocol::messages::ProduceResponse,
    ) {
        use crate::protocol::codes;
        let Some(producer) = tracking.upgraded.clone() else {
            return;
        };
        let mut p = lock(&producer);
        for topic in resp.responses.iter_mut() {
            for k in 0..topic.partition_responses.len() {
                let index = topic.partition_responses[k].index;
                let Some(i) = tracking
                    .stamps
                    .iter()
                    .position(|s| super::answer::names(&s.wire, topic) && s.partition == index)
                else {
                    continue;
                };
                let s = tracking.stamps.swap_remove(i);
                let r = &mut topic.partition_responses[k];
                let fate = fate(r.error_code);
                if let Some(lane) = p.lane(&s.name, s.partition) {
                    lane.settle(s.stamp, fate, r.error_code == codes::UNKNOWN_PRODUCER_ID);
                }
                match r.error_code {
                    codes::DUPLICATE_SEQUENCE_NUMBER => {
                        r.error_code = codes::NONE;
                        r.error_message = None;
                    }
                    codes::OUT_OF_ORDER_SEQUENCE_NUMBER
                    | codes::UNKNOWN_PRODUCER_ID
                    | codes::INVALID_PRODUCER_EPOCH => {
                        r.error_code = HOLD_BACK;
                        r.error_message = Some(kafka_protocol::protocol::StrBytes::from_string(
                            "kafka-eos-proxy: the upgraded producer re-sequences this partition; \
                             retry"
                                .to_string(),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Writes producer id, epoch and base sequence into a v2 batch's header and recomputes its CRC (the
/// records are untouched: they carry only deltas). `None` if the bytes are not one whole v2 batch.
pub fn restamp(batch: &mut [u8], producer_id: i64, epoch: i16, seq: i32) -> Option<()> {
    let h = crate::protocol::batch::BatchHeader::new(batch)?;
    let len = usize::try_from(h.batch_length()).ok()?.checked_add(12)?;
    if len != batch.len() || h.magic() != 2 {
        return None;
    }
    batch[43..51].copy_from_slice(&producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&seq.to_be_bytes());
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    Some(())
}

/// A poisoned lock only means another thread panicked while holding it; the data is still usable.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: [u64; 2] = [1, 1];
    const D2: [u64; 2] = [2, 2];
    const D3: [u64; 2] = [3, 3];

    fn stamp(lane: &mut Lane, count: i32, digest: [u64; 2]) -> Stamp {
        match lane.reserve(count, digest).0 {
            Reserve::Stamp(s) => s,
            other => panic!("no stamp: {other:?}"),
        }
    }

    #[test]
    fn sequences_follow_each_other_and_wrap() {
        let mut lane = Lane::default();
        assert_eq!(stamp(&mut lane, 3, D1).seq, 0);
        assert_eq!(stamp(&mut lane, 2, D2).seq, 3);
        assert_eq!(after(i32::MAX - 1, 3), 1);
        assert!(seq_after(1, i32::MAX));
        assert!(!seq_after(i32::MAX, 1));
    }

    #[test]
    fn a_refusal_holds_the_lane_until_drained_then_rewinds() {
        let mut lane = Lane::default();
        let a = stamp(&mut lane, 3, D1);
        let b = stamp(&mut lane, 2, D2);
        lane.settle(a, Fate::NotWritten, false);
        // b is still in flight (it will come back out of order): new batches wait.
        assert_eq!(lane.reserve(1, D3).0, Reserve::Busy);
        lane.settle(b, Fate::NotWritten, false);
        // The client's retries start again at 0, in its order.
        let (r, restart) = lane.reserve(3, D1);
        assert_eq!(restart, Some(Restart::Rewound { from: 5, to: 0 }));
        assert!(matches!(r, Reserve::Stamp(s) if s.seq == 0 && s.epoch == 0));
    }

    #[test]
    fn a_retry_of_unknown_fate_gets_its_own_stamp_again() {
        let mut lane = Lane::default();
        let a = stamp(&mut lane, 3, D1);
        lane.settle(a, Fate::Written, false);
        let b = stamp(&mut lane, 2, D2);
        lane.settle(b, Fate::Unknown, false);
        let again = stamp(&mut lane, 2, D2);
        assert_eq!(
            (again.epoch, again.seq),
            (0, 3),
            "same sequence: the broker deduplicates"
        );
        assert!(again.resent);
        lane.settle(again, Fate::Written, false);
        // Resolved: the lane rewinds to after it and goes on.
        assert_eq!(stamp(&mut lane, 1, D3).seq, 5);
    }

    #[test]
    fn a_lane_that_must_move_on_past_unknown_fate_bumps_its_epoch() {
        let mut lane = Lane::default();
        let a = stamp(&mut lane, 3, D1);
        lane.settle(a, Fate::Unknown, false);
        // Something else comes first: its fate is unknown, so no sequence below it may be reused.
        let (r, restart) = lane.reserve(1, D3);
        assert_eq!(
            restart,
            Some(Restart::Bumped {
                epoch: 1,
                abandoned: 1
            })
        );
        assert!(matches!(r, Reserve::Stamp(s) if (s.epoch, s.seq) == (1, 0)));
        // The late retry is no longer matched: a fresh sequence (and the caller audits it).
        let late = stamp(&mut lane, 3, D1);
        assert!(!late.resent);
        assert_eq!((late.epoch, late.seq), (1, 1));
    }

    #[test]
    fn a_resent_stamp_refused_forces_a_bump() {
        let mut lane = Lane::default();
        let a = stamp(&mut lane, 1, D1);
        lane.settle(a, Fate::Unknown, false);
        let again = stamp(&mut lane, 1, D1);
        lane.settle(again, Fate::NotWritten, false);
        let (_, restart) = lane.reserve(1, D2);
        assert!(matches!(restart, Some(Restart::Bumped { epoch: 1, .. })));
    }

    #[test]
    fn unknown_producer_forces_a_bump() {
        let mut lane = Lane::default();
        let a = stamp(&mut lane, 1, D1);
        lane.settle(a, Fate::NotWritten, true);
        let (_, restart) = lane.reserve(1, D1);
        assert!(matches!(restart, Some(Restart::Bumped { epoch: 1, .. })));
    }

    #[test]
    fn unresolved_stamps_are_bounded() {
        let mut lane = Lane::default();
        for i in 0..MAX_UNRESOLVED {
            stamp(&mut lane, 1, [i as u64, 0]);
        }
        assert_eq!(lane.reserve(1, D1).0, Reserve::Full);
    }

    #[test]
    fn a_stamp_costs_what_the_readme_says() {
        assert_eq!(STAMP_BYTES, 32);
    }

    #[test]
    fn restamping_writes_the_producer_and_keeps_the_batch_valid() {
        let mut b = crate::testkit::record_batch(-1, -1, -1, 1, false, "x").to_vec();
        let records_before = b[61..].to_vec();
        let s = Stamp {
            epoch: 2,
            seq: 7,
            count: 3,
            digest: D1,
            resent: false,
        };
        assert!(restamp(&mut b, 42, s.epoch, s.seq).is_some());
        let h = crate::protocol::batch::BatchHeader::new(&b).unwrap();
        assert_eq!(
            (h.producer_id(), h.producer_epoch(), h.base_sequence()),
            (42, 2, 7)
        );
        assert!(h.crc_ok(), "the CRC is recomputed");
        assert_eq!(b[61..], records_before[..], "records untouched");
        assert!(
            restamp(&mut b[..40], 42, s.epoch, s.seq).is_none(),
            "a cut batch is refused"
        );
        let mut lying = b.clone();
        lying.push(0);
        assert!(
            restamp(&mut lying, 42, s.epoch, s.seq).is_none(),
            "a length that lies is refused"
        );
    }

    #[test]
    fn fates_of_error_codes() {
        assert_eq!(fate(0), Fate::Written);
        assert_eq!(fate(6), Fate::NotWritten, "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(fate(45), Fate::NotWritten);
        assert_eq!(fate(7), Fate::Unknown, "REQUEST_TIMED_OUT");
    }

    #[test]
    fn idle_producers_make_room() {
        let u = Upgrades::new(1);
        let p = u.insert(1, 100).unwrap();
        let busy = lock(&p).lane("t", 0).map(|l| l.reserve(1, D1).0);
        assert!(matches!(busy, Some(Reserve::Stamp(_))));
        assert!(u.insert(2, 200).is_none(), "the only producer is busy");
        let s = match busy {
            Some(Reserve::Stamp(s)) => s,
            _ => unreachable!(),
        };
        lock(&p)
            .lane("t", 0)
            .unwrap()
            .settle(s, Fate::Written, false);
        assert!(u.insert(2, 200).is_some());
        assert_eq!(u.evictions(), 1);
        assert!(u.get(1).is_none());
    }
}

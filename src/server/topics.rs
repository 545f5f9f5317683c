//! Topic ids and their names. Fetch v13+, TxnOffsetCommit v6 and Produce v13+ name topics by id; the
//! proxy names them from the Metadata answers that pass through it, and (Produce only, where producer
//! state and policies need the name) asks the cluster about an id no answer taught it. A name that
//! comes back with another id is a topic deleted and created again: its old producer state must go.

use dashmap::DashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most topic ids (and names) remembered; past it the maps start again (Metadata answers refill them).
const MAX_TOPICS: usize = 1_000_000;
/// Most re-created topic names waiting to be taken.
const MAX_RECREATED: usize = 1024;
/// Most ids remembered as unknown to the cluster (or not asked because a lookup failed).
const MAX_UNKNOWN: usize = 10_000;
/// How long an id the cluster did not know is not asked about again.
const UNKNOWN_FOR: Duration = Duration::from_secs(10);
/// Most ids asked in one lookup (a request names at most this many before the rest go unnamed).
pub const MAX_LOOKUP_IDS: usize = 100;

#[derive(Default)]
pub struct Topics {
    /// Topic id -> name.
    ids: DashMap<[u8; 16], Arc<str>>,
    /// Topic name -> id, to notice a topic deleted and created again under the same name.
    names: DashMap<Arc<str>, [u8; 16]>,
    /// Names whose id changed since they were last taken (see [`Topics::take_recreated`]).
    recreated: Mutex<Vec<Arc<str>>>,
    /// Ids the cluster could not name, and when: not asked about again for [`UNKNOWN_FOR`], so that
    /// a client naming made-up ids costs the cluster one request per id and period.
    unknown: DashMap<[u8; 16], Instant>,
    /// One lookup at a time.
    pub(crate) lookups: tokio::sync::Mutex<()>,
}

/// Why an id is left unnamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unnamed {
    /// The cluster answered UNKNOWN_TOPIC_ID (or another error) for it.
    UnknownToCluster(i16),
    /// The lookup itself failed (no broker reachable, an unreadable answer, a timeout).
    LookupFailed(String),
    /// More ids than one lookup asks about.
    TooMany,
}

impl std::fmt::Display for Unnamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unnamed::UnknownToCluster(code) => {
                write!(f, "the cluster does not know it (error {code})")
            }
            Unnamed::LookupFailed(e) => write!(f, "the proxy could not ask the cluster: {e}"),
            Unnamed::TooMany => write!(f, "more than {MAX_LOOKUP_IDS} unknown topic ids at once"),
        }
    }
}

impl Topics {
    /// Remembers a topic's id (from a Metadata answer). A name that comes back with another id is a
    /// topic deleted and created again: it is queued for [`Topics::take_recreated`].
    pub fn learn(&self, id: [u8; 16], name: &str) {
        if id == [0; 16] || self.ids.get(&id).is_some_and(|n| &**n == name) {
            return;
        }
        if self.ids.len() >= MAX_TOPICS || self.names.len() >= MAX_TOPICS {
            self.ids.clear();
            self.names.clear();
        }
        self.unknown.remove(&id);
        let name: Arc<str> = Arc::from(name);
        if let Some(old) = self.names.insert(name.clone(), id) {
            if old != id {
                self.ids.remove(&old);
                if let Ok(mut queue) = self.recreated.lock() {
                    if queue.len() < MAX_RECREATED {
                        queue.push(name.clone());
                    }
                }
            }
        }
        self.ids.insert(id, name);
    }

    /// The topic names seen with a new id since the last call (usually none: one uncontended lock).
    pub fn take_recreated(&self) -> Vec<Arc<str>> {
        match self.recreated.lock() {
            Ok(mut queue) if !queue.is_empty() => std::mem::take(&mut *queue),
            _ => Vec::new(),
        }
    }

    pub fn name(&self, id: &[u8; 16]) -> Option<Arc<str>> {
        self.ids.get(id).map(|n| n.clone())
    }

    /// Whether `id` was found unknown (or unaskable) lately: not worth another lookup yet.
    pub fn recently_unknown(&self, id: &[u8; 16], now: Instant) -> bool {
        self.unknown
            .get(id)
            .is_some_and(|at| now.saturating_duration_since(*at) < UNKNOWN_FOR)
    }

    /// Remembers that `id` could not be named now.
    pub fn mark_unknown(&self, id: [u8; 16], now: Instant) {
        if self.unknown.len() >= MAX_UNKNOWN {
            self.unknown
                .retain(|_, at| now.saturating_duration_since(*at) < UNKNOWN_FOR);
            if self.unknown.len() >= MAX_UNKNOWN {
                self.unknown.clear();
            }
        }
        self.unknown.insert(id, now);
    }

    /// Bytes held by the maps (for the `state_bytes` gauge): ids, names, and entry overhead.
    pub fn bytes(&self) -> usize {
        let names: usize = self.ids.iter().map(|e| e.value().len()).sum();
        (self.ids.len() + self.names.len()) * (16 + 16 + 32) + names + self.unknown.len() * 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_seen_with_a_new_topic_id_is_a_recreated_topic() {
        let t = Topics::default();
        t.learn([1; 16], "t");
        t.learn([1; 16], "t");
        t.learn([2; 16], "u");
        assert!(t.take_recreated().is_empty(), "first sightings and repeats");
        t.learn([3; 16], "t");
        let taken: Vec<String> = t.take_recreated().iter().map(|n| n.to_string()).collect();
        assert_eq!(taken, ["t"]);
        assert!(t.take_recreated().is_empty(), "taken once");
        assert_eq!(t.name(&[3; 16]).as_deref(), Some("t"));
        assert_eq!(t.name(&[1; 16]), None, "the old id names nothing now");
        t.learn([0; 16], "t");
        assert!(t.take_recreated().is_empty(), "the zero id is no topic id");
    }

    #[test]
    fn unknown_ids_are_not_asked_again_for_a_while_and_stay_bounded() {
        let t = Topics::default();
        let now = Instant::now();
        t.mark_unknown([1; 16], now);
        assert!(t.recently_unknown(&[1; 16], now + Duration::from_secs(1)));
        assert!(!t.recently_unknown(&[1; 16], now + UNKNOWN_FOR));
        assert!(!t.recently_unknown(&[2; 16], now));
        for i in 0..(MAX_UNKNOWN as u32 + 10) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            t.mark_unknown(id, now);
        }
        assert!(t.unknown.len() <= MAX_UNKNOWN);
        // A topic learned later is no longer unknown.
        t.mark_unknown([5; 16], now);
        t.learn([5; 16], "five");
        assert!(!t.recently_unknown(&[5; 16], now));
    }
}

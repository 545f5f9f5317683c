//! Exactly-once policies: what each topic demands of the clients that write and read it.
//!
//! ```text
//! config (policies: [rules])  ──parse──▶ Policies (compiled: exact sets, prefixes, RegexSets, CIDRs)
//!        │ SIGHUP / file change: parse the whole file again; swap only if it is valid
//!        ▼
//! PolicyHolder (ArcSwap<Policies>) ──load per request──▶ the connection's ConnPolicies (stages)
//!        topic ──▶ TopicPolicy (one Decision per check: rule, action, limit)
//!        InitProducerId ──▶ ProducerPolicy (timeout bounds, new-pid rate) + transactional.id owners
//! ```
//!
//! **How overlapping rules resolve.** Rules are read in file order. For each check separately, the
//! *first* rule that matches the topic and the client and sets that check decides it; later rules
//! cannot loosen or tighten it. `allow` is a decision too: an earlier rule with `idempotence: allow`
//! exempts its clients from a later `idempotence: reject`. So: specific rules (exemptions, stricter
//! limits for one team) first, broad rules last. Transactional-id ownership is global instead: the
//! longest owned prefix names the owner, and two rules may not own the same prefix.

pub mod explain;
mod matching;
pub mod parse;
pub mod rate;
pub mod report;
pub mod sasl;
pub mod wire;

use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use matching::{Cidr, ClientFacts, ClientMatch, NameMatch};

/// What happens when a check fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Explicitly fine: stops later rules from deciding this check.
    Allow,
    /// Let it through; count it and write an audit event.
    Audit,
    /// Make it compliant where that is safe (acks=1 -> acks=all, read_uncommitted -> read_committed,
    /// a transaction timeout clamped into bounds); count and audit.
    Upgrade,
    /// Refuse it with the Kafka error that fits; count and audit.
    Reject,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Audit => "audit",
            Action::Upgrade => "upgrade",
            Action::Reject => "reject",
        }
    }

    /// The label used on counters and audit lines for what was done.
    pub fn past(self) -> &'static str {
        match self {
            Action::Allow => "allowed",
            Action::Audit => "audited",
            Action::Upgrade => "upgraded",
            Action::Reject => "rejected",
        }
    }
}

/// The checks a rule can set. The names are the config keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    Idempotence,
    Transactions,
    AcksAll,
    Compression,
    MaxBatchBytes,
    MaxBatchRecords,
    ReadCommitted,
    TransactionTimeout,
    NewProducerIdsPerMinute,
    TransactionalIdOwner,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Idempotence => "idempotence",
            Check::Transactions => "transactions",
            Check::AcksAll => "acks_all",
            Check::Compression => "compression",
            Check::MaxBatchBytes => "max_batch_bytes",
            Check::MaxBatchRecords => "max_batch_records",
            Check::ReadCommitted => "read_committed",
            Check::TransactionTimeout => "transaction_timeout_ms",
            Check::NewProducerIdsPerMinute => "new_producer_ids_per_minute",
            Check::TransactionalIdOwner => "owns_transactional_ids",
        }
    }

    /// The actions that make sense for this check (the parser refuses the others, saying why).
    pub fn actions(self) -> &'static [Action] {
        use Action::*;
        match self {
            Check::AcksAll | Check::TransactionTimeout => &[Allow, Audit, Upgrade, Reject],
            Check::ReadCommitted => &[Allow, Audit, Upgrade],
            Check::TransactionalIdOwner => &[Audit, Reject],
            _ => &[Allow, Audit, Reject],
        }
    }
}

/// Compression codecs, as bits of a mask (bit n = codec id n in the batch attributes).
pub const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

pub fn codec_name(id: u8) -> &'static str {
    CODECS.get(usize::from(id)).copied().unwrap_or("unknown")
}

/// One rule from the config, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: Arc<str>,
    /// `None`: every topic.
    pub topics: Option<NameMatch>,
    pub clients: ClientMatch,
    pub idempotence: Option<Action>,
    pub transactions: Option<Action>,
    pub acks_all: Option<Action>,
    /// Allowed codecs as a mask over [`CODECS`].
    pub compression: Option<(u8, Action)>,
    pub max_batch_bytes: Option<(u32, Action)>,
    pub max_batch_records: Option<(u32, Action)>,
    pub read_committed: Option<Action>,
    /// Bounds in milliseconds (min, max).
    pub transaction_timeout: Option<((i32, i32), Action)>,
    pub new_producer_ids_per_minute: Option<(u32, Action)>,
    pub owns_transactional_ids: Option<(Vec<String>, Action)>,
}

impl Rule {
    fn matches_topic(&self, topic: &str) -> bool {
        self.topics.as_ref().is_none_or(|t| t.matches(topic))
    }

    pub fn has_topic_checks(&self) -> bool {
        self.idempotence.is_some()
            || self.transactions.is_some()
            || self.acks_all.is_some()
            || self.compression.is_some()
            || self.max_batch_bytes.is_some()
            || self.max_batch_records.is_some()
            || self.read_committed.is_some()
    }

    pub fn has_producer_checks(&self) -> bool {
        self.transaction_timeout.is_some()
            || self.new_producer_ids_per_minute.is_some()
            || self.owns_transactional_ids.is_some()
    }
}

/// A check decided by a rule: which rule, what to do, and its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<T> {
    pub rule: Arc<str>,
    pub action: Action,
    pub value: T,
}

/// Everything the policies demand of one topic for one client. A check decided `allow` is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicPolicy {
    pub idempotence: Option<Decision<()>>,
    pub transactions: Option<Decision<()>>,
    pub acks_all: Option<Decision<()>>,
    pub compression: Option<Decision<u8>>,
    pub max_batch_bytes: Option<Decision<u32>>,
    pub max_batch_records: Option<Decision<u32>>,
    pub read_committed: Option<Decision<()>>,
}

impl TopicPolicy {
    pub fn is_empty(&self) -> bool {
        *self == TopicPolicy::default()
    }

    /// Whether any produce-side check applies.
    pub fn checks_batches(&self) -> bool {
        self.idempotence.is_some()
            || self.transactions.is_some()
            || self.compression.is_some()
            || self.max_batch_bytes.is_some()
            || self.max_batch_records.is_some()
    }
}

/// What the policies demand at InitProducerId from one client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProducerPolicy {
    pub transaction_timeout: Option<Decision<(i32, i32)>>,
    pub new_producer_ids_per_minute: Option<Decision<u32>>,
}

/// First-match-per-check resolution: `slot` is still undecided (`None`) until a rule sets the check.
/// With `keep_allow` an `allow` stays visible as a decision (for explanations); the data path drops it.
fn decide<T: Clone>(
    slot: &mut Option<Option<Decision<T>>>,
    rule: &Rule,
    set: Option<(T, Action)>,
    keep_allow: bool,
) {
    if slot.is_none() {
        if let Some((value, action)) = set {
            *slot = Some((keep_allow || action != Action::Allow).then(|| Decision {
                rule: rule.name.clone(),
                action,
                value,
            }));
        }
    }
}

/// The compiled rule set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    pub rules: Vec<Rule>,
    /// Owned transactional-id prefixes, longest first: (prefix, rule index, action).
    owners: Vec<(String, usize, Action)>,
    /// Whether any rule sets a consume-side check (Fetch/ListOffsets are looked at only then).
    pub consume_checks: bool,
    /// Whether any rule sets a produce-side check.
    pub produce_checks: bool,
    /// Whether any rule sets an InitProducerId check.
    pub producer_checks: bool,
    /// Whether any rule needs the SASL principal.
    pub uses_principals: bool,
}

impl Policies {
    pub fn new(rules: Vec<Rule>) -> Policies {
        let mut owners = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            if let Some((prefixes, action)) = &r.owns_transactional_ids {
                owners.extend(prefixes.iter().map(|p| (p.clone(), i, *action)));
            }
        }
        owners.sort_by_key(|o| std::cmp::Reverse(o.0.len()));
        Policies {
            consume_checks: rules.iter().any(|r| r.read_committed.is_some()),
            produce_checks: rules.iter().any(|r| {
                r.idempotence.is_some()
                    || r.transactions.is_some()
                    || r.acks_all.is_some()
                    || r.compression.is_some()
                    || r.max_batch_bytes.is_some()
                    || r.max_batch_records.is_some()
            }),
            producer_checks: rules.iter().any(Rule::has_producer_checks),
            uses_principals: rules.iter().any(|r| r.clients.principals.is_some()),
            owners,
            rules,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What the rules demand of `topic` for this client (first matching rule per check decides).
    pub fn topic_policy(&self, client: &ClientFacts, topic: &str) -> TopicPolicy {
        self.topic_policy_among(self.rules.iter(), client, topic, false)
    }

    /// As [`Policies::topic_policy`], with `allow` decisions kept (to say which rule exempted what).
    pub fn topic_policy_explained(&self, client: &ClientFacts, topic: &str) -> TopicPolicy {
        self.topic_policy_among(self.rules.iter(), client, topic, true)
    }

    fn topic_policy_among<'r>(
        &self,
        rules: impl Iterator<Item = &'r Rule>,
        client: &ClientFacts,
        topic: &str,
        keep_allow: bool,
    ) -> TopicPolicy {
        let (mut idem, mut txn, mut acks, mut comp, mut bytes, mut recs, mut rc) =
            (None, None, None, None, None, None, None);
        for r in rules {
            if !r.matches_topic(topic) || !r.clients.matches(client) {
                continue;
            }
            decide(&mut idem, r, r.idempotence.map(|a| ((), a)), keep_allow);
            decide(&mut txn, r, r.transactions.map(|a| ((), a)), keep_allow);
            decide(&mut acks, r, r.acks_all.map(|a| ((), a)), keep_allow);
            decide(&mut comp, r, r.compression, keep_allow);
            decide(&mut bytes, r, r.max_batch_bytes, keep_allow);
            decide(&mut recs, r, r.max_batch_records, keep_allow);
            decide(&mut rc, r, r.read_committed.map(|a| ((), a)), keep_allow);
        }
        TopicPolicy {
            idempotence: idem.flatten(),
            transactions: txn.flatten(),
            acks_all: acks.flatten(),
            compression: comp.flatten(),
            max_batch_bytes: bytes.flatten(),
            max_batch_records: recs.flatten(),
            read_committed: rc.flatten(),
        }
    }

    /// What the rules demand at InitProducerId from this client (rules without topics only).
    pub fn producer_policy(&self, client: &ClientFacts) -> ProducerPolicy {
        self.producer_policy_with(client, false)
    }

    pub fn producer_policy_with(&self, client: &ClientFacts, keep_allow: bool) -> ProducerPolicy {
        let (mut timeout, mut rate) = (None, None);
        for r in &self.rules {
            if r.topics.is_some() || !r.clients.matches(client) {
                continue;
            }
            decide(&mut timeout, r, r.transaction_timeout, keep_allow);
            decide(&mut rate, r, r.new_producer_ids_per_minute, keep_allow);
        }
        ProducerPolicy {
            transaction_timeout: timeout.flatten(),
            new_producer_ids_per_minute: rate.flatten(),
        }
    }

    /// If `transactional_id` falls under an owned prefix that this client does not own: the owning
    /// rule, the prefix and the action.
    pub fn foreign_transactional_id(
        &self,
        client: &ClientFacts,
        transactional_id: &str,
    ) -> Option<(&Rule, &str, Action)> {
        let (prefix, i, action) = self
            .owners
            .iter()
            .find(|(p, _, _)| transactional_id.starts_with(p.as_str()))?;
        let rule = &self.rules[*i];
        (!rule.clients.matches(client)).then_some((rule, prefix.as_str(), *action))
    }
}

/// The live rule set, swapped whole on reload. Readers never lock: `ArcSwap` gives every request a
/// consistent snapshot, and a reload never leaves a half-applied rule set.
pub struct PolicyHolder {
    current: ArcSwap<Policies>,
    generation: AtomicU64,
    /// New producer ids per client in the last minute (KIP-936), shared by every connection.
    pub new_pids: rate::PerMinute,
}

impl PolicyHolder {
    pub fn new(policies: Policies) -> Self {
        PolicyHolder {
            current: ArcSwap::from_pointee(policies),
            generation: AtomicU64::new(1),
            new_pids: rate::PerMinute::new(rate::MAX_CLIENTS),
        }
    }

    pub fn load(&self) -> (u64, Arc<Policies>) {
        // Read the generation first: a swap in between makes us rebuild caches once more, never miss one.
        let generation = self.generation.load(Ordering::Acquire);
        (generation, self.current.load_full())
    }

    pub fn replace(&self, policies: Policies) {
        self.current.store(Arc::new(policies));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// One connection's view of the live rules, rebuilt when the rules or what we know of the client change.
/// Topic decisions are memoised: the hot path costs one hash lookup per topic per request.
#[derive(Default)]
pub struct ConnPolicies {
    generation: u64,
    facts_version: u32,
    policies: Arc<Policies>,
    /// Indices of the rules whose client conditions match this connection.
    applicable: Vec<usize>,
    topics: HashMap<String, Arc<TopicPolicy>>,
    /// A fetch on this connection was upgraded to read_committed: later fetches of the same fetch
    /// session may list no topics at all (incremental fetch), so the upgrade sticks to the connection.
    pub read_committed_forced: bool,
    /// Topics already reported once on this connection (audit lines are per connection and topic).
    pub reported: HashSet<(Check, String)>,
}

/// Memoised topics per connection, before the cache is cleared (a client cycling through many topics).
const MAX_CACHED_TOPICS: usize = 4096;

/// Entries dropped from connections' policy caches to stay within [`MAX_CACHED_TOPICS`], process-wide.
static CACHE_EVICTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn cache_evictions() -> u64 {
    CACHE_EVICTIONS.load(Ordering::Relaxed)
}

impl ConnPolicies {
    /// Brings the cache up to date; `facts_version` changes when the client id or principal is learned.
    pub fn refresh(&mut self, holder: &PolicyHolder, facts_version: u32, client: &ClientFacts) {
        let generation = holder.generation.load(Ordering::Acquire);
        if generation == self.generation && facts_version == self.facts_version {
            return;
        }
        let (generation, policies) = holder.load();
        self.applicable = policies
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.clients.matches(client))
            .map(|(i, _)| i)
            .collect();
        self.policies = policies;
        self.generation = generation;
        self.facts_version = facts_version;
        self.topics.clear();
        self.reported.clear();
    }

    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// The first rule that applies to this connection and upgrades read_uncommitted reads of some topic.
    /// For a topic named only by an id the proxy cannot name, the read is upgraded if any such rule
    /// exists (conservative: it may upgrade a topic no rule names, never miss one a rule does).
    pub fn any_read_committed_upgrade(&self) -> Option<Arc<str>> {
        self.applicable
            .iter()
            .map(|i| &self.policies.rules[*i])
            .find(|r| r.read_committed == Some(Action::Upgrade))
            .map(|r| r.name.clone())
    }

    pub fn topic(&mut self, client: &ClientFacts, topic: &str) -> Arc<TopicPolicy> {
        if let Some(p) = self.topics.get(topic) {
            return p.clone();
        }
        let rules = self.applicable.iter().map(|i| &self.policies.rules[*i]);
        let p = Arc::new(
            self.policies
                .topic_policy_among(rules, client, topic, false),
        );
        // A name longer than any topic can have is answered but not kept (it costs its length each time).
        if topic.len() <= crate::protocol::MAX_TOPIC_NAME_BYTES {
            if self.topics.len() >= MAX_CACHED_TOPICS {
                CACHE_EVICTIONS.fetch_add(self.topics.len() as u64, Ordering::Relaxed);
                self.topics.clear();
            }
            self.topics.insert(topic.to_string(), p.clone());
        }
        p
    }

    /// True the first time (check, topic) is reported on this connection.
    pub fn first_report(&mut self, check: Check, topic: &str) -> bool {
        if self.reported.len() >= MAX_CACHED_TOPICS {
            CACHE_EVICTIONS.fetch_add(self.reported.len() as u64, Ordering::Relaxed);
            self.reported.clear();
        }
        let topic = crate::metrics::cut_to(topic, crate::protocol::MAX_TOPIC_NAME_BYTES);
        self.reported.insert((check, topic.to_string()))
    }
}

#[cfg(test)]
mod tests;

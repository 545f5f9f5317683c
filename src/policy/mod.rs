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

pub mod checks;
pub mod explain;
mod matching;
pub mod parse;
pub mod rate;
pub mod report;
pub mod sasl;
pub mod wire;

use crate::client::Client;
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use checks::{
    codec_list, codec_name, Action, Check, Decision, Decisions, Scope, Setting, Settings, Value,
    CODECS,
};
pub use matching::{Cidr, ClientMatch, NameMatch};

/// One rule from the config, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: Arc<str>,
    /// `None`: every topic.
    pub topics: Option<NameMatch>,
    pub clients: ClientMatch,
    /// The checks the rule sets, with their actions and values.
    pub settings: Settings,
}

impl Rule {
    fn matches_topic(&self, topic: &str) -> bool {
        self.topics.as_ref().is_none_or(|t| t.matches(topic))
    }

    /// Whether the rule sets any check decided per topic (produce or consume).
    pub fn has_topic_checks(&self) -> bool {
        self.settings.iter().any(|(r, _)| r.scope.per_topic())
    }

    /// Whether the rule sets any InitProducerId check.
    pub fn has_producer_checks(&self) -> bool {
        self.settings.any_in(Scope::Producers)
    }
}

/// Everything the policies demand of one topic for one client (produce and consume checks).
pub type TopicPolicy = Decisions;

/// What the policies demand at InitProducerId from one client (owners aside: see
/// [`Policies::foreign_transactional_id`]).
pub type ProducerPolicy = Decisions;

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
            if let Some(s) = r.settings.get(Check::TransactionalIdOwner) {
                if let Value::Prefixes(prefixes) = &s.value {
                    owners.extend(prefixes.iter().map(|p| (p.clone(), i, s.action)));
                }
            }
        }
        owners.sort_by_key(|o| std::cmp::Reverse(o.0.len()));
        let any_in = |scope| rules.iter().any(|r| r.settings.any_in(scope));
        Policies {
            consume_checks: any_in(Scope::Consume),
            produce_checks: any_in(Scope::Produce),
            producer_checks: any_in(Scope::Producers),
            uses_principals: rules.iter().any(|r| r.clients.principals.is_some()),
            owners,
            rules,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What the rules demand of `topic` for this client (first matching rule per check decides).
    pub fn topic_policy(&self, client: &Client, topic: &str) -> TopicPolicy {
        self.topic_policy_among(self.rules.iter(), client, topic, false)
    }

    /// As [`Policies::topic_policy`], with `allow` decisions kept (to say which rule exempted what).
    pub fn topic_policy_explained(&self, client: &Client, topic: &str) -> TopicPolicy {
        self.topic_policy_among(self.rules.iter(), client, topic, true)
    }

    fn topic_policy_among<'r>(
        &self,
        rules: impl Iterator<Item = &'r Rule>,
        client: &Client,
        topic: &str,
        keep_allow: bool,
    ) -> TopicPolicy {
        let matching = rules
            .filter(|r| r.matches_topic(topic) && r.clients.matches(client))
            .map(|r| (&r.name, &r.settings));
        Decisions::first_match(matching, Scope::per_topic, keep_allow)
    }

    /// What the rules demand at InitProducerId from this client (rules without topics only).
    pub fn producer_policy(&self, client: &Client) -> ProducerPolicy {
        self.producer_policy_with(client, false)
    }

    pub fn producer_policy_with(&self, client: &Client, keep_allow: bool) -> ProducerPolicy {
        let matching = self
            .rules
            .iter()
            .filter(|r| r.topics.is_none() && r.clients.matches(client))
            .map(|r| (&r.name, &r.settings));
        Decisions::first_match(matching, |s| s == Scope::Producers, keep_allow)
    }

    /// If `transactional_id` falls under an owned prefix that this client does not own: the owning
    /// rule, the prefix and the action.
    pub fn foreign_transactional_id(
        &self,
        client: &Client,
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
    pub fn refresh(&mut self, holder: &PolicyHolder, facts_version: u32, client: &Client) {
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
            .find(|r| r.settings.action(Check::ReadCommitted) == Some(Action::Upgrade))
            .map(|r| r.name.clone())
    }

    pub fn topic(&mut self, client: &Client, topic: &str) -> Arc<TopicPolicy> {
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

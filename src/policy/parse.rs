//! `policies:` in the config file: a list of rules, every problem reported with its key path
//! (`policies[2].match.topics.regex[0]: invalid regex ...`), contradictions included.

use super::{Action, Check, Cidr, ClientMatch, NameMatch, Policies, Rule, CODECS};
use crate::config::reader::{describe, Problem, Section};
use serde_yaml::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const RULE_KEYS: &[&str] = &["name", "match", "produce", "consume", "producers"];

/// Most rules a config may have: each rule is checked for every new topic a connection names, so the
/// count bounds that work (and a 10 MB file of rules is a mistake, not a policy).
pub const MAX_RULES: usize = 1_000;

pub fn parse_policies(root: &Section) -> Policies {
    let mut rules = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for s in root.items("policies") {
        let name = s.string("name", None);
        if !name.is_empty() {
            if let Some(first) = names.get(&name) {
                s.problem("name", &format!("'{name}' is already the name of {first}"));
            } else {
                names.insert(name.clone(), s.path().to_string());
            }
        }
        if let Some(rule) = parse_rule(&s, name) {
            rules.push(rule);
        }
    }
    check_owners(root, &rules);
    Policies::new(rules)
}

fn parse_rule(s: &Section, name: String) -> Option<Rule> {
    let m = s.section("match", false);
    let topics = m.has("topics").then(|| name_match(&m, "topics")).flatten();
    let ids = m
        .has("client_ids")
        .then(|| name_match(&m, "client_ids"))
        .flatten();
    let addresses: Vec<Cidr> = m
        .string_list("client_addresses", false, |v| Cidr::parse(v).err())
        .iter()
        .filter_map(|v| Cidr::parse(v).ok())
        .collect();
    let listed = m
        .raw("client_addresses")
        .and_then(Value::as_sequence)
        .map(Vec::len);
    if listed == Some(0) {
        m.problem("client_addresses", "must list at least one address range");
    }
    let principals = m.has("principals").then(|| {
        let p = m.string_list("principals", true, |v| {
            (!v.contains(':')).then(|| format!("'{v}' is not a principal like User:alice"))
        });
        p.into_iter().collect::<HashSet<String>>()
    });
    m.finish(&["topics", "client_ids", "client_addresses", "principals"]);

    let p = s.section("produce", false);
    let idempotence = action(&p, "idempotence", Check::Idempotence);
    let transactions = action(&p, "transactions", Check::Transactions);
    let acks_all = action(&p, "acks_all", Check::AcksAll);
    let compression = p.optional_section("compression").and_then(|c| {
        let codecs = c.string_list("allowed", true, |v| {
            (!CODECS.contains(&v)).then(|| format!("'{v}' is not one of {}", CODECS.join(", ")))
        });
        let action = required_action(&c, Check::Compression);
        c.finish(&["allowed", "action"]);
        let mask = codecs.iter().fold(0u8, |m, v| {
            m | CODECS.iter().position(|c| c == v).map_or(0, |i| 1u8 << i)
        });
        Some((mask, action?))
    });
    let max_batch_bytes = limit(
        &p,
        "max_batch_bytes",
        Check::MaxBatchBytes,
        1,
        i32::MAX as i64,
    );
    let max_batch_records = limit(
        &p,
        "max_batch_records",
        Check::MaxBatchRecords,
        1,
        i32::MAX as i64,
    );
    p.finish(&[
        "idempotence",
        "transactions",
        "acks_all",
        "compression",
        "max_batch_bytes",
        "max_batch_records",
    ]);

    let c = s.section("consume", false);
    let read_committed = action(&c, "read_committed", Check::ReadCommitted);
    c.finish(&["read_committed"]);

    let pr = s.section("producers", false);
    let transaction_timeout = pr.optional_section("transaction_timeout_ms").and_then(|t| {
        let min = t.int("min", Some(1), 1, i32::MAX as i64) as i32;
        let max = t.int("max", Some(i32::MAX as i64), 1, i32::MAX as i64) as i32;
        if !t.has("min") && !t.has("max") {
            t.problem_here("needs 'min', 'max' or both");
        }
        if min > max {
            t.problem("min", &format!("min {min} is above max {max}"));
        }
        let a = required_action(&t, Check::TransactionTimeout);
        t.finish(&["min", "max", "action"]);
        Some(((min, max), a?))
    });
    let new_producer_ids_per_minute = limit(
        &pr,
        "new_producer_ids_per_minute",
        Check::NewProducerIdsPerMinute,
        1,
        1_000_000,
    );
    let owns_transactional_ids = pr.optional_section("owns_transactional_ids").and_then(|o| {
        let prefixes = o.string_list("prefixes", true, |_| None);
        let a = required_action(&o, Check::TransactionalIdOwner);
        o.finish(&["prefixes", "action"]);
        Some((prefixes, a?))
    });
    pr.finish(&[
        "transaction_timeout_ms",
        "new_producer_ids_per_minute",
        "owns_transactional_ids",
    ]);
    s.finish(RULE_KEYS);

    let rule = Rule {
        name: Arc::from(name.as_str()),
        topics,
        clients: ClientMatch {
            ids,
            addresses,
            principals,
        },
        idempotence,
        transactions,
        acks_all,
        compression,
        max_batch_bytes,
        max_batch_records,
        read_committed,
        transaction_timeout,
        new_producer_ids_per_minute,
        owns_transactional_ids,
    };
    // Contradictions within one rule.
    if !rule.has_topic_checks() && !rule.has_producer_checks() && !s_has_any(s) {
        s.problem_here("sets no check: add 'produce', 'consume' or 'producers'");
    }
    if rule.topics.is_some() && rule.has_producer_checks() {
        s.problem(
            "producers",
            "InitProducerId names no topic, so producer checks cannot apply to 'match.topics'; \
             put them in a rule without topics",
        );
    }
    if rule.owns_transactional_ids.is_some() && rule.clients.is_everyone() {
        s.problem(
            "producers.owns_transactional_ids",
            "an owner needs 'match.client_ids', 'match.principals' or 'match.client_addresses' \
             (owned by every client means owned by no one)",
        );
    }
    if let (Some(Action::Reject | Action::Upgrade), Some(Action::Allow)) =
        (rule.transactions, rule.idempotence)
    {
        s.problem(
            "produce.idempotence",
            "'allow' contradicts 'transactions' being required: transactional batches are idempotent",
        );
    }
    Some(rule)
}

/// Whether the rule has any check section at all (an empty one is reported above, not twice).
fn s_has_any(s: &Section) -> bool {
    ["produce", "consume", "producers"].iter().any(|k| {
        s.raw(k)
            .and_then(Value::as_mapping)
            .is_some_and(|m| !m.is_empty())
    })
}

fn action(s: &Section, key: &str, check: Check) -> Option<Action> {
    let v = s.raw(key)?;
    let Some(text) = v.as_str() else {
        s.problem(key, &format!("must be an action, got {}", describe(v)));
        return None;
    };
    let a = match text {
        "allow" => Action::Allow,
        "audit" => Action::Audit,
        "upgrade" => Action::Upgrade,
        "reject" => Action::Reject,
        other => {
            s.problem(
                key,
                &format!("'{other}' is not an action (allow, audit, upgrade, reject)"),
            );
            return None;
        }
    };
    if !check.actions().contains(&a) {
        let why = match (check, a) {
            (Check::ReadCommitted, Action::Reject) => {
                "a read_uncommitted fetch cannot be refused with a useful error; use 'upgrade'"
            }
            (Check::TransactionalIdOwner, Action::Allow) => "use 'audit' or 'reject'",
            (Check::TransactionalIdOwner, Action::Upgrade) => {
                "a foreign transactional id cannot be made ours"
            }
            _ => "the proxy cannot make such a request compliant without changing what was written",
        };
        let allowed: Vec<&str> = check.actions().iter().map(|a| a.name()).collect();
        s.problem(
            key,
            &format!(
                "'{text}' is not possible for {} ({why}); choose one of {}",
                check.name(),
                allowed.join(", ")
            ),
        );
        return None;
    }
    Some(a)
}

/// The `action` key of a check with parameters: required.
fn required_action(s: &Section, check: Check) -> Option<Action> {
    if !s.has("action") {
        s.problem("action", "is required");
        return None;
    }
    action(s, "action", check)
}

/// `{ limit: N, action: A }`.
fn limit(s: &Section, key: &str, check: Check, min: i64, max: i64) -> Option<(u32, Action)> {
    let l = s.optional_section(key)?;
    let value = l.int("limit", None, min, max) as u32;
    let a = required_action(&l, check);
    l.finish(&["limit", "action"]);
    Some((value, a?))
}

/// A name matcher: a plain list (exact names) or `{ exact: [], prefix: [], regex: [] }`.
fn name_match(s: &Section, key: &str) -> Option<NameMatch> {
    let (exact, prefix, regex) = match s.raw(key) {
        Some(Value::Sequence(_)) => (s.string_list(key, true, |_| None), Vec::new(), Vec::new()),
        Some(Value::Mapping(_)) => {
            let m = s.section(key, false);
            let exact = m.string_list("exact", false, |_| None);
            let prefix = m.string_list("prefix", false, |_| None);
            let regex = m.string_list("regex", false, |r| {
                regex::Regex::new(r)
                    .err()
                    .map(|e| format!("invalid regex: {}", first_line(&e.to_string())))
            });
            m.finish(&["exact", "prefix", "regex"]);
            if exact.is_empty() && prefix.is_empty() && regex.is_empty() && !m_has_bad(&m) {
                m.problem_here("needs at least one of 'exact', 'prefix', 'regex'");
            }
            (exact, prefix, regex)
        }
        Some(other) => {
            s.problem(
                key,
                &format!(
                    "must be a list of names or {{exact, prefix, regex}}, got {}",
                    describe(other)
                ),
            );
            return None;
        }
        None => return None,
    };
    NameMatch::new(exact, prefix, regex).ok()
}

/// Whether a matcher section has entries that were reported already (so "needs one" is not added).
fn m_has_bad(m: &Section) -> bool {
    ["exact", "prefix", "regex"].iter().any(|k| m.has(k))
}

fn first_line(s: &str) -> String {
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_string()
}

/// Two rules owning the same transactional-id prefix contradict each other.
fn check_owners(root: &Section, rules: &[Rule]) {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some((prefixes, _)) = &r.owns_transactional_ids {
            for (j, p) in prefixes.iter().enumerate() {
                if let Some(other) = seen.insert(p.as_str(), &r.name) {
                    if other != &*r.name {
                        root.problems_push(Problem {
                            path: format!(
                                "policies[{i}].producers.owns_transactional_ids.prefixes[{j}]"
                            ),
                            message: format!(
                                "transactional id prefix '{p}' is already owned by rule '{other}'"
                            ),
                        });
                    }
                }
            }
        }
    }
}

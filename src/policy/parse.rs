//! `policies:` in the config file: a list of rules, every problem reported with its key path
//! (`policies[2].match.topics.regex[0]: invalid regex ...`), contradictions included.

use super::checks::{Row, Shape, ROWS};
use super::{
    Action, Check, Cidr, ClientMatch, NameMatch, Policies, Rule, Scope, Setting, Settings, Value,
    CODECS,
};
use crate::config::reader::{describe, Problem, Section};
use serde_yaml::Value as Yaml;
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
        .and_then(Yaml::as_sequence)
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

    // Every check, section by section, as its row says.
    let mut settings = Settings::default();
    for scope in Scope::ALL {
        let section = s.section(scope.section(), false);
        let rows: Vec<&Row> = ROWS.iter().filter(|r| r.scope == scope).collect();
        for row in &rows {
            if let Some(setting) = setting(&section, row) {
                settings.set(row.check, setting);
            }
        }
        let keys: Vec<&str> = rows.iter().map(|r| r.key).collect();
        section.finish(&keys);
    }
    s.finish(RULE_KEYS);

    let rule = Rule {
        name: Arc::from(name.as_str()),
        topics,
        clients: ClientMatch {
            ids,
            addresses,
            principals,
        },
        settings,
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
    let set = |c: Check| rule.settings.action(c);
    if set(Check::TransactionalIdOwner).is_some() && rule.clients.is_everyone() {
        s.problem(
            &Check::TransactionalIdOwner.row().path(),
            "an owner needs 'match.client_ids', 'match.principals' or 'match.client_addresses' \
             (owned by every client means owned by no one)",
        );
    }
    if let (Some(Action::Reject | Action::Upgrade), Some(Action::Allow)) =
        (set(Check::Transactions), set(Check::Idempotence))
    {
        s.problem(
            &Check::Idempotence.row().path(),
            "'allow' contradicts 'transactions' being required: transactional batches are idempotent",
        );
    }
    Some(rule)
}

/// Whether the rule has any check section at all (an empty one is reported above, not twice).
fn s_has_any(s: &Section) -> bool {
    Scope::ALL.iter().map(|s| s.section()).any(|k| {
        s.raw(k)
            .and_then(Yaml::as_mapping)
            .is_some_and(|m| !m.is_empty())
    })
}

/// One check's setting from its section, by the row's shape; `None` if absent or wrong (reported).
fn setting(s: &Section, row: &Row) -> Option<Setting> {
    let key = row.key;
    if !s.has(key) {
        return None;
    }
    if row.shape == Shape::Action {
        let action = action(s, key, row)?;
        return Some(Setting {
            action,
            value: Value::None,
        });
    }
    let c = s.optional_section(key)?;
    let (value, keys): (Option<Value>, &[&str]) = match row.shape {
        Shape::Action => (Some(Value::None), &[]),
        Shape::Codecs => {
            let codecs = c.string_list("allowed", true, |v| {
                (!CODECS.contains(&v)).then(|| format!("'{v}' is not one of {}", CODECS.join(", ")))
            });
            let mask = codecs.iter().fold(0u8, |m, v| {
                m | CODECS.iter().position(|c| c == v).map_or(0, |i| 1u8 << i)
            });
            (Some(Value::Codecs(mask)), &["allowed"])
        }
        Shape::Limit { min, max } => {
            let n = c.int("limit", None, min, max) as u32;
            (Some(Value::Limit(n)), &["limit"])
        }
        Shape::Bounds => {
            let min = c.int("min", Some(1), 1, i32::MAX as i64) as i32;
            let max = c.int("max", Some(i32::MAX as i64), 1, i32::MAX as i64) as i32;
            if !c.has("min") && !c.has("max") {
                c.problem_here("needs 'min', 'max' or both");
            }
            if min > max {
                c.problem("min", &format!("min {min} is above max {max}"));
            }
            (Some(Value::Bounds(min, max)), &["min", "max"])
        }
        Shape::Prefixes => {
            let prefixes = c.string_list("prefixes", true, |_| None);
            (Some(Value::Prefixes(prefixes)), &["prefixes"])
        }
    };
    let action = if c.has("action") {
        action(&c, "action", row)
    } else {
        c.problem("action", "is required");
        None
    };
    let mut all = keys.to_vec();
    all.push("action");
    c.finish(&all);
    Some(Setting {
        action: action?,
        value: value?,
    })
}

fn action(s: &Section, key: &str, row: &Row) -> Option<Action> {
    let v = s.raw(key)?;
    let Some(text) = v.as_str() else {
        s.problem(key, &format!("must be an action, got {}", describe(v)));
        return None;
    };
    let answer = row.check == Check::DuplicateContent && text == "answer";
    let Some(a) = Action::ALL
        .into_iter()
        .find(|a| a.name() == text || (answer && *a == Action::Upgrade))
    else {
        s.problem(
            key,
            &format!("'{text}' is not an action (allow, audit, upgrade, reject)"),
        );
        return None;
    };
    if !row.actions.contains(&a) {
        let allowed: Vec<&str> = row.actions.iter().map(|a| a.name()).collect();
        s.problem(
            key,
            &format!(
                "'{text}' is not possible for {} ({}); choose one of {}",
                row.key,
                row.not_possible,
                allowed.join(", ")
            ),
        );
        return None;
    }
    Some(a)
}

/// A name matcher: a plain list (exact names) or `{ exact: [], prefix: [], regex: [] }`.
fn name_match(s: &Section, key: &str) -> Option<NameMatch> {
    let (exact, prefix, regex) = match s.raw(key) {
        Some(Yaml::Sequence(_)) => (s.string_list(key, true, |_| None), Vec::new(), Vec::new()),
        Some(Yaml::Mapping(_)) => {
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
        let owned = r.settings.get(Check::TransactionalIdOwner);
        if let Some(Setting {
            value: Value::Prefixes(prefixes),
            ..
        }) = owned
        {
            for (j, p) in prefixes.iter().enumerate() {
                if let Some(other) = seen.insert(p.as_str(), &r.name) {
                    if other != &*r.name {
                        root.problems_push(Problem {
                            path: format!(
                                "policies[{i}].{}.prefixes[{j}]",
                                Check::TransactionalIdOwner.row().path()
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

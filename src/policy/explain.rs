//! `check-config` output for policies: what each rule will do, in words, and how a given topic and
//! client resolve when rules overlap.

use super::checks::{Row, ROWS};
use super::{codec_list, Action, Decision, Policies, Rule, Value};
use crate::client::Client;
use std::fmt::Write;

fn what(action: Action, fail: &str, reject: &str, upgrade: &str) -> String {
    match action {
        Action::Allow => format!("allow {fail} (exempt from later rules)"),
        Action::Audit => format!("audit {fail} (count + audit event, let it through)"),
        Action::Upgrade => format!("{upgrade} (count + audit event)"),
        Action::Reject => format!("reject {fail} with {reject}"),
    }
}

/// One line per check the rule sets, worded by the check's row.
pub fn rule_lines(r: &Rule) -> Vec<String> {
    r.settings
        .iter()
        .map(|(row, s)| {
            let (code, name) = row.error;
            what(
                s.action,
                &(row.fails)(&s.value),
                &format!("{name} ({code}){}", row.reject_note),
                &(row.upgrade)(&s.value),
            )
        })
        .collect()
}

pub fn explain(p: &Policies) -> String {
    let mut out = String::new();
    if p.rules.is_empty() {
        out.push_str("policies: none (every request passes as the client sent it)\n");
        return out;
    }
    let _ = writeln!(
        out,
        "policies: {} rule(s). For each check, the first rule (in this order) that matches the topic \
         and the client decides; 'allow' in an earlier rule exempts from later ones. Transactional-id \
         ownership: the longest owned prefix decides.",
        p.rules.len()
    );
    for (i, r) in p.rules.iter().enumerate() {
        let topics = r.topics.as_ref().map_or("every topic".to_string(), |t| {
            format!("topics {}", t.describe())
        });
        let scope = if r.has_producer_checks() && !r.has_topic_checks() {
            format!("InitProducerId from {}", r.clients.describe())
        } else {
            format!("{topics}, from {}", r.clients.describe())
        };
        let _ = writeln!(out, "  [{i}] {}: {scope}", r.name);
        for line in rule_lines(r) {
            let _ = writeln!(out, "      - {line}");
        }
        // Checks an earlier rule with the same scope already decides: this rule never applies them.
        for earlier in &p.rules[..i] {
            if earlier.topics == r.topics && earlier.clients.is_everyone() {
                let shadowed = shadowed_checks(earlier, r);
                if !shadowed.is_empty() {
                    let _ = writeln!(
                        out,
                        "      ! never applies {} (rule '{}' above matches the same topics for every client)",
                        shadowed.join(", "),
                        earlier.name
                    );
                }
            }
        }
    }
    out
}

/// The checks both rules set where `earlier` always decides first (same topics, every client).
fn shadowed_checks(earlier: &Rule, r: &Rule) -> Vec<&'static str> {
    r.settings
        .iter()
        .filter(|(row, _)| row.first_match() && earlier.settings.get(row.check).is_some())
        // InitProducerId checks are decided by rules without topics only.
        .filter(|(row, _)| row.scope.per_topic() || earlier.topics.is_none())
        .map(|(row, _)| row.key)
        .collect()
}

fn decided(out: &mut String, row: &Row, d: Option<&Decision>) {
    let name = row.key;
    match d {
        Some(d) => {
            let v = match &d.value {
                Value::None | Value::Prefixes(_) => String::new(),
                Value::Codecs(m) => format!(" allowed {}", codec_list(*m)),
                Value::Limit(n) => format!(" {n}"),
                Value::Bounds(a, b) => format!(" {a}..={b}"),
            };
            let _ = writeln!(
                out,
                "  {name}:{v} -> {} (rule '{}')",
                d.action.name(),
                d.rule
            );
        }
        None => {
            let _ = writeln!(out, "  {name}: not checked");
        }
    }
}

/// How the rules resolve for one topic and client (`check-config --topic ... --client-id ...`).
pub fn resolve(p: &Policies, client: &Client, topic: Option<&str>, txn: Option<&str>) -> String {
    let mut out = String::new();
    let who = format!(
        "client id {}, address {}, principal {}",
        client.client_id().unwrap_or("(none)"),
        client.ip(),
        client.principal().unwrap_or("(none)")
    );
    if let Some(topic) = topic {
        let t = p.topic_policy_explained(client, topic);
        let _ = writeln!(out, "topic '{topic}' for {who}:");
        for row in ROWS.iter().filter(|r| r.scope.per_topic()) {
            decided(&mut out, row, t.get(row.check));
        }
    }
    let pp = p.producer_policy_with(client, true);
    let _ = writeln!(out, "InitProducerId for {who}:");
    for row in ROWS
        .iter()
        .filter(|r| !r.scope.per_topic() && r.first_match())
    {
        decided(&mut out, row, pp.get(row.check));
    }
    if let Some(txn) = txn {
        match p.foreign_transactional_id(client, txn) {
            Some((rule, prefix, action)) => {
                let _ = writeln!(
                    out,
                    "  transactional id '{txn}': under '{prefix}', owned by rule '{}' ({}) -> {}",
                    rule.name,
                    rule.clients.describe(),
                    action.name()
                );
            }
            None => {
                let _ = writeln!(out, "  transactional id '{txn}': allowed for this client");
            }
        }
    }
    out
}

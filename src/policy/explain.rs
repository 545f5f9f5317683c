//! `check-config` output for policies: what each rule will do, in words, and how a given topic and
//! client resolve when rules overlap.

use super::{codec_name, Action, ClientFacts, Decision, Policies, Rule, TopicPolicy, CODECS};
use std::fmt::Write;

fn codecs(mask: u8) -> String {
    (0..CODECS.len() as u8)
        .filter(|c| mask & (1 << c) != 0)
        .map(codec_name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn what(action: Action, fail: &str, reject: &str, upgrade: &str) -> String {
    match action {
        Action::Allow => format!("allow {fail} (exempt from later rules)"),
        Action::Audit => format!("audit {fail} (count + audit event, let it through)"),
        Action::Upgrade => format!("{upgrade} (count + audit event)"),
        Action::Reject => format!("reject {fail} with {reject}"),
    }
}

/// One line per check the rule sets.
pub fn rule_lines(r: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(a) = r.idempotence {
        out.push(what(
            a,
            "non-idempotent batches",
            "POLICY_VIOLATION (44)",
            "",
        ));
    }
    if let Some(a) = r.transactions {
        out.push(what(
            a,
            "non-transactional batches",
            "POLICY_VIOLATION (44)",
            "",
        ));
    }
    if let Some(a) = r.acks_all {
        out.push(what(
            a,
            "acks=1 and acks=0 produce requests",
            "INVALID_REQUIRED_ACKS (21) for acks=1; acks=0 cannot be answered, so nothing is written and the connection is closed (as the broker does)",
            "send acks=1 and acks=0 requests as acks=all (an acks=0 client still gets no answer; a refused write closes its connection)",
        ));
    }
    if let Some((mask, a)) = r.compression {
        out.push(what(
            a,
            &format!("batches compressed other than {}", codecs(mask)),
            "UNSUPPORTED_COMPRESSION_TYPE (76)",
            "",
        ));
    }
    if let Some((n, a)) = r.max_batch_bytes {
        out.push(what(
            a,
            &format!("batches over {n} bytes"),
            "MESSAGE_TOO_LARGE (10)",
            "",
        ));
    }
    if let Some((n, a)) = r.max_batch_records {
        out.push(what(
            a,
            &format!("batches over {n} records"),
            "POLICY_VIOLATION (44)",
            "",
        ));
    }
    if let Some(a) = r.read_committed {
        out.push(what(
            a,
            "read_uncommitted Fetch/ListOffsets",
            "",
            "send read_uncommitted Fetch/ListOffsets as read_committed and remove aborted batches from the answers",
        ));
    }
    if let Some(((min, max), a)) = r.transaction_timeout {
        out.push(what(
            a,
            &format!("InitProducerId with transaction.timeout.ms outside {min}..={max}"),
            "INVALID_TRANSACTION_TIMEOUT (50)",
            &format!("clamp transaction.timeout.ms into {min}..={max}"),
        ));
    }
    if let Some((n, a)) = r.new_producer_ids_per_minute {
        out.push(what(
            a,
            &format!(
                "more than {n} new producer ids per client (client id, else address) per minute"
            ),
            "THROTTLING_QUOTA_EXCEEDED (89) and a throttle time until the window has room",
            "",
        ));
    }
    if let Some((prefixes, a)) = &r.owns_transactional_ids {
        let p: Vec<String> = prefixes.iter().map(|p| format!("'{p}*'")).collect();
        out.push(format!(
            "transactional ids {} belong to the clients this rule matches; {}",
            p.join(", "),
            what(
                *a,
                "InitProducerId for them from any other client",
                "TRANSACTIONAL_ID_AUTHORIZATION_FAILED (53)",
                ""
            )
        ));
    }
    out
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

fn shadowed_checks(earlier: &Rule, r: &Rule) -> Vec<&'static str> {
    let mut s = Vec::new();
    macro_rules! both {
        ($f:ident, $n:expr) => {
            if earlier.$f.is_some() && r.$f.is_some() {
                s.push($n);
            }
        };
    }
    both!(idempotence, "idempotence");
    both!(transactions, "transactions");
    both!(acks_all, "acks_all");
    both!(compression, "compression");
    both!(max_batch_bytes, "max_batch_bytes");
    both!(max_batch_records, "max_batch_records");
    both!(read_committed, "read_committed");
    if earlier.topics.is_none() {
        both!(transaction_timeout, "transaction_timeout_ms");
        both!(new_producer_ids_per_minute, "new_producer_ids_per_minute");
    }
    s
}

fn decided<T>(out: &mut String, name: &str, d: &Option<Decision<T>>, value: impl Fn(&T) -> String) {
    match d {
        Some(d) => {
            let v = value(&d.value);
            let v = if v.is_empty() { v } else { format!(" {v}") };
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
pub fn resolve(
    p: &Policies,
    client: &ClientFacts,
    topic: Option<&str>,
    txn: Option<&str>,
) -> String {
    let mut out = String::new();
    let who = format!(
        "client id {}, address {}, principal {}",
        client.client_id.unwrap_or("(none)"),
        client.address,
        client.principal.unwrap_or("(none)")
    );
    if let Some(topic) = topic {
        let t: TopicPolicy = p.topic_policy_explained(client, topic);
        let _ = writeln!(out, "topic '{topic}' for {who}:");
        decided(&mut out, "idempotence", &t.idempotence, |_| String::new());
        decided(&mut out, "transactions", &t.transactions, |_| String::new());
        decided(&mut out, "acks_all", &t.acks_all, |_| String::new());
        decided(&mut out, "compression", &t.compression, |m| {
            format!("allowed {}", codecs(*m))
        });
        decided(&mut out, "max_batch_bytes", &t.max_batch_bytes, |n| {
            n.to_string()
        });
        decided(&mut out, "max_batch_records", &t.max_batch_records, |n| {
            n.to_string()
        });
        decided(&mut out, "read_committed", &t.read_committed, |_| {
            String::new()
        });
    }
    let pp = p.producer_policy_with(client, true);
    let _ = writeln!(out, "InitProducerId for {who}:");
    decided(
        &mut out,
        "transaction_timeout_ms",
        &pp.transaction_timeout,
        |(a, b)| format!("{a}..={b}"),
    );
    decided(
        &mut out,
        "new_producer_ids_per_minute",
        &pp.new_producer_ids_per_minute,
        |n| n.to_string(),
    );
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

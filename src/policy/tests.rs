use super::*;
use crate::config::Config;

const HEAD: &str = "upstream: { bootstrap_servers: [\"127.0.0.1:19092\"] }\nlisten: { advertised_host: h, bootstrap_port: 9092, broker_ports: { range: { first_port: 9100 } } }\n";

fn policies(yaml: &str) -> Policies {
    match Config::parse(&format!("{HEAD}{yaml}")) {
        Ok(c) => c.policies,
        Err(e) => panic!("{e}"),
    }
}

fn problems(yaml: &str) -> Vec<String> {
    match Config::parse(&format!("{HEAD}{yaml}")) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.0.iter().map(|p| p.to_string()).collect(),
    }
}

fn client(id: Option<&str>, ip: &str, principal: Option<&str>) -> Client {
    Client::described(ip.parse().expect("ip"), id, principal)
}

const RULES: &str = r#"
policies:
  - name: exempt-legacy
    match: { topics: { prefix: ["pay."] }, client_ids: { exact: [legacy] } }
    produce: { idempotence: allow, max_batch_records: { limit: 10, action: audit } }
  - name: pay
    match: { topics: { exact: [pay], prefix: ["pay."], regex: ['^ledger-\d+$'] } }
    produce:
      idempotence: reject
      acks_all: upgrade
      compression: { allowed: [none, zstd], action: reject }
      max_batch_records: { limit: 1000, action: reject }
    consume: { read_committed: upgrade }
  - name: office
    match: { client_addresses: ["10.0.0.0/8", "::1"] }
    produce: { transactions: audit }
    producers:
      transaction_timeout_ms: { min: 1000, max: 60000, action: upgrade }
      new_producer_ids_per_minute: { limit: 5, action: reject }
  - name: alice-owns
    match: { principals: ["User:alice"] }
    producers: { owns_transactional_ids: { prefixes: ["pay-"], action: reject } }
  - name: bob-owns-more
    match: { client_ids: [bob] }
    producers: { owns_transactional_ids: { prefixes: ["pay-bob-"], action: audit } }
"#;

#[test]
fn first_matching_rule_decides_each_check() {
    let p = policies(RULES);
    let anyone = client(Some("app"), "192.168.1.1", None);
    let t = p.topic_policy(&anyone, "pay.eu");
    assert_eq!(t.get(Check::Idempotence).map(|d| &*d.rule), Some("pay"));
    assert_eq!(
        t.get(Check::AcksAll).map(|d| d.action),
        Some(Action::Upgrade)
    );
    assert_eq!(
        t.get(Check::Compression).and_then(|d| d.codecs()),
        Some(0b10001)
    );
    assert_eq!(
        t.get(Check::MaxBatchRecords).and_then(|d| d.limit()),
        Some(1000)
    );
    assert!(
        t.get(Check::Transactions).is_none(),
        "office does not match this address"
    );

    // The exemption: allow stops 'pay' from deciding idempotence, and the earlier, looser record
    // limit wins; checks the exemption does not set still come from 'pay'.
    let legacy = client(Some("legacy"), "192.168.1.1", None);
    let t = p.topic_policy(&legacy, "pay.eu");
    assert!(t.get(Check::Idempotence).is_none());
    assert_eq!(
        t.get(Check::MaxBatchRecords)
            .map(|d| (d.limit(), d.action, &*d.rule)),
        Some((Some(10), Action::Audit, "exempt-legacy"))
    );
    assert_eq!(t.get(Check::AcksAll).map(|d| &*d.rule), Some("pay"));
    let explained = p.topic_policy_explained(&legacy, "pay.eu");
    assert_eq!(
        explained.get(Check::Idempotence).map(|d| d.action),
        Some(Action::Allow),
        "explanations keep the allow"
    );
    // 'pay' exactly is not under the 'pay.' prefix: the exemption does not apply.
    assert!(p
        .topic_policy(&legacy, "pay")
        .get(Check::Idempotence)
        .is_some());
    // Regex, and topics nobody mentions.
    assert!(p
        .topic_policy(&anyone, "ledger-42")
        .get(Check::Idempotence)
        .is_some());
    assert!(p.topic_policy(&anyone, "ledger-x").is_empty());
    assert!(p.topic_policy(&anyone, "payments").is_empty());

    // Address ranges: IPv4, IPv6, and IPv4 seen through a dual-stack socket.
    let office = client(None, "10.1.2.3", None);
    assert!(p
        .topic_policy(&office, "anything")
        .get(Check::Transactions)
        .is_some());
    assert!(p
        .topic_policy(&client(None, "::1", None), "x")
        .get(Check::Transactions)
        .is_some());
    assert!(p
        .topic_policy(&client(None, "::ffff:10.9.9.9", None), "x")
        .get(Check::Transactions)
        .is_some());
    assert!(p
        .topic_policy(&client(None, "11.0.0.1", None), "x")
        .is_empty());
    let pp = p.producer_policy(&office);
    assert_eq!(
        pp.get(Check::TransactionTimeout).and_then(|d| d.bounds()),
        Some((1000, 60000))
    );
    assert_eq!(
        pp.get(Check::NewProducerIdsPerMinute)
            .and_then(|d| d.limit()),
        Some(5)
    );
    assert_eq!(p.producer_policy(&anyone), ProducerPolicy::default());
}

#[test]
fn transactional_id_owners_longest_prefix() {
    let p = policies(RULES);
    let alice = client(Some("x"), "1.1.1.1", Some("User:alice"));
    let bob = client(Some("bob"), "1.1.1.1", None);
    let eve = client(Some("eve"), "1.1.1.1", Some("User:eve"));
    assert!(p.foreign_transactional_id(&alice, "pay-1").is_none());
    let (rule, prefix, action) = p.foreign_transactional_id(&eve, "pay-1").expect("foreign");
    assert_eq!(
        (&*rule.name, prefix, action),
        ("alice-owns", "pay-", Action::Reject)
    );
    // The longer prefix belongs to bob: alice is the foreigner there, audited only.
    assert!(p.foreign_transactional_id(&bob, "pay-bob-7").is_none());
    let (rule, _, action) = p
        .foreign_transactional_id(&alice, "pay-bob-7")
        .expect("foreign");
    assert_eq!((&*rule.name, action), ("bob-owns-more", Action::Audit));
    assert!(p.foreign_transactional_id(&eve, "other-1").is_none());
    // A client that has not authenticated is not alice.
    let anon = client(Some("x"), "1.1.1.1", None);
    assert!(p.foreign_transactional_id(&anon, "pay-1").is_some());
}

#[test]
fn connection_cache_follows_reloads_and_learned_facts() {
    let holder = PolicyHolder::new(policies(RULES));
    let mut cp = ConnPolicies::default();
    let c = client(Some("app"), "1.1.1.1", None);
    cp.refresh(&holder, 0, &c);
    assert!(cp.topic(&c, "pay").get(Check::Idempotence).is_some());
    holder.replace(Policies::default());
    cp.refresh(&holder, 0, &c);
    assert!(
        cp.topic(&c, "pay").is_empty(),
        "a reload reaches live connections"
    );
    holder.replace(policies(RULES));
    let legacy = client(Some("legacy"), "1.1.1.1", None);
    cp.refresh(&holder, 1, &legacy);
    assert!(cp.topic(&legacy, "pay.x").get(Check::Idempotence).is_none());
    assert!(cp.first_report(Check::AcksAll, "pay"));
    assert!(!cp.first_report(Check::AcksAll, "pay"));
}

#[test]
fn cidr_parsing() {
    assert_eq!(Cidr::parse("10.0.0.0/8").map(|c| c.bits), Ok(8));
    assert!(Cidr::parse("10.0.0.0/33").is_err());
    assert!(Cidr::parse("10.0.0.1/8").is_err());
    assert!(Cidr::parse("fe80::/10").is_ok());
    assert!(Cidr::parse("0.0.0.0/0").is_ok_and(|c| c.contains("8.8.8.8".parse().unwrap())));
    assert!(Cidr::parse("::/0").is_ok_and(|c| !c.contains("8.8.8.8".parse().unwrap())));
    assert!(Cidr::parse("host").is_err());
}

#[test]
fn bad_rules_are_refused_with_every_problem_by_key_path() {
    let got = problems(
        r#"
policies:
  - name: a
    match:
      topics: { regex: ["pay(["], prefx: [x] }
      client_addresses: ["10.0.0.1/8"]
    produce: { transactions: upgrade, acks_all: maybe, max_batch_bytes: { limit: 0, action: reject }, extra: 1 }
    consume: { read_committed: reject }
  - name: a
    match: { topics: [t] }
    producers: { transaction_timeout_ms: { min: 5000, max: 10, action: reject } }
  - name: b
    produce: { transactions: reject, idempotence: allow }
  - name: c
  - name: o1
    match: { client_ids: [x] }
    producers: { owns_transactional_ids: { prefixes: [p-], action: reject } }
  - name: o2
    match: { client_ids: [y] }
    producers: { owns_transactional_ids: { prefixes: [p-], action: audit } }
  - name: o3
    producers: { owns_transactional_ids: { prefixes: [q-], action: reject } }
"#,
    );
    let text = got.join("\n");
    for expected in [
        "policies[0].match.topics.regex[0]: invalid regex",
        "policies[0].match.topics.prefx: unknown key",
        "policies[0].match.client_addresses[0]: '10.0.0.1/8' has host bits set",
        "policies[0].produce.transactions: 'upgrade' is not possible",
        "policies[0].produce.acks_all: 'maybe' is not an action",
        "policies[0].produce.max_batch_bytes.limit: must be an integer from 1",
        "policies[0].produce.extra: unknown key",
        "policies[0].consume.read_committed: 'reject' is not possible",
        "policies[1].name: 'a' is already the name of policies[0]",
        "policies[1].producers.transaction_timeout_ms.min: min 5000 is above max 10",
        "policies[1].producers: InitProducerId names no topic",
        "policies[2].produce.idempotence: 'allow' contradicts",
        "policies[3]: sets no check",
        "policies[5].producers.owns_transactional_ids.prefixes[0]: transactional id prefix 'p-' is already owned by rule 'o1'",
        "policies[6].producers.owns_transactional_ids: an owner needs",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_eq!(got.len(), 15, "no extra noise:\n{text}");
}

#[test]
fn explanation_names_rules_in_order_and_shadowed_checks() {
    let p = policies(
        r#"
policies:
  - name: all
    produce: { acks_all: upgrade }
  - name: later
    produce: { acks_all: reject, idempotence: reject }
"#,
    );
    let text = explain::explain(&p);
    assert!(
        text.contains("[0] all: every topic, from every client"),
        "{text}"
    );
    assert!(
        text.contains("never applies acks_all (rule 'all' above"),
        "{text}"
    );
    let r = explain::resolve(&p, &client(Some("c"), "1.2.3.4", None), Some("t"), None);
    assert!(r.contains("acks_all: -> upgrade (rule 'all')"), "{r}");
    assert!(r.contains("idempotence: -> reject (rule 'later')"), "{r}");
}

/// Every row of the catalogue is read from the config and explained, by its shape alone (a new check
/// with an existing shape needs no parser change).
#[test]
fn every_check_in_the_catalogue_is_parsed_and_explained() {
    use super::checks::{Shape, ROWS};
    let mut yaml = String::from("policies:\n");
    for scope in Scope::ALL {
        let owner = scope == Scope::Producers;
        yaml.push_str(&format!("  - name: {}\n", scope.section()));
        if owner {
            yaml.push_str("    match: { client_ids: [owner] }\n");
        }
        yaml.push_str(&format!("    {}:\n", scope.section()));
        for row in ROWS.iter().filter(|r| r.scope == scope) {
            let action = row.actions.last().expect("an action").name();
            let value = match row.shape {
                Shape::Action => action.to_string(),
                Shape::Codecs => format!("{{ allowed: [none], action: {action} }}"),
                Shape::Limit { min, .. } => format!("{{ limit: {min}, action: {action} }}"),
                Shape::Bounds => format!("{{ min: 1, max: 2, action: {action} }}"),
                Shape::Prefixes => format!("{{ prefixes: [p-], action: {action} }}"),
            };
            yaml.push_str(&format!("      {}: {value}\n", row.key));
        }
    }
    let p = policies(&yaml);
    for row in &ROWS {
        let rule = p
            .rules
            .iter()
            .find(|r| &*r.name == row.scope.section())
            .expect("rule");
        let set = rule.settings.get(row.check).expect(row.key);
        assert_eq!(Some(&set.action), row.actions.last(), "{}", row.key);
    }
    let lines: usize = p.rules.iter().map(|r| explain::rule_lines(r).len()).sum();
    assert_eq!(lines, ROWS.len(), "one explanation line per check");
}

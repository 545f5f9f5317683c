use super::*;

const GOOD: &str = include_str!("../../config/proxy.yaml");

#[test]
fn example_config_is_valid() {
    let c = Config::parse(GOOD).expect("config/proxy.yaml must be valid");
    assert_eq!(c.upstream.bootstrap_servers, vec!["127.0.0.1:19092"]);
    assert_eq!(c.listen.bootstrap_port, 9092);
    assert_eq!(c.listen.broker_ports.port_for(0), Some(9100));
    assert_eq!(c.listen.broker_ports.port_for(7), Some(9107));
    assert_eq!(c.listen.broker_ports.port_for(100), None);
    assert_eq!(c.listen.broker_ports.port_for(-1), None);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.runtime.worker_threads, None, "0 means one per core");
    let two = GOOD.replace("worker_threads: 0", "worker_threads: 2");
    assert_eq!(
        Config::parse(&two).map(|c| c.runtime.worker_threads),
        Ok(Some(2))
    );
}

#[test]
fn every_problem_is_listed_with_its_path() {
    let bad = r#"
upstream:
  bootstrap_servers: ["nohost", "h:0", 5]
  connect_timeout_ms: -3
  surprise: 1
listen:
  advertised_host: ""
  bootstrap_port: 70000
  broker_ports:
    range: { first_port: 65530, count: 10, bogus: true }
    map: { 1: 9000, x: 2 }
limits:
  max_frame_bytes: "big"
runtime:
  worker_threads: 5000
log:
  format: xml
extra: {}
"#;
    let errs = Config::parse(bad).unwrap_err();
    let paths: Vec<&str> = errs.0.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "upstream.bootstrap_servers[0]",
        "upstream.bootstrap_servers[1]",
        "upstream.bootstrap_servers[2]",
        "upstream.connect_timeout_ms",
        "upstream.surprise",
        "listen.advertised_host",
        "listen.bootstrap_port",
        "listen.broker_ports.range.count",
        "listen.broker_ports.range.bogus",
        "listen.broker_ports.map.'x'",
        "listen.broker_ports",
        "limits.max_frame_bytes",
        "runtime.worker_threads",
        "log.format",
        "extra",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
}

#[test]
fn missing_sections_and_port_clashes() {
    let errs = Config::parse("{}").unwrap_err();
    let paths: Vec<&str> = errs.0.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"upstream"), "{paths:?}");
    assert!(paths.contains(&"listen"), "{paths:?}");

    let clash = r#"
upstream: { bootstrap_servers: ["a:1"] }
listen:
  advertised_host: h
  bootstrap_port: 9001
  broker_ports: { map: { 1: 9001, 2: 9002, 3: 9002 } }
"#;
    let errs = Config::parse(clash).unwrap_err();
    let text = errs.to_string();
    assert!(text.contains("listen.bootstrap_port"), "{text}");
    assert!(text.contains("listen.broker_ports.map.3"), "{text}");
}

#[test]
fn not_yaml_is_one_clear_problem() {
    let errs = Config::parse("upstream: [unclosed").unwrap_err();
    assert_eq!(errs.0.len(), 1);
    assert!(errs.0[0].message.contains("not valid YAML"));
}

/// A file that is not a regular file, or too large, is refused before it is read whole (once,
/// `check-config /dev/zero` read 2 GB).
#[test]
fn only_bounded_regular_files_are_read() {
    let zero = Config::load(std::path::Path::new("/dev/zero")).unwrap_err();
    assert!(zero.to_string().contains("not a regular file"), "{zero}");
    let dir = std::env::temp_dir().join(format!("eos-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.yaml");
    let mut text = GOOD.to_string();
    while text.len() as u64 <= reader::MAX_CONFIG_BYTES {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, &text).unwrap();
    let e = Config::load(&big).unwrap_err();
    assert!(e.to_string().contains("at most 1048576"), "{e}");
    assert!(Config::parse(&text).is_err(), "parse holds the same bound");
    let ok = dir.join("ok.yaml");
    std::fs::write(&ok, GOOD).unwrap();
    assert!(Config::load(&ok).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 50 KB of nested `{` once kept check-config busy for over 20 s; nesting is measured before parsing.
#[test]
fn deep_nesting_is_refused_before_parsing() {
    let flow = format!("{}{}", "{a: ".repeat(20_000), "}".repeat(20_000));
    let e = Config::parse(&format!("{GOOD}\nx: {flow}\n")).unwrap_err();
    assert!(e.to_string().contains("nested"), "{e}");
    let mut block = String::from(GOOD);
    block.push_str("deep:\n");
    for i in 1..60 {
        block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
    }
    let e = Config::parse(&block).unwrap_err();
    assert!(e.to_string().contains("nested"), "{e}");
    let dashes = format!("{GOOD}\nlist:\n{}x\n", "- ".repeat(100));
    assert!(Config::parse(&dashes)
        .unwrap_err()
        .to_string()
        .contains("nested"));
    assert!(
        reader::nesting_depth(GOOD) <= 8,
        "the example config nests {} levels",
        reader::nesting_depth(GOOD)
    );
    // brackets inside quotes and comments do not count
    assert_eq!(reader::nesting_depth("a: '{{{{[[[['  # {{{{\n"), 1);
}

#[test]
fn more_rules_than_allowed_are_refused() {
    let rules: String = (0..=crate::policy::parse::MAX_RULES)
        .map(|i| format!("  - {{ name: r{i}, produce: {{ idempotence: reject }} }}\n"))
        .collect();
    // the example has its own policies section: replace it
    let base = match GOOD.find("\npolicies:") {
        Some(at) => GOOD[..at].to_string(),
        None => GOOD.to_string(),
    };
    let text = format!("{base}\npolicies:\n{rules}");
    let e = Config::parse(&text).unwrap_err();
    assert!(e.to_string().contains("at most 1000"), "{e}");
}

#[test]
fn host_names_must_be_host_names() {
    for bad in [
        "",
        "a b",
        "-lead.example",
        "x".repeat(300).as_str(),
        "a..b",
        "ünï",
    ] {
        assert!(reader::check_host(bad).is_err(), "{bad:?}");
    }
    for good in [
        "localhost",
        "kafka-0.kafka.svc",
        "10.1.2.3",
        "::1",
        "my_host",
        "example.com.",
    ] {
        assert!(reader::check_host(good).is_ok(), "{good:?}");
    }
    let long = GOOD.replacen(
        "advertised_host: ",
        &format!("advertised_host: {}\n  _was: ", "h".repeat(10_000)),
        1,
    );
    let e = Config::parse(&long).unwrap_err();
    assert!(e.to_string().contains("listen.advertised_host"), "{e}");
    assert!(reader::check_host_port("[::1]:9092").is_ok());
    assert!(reader::check_host_port("bad host:9092").is_err());
}

/// TLS settings are checked at start, every problem by key path: files that are missing or hold no
/// PEM, a key that does not fit its certificate, client authentication without a CA, bad mapping rules.
#[test]
fn tls_settings_are_checked_with_their_paths() {
    let dir = std::env::temp_dir().join(format!("tls-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let issue = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    };
    let (cert, key) = issue("a");
    let (_, other_key) = issue("b");
    let base = |listen_tls: &str, upstream_tls: &str| {
        format!(
            "upstream: {{ bootstrap_servers: [\"a:1\"], tls: {upstream_tls} }}\n\
             listen: {{ advertised_host: h, bootstrap_port: 9001, broker_ports: {{ map: {{ 1: 9002 }} }}, tls: {listen_tls} }}\n"
        )
    };
    let good = base(
        &format!("{{ cert_file: '{cert}', key_file: '{key}', client_auth: required, client_ca_file: '{cert}', principal_mapping_rules: ['RULE:^CN=(.*)$/$1/L', DEFAULT] }}"),
        &format!("{{ ca_file: '{cert}' }}"),
    );
    let c = Config::parse(&good).expect("valid TLS settings");
    let explained = c.explain();
    assert!(explained.contains("listeners speak TLS"), "{explained}");
    assert!(
        explained.contains("listen certificate") && explained.contains("names [DNS:localhost]"),
        "check-config names the certificate: {explained}"
    );
    let l = c.listen.tls.expect("listen.tls");
    assert_eq!(l.client_auth, crate::tls::ClientAuth::Required);
    assert_eq!(l.principal_rules.len(), 2);
    assert!(c.upstream.tls.expect("upstream.tls").verify_hostname);

    let bad = base(
        &format!("{{ cert_file: '{cert}', key_file: '{other_key}', client_auth: required, principal_mapping_rules: ['RULE:(/x/'] }}"),
        "{ ca_file: /nonexistent/ca.pem, cert_file: /nonexistent/c.pem }",
    );
    let text = Config::parse(&bad).unwrap_err().to_string();
    for path in [
        "listen.tls.principal_mapping_rules[0]",
        "listen.tls.client_ca_file",
        "upstream.tls.ca_file",
        "upstream.tls.key_file",
    ] {
        assert!(text.contains(path), "missing {path} in {text}");
    }
    // The key that does not fit is found once the CA is given.
    let mismatch = base(
        &format!("{{ cert_file: '{cert}', key_file: '{other_key}' }}"),
        "{ verify_hostname: false, ca_file: '/nonexistent' }",
    );
    let text = Config::parse(&mismatch).unwrap_err().to_string();
    assert!(text.contains("listen.tls.key_file"), "{text}");
    assert!(text.contains("does not fit"), "{text}");
    // A device is not read (it would never end).
    let device = base(
        "{ cert_file: /dev/zero, key_file: /dev/zero }",
        "{ ca_file: /dev/urandom }",
    );
    let text = Config::parse(&device).unwrap_err().to_string();
    assert!(
        text.contains("listen.tls.cert_file: /dev/zero: not a regular file"),
        "{text}"
    );
    assert!(
        text.contains("upstream.tls.ca_file: /dev/urandom: not a regular file"),
        "{text}"
    );
    // SNI routing with a certificate that names neither the bootstrap name nor the brokers': warned.
    let sni = format!(
        "upstream: {{ bootstrap_servers: [\"a:1\"] }}\n\
         listen: {{ advertised_host: boot.k, bootstrap_port: 9001, broker_ports: {{ sni: 'b-$(nodeId).k' }}, tls: {{ cert_file: '{cert}', key_file: '{key}' }} }}\n"
    );
    let explained = Config::parse(&sni).expect("SNI settings").explain();
    for host in ["boot.k", "b-1.k"] {
        assert!(
            explained.contains(&format!("does not name {host}")),
            "{explained}"
        );
    }
    // The operator endpoint's TLS and token.
    let token = dir.join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let head = "upstream: { bootstrap_servers: [\"a:1\"] }\nlisten: { advertised_host: h, bootstrap_port: 9001, broker_ports: { map: { 1: 9002 } } }\n";
    let good = format!(
        "{head}metrics: {{ listen: '127.0.0.1:0', tls: {{ cert_file: '{cert}', key_file: '{key}' }}, token_file: '{}' }}\n",
        token.display()
    );
    let c = Config::parse(&good).expect("operator TLS and token");
    assert!(c.metrics.tls.is_some() && c.metrics.token_file.is_some());
    std::fs::write(dir.join("empty"), " \n").unwrap();
    let bad = format!(
        "{head}metrics: {{ tls: {{ cert_file: '{cert}', key_file: '{other_key}' }}, token_file: '{}' }}\n",
        dir.join("empty").display()
    );
    let text = Config::parse(&bad).unwrap_err().to_string();
    for needle in [
        "metrics.tls.key_file",
        "metrics.token_file",
        "printable ASCII",
        "'listen', which is not set",
    ] {
        assert!(text.contains(needle), "missing {needle} in {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_sni_pattern_names_each_node_once() {
    let p = SniPattern::parse("Broker-$(nodeId).Kafka.Example.com").expect("pattern");
    assert_eq!(p.host(7), "broker-7.kafka.example.com");
    assert_eq!(p.node("broker-7.kafka.example.com"), Some(7));
    assert_eq!(
        p.node("BROKER-12.KAFKA.EXAMPLE.COM"),
        Some(12),
        "DNS is case-blind"
    );
    assert_eq!(p.node("broker-0.kafka.example.com"), Some(0));
    for other in [
        "broker-07.kafka.example.com",
        "broker-.kafka.example.com",
        "broker--1.kafka.example.com",
        "broker-1x.kafka.example.com",
        "broker-99999999999.kafka.example.com",
        "broker-1.kafka.example.com.evil",
        "bootstrap.kafka.example.com",
    ] {
        assert_eq!(p.node(other), None, "{other}");
    }
    for bad in ["broker.kafka", "b-$(nodeId)-$(nodeId).k", "b $(nodeId).k"] {
        assert!(SniPattern::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn sni_routing_needs_tls_and_a_distinct_bootstrap_name() {
    let yaml = |sni: &str| {
        format!(
            "upstream: {{ bootstrap_servers: [\"a:1\"] }}\n\
             listen: {{ advertised_host: broker-1.k, bootstrap_port: 9001, broker_ports: {{ sni: '{sni}', map: {{ 1: 9002 }} }} }}\n"
        )
    };
    let text = Config::parse(&yaml("broker-$(nodeId).k"))
        .unwrap_err()
        .to_string();
    for needle in [
        "listen.broker_ports.sni: needs listen.tls",
        "listen.advertised_host: is one of the broker names",
        "listen.broker_ports: set one of 'range', 'map' or 'sni'",
    ] {
        assert!(text.contains(needle), "missing {needle} in {text}");
    }
    let text = Config::parse(&yaml("broker.k")).unwrap_err().to_string();
    assert!(
        text.contains("listen.broker_ports.sni: 'broker.k' does not contain $(nodeId)"),
        "{text}"
    );
}

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

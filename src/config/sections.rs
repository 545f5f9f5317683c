//! One parser per top-level config section (`upstream`, `listen`, `limits`, ...), each reporting its
//! problems by key path; `policies` is parsed by [`crate::policy::parse`].

use super::*;

pub(super) fn parse_upstream(s: &Section) -> UpstreamConfig {
    let bootstrap_servers = s.string_list("bootstrap_servers", true, |v| {
        reader::check_host_port(v).err()
    });
    let connect_timeout = s.millis("connect_timeout_ms", 10_000, 1, 600_000);
    let metadata_refresh = s.millis("metadata_refresh_ms", 30_000, 100, 86_400_000);
    let unstable_api_versions = s.bool("unstable_api_versions", false);
    let tls = s.optional_section("tls").map(|t| parse_upstream_tls(&t));
    let sasl = s.optional_section("sasl").map(|t| parse_upstream_sasl(&t));
    s.finish(&[
        "bootstrap_servers",
        "connect_timeout_ms",
        "metadata_refresh_ms",
        "unstable_api_versions",
        "tls",
        "sasl",
    ]);
    UpstreamConfig {
        bootstrap_servers,
        connect_timeout,
        metadata_refresh,
        unstable_api_versions,
        tls,
        sasl,
    }
}

/// `upstream.sasl`: the proxy's own login; the password file is read here so a problem shows at start.
fn parse_upstream_sasl(t: &Section) -> crate::server::sasl::UpstreamSasl {
    use crate::server::sasl::{read_password, Mechanism, UpstreamSasl};
    let name = t.string("mechanism", None);
    let mechanism = Mechanism::parse(&name).unwrap_or_else(|| {
        if !name.is_empty() {
            t.problem(
                "mechanism",
                &format!("'{name}': expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
            );
        }
        Mechanism::Plain
    });
    let username = t.string("username", None);
    if username.len() > 256 {
        t.problem("username", "longer than 256 bytes");
    }
    let password_file: std::path::PathBuf = t.string("password_file", None).into();
    if !password_file.as_os_str().is_empty() {
        if let Err(e) = read_password(&password_file) {
            t.problem("password_file", &e);
        }
    }
    t.finish(&["mechanism", "username", "password_file"]);
    UpstreamSasl {
        mechanism,
        username,
        password_file,
    }
}

/// `upstream.tls`; its files are read and checked here, so that every problem is listed by key path.
fn parse_upstream_tls(t: &Section) -> crate::tls::UpstreamTls {
    let tls = crate::tls::UpstreamTls {
        ca_file: t.optional_string("ca_file").map(Into::into),
        verify_hostname: t.bool("verify_hostname", true),
        cert_file: t.optional_string("cert_file").map(Into::into),
        key_file: t.optional_string("key_file").map(Into::into),
    };
    t.finish(&["ca_file", "verify_hostname", "cert_file", "key_file"]);
    if let Err(problems) = crate::tls::client_config(&tls) {
        for p in problems {
            t.problem(p.key, &p.message);
        }
    }
    tls
}

/// `metrics.tls`: the operator endpoint's certificate and key (no client certificates: the bearer
/// token is its authentication).
fn parse_operator_tls(t: &Section) -> crate::tls::ListenTls {
    let tls = crate::tls::ListenTls {
        cert_file: t.string("cert_file", None).into(),
        key_file: t.string("key_file", None).into(),
        client_auth: crate::tls::ClientAuth::None,
        client_ca_file: None,
        principal_rules: Vec::new(),
        handshake_timeout: crate::metrics::http::READ_TIMEOUT,
    };
    t.finish(&["cert_file", "key_file"]);
    if !tls.cert_file.as_os_str().is_empty() && !tls.key_file.as_os_str().is_empty() {
        if let Err(problems) = crate::tls::server_config(&tls) {
            for p in problems {
                t.problem(p.key, &p.message);
            }
        }
    }
    tls
}

/// `listen.tls`; its files are read and checked here, so that every problem is listed by key path.
fn parse_listen_tls(t: &Section) -> crate::tls::ListenTls {
    use crate::tls::{principal, ClientAuth};
    let client_auth = match t.string("client_auth", Some("none")).as_str() {
        "none" => ClientAuth::None,
        "requested" => ClientAuth::Requested,
        "required" => ClientAuth::Required,
        other => {
            t.problem(
                "client_auth",
                &format!("'{other}': expected none, requested or required"),
            );
            ClientAuth::None
        }
    };
    let rules: Vec<principal::Rule> = t
        .string_list("principal_mapping_rules", false, |_| None)
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            principal::parse_rule(r)
                .map_err(|e| t.problem(&format!("principal_mapping_rules[{i}]"), &e))
                .ok()
        })
        .collect();
    let tls = crate::tls::ListenTls {
        cert_file: t.string("cert_file", None).into(),
        key_file: t.string("key_file", None).into(),
        client_auth,
        client_ca_file: t.optional_string("client_ca_file").map(Into::into),
        principal_rules: rules,
        handshake_timeout: t.millis("handshake_timeout_ms", 10_000, 100, 600_000),
    };
    t.finish(&[
        "cert_file",
        "key_file",
        "client_auth",
        "client_ca_file",
        "principal_mapping_rules",
        "handshake_timeout_ms",
    ]);
    if !tls.cert_file.as_os_str().is_empty() && !tls.key_file.as_os_str().is_empty() {
        if let Err(problems) = crate::tls::server_config(&tls) {
            for p in problems {
                t.problem(p.key, &p.message);
            }
        }
    }
    tls
}

pub(super) fn parse_listen(s: &Section) -> ListenConfig {
    let bind_host = s.string("bind_host", Some("0.0.0.0"));
    let advertised_host = s.string("advertised_host", None);
    for (key, host) in [
        ("bind_host", &bind_host),
        ("advertised_host", &advertised_host),
    ] {
        // An empty value is reported as missing by the reader already.
        if !host.is_empty() {
            if let Err(message) = reader::check_host(host) {
                s.problem(key, &message);
            }
        }
    }
    let bootstrap_port = s.int("bootstrap_port", None, 1, 65535) as u16;
    let broker_ports = {
        let bp = s.section("broker_ports", true);
        let range = bp.optional_section("range").map(|r| {
            let first_port = r.int("first_port", None, 1, 65535) as u16;
            let node_id_offset = r.int("node_id_offset", Some(0), -1_000_000, 1_000_000) as i32;
            let count = r.int("count", Some(100), 1, 10_000) as u16;
            if u32::from(first_port) + u32::from(count) - 1 > 65535 {
                r.problem("count", "first_port + count - 1 exceeds 65535");
            }
            r.finish(&["first_port", "node_id_offset", "count"]);
            BrokerPorts::Range {
                first_port,
                node_id_offset,
                count,
            }
        });
        let map = bp
            .int_map("map", 1, 65535)
            .map(|m| BrokerPorts::Map(m.into_iter().map(|(k, v)| (k, v as u16)).collect()));
        let sni = bp.optional_string("sni").and_then(|p| {
            SniPattern::parse(&p)
                .map_err(|e| bp.problem("sni", &e))
                .ok()
                .map(BrokerPorts::Sni)
        });
        let chosen: Vec<BrokerPorts> = [sni, range, map].into_iter().flatten().collect();
        if chosen.len() > 1 {
            bp.problem_here("set one of 'range', 'map' or 'sni'");
        }
        if chosen.is_empty() && s.optional_section("broker_ports").is_some() {
            bp.problem_here("needs 'range', 'map' or 'sni'");
        }
        bp.finish(&["range", "map", "sni"]);
        let first = chosen.into_iter().next();
        first.unwrap_or(BrokerPorts::Map(BTreeMap::new()))
    };
    let tls = s.optional_section("tls").map(|t| parse_listen_tls(&t));
    if let BrokerPorts::Sni(pattern) = &broker_ports {
        if tls.is_none() {
            s.problem(
                "broker_ports.sni",
                "needs listen.tls: the host name a client asks for travels in its TLS handshake (SNI)",
            );
        }
        if pattern.node(&advertised_host).is_some() {
            s.problem(
                "advertised_host",
                "is one of the broker names broker_ports.sni makes; the bootstrap name must differ",
            );
        }
    }
    s.finish(&[
        "bind_host",
        "advertised_host",
        "bootstrap_port",
        "broker_ports",
        "tls",
    ]);
    ListenConfig {
        bind_host,
        advertised_host,
        bootstrap_port,
        broker_ports,
        tls,
    }
}

pub(super) fn parse_limits(s: &Section) -> LimitsConfig {
    let max_frame_bytes = s.int("max_frame_bytes", Some(100 * 1024 * 1024), 1024, 1 << 30) as usize;
    let idle_timeout = s.millis("idle_timeout_ms", 600_000, 1_000, 86_400_000);
    let write_timeout = s.millis("write_timeout_ms", 30_000, 100, 3_600_000);
    let max_connections = s.int("max_connections", Some(10_000), 1, 1_000_000) as usize;
    let max_in_flight_per_connection =
        s.int("max_in_flight_per_connection", Some(1_000), 1, 100_000) as usize;
    s.finish(&[
        "max_frame_bytes",
        "idle_timeout_ms",
        "write_timeout_ms",
        "max_connections",
        "max_in_flight_per_connection",
    ]);
    LimitsConfig {
        max_frame_bytes,
        idle_timeout,
        write_timeout,
        max_connections,
        max_in_flight_per_connection,
    }
}

pub(super) fn parse_runtime(s: &Section) -> RuntimeConfig {
    // 0 (the default): one per core.
    let worker_threads = s.int("worker_threads", Some(0), 0, 1024) as usize;
    s.finish(&["worker_threads"]);
    RuntimeConfig {
        worker_threads: (worker_threads > 0).then_some(worker_threads),
    }
}

pub(super) fn parse_log(s: &Section) -> LogConfig {
    let format = match s.string("format", Some("text")).as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            s.problem("format", &format!("'{other}' is not one of: text, json"));
            LogFormat::Text
        }
    };
    let level = s.string("level", Some("info"));
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        s.problem("level", &format!("'{level}' is not a valid log filter"));
    }
    s.finish(&["format", "level"]);
    LogConfig { format, level }
}

pub(super) fn parse_producer_state(s: &Section) -> GuardConfig {
    let d = GuardConfig::default();
    let enabled = s.bool("enabled", d.enabled);
    let mode = match s.string("mode", Some("audit")).as_str() {
        "audit" => Mode::Audit,
        "enforce" => Mode::Enforce,
        other => {
            s.problem("mode", &format!("'{other}' is not one of: audit, enforce"));
            Mode::Audit
        }
    };
    let check_crc = s.bool("check_crc", d.check_crc);
    let max_tracked = s.int("max_tracked", Some(d.max_tracked as i64), 1, 100_000_000) as usize;
    let idle_expiry = s.millis(
        "idle_expiry_ms",
        d.idle_expiry.as_millis() as u64,
        1_000,
        30 * 86_400_000,
    );
    let in_flight_wait = s.millis(
        "in_flight_wait_ms",
        d.in_flight_wait.as_millis() as u64,
        1,
        600_000,
    );
    let content_window = s.millis(
        "content_window_ms",
        d.content_window.as_millis() as u64,
        0,
        3_600_000,
    );
    let content_window_entries = s.int(
        "content_window_entries",
        Some(d.content_window_entries as i64),
        1,
        100_000_000,
    ) as usize;
    let upgraded_producers = s.int(
        "upgraded_producers",
        Some(d.upgraded_producers as i64),
        1,
        10_000_000,
    ) as usize;
    s.finish(&[
        "enabled",
        "mode",
        "check_crc",
        "max_tracked",
        "idle_expiry_ms",
        "in_flight_wait_ms",
        "content_window_ms",
        "content_window_entries",
        "upgraded_producers",
    ]);
    GuardConfig {
        enabled,
        mode,
        check_crc,
        max_tracked,
        idle_expiry,
        in_flight_wait,
        content_window,
        content_window_entries,
        upgraded_producers,
    }
}

pub(super) fn parse_audit(s: &Section, upstream: &UpstreamConfig) -> AuditConfig {
    let d = AuditConfig::default();
    let stdout = s.bool("stdout", d.stdout);
    let file = s.optional_string("file").map(std::path::PathBuf::from);
    let queue = s.int("queue", Some(d.queue as i64), 1, 10_000_000) as usize;
    let kafka = s.optional_section("kafka").map(|k| {
        let topic = k.string("topic", None);
        if topic.len() > 249
            || !topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            k.problem(
                "topic",
                &format!("'{topic}' is not a legal Kafka topic name"),
            );
        }
        let servers = k.string_list("bootstrap_servers", false, |v| {
            reader::check_host_port(v).err()
        });
        let queue = k.int("queue", Some(10_000), 1, 10_000_000) as usize;
        k.finish(&["topic", "bootstrap_servers", "queue"]);
        KafkaAuditConfig {
            topic,
            bootstrap_servers: if servers.is_empty() {
                upstream.bootstrap_servers.clone()
            } else {
                servers
            },
            queue,
            // The audit topic's cluster is reached as the upstream one is (the same cluster by default).
            tls: upstream.tls.clone(),
            sasl: upstream.sasl.clone(),
        }
    });
    s.finish(&["stdout", "file", "queue", "kafka"]);
    AuditConfig {
        stdout,
        file,
        queue,
        kafka,
    }
}

pub(super) fn parse_metrics(s: &Section) -> MetricsConfig {
    let enabled = s.bool("enabled", true);
    let listen = s.optional_string("listen");
    if let Some(l) = &listen {
        // Port 0 is allowed here (an ephemeral port, reported in the log): handy for tests.
        let ok = l
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            s.problem("listen", &format!("'{l}' is not host:port"));
        }
    }
    let max_producer_series = s.int("max_producer_series", Some(1000), 1, 1_000_000) as usize;
    let tls = s.optional_section("tls").map(|t| parse_operator_tls(&t));
    let token_file: Option<std::path::PathBuf> = s.optional_string("token_file").map(Into::into);
    if let Some(path) = &token_file {
        if let Err(e) = crate::metrics::http::read_token(path) {
            s.problem("token_file", &e);
        }
    }
    if (tls.is_some() || token_file.is_some()) && listen.is_none() {
        s.problem_here("'tls' and 'token_file' protect the endpoint at 'listen', which is not set");
    }
    s.finish(&[
        "enabled",
        "listen",
        "max_producer_series",
        "tls",
        "token_file",
    ]);
    MetricsConfig {
        enabled,
        listen,
        max_producer_series,
        tls,
        token_file,
    }
}

pub(super) fn parse_watchdog(s: &Section) -> WatchdogConfig {
    let margin = s.millis("margin_ms", 10_000, 0, 86_400_000);
    let interval = s.millis("interval_ms", 1_000, 10, 600_000);
    let lso_stuck = s.millis("lso_stuck_ms", 60_000, 0, 86_400_000);
    let max_partitions = s.int("max_partitions", Some(10_000), 1, 10_000_000) as usize;
    s.finish(&["margin_ms", "interval_ms", "lso_stuck_ms", "max_partitions"]);
    WatchdogConfig {
        margin,
        interval,
        lso_stuck,
        max_partitions,
    }
}

pub(super) fn cross_check(c: &Config, problems: &mut Vec<Problem>) {
    let ports = c.listen.broker_ports.ports();
    if ports.contains(&c.listen.bootstrap_port) {
        problems.push(Problem {
            path: "listen.bootstrap_port".into(),
            message: format!(
                "port {} is also a broker port in listen.broker_ports",
                c.listen.bootstrap_port
            ),
        });
    }
    if let BrokerPorts::Map(m) = &c.listen.broker_ports {
        let mut seen = BTreeMap::new();
        for (node, port) in m {
            if let Some(other) = seen.insert(*port, *node) {
                problems.push(Problem {
                    path: format!("listen.broker_ports.map.{node}"),
                    message: format!("port {port} is also used by node {other}"),
                });
            }
        }
    }
}

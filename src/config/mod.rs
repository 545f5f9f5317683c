//! Configuration: YAML in, a validated [`Config`] out, or *every* problem with its key path.
//!
//! We walk the YAML tree by hand instead of `#[derive(Deserialize)]`: serde stops at the first error,
//! while an operator fixing a config wants all of them at once (`limits.max_frame_bytes: must be ...`,
//! `listen.broker_ports: unknown key 'rnage'`, ...).

pub mod reader;
pub use reader::Problem;

pub use crate::audit::{AuditConfig, KafkaAuditConfig};
pub use crate::guard::{GuardConfig, Mode};
use reader::Section;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// How proxy ports map to upstream broker node ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerPorts {
    /// Node `n` listens on `first_port + (n - node_id_offset)`, for `count` consecutive ports.
    Range {
        first_port: u16,
        node_id_offset: i32,
        count: u16,
    },
    /// Explicit node id -> port.
    Map(BTreeMap<i32, u16>),
}

impl BrokerPorts {
    pub fn port_for(&self, node_id: i32) -> Option<u16> {
        match self {
            BrokerPorts::Range {
                first_port,
                node_id_offset,
                count,
            } => {
                let index = i64::from(node_id) - i64::from(*node_id_offset);
                (0..i64::from(*count))
                    .contains(&index)
                    .then(|| u16::try_from(i64::from(*first_port) + index).ok())
                    .flatten()
            }
            BrokerPorts::Map(m) => m.get(&node_id).copied(),
        }
    }

    fn ports(&self) -> Vec<u16> {
        match self {
            BrokerPorts::Range {
                first_port, count, ..
            } => (0..*count)
                .filter_map(|i| first_port.checked_add(i))
                .collect(),
            BrokerPorts::Map(m) => m.values().copied().collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub bootstrap_servers: Vec<String>,
    pub connect_timeout: Duration,
    pub metadata_refresh: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    pub bind_host: String,
    pub advertised_host: String,
    pub bootstrap_port: u16,
    pub broker_ports: BrokerPorts,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    /// How long a peer (client or broker) may leave bytes the proxy wrote unread before its connection
    /// is closed.
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub max_in_flight_per_connection: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Threads running connections; `None`: one per core. Fewer than cores leaves CPU to a broker or
    /// clients on the same host and saves cross-thread wakeups (see README, Performance).
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub upstream: UpstreamConfig,
    pub listen: ListenConfig,
    pub limits: LimitsConfig,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
    pub producer_state: GuardConfig,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub watchdog: WatchdogConfig,
    pub policies: crate::policy::Policies,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Record metrics on the data path (off: nothing is counted; /metrics answers 404).
    pub enabled: bool,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz, /producers); none: no endpoint.
    pub listen: Option<String>,
    pub max_producer_series: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogConfig {
    /// A transaction open longer than its timeout plus this margin is flagged as hanging.
    pub margin: Duration,
    pub interval: Duration,
    /// A partition whose last stable offset stays put this long while its high watermark moves is flagged.
    pub lso_stuck: Duration,
    /// At most this many partitions are watched (and exported with their read_committed lag).
    pub max_partitions: usize,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) in the configuration:", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates a config file. Only a regular file (or a link to one) of at most
    /// [`reader::MAX_CONFIG_BYTES`] is read: `/dev/zero`, a FIFO or a runaway file are refused before
    /// anything is buffered.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        use std::io::Read;
        let refuse = |message: String| {
            ConfigErrors(vec![Problem {
                path: path.display().to_string(),
                message,
            }])
        };
        let file = std::fs::File::open(path).map_err(|e| refuse(format!("cannot read: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| refuse(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        let limit = reader::MAX_CONFIG_BYTES;
        if meta.len() > limit {
            return Err(refuse(format!(
                "{} bytes; a config file may have at most {limit}",
                meta.len()
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| refuse(format!("cannot read: {e}")))?;
        if bytes.len() as u64 > limit {
            return Err(refuse(format!("grew past {limit} bytes while being read")));
        }
        let text = String::from_utf8(bytes).map_err(|_| refuse("not UTF-8 text".into()))?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let whole = |message: String| {
            ConfigErrors(vec![Problem {
                path: "(file)".into(),
                message,
            }])
        };
        if text.len() as u64 > reader::MAX_CONFIG_BYTES {
            return Err(whole(format!(
                "{} bytes; a config may have at most {}",
                text.len(),
                reader::MAX_CONFIG_BYTES
            )));
        }
        let depth = reader::nesting_depth(text);
        if depth > reader::MAX_NESTING {
            return Err(whole(format!(
                "nested {depth} levels deep; at most {} are allowed",
                reader::MAX_NESTING
            )));
        }
        let root: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            ConfigErrors(vec![Problem {
                path: "(file)".into(),
                message: format!("not valid YAML: {e}"),
            }])
        })?;
        let rules = root
            .get("policies")
            .and_then(serde_yaml::Value::as_sequence)
            .map_or(0, Vec::len);
        if rules > crate::policy::parse::MAX_RULES {
            return Err(ConfigErrors(vec![Problem {
                path: "policies".into(),
                message: format!(
                    "{rules} rules; at most {} are allowed",
                    crate::policy::parse::MAX_RULES
                ),
            }]));
        }
        let problems = RefCell::new(Vec::new());
        let config = {
            let root = Section::root(&root, &problems);
            let upstream = parse_upstream(&root.section("upstream", true));
            let listen = parse_listen(&root.section("listen", true));
            let limits = parse_limits(&root.section("limits", false));
            let runtime = parse_runtime(&root.section("runtime", false));
            let log = parse_log(&root.section("log", false));
            let producer_state = parse_producer_state(&root.section("producer_state", false));
            let audit = parse_audit(&root.section("audit", false), &upstream);
            let metrics = parse_metrics(&root.section("metrics", false));
            let watchdog = parse_watchdog(&root.section("transaction_watchdog", false));
            let policies = crate::policy::parse::parse_policies(&root);
            root.finish(&[
                "upstream",
                "listen",
                "limits",
                "runtime",
                "log",
                "producer_state",
                "audit",
                "metrics",
                "transaction_watchdog",
                "policies",
            ]);
            Config {
                upstream,
                listen,
                limits,
                runtime,
                log,
                producer_state,
                audit,
                metrics,
                watchdog,
                policies,
            }
        };
        let mut problems = problems.into_inner();
        cross_check(&config, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// A short human description of what this config will do (for `check-config`).
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let l = &self.listen;
        out.push_str(&format!(
            "upstream bootstrap: {}\n",
            self.upstream.bootstrap_servers.join(", ")
        ));
        out.push_str(&format!(
            "bootstrap listener: {}:{} (advertised as {}:{})\n",
            l.bind_host, l.bootstrap_port, l.advertised_host, l.bootstrap_port
        ));
        match &l.broker_ports {
            BrokerPorts::Range {
                first_port,
                node_id_offset,
                count,
            } => out.push_str(&format!(
                "broker listeners: node n -> port {first_port} + (n - {node_id_offset}), nodes {}..={}\n",
                node_id_offset,
                i64::from(*node_id_offset) + i64::from(*count) - 1
            )),
            BrokerPorts::Map(m) => {
                for (n, p) in m {
                    out.push_str(&format!("broker listener: node {n} -> port {p}\n"));
                }
            }
        }
        out.push_str(&format!(
            "limits: max frame {} bytes, idle timeout {:?}, write timeout {:?}, max {} connections, {} requests in flight per connection\n",
            self.limits.max_frame_bytes,
            self.limits.idle_timeout,
            self.limits.write_timeout,
            self.limits.max_connections,
            self.limits.max_in_flight_per_connection
        ));
        out.push_str(&match self.runtime.worker_threads {
            Some(n) => format!("runtime: {n} worker threads\n"),
            None => "runtime: one worker thread per core\n".to_string(),
        });
        out.push_str(&crate::policy::explain::explain(&self.policies));
        out
    }
}

fn parse_upstream(s: &Section) -> UpstreamConfig {
    let bootstrap_servers = s.string_list("bootstrap_servers", true, |v| {
        reader::check_host_port(v).err()
    });
    let connect_timeout = s.millis("connect_timeout_ms", 10_000, 1, 600_000);
    let metadata_refresh = s.millis("metadata_refresh_ms", 30_000, 100, 86_400_000);
    s.finish(&[
        "bootstrap_servers",
        "connect_timeout_ms",
        "metadata_refresh_ms",
    ]);
    UpstreamConfig {
        bootstrap_servers,
        connect_timeout,
        metadata_refresh,
    }
}

fn parse_listen(s: &Section) -> ListenConfig {
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
        let chosen = match (range, map) {
            (Some(r), None) => r,
            (None, Some(m)) => m,
            (Some(r), Some(_)) => {
                bp.problem_here("set either 'range' or 'map', not both");
                r
            }
            (None, None) => {
                if s.optional_section("broker_ports").is_some() {
                    bp.problem_here("needs 'range' or 'map'");
                }
                BrokerPorts::Map(BTreeMap::new())
            }
        };
        bp.finish(&["range", "map"]);
        chosen
    };
    s.finish(&[
        "bind_host",
        "advertised_host",
        "bootstrap_port",
        "broker_ports",
    ]);
    ListenConfig {
        bind_host,
        advertised_host,
        bootstrap_port,
        broker_ports,
    }
}

fn parse_limits(s: &Section) -> LimitsConfig {
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

fn parse_runtime(s: &Section) -> RuntimeConfig {
    // 0 (the default): one per core.
    let worker_threads = s.int("worker_threads", Some(0), 0, 1024) as usize;
    s.finish(&["worker_threads"]);
    RuntimeConfig {
        worker_threads: (worker_threads > 0).then_some(worker_threads),
    }
}

fn parse_log(s: &Section) -> LogConfig {
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

fn parse_producer_state(s: &Section) -> GuardConfig {
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
    s.finish(&[
        "enabled",
        "mode",
        "check_crc",
        "max_tracked",
        "idle_expiry_ms",
        "in_flight_wait_ms",
    ]);
    GuardConfig {
        enabled,
        mode,
        check_crc,
        max_tracked,
        idle_expiry,
        in_flight_wait,
    }
}

fn parse_audit(s: &Section, upstream: &UpstreamConfig) -> AuditConfig {
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

fn parse_metrics(s: &Section) -> MetricsConfig {
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
    s.finish(&["enabled", "listen", "max_producer_series"]);
    MetricsConfig {
        enabled,
        listen,
        max_producer_series,
    }
}

fn parse_watchdog(s: &Section) -> WatchdogConfig {
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

fn cross_check(c: &Config, problems: &mut Vec<Problem>) {
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

#[cfg(test)]
mod tests;

//! Configuration: YAML in, a validated [`Config`] out, or *every* problem with its key path.
//!
//! We walk the YAML tree by hand instead of `#[derive(Deserialize)]`: serde stops at the first error,
//! while an operator fixing a config wants all of them at once (`limits.max_frame_bytes: must be ...`,
//! `listen.broker_ports: unknown key 'rnage'`, ...).

pub mod reader;
mod sections;
pub use reader::Problem;

pub use crate::audit::{AuditConfig, KafkaAuditConfig};
pub use crate::guard::{GuardConfig, Mode};
use reader::Section;
use sections::*;
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
    /// One port for every broker (the bootstrap port, TLS only): the client's SNI host name picks the
    /// broker, and node `n` is advertised as the pattern with `$(nodeId)` replaced by `n`.
    Sni(SniPattern),
}

/// A host-name pattern with one `$(nodeId)`, such as `broker-$(nodeId).kafka.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniPattern {
    prefix: String,
    suffix: String,
}

impl std::fmt::Display for SniPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}{}", self.prefix, Self::NODE_ID, self.suffix)
    }
}

impl SniPattern {
    pub const NODE_ID: &'static str = "$(nodeId)";

    /// The pattern, or why it is not one: exactly one `$(nodeId)`, and a valid host name around it.
    pub fn parse(pattern: &str) -> Result<SniPattern, String> {
        let pattern = pattern.to_ascii_lowercase();
        let Some((prefix, suffix)) = pattern.split_once(&Self::NODE_ID.to_ascii_lowercase()) else {
            return Err(format!("'{pattern}' does not contain {}", Self::NODE_ID));
        };
        if suffix.contains("$(nodeid)") {
            return Err(format!("'{pattern}' contains {} twice", Self::NODE_ID));
        }
        let p = SniPattern {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        };
        reader::check_host(&p.host(2_147_483_647))
            .map_err(|e| format!("'{pattern}' does not make host names: {e}"))?;
        Ok(p)
    }

    /// The host name of node `node_id`.
    pub fn host(&self, node_id: i32) -> String {
        format!("{}{node_id}{}", self.prefix, self.suffix)
    }

    /// The node id a host name names, if it is one of the pattern's (case-insensitive, as DNS is; the
    /// id in decimal without sign or leading zeros, so each node has one name).
    pub fn node(&self, name: &str) -> Option<i32> {
        let lower = name.to_ascii_lowercase();
        let id = lower
            .strip_prefix(&self.prefix)?
            .strip_suffix(&self.suffix)?;
        let canonical = !id.is_empty()
            && id.len() <= 10
            && id.bytes().all(|b| b.is_ascii_digit())
            && (id == "0" || !id.starts_with('0'));
        canonical.then(|| id.parse().ok()).flatten()
    }
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
            BrokerPorts::Sni(_) => None,
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
            BrokerPorts::Sni(_) => Vec::new(),
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
    /// Offer the pinned Kafka release's unstable latest versions of the keys the proxy decodes, where its
    /// codecs read them (Kafka 4.4: InitProducerId v6, two-phase commit), to brokers run with
    /// `unstable.api.versions.enable=true`.
    pub unstable_api_versions: bool,
    /// The proxy reaches brokers with TLS (`upstream.tls`).
    pub tls: Option<crate::tls::UpstreamTls>,
    /// The proxy's own connections log in with SASL (`upstream.sasl`).
    pub sasl: Option<crate::server::sasl::UpstreamSasl>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    pub bind_host: String,
    pub advertised_host: String,
    pub bootstrap_port: u16,
    pub broker_ports: BrokerPorts,
    /// Clients connect with TLS (`listen.tls`).
    pub tls: Option<crate::tls::ListenTls>,
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
    /// The endpoint speaks TLS (`metrics.tls`).
    pub tls: Option<crate::tls::ListenTls>,
    /// A file holding the bearer token `/metrics` and `/producers` require (`metrics.token_file`,
    /// re-read when it changes); `/healthz` and `/readyz` stay open for probes.
    pub token_file: Option<std::path::PathBuf>,
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
        let refuse = |message: String| {
            ConfigErrors(vec![Problem {
                path: path.display().to_string(),
                message,
            }])
        };
        let bytes = reader::read_bounded(path, reader::MAX_CONFIG_BYTES).map_err(refuse)?;
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
            BrokerPorts::Sni(p) => {
                out.push_str(&format!(
                    "brokers share the bootstrap port, picked by SNI: {}:{} (the bootstrap name: {})\n",
                    p,
                    l.bootstrap_port,
                    l.advertised_host
                ));
                // Clients verify the names they connect to: say when the certificate would fail them.
                if let Some(tls) = &l.tls {
                    let names: Vec<String> = crate::tls::summaries(&tls.cert_file)
                        .into_iter()
                        .take(1)
                        .flat_map(|s| s.alt_names)
                        .collect();
                    for host in [l.advertised_host.clone(), p.host(1)] {
                        if !crate::tls::principal::covers(&names, &host) {
                            out.push_str(&format!(
                                "  WARNING: the listener certificate does not name {host}; clients verifying host names will refuse it\n"
                            ));
                        }
                    }
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
        out.push_str(&crate::tls::explain(
            self.listen.tls.as_ref(),
            self.upstream.tls.as_ref(),
            self.metrics.tls.as_ref(),
        ));
        if let Some(addr) = &self.metrics.listen {
            out.push_str(&format!(
                "operator endpoint {addr}: {}, /metrics and /producers {}\n",
                if self.metrics.tls.is_some() {
                    "TLS"
                } else {
                    "plaintext"
                },
                match &self.metrics.token_file {
                    Some(p) => format!("need the bearer token in {}", p.display()),
                    None => "are open".to_string(),
                }
            ));
        }
        out.push_str(&crate::policy::explain::explain(&self.policies));
        out
    }
}
#[cfg(test)]
mod tests;

//! Shared test harness: a real Kafka (started by scripts/kafka, reused if running), an in-process proxy
//! per test on its own ports, and a leak detector on every frame the proxy sends to clients.
//!
//! The proxy binds and advertises 127.0.0.2 while the brokers live on 127.0.0.1. A broker address that
//! slipped through un-rewritten would show up as the bytes "127.0.0.1" followed by a broker port (the
//! encoding of host+port in every address-carrying response), which the detector looks for.

#![allow(dead_code)]

use bytes::Bytes;
use kafka_eos_proxy::config::{BrokerPorts, Config};
use kafka_eos_proxy::{Hooks, Proxy};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const PROXY_HOST: &str = "127.0.0.2";
pub const UPSTREAM_HOST: &str = "127.0.0.1";
/// Every broker port scripts/kafka uses (single: 19092; cluster: 29192, 29292, 29392; dynamic: 18192,
/// and 18292 for the broker tests add).
pub const UPSTREAM_PORTS: [i32; 6] = [19092, 29192, 29292, 29392, 18192, 18292];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    Single,
    Three,
    /// One node that tests grow and shrink (scripts/kafka add-broker / remove-broker).
    Dynamic,
}

impl Cluster {
    fn name(self) -> &'static str {
        match self {
            Cluster::Single => "single",
            Cluster::Three => "cluster",
            Cluster::Dynamic => "dynamic",
        }
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts (or reuses) the local Kafka and returns its bootstrap servers.
pub fn kafka(cluster: Cluster) -> String {
    static SINGLE: OnceLock<String> = OnceLock::new();
    static THREE: OnceLock<String> = OnceLock::new();
    static DYNAMIC: OnceLock<String> = OnceLock::new();
    let cell = match cluster {
        Cluster::Single => &SINGLE,
        Cluster::Three => &THREE,
        Cluster::Dynamic => &DYNAMIC,
    };
    cell.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/kafka"))
            .args(["start", cluster.name()])
            .output()
            .expect("run scripts/kafka");
        assert!(
            out.status.success(),
            "scripts/kafka start {} failed:\n{}",
            cluster.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .clone()
}

/// Kafka's libraries (the Java client among them), fetched by scripts/kafka.
/// Runs `scripts/kafka ARGS...` and returns its stdout; panics with its stderr on failure.
pub fn kafka_script(args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts/kafka"))
        .args(args)
        .output()
        .expect("run scripts/kafka");
    assert!(
        out.status.success(),
        "scripts/kafka {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The pinned Kafka's libraries (the Java client and Kafka Streams are always the pinned release, also
/// when the brokers are another one: KAFKA_VERSION in the compatibility runs).
pub fn kafka_libs() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/kafka"))
        .arg("libs")
        .env_remove("KAFKA_VERSION")
        .output()
        .expect("run scripts/kafka libs");
    assert!(out.status.success());
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Port blocks for proxies: 10 ports each, a per-process start so parallel test binaries don't collide.
fn next_port_block() -> u16 {
    static NEXT: OnceLock<AtomicU16> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU16::new(21_000 + (std::process::id() % 50) as u16 * 120));
    next.fetch_add(10, Ordering::Relaxed)
}

#[derive(Default)]
pub struct LeakDetector {
    pub frames: AtomicUsize,
    pub leaks: Mutex<Vec<String>>,
}

impl LeakDetector {
    fn inspect(&self, frame: &[u8]) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        let needle = UPSTREAM_HOST.as_bytes();
        let mut i = 0;
        while let Some(pos) = find(&frame[i..], needle) {
            let at = i + pos + needle.len();
            if let Some(port) = frame.get(at..at + 4) {
                let port = i32::from_be_bytes([port[0], port[1], port[2], port[3]]);
                if UPSTREAM_PORTS.contains(&port) {
                    self.leaks.lock().unwrap().push(format!(
                        "upstream address {UPSTREAM_HOST}:{port} in a {}-byte frame (api response, corr id {})",
                        frame.len(),
                        i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]])
                    ));
                }
            }
            i = at;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decides, per broker response (api key, frame), whether the proxy drops it before the client sees it.
pub type DropRule = Arc<dyn Fn(i16, &[u8]) -> bool + Send + Sync>;
/// Picks broker answers (by api key) the proxy never reads: its session closes as if the broker
/// connection broke after the broker handled the request.
pub type BreakRule = Arc<dyn Fn(i16) -> bool + Send + Sync>;

pub struct TestProxy {
    pub proxy: Option<Proxy>,
    /// Every audit event the proxy emitted.
    pub audits: Arc<Mutex<Vec<kafka_eos_proxy::audit::AuditEvent>>>,
    /// Every Produce request frame the proxy wrote upstream.
    pub upstream_frames: Arc<Mutex<Vec<Bytes>>>,
    pub bootstrap: String,
    pub first_broker_port: u16,
    pub leaks: Arc<LeakDetector>,
}

impl TestProxy {
    /// The audit events of one kind the proxy emitted so far.
    /// Asserts that the proxy itself fenced a zombie (a `fenced_epoch` audit event), rather than the
    /// broker.
    pub fn assert_fenced_at_the_proxy(&self) {
        let fenced = self.events(kafka_eos_proxy::audit::Kind::FencedEpoch).len();
        assert!(
            fenced > 0,
            "the zombie was answered by the proxy, not the broker"
        );
    }

    /// The proxy's metrics (every test proxy has them).
    pub fn metrics(&self) -> Arc<kafka_eos_proxy::metrics::Metrics> {
        let proxy = self.proxy.as_ref().expect("running");
        proxy.shared().metrics.clone().expect("metrics on")
    }

    /// Client connections closed so far for `reason` (`connections_closed_total`).
    pub fn closed_connections(&self, reason: &str) -> u64 {
        let needle = format!("reason=\"{reason}\"");
        self.metrics()
            .render()
            .lines()
            .find(|l| {
                l.starts_with("kafka_eos_proxy_connections_closed_total") && l.contains(&needle)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    }

    /// The topics the proxy holds producer state for (sorted, each once).
    pub fn tracked_topics(&self) -> Vec<String> {
        let proxy = self.proxy.as_ref().expect("running");
        let mut t: Vec<String> = proxy
            .shared()
            .guard
            .store
            .snapshot(0)
            .iter()
            .map(|s| s.topic.to_string())
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    /// The Produce versions the proxy sent upstream so far (sorted, each once).
    pub fn produce_versions(&self) -> Vec<i16> {
        let mut v: Vec<i16> = self
            .upstream_frames
            .lock()
            .unwrap()
            .iter()
            .map(|f| i16::from_be_bytes([f[6], f[7]]))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn events(
        &self,
        kind: kafka_eos_proxy::audit::Kind,
    ) -> Vec<kafka_eos_proxy::audit::AuditEvent> {
        self.audits
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind == kind)
            .cloned()
            .collect()
    }

    /// The bootstrap.servers a client should use.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn broker_port(&self, node_id: i32) -> u16 {
        self.first_broker_port + node_id as u16
    }

    /// Proxy ports (bootstrap and broker listeners) a client may legitimately be told about.
    pub fn is_proxy_port(&self, port: i32) -> bool {
        let first = i32::from(self.first_broker_port);
        (first..first + 9).contains(&port)
    }

    pub fn assert_no_leaks(&self) {
        let leaks = self.leaks.leaks.lock().unwrap();
        assert!(
            leaks.is_empty(),
            "upstream addresses reached clients: {leaks:?}"
        );
        assert!(
            self.leaks.frames.load(Ordering::Relaxed) > 0,
            "the leak detector saw no frames at all"
        );
    }

    pub async fn stop(mut self) {
        self.assert_no_leaks();
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
    }

    /// [`TestProxy::stop`] for a test in which no answer may reach a client at all (the leak
    /// detector then has nothing to look at).
    pub async fn stop_answering_nothing(mut self) {
        assert_eq!(
            self.leaks.frames.load(Ordering::Relaxed),
            0,
            "answers reached a client"
        );
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
    }
}

pub fn proxy_config(upstream: &str, bootstrap_port: u16, first_broker_port: u16) -> Config {
    Config::parse(&proxy_yaml(upstream, bootstrap_port, first_broker_port)).expect("test config")
}

/// The YAML of a test proxy's config (append `policies:` to it for policy tests).
pub fn proxy_yaml(upstream: &str, bootstrap_port: u16, first_broker_port: u16) -> String {
    format!(
        r#"
upstream:
  bootstrap_servers: [{servers}]
  connect_timeout_ms: 5000
  metadata_refresh_ms: 2000
listen:
  bind_host: {PROXY_HOST}
  advertised_host: {PROXY_HOST}
  bootstrap_port: {bootstrap_port}
  broker_ports:
    range: {{ first_port: {first_broker_port}, node_id_offset: 0, count: 9 }}
limits:
  max_frame_bytes: 104857600
log:
  level: info
audit:
  stdout: false
"#,
        servers = upstream
            .split(',')
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Starts a proxy in front of `cluster`, on a fresh block of ports.
pub async fn start_proxy(cluster: Cluster) -> TestProxy {
    start_proxy_with(cluster, |_| {}).await
}

pub async fn start_proxy_with(cluster: Cluster, tweak: impl Fn(&mut Config)) -> TestProxy {
    start_proxy_full(cluster, tweak, None).await
}

pub async fn start_proxy_full(
    cluster: Cluster,
    tweak: impl Fn(&mut Config),
    drop_rule: Option<DropRule>,
) -> TestProxy {
    start_proxy_faulty(cluster, tweak, drop_rule, None).await
}

/// [`start_proxy_full`], and `break_rule` picks broker answers the proxy never reads: its session
/// closes as if the broker connection broke after the broker handled the request.
pub async fn start_proxy_faulty(
    cluster: Cluster,
    tweak: impl Fn(&mut Config),
    drop_rule: Option<DropRule>,
    break_rule: Option<BreakRule>,
) -> TestProxy {
    init_logging();
    let upstream = kafka(cluster);
    let leaks = Arc::new(LeakDetector::default());
    for _attempt in 0..20 {
        let block = next_port_block();
        let mut config = proxy_config(&upstream, block, block + 1);
        tweak(&mut config);
        let first_broker_port = match &config.listen.broker_ports {
            BrokerPorts::Range { first_port, .. } => *first_port,
            BrokerPorts::Map(_) | BrokerPorts::Sni(_) => block + 1,
        };
        let detector = leaks.clone();
        let audits: Arc<Mutex<Vec<kafka_eos_proxy::audit::AuditEvent>>> = Arc::default();
        let sink = audits.clone();
        let upstream_frames: Arc<Mutex<Vec<Bytes>>> = Arc::default();
        let upstream_sink = upstream_frames.clone();
        let hooks = Hooks {
            on_client_frame: Some(Arc::new(move |f: &[u8]| detector.inspect(f))),
            drop_client_frame: drop_rule.clone(),
            break_before_answer: break_rule.clone(),
            // Produce requests only (api key 0): what the broker was asked to write.
            on_upstream_frame: Some(Arc::new(move |f: &[u8]| {
                if f.len() > 6 && f[4..6] == [0, 0] {
                    upstream_sink
                        .lock()
                        .unwrap()
                        .push(Bytes::copy_from_slice(f));
                }
            })),
            on_audit: Some(Arc::new(move |e| sink.lock().unwrap().push(e.clone()))),
        };
        match Proxy::start(config, hooks).await {
            Ok(proxy) => {
                let bootstrap = format!("{PROXY_HOST}:{}", proxy.bootstrap_addr().port());
                // The proxy's first metadata refresh opened the broker listeners.
                return TestProxy {
                    proxy: Some(proxy),
                    audits,
                    upstream_frames,
                    bootstrap,
                    first_broker_port,
                    leaks,
                };
            }
            Err(e) if e.to_string().contains("in use") => continue,
            Err(e) => panic!("proxy did not start: {e:#}"),
        }
    }
    panic!("no free port block for a test proxy");
}

pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber_init();
    });
}

fn tracing_subscriber_init() -> Option<()> {
    let level = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into());
    kafka_eos_proxy::telemetry::init_logging(&kafka_eos_proxy::config::LogConfig {
        format: kafka_eos_proxy::config::LogFormat::Text,
        level,
    });
    Some(())
}

/// A topic name unique to this test run.
pub fn unique_topic(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The `RESULT key=value` lines a client program printed (tests/java, tests/go), every value of a repeated
/// key kept; fails unless the program said `RESULT ok=true`.
pub fn client_results(stdout: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut results: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in stdout.lines() {
        if let Some((k, v)) = line.strip_prefix("RESULT ").and_then(|l| l.split_once('=')) {
            results
                .entry(k.to_string())
                .or_default()
                .push(v.to_string());
        }
    }
    assert_eq!(
        results.get("ok").map(|v| v[0].as_str()),
        Some("true"),
        "{stdout}"
    );
    results
}

/// `[id@]host:port` in a client's RESULT value must be a proxy address.
pub fn assert_proxy_address(proxy: &TestProxy, value: &str) {
    let addr = value.rsplit('@').next().unwrap_or(value);
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    assert_eq!(host, PROXY_HOST, "{value}");
    assert!(
        proxy.is_proxy_port(port.parse().expect("a port")),
        "{value} is not a proxy port"
    );
}

/// The highest version of `key` the cluster's first broker offers, asked directly (the compatibility
/// runs use older releases: a test of a newer version adapts its expectation to it).
pub async fn broker_max_version(cluster: Cluster, key: kafka_protocol::messages::ApiKey) -> i16 {
    use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse};
    use kafka_protocol::protocol::StrBytes;
    let first = kafka(cluster);
    let first = first.split(',').next().expect("an address");
    let mut raw = crate::wire::Raw::connect(first).await;
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("raw-test"))
        .with_client_software_version(StrBytes::from_static_str("1.0"));
    let resp: ApiVersionsResponse = raw
        .call(kafka_protocol::messages::ApiKey::ApiVersions, 3, &req)
        .await;
    resp.api_keys
        .iter()
        .find(|k| k.api_key == key as i16)
        .map_or(-1, |k| k.max_version)
}

/// Runs a client program (the Java or Go scenarios) with `env` added, asserts that it succeeded
/// (showing its output and the tail of its errors if not), and returns its RESULT lines.
pub async fn run_scenario(
    what: &'static str,
    mut command: Command,
    env: &[(&str, String)],
) -> std::collections::BTreeMap<String, Vec<String>> {
    command.envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        out.status.success(),
        "{what} failed\nstdout:\n{stdout}\nstderr (tail):\n{}",
        tail.join("\n")
    );
    client_results(&stdout)
}

//! The broker registry: which upstream address each node id has, and which proxy port stands for it.
//!
//! Listeners are created on discovery: the first time any response (or the proxy's own metadata refresh)
//! names a node id, its port is bound *before* the rewritten response leaves the proxy, so a client can
//! never be told about a port that is not listening yet. Listeners are never closed while the proxy runs:
//! a broker that leaves the metadata may come back, and its port must still mean the same node.

use crate::config::{BrokerPorts, ListenConfig, SniPattern};
use dashmap::DashMap;
use kafka_protocol::protocol::StrBytes;

use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How long to wait before trying again to bind a port that failed.
const BIND_RETRY: Duration = Duration::from_secs(5);

pub struct Brokers {
    advertised_host: StrBytes,
    bootstrap_port: u16,
    bind_host: String,
    ports: BrokerPorts,
    /// node id -> upstream (host, port), as last announced by the cluster.
    upstream: DashMap<i32, (String, i32)>,
    /// node id -> proxy port with a live listener.
    bound: DashMap<i32, u16>,
    /// node id -> when binding (or mapping) last failed, to keep retries and log lines rare.
    failed: DashMap<i32, Instant>,
    bind_lock: tokio::sync::Mutex<()>,
    new_listeners: mpsc::UnboundedSender<(i32, TcpListener)>,
    /// Topic ids and names (see [`super::topics`]).
    pub topics: super::topics::Topics,
}

impl Brokers {
    pub fn new(
        listen: &ListenConfig,
        new_listeners: mpsc::UnboundedSender<(i32, TcpListener)>,
    ) -> Self {
        Brokers {
            advertised_host: StrBytes::from_string(listen.advertised_host.clone()),
            bootstrap_port: listen.bootstrap_port,
            bind_host: listen.bind_host.clone(),
            ports: listen.broker_ports.clone(),
            upstream: DashMap::new(),
            bound: DashMap::new(),
            failed: DashMap::new(),
            bind_lock: tokio::sync::Mutex::new(()),
            new_listeners,
            topics: Default::default(),
        }
    }

    /// With `listen.broker_ports.sni`: the pattern that names each broker on the shared port.
    fn sni(&self) -> Option<&SniPattern> {
        match &self.ports {
            BrokerPorts::Sni(p) => Some(p),
            _ => None,
        }
    }

    /// Whether every broker shares the bootstrap port and a client's SNI host name picks it.
    pub fn routes_by_sni(&self) -> bool {
        self.sni().is_some()
    }

    /// With SNI routing, which upstream a TLS client asking for host name `sni` means: `Ok(None)` the
    /// bootstrap name, `Ok(Some(n))` node `n`'s name (a node the cluster announced), otherwise why it
    /// is refused. Without SNI routing every name means the listener's own target (`Ok(None)`).
    pub fn route_sni(&self, sni: Option<&str>) -> Result<Option<i32>, String> {
        let Some(pattern) = self.sni() else {
            return Ok(None);
        };
        let Some(name) = sni else {
            return Err(
                "no SNI host name in the TLS handshake (connect by host name, not address)".into(),
            );
        };
        if name.eq_ignore_ascii_case(self.advertised_host.as_str()) {
            return Ok(None);
        }
        match pattern.node(name) {
            Some(id) if self.upstream.contains_key(&id) => Ok(Some(id)),
            Some(id) => Err(format!(
                "SNI host name '{name}' names node {id}, which the cluster has not announced"
            )),
            None => Err(format!(
                "unknown SNI host name '{}' (neither the bootstrap name nor a broker name)",
                name.escape_debug()
            )),
        }
    }

    /// Upstream address of a node, as `host:port`.
    pub fn upstream_of(&self, node_id: i32) -> Option<String> {
        self.upstream
            .get(&node_id)
            .map(|e| format!("{}:{}", e.0, e.1))
    }

    /// Proxy port of a node, if its listener is up.
    pub fn proxy_port(&self, node_id: i32) -> Option<u16> {
        self.bound.get(&node_id).map(|p| *p)
    }

    /// All (node id, proxy port, upstream address) known so far.
    pub fn known(&self) -> Vec<(i32, Option<u16>, String)> {
        let mut out: Vec<_> = self
            .upstream
            .iter()
            .map(|e| {
                let id = *e.key();
                (id, self.proxy_port(id), format!("{}:{}", e.0, e.1))
            })
            .collect();
        out.sort();
        out
    }

    /// Records that the cluster announced `node_id` at `host:port` and makes sure a proxy listener stands
    /// for it. Returns the proxy address to advertise, or `None` if the node cannot be proxied (no port in
    /// the configured mapping, or the port could not be bound): the caller must then not hand out the
    /// address. With SNI routing, the node's name on the bootstrap port (nothing to bind).
    pub async fn advertise(&self, node_id: i32, host: &str, port: i32) -> Option<(StrBytes, u16)> {
        let port = self.advertise_port(node_id, host, port).await?;
        let host = match self.sni() {
            Some(pattern) => StrBytes::from_string(pattern.host(node_id)),
            None => self.advertised_host.clone(),
        };
        Some((host, port))
    }

    async fn advertise_port(&self, node_id: i32, host: &str, port: i32) -> Option<u16> {
        let changed = match self.upstream.get(&node_id) {
            Some(e) => e.0 != host || e.1 != port,
            None => true,
        };
        if changed {
            let previous = self.upstream.insert(node_id, (host.to_string(), port));
            info!(node_id, upstream = %format!("{host}:{port}"), previous = ?previous, "broker address learned");
        }
        if let Some(p) = self.bound.get(&node_id) {
            return Some(*p);
        }
        if self.routes_by_sni() {
            self.bound.insert(node_id, self.bootstrap_port);
            return Some(self.bootstrap_port);
        }
        if self
            .failed
            .get(&node_id)
            .is_some_and(|t| t.elapsed() < BIND_RETRY)
        {
            return None;
        }
        let Some(proxy_port) = self.ports.port_for(node_id) else {
            self.failed.insert(node_id, Instant::now());
            warn!(
                node_id,
                "broker node id has no proxy port in listen.broker_ports; it is hidden from clients"
            );
            return None;
        };
        let _guard = self.bind_lock.lock().await;
        if let Some(p) = self.bound.get(&node_id) {
            return Some(*p);
        }
        match TcpListener::bind((self.bind_host.as_str(), proxy_port)).await {
            Ok(listener) => {
                let actual = listener
                    .local_addr()
                    .map(|a| a.port())
                    .unwrap_or(proxy_port);
                if self.new_listeners.send((node_id, listener)).is_err() {
                    // The server is shutting down; nothing will accept on this port.
                    return None;
                }
                self.bound.insert(node_id, actual);
                self.failed.remove(&node_id);
                info!(node_id, port = actual, "listening for broker");
                Some(actual)
            }
            Err(e) => {
                self.failed.insert(node_id, Instant::now());
                warn!(node_id, port = proxy_port, error = %e, "cannot bind broker listener; node hidden from clients");
                None
            }
        }
    }
}

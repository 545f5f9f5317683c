//! The broker registry: which upstream address each node id has, and which proxy port stands for it.
//!
//! Listeners are created on discovery: the first time any response (or the proxy's own metadata refresh)
//! names a node id, its port is bound *before* the rewritten response leaves the proxy, so a client can
//! never be told about a port that is not listening yet. Listeners are never closed while the proxy runs:
//! a broker that leaves the metadata may come back, and its port must still mean the same node.

use crate::config::{BrokerPorts, ListenConfig};
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

    pub fn advertised_host(&self) -> &StrBytes {
        &self.advertised_host
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
    /// for it. Returns the proxy port to advertise, or `None` if the node cannot be proxied (no port in the
    /// configured mapping, or the port could not be bound): the caller must then not hand out the address.
    pub async fn advertise(&self, node_id: i32, host: &str, port: i32) -> Option<u16> {
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

//! Prometheus metrics. Every handle is built once; the hot path indexes arrays (per api key) or per-connection
//! caches instead of hashing label values per request.
//!
//! Per-producer series are labelled by client id and transactional id (never by raw producer id) and
//! capped at `metrics.max_producer_series`: past the cap the least recently used label set is removed from
//! every per-producer metric. The cap, the live count and the evictions are metrics themselves.

pub mod http;
pub mod lso;

use crate::audit::{AuditEvent, Kind};
use dashmap::DashMap;
use kafka_protocol::messages::ApiKey;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::atomic::{AtomicU64, Ordering};

const PREFIX: &str = "kafka_eos_proxy";
/// Api keys go up to ~90 today; anything beyond shares the last slot's "other" label.
const API_SLOTS: usize = 128;

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

/// Latency buckets from 50 µs to 30 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

/// Per-api handles, indexed by api key.
pub struct ApiHandles {
    pub requests: IntCounter,
    pub proxy_seconds: Histogram,
    pub upstream_seconds: Histogram,
}

/// Label values (client ids, transactional ids, topics) are cut to this many bytes, so a series costs
/// bounded memory whatever a client names itself (the series count is bounded separately).
pub const MAX_LABEL_BYTES: usize = crate::client::MAX_KEPT_ID_BYTES;

/// `s` cut to at most [`MAX_LABEL_BYTES`], on a character boundary.
pub fn bounded_label(s: &str) -> &str {
    cut_to(s, MAX_LABEL_BYTES)
}

pub use crate::protocol::cut_to;

/// The (client id, transactional id) labels of the per-producer series, bounded.
pub fn producer_labels<'a>(client: &'a str, txn: &'a str) -> [&'a str; 2] {
    [bounded_label(client), bounded_label(txn)]
}

pub struct Metrics {
    pub registry: Registry,
    pub connections_active: IntGauge,
    pub connections_accepted_bootstrap: IntCounter,
    pub connections_accepted_broker: IntCounter,
    connections_closed: IntCounterVec,
    pub connections_rejected: IntCounter,
    /// Per-api handles, created on first use (so /metrics lists only the apis clients use).
    apis: Vec<std::sync::OnceLock<ApiHandles>>,
    requests: IntCounterVec,
    proxy_seconds: HistogramVec,
    upstream_seconds: HistogramVec,
    pub bytes_from_client: IntCounter,
    pub bytes_to_upstream: IntCounter,
    pub bytes_from_upstream: IntCounter,
    pub bytes_to_client: IntCounter,
    pub tracked_producer_partitions: IntGauge,
    pub producer_state_evictions: IntCounter,
    /// Entries evicted from the proxy's bounded tables, by table (moved at scrape time).
    pub state_evictions: IntCounterVec,
    /// Approximate bytes held by the proxy's state tables, by table (read at scrape time).
    pub state_bytes: IntGaugeVec,
    /// When the earliest certificate of each configured TLS file expires (Unix seconds).
    pub tls_certificate_expiry: IntGaugeVec,
    pub credential_reloads: IntCounterVec,
    audit_events: IntCounterVec,
    pub audit_dropped: IntCounter,
    pub hanging_transactions: IntGauge,
    pub stuck_partitions: IntGauge,
    pub read_committed_lag: IntGaugeVec,
    /// Policy outcomes by rule, check and action (bounded: rules x checks x 3).
    pub policy_actions: IntCounterVec,
    /// Config reloads by result (applied, refused).
    pub policy_reloads: IntCounterVec,
    pub policy_rules: IntGauge,
    /// 1 while the config file on disk is the one in force; 0 after a refused reload.
    pub policy_config_valid: IntGauge,
    pub producers: ProducerMetrics,
}

/// Per-producer metrics, labelled (client_id, transactional_id).
pub struct ProducerMetrics {
    pub batches: IntCounterVec,
    pub records: IntCounterVec,
    pub bytes: IntCounterVec,
    pub duplicates: IntCounterVec,
    /// Batches with the content of one the client had written (see `guard::content`).
    pub duplicate_content: IntCounterVec,
    pub out_of_order: IntCounterVec,
    pub fenced: IntCounterVec,
    pub epoch_bumps: IntCounterVec,
    /// Batches the idempotence upgrade sent upstream under a producer id the proxy obtained.
    pub upgraded_batches: IntCounterVec,
    /// Retries of upgraded batches of unknown fate, sent again under their first stamp.
    pub upgrade_resent: IntCounterVec,
    /// Restarts of an upgraded producer's partition, by how (rewound, epoch_bump).
    pub upgrade_restarts: IntCounterVec,
    pub txn_committed: IntCounterVec,
    pub txn_aborted: IntCounterVec,
    pub txn_duration: HistogramVec,
    pub open_transactions: IntGaugeVec,
    /// hash(client, txn) -> (client, txn, last used): looked up without allocating on the data path.
    /// Label set hash -> (client id, transactional id, last use, principal named for it).
    series: DashMap<u64, (String, String, u64, Option<String>)>,
    /// `producer_principal{client_id, transactional_id, principal}` = 1: who the broker knows a
    /// producer's series as (an info series: join it on the other two labels).
    pub principal: IntGaugeVec,
    cap: usize,
    pub series_live: IntGauge,
    pub series_limit: IntGauge,
    pub series_evicted: IntCounter,
    touches: AtomicU64,
}

fn counter_vec(
    r: &Registry,
    n: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name(n), help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, n: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name(n), help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, n: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name(n), help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge_vec(
    r: &Registry,
    n: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name(n), help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram_vec(
    r: &Registry,
    n: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name(n), help).buckets(latency_buckets()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Short stable label for an api key.
pub fn api_label(key: i16) -> String {
    match ApiKey::try_from(key) {
        Ok(k) => format!("{k:?}"),
        Err(_) => "Unknown".to_string(),
    }
}

impl Metrics {
    /// Registers every metric on a fresh registry (an error here is a bug in a definition, reported at
    /// start).
    pub fn new(max_producer_series: usize) -> prometheus::Result<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let producer = ["client_id", "transactional_id"];
        let proxy_seconds = histogram_vec(
            &r,
            "request_proxy_seconds",
            "Time a request and its response spent inside the proxy, by api",
            &["api"],
        )?;
        let upstream_seconds = histogram_vec(
            &r,
            "request_upstream_seconds",
            "Time from writing a request upstream to reading its response, by api",
            &["api"],
        )?;
        let requests = counter_vec(
            &r,
            "requests_total",
            "Requests from clients, by api",
            &["api"],
        )?;
        let apis = (0..API_SLOTS).map(|_| std::sync::OnceLock::new()).collect();
        let accepted = counter_vec(
            &r,
            "connections_accepted_total",
            "Client connections accepted, by listener (bootstrap or broker)",
            &["listener"],
        )?;
        let bytes_received =
            counter_vec(&r, "bytes_received_total", "Bytes read, by peer", &["from"])?;
        let bytes_sent = counter_vec(&r, "bytes_sent_total", "Bytes written, by peer", &["to"])?;
        let m = Metrics {
            connections_active: gauge(&r, "connections_active", "Open client connections")?,
            connections_accepted_bootstrap: accepted.with_label_values(&["bootstrap"]),
            connections_accepted_broker: accepted.with_label_values(&["broker"]),
            connections_closed: counter_vec(
                &r,
                "connections_closed_total",
                "Client connections closed, by reason",
                &["reason"],
            )?,
            connections_rejected: counter(
                &r,
                "connections_rejected_total",
                "Client connections refused at accept because of limits.max_connections",
            )?,
            apis,
            requests,
            proxy_seconds,
            upstream_seconds,
            bytes_from_client: bytes_received.with_label_values(&["client"]),
            bytes_from_upstream: bytes_received.with_label_values(&["upstream"]),
            bytes_to_client: bytes_sent.with_label_values(&["client"]),
            bytes_to_upstream: bytes_sent.with_label_values(&["upstream"]),
            tracked_producer_partitions: gauge(
                &r,
                "tracked_producer_partitions",
                "Producer-partitions whose state the proxy keeps",
            )?,
            producer_state_evictions: counter(
                &r,
                "producer_state_evictions_total",
                "Producer-partition states evicted because of producer_state.max_tracked",
            )?,
            state_evictions: counter_vec(
                &r,
                "state_evictions_total",
                "Entries evicted from the proxy's bounded state tables to stay within their caps, by table",
                &["table"],
            )?,
            state_bytes: gauge_vec(
                &r,
                "state_bytes",
                "Approximate bytes held by the proxy's state tables, strings included, by table",
                &["table"],
            )?,
            tls_certificate_expiry: gauge_vec(
                &r,
                "tls_certificate_expiry_seconds",
                "When the earliest certificate of a configured TLS file expires, in seconds since the \
                 Unix epoch, by file (listen, listen_client_ca, upstream_ca, upstream_client, operator)",
                &["file"],
            )?,
            credential_reloads: counter_vec(
                &r,
                "credential_reloads_total",
                "Certificate and token files read again after they changed (or on SIGHUP), by source \
                 (listen.tls, upstream.tls, upstream.sasl, metrics.tls, metrics.token_file) and result (applied, refused: the \
                 previous ones stay in use)",
                &["source", "result"],
            )?,
            audit_events: counter_vec(
                &r,
                "audit_events_total",
                "Audit events, by kind",
                &["kind"],
            )?,
            audit_dropped: counter(
                &r,
                "audit_events_dropped_total",
                "Audit events dropped because a sink's queue was full",
            )?,
            hanging_transactions: gauge(
                &r,
                "hanging_transactions",
                "Transactions open longer than their timeout plus the watchdog margin",
            )?,
            stuck_partitions: gauge(
                &r,
                "stuck_partitions",
                "Partitions whose last stable offset has not moved while their high watermark did",
            )?,
            read_committed_lag: gauge_vec(
                &r,
                "read_committed_lag_records",
                "High watermark minus last stable offset, as last seen in fetch responses",
                &["topic", "partition"],
            )?,
            policy_actions: counter_vec(
                &r,
                "policy_actions_total",
                "Requests that broke a policy, by rule, check and what the proxy did (rejected, upgraded, audited)",
                &["rule", "check", "action"],
            )?,
            policy_reloads: counter_vec(
                &r,
                "policy_reloads_total",
                "Config reloads (SIGHUP or file change), by result (applied, refused)",
                &["result"],
            )?,
            policy_rules: gauge(&r, "policy_rules", "Policy rules in force")?,
            policy_config_valid: gauge(
                &r,
                "policy_config_valid",
                "1 if the last config load succeeded, 0 if the file on disk was refused (old rules stay)",
            )?,
            producers: ProducerMetrics {
                batches: counter_vec(
                    &r,
                    "producer_batches_total",
                    "Idempotent batches produced",
                    &producer,
                )?,
                records: counter_vec(
                    &r,
                    "producer_records_total",
                    "Records in idempotent batches",
                    &producer,
                )?,
                bytes: counter_vec(
                    &r,
                    "producer_bytes_total",
                    "Bytes of idempotent batches",
                    &producer,
                )?,
                duplicate_content: counter_vec(
                    &r,
                    "producer_duplicate_content_total",
                    "Batches carrying the content of one the same client had written on the partition \
                     within the content window (a lost answer's retry, or records re-sent under a new \
                     epoch or producer id), by what the proxy did (answered, forwarded)",
                    &["client_id", "transactional_id", "action"],
                )?,
                duplicates: counter_vec(
                    &r,
                    "producer_duplicates_answered_total",
                    "Retries of written batches answered by the proxy with the original offset",
                    &producer,
                )?,
                out_of_order: counter_vec(
                    &r,
                    "producer_out_of_order_total",
                    "Out-of-order sequences (seen by the proxy or returned by the broker)",
                    &producer,
                )?,
                fenced: counter_vec(
                    &r,
                    "producer_fenced_total",
                    "Requests from fenced epochs (refused by the proxy or the broker)",
                    &producer,
                )?,
                epoch_bumps: counter_vec(
                    &r,
                    "producer_epoch_bumps_total",
                    "Epoch changes seen in acknowledged batches",
                    &producer,
                )?,
                upgraded_batches: counter_vec(
                    &r,
                    "producer_upgraded_batches_total",
                    "Batches of a client without idempotence sent upstream as an idempotent \
                     producer's by the idempotence upgrade",
                    &producer,
                )?,
                upgrade_resent: counter_vec(
                    &r,
                    "producer_upgrade_resent_total",
                    "Retries of upgraded batches whose first attempt's fate was unknown (no answer, a \
                     timeout), sent again under that attempt's producer id, epoch and sequence so that \
                     the broker writes them once",
                    &producer,
                )?,
                upgrade_restarts: counter_vec(
                    &r,
                    "producer_upgrade_restarts_total",
                    "Partitions of an upgraded producer started again after a refused batch or one of \
                     unknown fate, by how: rewound (to the sequence after the last written batch) or \
                     epoch_bump (a new epoch at sequence 0)",
                    &["client_id", "transactional_id", "how"],
                )?,
                txn_committed: counter_vec(
                    &r,
                    "transactions_committed_total",
                    "Transactions committed",
                    &producer,
                )?,
                txn_aborted: counter_vec(
                    &r,
                    "transactions_aborted_total",
                    "Transactions aborted",
                    &producer,
                )?,
                txn_duration: histogram_vec(
                    &r,
                    "transaction_duration_seconds",
                    "From the first write of a transaction to its EndTxn answer",
                    &producer,
                )?,
                open_transactions: gauge_vec(
                    &r,
                    "open_transactions",
                    "Transactions in progress",
                    &producer,
                )?,
                series: DashMap::new(),
                principal: gauge_vec(
                    &r,
                    "producer_principal",
                    "1 for each per-producer label set with the principal its connection authenticated \
                     as (SASL, else the TLS client certificate); join on client_id and transactional_id",
                    &["client_id", "transactional_id", "principal"],
                )?,
                cap: max_producer_series.max(1),
                series_live: gauge(
                    &r,
                    "producer_series",
                    "Per-producer label sets currently exported",
                )?,
                series_limit: gauge(
                    &r,
                    "producer_series_limit",
                    "The cap on per-producer label sets",
                )?,
                series_evicted: counter(
                    &r,
                    "producer_series_evicted_total",
                    "Per-producer label sets removed to stay under the cap",
                )?,
                touches: AtomicU64::new(0),
            },
            registry: r,
        };
        m.producers.series_limit.set(m.producers.cap as i64);
        Ok(m)
    }

    pub fn api(&self, key: i16) -> &ApiHandles {
        let i = usize::try_from(key)
            .unwrap_or(API_SLOTS - 1)
            .min(API_SLOTS - 1);
        self.apis[i].get_or_init(|| {
            let label = api_label(i as i16);
            ApiHandles {
                requests: self.requests.with_label_values(&[&label]),
                proxy_seconds: self.proxy_seconds.with_label_values(&[&label]),
                upstream_seconds: self.upstream_seconds.with_label_values(&[&label]),
            }
        })
    }

    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed.with_label_values(&[reason]).inc();
    }

    pub fn on_audit(&self, e: &AuditEvent) {
        self.audit_events
            .with_label_values(&[e.kind.as_str()])
            .inc();
        let [client, txn] = producer_labels(
            e.client_id.as_deref().unwrap_or(""),
            e.transactional_id.as_deref().unwrap_or(""),
        );
        let p = &self.producers;
        if e.kind == Kind::DuplicateContent {
            if p.admit(client, txn) {
                let action = if e.action == crate::audit::Action::Answered {
                    "answered"
                } else {
                    "forwarded"
                };
                p.duplicate_content
                    .with_label_values(&[client, txn, action])
                    .inc();
            }
            return;
        }
        let vec = match e.kind {
            Kind::DuplicateAnswered => &p.duplicates,
            Kind::OutOfOrderSequence => &p.out_of_order,
            Kind::FencedEpoch | Kind::ProducerFenced => &p.fenced,
            _ => return,
        };
        if p.admit(client, txn) {
            vec.with_label_values(&[client, txn]).inc();
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl ProducerMetrics {
    /// Names the principal of an admitted label set (the last one seen wins: a client id shared by two
    /// principals shows the latest).
    pub fn name_principal(&self, client: &str, txn: &str, principal: &str) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (client, txn).hash(&mut h);
        let Some(mut e) = self.series.get_mut(&h.finish()) else {
            return;
        };
        let principal = bounded_label(principal);
        if e.3.as_deref() == Some(principal) {
            return;
        }
        if let Some(old) = e.3.replace(principal.to_string()) {
            let _ = self.principal.remove_label_values(&[client, txn, &old]);
        }
        self.principal
            .with_label_values(&[client, txn, principal])
            .set(1);
    }

    fn all(&self) -> [&IntCounterVec; 11] {
        [
            &self.upgrade_resent,
            &self.upgraded_batches,
            &self.batches,
            &self.records,
            &self.bytes,
            &self.duplicates,
            &self.out_of_order,
            &self.fenced,
            &self.epoch_bumps,
            &self.txn_committed,
            &self.txn_aborted,
        ]
    }

    /// Records that the label set is in use; evicts the least recently used set if the cap is reached.
    /// Always admits (the newest series is the one worth seeing).
    pub fn admit(&self, client: &str, txn: &str) -> bool {
        use std::hash::{Hash, Hasher};
        // A use counter orders the label sets by recency (milliseconds would tie).
        let now = self.touches.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (client, txn).hash(&mut h);
        let id = h.finish();
        if let Some(mut e) = self.series.get_mut(&id) {
            e.2 = now;
            return true;
        }
        if self.series.len() >= self.cap {
            let oldest = self
                .series
                .iter()
                .min_by_key(|e| e.value().2)
                .map(|e| *e.key());
            if let Some((_, (c, t, _, principal))) = oldest.and_then(|k| self.series.remove(&k)) {
                for v in self.all() {
                    let _ = v.remove_label_values(&[&c, &t]);
                }
                if let Some(p) = principal {
                    let _ = self.principal.remove_label_values(&[&c, &t, &p]);
                }
                let _ = self.txn_duration.remove_label_values(&[&c, &t]);
                for action in ["answered", "forwarded"] {
                    let _ = self
                        .duplicate_content
                        .remove_label_values(&[&c, &t, action]);
                }
                for how in ["rewound", "epoch_bump"] {
                    let _ = self.upgrade_restarts.remove_label_values(&[&c, &t, how]);
                }
                let _ = self.open_transactions.remove_label_values(&[&c, &t]);
                self.series_evicted.inc();
            }
        }
        self.series
            .insert(id, (client.to_string(), txn.to_string(), now, None));
        self.touches.fetch_add(1, Ordering::Relaxed);
        self.series_live.set(self.series.len() as i64);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new(10).unwrap();
        m.api(0).requests.inc();
        m.producers.admit("c", "");
        m.producers.batches.with_label_values(&["c", ""]).inc();
        m.producers
            .txn_duration
            .with_label_values(&["c", ""])
            .observe(0.1);
        m.connection_closed("client_closed");
        for family in m.registry.gather() {
            let n = family.name();
            if !n.starts_with("process_") {
                assert!(n.starts_with("kafka_eos_proxy_"), "{n}");
            }
            match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => assert!(n.ends_with("_total"), "{n}"),
                prometheus::proto::MetricType::HISTOGRAM => assert!(n.ends_with("_seconds"), "{n}"),
                _ => {}
            }
        }
    }

    #[test]
    fn producer_series_are_capped_with_eviction() {
        let m = Metrics::new(3).unwrap();
        for c in ["a", "b", "c", "d", "e"] {
            m.producers.admit(c, "tx");
            m.producers.batches.with_label_values(&[c, "tx"]).inc();
        }
        assert_eq!(m.producers.series_live.get(), 3);
        assert_eq!(m.producers.series_evicted.get(), 2);
        let text = m.render();
        assert!(!text.contains("client_id=\"a\""), "{text}");
        assert!(text.contains("client_id=\"e\""));
        assert!(text.contains("kafka_eos_proxy_producer_series_limit 3"));
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn labels_are_cut_on_character_boundaries() {
        assert_eq!(bounded_label("short"), "short");
        let long = "é".repeat(100); // 200 bytes, two per character
        let cut = bounded_label(&long);
        assert_eq!(cut.len(), 128);
        assert_eq!(cut_to("aé", 2), "a", "never inside a character");
    }
}

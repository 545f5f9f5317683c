//! Audit events: one JSON object per line for every exactly-once anomaly, whether the proxy saw it in a
//! request or the broker returned it, and for what the proxy did about it.
//!
//! Writing never blocks the data path: events go through a bounded queue to a writer task; when the queue
//! is full the event is dropped and counted (`dropped()`).

use crate::client::Client;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What happened. The wire names are the `kind` values of the JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A batch whose sequence does not follow (a gap or a reorder), or a higher epoch not at sequence 0.
    OutOfOrderSequence,
    /// The broker's 45 for a batch pipelined behind one it refused (an echo of that first failure, not
    /// a gap of its own): one event per failure, whatever the number of echoes.
    OutOfOrderCascade,
    /// A batch or coordinator request from an epoch older than the known one (a zombie).
    FencedEpoch,
    /// A retry of a batch already written, answered by the proxy with the original offset.
    DuplicateAnswered,
    /// The broker answered DUPLICATE_SEQUENCE_NUMBER (46, only 1.0.x brokers).
    DuplicateSequence,
    /// The broker does not know the producer (UNKNOWN_PRODUCER_ID 59, brokers before 2.5).
    UnknownProducer,
    /// INVALID_TXN_STATE (48), INVALID_PRODUCER_ID_MAPPING (49), TRANSACTION_ABORTABLE (120).
    TransactionState,
    /// PRODUCER_FENCED (90) from a coordinator.
    ProducerFenced,
    /// A batch the broker would refuse as malformed (bad magic, length, counts, control batch, CRC).
    InvalidBatch,
    /// A transaction open longer than its timeout plus the watchdog margin.
    HangingTransaction,
    /// A transaction the watchdog had flagged has ended.
    HangingTransactionEnded,
    /// A partition's last stable offset holds while its high watermark moves (read_committed consumers
    /// are held back, typically by a hanging transaction).
    StuckPartition,
    /// A stuck partition's last stable offset moves again.
    StuckPartitionCleared,
    /// More than five produce requests with idempotent batches in flight on one connection: the broker
    /// keeps five batches per producer and partition, so retries beyond that can no longer be
    /// deduplicated and ordering is not guaranteed.
    TooManyInFlight,
    /// A Produce request that names one topic partition more than once. The broker keeps only the last
    /// of them and answers once, so the proxy cannot tie that answer to one batch: it steps aside for
    /// those partitions (no dedup, no sequence verdicts) and forgets what it knew of their producers.
    DuplicatePartition,
    /// A Produce request (v13+) naming a topic id the proxy could not name (no Metadata answer taught it
    /// and the cluster could not be asked, or does not know it): forwarded for the broker to judge,
    /// untracked, no topic policy applied. Once per id per lookup.
    UnknownTopicId,
    /// A request that breaks a configured policy (see `rule` and `check`): refused, upgraded or audited.
    PolicyViolation,
    /// A batch with the content of one the same client had written on the partition within the content
    /// window (`original_offset`): a non-idempotent client's retry whose answer was lost, or records an
    /// idempotent producer sends again under a new epoch or producer id. Forwarded (the broker writes
    /// it again) or answered with the original offset (policy `duplicate_content: answer`).
    DuplicateContent,
    /// The idempotence upgrade obtained an upstream producer id for a client without idempotence
    /// (`producer_id`): its batches go upstream under it from now on.
    ProducerUpgraded,
    /// An upgraded producer's partition started again after a refusal or a batch of unknown fate: at
    /// the sequence after its last written batch, or under a new epoch at sequence 0 (`detail` says
    /// which, and how many batches of unknown fate a late retry would write again).
    UpgradeResequenced,
}

impl Kind {
    /// Every kind, for tests and for anything that lists them.
    pub const ALL: [Kind; 20] = [
        Kind::OutOfOrderSequence,
        Kind::OutOfOrderCascade,
        Kind::FencedEpoch,
        Kind::DuplicateAnswered,
        Kind::DuplicateSequence,
        Kind::UnknownProducer,
        Kind::TransactionState,
        Kind::ProducerFenced,
        Kind::InvalidBatch,
        Kind::HangingTransaction,
        Kind::HangingTransactionEnded,
        Kind::StuckPartition,
        Kind::StuckPartitionCleared,
        Kind::TooManyInFlight,
        Kind::DuplicatePartition,
        Kind::UnknownTopicId,
        Kind::PolicyViolation,
        Kind::DuplicateContent,
        Kind::ProducerUpgraded,
        Kind::UpgradeResequenced,
    ];

    /// The wire name (the `kind` of the JSON line and the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OutOfOrderSequence => "out_of_order_sequence",
            Kind::OutOfOrderCascade => "out_of_order_cascade",
            Kind::FencedEpoch => "fenced_epoch",
            Kind::DuplicateAnswered => "duplicate_answered",
            Kind::DuplicateSequence => "duplicate_sequence",
            Kind::UnknownProducer => "unknown_producer",
            Kind::TransactionState => "transaction_state",
            Kind::ProducerFenced => "producer_fenced",
            Kind::InvalidBatch => "invalid_batch",
            Kind::HangingTransaction => "hanging_transaction",
            Kind::HangingTransactionEnded => "hanging_transaction_ended",
            Kind::StuckPartition => "stuck_partition",
            Kind::StuckPartitionCleared => "stuck_partition_cleared",
            Kind::TooManyInFlight => "too_many_in_flight",
            Kind::DuplicatePartition => "duplicate_partition",
            Kind::UnknownTopicId => "unknown_topic_id",
            Kind::PolicyViolation => "policy_violation",
            Kind::DuplicateContent => "duplicate_content",
            Kind::ProducerUpgraded => "producer_upgraded",
            Kind::UpgradeResequenced => "upgrade_resequenced",
        }
    }
}

/// Who noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Proxy,
    Broker,
}

/// What the proxy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refused at the proxy with a Kafka error; the request never reached the cluster.
    Refused,
    /// Answered at the proxy (a duplicate, with the original offset).
    Answered,
    /// Passed on to the cluster (audit mode, or nothing to do but report).
    Forwarded,
    /// Made compliant by the proxy (a policy's `upgrade`) and passed on.
    Upgraded,
    /// Reported as the broker returned it (or as the proxy's watchdog noticed it).
    Observed,
}

impl AuditEvent {
    /// The event, attributed to the connection it was seen on.
    pub fn from_conn(self, conn: &Client) -> AuditEvent {
        AuditEvent {
            client_id: conn.client_id_kept().map(str::to_string),
            principal: conn
                .principal()
                .map(|p| crate::protocol::cut_to(p, crate::client::MAX_KEPT_ID_BYTES).to_string()),
            client_address: conn.address.to_string(),
            broker_node_id: conn.broker_node_id,
            ..self
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub kind: Kind,
    pub source: Source,
    pub action: Action,
    pub error_code: i16,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub transactional_id: Option<String>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub expected_sequence: Option<i32>,
    pub received_sequence: Option<i32>,
    pub expected_epoch: Option<i16>,
    pub client_id: Option<String>,
    /// The client's principal: the SASL principal the broker accepted, else its TLS certificate's.
    pub principal: Option<String>,
    pub client_address: String,
    pub broker_node_id: Option<i32>,
    pub api_key: i16,
    pub detail: Option<String>,
    /// The policy rule and check behind a `policy_violation`.
    pub rule: Option<String>,
    pub check: Option<&'static str>,
    /// The offset the original batch got, for a `duplicate_content`.
    pub original_offset: Option<i64>,
}

impl AuditEvent {
    /// An event stamped now, with nothing known beyond what it is; fill the rest with struct update syntax.
    pub fn new(kind: Kind, source: Source, action: Action) -> AuditEvent {
        AuditEvent {
            time_ms: now_ms(),
            kind,
            source,
            action,
            error_code: 0,
            producer_id: -1,
            producer_epoch: -1,
            transactional_id: None,
            topic: None,
            partition: None,
            expected_sequence: None,
            received_sequence: None,
            expected_epoch: None,
            client_id: None,
            principal: None,
            client_address: String::new(),
            broker_node_id: None,
            api_key: -1,
            detail: None,
            rule: None,
            check: None,
            original_offset: None,
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub stdout: bool,
    pub file: Option<PathBuf>,
    pub queue: usize,
    pub kafka: Option<KafkaAuditConfig>,
}

/// Audit events to a topic on the upstream cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaAuditConfig {
    pub topic: String,
    /// Where to write; the proxy's upstream bootstrap servers unless set. The proxy writes directly, not
    /// through itself, so its own audit writes are never audited.
    pub bootstrap_servers: Vec<String>,
    /// Events buffered for the topic; past this they are dropped and counted.
    pub queue: usize,
    /// TLS and SASL as for the upstream cluster (`upstream.tls`, `upstream.sasl`).
    pub tls: Option<crate::tls::UpstreamTls>,
    pub sasl: Option<crate::server::sasl::UpstreamSasl>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            stdout: true,
            file: None,
            queue: 10_000,
            kafka: None,
        }
    }
}

/// Writes audit events to a Kafka topic without ever blocking: librdkafka's local queue is bounded and a
/// full queue drops the event (counted). Events are keyed by transactional id, else producer id, so one
/// producer's events land in one partition, in order (idempotent producer).
struct KafkaSink {
    producer: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: String,
}

impl KafkaSink {
    fn start(config: &KafkaAuditConfig) -> std::io::Result<KafkaSink> {
        let mut client = rdkafka::config::ClientConfig::new();
        // librdkafka speaks TLS with OpenSSL (the one place the proxy uses it: the data path is rustls).
        if let Some(tls) = &config.tls {
            match &tls.ca_file {
                Some(ca) => client.set("ssl.ca.location", ca.display().to_string()),
                None => client.set("ssl.ca.location", "probe"),
            };
            if let (Some(c), Some(k)) = (&tls.cert_file, &tls.key_file) {
                client.set("ssl.certificate.location", c.display().to_string());
                client.set("ssl.key.location", k.display().to_string());
            }
            client.set(
                "ssl.endpoint.identification.algorithm",
                if tls.verify_hostname { "https" } else { "none" },
            );
        }
        if let Some(sasl) = &config.sasl {
            let password = crate::server::sasl::read_password(&sasl.password_file)
                .map_err(std::io::Error::other)?;
            client
                .set("sasl.mechanism", sasl.mechanism.name())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", password);
        }
        let protocol = match (config.tls.is_some(), config.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        let producer = client
            .set("security.protocol", protocol)
            .set("bootstrap.servers", config.bootstrap_servers.join(","))
            .set("client.id", "kafka-eos-proxy-audit")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "50")
            .set(
                "queue.buffering.max.messages",
                config.queue.max(1).to_string(),
            )
            .set("log_level", "4")
            .create()
            .map_err(|e| std::io::Error::other(format!("audit topic producer: {e}")))?;
        Ok(KafkaSink {
            producer,
            topic: config.topic.clone(),
        })
    }

    /// False if the event could not be queued.
    fn send(&self, event: &AuditEvent) -> bool {
        let Ok(payload) = serde_json::to_vec(event) else {
            return false;
        };
        let key = match &event.transactional_id {
            Some(t) => t.clone(),
            None => event.producer_id.to_string(),
        };
        let record = rdkafka::producer::BaseRecord::to(&self.topic)
            .key(&key)
            .payload(&payload);
        self.producer.send(record).is_ok()
    }
}

/// Something that sees every event as it is emitted (the metrics, a test).
pub type Observer = Arc<dyn Fn(&AuditEvent) + Send + Sync>;

pub struct AuditSink {
    tx: Option<mpsc::Sender<AuditEvent>>,
    kafka: Option<KafkaSink>,
    dropped: AtomicU64,
    emitted: AtomicU64,
    observers: Vec<Observer>,
}

impl AuditSink {
    /// Starts the writer task (needs a tokio runtime). With neither stdout nor a file, events are only
    /// counted and shown to the observers.
    pub fn start(config: &AuditConfig, observers: Vec<Observer>) -> std::io::Result<AuditSink> {
        let mut file = match &config.file {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        let tx = if config.stdout || file.is_some() {
            let (tx, mut rx) = mpsc::channel::<AuditEvent>(config.queue.max(1));
            let stdout = config.stdout;
            tokio::task::spawn_blocking(move || {
                while let Some(event) = rx.blocking_recv() {
                    let Ok(mut line) = serde_json::to_vec(&event) else {
                        continue;
                    };
                    line.push(b'\n');
                    if stdout {
                        let _ = std::io::stdout().lock().write_all(&line);
                    }
                    if let Some(f) = file.as_mut() {
                        let _ = f.write_all(&line);
                    }
                }
            });
            Some(tx)
        } else {
            None
        };
        let kafka = config.kafka.as_ref().map(KafkaSink::start).transpose()?;
        Ok(AuditSink {
            tx,
            kafka,
            dropped: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            observers,
        })
    }

    pub fn emit(&self, event: AuditEvent) {
        self.emitted.fetch_add(1, Ordering::Relaxed);
        for observe in &self.observers {
            observe(&event);
        }
        if let Some(k) = &self.kafka {
            if !k.send(&event) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(tx) = &self.tx {
            if tx.try_send(event).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: Kind) -> AuditEvent {
        AuditEvent {
            time_ms: 1,
            kind,
            source: Source::Proxy,
            action: Action::Refused,
            error_code: 45,
            producer_id: 7,
            producer_epoch: 0,
            transactional_id: None,
            topic: Some("t".into()),
            partition: Some(0),
            expected_sequence: Some(3),
            received_sequence: Some(10),
            expected_epoch: None,
            client_id: Some("c".into()),
            principal: None,
            client_address: "127.0.0.1:1".into(),
            broker_node_id: Some(1),
            api_key: 0,
            detail: None,
            rule: None,
            check: None,
            original_offset: None,
        }
    }

    #[tokio::test]
    async fn writes_json_lines_to_the_file() {
        let path = std::env::temp_dir().join(format!(
            "kafka-eos-proxy-audit-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let config = AuditConfig {
            stdout: false,
            file: Some(path.clone()),
            queue: 10,
            kafka: None,
        };
        let sink = AuditSink::start(&config, Vec::new()).unwrap();
        sink.emit(event(Kind::OutOfOrderSequence));
        sink.emit(event(Kind::FencedEpoch));
        drop(sink); // closes the queue; the writer drains it
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "out_of_order_sequence");
        assert_eq!(lines[0]["expected_sequence"], 3);
        assert_eq!(lines[1]["kind"], "fenced_epoch");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let config = AuditConfig {
            stdout: false,
            file: Some(std::env::temp_dir().join("kafka-eos-proxy-audit-full.jsonl")),
            queue: 1,
            kafka: None,
        };
        let sink = AuditSink::start(&config, Vec::new()).unwrap();
        for _ in 0..1000 {
            sink.emit(event(Kind::DuplicateAnswered));
        }
        assert_eq!(sink.emitted(), 1000);
        assert!(
            sink.dropped() > 0,
            "a one-slot queue cannot take 1000 events at once"
        );
    }

    #[test]
    fn kind_names_are_the_json_names() {
        for kind in Kind::ALL {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json.as_str(), Some(kind.as_str()));
        }
    }
}

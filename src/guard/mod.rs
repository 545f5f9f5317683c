//! The produce guard and the transaction fence: where producer state meets the data path.
//!
//! Per Produce request, per partition:
//!
//! | batch | what happens |
//! |---|---|
//! | malformed (bad magic, length, counts, control, CRC if enabled) | refused with the broker's error (2 or 87), audited |
//! | not idempotent (producer id -1) | forwarded, not tracked |
//! | transactional.id known to be at a newer epoch | refused with INVALID_PRODUCER_EPOCH (47), audited |
//! | in order, or producer unknown to the proxy | forwarded, tracked as in flight |
//! | duplicate of a batch acknowledged with acks=all | answered at the proxy with the original offset, audited |
//! | duplicate of a batch acknowledged with acks=1 | forwarded (the broker decides: the original may be lost) |
//! | duplicate of a batch still in flight | waits for the original's outcome, then as above (or forwarded) |
//! | stale epoch | refused with INVALID_PRODUCER_EPOCH (47), audited |
//! | out of order / higher epoch not at 0 | audited; refused with OUT_OF_ORDER_SEQUENCE_NUMBER (45) in `enforce` mode |
//!
//! Partitions answered at the proxy are removed from the forwarded request (the others are copied byte
//! for byte), and their answers are merged into the broker's response, so the client gets one
//! well-formed response. The response teaches the store (offsets of accepted batches) and every EOS
//! error the broker returns becomes an audit event.

pub mod coordinator;
pub mod failures;
pub mod store;
pub mod txn;

use crate::audit::{Action, AuditEvent, AuditSink, Kind, Source};
use crate::eos::{Acked, Batch, Verdict};
use crate::metrics::{producer_labels, Metrics};
use crate::policy::report::Violation;
use crate::policy::{codec_name, Action as PolicyAction, Check, TopicPolicy};
use crate::protocol::batch::{validate_client_records, BatchInfo};
use crate::protocol::codec::{decode_response, encode_response};
use crate::protocol::header::RequestHead;
use crate::protocol::produce::{self, ProduceView};
use crate::protocol::wire::Reader;
use bytes::Bytes;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ApiKey, ProduceResponse, ResponseHeader, TopicName};
use kafka_protocol::protocol::StrBytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{Key, ProducerStore};
use txn::TxnTracker;

use crate::protocol::codes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Report anomalies, refuse only what the broker would certainly refuse anyway (stale epochs).
    Audit,
    /// Also refuse out-of-order batches at the proxy, before they reach the cluster.
    Enforce,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub check_crc: bool,
    pub max_tracked: usize,
    pub idle_expiry: Duration,
    /// The longest a retry waits for the outcome of its original still in flight.
    pub in_flight_wait: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            mode: Mode::Audit,
            check_crc: false,
            max_tracked: 1_000_000,
            idle_expiry: Duration::from_secs(86_400),
            in_flight_wait: Duration::from_secs(30),
        }
    }
}

use crate::audit::ConnInfo;

pub struct Guard {
    pub config: GuardConfig,
    pub store: ProducerStore,
    pub txns: TxnTracker,
    /// Batches the broker refused with later ones pipelined behind them (see [`failures`]).
    pub failed: failures::FailedHeads,
    pub audit: Arc<AuditSink>,
    pub metrics: Option<Arc<Metrics>>,
    clock: Instant,
}

/// One partition's answer made at the proxy.
#[derive(Debug, Clone)]
struct LocalAnswer {
    error_code: i16,
    base_offset: i64,
    log_append_time: i64,
    message: Option<String>,
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Forwarded untouched and untracked.
    Pass,
    /// Forwarded and tracked: learn from the answer.
    Track {
        key: Key,
        batch: Batch,
        max_timestamp: i64,
    },
    /// Forwarded although the proxy already audited it as out of order: learn from a success, and do
    /// not audit the broker's refusal again (it is the same anomaly).
    Watch {
        key: Key,
        batch: Batch,
        max_timestamp: i64,
    },
    /// Waiting for an in-flight original; resolved before the request moves on.
    Wait {
        key: Key,
        batch: Batch,
        max_timestamp: i64,
    },
    /// Answered at the proxy.
    Local(LocalAnswer),
}

/// The guard's decision for one Produce request, partition by partition (same order as the request).
pub struct ProducePlan {
    outcomes: Vec<Vec<Outcome>>,
    topics: Vec<String>,
    partitions: Vec<Vec<i32>>,
    acks: i16,
    timeout: Duration,
    transactional_id: Option<String>,
    version: i16,
    correlation_id: i32,
    /// Some transactional batch goes to the broker: the transaction opens when the broker accepts one.
    opens_txn: bool,
}

impl ProducePlan {
    /// Whether some partition waits for an in-flight original (see [`Guard::resolve_waits`]).
    pub fn has_waits(&self) -> bool {
        self.outcomes
            .iter()
            .flatten()
            .any(|o| matches!(o, Outcome::Wait { .. }))
    }
}

/// What the session does with a planned Produce request.
pub enum ProduceAction {
    /// Forward the frame as it is (with what to learn from the answer, if anything).
    Forward(Option<ProduceTracking>),
    /// Forward this rebuilt frame (some partitions were answered at the proxy).
    Rebuilt(Bytes, ProduceTracking),
    /// Answer at the proxy with this response frame (`None` with acks=0: no answer at all).
    Local(Option<Bytes>),
}

/// A forwarded batch awaiting its answer.
struct Tracked {
    topic: String,
    partition: i32,
    key: Key,
    batch: Batch,
    max_timestamp: i64,
    already_audited: bool,
}

/// What the response to a forwarded Produce request must teach the store, and the proxy's own answers
/// to merge into it. Dropping it unanswered (the connection died) takes its batches out of flight.
pub struct ProduceTracking {
    guard: Arc<Guard>,
    tracked: Vec<Tracked>,
    local: Vec<(String, i32, LocalAnswer)>,
    acks_all: bool,
    transactional_id: Option<String>,
    /// A transactional batch was forwarded: a broker success opens the transaction at the proxy.
    opens_txn: bool,
    settled: bool,
}

impl ProduceTracking {
    /// Whether the request carries idempotent batches that went to the broker.
    pub fn tracks_idempotent_batches(&self) -> bool {
        !self.tracked.is_empty()
    }
}

impl Drop for ProduceTracking {
    fn drop(&mut self) {
        if !self.settled {
            for t in &self.tracked {
                self.guard.store.settle(&t.key, t.batch);
            }
        }
    }
}

impl Guard {
    pub fn new(config: GuardConfig, audit: Arc<AuditSink>, metrics: Option<Arc<Metrics>>) -> Self {
        Guard {
            metrics,
            store: ProducerStore::new(config.max_tracked, config.idle_expiry.as_millis() as u64),
            txns: TxnTracker::new(config.max_tracked),
            failed: failures::FailedHeads::default(),
            config,
            audit,
            clock: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// A transactional write or registration: the transaction is open from now (if it was not).
    pub fn begin_transaction(&self, txn_id: &str, client: &str) {
        let begun = self.txns.begin(txn_id, client, Instant::now());
        let Some(m) = &self.metrics else { return };
        if let Some((id, evicted)) = &begun.evicted {
            let labels = producer_labels(&evicted.client_id, id);
            m.producers
                .open_transactions
                .with_label_values(&labels)
                .dec();
            if evicted.hanging {
                m.hanging_transactions.dec();
            }
        }
        if begun.opened {
            let labels = producer_labels(client, txn_id);
            m.producers.admit(labels[0], labels[1]);
            m.producers
                .open_transactions
                .with_label_values(&labels)
                .inc();
        }
    }

    /// The coordinator confirmed the end of a transaction (`committed`: commit or abort; `None`: it was
    /// ended by a new InitProducerId, which aborts whatever was open).
    pub fn end_transaction(&self, txn_id: &str, committed: Option<bool>, conn: &ConnInfo) {
        let Some(ended) = self.txns.end(txn_id, Instant::now()) else {
            return;
        };
        if let Some(m) = &self.metrics {
            let labels = producer_labels(&ended.client_id, txn_id);
            m.producers
                .open_transactions
                .with_label_values(&labels)
                .dec();
            match committed {
                Some(true) => m.producers.txn_committed.with_label_values(&labels).inc(),
                Some(false) => m.producers.txn_aborted.with_label_values(&labels).inc(),
                None => {}
            }
            if committed.is_some() {
                m.producers
                    .txn_duration
                    .with_label_values(&labels)
                    .observe(ended.duration.as_secs_f64());
            }
            if ended.was_hanging {
                m.hanging_transactions.dec();
            }
        }
        if ended.was_hanging {
            let current = self.txns.current(txn_id).unwrap_or((-1, -1));
            self.event(
                conn,
                26,
                Kind::HangingTransactionEnded,
                Source::Proxy,
                Action::Observed,
                codes::NONE,
                current,
                Some(txn_id),
                None,
                (None, None),
                None,
                Some(format!("ended after {:.1} s", ended.duration.as_secs_f64())),
            );
        }
    }

    /// A bounded page of tracked producers, for `/producers` (see [`ProducerStore::page`]).
    pub fn page(&self, after: i64, producers: usize, per_producer: usize) -> store::Page {
        self.store.page(after, producers, per_producer, self.now())
    }

    /// Every tracked producer-partition (tests and tools; unbounded).
    pub fn snapshot(&self) -> Vec<store::Snapshot> {
        self.store.snapshot(self.now())
    }

    /// Drops idle producer state (called periodically by the server).
    pub fn expire_idle(&self) -> usize {
        self.store.expire_idle(self.now())
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        conn: &ConnInfo,
        api_key: i16,
        kind: Kind,
        source: Source,
        action: Action,
        error_code: i16,
        producer: (i64, i16),
        transactional_id: Option<&str>,
        tp: Option<(&str, i32)>,
        sequences: (Option<i32>, Option<i32>),
        expected_epoch: Option<i16>,
        detail: Option<String>,
    ) {
        self.audit.emit(AuditEvent {
            error_code,
            producer_id: producer.0,
            producer_epoch: producer.1,
            transactional_id: transactional_id.map(str::to_string),
            topic: tp.map(|t| t.0.to_string()),
            partition: tp.map(|t| t.1),
            expected_sequence: sequences.0,
            received_sequence: sequences.1,
            expected_epoch,
            api_key,
            detail,
            ..AuditEvent::new(kind, source, action).from_conn(conn)
        });
    }

    /// Step 1: decide every partition of a Produce request (sync; batches to forward are tracked now).
    /// `policy` gives what the policies demand of a topic (`None`: nothing).
    pub fn plan(
        &self,
        frame: &[u8],
        head: &RequestHead,
        conn: &ConnInfo,
        policy: &mut dyn FnMut(&str) -> Option<Arc<TopicPolicy>>,
    ) -> Result<ProducePlan, String> {
        let body = head
            .body_offset
            .ok_or("produce request without a known header")?;
        let view = produce::parse(frame, body, head.api_version).map_err(|e| e.to_string())?;
        let mut plan = ProducePlan {
            outcomes: Vec::with_capacity(view.topics.len()),
            topics: view.topics.iter().map(|t| t.name.to_string()).collect(),
            partitions: view
                .topics
                .iter()
                .map(|t| t.partitions.iter().map(|p| p.index).collect())
                .collect(),
            acks: view.acks,
            timeout: Duration::from_millis(view.timeout_ms.max(0) as u64)
                .min(self.config.in_flight_wait),
            transactional_id: view.transactional_id.map(str::to_string),
            version: head.api_version,
            correlation_id: head.correlation_id,
            opens_txn: false,
        };
        let repeated = repeated_partitions(&view);
        if !repeated.is_empty() {
            self.audit_repeated(&view, &repeated, conn);
        }
        for topic in &view.topics {
            let mut outcomes = Vec::with_capacity(topic.partitions.len());
            if topic.name.len() > MAX_TOPIC_NAME_BYTES {
                // The broker knows no such topic and answers UNKNOWN_TOPIC_OR_PARTITION; the proxy does
                // the same before it keeps anything (a name, a policy lookup) for it.
                outcomes.extend(topic.partitions.iter().map(|_| {
                    Outcome::Local(LocalAnswer {
                        error_code: codes::UNKNOWN_TOPIC_OR_PARTITION,
                        base_offset: -1,
                        log_append_time: -1,
                        message: Some(format!(
                            "kafka-eos-proxy: topic names are at most {MAX_TOPIC_NAME_BYTES} bytes"
                        )),
                    })
                }));
                plan.outcomes.push(outcomes);
                continue;
            }
            let demands = policy(topic.name);
            for p in &topic.partitions {
                let alone = !repeated.contains(&(topic.name, p.index));
                outcomes.push(match p.records {
                    None => Outcome::Pass,
                    Some(records) => self.decide_partition(
                        &view,
                        (topic.name, p.index, alone),
                        records,
                        conn,
                        demands.as_deref(),
                        &mut plan.opens_txn,
                    ),
                });
            }
            plan.outcomes.push(outcomes);
        }
        Ok(plan)
    }

    fn audit_repeated(&self, view: &ProduceView, repeated: &[(&str, i32)], conn: &ConnInfo) {
        let names: Vec<String> = repeated
            .iter()
            .take(8)
            .map(|(t, p)| format!("{t:.255}-{p}"))
            .collect();
        self.audit.emit(AuditEvent {
            api_key: ApiKey::Produce as i16,
            transactional_id: view.transactional_id.map(str::to_string),
            topic: repeated.first().map(|(t, _)| t.to_string()),
            partition: repeated.first().map(|(_, p)| *p),
            detail: Some(format!(
                "produce request names {} more than once ({} partition(s)); the broker writes only the \
                 last batch of each and answers once, so the proxy does not track them",
                names.join(", "),
                repeated.len()
            )),
            ..AuditEvent::new(Kind::DuplicatePartition, Source::Proxy, Action::Forwarded)
                .from_conn(conn)
        });
    }

    /// `alone`: this is the only entry for the partition in the request (see [`repeated_partitions`]).
    fn decide_partition(
        &self,
        view: &ProduceView,
        (topic, partition, alone): (&str, i32, bool),
        records: &[u8],
        conn: &ConnInfo,
        demands: Option<&TopicPolicy>,
        opens_txn: &mut bool,
    ) -> Outcome {
        let txn_id = view.transactional_id;
        let info = match validate_client_records(records, self.config.check_crc) {
            Ok(info) => info,
            Err(refusal) => {
                self.event(
                    conn,
                    0,
                    Kind::InvalidBatch,
                    Source::Proxy,
                    Action::Refused,
                    refusal.error_code,
                    (-1, -1),
                    txn_id,
                    Some((topic, partition)),
                    (None, None),
                    None,
                    Some(refusal.reason.to_string()),
                );
                return Outcome::Local(LocalAnswer {
                    error_code: refusal.error_code,
                    base_offset: -1,
                    log_append_time: -1,
                    message: Some(format!("kafka-eos-proxy: {}", refusal.reason)),
                });
            }
        };
        if let Some(refused) =
            demands.and_then(|d| self.check_policy(d, view, topic, partition, &info, conn))
        {
            return refused;
        }
        if !info.is_idempotent() || !self.config.enabled {
            return Outcome::Pass;
        }
        let client = conn.client_id.as_deref().unwrap_or("");
        self.store
            .set_owner(info.producer_id, conn.client_id.as_deref(), txn_id);
        if let Some(m) = &self.metrics {
            let labels = producer_labels(client, txn_id.unwrap_or(""));
            m.producers.admit(labels[0], labels[1]);
            m.producers.batches.with_label_values(&labels).inc();
            m.producers
                .records
                .with_label_values(&labels)
                .inc_by(info.record_count.max(0) as u64);
            m.producers
                .bytes
                .with_label_values(&labels)
                .inc_by(info.bytes as u64);
        }
        let batch = Batch {
            epoch: info.producer_epoch,
            first_seq: info.base_sequence,
            last_seq: info.last_sequence,
        };
        let producer = (info.producer_id, info.producer_epoch);
        let refuse = |code: i16,
                      kind: Kind,
                      seqs: (Option<i32>, Option<i32>),
                      epoch: Option<i16>,
                      msg: String| {
            self.event(
                conn,
                0,
                kind,
                Source::Proxy,
                Action::Refused,
                code,
                producer,
                txn_id,
                Some((topic, partition)),
                seqs,
                epoch,
                Some(msg.clone()),
            );
            Outcome::Local(LocalAnswer {
                error_code: code,
                base_offset: -1,
                log_append_time: -1,
                message: Some(format!("kafka-eos-proxy: {msg}")),
            })
        };
        if let Some(t) = txn_id.filter(|_| info.transactional) {
            if let Some(current) = self.txns.stale(t, info.producer_id, info.producer_epoch, 0) {
                return refuse(
                    codes::INVALID_PRODUCER_EPOCH,
                    Kind::FencedEpoch,
                    (None, Some(info.base_sequence)),
                    Some(current),
                    format!(
                        "producer epoch {} of transactional id {t} is fenced by epoch {current}",
                        info.producer_epoch
                    ),
                );
            }
        }
        // No room to name another topic (see ProducerStore::key): pass it on, untracked.
        let key = self.store.key(info.producer_id, topic, partition);
        let transactional = info.transactional && txn_id.is_some();
        if !alone {
            *opens_txn |= transactional;
            // The broker keeps one of the repeated entries: whatever the proxy knew of this producer
            // here no longer holds, and the answer cannot be credited to one batch.
            if let Some(key) = &key {
                self.store.forget(key);
            }
            return Outcome::Pass;
        }
        let verdict = match &key {
            Some(key) => self.store.check_and_track(key, batch, self.now()),
            None => Verdict::Unknown,
        };
        // A transactional write going to the cluster: the transaction is open once the broker accepts it
        // (see on_produce_response), never on the request alone.
        *opens_txn |= transactional && verdict.forwards();
        let Some(key) = key else {
            return Outcome::Pass;
        };
        match verdict {
            Verdict::Unknown | Verdict::InOrder => Outcome::Track {
                key,
                batch,
                max_timestamp: info.max_timestamp,
            },
            Verdict::DuplicateInFlight => Outcome::Wait {
                key,
                batch,
                max_timestamp: info.max_timestamp,
            },
            Verdict::Duplicate(acked) => self.duplicate(
                conn,
                txn_id,
                (topic, partition),
                key,
                batch,
                info.max_timestamp,
                acked,
            ),
            Verdict::StaleEpoch { current } => refuse(
                codes::INVALID_PRODUCER_EPOCH,
                Kind::FencedEpoch,
                (None, Some(info.base_sequence)),
                Some(current),
                format!(
                    "producer epoch {} is older than the current epoch {current}",
                    info.producer_epoch
                ),
            ),
            Verdict::OutOfOrder { .. } | Verdict::EpochBumpNotAtZero { .. }
                if self
                    .failed
                    .head_before(&key, batch, Instant::now())
                    .is_some() =>
            {
                // Pipelined behind a batch the broker refused and the client has not retried yet:
                // not a gap of its own. The broker judges it (an echo of its 45 is audited as part of
                // that first failure).
                Outcome::Track {
                    key,
                    batch,
                    max_timestamp: info.max_timestamp,
                }
            }
            verdict @ (Verdict::OutOfOrder { .. } | Verdict::EpochBumpNotAtZero { .. }) => {
                let (expected, epoch, msg) = match verdict {
                    Verdict::OutOfOrder { expected, received } => (
                        Some(expected),
                        None,
                        format!("sequence {received} out of order, expected {expected}"),
                    ),
                    Verdict::EpochBumpNotAtZero { current } => (
                        Some(0),
                        Some(current),
                        format!(
                            "new epoch {} must start at sequence 0, got {}",
                            info.producer_epoch, info.base_sequence
                        ),
                    ),
                    _ => (None, None, String::new()),
                };
                if self.config.mode == Mode::Enforce {
                    // Batches pipelined behind this one are its echoes, not gaps of their own.
                    self.failed.refused(
                        &key,
                        batch,
                        codes::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        Instant::now(),
                    );
                    refuse(
                        codes::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        Kind::OutOfOrderSequence,
                        (expected, Some(info.base_sequence)),
                        epoch,
                        msg,
                    )
                } else {
                    self.event(
                        conn,
                        0,
                        Kind::OutOfOrderSequence,
                        Source::Proxy,
                        Action::Forwarded,
                        codes::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        producer,
                        txn_id,
                        Some((topic, partition)),
                        (expected, Some(info.base_sequence)),
                        epoch,
                        Some(msg),
                    );
                    // In flight like any forwarded batch (a batch pipelined right behind it follows
                    // it, and is no gap of its own); learned only if the broker accepts it after all.
                    self.store.track(&key, batch, self.now());
                    Outcome::Watch {
                        key,
                        batch,
                        max_timestamp: info.max_timestamp,
                    }
                }
            }
        }
    }

    /// The batch-level policy checks of one partition, in a fixed order; the first `reject` answers the
    /// partition with the Kafka error that fits, `audit` only reports.
    fn check_policy(
        &self,
        d: &TopicPolicy,
        view: &ProduceView,
        topic: &str,
        partition: i32,
        info: &BatchInfo,
        conn: &ConnInfo,
    ) -> Option<Outcome> {
        // Each failed check as (rule, action, check, error, message).
        let mut fails: Vec<(Arc<str>, PolicyAction, Check, i16, String)> = Vec::new();
        // acks=1 under `reject` is refused here, per partition; `upgrade` already rewrote the request and
        // `audit` is reported by the session once per request (acks is a request-level field).
        if let Some(x) = d
            .acks_all
            .as_ref()
            .filter(|x| x.action == PolicyAction::Reject)
        {
            if view.acks == 1 {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::AcksAll,
                    codes::INVALID_REQUIRED_ACKS,
                    format!("topic {topic} requires acks=all, the request has acks=1"),
                ));
            }
        }
        if let Some(x) = &d.idempotence {
            if !info.is_idempotent() {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::Idempotence,
                    codes::POLICY_VIOLATION,
                    format!(
                        "topic {topic} requires an idempotent producer (enable.idempotence=true)"
                    ),
                ));
            }
        }
        if let Some(x) = &d.transactions {
            if !info.transactional {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::Transactions,
                    codes::POLICY_VIOLATION,
                    format!("topic {topic} requires transactional writes (transactional.id)"),
                ));
            }
        }
        if let Some(x) = &d.compression {
            if x.value & (1u8 << info.compression.min(7)) == 0 {
                let allowed: Vec<&str> = (0..crate::policy::CODECS.len() as u8)
                    .filter(|c| x.value & (1 << c) != 0)
                    .map(codec_name)
                    .collect();
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::Compression,
                    codes::UNSUPPORTED_COMPRESSION_TYPE,
                    format!(
                        "topic {topic} allows compression {}, the batch uses {}",
                        allowed.join(", "),
                        codec_name(info.compression)
                    ),
                ));
            }
        }
        if let Some(x) = &d.max_batch_bytes {
            if info.bytes > x.value as usize {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::MaxBatchBytes,
                    codes::MESSAGE_TOO_LARGE,
                    format!(
                        "batch of {} bytes exceeds {} bytes allowed on topic {topic}",
                        info.bytes, x.value
                    ),
                ));
            }
        }
        if let Some(x) = &d.max_batch_records {
            if info.record_count > 0 && info.record_count as u32 > x.value {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::MaxBatchRecords,
                    codes::POLICY_VIOLATION,
                    format!(
                        "batch of {} records exceeds {} records allowed on topic {topic}",
                        info.record_count, x.value
                    ),
                ));
            }
        }
        let producer = (info.producer_id, info.producer_epoch);
        let mut refusal = None;
        for (rule, action, check, code, msg) in fails {
            let reject = action == PolicyAction::Reject && refusal.is_none();
            crate::policy::report::report(
                &self.audit,
                self.metrics.as_deref(),
                conn,
                Violation {
                    topic: Some(topic),
                    partition: Some(partition),
                    error_code: if reject { code } else { 0 },
                    producer,
                    transactional_id: view.transactional_id,
                    ..Violation::new(&rule, check, action, ApiKey::Produce as i16, msg.clone())
                },
                true,
            );
            if reject {
                refusal = Some(Outcome::Local(LocalAnswer {
                    error_code: code,
                    base_offset: -1,
                    log_append_time: -1,
                    message: Some(format!("kafka-eos-proxy policy '{rule}': {msg}")),
                }));
            }
        }
        refusal
    }

    /// A retry of an acknowledged batch: answered with the original offset and timestamp, if the original
    /// was acknowledged with acks=all. An acks=1 original may have been lost in a leader failover before
    /// it was replicated; the new leader would then rightly accept the retry, so the broker answers it
    /// (and the batch is watched).
    #[allow(clippy::too_many_arguments)]
    fn duplicate(
        &self,
        conn: &ConnInfo,
        transactional_id: Option<&str>,
        (topic, partition): (&str, i32),
        key: Key,
        batch: Batch,
        max_timestamp: i64,
        acked: Acked,
    ) -> Outcome {
        if !acked.acks_all {
            return Outcome::Track {
                key,
                batch,
                max_timestamp,
            };
        }
        self.event(
            conn,
            0,
            Kind::DuplicateAnswered,
            Source::Proxy,
            Action::Answered,
            codes::NONE,
            (key.producer_id, batch.epoch),
            transactional_id,
            Some((topic, partition)),
            (Some(acked.first_seq), Some(batch.first_seq)),
            None,
            Some(format!(
                "answered with original offset {}",
                acked.first_offset
            )),
        );
        Outcome::Local(LocalAnswer {
            error_code: codes::NONE,
            base_offset: acked.first_offset,
            log_append_time: acked.timestamp,
            message: None,
        })
    }

    /// Step 2: wait for the originals of in-flight duplicates, then decide those partitions again.
    pub async fn resolve_waits(&self, plan: &mut ProducePlan, conn: &ConnInfo) {
        let deadline = tokio::time::Instant::now() + plan.timeout;
        for t in 0..plan.outcomes.len() {
            for p in 0..plan.outcomes[t].len() {
                let Outcome::Wait {
                    key,
                    batch,
                    max_timestamp,
                } = plan.outcomes[t][p].clone()
                else {
                    continue;
                };
                while self.store.in_flight(&key, batch) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let topic = plan.topics[t].clone();
                let partition = plan.partitions[t][p];
                plan.outcomes[t][p] = match self.store.check_and_track(&key, batch, self.now()) {
                    Verdict::Duplicate(acked) => self.duplicate(
                        conn,
                        plan.transactional_id.as_deref(),
                        (&topic, partition),
                        key,
                        batch,
                        max_timestamp,
                        acked,
                    ),
                    v if v.forwards() => Outcome::Track {
                        key,
                        batch,
                        max_timestamp,
                    },
                    // Still in flight after the wait, or anything else: the broker deduplicates.
                    _ => Outcome::Pass,
                };
            }
        }
    }

    /// Step 3: what to send, and what to remember for the answer.
    pub fn finish(
        self: &Arc<Self>,
        plan: ProducePlan,
        frame: &Bytes,
        view_frame_body: usize,
    ) -> ProduceAction {
        let mut tracked = Vec::new();
        let mut local = Vec::new();
        let mut forwarded = 0usize;
        let total: usize = plan.outcomes.iter().map(Vec::len).sum();
        for (t, outcomes) in plan.outcomes.iter().enumerate() {
            for (p, o) in outcomes.iter().enumerate() {
                let (topic, partition) = (plan.topics[t].clone(), plan.partitions[t][p]);
                match o {
                    Outcome::Pass | Outcome::Wait { .. } => forwarded += 1,
                    Outcome::Track {
                        key,
                        batch,
                        max_timestamp,
                    }
                    | Outcome::Watch {
                        key,
                        batch,
                        max_timestamp,
                    } => {
                        forwarded += 1;
                        tracked.push(Tracked {
                            topic,
                            partition,
                            key: *key,
                            batch: *batch,
                            max_timestamp: *max_timestamp,
                            already_audited: matches!(o, Outcome::Watch { .. }),
                        });
                    }
                    Outcome::Local(answer) => local.push((topic, partition, answer.clone())),
                }
            }
        }
        let tracking = ProduceTracking {
            guard: self.clone(),
            tracked,
            local,
            acks_all: plan.acks == -1,
            transactional_id: plan.transactional_id.clone(),
            opens_txn: plan.opens_txn && plan.acks != 0,
            settled: false,
        };
        if forwarded == total {
            let needed = !tracking.tracked.is_empty() || tracking.opens_txn;
            return ProduceAction::Forward(needed.then_some(tracking));
        }
        if forwarded == 0 {
            let mut tracking = tracking;
            tracking.settled = true;
            if plan.acks == 0 {
                return ProduceAction::Local(None);
            }
            let mut resp = ProduceResponse::default();
            merge_local(&mut resp, &tracking.local, plan.version);
            let header = ResponseHeader::default().with_correlation_id(plan.correlation_id);
            return match encode_response(&header, &resp, ApiKey::Produce, plan.version) {
                Ok(bytes) => ProduceAction::Local(Some(bytes)),
                Err(_) => ProduceAction::Forward(None),
            };
        }
        // Mixed: forward the rest, byte for byte.
        let Ok(view) = produce::parse(frame, view_frame_body, plan.version) else {
            return ProduceAction::Forward(Some(tracking));
        };
        let keep = |t: usize, p: usize| !matches!(plan.outcomes[t][p], Outcome::Local(_));
        ProduceAction::Rebuilt(view.rebuild(frame, keep), tracking)
    }

    /// The broker's answer to a forwarded Produce request: learn, audit, merge the proxy's own answers.
    /// Returns the (possibly re-encoded) response frame and the decoded body for further rewriting.
    pub fn on_produce_response(
        &self,
        frame: Bytes,
        version: i16,
        mut tracking: ProduceTracking,
        conn: &ConnInfo,
    ) -> Result<(ResponseHeader, ProduceResponse), String> {
        let (header, mut resp) =
            decode_response::<ProduceResponse>(frame, ApiKey::Produce, version)
                .map_err(|e| e.to_string())?;
        let now = self.now();
        let accepted = resp
            .responses
            .iter()
            .flat_map(|t| t.partition_responses.iter())
            .any(|p| p.error_code == codes::NONE);
        if let (true, true, Some(t)) = (tracking.opens_txn, accepted, &tracking.transactional_id) {
            self.begin_transaction(t, conn.client_id.as_deref().unwrap_or(""));
        }
        for topic in &resp.responses {
            for p in &topic.partition_responses {
                let name = topic.name.0.as_str();
                let Some(i) = tracking
                    .tracked
                    .iter()
                    .position(|t| t.topic == name && t.partition == p.index)
                else {
                    continue;
                };
                let Tracked {
                    key,
                    batch,
                    max_timestamp: max_ts,
                    already_audited,
                    ..
                } = tracking.tracked.swap_remove(i);
                if p.error_code == codes::NONE {
                    self.failed.accepted(&key);
                    let acked = Acked {
                        first_seq: batch.first_seq,
                        last_seq: batch.last_seq,
                        first_offset: p.base_offset,
                        timestamp: if p.log_append_time_ms >= 0 {
                            p.log_append_time_ms
                        } else {
                            max_ts
                        },
                        acks_all: tracking.acks_all,
                    };
                    if self.store.acknowledge(&key, batch, acked, now) {
                        if let Some(m) = &self.metrics {
                            let labels = producer_labels(
                                conn.client_id.as_deref().unwrap_or(""),
                                tracking.transactional_id.as_deref().unwrap_or(""),
                            );
                            m.producers.admit(labels[0], labels[1]);
                            m.producers.epoch_bumps.with_label_values(&labels).inc();
                        }
                    }
                } else {
                    self.store.settle(&key, batch);
                    let failure = self
                        .failed
                        .refused(&key, batch, p.error_code, Instant::now());
                    let echo = match failure {
                        failures::Failure::Behind { head, first_echo }
                            if p.error_code == codes::OUT_OF_ORDER_SEQUENCE_NUMBER =>
                        {
                            Some((head, first_echo))
                        }
                        _ => None,
                    };
                    // An echo of an earlier failure is audited once, as its cascade; anything else as
                    // the exactly-once error it is.
                    let audited = match echo {
                        Some((head, first_echo)) => first_echo.then(|| {
                            (
                                Kind::OutOfOrderCascade,
                                Some(head.first_seq),
                                Some(format!(
                                    "batches pipelined behind the batch at sequence {} (refused with \
                                     error {}) are answered 45 until it is retried; counted once",
                                    head.first_seq, head.error_code
                                )),
                            )
                        }),
                        None => eos_error_kind(p.error_code).map(|kind| {
                            let message = p.error_message.as_ref();
                            (kind, None, message.map(|m| m.as_str().to_string()))
                        }),
                    };
                    if let Some((kind, expected, detail)) = audited.filter(|_| !already_audited) {
                        self.event(
                            conn,
                            0,
                            kind,
                            Source::Broker,
                            Action::Observed,
                            p.error_code,
                            (key.producer_id, batch.epoch),
                            tracking.transactional_id.as_deref(),
                            Some((name, p.index)),
                            (expected, Some(batch.first_seq)),
                            None,
                            detail,
                        );
                    }
                }
            }
        }
        for t in tracking.tracked.drain(..) {
            self.store.settle(&t.key, t.batch);
        }
        tracking.settled = true;
        merge_local(&mut resp, &tracking.local, version);
        Ok((header, resp))
    }

    /// Whether a response needs the guard (tracked batches or local answers to merge).
    pub fn needs_response(tracking: &ProduceTracking) -> bool {
        !tracking.tracked.is_empty() || !tracking.local.is_empty() || tracking.opens_txn
    }
}

use crate::protocol::MAX_TOPIC_NAME_BYTES;

/// The topic partitions a Produce request names more than once (sorted, each once).
///
/// What the broker does with them (Kafka 4.3/4.4 `KafkaApis.handleProduceRequest`): it walks the topics
/// and partitions in request order into a map keyed by topic partition, so a later entry replaces an
/// earlier one. Only the last entry's records are validated and appended, and the answer has one entry
/// per topic partition. No client library sends this; a proxy that credited that one answer to the first
/// batch would later answer a retry of a batch that was never written.
fn repeated_partitions<'a>(view: &ProduceView<'a>) -> Vec<(&'a str, i32)> {
    let mut all: Vec<(&str, i32)> = view
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.name, p.index)))
        .collect();
    if all.len() < 2 {
        return Vec::new();
    }
    all.sort_unstable();
    let mut repeated: Vec<(&str, i32)> = all
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    repeated.dedup();
    repeated
}

/// Kafka error codes that are exactly-once anomalies, and how they are audited.
pub fn eos_error_kind(code: i16) -> Option<Kind> {
    Some(match code {
        codes::OUT_OF_ORDER_SEQUENCE_NUMBER => Kind::OutOfOrderSequence,
        codes::DUPLICATE_SEQUENCE_NUMBER => Kind::DuplicateSequence,
        codes::INVALID_PRODUCER_EPOCH => Kind::FencedEpoch,
        codes::UNKNOWN_PRODUCER_ID => Kind::UnknownProducer,
        codes::INVALID_TXN_STATE
        | codes::INVALID_PRODUCER_ID_MAPPING
        | codes::TRANSACTION_ABORTABLE => Kind::TransactionState,
        codes::PRODUCER_FENCED => Kind::ProducerFenced,
        _ => return None,
    })
}

fn merge_local(resp: &mut ProduceResponse, local: &[(String, i32, LocalAnswer)], version: i16) {
    for (topic, partition, answer) in local {
        let mut p = PartitionProduceResponse::default()
            .with_index(*partition)
            .with_error_code(answer.error_code)
            .with_base_offset(answer.base_offset)
            .with_log_append_time_ms(answer.log_append_time)
            .with_log_start_offset(-1);
        if version >= 8 {
            p.error_message = answer.message.clone().map(StrBytes::from_string);
        }
        match resp
            .responses
            .iter_mut()
            .find(|t| t.name.0.as_str() == topic)
        {
            Some(t) => t.partition_responses.push(p),
            None => resp.responses.push(
                TopicProduceResponse::default()
                    .with_name(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partition_responses(vec![p]),
            ),
        }
    }
}

/// The transactional id of an InitProducerId request (None for idempotent producers).
/// The transactional id and transaction timeout of an InitProducerId request (no id for idempotent
/// producers).
pub fn init_producer_id_txn(frame: &[u8], head: &RequestHead) -> Option<(String, i32)> {
    let mut r = Reader::at(frame, head.body_offset?);
    let id = if head.api_version >= 2 {
        r.compact_nullable_bytes().ok()?
    } else {
        r.nullable_string().ok()?
    }?;
    let timeout = r.i32().ok()?;
    std::str::from_utf8(id)
        .ok()
        .map(|s| (s.to_string(), timeout))
}

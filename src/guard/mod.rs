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

mod answer;
mod batch_policy;
pub mod content;
pub mod coordinator;
pub mod failures;
mod plan;
pub mod shift;
pub mod store;
pub mod txn;
pub mod upgrade;

use crate::audit::{Action, AuditEvent, AuditSink, Kind, Source};
use crate::eos::Batch;
use crate::metrics::{producer_labels, Metrics};
use crate::protocol::header::RequestHead;
use crate::protocol::produce::OwnedWireTopic;
use bytes::Bytes;
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
    /// How long a confirmed batch's content is remembered (see [`content`]); zero: not at all.
    pub content_window: Duration,
    /// The most batches remembered by content.
    pub content_window_entries: usize,
    /// Client identities the idempotence upgrade keeps an upstream producer for.
    pub upgraded_producers: usize,
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
            // librdkafka's message.timeout.ms and the Java client's delivery.timeout.ms are 300 s
            // and 120 s: a client retries a batch for at most that long.
            content_window: Duration::from_secs(300),
            content_window_entries: 100_000,
            upgraded_producers: 10_000,
        }
    }
}

use crate::client::Client;

pub struct Guard {
    pub config: GuardConfig,
    pub store: ProducerStore,
    pub txns: TxnTracker,
    /// Batches the broker refused with later ones pipelined behind them (see [`failures`]).
    pub failed: failures::FailedHeads,
    /// What each client had written lately, by content (see [`content`]).
    pub content: content::ContentWindow,
    /// The upstream producers of clients whose idempotence the proxy upgrades.
    pub upgrades: upgrade::Upgrades,
    /// Sequences shifted for idempotent producers whose repeats across epochs the proxy answered.
    pub shifts: shift::Shifts,
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
    /// Per partition, the content to remember if the broker writes it (see [`content`]).
    remember: Vec<Vec<Option<Remember>>>,
    /// Batches the idempotence upgrade applies to, as (record count, content digest), until
    /// [`Guard::stamp`] gives them stamps.
    upgradable: Vec<Vec<Option<upgrade::Candidate>>>,
    stamps: Vec<Vec<Option<upgrade::Stamp>>>,
    /// Idempotent batches that go upstream under a lower sequence (repeats answered below them, see
    /// [`shift`]): (producer id, epoch, upstream sequence).
    shifted: Vec<Vec<Option<(i64, i16, i32)>>>,
    /// The upstream producer the stamps are of, and its producer id.
    upgraded: Option<(Arc<std::sync::Mutex<upgrade::Producer>>, i64)>,
    /// Each topic as the request names it, and its name (`None`: a topic id the proxy cannot name).
    topics: Vec<(OwnedWireTopic, Option<String>)>,
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
    /// Whether the idempotence upgrade applies to a batch of the request.
    pub fn has_upgradable(&self) -> bool {
        self.upgradable.iter().flatten().any(Option::is_some)
    }

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
    /// The topic as the request (and so the answer) names it.
    wire: OwnedWireTopic,
    name: String,
    partition: i32,
    key: Key,
    batch: Batch,
    max_timestamp: i64,
    already_audited: bool,
}

/// A forwarded batch whose content the window learns once the broker confirms it.
#[derive(Debug, Clone, Copy)]
struct Remember {
    key: content::ContentKey,
    producer_id: i64,
    epoch: i16,
}

/// What the response to a forwarded Produce request must teach the store, and the proxy's own answers
/// to merge into it. Dropping it unanswered (the connection died) takes its batches out of flight.
pub struct ProduceTracking {
    guard: Arc<Guard>,
    tracked: Vec<Tracked>,
    /// Contents to remember per (topic, partition) if the broker writes them.
    remember: Vec<(OwnedWireTopic, i32, Remember)>,
    local: Vec<(OwnedWireTopic, i32, LocalAnswer)>,
    acks_all: bool,
    transactional_id: Option<String>,
    /// A transactional batch was forwarded: a broker success opens the transaction at the proxy.
    opens_txn: bool,
    settled: bool,
    /// Batches the idempotence upgrade stamped, and the producer they went upstream as.
    stamps: Vec<upgrade::Stamped>,
    upgraded: Option<Arc<std::sync::Mutex<upgrade::Producer>>>,
}

impl ProduceTracking {
    /// Whether the proxy answers some partitions itself, so the broker's answer must be re-encoded
    /// with them merged in (otherwise it is only read, and passes as the broker's bytes).
    pub fn answers_locally(&self) -> bool {
        // An upgraded producer's answer may be rewritten (see `Guard::settle_stamps`).
        !self.local.is_empty() || !self.stamps.is_empty()
    }

    /// Whether the idempotence upgrade stamped batches of the request (it then goes with acks=all).
    pub fn upgraded(&self) -> bool {
        !self.stamps.is_empty()
    }

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
        // Stamps never answered (the connection broke, or the answer could not be read): their fate
        // is unknown; the client's retry goes out under the same stamp.
        if let (Some(producer), false) = (&self.upgraded, self.stamps.is_empty()) {
            upgrade::lock(producer).settle_all(self.stamps.drain(..), upgrade::Fate::Unknown);
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
            content: content::ContentWindow::new(
                config.content_window_entries,
                config.content_window,
            ),
            upgrades: upgrade::Upgrades::new(config.upgraded_producers),
            shifts: shift::Shifts::new(config.content_window_entries),
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
    pub fn end_transaction(&self, txn_id: &str, committed: Option<bool>, conn: &Client) {
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
        conn: &Client,
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

    /// Whether a response needs the guard (tracked batches or local answers to merge).
    pub fn needs_response(tracking: &ProduceTracking) -> bool {
        !tracking.tracked.is_empty()
            || !tracking.local.is_empty()
            || !tracking.remember.is_empty()
            || tracking.opens_txn
    }
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

/// What a transactional InitProducerId asks of the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnInit {
    pub transactional_id: String,
    pub timeout_ms: i32,
    /// Two-phase commit (v6, KIP-939): its transactions never time out.
    pub two_phase: bool,
    /// Keep the transaction the id has prepared (two-phase commit recovery) instead of aborting it.
    pub keep_prepared: bool,
}

/// The transactional part of an InitProducerId request (`None` for idempotent producers, or a request
/// that cannot be read).
pub fn init_producer_id_txn(frame: &[u8], head: &RequestHead) -> Option<TxnInit> {
    let req = crate::policy::wire::init_producer_id_request(frame, head).ok()?;
    Some(TxnInit {
        transactional_id: req.transactional_id?.to_string(),
        timeout_ms: req.timeout_ms,
        two_phase: req.enable_2pc,
        keep_prepared: req.keep_prepared_txn,
    })
}

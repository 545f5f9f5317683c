//! Coordinator requests (EndTxn, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit): a request from
//! an epoch the coordinator has already fenced is answered at the proxy (a zombie never reaches the
//! cluster), and the answers open and end transactions for the tracker and its watchdog, and have
//! their exactly-once errors audited.

use super::{Exchange, Request, RequestCx, ResponseCx, Step};
use crate::audit::{Action, AuditEvent, Kind, Source};
use crate::client::Client;
use crate::guard::coordinator::{self, CoordinatorRequest};
use crate::guard::{eos_error_kind, Guard};
use crate::protocol::codec::decode_response;
use crate::protocol::codes;
use crate::protocol::header::RequestHead;
use bytes::Bytes;
use kafka_protocol::messages::{
    AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, ApiKey, EndTxnResponse,
    TxnOffsetCommitResponse,
};
use tracing::debug;

/// What the answer needs of its request.
pub struct Memo {
    transactional_id: Option<String>,
    /// EndTxn: commit (true) or abort (false).
    committed: Option<bool>,
    /// AddPartitionsToTxn / AddOffsetsToTxn: a success opens the transaction at the proxy.
    opens: bool,
}

/// An error the coordinator returned: (error code, topic-partition if per partition, producer id and
/// epoch if known).
pub type Found = (i16, Option<(String, i32)>, (i64, i16));

pub fn on_request(cx: &mut RequestCx<'_, '_>, req: &mut Request) -> Step {
    let (key, head, frame) = (req.key, &req.head, &req.frame);
    let guard = &cx.handles.guard;
    let request = match key {
        ApiKey::AddPartitionsToTxn => coordinator::parse_add_partitions(frame, head),
        ApiKey::TxnOffsetCommit => coordinator::parse_txn_offset_commit(frame, head),
        _ => coordinator::parse_producer_first(frame, head, key),
    };
    if let Some(r) = &request {
        // Transactions v2: an EndTxn retry may carry the epoch before the bump it caused.
        let tolerance = i16::from(key == ApiKey::EndTxn && head.api_version >= 5);
        let stale = guard.txns.stale(
            &r.transactional_id,
            r.producer_id,
            r.producer_epoch,
            tolerance,
        );
        if let Some(current) = stale {
            if let Some(answer) = coordinator::fenced_response(key, head, r) {
                audit_fenced(guard, cx.client, key, head, r, current);
                return Step::Answer(Some(answer));
            }
        }
    }
    req.memo = super::Memo::TxnFence(match request {
        Some(r) => Memo {
            committed: r.committed.filter(|_| key == ApiKey::EndTxn),
            opens: matches!(key, ApiKey::AddPartitionsToTxn | ApiKey::AddOffsetsToTxn),
            transactional_id: Some(r.transactional_id),
        },
        None => Memo {
            transactional_id: None,
            committed: None,
            opens: false,
        },
    });
    Step::Continue
}

/// Audits a coordinator request refused at the proxy because its epoch is fenced.
fn audit_fenced(
    guard: &Guard,
    info: &Client,
    key: ApiKey,
    head: &RequestHead,
    req: &CoordinatorRequest,
    current: i16,
) {
    guard.audit.emit(AuditEvent {
        error_code: coordinator::fenced_code(key, head.api_version),
        producer_id: req.producer_id,
        producer_epoch: req.producer_epoch,
        transactional_id: Some(req.transactional_id.clone()),
        expected_epoch: Some(current),
        api_key: key as i16,
        detail: Some(format!(
            "{key:?} from epoch {}, transactional id {} is at epoch {current}",
            req.producer_epoch, req.transactional_id
        )),
        ..AuditEvent::new(Kind::FencedEpoch, Source::Proxy, Action::Refused).from_conn(info)
    });
}

/// Learns from a coordinator answer and audits its exactly-once errors. Only looks: the frame goes
/// on unchanged, and an answer it cannot read is passed on regardless.
pub fn on_response(cx: &ResponseCx<'_>, exchange: &mut Exchange, frame: Bytes) -> Bytes {
    let Some(memo) = super::take_memo!(&mut exchange.memo, TxnFence) else {
        return frame;
    };
    let (key, version) = (exchange.key, exchange.version);
    let guard = &cx.handles.guard;
    let info = cx.client;
    let txn = memo.transactional_id;
    let mut errors: Vec<Found> = Vec::new();
    let decoded = match key {
        ApiKey::EndTxn => {
            decode_response::<EndTxnResponse>(frame.clone(), key, version).map(|(_, r)| {
                if r.error_code == codes::NONE {
                    if let Some(t) = &txn {
                        if version >= 5 {
                            guard.txns.learn(t, r.producer_id.0, r.producer_epoch);
                        }
                        guard.end_transaction(t, memo.committed, info);
                    }
                } else {
                    errors.push((r.error_code, None, (r.producer_id.0, r.producer_epoch)));
                }
            })
        }
        ApiKey::AddOffsetsToTxn => {
            decode_response::<AddOffsetsToTxnResponse>(frame.clone(), key, version)
                .map(|(_, r)| errors.push((r.error_code, None, (-1, -1))))
        }
        ApiKey::AddPartitionsToTxn if version <= 3 => {
            decode_response::<AddPartitionsToTxnResponse>(frame.clone(), key, version).map(
                |(_, r)| {
                    for t in &r.results_by_topic_v3_and_below {
                        for p in &t.results_by_partition {
                            errors.push((
                                p.partition_error_code,
                                Some((t.name.0.to_string(), p.partition_index)),
                                (-1, -1),
                            ));
                        }
                    }
                },
            )
        }
        ApiKey::TxnOffsetCommit => {
            decode_response::<TxnOffsetCommitResponse>(frame.clone(), key, version).map(|(_, r)| {
                for t in &r.topics {
                    // v6+ names the topic by id: named for the audit line when a Metadata answer
                    // taught the id, else shown as the id.
                    let topic = if version >= 6 {
                        let id = *t.topic_id.as_bytes();
                        cx.handles
                            .brokers
                            .topics
                            .name(&id)
                            .map_or_else(|| t.topic_id.to_string(), |n| n.to_string())
                    } else {
                        t.name.0.to_string()
                    };
                    for p in &t.partitions {
                        errors.push((
                            p.error_code,
                            Some((topic.clone(), p.partition_index)),
                            (-1, -1),
                        ));
                    }
                }
            })
        }
        _ => return frame,
    };
    if let Err(e) = decoded {
        debug!(error = %e, ?key, "coordinator answer not inspected");
        return frame;
    }
    if let (true, Some(t)) = (memo.opens, &txn) {
        if !errors.is_empty() && errors.iter().all(|e| e.0 == codes::NONE) {
            guard.begin_transaction(t, info.client_id_kept().unwrap_or(""));
        }
    }
    audit_errors(guard, info, key, txn, errors);
    frame
}

/// Audits the exactly-once errors among a coordinator's answers.
pub fn audit_errors(
    guard: &Guard,
    info: &Client,
    key: ApiKey,
    txn: Option<String>,
    errors: Vec<Found>,
) {
    for (code, tp, producer) in errors {
        let Some(kind) = eos_error_kind(code) else {
            continue;
        };
        guard.audit.emit(AuditEvent {
            error_code: code,
            producer_id: producer.0,
            producer_epoch: producer.1,
            transactional_id: txn.clone(),
            topic: tp.as_ref().map(|t| t.0.clone()),
            partition: tp.map(|t| t.1),
            api_key: key as i16,
            ..AuditEvent::new(kind, Source::Broker, Action::Observed).from_conn(info)
        });
    }
}

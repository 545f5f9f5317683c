//! Transaction coordinator requests the fence reads: who is asking (transactional id, producer id,
//! epoch) and, for the per-partition ones, which partitions, so a fenced request can be answered in
//! full at the proxy. Hand-walked and bounds-checked, like the produce walker (client bytes).

use super::codes;
use crate::protocol::codec::encode_response;
use crate::protocol::header::RequestHead;
use crate::protocol::wire::{Reader, WireError};
use bytes::Bytes;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, ApiKey, EndTxnResponse, ProducerId,
    ResponseHeader, TopicName, TxnOffsetCommitResponse,
};
use kafka_protocol::protocol::StrBytes;

/// A coordinator request's producer and, where the request has them, its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorRequest {
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub topics: Vec<(Topic, Vec<i32>)>,
    /// EndTxn only: commit (true) or abort.
    pub committed: Option<bool>,
}

/// A topic as a request names it: by name, or by topic id (TxnOffsetCommit v6+, KIP-1319).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Name(String),
    Id([u8; 16]),
}

struct Walk<'a> {
    r: Reader<'a>,
    flexible: bool,
}

impl<'a> Walk<'a> {
    fn string(&mut self) -> Result<Option<&'a str>, WireError> {
        let at = self.r.position();
        let b = if self.flexible {
            self.r.compact_nullable_bytes()?
        } else {
            self.r.nullable_string()?
        };
        b.map(|b| {
            std::str::from_utf8(b).map_err(|_| WireError::Invalid {
                what: "utf-8 string",
                offset: at,
            })
        })
        .transpose()
    }
    fn array_len(&mut self) -> Result<usize, WireError> {
        Ok(if self.flexible {
            self.r.compact_array_len()?
        } else {
            self.r.array_len()?
        }
        .unwrap_or(0))
    }
    fn tagged(&mut self) -> Result<(), WireError> {
        if self.flexible {
            self.r.skip_tagged_fields(u32::MAX)?;
        }
        Ok(())
    }
}

fn walk<'a>(frame: &'a [u8], head: &RequestHead, key: ApiKey) -> Option<Walk<'a>> {
    Some(Walk {
        r: Reader::at(frame, head.body_offset?),
        flexible: key.request_header_version(head.api_version) >= 2,
    })
}

/// EndTxn and AddOffsetsToTxn start with transactional id, producer id, producer epoch.
pub fn parse_producer_first(
    frame: &[u8],
    head: &RequestHead,
    key: ApiKey,
) -> Option<CoordinatorRequest> {
    let mut w = walk(frame, head, key)?;
    let id = w.string().ok()??.to_string();
    let producer_id = w.r.i64().ok()?;
    let producer_epoch = w.r.i16().ok()?;
    let committed = match key {
        ApiKey::EndTxn => Some(w.r.i8().ok()? != 0),
        _ => None,
    };
    Some(CoordinatorRequest {
        transactional_id: id,
        producer_id,
        producer_epoch,
        topics: Vec::new(),
        committed,
    })
}

/// AddPartitionsToTxn v0-3 (the client versions): id, producer, then topics with partition indexes.
pub fn parse_add_partitions(frame: &[u8], head: &RequestHead) -> Option<CoordinatorRequest> {
    if head.api_version > 3 {
        return None;
    }
    let mut req = parse_producer_first(frame, head, ApiKey::AddPartitionsToTxn)?;
    let mut w = walk(frame, head, ApiKey::AddPartitionsToTxn)?;
    // Skip what parse_producer_first read.
    w.string().ok()?;
    w.r.skip(10).ok()?;
    for _ in 0..w.array_len().ok()? {
        let name = w.string().ok()??.to_string();
        let mut parts = Vec::new();
        for _ in 0..w.array_len().ok()? {
            parts.push(w.r.i32().ok()?);
        }
        w.tagged().ok()?;
        req.topics.push((Topic::Name(name), parts));
    }
    Some(req)
}

/// TxnOffsetCommit: id, group id, producer, (v3+ generation, member, instance), topics (by name, by id
/// from v6) with partitions.
pub fn parse_txn_offset_commit(frame: &[u8], head: &RequestHead) -> Option<CoordinatorRequest> {
    let mut w = walk(frame, head, ApiKey::TxnOffsetCommit)?;
    let id = w.string().ok()??.to_string();
    w.string().ok()?; // group id
    let producer_id = w.r.i64().ok()?;
    let producer_epoch = w.r.i16().ok()?;
    if head.api_version >= 3 {
        w.r.i32().ok()?; // generation id
        w.string().ok()?; // member id
        w.string().ok()?; // group instance id
    }
    let mut topics = Vec::new();
    for _ in 0..w.array_len().ok()? {
        let topic = if head.api_version >= 6 {
            Topic::Id(w.r.take(16).ok()?.try_into().ok()?)
        } else {
            Topic::Name(w.string().ok()??.to_string())
        };
        let mut parts = Vec::new();
        for _ in 0..w.array_len().ok()? {
            parts.push(w.r.i32().ok()?);
            w.r.i64().ok()?; // committed offset
            if head.api_version >= 2 {
                w.r.i32().ok()?; // committed leader epoch
            }
            w.string().ok()?; // metadata
            w.tagged().ok()?;
        }
        w.tagged().ok()?;
        topics.push((topic, parts));
    }
    Some(CoordinatorRequest {
        transactional_id: id,
        producer_id,
        producer_epoch,
        topics,
        committed: None,
    })
}

/// The error a coordinator gives a fenced producer on this api and version: PRODUCER_FENCED from the
/// versions that know it (EndTxn, AddOffsetsToTxn and AddPartitionsToTxn v2+), else INVALID_PRODUCER_EPOCH.
pub fn fenced_code(key: ApiKey, version: i16) -> i16 {
    match key {
        ApiKey::EndTxn | ApiKey::AddOffsetsToTxn | ApiKey::AddPartitionsToTxn if version >= 2 => {
            codes::PRODUCER_FENCED
        }
        _ => codes::INVALID_PRODUCER_EPOCH,
    }
}

/// A whole answer to a fenced coordinator request, every partition carrying the error.
pub fn fenced_response(key: ApiKey, head: &RequestHead, req: &CoordinatorRequest) -> Option<Bytes> {
    let code = fenced_code(key, head.api_version);
    let header = ResponseHeader::default().with_correlation_id(head.correlation_id);
    let v = head.api_version;
    // AddPartitionsToTxn names topics; TxnOffsetCommit by name up to v5, by id from v6.
    let name = |t: &Topic| match t {
        Topic::Name(n) => TopicName(StrBytes::from_string(n.clone())),
        Topic::Id(_) => TopicName::default(),
    };
    let id = |t: &Topic| match t {
        Topic::Id(id) => uuid::Uuid::from_bytes(*id),
        Topic::Name(_) => uuid::Uuid::nil(),
    };
    match key {
        ApiKey::EndTxn => {
            let body = EndTxnResponse::default()
                .with_error_code(code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
            encode_response(&header, &body, key, v).ok()
        }
        ApiKey::AddOffsetsToTxn => encode_response(
            &header,
            &AddOffsetsToTxnResponse::default().with_error_code(code),
            key,
            v,
        )
        .ok(),
        ApiKey::AddPartitionsToTxn => {
            let topics = req
                .topics
                .iter()
                .map(|(t, parts)| {
                    AddPartitionsToTxnTopicResult::default()
                        .with_name(name(t))
                        .with_results_by_partition(
                            parts
                                .iter()
                                .map(|p| {
                                    AddPartitionsToTxnPartitionResult::default()
                                        .with_partition_index(*p)
                                        .with_partition_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            let body =
                AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(topics);
            encode_response(&header, &body, key, v).ok()
        }
        ApiKey::TxnOffsetCommit => {
            let topics = req
                .topics
                .iter()
                .map(|(t, parts)| {
                    TxnOffsetCommitResponseTopic::default()
                        .with_name(name(t))
                        .with_topic_id(id(t))
                        .with_partitions(
                            parts
                                .iter()
                                .map(|p| {
                                    TxnOffsetCommitResponsePartition::default()
                                        .with_partition_index(*p)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            encode_response(
                &header,
                &TxnOffsetCommitResponse::default().with_topics(topics),
                key,
                v,
            )
            .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::header::peek_request;
    use bytes::{BufMut, BytesMut};
    use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
    use kafka_protocol::messages::txn_offset_commit_request::{
        TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::{
        AddPartitionsToTxnRequest, RequestHeader, TxnOffsetCommitRequest,
    };
    use kafka_protocol::protocol::Encodable;

    fn frame<R: Encodable>(key: ApiKey, v: i16, body: &R) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(v)
            .with_correlation_id(3)
            .encode(&mut buf, key.request_header_version(v))
            .unwrap();
        body.encode(&mut buf, v).unwrap();
        let n = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&n.to_be_bytes());
        buf.freeze()
    }

    fn expected() -> CoordinatorRequest {
        CoordinatorRequest {
            transactional_id: "tx".into(),
            producer_id: 42,
            producer_epoch: 7,
            topics: vec![
                (Topic::Name("a".into()), vec![0, 2]),
                (Topic::Name("b".into()), vec![5]),
            ],
            committed: None,
        }
    }

    #[test]
    fn reads_add_partitions_in_every_client_version() {
        for v in 0..=3 {
            let body = AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(StrBytes::from_static_str("tx").into())
                .with_v3_and_below_producer_id(ProducerId(42))
                .with_v3_and_below_producer_epoch(7)
                .with_v3_and_below_topics(vec![
                    AddPartitionsToTxnTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("a")))
                        .with_partitions(vec![0, 2]),
                    AddPartitionsToTxnTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("b")))
                        .with_partitions(vec![5]),
                ]);
            let f = frame(ApiKey::AddPartitionsToTxn, v, &body);
            let head = peek_request(&f).unwrap();
            let req = parse_add_partitions(&f, &head).unwrap();
            assert_eq!(req, expected(), "v{v}");
            assert!(fenced_response(ApiKey::AddPartitionsToTxn, &head, &req).is_some());
        }
    }

    #[test]
    fn reads_txn_offset_commit_in_every_version() {
        for v in 0..=6 {
            let part = |i| {
                TxnOffsetCommitRequestPartition::default()
                    .with_partition_index(i)
                    .with_committed_offset(9)
            };
            let body = TxnOffsetCommitRequest::default()
                .with_transactional_id(StrBytes::from_static_str("tx").into())
                .with_group_id(StrBytes::from_static_str("g").into())
                .with_producer_id(ProducerId(42))
                .with_producer_epoch(7)
                .with_topics(vec![
                    TxnOffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("a")))
                        .with_topic_id(uuid::Uuid::from_bytes([0xa; 16]))
                        .with_partitions(vec![part(0), part(2)]),
                    TxnOffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str("b")))
                        .with_topic_id(uuid::Uuid::from_bytes([0xb; 16]))
                        .with_partitions(vec![part(5)]),
                ]);
            let f = frame(ApiKey::TxnOffsetCommit, v, &body);
            let head = peek_request(&f).unwrap();
            let mut want = expected();
            if v >= 6 {
                want.topics[0].0 = Topic::Id([0xa; 16]);
                want.topics[1].0 = Topic::Id([0xb; 16]);
            }
            let got = parse_txn_offset_commit(&f, &head).unwrap();
            assert_eq!(got, want, "v{v}");
            // The fenced answer names the topics the way the request did, and reads back.
            let answer = fenced_response(ApiKey::TxnOffsetCommit, &head, &got).expect("answer");
            let (_, r): (_, TxnOffsetCommitResponse) =
                crate::protocol::codec::decode_response(answer, ApiKey::TxnOffsetCommit, v)
                    .unwrap();
            let named: Vec<(String, [u8; 16])> = r
                .topics
                .iter()
                .map(|t| (t.name.0.to_string(), *t.topic_id.as_bytes()))
                .collect();
            if v >= 6 {
                assert_eq!(named[0].1, [0xa; 16], "v{v}");
            } else {
                assert_eq!(named[0].0, "a", "v{v}");
            }
            // truncations never panic
            for cut in 0..f.len() {
                if let Ok(h) = peek_request(&f[..cut]) {
                    let _ = parse_txn_offset_commit(&f[..cut], &h);
                }
            }
        }
    }
}

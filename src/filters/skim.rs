//! Zero-copy skims of large responses: walk the structure by lengths only, to learn whether a response
//! carries top-level `NodeEndpoints` (tagged field 0 of Produce v10+ and Fetch v16+). They are present only
//! when a partition answered NOT_LEADER_OR_FOLLOWER, so almost every response passes through untouched and
//! only the rare one is decoded and rewritten.

use crate::protocol::frame::SIZE_PREFIX;
use crate::protocol::wire::{Reader, WireError};

/// Response header v1 (flexible): correlation id + tagged fields.
fn after_flexible_header(frame: &[u8]) -> Result<Reader<'_>, WireError> {
    let mut r = Reader::at(frame, SIZE_PREFIX);
    r.i32()?;
    r.skip_tagged_fields(u32::MAX)?;
    Ok(r)
}

fn compact_len(r: &mut Reader) -> Result<usize, WireError> {
    Ok(r.compact_array_len()?.unwrap_or(0))
}

/// Produce response, version >= 10.
pub fn produce_has_node_endpoints(frame: &[u8], version: i16) -> Result<bool, WireError> {
    let mut r = after_flexible_header(frame)?;
    for _topic in 0..compact_len(&mut r)? {
        if version >= crate::protocol::produce::TOPIC_ID_VERSION {
            r.uuid()?; // topic id
        } else {
            r.compact_nullable_bytes()?; // name
        }
        for _p in 0..compact_len(&mut r)? {
            r.skip(4 + 2 + 8 + 8 + 8)?; // index, error, base offset, append time, log start offset
            for _e in 0..compact_len(&mut r)? {
                r.skip(4)?;
                r.compact_nullable_bytes()?;
                r.skip_tagged_fields(u32::MAX)?;
            }
            r.compact_nullable_bytes()?; // error message
            r.skip_tagged_fields(u32::MAX)?;
        }
        r.skip_tagged_fields(u32::MAX)?;
    }
    r.skip(4)?; // throttle time
    r.skip_tagged_fields(0)
}

/// How a fetch response names a topic: by name before v13, by topic id from v13.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRef<'a> {
    Name(&'a str),
    Id([u8; 16]),
}

/// One partition of a fetch response: its high watermark and last stable offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPartition<'a> {
    pub topic: TopicRef<'a>,
    pub partition: i32,
    pub error_code: i16,
    pub high_watermark: i64,
    pub last_stable_offset: i64,
    /// Entries in the partition's AbortedTransactions list (read_committed fetches only).
    pub aborted_transactions: usize,
}

/// Fetch response, version >= 16 (topic ids, flexible).
pub fn fetch_has_node_endpoints(frame: &[u8]) -> Result<bool, WireError> {
    fetch_walk(frame, 16, |_| {})
}

/// Walks a Fetch response (v4-v18) by lengths only, calling `each` for every partition, and reports
/// whether it carries top-level NodeEndpoints (v16+). Records are skipped, never copied.
pub fn fetch_walk<'a>(
    frame: &'a [u8],
    version: i16,
    mut each: impl FnMut(FetchPartition<'a>),
) -> Result<bool, WireError> {
    let flexible = version >= 12;
    let mut r = if flexible {
        after_flexible_header(frame)?
    } else {
        let mut r = Reader::at(frame, SIZE_PREFIX);
        r.i32()?;
        r
    };
    let len = |r: &mut Reader| -> Result<usize, WireError> {
        Ok(if flexible {
            r.compact_array_len()?
        } else {
            r.array_len()?
        }
        .unwrap_or(0))
    };
    r.skip(4)?; // throttle time (v1+)
    if version >= 7 {
        r.skip(2 + 4)?; // error, session id
    }
    for _topic in 0..len(&mut r)? {
        let topic = if version >= 13 {
            let id = r.take(16)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(id);
            TopicRef::Id(a)
        } else {
            let at = r.position();
            let name = if flexible {
                r.compact_nullable_bytes()?
            } else {
                r.nullable_string()?
            }
            .unwrap_or_default();
            TopicRef::Name(std::str::from_utf8(name).map_err(|_| WireError::Invalid {
                what: "topic name",
                offset: at,
            })?)
        };
        for _p in 0..len(&mut r)? {
            let partition = r.i32()?;
            let error_code = r.i16()?;
            let high_watermark = r.i64()?;
            let last_stable_offset = r.i64()?;
            if version >= 5 {
                r.skip(8)?; // log start offset
            }
            let aborted_transactions = len(&mut r)?;
            for _a in 0..aborted_transactions {
                r.skip(8 + 8)?;
                if flexible {
                    r.skip_tagged_fields(u32::MAX)?;
                }
            }
            if version >= 11 {
                r.skip(4)?; // preferred read replica
            }
            if flexible {
                r.compact_nullable_bytes()?;
                r.skip_tagged_fields(u32::MAX)?;
            } else {
                r.nullable_bytes()?;
            }
            each(FetchPartition {
                topic,
                partition,
                error_code,
                high_watermark,
                last_stable_offset,
                aborted_transactions,
            });
        }
        if flexible {
            r.skip_tagged_fields(u32::MAX)?;
        }
    }
    if flexible {
        r.skip_tagged_fields(0)
    } else {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::TopicRef;
    use super::*;
    use crate::protocol::codec::encode_response;
    use bytes::Bytes;
    use kafka_protocol::messages::fetch_response::{
        FetchResponse, FetchableTopicResponse, NodeEndpoint as FetchNode, PartitionData,
    };
    use kafka_protocol::messages::produce_response::{
        NodeEndpoint as ProduceNode, PartitionProduceResponse, ProduceResponse,
        TopicProduceResponse,
    };
    use kafka_protocol::messages::{ApiKey, BrokerId, ResponseHeader, TopicName};
    use kafka_protocol::protocol::StrBytes;

    fn produce(with_nodes: bool, version: i16) -> Bytes {
        let mut resp =
            ProduceResponse::default().with_responses(vec![TopicProduceResponse::default()
                .with_name(TopicName(StrBytes::from_static_str("t")))
                .with_topic_id(uuid::Uuid::from_bytes([7; 16]))
                .with_partition_responses(vec![
                    PartitionProduceResponse::default()
                        .with_index(0)
                        .with_error_code(6)
                        .with_error_message(Some(StrBytes::from_static_str("moved"))),
                    PartitionProduceResponse::default().with_index(1),
                ])]);
        if with_nodes {
            resp.node_endpoints = vec![ProduceNode::default()
                .with_node_id(BrokerId(2))
                .with_host(StrBytes::from_static_str("10.0.0.2"))
                .with_port(9092)];
        }
        encode_response(&ResponseHeader::default(), &resp, ApiKey::Produce, version).unwrap()
    }

    fn fetch(with_nodes: bool) -> Bytes {
        let mut resp =
            FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
                .with_partitions(vec![PartitionData::default()
                    .with_records(Some(Bytes::from_static(&[1u8; 300])))
                    .with_aborted_transactions(Some(vec![Default::default()]))])]);
        if with_nodes {
            resp.node_endpoints = vec![FetchNode::default()
                .with_node_id(BrokerId(3))
                .with_host(StrBytes::from_static_str("h"))
                .with_port(1)];
        }
        encode_response(&ResponseHeader::default(), &resp, ApiKey::Fetch, 17).unwrap()
    }

    #[test]
    fn finds_node_endpoints_exactly_when_present() {
        for v in 10..=13 {
            assert!(produce_has_node_endpoints(&produce(true, v), v).unwrap());
            assert!(!produce_has_node_endpoints(&produce(false, v), v).unwrap());
        }
        assert!(fetch_has_node_endpoints(&fetch(true)).unwrap());
        assert!(!fetch_has_node_endpoints(&fetch(false)).unwrap());
    }

    #[test]
    fn walks_every_fetch_version_and_reads_offsets() {
        for v in 4..=18 {
            let mut part = PartitionData::default()
                .with_partition_index(3)
                .with_high_watermark(100)
                .with_last_stable_offset(90)
                .with_records(Some(Bytes::from_static(&[7u8; 50])));
            part.aborted_transactions = Some(vec![Default::default(), Default::default()]);
            let mut topic = FetchableTopicResponse::default().with_partitions(vec![part]);
            if v < 13 {
                topic.topic = TopicName(StrBytes::from_static_str("orders"));
            } else {
                topic.topic_id = uuid::Uuid::from_bytes([9; 16]);
            }
            let resp = FetchResponse::default().with_responses(vec![topic]);
            let frame =
                encode_response(&ResponseHeader::default(), &resp, ApiKey::Fetch, v).unwrap();
            let mut seen = Vec::new();
            let nodes = fetch_walk(&frame, v, |p| {
                seen.push((p.topic, p.partition, p.high_watermark, p.last_stable_offset))
            })
            .unwrap_or_else(|e| panic!("v{v}: {e}"));
            assert!(!nodes);
            let want_topic = if v < 13 {
                TopicRef::Name("orders")
            } else {
                TopicRef::Id([9; 16])
            };
            assert_eq!(seen, vec![(want_topic, 3, 100, 90)], "v{v}");
        }
    }

    #[test]
    fn truncated_responses_are_errors_not_panics() {
        let full = fetch(true);
        for cut in 0..full.len() {
            let _ = fetch_has_node_endpoints(&full[..cut]);
        }
        for v in [11, 13] {
            let full = produce(true, v);
            for cut in 0..full.len() {
                assert!(produce_has_node_endpoints(&full[..cut], v).is_err());
            }
        }
    }
}

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
pub fn produce_has_node_endpoints(frame: &[u8]) -> Result<bool, WireError> {
    let mut r = after_flexible_header(frame)?;
    for _topic in 0..compact_len(&mut r)? {
        r.compact_nullable_bytes()?; // name (v13+: topic id handled by the version cap)
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

/// Fetch response, version >= 16 (topic ids, flexible).
pub fn fetch_has_node_endpoints(frame: &[u8]) -> Result<bool, WireError> {
    let mut r = after_flexible_header(frame)?;
    r.skip(4 + 2 + 4)?; // throttle, error, session id
    for _topic in 0..compact_len(&mut r)? {
        r.skip(16)?; // topic id
        for _p in 0..compact_len(&mut r)? {
            r.skip(4 + 2 + 8 + 8 + 8)?; // index, error, high watermark, last stable, log start
            for _a in 0..compact_len(&mut r)? {
                r.skip(8 + 8)?;
                r.skip_tagged_fields(u32::MAX)?;
            }
            r.skip(4)?; // preferred read replica
            r.compact_nullable_bytes()?; // records
            r.skip_tagged_fields(u32::MAX)?;
        }
        r.skip_tagged_fields(u32::MAX)?;
    }
    r.skip_tagged_fields(0)
}

#[cfg(test)]
mod tests {
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
        for v in 10..=12 {
            assert!(produce_has_node_endpoints(&produce(true, v)).unwrap());
            assert!(!produce_has_node_endpoints(&produce(false, v)).unwrap());
        }
        assert!(fetch_has_node_endpoints(&fetch(true)).unwrap());
        assert!(!fetch_has_node_endpoints(&fetch(false)).unwrap());
    }

    #[test]
    fn truncated_responses_are_errors_not_panics() {
        let full = fetch(true);
        for cut in 0..full.len() {
            let _ = fetch_has_node_endpoints(&full[..cut]);
        }
        let full = produce(true, 11);
        for cut in 0..full.len() {
            assert!(produce_has_node_endpoints(&full[..cut]).is_err() || cut == full.len());
        }
    }
}

use super::*;
use crate::protocol::batch::tests::batch;
use crate::protocol::header::peek_request;
use bytes::BufMut;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, InitProducerIdRequest as KpInit, ListOffsetsRequest, ProduceRequest,
    ProducerId, RequestHeader, TopicName, TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

fn frame<T: Encodable + HeaderVersion>(key: ApiKey, version: i16, body: &T) -> Bytes {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(9)
        .with_client_id(Some(StrBytes::from_static_str("c")));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header
        .encode(&mut buf, T::header_version(version))
        .expect("header");
    body.encode(&mut buf, version).expect("body");
    let n = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&n.to_be_bytes());
    buf.freeze()
}

fn decode<T: Decodable>(f: &Bytes, head: &RequestHead) -> T {
    let mut b = f.slice(head.body_offset.expect("body")..);
    T::decode(&mut b, head.api_version).expect("decodes")
}

fn fetch(version: i16, isolation: i8) -> FetchRequest {
    let topic = FetchTopic::default()
        .with_topic(TopicName(StrBytes::from_static_str("payments")))
        .with_topic_id(uuid::Uuid::from_bytes([7; 16]))
        .with_partitions(vec![
            FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(5),
            FetchPartition::default().with_partition(1),
        ]);
    let other = FetchTopic::default()
        .with_topic(TopicName(StrBytes::from_static_str("other")))
        .with_topic_id(uuid::Uuid::from_bytes([8; 16]))
        .with_partitions(vec![FetchPartition::default().with_partition(3)]);
    let mut r = FetchRequest::default()
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_isolation_level(isolation)
        .with_topics(vec![topic, other]);
    if version < 15 {
        r = r.with_replica_id(kafka_protocol::messages::BrokerId(-1));
    }
    r
}

#[test]
fn fetch_isolation_and_topics_in_every_version() {
    for v in 4..=ApiKey::Fetch.valid_versions().max {
        let f = frame(ApiKey::Fetch, v, &fetch(v, 0));
        let head = peek_request(&f).expect("head");
        let req = fetch_request(&f, &head).expect("walks");
        let (at, level) = req.isolation.expect("v4+ has an isolation level");
        assert_eq!(level, 0, "v{v}");
        assert_eq!(req.topics.len(), 2, "v{v}");
        if v >= 13 {
            assert_eq!(req.topics[0], TopicRef::Id([7; 16]), "v{v}");
        } else {
            assert_eq!(req.topics[1], TopicRef::Name("other"), "v{v}");
        }
        // Patched, it is the same request at read_committed.
        let up = patched(&f, at, &[1]);
        let decoded: FetchRequest = decode(&up, &head);
        assert_eq!(decoded.isolation_level, 1, "v{v}");
        assert_eq!(decoded.max_bytes, 1 << 20, "v{v}");
        assert_eq!(decoded.topics[0].partitions[0].fetch_offset, 5, "v{v}");
        // Truncated anywhere: at worst an error, never a panic; inside the topics, an error.
        for cut in 0..f.len() {
            let _ = fetch_request(&f[..cut], &head);
        }
        assert!(fetch_request(&f[..at + 6], &head).is_err(), "v{v}");
    }
}

#[test]
fn list_offsets_isolation_and_topics() {
    for v in 2..=ApiKey::ListOffsets.valid_versions().max {
        let body = ListOffsetsRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_isolation_level(0)
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("payments")))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(2)
                    .with_timestamp(-1)])]);
        let f = frame(ApiKey::ListOffsets, v, &body);
        let head = peek_request(&f).expect("head");
        let req = list_offsets_request(&f, &head).expect("walks");
        assert_eq!(req.topics, vec![TopicRef::Name("payments")], "v{v}");
        let (at, level) = req.isolation.expect("v2+");
        assert_eq!(level, 0);
        let decoded: ListOffsetsRequest = decode(&patched(&f, at, &[1]), &head);
        assert_eq!(decoded.isolation_level, 1, "v{v}");
        assert_eq!(decoded.topics[0].partitions[0].timestamp, -1, "v{v}");
    }
}

#[test]
fn init_producer_id_fields_and_timeout_clamp() {
    for v in 0..=5 {
        let body = KpInit::default()
            .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx-1"))))
            .with_transaction_timeout_ms(900_000);
        let f = frame(ApiKey::InitProducerId, v, &body);
        let head = peek_request(&f).expect("head");
        let req = init_producer_id_request(&f, &head).expect("walks");
        assert_eq!(req.transactional_id, Some("tx-1"));
        assert_eq!(req.timeout_ms, 900_000);
        assert_eq!(req.existing_producer_id, None);
        let decoded: KpInit = decode(
            &patched(&f, req.timeout_at, &60_000i32.to_be_bytes()),
            &head,
        );
        assert_eq!(decoded.transaction_timeout_ms, 60_000, "v{v}");
        assert_eq!(
            decoded.transactional_id.as_ref().map(|t| t.0.as_str()),
            Some("tx-1")
        );
    }
    let body = KpInit::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(-1)
        .with_producer_id(ProducerId(42))
        .with_producer_epoch(3);
    let f = frame(ApiKey::InitProducerId, 4, &body);
    let head = peek_request(&f).expect("head");
    let req = init_producer_id_request(&f, &head).expect("walks");
    assert_eq!(req.transactional_id, None);
    assert_eq!(req.existing_producer_id, Some(42));
    assert!(!req.enable_2pc && !req.keep_prepared_txn, "v4 has no 2PC");
}

#[test]
fn init_producer_id_v6_two_phase_flags() {
    for (enable, keep) in [(false, false), (true, false), (true, true), (false, true)] {
        // The codecs encode InitProducerId requests up to v5 (v6 is unstable in Kafka 4.4): v6 is v5 with
        // the two flags before the tagged fields.
        let body = KpInit::default()
            .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("2pc"))))
            .with_transaction_timeout_ms(-1)
            .with_producer_id(ProducerId(7))
            .with_producer_epoch(2);
        let v5 = frame(ApiKey::InitProducerId, 5, &body);
        let mut f = BytesMut::from(&v5[..v5.len() - 1]);
        f.put_u8(enable as u8);
        f.put_u8(keep as u8);
        f.put_u8(0); // no tagged fields
        f[6..8].copy_from_slice(&6i16.to_be_bytes());
        let n = (f.len() - 4) as i32;
        f[..4].copy_from_slice(&n.to_be_bytes());
        let f = f.freeze();
        let head = peek_request(&f).expect("head");
        let req = init_producer_id_request(&f, &head).expect("walks");
        assert_eq!((req.enable_2pc, req.keep_prepared_txn), (enable, keep));
        assert_eq!(req.existing_producer_id, Some(7));
        assert_eq!(req.transactional_id, Some("2pc"));
        // Every byte is accounted for up to the request's tagged fields: nothing misread.
        for cut in head.body_offset.unwrap()..f.len() - 1 {
            assert!(
                init_producer_id_request(&f[..cut], &head).is_err(),
                "cut {cut}"
            );
        }
    }
}

#[test]
fn produce_acks_patch() {
    for v in 3..=12 {
        let body = ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(1234)
            .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("t"))));
        let f = frame(ApiKey::Produce, v, &body);
        let head = peek_request(&f).expect("head");
        let at = produce_acks_offset(&f, &head).expect("acks");
        let decoded: ProduceRequest = decode(&patched(&f, at, &(-1i16).to_be_bytes()), &head);
        assert_eq!(decoded.acks, -1, "v{v}");
        assert_eq!(decoded.timeout_ms, 1234, "v{v}");
    }
}

/// A batch at `offset`: transactional (bit 4) or not, or a control marker (bits 4+5) of `marker` type.
fn at(offset: i64, pid: i64, attributes: i16, count: i32, payload: &[u8]) -> Vec<u8> {
    let mut b = batch(pid, 0, 0, count, attributes, payload);
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b
}

fn marker(offset: i64, pid: i64, kind: u8) -> Vec<u8> {
    // record: length, attributes, timestamp delta, offset delta, key length 4 (zigzag 8), key v0 type.
    at(offset, pid, 0x30, 1, &[20, 0, 0, 0, 8, 0, 0, 0, kind, 0, 0])
}

fn offsets(records: &[u8]) -> Vec<i64> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 12 <= records.len() {
        out.push(i64::from_be_bytes(
            records[pos..pos + 8].try_into().unwrap(),
        ));
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().unwrap());
        pos += 12 + len as usize;
    }
    out
}

#[test]
fn aborted_batches_are_removed_like_a_read_committed_consumer_skips_them() {
    let mut log = Vec::new();
    log.extend(at(0, 7, 0x10, 2, b"aborted")); // pid 7, aborted transaction (0-1)
    log.extend(at(2, 9, 0x00, 1, b"plain")); // non-transactional
    log.extend(at(3, 8, 0x10, 1, b"committed")); // pid 8, committed
    log.extend(marker(4, 7, 0)); // ABORT for pid 7
    log.extend(marker(5, 8, 1)); // COMMIT for pid 8
    log.extend(at(6, 7, 0x10, 1, b"next txn")); // pid 7 again: a later transaction, committed
    let kept = without_aborted(&log, &[(7, 0)]).expect("something removed");
    assert_eq!(offsets(&kept), vec![2, 3, 4, 5, 6]);

    // A later aborted transaction of the same producer.
    let kept = without_aborted(&log, &[(7, 6)]).expect("removed");
    assert_eq!(offsets(&kept), vec![0, 2, 3, 4, 5]);

    // Nothing aborted in range, or no list at all: untouched.
    assert_eq!(without_aborted(&log, &[]), None);
    assert_eq!(without_aborted(&log, &[(99, 0)]), None);

    // A trailing partial batch stays for the client to fetch again.
    let mut cut = log.clone();
    cut.extend_from_slice(&at(7, 7, 0x10, 1, b"partial")[..30]);
    let kept = without_aborted(&cut, &[(7, 0)]).expect("removed");
    assert!(kept.ends_with(&at(7, 7, 0x10, 1, b"partial")[..30]));
}

#[test]
fn hostile_records_never_panic() {
    let good = at(0, 7, 0x10, 2, b"x");
    for cut in 0..good.len() {
        let _ = without_aborted(&good[..cut], &[(7, 0)]);
    }
    let mut lying = good.clone();
    lying[8..12].copy_from_slice(&(-5i32).to_be_bytes());
    let _ = without_aborted(&lying, &[(7, 0)]);
    let mut bad_marker = marker(0, 7, 0);
    let n = bad_marker.len();
    bad_marker.truncate(n - 6);
    bad_marker[8..12].copy_from_slice(&((n - 6 - 12) as i32).to_be_bytes());
    let _ = without_aborted(&bad_marker, &[(7, 0)]);
    // Found by the fuzzer: a base offset near i64::MAX plus the offset delta must not overflow.
    let edge = at(i64::MAX, 7, 0x10, 3, b"x");
    assert!(without_aborted(&edge, &[(7, 0)]).is_some());
}

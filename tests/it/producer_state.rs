//! Producer state at the proxy, against real Kafka: retries answered with the original offset, gaps
//! audited and refused, zombies fenced before the cluster, malformed batches refused per partition, and a
//! librdkafka idempotent producer that still writes every record exactly once while responses get lost.

use crate::common::*;
use crate::rdkafka_clients::{client_config, create_topic, read_all};
use crate::wire::Raw;
use bytes::Bytes;
use kafka_eos_proxy::audit::{Action, Kind, Source};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PRODUCE_VERSION: i16 = 11;

/// A v2 batch of `n` records from producer (pid, epoch) starting at sequence `seq`.
pub use kafka_eos_proxy::testkit::record_batch as batch;

pub fn produce(topic: &str, txn: Option<&str>, parts: Vec<(i32, Bytes)>) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_transactional_id(txn.map(|t| StrBytes::from_string(t.to_string()).into()))
        .with_topic_data(vec![produce_request::TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(
                parts
                    .into_iter()
                    .map(|(i, r)| {
                        produce_request::PartitionProduceData::default()
                            .with_index(i)
                            .with_records(Some(r))
                    })
                    .collect(),
            )])
}

/// The same request naming its topic by `id` (Produce v13+) instead of by name.
pub fn by_id(mut req: ProduceRequest, id: uuid::Uuid) -> ProduceRequest {
    for t in &mut req.topic_data {
        t.name = Default::default();
        t.topic_id = id;
    }
    req
}

/// (partition, error code, base offset, error message) of every partition in a produce response.
pub async fn send_produce(
    raw: &mut Raw,
    req: &ProduceRequest,
) -> Vec<(i32, i16, i64, Option<String>)> {
    send_produce_v(raw, req, PRODUCE_VERSION).await
}

/// [`send_produce`] in a given Produce version.
pub async fn send_produce_v(
    raw: &mut Raw,
    req: &ProduceRequest,
    version: i16,
) -> Vec<(i32, i16, i64, Option<String>)> {
    let resp: ProduceResponse = raw.call(ApiKey::Produce, version, req).await;
    let mut out: Vec<_> = resp
        .responses
        .iter()
        .flat_map(|t| t.partition_responses.iter())
        .map(|p| {
            (
                p.index,
                p.error_code,
                p.base_offset,
                p.error_message.as_ref().map(|m| m.to_string()),
            )
        })
        .collect();
    out.sort();
    out
}

pub async fn init_producer_id(raw: &mut Raw, txn: Option<&str>) -> (i64, i16) {
    init_producer_id_timeout(raw, txn, 60_000).await
}

pub async fn init_producer_id_timeout(
    raw: &mut Raw,
    txn: Option<&str>,
    timeout_ms: i32,
) -> (i64, i16) {
    if let Some(t) = txn {
        find_transaction_coordinator(raw, t).await;
    }
    for _ in 0..100 {
        let req = InitProducerIdRequest::default()
            .with_transactional_id(txn.map(|t| StrBytes::from_string(t.to_string()).into()))
            .with_transaction_timeout_ms(timeout_ms)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let resp: InitProducerIdResponse = raw.call(ApiKey::InitProducerId, 4, &req).await;
        match resp.error_code {
            0 => return (resp.producer_id.0, resp.producer_epoch),
            14 | 15 | 16 | 51 => tokio::time::sleep(Duration::from_millis(200)).await,
            e => panic!("InitProducerId failed with {e}"),
        }
    }
    panic!("InitProducerId kept failing");
}

/// Waits until `txn` has a transaction coordinator (the first lookup creates __transaction_state).
pub async fn find_transaction_coordinator(raw: &mut Raw, txn: &str) {
    for _ in 0..100 {
        let req = FindCoordinatorRequest::default()
            .with_key_type(1)
            .with_coordinator_keys(vec![StrBytes::from_string(txn.to_string())]);
        let resp: FindCoordinatorResponse = raw.call(ApiKey::FindCoordinator, 4, &req).await;
        if resp.coordinators.first().is_some_and(|c| c.error_code == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Registers `topic`-`partition` in the transaction (transactions v1: before its first write); returns
/// the partition's error code.
pub async fn add_partitions(
    raw: &mut Raw,
    txn: &str,
    (pid, epoch): (i64, i16),
    topic: &str,
    partition: i32,
) -> i16 {
    let req = AddPartitionsToTxnRequest::default()
        .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(txn.to_string())))
        .with_v3_and_below_producer_id(ProducerId(pid))
        .with_v3_and_below_producer_epoch(epoch)
        .with_v3_and_below_topics(vec![
            add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![partition]),
        ]);
    let resp: AddPartitionsToTxnResponse = raw.call(ApiKey::AddPartitionsToTxn, 3, &req).await;
    resp.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code
}

/// A proxy whose producer state runs in `mode` ("audit" or "enforce").
async fn start_in_mode(cluster: Cluster, mode: &str) -> TestProxy {
    let mode = match mode {
        "enforce" => kafka_eos_proxy::guard::Mode::Enforce,
        _ => kafka_eos_proxy::guard::Mode::Audit,
    };
    start_proxy_with(cluster, move |c| c.producer_state.mode = mode).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_response_retry_lands_once_with_the_original_offset() {
    let dropped: Arc<Mutex<HashSet<i32>>> = Arc::default();
    let d = dropped.clone();
    let rule: DropRule = Arc::new(move |key, frame| {
        let corr = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
        key == ApiKey::Produce as i16 && d.lock().unwrap().remove(&corr)
    });
    let proxy = start_proxy_full(Cluster::Single, |_| {}, Some(rule)).await;
    let topic = unique_topic("lost-response");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let (pid, epoch) = init_producer_id(&mut raw, None).await;

    // The first send lands, but its response is lost on the way to the client.
    let first = produce(&topic, None, vec![(0, batch(pid, epoch, 0, 3, false, "r"))]);
    let (corr, bytes) = raw.encode(ApiKey::Produce, PRODUCE_VERSION, &first);
    dropped.lock().unwrap().insert(corr);
    raw.send_bytes(&bytes).await;
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    eventually(
        "the proxy to learn the first batch",
        Duration::from_secs(10),
        || {
            let s = shared.clone();
            async move {
                s.guard.snapshot().iter().any(|e| {
                    e.key.producer_id == pid
                        && e.state.as_ref().is_some_and(|st| st.window().count() == 1)
                })
            }
        },
    )
    .await;
    assert!(
        dropped.lock().unwrap().is_empty(),
        "the response was dropped"
    );

    // The client retries the identical batch: answered by the proxy with the original offset.
    let retry = send_produce(&mut raw, &first).await;
    assert_eq!(retry, vec![(0, 0, 0, None)]);
    let answered = proxy.events(Kind::DuplicateAnswered);
    assert_eq!(answered.len(), 1, "{answered:?}");
    assert_eq!(answered[0].producer_id, pid);
    assert_eq!(answered[0].action, Action::Answered);
    assert_eq!(answered[0].topic.as_deref(), Some(topic.as_str()));

    // The producer carries on in sequence.
    let next = send_produce(
        &mut raw,
        &produce(&topic, None, vec![(0, batch(pid, epoch, 3, 2, false, "r"))]),
    )
    .await;
    assert_eq!(next, vec![(0, 0, 3, None)]);
    let values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 5);
    assert_eq!(
        values,
        vec!["r-0", "r-1", "r-2", "r-3", "r-4"],
        "every record exactly once"
    );

    // With acks=1 the original may not survive a leader failover, so its retry goes to the broker
    // (which deduplicates it here, answering the same offset) instead of being answered by the proxy.
    let mut weak = produce(&topic, None, vec![(0, batch(pid, epoch, 5, 1, false, "r"))]);
    weak.acks = 1;
    let (corr, bytes) = raw.encode(ApiKey::Produce, PRODUCE_VERSION, &weak);
    dropped.lock().unwrap().insert(corr);
    raw.send_bytes(&bytes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send_produce(&mut raw, &weak).await, vec![(0, 0, 5, None)]);
    assert_eq!(
        proxy.events(Kind::DuplicateAnswered).len(),
        1,
        "not answered by the proxy"
    );
    let values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 6);
    assert_eq!(values.len(), 6, "still exactly once");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_gap_is_audited_and_refused_in_enforce_mode() {
    for mode in ["audit", "enforce"] {
        let proxy = start_in_mode(Cluster::Single, mode).await;
        let topic = unique_topic(&format!("gap-{mode}"));
        create_topic(proxy.bootstrap(), &topic, 1, 1).await;
        let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
        let (pid, epoch) = init_producer_id(&mut raw, None).await;
        let ok = send_produce(
            &mut raw,
            &produce(&topic, None, vec![(0, batch(pid, epoch, 0, 3, false, "g"))]),
        )
        .await;
        assert_eq!(ok[0].1, 0);
        // Sequences 3..9 never arrive: a gap.
        let gap = send_produce(
            &mut raw,
            &produce(
                &topic,
                None,
                vec![(0, batch(pid, epoch, 10, 3, false, "g"))],
            ),
        )
        .await;
        assert_eq!(gap[0].1, 45, "{mode}: OUT_OF_ORDER_SEQUENCE_NUMBER");
        let seen = proxy.events(Kind::OutOfOrderSequence);
        let by_proxy: Vec<_> = seen.iter().filter(|e| e.source == Source::Proxy).collect();
        assert_eq!(by_proxy.len(), 1, "{mode}: {seen:?}");
        let e = by_proxy[0];
        assert_eq!(
            (e.expected_sequence, e.received_sequence),
            (Some(3), Some(10))
        );
        assert_eq!((e.producer_id, e.partition), (pid, Some(0)));
        assert!(e.client_address.starts_with("127.0.0.1:"));
        assert_eq!(e.broker_node_id, Some(1));
        if mode == "enforce" {
            assert_eq!(e.action, Action::Refused);
            assert!(
                gap[0].3.as_deref().unwrap_or("").contains("expected 3"),
                "{gap:?}"
            );
            assert!(
                seen.iter().all(|e| e.source == Source::Proxy),
                "never reached the broker"
            );
        } else {
            assert_eq!(e.action, Action::Forwarded);
            assert_eq!(
                seen.len(),
                1,
                "the broker's 45 for it is the same anomaly: {seen:?}"
            );
            // Through a second proxy that never saw this producer: it passes the gap on (no state),
            // and audits the 45 the broker returns.
            let other = start_proxy(Cluster::Single).await;
            let mut raw2 = Raw::connect(&format!("{PROXY_HOST}:{}", other.broker_port(1))).await;
            let gap2 = send_produce(
                &mut raw2,
                &produce(
                    &topic,
                    None,
                    vec![(0, batch(pid, epoch, 20, 1, false, "g"))],
                ),
            )
            .await;
            assert_eq!(gap2[0].1, 45);
            let seen2 = other.events(Kind::OutOfOrderSequence);
            assert_eq!(seen2.len(), 1, "{seen2:?}");
            assert_eq!(
                (seen2[0].source, seen2[0].action),
                (Source::Broker, Action::Observed)
            );
            assert_eq!(seen2[0].producer_id, pid);
            other.stop().await;
        }
        let values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 3);
        assert_eq!(values.len(), 3, "{mode}: the gap batch was not written");
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_transactional_producer_is_fenced_at_the_proxy() {
    let proxy = start_proxy(Cluster::Single).await;
    let topic = unique_topic("zombie");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let txn = unique_topic("zombie-txn");
    // Single broker: it is the coordinator and the leader.
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let (pid, old_epoch) = init_producer_id(&mut raw, Some(&txn)).await;
    // A new instance with the same transactional.id fences the old one.
    let (pid2, new_epoch) = init_producer_id(&mut raw, Some(&txn)).await;
    assert_eq!(pid2, pid);
    assert!(new_epoch > old_epoch);

    // The zombie's write is refused at the proxy and never reaches the cluster.
    let write = produce(
        &topic,
        Some(&txn),
        vec![(0, batch(pid, old_epoch, 0, 2, true, "z"))],
    );
    let answer = send_produce(&mut raw, &write).await;
    assert_eq!(answer[0].1, 47, "INVALID_PRODUCER_EPOCH");
    assert!(
        answer[0]
            .3
            .as_deref()
            .unwrap_or("")
            .starts_with("kafka-eos-proxy:"),
        "{answer:?}"
    );
    let fenced = proxy.events(Kind::FencedEpoch);
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    assert_eq!(fenced[0].source, Source::Proxy);
    assert_eq!(fenced[0].action, Action::Refused);
    assert_eq!(fenced[0].transactional_id.as_deref(), Some(txn.as_str()));
    assert_eq!(fenced[0].expected_epoch, Some(new_epoch));

    // Its EndTxn is fenced too: PRODUCER_FENCED for EndTxn v3.
    let end = EndTxnRequest::default()
        .with_transactional_id(StrBytes::from_string(txn.clone()).into())
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(old_epoch)
        .with_committed(true);
    let resp: EndTxnResponse = raw.call(ApiKey::EndTxn, 3, &end).await;
    assert_eq!(resp.error_code, 90);
    // And its AddPartitionsToTxn (PRODUCER_FENCED from v2) and TxnOffsetCommit (INVALID_PRODUCER_EPOCH, by
    // name and, from v6, by topic id),
    // answered for every partition it named.
    let add = AddPartitionsToTxnRequest::default()
        .with_v3_and_below_transactional_id(StrBytes::from_string(txn.clone()).into())
        .with_v3_and_below_producer_id(ProducerId(pid))
        .with_v3_and_below_producer_epoch(old_epoch)
        .with_v3_and_below_topics(vec![
            add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.clone())))
                .with_partitions(vec![0]),
        ]);
    let resp: AddPartitionsToTxnResponse = raw.call(ApiKey::AddPartitionsToTxn, 3, &add).await;
    let codes: Vec<i16> = resp.results_by_topic_v3_and_below[0]
        .results_by_partition
        .iter()
        .map(|p| p.partition_error_code)
        .collect();
    assert_eq!(codes, vec![90]);
    let commit = TxnOffsetCommitRequest::default()
        .with_transactional_id(StrBytes::from_string(txn.clone()).into())
        .with_group_id(StrBytes::from_static_str("zombie-group").into())
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(old_epoch)
        .with_topics(vec![
            txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.clone())))
                .with_partitions(vec![
                    txn_offset_commit_request::TxnOffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(1),
                ]),
        ]);
    let resp: TxnOffsetCommitResponse = raw.call(ApiKey::TxnOffsetCommit, 3, &commit).await;
    assert_eq!(resp.topics[0].partitions[0].error_code, 47);
    // TxnOffsetCommit v6 names the topic by id (KIP-1319): the answer names it the same way.
    let id = raw.topic_metadata(&topic).await.topics[0].topic_id;
    let by_id = commit.clone().with_topics(vec![
        txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
            .with_topic_id(id)
            .with_partitions(vec![
                txn_offset_commit_request::TxnOffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(1),
            ]),
    ]);
    let resp: TxnOffsetCommitResponse = raw.call(ApiKey::TxnOffsetCommit, 6, &by_id).await;
    assert_eq!(resp.topics[0].topic_id, id);
    assert_eq!(resp.topics[0].partitions[0].error_code, 47);
    assert_eq!(proxy.events(Kind::FencedEpoch).len(), 5);

    let values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 0);
    assert!(
        values.is_empty(),
        "nothing from the zombie was written: {values:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_are_refused_per_partition_and_the_rest_goes_through() {
    let proxy = start_proxy(Cluster::Single).await;
    let topic = unique_topic("bad-batches");
    create_topic(proxy.bootstrap(), &topic, 5, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let (pid, epoch) = init_producer_id(&mut raw, None).await;

    let good = batch(pid, epoch, 0, 2, false, "ok");
    let mut lying_length = batch(pid, epoch, 0, 2, false, "x").to_vec();
    lying_length[8..12].copy_from_slice(&5000i32.to_be_bytes());
    let mut count_mismatch = batch(pid, epoch, 0, 2, false, "x").to_vec();
    count_mismatch[57..61].copy_from_slice(&7i32.to_be_bytes());
    let mut negative_seq = batch(pid, epoch, 0, 1, false, "x").to_vec();
    negative_seq[53..57].copy_from_slice(&(-1i32).to_be_bytes());
    let mut control = batch(pid, epoch, 0, 1, false, "x").to_vec();
    control[22] |= 0x20;
    let req = produce(
        &topic,
        None,
        vec![
            (0, good),
            (1, Bytes::from(lying_length)),
            (2, Bytes::from(count_mismatch)),
            (3, Bytes::from(negative_seq)),
            (4, Bytes::from(control)),
        ],
    );
    let answer = send_produce(&mut raw, &req).await;
    let codes: Vec<(i32, i16)> = answer.iter().map(|a| (a.0, a.1)).collect();
    assert_eq!(
        codes,
        vec![(0, 0), (1, 87), (2, 87), (3, 87), (4, 87)],
        "{answer:?}"
    );
    assert_eq!(
        answer[0].2, 0,
        "the healthy partition was written at offset 0"
    );
    assert_eq!(proxy.events(Kind::InvalidBatch).len(), 4);
    // The connection carries on.
    let next = send_produce(
        &mut raw,
        &produce(
            &topic,
            None,
            vec![(0, batch(pid, epoch, 2, 1, false, "ok"))],
        ),
    )
    .await;
    assert_eq!(next, vec![(0, 0, 2, None)]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_idempotent_producer_with_lost_responses_writes_exactly_once() {
    // Every 5th of the first 40 produce responses is lost between proxy and client (each loss costs the
    // client a request timeout, so the count is bounded to keep the test short).
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let rule: DropRule = Arc::new(move |key, _| {
        if key != ApiKey::Produce as i16 {
            return false;
        }
        let n = s.fetch_add(1, Ordering::Relaxed);
        n % 5 == 4 && n < 40
    });
    let proxy = start_proxy_full(Cluster::Three, |_| {}, Some(rule)).await;
    let topic = unique_topic("rd-lossy");
    create_topic(proxy.bootstrap(), &topic, 3, 3).await;
    let bootstrap = proxy.bootstrap().to_string();
    let t = topic.clone();
    let delivered = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let mut cfg = client_config(&bootstrap);
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "50")
            .set("request.timeout.ms", "2000")
            .set("socket.timeout.ms", "2000")
            .set("message.timeout.ms", "120000")
            .set("retry.backoff.ms", "50");
        let p: ThreadedProducer<DefaultProducerContext> = cfg.create().unwrap();
        for i in 0..3000 {
            let v = format!("m-{i:05}");
            p.send(BaseRecord::to(&t).key(&v).payload(&v)).unwrap();
        }
        p.flush(Duration::from_secs(120))
            .expect("every record delivered");
        p.in_flight_count()
    })
    .await
    .unwrap();
    assert_eq!(delivered, 0);
    let mut values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 3000);
    assert_eq!(values.len(), 3000, "no record lost or duplicated");
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 3000);
    assert!(seen.load(Ordering::Relaxed) > 5, "responses were dropped");
    let answered = proxy.events(Kind::DuplicateAnswered).len();
    assert!(
        answered > 0,
        "retries were answered by the proxy with the original offsets"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_five_idempotent_requests_in_flight_are_audited() {
    let proxy = start_proxy(Cluster::Single).await;
    let topic = unique_topic("in-flight");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let (pid, epoch) = init_producer_id(&mut raw, None).await;
    // Five in flight is what idempotence allows: nothing to report.
    let mut sent = Vec::new();
    for seq in 0..5 {
        let (corr, bytes) = raw.encode(
            ApiKey::Produce,
            PRODUCE_VERSION,
            &produce(
                &topic,
                None,
                vec![(0, batch(pid, epoch, seq, 1, false, "f"))],
            ),
        );
        raw.send_bytes(&bytes).await;
        sent.push(corr);
    }
    for _ in 0..5 {
        raw.recv_frame().await.expect("answer");
    }
    assert!(proxy.events(Kind::TooManyInFlight).is_empty());
    // Seven at once (one write, so they are all read before any answer can come back): audited (once
    // for the connection), and every batch still lands in order.
    let mut burst = Vec::new();
    for seq in 5..12 {
        let (_, bytes) = raw.encode(
            ApiKey::Produce,
            PRODUCE_VERSION,
            &produce(
                &topic,
                None,
                vec![(0, batch(pid, epoch, seq, 1, false, "f"))],
            ),
        );
        burst.extend_from_slice(&bytes);
    }
    raw.send_bytes(&burst).await;
    for expected_offset in 5..12 {
        let frame = raw.recv_frame().await.expect("answer");
        let (_, resp): (_, ProduceResponse) = kafka_eos_proxy::protocol::codec::decode_response(
            frame,
            ApiKey::Produce,
            PRODUCE_VERSION,
        )
        .unwrap();
        let p = &resp.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, expected_offset));
    }
    let seen = proxy.events(Kind::TooManyInFlight);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].client_id.as_deref(), Some("raw-test"));
    assert!(seen[0]
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("in flight"));
    proxy.stop().await;
}

/// A Produce request naming one partition twice (batch A at sequence 0, batch B at sequence 1), then a
/// retry of A alone. The broker keeps only the last entry of a repeated partition and answers once; a
/// proxy that credited that answer to A answered the retry of A as a duplicate (error 0, B's offset)
/// and A was never written. Through the proxy, both answers must be what the broker gives directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_named_twice_gets_what_the_broker_gives() {
    let proxy = start_proxy(Cluster::Single).await;
    let direct = kafka(Cluster::Single);
    let mut seen = Vec::new();
    for (path, addr) in [
        ("direct", direct.split(',').next().unwrap().to_string()),
        ("proxy", format!("{PROXY_HOST}:{}", proxy.broker_port(1))),
    ] {
        let topic = unique_topic("repeated-partition");
        create_topic(proxy.bootstrap(), &topic, 1, 1).await;
        let mut raw = Raw::connect(&addr).await;
        let (pid, epoch) = init_producer_id(&mut raw, None).await;
        let a = batch(pid, epoch, 0, 1, false, "a");
        let b = batch(pid, epoch, 1, 1, false, "b");
        let both = send_produce(
            &mut raw,
            &produce(&topic, None, vec![(0, a.clone()), (0, b)]),
        )
        .await;
        let retry = send_produce(&mut raw, &produce(&topic, None, vec![(0, a)])).await;
        let codes = |r: &[(i32, i16, i64, Option<String>)]| {
            r.iter()
                .map(|(p, code, _, _)| (*p, *code))
                .collect::<Vec<_>>()
        };
        seen.push((path, codes(&both), codes(&retry)));
    }
    assert_eq!(
        (&seen[0].1, &seen[0].2),
        (&seen[1].1, &seen[1].2),
        "proxy answers differ from the broker's: {seen:?}"
    );
    assert_ne!(
        seen[1].2[0].1, 0,
        "the retry of A was answered as written: {seen:?}"
    );
    let flagged = proxy.events(Kind::DuplicatePartition);
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0].partition, Some(0));
    proxy.stop().await;
}

/// A producer pipelines three batches behind a gap. The broker answers 45 to all three (it never saw
/// the sequences in between); those are one anomaly: one `out_of_order_sequence` (the gap) and one
/// `out_of_order_cascade` (its echoes), in audit and enforce mode alike, where 40-70 events were
/// once written for a franz-go workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_of_one_gap_are_audited_once() {
    for mode in ["audit", "enforce"] {
        let proxy = start_in_mode(Cluster::Single, mode).await;
        let topic = unique_topic(&format!("cascade-{mode}"));
        create_topic(proxy.bootstrap(), &topic, 1, 1).await;
        let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
        let (pid, epoch) = init_producer_id(&mut raw, None).await;
        let ok = send_produce(
            &mut raw,
            &produce(
                &topic,
                None,
                vec![(0, batch(pid, epoch, 0, 10, false, "c"))],
            ),
        )
        .await;
        assert_eq!(ok[0].1, 0);
        // 10..14 never arrive; 15, 25 and 35 are pipelined.
        for seq in [15, 25, 35] {
            let req = produce(
                &topic,
                None,
                vec![(0, batch(pid, epoch, seq, 10, false, "c"))],
            );
            raw.send(ApiKey::Produce, PRODUCE_VERSION, &req).await;
        }
        for _ in 0..3 {
            let frame = raw.recv_frame().await.expect("answered");
            let (_, resp): (_, ProduceResponse) =
                kafka_eos_proxy::protocol::codec::decode_response(
                    frame,
                    ApiKey::Produce,
                    PRODUCE_VERSION,
                )
                .unwrap();
            assert_eq!(
                resp.responses[0].partition_responses[0].error_code, 45,
                "{mode}"
            );
        }
        let gaps = proxy.events(Kind::OutOfOrderSequence);
        let echoes = proxy.events(Kind::OutOfOrderCascade);
        assert_eq!(gaps.len(), 1, "{mode}: one gap: {gaps:?}");
        assert_eq!(gaps[0].received_sequence, Some(15));
        assert_eq!(echoes.len(), 1, "{mode}: its echoes once: {echoes:?}");
        assert_eq!(echoes[0].expected_sequence, Some(15), "points at the gap");
        let values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 10);
        assert_eq!(
            values.len(),
            10,
            "{mode}: nothing behind the gap was written"
        );
        proxy.stop().await;
    }
}

/// The partition's leader and one follower, as node ids, asked through the proxy.
async fn leader_and_follower(raw: &mut Raw, topic: &str) -> (i32, i32) {
    for _ in 0..50 {
        let resp = raw.topic_metadata(topic).await;
        if let Some(p) = resp.topics.first().and_then(|t| t.partitions.first()) {
            let leader = p.leader_id.0;
            if let Some(f) = p
                .replica_nodes
                .iter()
                .map(|n| n.0)
                .find(|n| *n != leader && leader >= 0)
            {
                return (leader, f);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no leader for {topic}");
}

/// A batch refused with a retriable error (here NOT_LEADER_OR_FOLLOWER: sent to a follower; with
/// transactions v2 the observed case was CONCURRENT_TRANSACTIONS on a new transaction's first batch),
/// and the next batch sent before the client retried the first. The proxy used to judge the second a
/// gap (or "a new epoch must start at sequence 0") and, in enforce mode, refused it itself. It now goes
/// to the broker, whose 45 is recorded as an echo of the first failure, and the retries land exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_behind_a_retriable_failure_is_left_to_the_broker() {
    let proxy = start_in_mode(Cluster::Three, "enforce").await;
    let topic = unique_topic("behind-retriable");
    create_topic(proxy.bootstrap(), &topic, 1, 3).await;
    let mut boot = Raw::connect(proxy.bootstrap()).await;
    let (leader, follower) = leader_and_follower(&mut boot, &topic).await;
    let mut to_leader = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(leader))).await;
    let mut to_follower =
        Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(follower))).await;
    let (pid, e) = init_producer_id(&mut to_leader, None).await;
    let send = |seq: i32, epoch: i16| {
        produce(
            &topic,
            None,
            vec![(0, batch(pid, epoch, seq, 10, false, "r"))],
        )
    };
    assert_eq!(send_produce(&mut to_leader, &send(0, e)).await[0].1, 0);

    for (first, behind, epoch) in [(10, 20, e), (0, 10, e + 1)] {
        // The first batch fails with a retriable error; the one behind it is sent before the retry.
        let failed = send_produce(&mut to_follower, &send(first, epoch)).await;
        assert_eq!(failed[0].1, 6, "NOT_LEADER_OR_FOLLOWER: {failed:?}");
        let echo = send_produce(&mut to_leader, &send(behind, epoch)).await;
        assert_eq!(echo[0].1, 45, "the broker's own answer: {echo:?}");
        assert!(
            !echo[0]
                .3
                .as_deref()
                .unwrap_or("")
                .contains("kafka-eos-proxy"),
            "not refused by the proxy: {echo:?}"
        );
        // The client retries in order: both land.
        assert_eq!(
            send_produce(&mut to_leader, &send(first, epoch)).await[0].1,
            0
        );
        assert_eq!(
            send_produce(&mut to_leader, &send(behind, epoch)).await[0].1,
            0
        );
    }
    let gaps = proxy.events(Kind::OutOfOrderSequence);
    assert!(gaps.is_empty(), "no gap anywhere: {gaps:?}");
    assert_eq!(proxy.events(Kind::OutOfOrderCascade).len(), 2);
    // 0..29 at the first epoch, 0..19 at the next: each batch once.
    let values = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 50);
    assert_eq!(values.len(), 50, "every batch exactly once");
    proxy.stop().await;
}

/// A topic deleted and created again under its name starts with no producer state at the proxy: a batch
/// the old topic acknowledged is written to the new one (the broker's offset), never answered from the
/// old topic's window with the old offset. The proxy learns of the new topic from the Metadata answer a
/// client gets (here the raw client asks, as a client does when its writes fail during the deletion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_starts_without_the_old_ones_state() {
    let proxy = start_proxy(Cluster::Single).await;
    let topic = unique_topic("recreated");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let first_id = raw.topic_metadata(&topic).await.topics[0].topic_id;
    // Three plain records first (one batch each: plain records carry no sequence to chain them), so
    // the idempotent batch lands at offset 3.
    for offset in 0..3 {
        let plain = send_produce(
            &mut raw,
            &produce(
                &topic,
                None,
                vec![(0, batch(-1, -1, -1, 1, false, "plain"))],
            ),
        )
        .await;
        assert_eq!(plain, vec![(0, 0, offset, None)]);
    }
    let (pid, epoch) = init_producer_id(&mut raw, None).await;
    let req = produce(&topic, None, vec![(0, batch(pid, epoch, 0, 2, false, "r"))]);
    assert_eq!(send_produce(&mut raw, &req).await, vec![(0, 0, 3, None)]);
    assert_eq!(
        send_produce(&mut raw, &req).await,
        vec![(0, 0, 3, None)],
        "a retry on the old topic is answered with its offset"
    );

    let new_id = recreate_topic(proxy.bootstrap(), &topic, &mut raw, first_id).await;
    assert_ne!(new_id, first_id, "the new topic has a new id");
    let mut again = Vec::new();
    for _ in 0..50 {
        again = send_produce(&mut raw, &req).await;
        if again[0].1 != 3 && again[0].1 != 6 {
            break; // not UNKNOWN_TOPIC_OR_PARTITION / NOT_LEADER while the new topic settles
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        again,
        vec![(0, 0, 0, None)],
        "written to the new topic at its first offset, not answered with the old topic's offset 3"
    );
    proxy.stop().await;
}

/// Deletes `topic` and creates it again (one partition) through `bootstrap`; returns the new topic id
/// once `raw` sees it with a leader.
async fn recreate_topic(
    bootstrap: &str,
    topic: &str,
    raw: &mut Raw,
    old_id: uuid::Uuid,
) -> uuid::Uuid {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        client_config(bootstrap).create().expect("admin");
    admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete");
    // The name is free once the deletion is through.
    let mut created = false;
    for _ in 0..100 {
        let r = admin
            .create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create_topics");
        if r.iter().all(|r| r.is_ok()) {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(created, "the topic was created again");
    let mut new_id = old_id;
    for _ in 0..100 {
        let md = raw.topic_metadata(topic).await;
        if md.topics[0].error_code == 0 && md.topics[0].topic_id != old_id {
            new_id = md.topics[0].topic_id;
            if md.topics[0].partitions.iter().all(|p| p.leader_id.0 >= 0) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    new_id
}

/// Produce v13 names topics by id. The proxy names an id no Metadata answer taught it by asking the
/// cluster, keeps producer state for it as for a name, and a new id under an old name (the topic
/// deleted and created again, learned only from the produce request itself) drops the old state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_by_topic_id_is_tracked_and_a_new_id_for_a_name_drops_the_old_state() {
    if broker_max_version(Cluster::Single, ApiKey::Produce).await < 13 {
        eprintln!("skipped: this Kafka release has no Produce v13");
        return;
    }
    let proxy = start_proxy(Cluster::Single).await;
    let direct = kafka(Cluster::Single);
    let topic = unique_topic("by-id");
    // Created, described and re-created on the broker directly: no Metadata answer through the proxy
    // ever names the topic, so every id reaches the proxy first in a produce request.
    create_topic(&direct, &topic, 1, 1).await;
    let mut broker = Raw::connect(&direct).await;
    let first_id = broker.topic_metadata(&topic).await.topics[0].topic_id;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    for offset in 0..3 {
        let plain = by_id(
            produce(
                &topic,
                None,
                vec![(0, batch(-1, -1, -1, 1, false, "plain"))],
            ),
            first_id,
        );
        assert_eq!(
            send_produce_v(&mut raw, &plain, 13).await,
            vec![(0, 0, offset, None)]
        );
    }
    let (pid, epoch) = init_producer_id(&mut raw, None).await;
    let req = produce(&topic, None, vec![(0, batch(pid, epoch, 0, 2, false, "r"))]);
    let old = by_id(req.clone(), first_id);
    assert_eq!(
        send_produce_v(&mut raw, &old, 13).await,
        vec![(0, 0, 3, None)]
    );
    assert_eq!(
        send_produce_v(&mut raw, &old, 13).await,
        vec![(0, 0, 3, None)]
    );
    let answered = proxy.events(Kind::DuplicateAnswered);
    assert_eq!(answered.len(), 1, "the v13 retry was answered by the proxy");
    assert_eq!(answered[0].topic.as_deref(), Some(topic.as_str()));

    let new_id = recreate_topic(&direct, &topic, &mut broker, first_id).await;
    assert_ne!(new_id, first_id, "the new topic has a new id");
    let new = by_id(req, new_id);
    let mut again = Vec::new();
    for _ in 0..50 {
        again = send_produce_v(&mut raw, &new, 13).await;
        if ![3, 6, 100].contains(&again[0].1) {
            break; // not UNKNOWN_TOPIC_OR_PARTITION / NOT_LEADER / UNKNOWN_TOPIC_ID while it settles
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        again,
        vec![(0, 0, 0, None)],
        "written to the new topic at its first offset, not answered with the old topic's offset 3"
    );
    assert!(proxy.events(Kind::UnknownTopicId).is_empty());
    proxy.stop().await;
}

/// A topic id the cluster does not know: the broker's own answer (UNKNOWN_TOPIC_ID) reaches the
/// client as on a direct connection, the proxy refuses nothing, and audits the id once per lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_id_nobody_knows_gets_the_brokers_answer_and_is_audited_once() {
    if broker_max_version(Cluster::Single, ApiKey::Produce).await < 13 {
        eprintln!("skipped: this Kafka release has no Produce v13");
        return;
    }
    let proxy = start_proxy(Cluster::Single).await;
    let id = uuid::Uuid::from_bytes(*b"made-up-topic-id");
    let (pid, epoch) = {
        let mut raw = Raw::connect(&kafka(Cluster::Single)).await;
        init_producer_id(&mut raw, None).await
    };
    let req = by_id(
        produce(
            "ignored",
            None,
            vec![(0, batch(pid, epoch, 0, 1, false, "u"))],
        ),
        id,
    );
    let mut direct = Raw::connect(&kafka(Cluster::Single)).await;
    let expected = send_produce_v(&mut direct, &req, 13).await;
    assert_eq!(expected[0].1, 100, "UNKNOWN_TOPIC_ID, directly");
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    for _ in 0..3 {
        assert_eq!(send_produce_v(&mut raw, &req, 13).await, expected);
    }
    let audited = proxy.events(Kind::UnknownTopicId);
    assert_eq!(
        audited.len(),
        1,
        "once per lookup, not per request: {audited:?}"
    );
    assert_eq!(audited[0].topic.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(audited[0].action, Action::Forwarded);
    proxy.stop().await;
}

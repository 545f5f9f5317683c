//! The idempotence upgrade (issue #15): `produce.idempotence: upgrade` sends the batches of a client
//! without idempotence upstream as an idempotent producer's (a producer id the proxy obtained,
//! per-partition sequences, acks=all), so that neither a lost answer nor a broken connection makes
//! its retry a duplicate. Counted against real Kafka with librdkafka and kafka-clients 4.4, each
//! against the direct path under the same faults.

use crate::common::*;
use crate::content::{lossy_relay, produce_rounds, Fault, LostAnswers, RELAY_PORT};
use crate::producer_state::{batch, produce, send_produce};
use crate::rdkafka_clients::create_topic;
use crate::wire::Raw;
use kafka_eos_proxy::audit::{Action, Kind};
use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader};
use kafka_protocol::protocol::Decodable;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

const UPGRADE: &str = r#"
policies:
  - name: upgrade
    match: { topics: { prefix: ["upgrade-", "java-upgrade"] } }
    produce: { idempotence: upgrade }
"#;

/// Every batch of the Produce requests the proxy sent upstream: (acks, producer id, epoch, base
/// sequence, record count).
fn upstream_batches(proxy: &TestProxy) -> Vec<(i16, i64, i16, i32, i32)> {
    let frames = proxy.upstream_frames.lock().unwrap().clone();
    let mut out = Vec::new();
    for f in frames {
        let mut body = f.slice(4..);
        let version = i16::from_be_bytes([f[6], f[7]]);
        let header_version = ApiKey::Produce.request_header_version(version);
        RequestHeader::decode(&mut body, header_version).expect("header");
        let req = ProduceRequest::decode(&mut body, version).expect("produce");
        for t in &req.topic_data {
            for p in &t.partition_data {
                let Some(r) = &p.records else { continue };
                let be = |a: usize, n: usize| &r[a..a + n];
                out.push((
                    req.acks,
                    i64::from_be_bytes(be(43, 8).try_into().unwrap()),
                    i16::from_be_bytes(be(51, 2).try_into().unwrap()),
                    i32::from_be_bytes(be(53, 4).try_into().unwrap()),
                    i32::from_be_bytes(be(57, 4).try_into().unwrap()),
                ));
            }
        }
    }
    out
}

/// The same faults inside the proxy: the break hook sees every Produce answer first (a reset: the
/// proxy never reads it); the drop hook loses a lost one after the proxy read it.
fn proxy_faults(faults: LostAnswers) -> (DropRule, BreakRule) {
    let pending: Arc<std::sync::Mutex<Option<Fault>>> = Arc::default();
    let p2 = pending.clone();
    let brk: BreakRule = Arc::new(move |key| {
        if key != 0 {
            return false;
        }
        let f = faults.next();
        *p2.lock().unwrap() = Some(f);
        f == Fault::Reset
    });
    let drop: DropRule =
        Arc::new(move |key, _| key == 0 && pending.lock().unwrap().take() == Some(Fault::Lose));
    (drop, brk)
}

/// A proxy upgrading the test topics' producers, with `faults` applied to its Produce answers.
async fn upgrading_proxy(cluster: Cluster, faults: LostAnswers) -> TestProxy {
    let (drop, brk) = proxy_faults(faults);
    let p = crate::policies::policies(UPGRADE);
    start_proxy_faulty(
        cluster,
        move |c| c.policies = p.clone(),
        Some(drop),
        Some(brk),
    )
    .await
}

/// The issue's proof for librdkafka without idempotence, acks=1 and acks=all: the 2nd Produce answer
/// is lost after the append, the 4th is lost with its connection. Direct (a relay doing exactly
/// that), the retries are written again. Through the upgrading proxy (the 2nd answer read and then
/// lost on the way to the client; the 4th never read: the proxy's broker connection breaks), every
/// record is written once: the first retry is answered from the content window, the second is sent
/// again under the stamp its first attempt had, and the broker deduplicates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_without_idempotence_is_written_once_through_the_upgrade() {
    kafka(Cluster::Single);
    let _relay_port = RELAY_PORT.lock().await;
    let rounds = 6;
    let expected: BTreeSet<String> = (0..rounds)
        .flat_map(|r| (0..20).map(move |i| format!("r{r}-{i}")))
        .collect();
    for acks in ["1", "all"] {
        let relay = lossy_relay(LostAnswers::with_resets(&[2], &[4])).await;
        let topic = unique_topic("upgrade-direct");
        create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
        let direct = produce_rounds("127.0.0.1:19095", &topic, acks, rounds).await;
        relay.abort();
        let duplicates = direct.len() - expected.len();
        assert!(
            duplicates > 0,
            "acks={acks}: direct, retries after lost answers and resets are written twice"
        );
        assert_eq!(direct.iter().cloned().collect::<BTreeSet<_>>(), expected);

        let proxy = upgrading_proxy(Cluster::Single, LostAnswers::with_resets(&[2], &[4])).await;
        let topic = unique_topic("upgrade-rdkafka");
        create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
        let through = produce_rounds(proxy.bootstrap(), &topic, acks, rounds).await;
        assert_eq!(
            through.iter().cloned().collect::<BTreeSet<_>>(),
            expected,
            "acks={acks}: nothing lost"
        );
        assert_eq!(
            through.len(),
            expected.len(),
            "acks={acks}: through the proxy every record once (direct: {duplicates} duplicates)"
        );
        let upstream = upstream_batches(&proxy);
        assert!(
            upstream.iter().all(|b| b.0 == -1 && b.1 >= 0),
            "acks={acks}: every batch went upstream idempotent with acks=all: {upstream:?}"
        );
        let stamps: Vec<_> = upstream.iter().map(|b| (b.1, b.2, b.3)).collect();
        let distinct: BTreeSet<_> = stamps.iter().collect();
        assert!(
            distinct.len() < stamps.len(),
            "acks={acks}: the batch whose answer was never read went again under its own stamp: \
             {upstream:?}"
        );
        assert_eq!(proxy.events(Kind::ProducerUpgraded).len(), 1);
        let answered = proxy
            .events(Kind::DuplicateContent)
            .iter()
            .filter(|e| e.action == Action::Answered)
            .count();
        assert!(
            answered >= 1,
            "acks={acks}: the lost answer's retry answered"
        );
        eprintln!(
            "acks={acks}: librdkafka direct {} records for {} sent ({duplicates} duplicates), \
             through the upgrading proxy {}",
            direct.len(),
            expected.len(),
            through.len()
        );
        proxy.stop().await;
    }
}

/// The same with kafka-clients 4.4 without idempotence: duplicates direct, every record once through
/// the upgrading proxy, every batch upstream idempotent with acks=all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_without_idempotence_is_written_once_through_the_upgrade() {
    crate::content::java_plain_retries(
        || LostAnswers::with_resets(&[2], &[4]),
        &UPGRADE.replace("java-upgrade", "java-plain-retries"),
        |faults| {
            let (drop, brk) = proxy_faults(faults);
            (drop, Some(brk))
        },
        |proxy, acks| {
            let upstream = upstream_batches(proxy);
            assert!(
                upstream.iter().all(|b| b.0 == -1 && b.1 >= 0),
                "acks={acks}: {upstream:?}"
            );
        },
    )
    .await;
}

/// On the wire: a client without idempotence gets one producer id for all its connections, its
/// sequences follow across them, a batch the broker refuses makes the partition start again at the
/// sequence after the last written one, and the producer-id rate policy bounds the ids the proxy
/// obtains for clients that keep changing their identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_sequences_follow_across_connections_and_recover_from_a_refusal() {
    let proxy = crate::policies::start_with_policies(
        r#"
policies:
  - name: upgrade
    match: { topics: { prefix: ["upgrade-"] } }
    produce: { idempotence: upgrade }
  - name: few-ids
    producers: { new_producer_ids_per_minute: { limit: 1, action: reject } }
"#,
    )
    .await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let topic = unique_topic("upgrade-wire");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    // One record a batch: the test kit's encoder makes one batch per record without a producer id.
    let plain = |tag: &str| produce(&topic, None, vec![(0, batch(-1, -1, -1, 1, false, tag))]);

    let mut first = Raw::connect_as(&node, "app").await;
    assert_eq!(
        send_produce(&mut first, &plain("a")).await,
        vec![(0, 0, 0, None)]
    );
    let mut second = Raw::connect_as(&node, "app").await;
    assert_eq!(
        send_produce(&mut second, &plain("b")).await,
        vec![(0, 0, 1, None)]
    );

    // A batch the broker refuses (too large for the topic): not written, the partition goes on at
    // the sequence after the last written batch, and the next batch is written.
    let mut big = produce(
        &topic,
        None,
        vec![(
            0,
            kafka_eos_proxy::testkit::record_batch_sized(-1, -1, -1, 1, 2_000_000),
        )],
    );
    big.timeout_ms = 10_000;
    let refused = send_produce(&mut first, &big).await;
    assert_eq!(refused[0].1, 10, "MESSAGE_TOO_LARGE: {refused:?}");
    assert_eq!(
        send_produce(&mut first, &plain("c")).await,
        vec![(0, 0, 2, None)]
    );

    let upstream = upstream_batches(&proxy);
    let pids: BTreeSet<i64> = upstream.iter().map(|b| b.1).collect();
    assert_eq!(
        pids.len(),
        1,
        "one producer id for the client: {upstream:?}"
    );
    let seqs: Vec<(i16, i32)> = upstream.iter().map(|b| (b.2, b.3)).collect();
    assert_eq!(
        seqs,
        vec![(0, 0), (0, 1), (0, 2), (0, 2)],
        "sequences follow across connections; after the refusal the partition starts again at 2"
    );
    assert_eq!(proxy.events(Kind::UpgradeResequenced).len(), 1);

    // Another client id: a second producer id would exceed the rate policy's 1 per minute for the
    // address, so its batch is held back with a retriable error and nothing is written.
    let mut other = Raw::connect_as(&node, "other-app").await;
    let held = send_produce(&mut other, &plain("d")).await;
    assert_eq!(held[0].1, 19, "NOT_ENOUGH_REPLICAS, retriable: {held:?}");
    assert!(
        held[0].3.as_deref().unwrap_or("").contains("per minute"),
        "{held:?}"
    );
    assert_eq!(crate::content::end_offset(&topic, 0).await, 3);
    proxy.stop().await;
}

/// Producers that are idempotent or transactional already are never touched by the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_and_transactional_producers_are_left_alone() {
    let proxy = crate::policies::start_with_policies(UPGRADE).await;
    let node = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let topic = unique_topic("upgrade-idem");
    create_topic(&kafka(Cluster::Single), &topic, 1, 1).await;
    let mut raw = Raw::connect_as(&node, "app").await;
    let (pid, epoch) = crate::producer_state::init_producer_id(&mut raw, None).await;
    let req = produce(&topic, None, vec![(0, batch(pid, epoch, 0, 2, false, "i"))]);
    assert_eq!(send_produce(&mut raw, &req).await, vec![(0, 0, 0, None)]);
    // Pipelined: five requests in flight go upstream in the order the client sent them.
    for seq in (2..12).step_by(2) {
        let req = produce(
            &topic,
            None,
            vec![(0, batch(pid, epoch, seq, 2, false, "i"))],
        );
        raw.send(
            ApiKey::Produce,
            crate::producer_state::PRODUCE_VERSION,
            &req,
        )
        .await;
    }
    for _ in 0..5 {
        raw.recv_frame().await.expect("answered");
    }
    // A transactional producer.
    let txn = unique_topic("upgrade-txn");
    let (tpid, te) = crate::producer_state::init_producer_id(&mut raw, Some(&txn)).await;
    assert_eq!(
        crate::producer_state::add_partitions(&mut raw, &txn, (tpid, te), &topic, 0).await,
        0
    );
    let treq = produce(
        &topic,
        Some(&txn),
        vec![(0, batch(tpid, te, 0, 1, true, "t"))],
    );
    assert_eq!(send_produce(&mut raw, &treq).await[0].1, 0);
    let upstream = upstream_batches(&proxy);
    assert_eq!(
        upstream,
        vec![
            (-1, pid, epoch, 0, 2),
            (-1, pid, epoch, 2, 2),
            (-1, pid, epoch, 4, 2),
            (-1, pid, epoch, 6, 2),
            (-1, pid, epoch, 8, 2),
            (-1, pid, epoch, 10, 2),
            (-1, tpid, te, 0, 1)
        ],
        "sent as the clients stamped them, in their order"
    );
    assert!(proxy.events(Kind::ProducerUpgraded).is_empty());
    proxy.stop().await;
}

/// Batches the upgrade cannot restamp (a length that lies, a control batch from a client) are answered
/// with the broker's own errors for them, and nothing is stamped or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_cannot_be_restamped_are_refused_as_the_broker_refuses_them() {
    let proxy = crate::policies::start_with_policies(UPGRADE).await;
    let topic = unique_topic("upgrade-bad");
    create_topic(&kafka(Cluster::Single), &topic, 2, 1).await;
    let mut lying = batch(-1, -1, -1, 1, false, "x").to_vec();
    lying[8..12].copy_from_slice(&5000i32.to_be_bytes());
    let mut control = batch(-1, -1, -1, 1, false, "c").to_vec();
    control[22] |= 0x20;
    let crc = crc32c::crc32c(&control[21..]);
    control[17..21].copy_from_slice(&crc.to_be_bytes());
    let req = produce(
        &topic,
        None,
        vec![
            (0, bytes::Bytes::from(lying)),
            (1, bytes::Bytes::from(control)),
        ],
    );
    let codes = |answer: Vec<(i32, i16, i64, Option<String>)>| -> Vec<(i32, i16)> {
        answer.iter().map(|a| (a.0, a.1)).collect()
    };
    let mut direct = Raw::connect(&kafka(Cluster::Single)).await;
    let broker = codes(send_produce(&mut direct, &req).await);
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let through = codes(send_produce(&mut raw, &req).await);
    assert_eq!(through, broker, "the broker's own errors");
    assert!(through.iter().all(|c| c.1 != 0), "{through:?}");
    assert!(
        upstream_batches(&proxy).iter().all(|b| b.1 < 0),
        "nothing stamped"
    );
    assert_eq!(crate::content::end_offset(&topic, 0).await, 0);
    assert_eq!(crate::content::end_offset(&topic, 1).await, 0);
    proxy.stop().await;
}

/// A broker bounce under the upgrade: librdkafka without idempotence writes 6 rounds of 20 records to a
/// partition on a broker that is stopped (a controlled shutdown) and started again on its data while
/// the rounds go on, and one Produce answer is lost after the append, one with its connection. Through
/// the upgrading proxy every record is in the topic once (the broker keeps the upgraded producer's
/// state across its restart, so a retry re-sent under its stamp is deduplicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_without_idempotence_is_written_once_across_a_broker_bounce() {
    // One replica: the partition is offline while its broker restarts.
    written_once_across_a_bounce(3, &[3]).await;
}

/// The same when the partition's leader moves: replicas on a new broker and on node 1, the new one
/// leading; its controlled shutdown hands the leadership to node 1 while the rounds go on. The
/// client's batches move to another broker connection, and the upgraded producer's sequences go on
/// there under the same producer id (the new leader has its state from the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_without_idempotence_is_written_once_when_the_leader_moves() {
    let proxy = written_once_across_a_bounce(4, &[4, 1]).await;
    let pids: BTreeSet<i64> = upstream_batches(&proxy).iter().map(|b| b.1).collect();
    assert_eq!(
        pids.len(),
        1,
        "one upgraded producer on both leaders: {pids:?}"
    );
    proxy.stop().await;
}

/// Adds broker `node` to the dynamic cluster, writes the rounds to a topic on `replicas` (the first
/// leads) through an upgrading proxy while `node` is bounced, checks every record is there once and,
/// where another replica could take over, that the leadership moved; the proxy is returned running.
async fn written_once_across_a_bounce(node: i32, replicas: &'static [i32]) -> TestProxy {
    let direct = kafka(Cluster::Dynamic);
    let id = node.to_string();
    let i2 = id.clone();
    tokio::task::spawn_blocking(move || kafka_script(&["add-broker", "dynamic", &i2]))
        .await
        .unwrap();
    let proxy = upgrading_proxy(Cluster::Dynamic, LostAnswers::with_resets(&[2], &[5])).await;
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    eventually(
        &format!("a listener for node {node}"),
        Duration::from_secs(30),
        || {
            let s = shared.clone();
            async move { s.brokers.proxy_port(node).is_some() }
        },
    )
    .await;
    let topic = unique_topic("upgrade-bounce");
    crate::brokers::create_on(&direct, &topic, replicas).await;
    let (bs, t, i2) = (proxy.bootstrap().to_string(), topic.clone(), id.clone());
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> =
            crate::rdkafka_clients::client_config(&bs)
                .set("enable.idempotence", "false")
                .set("acks", "all")
                .set("linger.ms", "50")
                .set("socket.timeout.ms", "2000")
                .set("message.timeout.ms", "120000")
                .set("retry.backoff.ms", "100")
                .create()
                .expect("producer");
        let mut bounce = None;
        for r in 0..6 {
            if r == 2 {
                let i3 = i2.clone();
                bounce = Some(std::thread::spawn(move || {
                    kafka_script(&["restart-broker", "dynamic", &i3])
                }));
            }
            for i in 0..20 {
                let value = format!("b{r}-{i}");
                producer
                    .send(BaseRecord::<(), str>::to(&t).payload(&value))
                    .expect("queued");
            }
            producer.flush(Duration::from_secs(120)).expect("delivered");
        }
        bounce.map(|b| b.join().expect("bounce"));
    })
    .await
    .expect("producer task");
    let (d, t) = (direct.clone(), topic.clone());
    let (got, leader) = tokio::task::spawn_blocking(move || {
        let got = crate::rdkafka_clients::read_all(&d, &t, "read_uncommitted", 120);
        (got, crate::brokers::leader_of(&d, &t))
    })
    .await
    .unwrap();
    let distinct: BTreeSet<&String> = got.iter().collect();
    tokio::task::spawn_blocking(move || kafka_script(&["remove-broker", "dynamic", &id]))
        .await
        .unwrap();
    assert_eq!(distinct.len(), 120, "nothing lost");
    assert_eq!(got.len(), 120, "every record once across the bounce");
    if replicas.len() > 1 {
        // The dynamic cluster never moves a leader back by itself: the one that took over still leads.
        assert_eq!(
            leader, replicas[1],
            "the leadership moved during the rounds"
        );
    }
    eprintln!(
        "broker bounce (replicas {replicas:?}): {} records for 120 through the upgrading proxy; {} \
         restarts audited",
        got.len(),
        proxy.events(Kind::UpgradeResequenced).len()
    );
    proxy
}

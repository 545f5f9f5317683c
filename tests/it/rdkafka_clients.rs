//! librdkafka (through the `rdkafka` crate) against real Kafka, through the proxy.

use crate::common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, FutureProducer, FutureRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("socket.timeout.ms", "20000")
        .set("topic.metadata.refresh.interval.ms", "5000");
    c
}

pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32, rf: i32) {
    let admin: AdminClient<DefaultClientContext> =
        client_config(bootstrap).create().expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(rf),
            )],
            &AdminOptions::new().operation_timeout(Some(T)),
        )
        .await
        .expect("create_topics");
    for r in res {
        r.expect("topic created");
    }
    wait_until_leaders_serve(bootstrap, topic, partitions).await;
}

/// A created topic is not yet writable: the controller has accepted it, but a broker may still answer
/// NOT_LEADER_OR_FOLLOWER or UNKNOWN_TOPIC_OR_PARTITION while it applies the new metadata (its metadata
/// cache is updated before its replica manager). Tests that write with raw requests (no client retries)
/// would see that error, so wait until every partition's leader answers a ListOffsets.
async fn wait_until_leaders_serve(bootstrap: &str, topic: &str, partitions: i32) {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&bootstrap)
            .set("group.id", "create-topic-wait")
            .create()
            .expect("metadata client");
        let deadline = Instant::now() + T;
        for partition in 0..partitions {
            loop {
                let short = Duration::from_secs(2);
                match consumer.fetch_watermarks(&topic, partition, short) {
                    Ok(_) => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("{topic}/{partition} not served yet: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("{topic}/{partition} has no serving leader after {T:?}: {e}"),
                }
            }
        }
    })
    .await
    .expect("leader wait");
}

pub async fn produce_values(
    bootstrap: &str,
    topic: &str,
    values: &[String],
    extra: &[(&str, &str)],
) {
    let mut cfg = client_config(bootstrap);
    cfg.set("acks", "all").set("linger.ms", "5");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    let producer: FutureProducer = cfg.create().expect("producer");
    let futures: Vec<_> = values
        .iter()
        .map(|v| {
            let p = producer.clone();
            let topic = topic.to_string();
            let v = v.clone();
            async move {
                p.send(FutureRecord::to(&topic).key(&v).payload(&v), T)
                    .await
                    .map_err(|(e, _)| e)
            }
        })
        .collect();
    for r in futures::future::join_all(futures).await {
        r.expect("delivered");
    }
}

/// Reads every record of `topic` from the beginning until `expected` records were seen and every
/// partition reported its end; returns the values (in partition order). Records beyond `expected` are
/// returned too, so duplicates show up.
pub fn read_all(bootstrap: &str, topic: &str, isolation: &str, expected: usize) -> Vec<String> {
    let mut cfg = client_config(bootstrap);
    // Should the consumer's position ever be reset, it goes back to the beginning: librdkafka's
    // default, latest, would skip records and make a count look short.
    cfg.set("group.id", unique_topic("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation);
    let consumer: BaseConsumer = cfg.create().expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), T).expect("metadata");
    let partitions = md.topics()[0].partitions().len();
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    let mut values = Vec::new();
    let mut at_end = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                values.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("consume error: {e}"),
            None => {}
        }
        if values.len() >= expected && at_end.len() == partitions {
            break;
        }
    }
    values
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume() {
    let proxy = start_proxy(Cluster::Single).await;
    let topic = unique_topic("rd-basic");
    create_topic(proxy.bootstrap(), &topic, 3, 1).await;
    let values = numbered("v", 300);
    produce_values(proxy.bootstrap(), &topic, &values, &[]).await;
    let got = read_all(proxy.bootstrap(), &topic, "read_uncommitted", values.len());
    assert_eq!(sorted(got), sorted(values));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_names_only_proxy_addresses() {
    let proxy = start_proxy(Cluster::Three).await;
    let topic = unique_topic("rd-admin");
    create_topic(proxy.bootstrap(), &topic, 6, 3).await;
    let consumer: BaseConsumer = client_config(proxy.bootstrap()).create().unwrap();
    let md = consumer.fetch_metadata(Some(&topic), T).expect("metadata");
    let brokers: Vec<(i32, String, i32)> = md
        .brokers()
        .iter()
        .map(|b| (b.id(), b.host().to_string(), b.port()))
        .collect();
    assert_eq!(brokers.len(), 3, "{brokers:?}");
    for (id, host, port) in &brokers {
        assert_eq!(host, PROXY_HOST);
        assert_eq!(*port, i32::from(proxy.broker_port(*id)), "node {id}");
    }
    let t = &md.topics()[0];
    assert_eq!(t.name(), topic);
    assert_eq!(t.partitions().len(), 6);
    for p in t.partitions() {
        assert_eq!(p.replicas().len(), 3);
        assert!(p.leader() >= 1 && p.leader() <= 3);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_writes_each_record_once() {
    let proxy = start_proxy(Cluster::Three).await;
    let topic = unique_topic("rd-idem");
    create_topic(proxy.bootstrap(), &topic, 3, 3).await;
    let values = numbered("i", 2000);
    produce_values(
        proxy.bootstrap(),
        &topic,
        &values,
        &[
            ("enable.idempotence", "true"),
            ("max.in.flight.requests.per.connection", "5"),
        ],
    )
    .await;
    let got = read_all(proxy.bootstrap(), &topic, "read_uncommitted", values.len());
    assert_eq!(got.len(), values.len(), "duplicates or losses");
    assert_eq!(sorted(got), sorted(values));
    proxy.stop().await;
}

fn transactional_producer(
    bootstrap: &str,
    txn_id: &str,
) -> ThreadedProducer<DefaultProducerContext> {
    let mut cfg = client_config(bootstrap);
    cfg.set("transactional.id", txn_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("transaction.timeout.ms", "30000");
    let p: ThreadedProducer<DefaultProducerContext> = cfg.create().expect("txn producer");
    p.init_transactions(T).expect("init_transactions");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_and_abort() {
    let proxy = start_proxy(Cluster::Three).await;
    let topic = unique_topic("rd-txn");
    create_topic(proxy.bootstrap(), &topic, 2, 3).await;
    let bootstrap = proxy.bootstrap().to_string();
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        let p = transactional_producer(&bootstrap, &unique_topic("rd-txn-id"));
        p.begin_transaction().unwrap();
        for v in numbered("committed", 20) {
            p.send(BaseRecord::to(&t).key(&v).payload(&v)).unwrap();
        }
        p.commit_transaction(T).expect("commit");
        p.begin_transaction().unwrap();
        for v in numbered("aborted", 15) {
            p.send(BaseRecord::to(&t).key(&v).payload(&v)).unwrap();
        }
        p.flush(T).unwrap();
        p.abort_transaction(T).expect("abort");
    })
    .await
    .unwrap();
    let committed = read_all(proxy.bootstrap(), &topic, "read_committed", 20);
    assert_eq!(sorted(committed), numbered("committed", 20));
    // The aborted records were written (read_uncommitted sees them): the abort did its job, not a no-op.
    let all = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 35);
    assert_eq!(all.len(), 35);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_transform_produce_with_offsets_in_the_transaction() {
    let proxy = start_proxy(Cluster::Three).await;
    let input = unique_topic("rd-ctp-in");
    let output = unique_topic("rd-ctp-out");
    create_topic(proxy.bootstrap(), &input, 3, 3).await;
    create_topic(proxy.bootstrap(), &output, 3, 3).await;
    let values = numbered("in", 90);
    produce_values(proxy.bootstrap(), &input, &values, &[]).await;
    let group = unique_topic("rd-ctp-group");
    let bootstrap = proxy.bootstrap().to_string();
    let (inp, out, grp) = (input.clone(), output.clone(), group.clone());
    let committed_offsets = tokio::task::spawn_blocking(move || {
        let mut cfg = client_config(&bootstrap);
        cfg.set("group.id", &grp)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed");
        let consumer: BaseConsumer = cfg.create().unwrap();
        consumer.subscribe(&[&inp]).unwrap();
        let producer = transactional_producer(&bootstrap, &unique_topic("rd-ctp-txn"));
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        while done < 90 && Instant::now() < deadline {
            let mut batch = Vec::new();
            while let Some(m) = consumer.poll(Duration::from_millis(300)) {
                let m = m.expect("consume");
                batch.push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
                if batch.len() >= 20 {
                    break;
                }
            }
            if batch.is_empty() {
                continue;
            }
            producer.begin_transaction().unwrap();
            for v in &batch {
                let t = v.replace("in-", "out-");
                producer
                    .send(BaseRecord::to(&out).key(&t).payload(&t))
                    .unwrap();
            }
            let positions = consumer.position().unwrap();
            producer
                .send_offsets_to_transaction(&positions, &consumer.group_metadata().unwrap(), T)
                .expect("send offsets");
            producer.commit_transaction(T).expect("commit");
            done += batch.len();
        }
        assert_eq!(done, 90, "consumed every input record once");
        let committed = consumer.committed(T).unwrap();
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                other => panic!("no committed offset: {other:?}"),
            })
            .sum::<i64>()
    })
    .await
    .unwrap();
    assert_eq!(
        committed_offsets, 90,
        "offsets committed inside the transactions"
    );
    let got = read_all(proxy.bootstrap(), &output, "read_committed", 90);
    let expected: Vec<String> = values.iter().map(|v| v.replace("in-", "out-")).collect();
    assert_eq!(sorted(got), sorted(expected));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_rebalances_across_three_brokers() {
    let proxy = start_proxy(Cluster::Three).await;
    let topic = unique_topic("rd-group");
    create_topic(proxy.bootstrap(), &topic, 6, 3).await;
    let values = numbered("g", 600);
    produce_values(proxy.bootstrap(), &topic, &values[..300], &[]).await;
    let group = unique_topic("rd-group-id");
    let bootstrap = proxy.bootstrap().to_string();
    let (t, g) = (topic.clone(), group.clone());
    let rest: Vec<String> = values[300..].to_vec();
    let bs = bootstrap.clone();
    let (seen, committed) = tokio::task::spawn_blocking(move || {
        let make = || -> BaseConsumer {
            let mut cfg = client_config(&bs);
            cfg.set("group.id", &g)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "500");
            let c: BaseConsumer = cfg.create().unwrap();
            c.subscribe(&[&t]).unwrap();
            c
        };
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let poll = |c: &BaseConsumer, seen: &mut BTreeMap<String, usize>| {
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                let m = m.expect("consume");
                let v = String::from_utf8_lossy(m.payload().unwrap()).into_owned();
                *seen.entry(v).or_default() += 1;
                // Commit each record synchronously so a rebalance never replays it.
                c.commit_message(&m, CommitMode::Sync).expect("commit");
            }
        };
        let a = make();
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.len() < 300 && Instant::now() < deadline {
            poll(&a, &mut seen);
        }
        assert_eq!(seen.len(), 300, "first consumer read the first half");
        // A second member joins: the group rebalances; then the second half is produced.
        let b = make();
        // Both members poll until the rebalance has given each of them partitions.
        let deadline = Instant::now() + Duration::from_secs(60);
        let split = |a: &BaseConsumer, b: &BaseConsumer| {
            let (na, nb) = (
                a.assignment().unwrap().count(),
                b.assignment().unwrap().count(),
            );
            na > 0 && nb > 0 && na + nb == 6
        };
        while !split(&a, &b) && Instant::now() < deadline {
            poll(&a, &mut seen);
            poll(&b, &mut seen);
        }
        assert!(
            split(&a, &b),
            "the rebalance split the partitions between both members"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(produce_values(&bs, &t, &rest, &[]));
        let mut b_count = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        while seen.len() < 600 && Instant::now() < deadline {
            poll(&a, &mut seen);
            let before = seen.len();
            poll(&b, &mut seen);
            b_count += seen.len() - before;
        }
        assert!(
            b_count > 0,
            "the second member got partitions after the rebalance"
        );
        let assigned_a = a.assignment().unwrap().count();
        let assigned_b = b.assignment().unwrap().count();
        assert_eq!(
            assigned_a + assigned_b,
            6,
            "all partitions assigned across both members"
        );
        let committed: i64 = a
            .committed_offsets(
                {
                    let mut tpl = TopicPartitionList::new();
                    for p in 0..6 {
                        tpl.add_partition(&t, p);
                    }
                    tpl
                },
                T,
            )
            .unwrap()
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        (seen, committed)
    })
    .await
    .unwrap();
    assert_eq!(seen.len(), 600, "every record consumed");
    assert!(seen.values().all(|&n| n == 1), "no record consumed twice");
    assert_eq!(committed, 600, "committed offsets cover every record");
    proxy.stop().await;
}

/// A zombie transactional producer (librdkafka) fenced at the proxy: the proxy's own answer (the broker's
/// codes) makes the commit fail at once, as a fatal error, with no retry loop; nothing of it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_is_fenced_by_the_proxys_answer() {
    let proxy = start_proxy(Cluster::Three).await;
    let topic = unique_topic("rd-zombie");
    create_topic(proxy.bootstrap(), &topic, 1, 3).await;
    let bootstrap = proxy.bootstrap().to_string();
    let t = topic.clone();
    let (fatal, took) = tokio::task::spawn_blocking(move || {
        let id = unique_topic("rd-zombie-id");
        let old = transactional_producer(&bootstrap, &id);
        old.begin_transaction().unwrap();
        for v in numbered("old", 5) {
            old.send(BaseRecord::to(&t).key(&v).payload(&v)).unwrap();
        }
        old.flush(T).unwrap();
        let fresh = transactional_producer(&bootstrap, &id);
        fresh.begin_transaction().unwrap();
        for v in numbered("new", 5) {
            fresh.send(BaseRecord::to(&t).key(&v).payload(&v)).unwrap();
        }
        fresh
            .commit_transaction(T)
            .expect("the new instance commits");
        let started = Instant::now();
        let v = "zombie".to_string();
        let _ = old.send(BaseRecord::to(&t).key(&v).payload(&v));
        let result = old.commit_transaction(T);
        let took = started.elapsed();
        let err = result.expect_err("the zombie's commit went through");
        let fatal = match &err {
            KafkaError::Transaction(e) => e.is_fatal(),
            _ => false,
        };
        (fatal, took)
    })
    .await
    .unwrap();
    assert!(fatal, "librdkafka treats the fencing as fatal");
    assert!(took < Duration::from_secs(30), "gave up in time: {took:?}");
    proxy.assert_fenced_at_the_proxy();
    let committed = read_all(proxy.bootstrap(), &topic, "read_committed", 5);
    assert_eq!(sorted(committed), numbered("new", 5));
    proxy.stop().await;
}

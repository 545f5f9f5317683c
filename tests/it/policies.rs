//! Policies (issue #5) against real Kafka with real clients: what a protected topic refuses, upgrades
//! and audits, forced read_committed, InitProducerId checks, and live reloads.

use crate::common::*;
use crate::rdkafka_clients::{client_config, create_topic, read_all};
use crate::wire::Raw;
use kafka_eos_proxy::audit::{Action, AuditEvent, Kind};
use kafka_eos_proxy::config::Config;
use kafka_eos_proxy::testkit::RawClient;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The policies of a YAML snippet (`policies: ...`), validated like a config file.
pub(crate) fn policies(yaml: &str) -> kafka_eos_proxy::policy::Policies {
    let text = format!("{}{yaml}", proxy_yaml("127.0.0.1:1", 1, 2));
    match Config::parse(&text) {
        Ok(c) => c.policies,
        Err(e) => panic!("test policies invalid: {e}"),
    }
}

/// A proxy in front of the single broker with the policies of a YAML snippet.
pub(crate) async fn start_with_policies(yaml: &str) -> TestProxy {
    let p = policies(yaml);
    start_proxy_with(Cluster::Single, move |c| c.policies = p.clone()).await
}

fn metrics(proxy: &TestProxy) -> std::sync::Arc<kafka_eos_proxy::metrics::Metrics> {
    proxy
        .proxy
        .as_ref()
        .and_then(|p| p.shared().metrics.clone())
        .expect("metrics on")
}

pub(crate) fn policy_count(proxy: &TestProxy, rule: &str, check: &str, action: &str) -> u64 {
    metrics(proxy)
        .policy_actions
        .with_label_values(&[rule, check, action])
        .get()
}

fn policy_events(proxy: &TestProxy, check: &str) -> Vec<AuditEvent> {
    proxy
        .audits
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.kind == Kind::PolicyViolation && e.check == Some(check))
        .cloned()
        .collect()
}

pub(crate) fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> FutureProducer {
    let mut cfg = client_config(bootstrap);
    cfg.set("linger.ms", "5").set("message.timeout.ms", "10000");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create().expect("producer")
}

async fn send_all(
    p: &FutureProducer,
    topic: &str,
    prefix: &str,
    n: usize,
) -> Vec<Result<(), KafkaError>> {
    let sends: Vec<_> = (0..n)
        .map(|i| {
            let p = p.clone();
            let topic = topic.to_string();
            let v = format!("{prefix}-{i:04}");
            async move {
                p.send(FutureRecord::to(&topic).key(&v).payload(&v), T)
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        })
        .collect();
    futures::future::join_all(sends).await
}

pub(crate) fn code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::MessageProduction(c) => Some(*c),
        _ => None,
    }
}

/// The broker's own address, for reading what really landed (no proxy, no policy in between).
fn direct() -> String {
    kafka(Cluster::Single)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_producer_is_refused_and_nothing_is_written() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: payments-idempotent
    match: { topics: { prefix: ["pol-idem-"] } }
    produce: { idempotence: reject }
"#,
    )
    .await;
    let topic = unique_topic("pol-idem");
    create_topic(proxy.bootstrap(), &topic, 2, 1).await;

    let plain = producer(
        proxy.bootstrap(),
        &[("enable.idempotence", "false"), ("acks", "all")],
    );
    let results = send_all(&plain, &topic, "plain", 20).await;
    for r in &results {
        let e = r
            .as_ref()
            .expect_err("a non-idempotent write must be refused");
        assert_eq!(code(e), Some(RDKafkaErrorCode::PolicyViolation), "{e}");
    }
    assert!(read_all(&direct(), &topic, "read_uncommitted", 0).is_empty());

    // The same topic takes an idempotent producer's writes.
    let idem = producer(proxy.bootstrap(), &[("enable.idempotence", "true")]);
    for r in send_all(&idem, &topic, "idem", 20).await {
        r.expect("idempotent write accepted");
    }
    let got = read_all(&direct(), &topic, "read_uncommitted", 20);
    assert_eq!(got.len(), 20);
    assert!(got.iter().all(|v| v.starts_with("idem-")));

    let events = policy_events(&proxy, "idempotence");
    assert!(!events.is_empty());
    let e = &events[0];
    assert_eq!(e.rule.as_deref(), Some("payments-idempotent"));
    assert_eq!(e.action, Action::Refused);
    assert_eq!(e.error_code, 44);
    assert_eq!(e.topic.as_deref(), Some(topic.as_str()));
    assert!(e.client_id.is_some());
    assert!(
        policy_count(&proxy, "payments-idempotent", "idempotence", "rejected") >= 1,
        "rejections are counted"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_one_is_upgraded_to_acks_all() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: acks
    match: { topics: { prefix: ["pol-acks-"] } }
    produce: { acks_all: upgrade }
"#,
    )
    .await;
    let topic = unique_topic("pol-acks");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let acks1 = producer(
        proxy.bootstrap(),
        &[("enable.idempotence", "false"), ("acks", "1")],
    );
    for r in send_all(&acks1, &topic, "a", 50).await {
        r.expect("upgraded write accepted");
    }
    assert_eq!(
        read_all(&direct(), &topic, "read_uncommitted", 50).len(),
        50
    );
    let events = policy_events(&proxy, "acks_all");
    assert_eq!(
        events.len(),
        1,
        "one event per connection and topic: {events:?}"
    );
    assert_eq!(events[0].action, Action::Upgraded);
    assert!(policy_count(&proxy, "acks", "acks_all", "upgraded") >= 1);

    // What the broker was asked: every produce request for this topic went upstream as acks=all,
    // although the client sent acks=1.
    let frames = proxy.upstream_frames.lock().unwrap().clone();
    let mut seen = 0;
    for f in &frames {
        let head = kafka_eos_proxy::protocol::header::peek_request(f).expect("request head");
        let no_names = Default::default();
        let view = kafka_eos_proxy::protocol::produce::parse(
            f,
            head.body_offset.expect("body"),
            head.api_version,
            &no_names,
        )
        .expect("produce request");
        if view.topics.iter().any(|t| t.name == Some(topic.as_str())) {
            assert_eq!(view.acks, -1, "sent upstream as acks=all");
            seen += 1;
        }
    }
    assert!(seen >= 1, "the produce requests were seen going upstream");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reject_refuses_acks_one_and_closes_acks_zero() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: strict-acks
    match: { topics: { prefix: ["pol-ackr-"] } }
    produce: { acks_all: reject }
"#,
    )
    .await;
    let topic = unique_topic("pol-ackr");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let acks1 = producer(
        proxy.bootstrap(),
        &[("enable.idempotence", "false"), ("acks", "1")],
    );
    for r in send_all(&acks1, &topic, "one", 5).await {
        let e = r.expect_err("acks=1 refused");
        assert_eq!(code(&e), Some(RDKafkaErrorCode::InvalidRequiredAcks), "{e}");
    }
    // acks=0: the client is told nothing (it asked for nothing); the proxy writes nothing and closes.
    let acks0: ThreadedProducer<DefaultProducerContext> = {
        let mut cfg = client_config(proxy.bootstrap());
        cfg.set("enable.idempotence", "false").set("acks", "0");
        cfg.create().expect("acks=0 producer")
    };
    for i in 0..5 {
        let v = format!("zero-{i}");
        acks0
            .send(BaseRecord::to(&topic).key(&v).payload(&v))
            .expect("queued");
    }
    let _ = acks0.flush(Duration::from_secs(10));
    let m = metrics(&proxy);
    eventually("an acks=0 refusal", T, || async {
        m.policy_actions
            .with_label_values(&["strict-acks", "acks_all", "rejected"])
            .get()
            >= 1
    })
    .await;
    assert!(read_all(&direct(), &topic, "read_uncommitted", 0).is_empty());
    assert!(policy_events(&proxy, "acks_all")
        .iter()
        .any(|e| e.action == Action::Refused && e.error_code == 0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_zero_upgraded_is_written_and_the_client_hears_nothing_new() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: acks0
    match: { topics: { prefix: ["pol-ack0-"] } }
    produce: { acks_all: upgrade }
"#,
    )
    .await;
    let topic = unique_topic("pol-ack0");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let acks0: ThreadedProducer<DefaultProducerContext> = {
        let mut cfg = client_config(proxy.bootstrap());
        cfg.set("enable.idempotence", "false").set("acks", "0");
        cfg.create().expect("acks=0 producer")
    };
    for i in 0..30 {
        let v = format!("zero-{i}");
        acks0
            .send(BaseRecord::to(&topic).key(&v).payload(&v))
            .expect("queued");
    }
    acks0.flush(T).expect("flushed");
    let got = read_all(&direct(), &topic, "read_uncommitted", 30);
    assert_eq!(got.len(), 30);
    // The swallowed answers did not confuse the client: it keeps writing on the same connection.
    for i in 30..40 {
        let v = format!("zero-{i}");
        acks0
            .send(BaseRecord::to(&topic).key(&v).payload(&v))
            .expect("queued");
    }
    acks0.flush(T).expect("flushed");
    assert_eq!(
        read_all(&direct(), &topic, "read_uncommitted", 40).len(),
        40
    );
    assert!(policy_count(&proxy, "acks0", "acks_all", "upgraded") >= 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_codecs_are_enforced() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: codecs
    match: { topics: { regex: ['^pol-codec-.*$'] } }
    produce: { compression: { allowed: [none, lz4, zstd], action: reject } }
"#,
    )
    .await;
    let topic = unique_topic("pol-codec");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let snappy = producer(proxy.bootstrap(), &[("compression.type", "snappy")]);
    for r in send_all(&snappy, &topic, "s", 5).await {
        let e = r.expect_err("snappy refused");
        assert_eq!(
            code(&e),
            Some(RDKafkaErrorCode::UnsupportedCompressionType),
            "{e}"
        );
    }
    let lz4 = producer(proxy.bootstrap(), &[("compression.type", "lz4")]);
    for r in send_all(&lz4, &topic, "z", 5).await {
        r.expect("lz4 allowed");
    }
    let got = read_all(&direct(), &topic, "read_uncommitted", 5);
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|v| v.starts_with("z-")));
    proxy.stop().await;
}

pub(crate) fn transactional(
    bootstrap: &str,
    txn_id: &str,
    extra: &[(&str, &str)],
) -> ThreadedProducer<DefaultProducerContext> {
    let mut cfg = client_config(bootstrap);
    cfg.set("transactional.id", txn_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("transaction.timeout.ms", "30000");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create().expect("transactional producer")
}

fn write_txn(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, prefix: &str, n: usize) {
    p.begin_transaction().expect("begin");
    for i in 0..n {
        let v = format!("{prefix}-{i:03}");
        p.send(BaseRecord::to(topic).key(&v).payload(&v))
            .expect("queued");
    }
    p.flush(T).expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_read_committed_consumer_never_sees_aborted_records() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: committed-only
    match: { topics: { prefix: ["pol-rc-"] } }
    consume: { read_committed: upgrade }
"#,
    )
    .await;
    let topic = unique_topic("pol-rc");
    create_topic(proxy.bootstrap(), &topic, 2, 1).await;
    // Written directly: the producer side is not what this test is about.
    let p = transactional(&direct(), &unique_topic("pol-rc-txn"), &[]);
    p.init_transactions(T).expect("init");
    write_txn(&p, &topic, "c1", 20);
    p.commit_transaction(T).expect("commit");
    write_txn(&p, &topic, "ab", 20);
    p.abort_transaction(T).expect("abort");
    write_txn(&p, &topic, "c2", 20);
    p.commit_transaction(T).expect("commit");

    // Directly, a read_uncommitted consumer sees the aborted records: the test can fail.
    let all = read_all(&direct(), &topic, "read_uncommitted", 60);
    assert_eq!(all.iter().filter(|v| v.starts_with("ab-")).count(), 20);

    // Through the proxy the same consumer is read_committed, and the aborted records are gone.
    let got = read_all(proxy.bootstrap(), &topic, "read_uncommitted", 40);
    assert_eq!(got.len(), 40, "{got:?}");
    assert!(got.iter().all(|v| !v.starts_with("ab-")), "{got:?}");
    let events = policy_events(&proxy, "read_committed");
    assert!(events
        .iter()
        .any(|e| e.action == Action::Upgraded && e.topic.as_deref() == Some(topic.as_str())));

    // ListOffsets: the latest offset a forced read_uncommitted client sees is the last stable offset.
    write_txn(&p, &topic, "open", 5); // left open: the LSO stays before it
    let latest = |raw_addr: String| {
        let topic = topic.clone();
        async move {
            let mut raw = Raw::connect(&raw_addr).await;
            let req = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_isolation_level(0)
                .with_topics(vec![list_offsets_request::ListOffsetsTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partitions(
                        (0..2)
                            .map(|i| {
                                list_offsets_request::ListOffsetsPartition::default()
                                    .with_partition_index(i)
                                    .with_timestamp(-1)
                            })
                            .collect(),
                    )]);
            let resp: ListOffsetsResponse = raw.call(ApiKey::ListOffsets, 7, &req).await;
            resp.topics[0]
                .partitions
                .iter()
                .map(|p| p.offset)
                .sum::<i64>()
        }
    };
    let high = latest(direct()).await;
    let stable = latest(proxy.bootstrap().to_string()).await;
    assert_eq!(
        high - stable,
        5,
        "the open transaction's 5 records are not offered"
    );
    p.abort_transaction(T).expect("abort");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_producer_id_checks_timeout_rate_and_owners() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: timeouts
    match: { client_ids: { prefix: ["clamp-"] } }
    producers: { transaction_timeout_ms: { min: 1000, max: 60000, action: upgrade } }
  - name: timeouts-strict
    producers: { transaction_timeout_ms: { max: 60000, action: reject } }
  - name: pid-rate
    match: { client_ids: [raw-rate] }
    producers: { new_producer_ids_per_minute: { limit: 3, action: reject } }
  - name: owners
    match: { client_ids: [owner] }
    producers: { owns_transactional_ids: { prefixes: ["owned-"], action: reject } }
"#,
    )
    .await;
    let suffix = unique_topic("x");

    // Timeout upgrade: the coordinator applies the clamped timeout.
    let clamped = format!("clamped-{suffix}");
    let p = transactional(
        proxy.bootstrap(),
        &clamped,
        &[
            ("client.id", "clamp-app"),
            ("transaction.timeout.ms", "120000"),
        ],
    );
    p.init_transactions(T).expect("init with a clamped timeout");
    let mut raw = Raw::connect(proxy.bootstrap()).await;
    let described: DescribeTransactionsResponse = raw
        .call(
            ApiKey::DescribeTransactions,
            0,
            &DescribeTransactionsRequest::default().with_transactional_ids(vec![TransactionalId(
                StrBytes::from_string(clamped.clone()),
            )]),
        )
        .await;
    assert_eq!(described.transaction_states[0].error_code, 0);
    assert_eq!(
        described.transaction_states[0].transaction_timeout_ms,
        60_000
    );

    // Timeout reject: a clear fatal error for the client.
    let p2 = transactional(
        proxy.bootstrap(),
        &format!("strict-{suffix}"),
        &[
            ("client.id", "other-app"),
            ("transaction.timeout.ms", "120000"),
        ],
    );
    let e = p2.init_transactions(T).expect_err("timeout over the bound");
    assert_eq!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::InvalidTransactionTimeout),
        "{e:?}"
    );
    assert_eq!(
        policy_count(
            &proxy,
            "timeouts-strict",
            "transaction_timeout_ms",
            "rejected"
        ),
        1,
        "refused by the proxy, not the broker"
    );

    // New producer ids per client per minute.
    let mut rate = Raw::connect_as(proxy.bootstrap(), "raw-rate").await;
    let init = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(-1)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    for i in 0..3 {
        let r: InitProducerIdResponse = rate.call(ApiKey::InitProducerId, 4, &init).await;
        assert_eq!(r.error_code, 0, "producer id {i} within the limit");
    }
    let r: InitProducerIdResponse = rate.call(ApiKey::InitProducerId, 4, &init).await;
    assert_eq!(r.error_code, 89, "THROTTLING_QUOTA_EXCEEDED");
    // Three ids just now with a limit of 3: the sliding window has room again when a third of this
    // minute's count has slid out of the next minute, 60 + 20 s from now.
    assert!(
        (78_000..=80_100).contains(&r.throttle_time_ms),
        "{}",
        r.throttle_time_ms
    );
    let mut other = Raw::connect_as(proxy.bootstrap(), "raw-other").await;
    let r: InitProducerIdResponse = other.call(ApiKey::InitProducerId, 4, &init).await;
    assert_eq!(r.error_code, 0, "another client has its own budget");

    // transactional.id prefixes owned by a client id.
    let owned = format!("owned-{suffix}");
    let intruder = transactional(proxy.bootstrap(), &owned, &[("client.id", "intruder")]);
    let e = intruder
        .init_transactions(T)
        .expect_err("a foreign transactional id");
    assert_eq!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed),
        "{e:?}"
    );
    let owner = transactional(proxy.bootstrap(), &owned, &[("client.id", "owner")]);
    owner.init_transactions(T).expect("the owner may");

    for check in [
        "transaction_timeout_ms",
        "new_producer_ids_per_minute",
        "owns_transactional_ids",
    ] {
        assert!(!policy_events(&proxy, check).is_empty(), "{check} audited");
    }
    // Once per request: a coordinator still loading after a broker start makes librdkafka ask again.
    assert!(policy_count(&proxy, "timeouts", "transaction_timeout_ms", "upgraded") >= 1);
    assert_eq!(
        policy_count(
            &proxy,
            "pid-rate",
            "new_producer_ids_per_minute",
            "rejected"
        ),
        1
    );
    proxy.stop().await;
}

fn write_config(path: &std::path::Path, policies: &str) {
    let text = format!("{}{policies}", proxy_yaml("127.0.0.1:1", 1, 2));
    // Write then rename, as editors and config management do: the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

const REFUSE_PLAIN: &str = r#"
policies:
  - name: reloaded
    match: { topics: { prefix: ["pol-reload-"] } }
    produce: { idempotence: reject }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_file_change_keeps_connections_and_refuses_bad_files() {
    let proxy = start_proxy(Cluster::Single).await;
    let dir = std::env::temp_dir().join(unique_topic("pol-reload-dir"));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("proxy.yaml");
    write_config(&path, "");
    proxy
        .proxy
        .as_ref()
        .expect("running")
        .watch_config(path.clone(), Duration::from_millis(200));
    let m = metrics(&proxy);
    let reloads = |result: &str| m.policy_reloads.with_label_values(&[result]).get();
    let accepted = || m.connections_accepted_bootstrap.get() + m.connections_accepted_broker.get();

    let topic = unique_topic("pol-reload");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let plain = producer(proxy.bootstrap(), &[("enable.idempotence", "false")]);
    for r in send_all(&plain, &topic, "before", 5).await {
        r.expect("no policy yet");
    }
    let connections = accepted();

    // A new rule: the same producer, on the same connection, is now refused.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a distinct mtime on coarse filesystems
    write_config(&path, REFUSE_PLAIN);
    // Waits on state, not counts: a SIGHUP sent by the other reload test reloads this watcher too.
    eventually("the reload", T, || async { m.policy_rules.get() == 1 }).await;
    for r in send_all(&plain, &topic, "during", 5).await {
        let e = r.expect_err("refused after the reload");
        assert_eq!(code(&e), Some(RDKafkaErrorCode::PolicyViolation));
    }
    assert_eq!(m.policy_rules.get(), 1);

    // A broken file is refused: the old rule stays, and the metrics say so.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_config(
        &path,
        "policies:\n  - name: broken\n    produce: { idempotence: sometimes }\n",
    );
    eventually("the refusal", T, || async {
        m.policy_config_valid.get() == 0
    })
    .await;
    assert!(reloads("refused") >= 1);
    assert_eq!(m.policy_rules.get(), 1, "the old rules stay");
    for r in send_all(&plain, &topic, "still", 3).await {
        assert!(r.is_err(), "the old rule is still in force");
    }

    // Rules removed: writes flow again, still on the same connections.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_config(&path, "");
    eventually("the second reload", T, || async {
        m.policy_rules.get() == 0 && m.policy_config_valid.get() == 1
    })
    .await;
    assert!(reloads("applied") >= 2);
    for r in send_all(&plain, &topic, "after", 5).await {
        r.expect("rules removed");
    }
    assert_eq!(
        accepted(),
        connections,
        "no connection was dropped or reopened"
    );
    let got = read_all(&direct(), &topic, "read_uncommitted", 10);
    assert_eq!(
        got.len(),
        10,
        "before + after, nothing from while refused: {got:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_sighup() {
    let proxy = start_proxy(Cluster::Single).await;
    let dir = std::env::temp_dir().join(unique_topic("pol-hup-dir"));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("proxy.yaml");
    write_config(&path, "");
    // Polling effectively off: only the signal can trigger this reload.
    proxy
        .proxy
        .as_ref()
        .expect("running")
        .watch_config(path.clone(), Duration::from_secs(3600));
    create_topic(proxy.bootstrap(), &unique_topic("pol-hup"), 1, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the handler is installed
    write_config(&path, REFUSE_PLAIN);
    let m = metrics(&proxy);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    eventually("the SIGHUP reload", T, || async {
        m.policy_rules.get() == 1
    })
    .await;
    assert!(m.policy_reloads.with_label_values(&["applied"]).get() >= 1);
    let _ = std::fs::remove_dir_all(&dir);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_match_the_sasl_principal_the_broker_accepted() {
    let _ = kafka(Cluster::Single); // the broker's SASL_PLAINTEXT listener is 127.0.0.1:19096
    let p = policies(
        r#"
policies:
  - name: mallory-must-be-idempotent
    match: { topics: { prefix: ["pol-sasl-"] }, principals: ["User:mallory"] }
    produce: { idempotence: reject }
"#,
    );
    let proxy = start_proxy_with(Cluster::Single, move |c| {
        c.upstream.bootstrap_servers = vec!["127.0.0.1:19096".into()];
        c.policies = p.clone();
    })
    .await;
    let sasl = |user: &str, password: &str| {
        let mut cfg = client_config(proxy.bootstrap());
        cfg.set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", user)
            .set("sasl.password", password)
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "10000");
        cfg
    };
    let topic = unique_topic("pol-sasl");
    create_topic(&direct(), &topic, 1, 1).await;
    let alice: FutureProducer = sasl("alice", "alice-secret").create().expect("alice");
    for r in send_all(&alice, &topic, "alice", 5).await {
        r.expect("alice is not under the rule");
    }
    let mallory: FutureProducer = sasl("mallory", "mallory-secret").create().expect("mallory");
    for r in send_all(&mallory, &topic, "mallory", 5).await {
        let e = r.expect_err("mallory must be idempotent");
        assert_eq!(code(&e), Some(RDKafkaErrorCode::PolicyViolation), "{e}");
    }
    // A wrong password never becomes a principal: the broker refuses the login, not the policy.
    let liar: FutureProducer = sasl("mallory", "wrong")
        .set("message.timeout.ms", "3000")
        .create()
        .expect("liar");
    for r in send_all(&liar, &topic, "liar", 1).await {
        let e = r.expect_err("authentication fails");
        assert_ne!(code(&e), Some(RDKafkaErrorCode::PolicyViolation), "{e}");
    }
    let got = read_all(&direct(), &topic, "read_uncommitted", 5);
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|v| v.starts_with("alice-")));
    let events = policy_events(&proxy, "idempotence");
    assert!(
        !events.is_empty()
            && events
                .iter()
                .all(|e| e.rule.as_deref() == Some("mallory-must-be-idempotent"))
    );
    proxy.stop().await;
}

/// Values of every record in a Fetch answer's partitions (aborted or not: the client filters nothing).
fn fetched_values(resp: &FetchResponse) -> Vec<String> {
    use kafka_protocol::records::RecordBatchDecoder;
    let mut out = Vec::new();
    for t in &resp.responses {
        for p in &t.partitions {
            let Some(mut records) = p.records.clone() else {
                continue;
            };
            let Ok(batches) = RecordBatchDecoder::decode_all(&mut records) else {
                continue;
            };
            for b in batches {
                for r in b.records.into_iter().filter(|r| !r.control) {
                    if let Some(v) = r.value {
                        out.push(String::from_utf8_lossy(&v).to_string());
                    }
                }
            }
        }
    }
    out
}

/// A read_uncommitted Fetch v13 that names its topic by id, on a proxy that has relayed no Metadata
/// answer naming that id (a fresh start): it once returned aborted records. Now an id the proxy cannot
/// name is upgraded whenever a rule that upgrades reads applies to the client (conservative).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_holds_for_topics_named_by_id() {
    let topic = unique_topic("pol-rcid");
    create_topic(&direct(), &topic, 1, 1).await;
    let p = transactional(&direct(), &unique_topic("pol-rcid-txn"), &[]);
    p.init_transactions(T).expect("init");
    write_txn(&p, &topic, "ab", 5);
    p.abort_transaction(T).expect("abort");
    write_txn(&p, &topic, "ok", 5);
    p.commit_transaction(T).expect("commit");

    // The topic id, asked of the broker directly: the proxy never sees it in an answer.
    let mut broker = Raw::connect(&direct()).await;
    let topic_id = broker.topic_metadata(&topic).await.topics[0].topic_id;
    let fetch = FetchRequest::default()
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_isolation_level(0)
        .with_session_epoch(-1)
        .with_topics(vec![fetch_request::FetchTopic::default()
            .with_topic_id(topic_id)
            .with_partitions(vec![fetch_request::FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(0)
                .with_partition_max_bytes(1 << 20)])]);
    // Directly, read_uncommitted by id shows the aborted records: the test can fail.
    let direct_resp: FetchResponse = broker.call(ApiKey::Fetch, 13, &fetch).await;
    assert!(fetched_values(&direct_resp)
        .iter()
        .any(|v| v.starts_with("ab-")));

    let proxy = start_with_policies(
        r#"
policies:
  - name: committed-only
    match: { topics: { prefix: ["pol-rcid-"] } }
    consume: { read_committed: upgrade }
"#,
    )
    .await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let resp: FetchResponse = raw.call(ApiKey::Fetch, 13, &fetch).await;
    let values = fetched_values(&resp);
    assert_eq!(values.len(), 5, "{values:?}");
    assert!(values.iter().all(|v| v.starts_with("ok-")), "{values:?}");
    let events = policy_events(&proxy, "read_committed");
    assert!(events.iter().any(|e| e.action == Action::Upgraded
        && e.topic.as_deref() == Some(topic_id.to_string().as_str())));
    proxy.stop().await;
}

/// `new_producer_ids_per_minute` counts every producer id the broker hands out that the client did
/// not hold: an "epoch bump" naming producer id 0 gets a new id from the broker each time (it once
/// escaped the limit), and a client that takes a new client id per connection is limited by its
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_id_rate_counts_what_the_broker_hands_out() {
    let proxy = start_with_policies(
        r#"
policies:
  - name: pid-rate
    producers: { new_producer_ids_per_minute: { limit: 3, action: reject } }
"#,
    )
    .await;
    let init = |pid: i64, epoch: i16| {
        InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(-1)
            .with_producer_id(ProducerId(pid))
            .with_producer_epoch(epoch)
    };
    // Fake bumps from one client: three new ids, then refused.
    let mut bumps = Raw::connect_as(proxy.bootstrap(), "fake-bump").await;
    let mut ids = std::collections::HashSet::new();
    for i in 0..3 {
        let r: InitProducerIdResponse = bumps.call(ApiKey::InitProducerId, 4, &init(0, 0)).await;
        assert_eq!(r.error_code, 0, "bump {i}");
        assert_ne!(r.producer_id.0, 0, "the broker hands out a new id");
        ids.insert(r.producer_id.0);
    }
    assert_eq!(ids.len(), 3);
    let r: InitProducerIdResponse = bumps.call(ApiKey::InitProducerId, 4, &init(0, 0)).await;
    assert_eq!(r.error_code, 89, "the fourth new id in a minute is refused");

    // A new client id per connection, from another address: limited by the address.
    let from = |client: String| {
        let addr = proxy.bootstrap().to_string();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
            let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
            Raw(RawClient::on(stream, &client))
        }
    };
    for i in 0..3 {
        let mut c = from(format!("rotating-{i}")).await;
        let r: InitProducerIdResponse = c.call(ApiKey::InitProducerId, 4, &init(-1, -1)).await;
        assert_eq!(r.error_code, 0, "rotating client {i}");
    }
    let mut c = from("rotating-3".into()).await;
    let r: InitProducerIdResponse = c.call(ApiKey::InitProducerId, 4, &init(-1, -1)).await;
    assert_eq!(r.error_code, 89, "the address's fourth new id in a minute");
    proxy.stop().await;
}

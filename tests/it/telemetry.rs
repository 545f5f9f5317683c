//! Metrics, the operator endpoint and the dashboard, against real Kafka: drive every kind of traffic the
//! dashboard shows through a proxy, scrape it, and check that every metric the dashboard queries is
//! exported, and that the counters count what happened.

use crate::common::*;
use crate::producer_state::{
    add_partitions, batch, find_transaction_coordinator, init_producer_id,
    init_producer_id_timeout, produce, send_produce,
};
use crate::rdkafka_clients::{client_config, create_topic};
use crate::wire::Raw;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::StrBytes;
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let status = body
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name{labels}` (labels as written by the text format), if exported.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Metric names in the dashboard's queries (histogram series reduced to their family).
fn dashboard_metrics() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(repo_root().join("dashboards/kafka-eos-proxy.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(exprs.len() > 20, "the dashboard has its queries");
    let re = regex::Regex::new(r"\b(kafka_eos_proxy_[a-z_]+|process_[a-z_]+)\b").unwrap();
    exprs
        .iter()
        .flat_map(|e| {
            re.find_iter(e)
                .map(|m| m.as_str().to_string())
                .collect::<Vec<_>>()
        })
        .map(|n| n.trim_end_matches("_bucket").to_string())
        .collect()
}

/// A break hook and its switch: once set, the next Produce answer is never read (the proxy's broker
/// connection breaks), for a batch of unknown fate.
fn break_next_produce_answer() -> (Arc<std::sync::atomic::AtomicBool>, BreakRule) {
    let switch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = switch.clone();
    let hook: BreakRule = Arc::new(move |key| {
        key == ApiKey::Produce as i16 && s.swap(false, std::sync::atomic::Ordering::SeqCst)
    });
    (switch, hook)
}

/// A batch without idempotence larger than the broker takes (MESSAGE_TOO_LARGE: refused before writing).
fn too_large(topic: &str) -> kafka_protocol::messages::ProduceRequest {
    let batch = kafka_eos_proxy::testkit::record_batch_sized(-1, -1, -1, 1, 2_000_000);
    produce(topic, None, vec![(0, batch)])
}

/// librdkafka, as `client_id`: one transaction committed, then one aborted, one record each.
async fn commit_then_abort(bootstrap: &str, topic: &str, txn_id: &str, client_id: &str) {
    let (bs, t, tx, client) = (
        bootstrap.to_string(),
        topic.to_string(),
        txn_id.to_string(),
        client_id.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let mut cfg = client_config(&bs);
        cfg.set("transactional.id", &tx).set("client.id", &client);
        let p: ThreadedProducer<DefaultProducerContext> = cfg.create().unwrap();
        p.init_transactions(Duration::from_secs(30)).unwrap();
        for commit in [true, false] {
            p.begin_transaction().unwrap();
            p.send(BaseRecord::to(&t).key("k").payload("v")).unwrap();
            p.flush(Duration::from_secs(30)).unwrap();
            if commit {
                p.commit_transaction(Duration::from_secs(30)).unwrap();
            } else {
                p.abort_transaction(Duration::from_secs(30)).unwrap();
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_and_dashboard_match_real_traffic() {
    let dropped: Arc<Mutex<HashSet<i32>>> = Arc::default();
    let d = dropped.clone();
    let rule: DropRule = Arc::new(move |key, frame| {
        let corr = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
        key == ApiKey::Produce as i16 && d.lock().unwrap().remove(&corr)
    });
    let (break_next, brk) = break_next_produce_answer();
    let proxy = start_proxy_faulty(
        Cluster::Single,
        |c| {
            c.metrics.listen = Some(format!("{PROXY_HOST}:0"));
            c.watchdog.margin = Duration::from_millis(0);
            c.watchdog.interval = Duration::from_millis(100);
            c.policies = crate::policies::policies(
                "policies:\n  - name: up\n    match: { topics: { prefix: [telemetry-up-] } }\n    produce: { idempotence: upgrade }\n",
            );
        },
        Some(rule),
        Some(brk),
    )
    .await;
    let http = proxy
        .proxy
        .as_ref()
        .unwrap()
        .http_addr()
        .expect("metrics endpoint");
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    assert_eq!(http_get(http, "/readyz").await.0, 200);
    assert_eq!(http_get(http, "/nope").await.0, 404);

    let topic = unique_topic("telemetry");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let leader = format!("{PROXY_HOST}:{}", proxy.broker_port(1));
    let mut raw = Raw::connect(&leader).await;

    // An idempotent producer: a batch, a lost response and its retry, an epoch bump, a gap.
    let (pid, e) = init_producer_id(&mut raw, None).await;
    let first = produce(&topic, None, vec![(0, batch(pid, e, 0, 4, false, "t"))]);
    let (corr, bytes) = raw.encode(ApiKey::Produce, 11, &first);
    dropped.lock().unwrap().insert(corr);
    raw.send_bytes(&bytes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        send_produce(&mut raw, &first).await[0].1,
        0,
        "retry answered"
    );
    assert_eq!(
        send_produce(
            &mut raw,
            &produce(&topic, None, vec![(0, batch(pid, e + 1, 0, 1, false, "t"))])
        )
        .await[0]
            .1,
        0
    );
    assert_eq!(
        send_produce(
            &mut raw,
            &produce(&topic, None, vec![(0, batch(pid, e + 1, 5, 1, false, "t"))])
        )
        .await[0]
            .1,
        45
    );

    // A client without idempotence on a topic whose policy upgrades it: a batch, its repeat (answered
    // from the content window), a batch the broker refuses (too large), and one more after it.
    let up = unique_topic("telemetry-up");
    create_topic(proxy.bootstrap(), &up, 1, 1).await;
    let plain = |tag: &str| produce(&up, None, vec![(0, batch(-1, -1, -1, 1, false, tag))]);
    assert_eq!(
        send_produce(&mut raw, &plain("u")).await,
        vec![(0, 0, 0, None)]
    );
    assert_eq!(
        send_produce(&mut raw, &plain("u")).await,
        vec![(0, 0, 0, None)]
    );
    let big = too_large(&up);
    assert_eq!(send_produce(&mut raw, &big).await[0].1, 10);
    assert_eq!(
        send_produce(&mut raw, &plain("w")).await,
        vec![(0, 0, 1, None)]
    );
    // One whose answer the proxy never reads: its retry on a new connection goes under its stamp.
    let mut lost = Raw::connect(&leader).await;
    break_next.store(true, std::sync::atomic::Ordering::SeqCst);
    lost.send(ApiKey::Produce, 11, &plain("l")).await;
    assert!(lost.recv_frame().await.is_none(), "the connection broke");
    assert_eq!(
        send_produce(&mut raw, &plain("l")).await,
        vec![(0, 0, 2, None)]
    );

    // A zombie, and a transaction that outlives its timeout (the watchdog flags it).
    let txn = unique_topic("telemetry-txn");
    let (tpid, te) = init_producer_id_timeout(&mut raw, Some(&txn), 1000).await;
    let _ = init_producer_id_timeout(&mut raw, Some(&txn), 1000).await;
    assert_eq!(
        send_produce(
            &mut raw,
            &produce(
                &topic,
                Some(&txn),
                vec![(0, batch(tpid, te, 0, 1, true, "z"))]
            )
        )
        .await[0]
            .1,
        47
    );
    let hang = unique_topic("telemetry-hang");
    let (hpid, he) = init_producer_id_timeout(&mut raw, Some(&hang), 1000).await;
    assert_eq!(
        add_partitions(&mut raw, &hang, (hpid, he), &topic, 0).await,
        0
    );
    let _ = send_produce(
        &mut raw,
        &produce(
            &topic,
            Some(&hang),
            vec![(0, batch(hpid, he, 0, 1, true, "h"))],
        ),
    )
    .await;
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    assert_eq!(
        shared.guard.txns.open_count(),
        1,
        "the zombie's refused write opened nothing"
    );
    eventually(
        "the watchdog to flag the transaction",
        Duration::from_secs(10),
        || {
            let s = shared.clone();
            async move { s.metrics.as_ref().unwrap().hanging_transactions.get() == 1 }
        },
    )
    .await;
    assert!(proxy.audits.lock().unwrap().iter().any(|e| e.kind
        == kafka_eos_proxy::audit::Kind::HangingTransaction
        && e.transactional_id.as_deref() == Some(hang.as_str())));
    // A new InitProducerId for it ends it (the coordinator aborts what was open): the gauge clears.
    let _ = init_producer_id_timeout(&mut raw, Some(&hang), 60_000).await;
    assert_eq!(
        shared.metrics.as_ref().unwrap().hanging_transactions.get(),
        0
    );

    // librdkafka: a transaction committed and one aborted.
    commit_then_abort(
        proxy.bootstrap(),
        &topic,
        &unique_topic("telemetry-rd"),
        "dashboard-client",
    )
    .await;
    drop(raw); // a closed connection, for connections_closed_total
               // A read_committed consumer, for the lag per partition.
    let read = crate::rdkafka_clients::read_all(proxy.bootstrap(), &topic, "read_committed", 1);
    assert!(!read.is_empty());

    let (status, metrics) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    // Every metric the dashboard queries is exported.
    for name in dashboard_metrics() {
        let exported = metrics.lines().any(|l| {
            l.starts_with(&name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{' | b'_'))
        });
        assert!(
            exported,
            "the dashboard queries {name}, which the proxy does not export"
        );
    }
    // And the counters count what happened.
    let raw_labels = "{client_id=\"raw-test\",transactional_id=\"\"}";
    let m = |series: &str| sample(&metrics, series).unwrap_or_else(|| panic!("no sample {series}"));
    assert_eq!(
        m(&format!(
            "kafka_eos_proxy_producer_duplicates_answered_total{raw_labels}"
        )),
        1.0
    );
    assert_eq!(
        m(&format!(
            "kafka_eos_proxy_producer_out_of_order_total{raw_labels}"
        )),
        1.0
    );
    assert_eq!(
        m(&format!(
            "kafka_eos_proxy_producer_epoch_bumps_total{raw_labels}"
        )),
        1.0
    );
    assert_eq!(
        m(&format!(
            "kafka_eos_proxy_producer_batches_total{raw_labels}"
        )),
        4.0,
        "first, retry, bump, gap"
    );
    assert_eq!(
        m(&format!(
            "kafka_eos_proxy_producer_upgraded_batches_total{raw_labels}"
        )),
        5.0,
        "the first, the refused one, the one after it, the lost one and its retry (the repeat \
         was answered)"
    );
    assert_eq!(
        m(&format!(
            "kafka_eos_proxy_producer_upgrade_resent_total{raw_labels}"
        )),
        1.0
    );
    assert_eq!(
        m("kafka_eos_proxy_producer_upgrade_restarts_total{client_id=\"raw-test\",how=\"rewound\",transactional_id=\"\"}"),
        1.0
    );
    assert_eq!(
        m("kafka_eos_proxy_producer_duplicate_content_total{action=\"answered\",client_id=\"raw-test\",transactional_id=\"\"}"),
        1.0
    );
    assert_eq!(m(&format!("kafka_eos_proxy_producer_fenced_total{{client_id=\"raw-test\",transactional_id=\"{txn}\"}}")), 1.0);
    let rd = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains("client_id=\"dashboard-client\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(rd("kafka_eos_proxy_transactions_committed_total"), 1.0);
    assert_eq!(rd("kafka_eos_proxy_transactions_aborted_total"), 1.0);
    assert_eq!(
        rd("kafka_eos_proxy_transaction_duration_seconds_count"),
        2.0
    );
    assert!(m("kafka_eos_proxy_requests_total{api=\"Produce\"}") >= 6.0);
    assert!(m("kafka_eos_proxy_request_upstream_seconds_count{api=\"Metadata\"}") >= 1.0);
    assert!(m("kafka_eos_proxy_tracked_producer_partitions") >= 1.0);
    assert!(m("kafka_eos_proxy_connections_closed_total{reason=\"client_closed\"}") >= 1.0);
    // Every connection the proxy took is counted where it arrived (this counter was once never moved).
    assert!(m("kafka_eos_proxy_connections_accepted_total{listener=\"bootstrap\"}") >= 1.0);
    assert!(m("kafka_eos_proxy_connections_accepted_total{listener=\"broker\"}") >= 1.0);

    // /producers shows the idempotent producer with its partition.
    let (status, producers) = http_get(http, "/producers").await;
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&producers).unwrap();
    assert!(page["next_after"].is_null(), "one page holds them all");
    let p = page["producers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["producer_id"] == pid)
        .unwrap_or_else(|| panic!("producer {pid} in {producers}"));
    assert_eq!(p["client_id"], "raw-test");
    assert_eq!(p["epoch"], e + 1);
    assert_eq!(p["partitions"][0]["topic"], topic.as_str());
    assert_eq!(p["partitions_tracked"], 1);
    // Pages: a limit of one producer, then the next page after it.
    let (_, first) = http_get(http, "/producers?limit=1").await;
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["producers"].as_array().unwrap().len(), 1);
    let (status, _) = http_get(http, "/producers?limit=100000").await;
    assert_eq!(status, 400, "a page larger than 1000 producers is refused");
    assert_eq!(
        p["partitions"][0]["last_offset"], 4,
        "the bump batch landed at offset 4"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_a_kafka_topic_keyed_by_producer() {
    let audit_topic = unique_topic("audit");
    let upstream = kafka(Cluster::Single);
    let t = audit_topic.clone();
    let proxy = start_proxy_with(Cluster::Single, move |c| {
        c.producer_state.mode = kafka_eos_proxy::guard::Mode::Enforce;
        c.audit.kafka = Some(kafka_eos_proxy::config::KafkaAuditConfig {
            topic: t.clone(),
            bootstrap_servers: vec![upstream.clone()],
            queue: 100,
            tls: None,
            sasl: None,
        });
    })
    .await;
    create_topic(proxy.bootstrap(), &audit_topic, 1, 1).await;
    let topic = unique_topic("audited");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let (pid, e) = init_producer_id(&mut raw, None).await;
    assert_eq!(
        send_produce(
            &mut raw,
            &produce(&topic, None, vec![(0, batch(pid, e, 0, 1, false, "a"))])
        )
        .await[0]
            .1,
        0
    );
    for (gap, then) in [(5, Some(1)), (9, None)] {
        assert_eq!(
            send_produce(
                &mut raw,
                &produce(&topic, None, vec![(0, batch(pid, e, gap, 1, false, "a"))])
            )
            .await[0]
                .1,
            45
        );
        // The next batch in sequence lands, so the second gap is a gap of its own (not an echo of the
        // first: see out_of_order_cascade).
        if let Some(seq) = then {
            let next = produce(&topic, None, vec![(0, batch(pid, e, seq, 1, false, "a"))]);
            assert_eq!(send_produce(&mut raw, &next).await[0].1, 0);
        }
    }
    let bs = proxy.bootstrap().to_string();
    let t = audit_topic.clone();
    let records = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let mut cfg = client_config(&bs);
        cfg.set("group.id", unique_topic("audit-reader"))
            .set("auto.offset.reset", "earliest");
        let c: BaseConsumer = cfg.create().unwrap();
        c.subscribe(&[&t]).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while out.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let value: serde_json::Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                out.push((key, value));
            }
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    for (i, (key, event)) in records.iter().enumerate() {
        assert_eq!(key, &pid.to_string(), "keyed by producer id");
        assert_eq!(event["kind"], "out_of_order_sequence");
        assert_eq!(event["action"], "refused");
        assert_eq!(event["received_sequence"], [5, 9][i], "in order");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_last_stable_offset_is_flagged_and_clears() {
    let proxy = start_proxy_with(Cluster::Single, |c| {
        c.watchdog.lso_stuck = Duration::from_millis(800);
    })
    .await;
    let topic = unique_topic("stuck-lso");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    let bs = proxy.bootstrap().to_string();
    let t = topic.clone();
    let s = shared.clone();
    let lag_seen = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        use rdkafka::{Offset, TopicPartitionList};
        // A transaction left open holds the last stable offset back...
        let mut cfg = client_config(&bs);
        cfg.set("transactional.id", unique_topic("stuck-txn"));
        let txp: ThreadedProducer<DefaultProducerContext> = cfg.create().unwrap();
        txp.init_transactions(Duration::from_secs(30)).unwrap();
        txp.begin_transaction().unwrap();
        txp.send(BaseRecord::to(&t).key("x").payload("open"))
            .unwrap();
        txp.flush(Duration::from_secs(30)).unwrap();
        // ...while plain writes move the high watermark on.
        let plain: ThreadedProducer<DefaultProducerContext> = client_config(&bs).create().unwrap();
        let mut cfg = client_config(&bs);
        cfg.set("group.id", unique_topic("stuck-reader"))
            .set("isolation.level", "read_committed");
        let consumer: BaseConsumer = cfg.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let gauge = |s: &kafka_eos_proxy::server::Shared| {
            s.metrics.as_ref().unwrap().stuck_partitions.get()
        };
        while gauge(&s) == 0 && std::time::Instant::now() < deadline {
            plain
                .send(BaseRecord::to(&t).key("p").payload("plain"))
                .unwrap();
            plain.flush(Duration::from_secs(10)).unwrap();
            let _ = consumer.poll(Duration::from_millis(200));
        }
        let flagged = gauge(&s);
        let lag = s
            .metrics
            .as_ref()
            .unwrap()
            .read_committed_lag
            .with_label_values(&[&t, "0"])
            .get();
        // The transaction commits: the LSO moves and the flag clears.
        txp.commit_transaction(Duration::from_secs(30)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while gauge(&s) != 0 && std::time::Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(200));
        }
        (flagged, lag, gauge(&s))
    })
    .await
    .unwrap();
    assert_eq!(lag_seen.0, 1, "the stuck partition was flagged");
    assert!(
        lag_seen.1 > 0,
        "read_committed lag was exported while stuck"
    );
    assert_eq!(lag_seen.2, 0, "cleared after the commit");
    let kinds: Vec<_> = proxy
        .audits
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.topic.as_deref() == Some(topic.as_str()))
        .map(|e| e.kind)
        .collect();
    use kafka_eos_proxy::audit::Kind;
    assert!(kinds.contains(&Kind::StuckPartition), "{kinds:?}");
    assert!(kinds.contains(&Kind::StuckPartitionCleared), "{kinds:?}");
    proxy.stop().await;
}

/// 20,000 AddPartitionsToTxn for transactional ids that do not exist (the broker refuses each) once
/// opened 20,000 transactions at the proxy: the hanging gauge read 20,000 and a real transaction
/// committed afterwards was not seen. Refused requests now leave nothing behind, and a real
/// transaction is tracked, committed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_transactions_leave_nothing_and_a_real_one_is_counted() {
    use kafka_protocol::messages::{add_partitions_to_txn_request, AddPartitionsToTxnRequest};
    use kafka_protocol::messages::{ProducerId, TopicName, TransactionalId};
    use kafka_protocol::protocol::StrBytes;
    let proxy = start_proxy(Cluster::Single).await;
    let topic = unique_topic("fake-txns");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let mut raw = Raw::connect(&format!("{PROXY_HOST}:{}", proxy.broker_port(1))).await;
    let fakes = 20_000;
    let mut sent = 0;
    while sent < fakes {
        let chunk = 500.min(fakes - sent);
        for i in sent..sent + chunk {
            let req = AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(
                    format!("no-such-txn-{i}"),
                )))
                .with_v3_and_below_producer_id(ProducerId(1_000_000 + i64::from(i)))
                .with_v3_and_below_producer_epoch(0)
                .with_v3_and_below_topics(vec![
                    add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.clone())))
                        .with_partitions(vec![0]),
                ]);
            raw.send(ApiKey::AddPartitionsToTxn, 3, &req).await;
        }
        for _ in 0..chunk {
            raw.recv_frame().await.expect("answered");
        }
        sent += chunk;
    }
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    assert_eq!(
        shared.guard.txns.open_count(),
        0,
        "no refused transaction is open"
    );

    let txn = unique_topic("real-txn");
    let bs = proxy.bootstrap().to_string();
    let (t, tx) = (topic.clone(), txn.clone());
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let mut cfg = client_config(&bs);
        cfg.set("transactional.id", &tx)
            .set("client.id", "real-txn-client");
        let p: ThreadedProducer<DefaultProducerContext> = cfg.create().unwrap();
        p.init_transactions(Duration::from_secs(30)).unwrap();
        p.begin_transaction().unwrap();
        p.send(BaseRecord::to(&t).key("k").payload("v")).unwrap();
        p.flush(Duration::from_secs(30)).unwrap();
        p.commit_transaction(Duration::from_secs(30)).unwrap();
    })
    .await
    .unwrap();
    let m = shared.metrics.clone().unwrap();
    let labels = ["real-txn-client", txn.as_str()];
    assert_eq!(
        m.producers.txn_committed.with_label_values(&labels).get(),
        1
    );
    assert_eq!(
        m.producers
            .open_transactions
            .with_label_values(&labels)
            .get(),
        0
    );
    assert_eq!(m.hanging_transactions.get(), 0);
    assert_eq!(shared.guard.txns.open_count(), 0);
    proxy.stop().await;
}

/// Every metric name in the README's reference table, with its kind from the same row.
fn readme_metrics() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let names: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `kafka_eos_proxy_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("kafka_eos_proxy_{n}"))
        .collect();
    assert!(names.len() > 30, "the README lists its metrics: {names:?}");
    names
}

/// The names among `names` with a non-zero sample (any labels; histograms by their count).
fn nonzero(metrics: &str, names: &[String]) -> BTreeSet<String> {
    names
        .iter()
        .filter(|name| {
            let count = format!("{name}_count");
            metrics.lines().any(|l| {
                let series = l.split([' ', '{']).next().unwrap_or("");
                (series == name.as_str() || series == count)
                    && l.rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                        > 0.0
            })
        })
        .cloned()
        .collect()
}

async fn scrape_into(http: std::net::SocketAddr, names: &[String], moved: &mut BTreeSet<String>) {
    let (_, text) = http_get(http, "/metrics").await;
    moved.extend(nonzero(&text, names));
}

/// Drives each event behind every metric of the README's reference table and asserts that its metric
/// moved: a metric that nothing moves (as `connections_accepted_total` once was) fails here. Gauges
/// that rise and fall are read while raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_metric_moves() {
    let audit_file = std::env::temp_dir().join(unique_topic("audit-drops"));
    let policy_yaml = r#"
policies:
  - name: acks-audit
    match: { topics: { prefix: ["moves-pol-"] } }
    produce: { acks_all: audit }
  - name: upgrade
    match: { topics: { prefix: ["moves-up-"] } }
    produce: { idempotence: upgrade }
"#;
    let config_file = std::env::temp_dir().join(unique_topic("moves-config"));
    let af = audit_file.clone();
    let (break_next, brk) = break_next_produce_answer();
    let proxy = start_proxy_faulty(
        Cluster::Single,
        move |c| {
            // The broker's SSL listener, so that the certificate expiry gauge has a CA file to watch.
            c.upstream.bootstrap_servers = vec![crate::tls::SSL_BROKER.to_string()];
            c.upstream.tls = Some(crate::tls::upstream_tls(crate::tls::broker_ca()));
            c.metrics.listen = Some(format!("{PROXY_HOST}:0"));
            c.metrics.max_producer_series = 2;
            c.producer_state.max_tracked = 16;
            c.limits.max_connections = 6;
            c.watchdog.margin = Duration::from_millis(0);
            c.watchdog.interval = Duration::from_millis(100);
            c.watchdog.lso_stuck = Duration::from_millis(500);
            c.audit.file = Some(af.clone());
            // An audit topic on a cluster nobody answers at, with room for one event: the rest are dropped.
            c.audit.kafka = Some(kafka_eos_proxy::config::KafkaAuditConfig {
                topic: "nowhere".into(),
                bootstrap_servers: vec!["127.0.0.1:1".into()],
                queue: 1,
                tls: None,
                sasl: None,
            });
            c.policies = kafka_eos_proxy::Config::parse(&format!(
                "{}{policy_yaml}",
                proxy_yaml("127.0.0.1:1", 1, 2)
            ))
            .unwrap()
            .policies;
        },
        None,
        Some(brk),
    )
    .await;
    std::fs::write(
        &config_file,
        format!("{}{policy_yaml}", proxy_yaml(&kafka(Cluster::Single), 1, 2)),
    )
    .unwrap();
    let names = readme_metrics();
    let http = proxy.proxy.as_ref().unwrap().http_addr().unwrap();
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    let mut moved = BTreeSet::new();

    let topic = unique_topic("moves");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    let leader = format!("{PROXY_HOST}:{}", proxy.broker_port(1));

    // Producers: a duplicate answered, an epoch bump, a zombie epoch, a gap; three client ids for two
    // series slots; twenty producer ids for sixteen producer-partition slots.
    let mut raw = Raw::connect_as(&leader, "moves-a").await;
    let (pid, e) = init_producer_id(&mut raw, None).await;
    let first = produce(&topic, None, vec![(0, batch(pid, e, 0, 2, false, "m"))]);
    assert_eq!(send_produce(&mut raw, &first).await[0].1, 0);
    assert_eq!(send_produce(&mut raw, &first).await[0].1, 0, "duplicate");
    let bump = produce(&topic, None, vec![(0, batch(pid, e + 1, 0, 1, false, "m"))]);
    assert_eq!(send_produce(&mut raw, &bump).await[0].1, 0);
    let zombie = produce(&topic, None, vec![(0, batch(pid, e, 2, 1, false, "m"))]);
    assert_eq!(send_produce(&mut raw, &zombie).await[0].1, 47);
    let gap = produce(&topic, None, vec![(0, batch(pid, e + 1, 9, 1, false, "m"))]);
    assert_eq!(send_produce(&mut raw, &gap).await[0].1, 45);
    // A repeat without idempotence: the content window reports it (default audit).
    let plain = produce(&topic, None, vec![(0, batch(-1, -1, -1, 1, false, "dup"))]);
    assert_eq!(send_produce(&mut raw, &plain).await[0].1, 0);
    assert_eq!(send_produce(&mut raw, &plain).await[0].1, 0);
    // The idempotence upgrade: a batch, one the broker refuses (too large), one after it (the
    // partition restarts at the sequence after the first).
    let up = unique_topic("moves-up");
    create_topic(proxy.bootstrap(), &up, 1, 1).await;
    let upgraded = produce(&up, None, vec![(0, batch(-1, -1, -1, 1, false, "u"))]);
    assert_eq!(send_produce(&mut raw, &upgraded).await[0].1, 0);
    let big = too_large(&up);
    assert_eq!(send_produce(&mut raw, &big).await[0].1, 10);
    let after = produce(&up, None, vec![(0, batch(-1, -1, -1, 1, false, "v"))]);
    assert_eq!(send_produce(&mut raw, &after).await[0].1, 0);
    // One whose answer the proxy never reads (its broker connection breaks): the retry goes again
    // under its first stamp.
    let lost = produce(&up, None, vec![(0, batch(-1, -1, -1, 1, false, "l"))]);
    let mut once = Raw::connect_as(&leader, "moves-a").await;
    break_next.store(true, std::sync::atomic::Ordering::SeqCst);
    once.send(ApiKey::Produce, 11, &lost).await;
    assert!(once.recv_frame().await.is_none(), "the connection broke");
    assert_eq!(send_produce(&mut raw, &lost).await[0].2, 2);
    // Read before the two clients below take both series slots (and evict this client's series).
    scrape_into(http, &names, &mut moved).await;
    for client in ["moves-b", "moves-c"] {
        let mut other = Raw::connect_as(&leader, client).await;
        for _ in 0..10 {
            let (p, pe) = init_producer_id(&mut other, None).await;
            let req = produce(&topic, None, vec![(0, batch(p, pe, 0, 1, false, "n"))]);
            assert_eq!(send_produce(&mut other, &req).await[0].1, 0);
        }
    }
    // A policy audit: acks=1 to a topic whose rule wants acks=all.
    let pol_topic = unique_topic("moves-pol");
    create_topic(proxy.bootstrap(), &pol_topic, 1, 1).await;
    let mut weak = produce(
        &pol_topic,
        None,
        vec![(0, batch(pid, e + 1, 1, 1, false, "p"))],
    );
    weak.acks = 1;
    assert_eq!(send_produce(&mut raw, &weak).await[0].1, 0);
    scrape_into(http, &names, &mut moved).await;

    // Transactions: committed and aborted (librdkafka), one open past its timeout (hanging), holding
    // the last stable offset back while plain writes move the high watermark (stuck, lag).
    let hang = unique_topic("moves-hang");
    let (hpid, he) = init_producer_id_timeout(&mut raw, Some(&hang), 1000).await;
    assert_eq!(
        add_partitions(&mut raw, &hang, (hpid, he), &topic, 0).await,
        0
    );
    // A second one, with a long timeout: it keeps the last stable offset held after the broker aborts
    // the first.
    let hold = unique_topic("moves-hold");
    let (opid, oe) = init_producer_id_timeout(&mut raw, Some(&hold), 60_000).await;
    assert_eq!(
        add_partitions(&mut raw, &hold, (opid, oe), &topic, 0).await,
        0
    );
    let held2 = produce(
        &topic,
        Some(&hold),
        vec![(0, batch(opid, oe, 0, 1, true, "o"))],
    );
    assert_eq!(send_produce(&mut raw, &held2).await[0].1, 0);
    let held = produce(
        &topic,
        Some(&hang),
        vec![(0, batch(hpid, he, 0, 1, true, "h"))],
    );
    assert_eq!(send_produce(&mut raw, &held).await[0].1, 0);
    scrape_into(http, &names, &mut moved).await; // open_transactions
    commit_then_abort(
        proxy.bootstrap(),
        &topic,
        &unique_topic("moves-rd"),
        "moves-rd",
    )
    .await;
    // read_committed fetches while plain writes move the high watermark on and the held transactions
    // keep the last stable offset where it is, until the lag and the stuck partition show.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (bs, t, halt) = (proxy.bootstrap().to_string(), topic.clone(), stop.clone());
    let reader = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        use rdkafka::{Offset, TopicPartitionList};
        let c: BaseConsumer = client_config(&bs)
            .set("group.id", unique_topic("moves-g"))
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Beginning).unwrap();
        c.assign(&tpl).unwrap();
        let plain: ThreadedProducer<DefaultProducerContext> = client_config(&bs).create().unwrap();
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = plain.send(BaseRecord::to(&t).key("p").payload("plain"));
            let _ = plain.flush(Duration::from_secs(5));
            let _ = c.poll(Duration::from_millis(100));
        }
    });
    let wanted = [
        "kafka_eos_proxy_stuck_partitions",
        "kafka_eos_proxy_read_committed_lag_records",
        "kafka_eos_proxy_hanging_transactions",
    ];
    for _ in 0..300 {
        scrape_into(http, &names, &mut moved).await;
        if wanted.iter().all(|w| moved.contains(*w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();
    scrape_into(http, &names, &mut moved).await; // hanging, stuck, lag

    // Twenty transactions the broker accepted, for a tracker of sixteen: evictions.
    for i in 0..20 {
        let id = format!("{hang}-{i}");
        let (p, pe) = init_producer_id_timeout(&mut raw, Some(&id), 60_000).await;
        assert_eq!(add_partitions(&mut raw, &id, (p, pe), &topic, 0).await, 0);
    }

    // Audit events faster than a queue of one can take them: some are dropped (and counted).
    for _ in 0..50 {
        for seq in [100, 200, 300, 400, 500, 600, 700, 800] {
            let req = produce(
                &topic,
                None,
                vec![(0, batch(pid, e + 1, seq, 1, false, "d"))],
            );
            raw.send(ApiKey::Produce, 11, &req).await;
        }
        for _ in 0..8 {
            raw.recv_frame().await.expect("answered");
        }
        scrape_into(http, &names, &mut moved).await;
        if moved.contains("kafka_eos_proxy_audit_events_dropped_total") {
            break;
        }
    }

    // Connections: one held (active), one over the limit (rejected), one closed.
    let _held = Raw::connect(&leader).await;
    let mut extra = Vec::new();
    for _ in 0..8 {
        extra.push(
            tokio::net::TcpStream::connect(proxy.bootstrap())
                .await
                .unwrap(),
        );
    }
    drop(extra);
    // A reload of the policies from a file.
    let _ = kafka_eos_proxy::server::reload::reload(&shared, &config_file, "test");
    // What SIGHUP does to the certificate files: read again (applied: the CA file is unchanged).
    kafka_eos_proxy::server::certificates::reload_all(&shared, true, "test");
    scrape_into(http, &names, &mut moved).await;

    // An idempotent write by a client with a certificate (mTLS), on a proxy of its own: the principal
    // its producer series is named with.
    let pki = crate::tls::Pki::new("moves-mtls");
    let mtls = crate::tls::listen_tls(&pki, kafka_eos_proxy::tls::ClientAuth::Required, &[]);
    let named = start_proxy_with(Cluster::Single, move |c| {
        c.listen.tls = Some(mtls.clone());
        c.metrics.listen = Some(format!("{PROXY_HOST}:0"));
    })
    .await;
    let node = format!("{PROXY_HOST}:{}", named.broker_port(1));
    let mut alice = crate::tls::tls_client(&node, &pki.ca_file(), Some(pki.client("alice")))
        .await
        .expect("mTLS client");
    let (apid, ae) = init_producer_id(&mut alice, None).await;
    let req = produce(&topic, None, vec![(0, batch(apid, ae, 0, 1, false, "t"))]);
    assert_eq!(send_produce(&mut alice, &req).await[0].1, 0);
    let named_http = named.proxy.as_ref().unwrap().http_addr().unwrap();
    scrape_into(named_http, &names, &mut moved).await;
    named.stop().await;

    let missing: Vec<&String> = names.iter().filter(|n| !moved.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "metrics in the README that nothing moved: {missing:?}"
    );
    let _ = std::fs::remove_file(&audit_file);
    let _ = std::fs::remove_file(&config_file);
    proxy.stop().await;
}

/// The highest InitProducerId version a connection is offered.
async fn init_producer_id_max(raw: &mut Raw) -> i16 {
    let req = kafka_protocol::messages::ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("raw-test"))
        .with_client_software_version(StrBytes::from_static_str("1.0"));
    let resp: kafka_protocol::messages::ApiVersionsResponse =
        raw.call(ApiKey::ApiVersions, 3, &req).await;
    resp.api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::InitProducerId as i16)
        .map(|k| k.max_version)
        .expect("InitProducerId offered")
}

/// InitProducerId v6 (two-phase commit) for `txn`, built by hand: the codecs encode requests up to v5
/// (v6 is unstable in Kafka 4.4), and v6 is v5 plus two flags before the tagged fields.
async fn init_producer_id_two_phase(raw: &mut Raw, txn: &str, timeout_ms: i32) -> (i64, i16) {
    find_transaction_coordinator(raw, txn).await;
    for _ in 0..100 {
        let req = kafka_protocol::messages::InitProducerIdRequest::default()
            .with_transactional_id(Some(StrBytes::from_string(txn.to_string()).into()))
            .with_transaction_timeout_ms(timeout_ms)
            .with_producer_id(kafka_protocol::messages::ProducerId(-1))
            .with_producer_epoch(-1);
        let (corr, v5) = raw.encode(ApiKey::InitProducerId, 5, &req);
        let mut v6 = v5[..v5.len() - 1].to_vec();
        v6.extend_from_slice(&[1, 0, 0]); // enable 2PC, do not keep a prepared transaction, no tags
        v6[6..8].copy_from_slice(&6i16.to_be_bytes());
        let size = (v6.len() - 4) as i32;
        v6[..4].copy_from_slice(&size.to_be_bytes());
        raw.send_bytes(&v6).await;
        let frame = raw.recv_frame().await.expect("answered");
        let (header, resp) = kafka_eos_proxy::protocol::codec::decode_response::<
            kafka_protocol::messages::InitProducerIdResponse,
        >(frame, ApiKey::InitProducerId, 6)
        .expect("v6 answer");
        assert_eq!(header.correlation_id, corr);
        match resp.error_code {
            0 => {
                assert_eq!(resp.ongoing_txn_producer_id.0, -1, "nothing prepared");
                return (resp.producer_id.0, resp.producer_epoch);
            }
            14 | 15 | 16 | 51 => tokio::time::sleep(Duration::from_millis(200)).await,
            e => panic!("InitProducerId v6 failed with {e}"),
        }
    }
    panic!("InitProducerId v6 kept failing");
}

/// InitProducerId v6 (KIP-939, two-phase commit) is unstable in Kafka 4.4: offered only with
/// `upstream.unstable_api_versions`, in front of a broker that offers it (the test's dynamic cluster
/// runs with `unstable.api.versions.enable` and `transaction.two.phase.commit.enable`). Its flags are
/// read: a two-phase transaction never times out by design, so the watchdog never flags it, while an
/// ordinary transaction open as long is flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_commit_transactions_are_never_flagged_as_hanging() {
    let plain = start_proxy(Cluster::Dynamic).await;
    let mut raw = Raw::connect(plain.bootstrap()).await;
    assert_eq!(
        init_producer_id_max(&mut raw).await,
        5,
        "stable versions only"
    );
    plain.stop().await;

    let proxy = start_proxy_with(Cluster::Dynamic, |c| {
        c.upstream.unstable_api_versions = true;
        c.watchdog.margin = Duration::from_millis(0);
        c.watchdog.interval = Duration::from_millis(100);
    })
    .await;
    let mut raw = Raw::connect(proxy.bootstrap()).await;
    assert_eq!(init_producer_id_max(&mut raw).await, 6, "the broker's v6");
    let topic = unique_topic("two-phase");
    create_topic(proxy.bootstrap(), &topic, 1, 1).await;
    // Both ask for a 1 s timeout; the coordinator ignores it for the two-phase one.
    let two_phase = unique_topic("two-phase-txn");
    let ids = init_producer_id_two_phase(&mut raw, &two_phase, 1000).await;
    assert_eq!(
        add_partitions(&mut raw, &two_phase, ids, &topic, 0).await,
        0
    );
    let ordinary = unique_topic("ordinary-txn");
    let ids = init_producer_id_timeout(&mut raw, Some(&ordinary), 1000).await;
    assert_eq!(add_partitions(&mut raw, &ordinary, ids, &topic, 0).await, 0);
    let shared = proxy.proxy.as_ref().unwrap().shared().clone();
    assert_eq!(shared.guard.txns.open_count(), 2);
    eventually(
        "the watchdog to flag the ordinary transaction",
        Duration::from_secs(10),
        || async {
            !proxy
                .events(kafka_eos_proxy::audit::Kind::HangingTransaction)
                .is_empty()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let flagged: Vec<_> = proxy
        .events(kafka_eos_proxy::audit::Kind::HangingTransaction)
        .into_iter()
        .filter_map(|e| e.transactional_id)
        .collect();
    assert_eq!(flagged, vec![ordinary], "never the two-phase one");
    proxy.stop().await;
}

//! The hostile inputs of issue #11, replayed against a running proxy, with the proxy's resident memory
//! before and after each (from /proc/PID/status; the peak is reset per attack through
//! /proc/PID/clear_refs, which needs the same user or root). Prints one JSON line per attack.
//!
//!   cargo run --release --example attacks -- BOOTSTRAP BROKER HTTP PID [ATTACK...]
//!
//! BOOTSTRAP and BROKER are the proxy's bootstrap and node-1 listener, HTTP its operator endpoint, PID
//! its process. Attacks (all by default, in this order): client-id-producers, client-id-inits,
//! long-topic-names, producers-page, fake-transactions, stalled-http, lockout, api-versions-v5. `scripts/attacks` starts
//! a proxy (of any git revision) in front of the local broker and runs this against it.

use bytes::Bytes;
use kafka_eos_proxy::testkit::{decode_answer, record_batch, RawClient};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG_ID: usize = 30_000;

fn status(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(-1.0, |kb| kb / 1024.0)
}

fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn long_id(i: usize) -> String {
    let head = format!("attacker-{i}-");
    format!("{head}{}", "x".repeat(LONG_ID - head.len()))
}

fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

fn produce(topic: &str, txn: Option<&str>, records: Bytes) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_transactional_id(txn.map(|t| TransactionalId(StrBytes::from_string(t.into()))))
        .with_topic_data(vec![produce_request::TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(vec![
                produce_request::PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(records)),
            ])])
}

fn init(txn: Option<&str>) -> InitProducerIdRequest {
    InitProducerIdRequest::default()
        .with_transactional_id(txn.map(|t| TransactionalId(StrBytes::from_string(t.into()))))
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1)
}

async fn http_get(addr: &str, path: &str) -> usize {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return 0;
    };
    let _ = s
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body).await;
    body.len()
}

async fn metric_sum(http: &str, name: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(http).await else {
        return -1.0;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let Ok(mut c) = RawClient::connect(bootstrap, "attacks-admin").await else {
        return;
    };
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![create_topics_request::CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(1)
            .with_replication_factor(1)]);
    let _: std::io::Result<CreateTopicsResponse> = c.call(ApiKey::CreateTopics, 5, &req).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// 10,000 producer ids on one connection whose client id is 30 KB, one batch each.
async fn client_id_producers(broker: &str, topic: &str) -> String {
    let Ok(mut c) = RawClient::connect(broker, &long_id(0)).await else {
        return "cannot connect".into();
    };
    let mut written = 0;
    for _ in 0..100 {
        for _ in 0..100 {
            let _ = c.send(ApiKey::InitProducerId, 4, &init(None)).await;
        }
        let mut pids = Vec::new();
        for _ in 0..100 {
            if let Ok(f) = c.recv().await {
                if let Ok(r) = decode_answer::<InitProducerIdResponse>(ApiKey::InitProducerId, 4, f)
                {
                    pids.push((r.producer_id.0, r.producer_epoch));
                }
            }
        }
        for (pid, epoch) in &pids {
            let req = produce(topic, None, record_batch(*pid, *epoch, 0, 1, false, "a"));
            let _ = c.send(ApiKey::Produce, 9, &req).await;
        }
        for _ in &pids {
            if c.recv().await.is_ok() {
                written += 1;
            }
        }
    }
    format!("{written} producers answered")
}

/// 1,000 connections, each with its own 30 KB client id, one InitProducerId each.
async fn client_id_inits(broker: &str) -> String {
    let mut ok = 0;
    for i in 0..1000 {
        if let Ok(mut c) = RawClient::connect(broker, &long_id(i + 1)).await {
            let r: std::io::Result<InitProducerIdResponse> =
                c.call(ApiKey::InitProducerId, 4, &init(None)).await;
            ok += usize::from(r.is_ok());
        }
    }
    format!("{ok} answered")
}

/// 100 batches to topics with 900 KB names (the broker refuses them, and may close the connection:
/// each batch goes on a connection of its own).
async fn long_topic_names(broker: &str) -> String {
    let (mut answered, mut closed) = (0, 0);
    for i in 0..100 {
        let Ok(mut c) = RawClient::connect(broker, "long-topics").await else {
            return "cannot connect".into();
        };
        let Ok(r) = c
            .call::<_, InitProducerIdResponse>(ApiKey::InitProducerId, 4, &init(None))
            .await
        else {
            return "no producer id".into();
        };
        let name = format!("{i:04}{}", "t".repeat(900_000));
        let req = produce(
            &name,
            None,
            record_batch(r.producer_id.0, r.producer_epoch, 0, 1, false, "l"),
        );
        let _ = c.send(ApiKey::Produce, 9, &req).await;
        match c.recv().await {
            Ok(_) => answered += 1,
            Err(_) => closed += 1,
        }
    }
    format!("{answered} answered, {closed} connections closed")
}

/// 20,000 AddPartitionsToTxn for transactional ids that do not exist (the broker refuses each).
async fn fake_transactions(broker: &str, http: &str, topic: &str) -> String {
    let Ok(mut c) = RawClient::connect(broker, "fake-txns").await else {
        return "cannot connect".into();
    };
    for chunk in 0..40 {
        for i in 0..500 {
            let n = chunk * 500 + i;
            let req = AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(
                    format!("no-such-txn-{n}"),
                )))
                .with_v3_and_below_producer_id(ProducerId(5_000_000 + i64::from(n)))
                .with_v3_and_below_producer_epoch(0)
                .with_v3_and_below_topics(vec![
                    add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                        .with_name(topic_name(topic))
                        .with_partitions(vec![0]),
                ]);
            let _ = c.send(ApiKey::AddPartitionsToTxn, 3, &req).await;
        }
        for _ in 0..500 {
            let _ = c.recv().await;
        }
    }
    let open = metric_sum(http, "kafka_eos_proxy_open_transactions").await;
    format!("open transactions at the proxy afterwards: {open}")
}

/// 40 clients ask for /producers and never read; held 10 s.
async fn stalled_http(http: &str, pid: u32) -> String {
    let mut held = Vec::new();
    for _ in 0..40 {
        if let Ok(mut s) = TcpStream::connect(http).await {
            let _ = s
                .write_all(b"GET /producers HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            held.push(s);
        }
    }
    let mut peak = 0.0f64;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(status(pid, "VmRSS:"));
    }
    drop(held);
    format!("RSS while held: {peak:.1} MiB")
}

/// ApiVersions v5 as kafka-clients 4.4 sends it (the v3 body; Kafka 4.4 answers v5 in flexible form).
async fn api_versions_v5(bootstrap: &str) -> String {
    let Ok(mut c) = RawClient::connect(bootstrap, "v5").await else {
        return "cannot connect".into();
    };
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("x"))
        .with_client_software_version(StrBytes::from_static_str("1"));
    let Ok(mut frame) =
        kafka_eos_proxy::testkit::request_frame(ApiKey::ApiVersions, 3, 1, "v5", &req)
    else {
        return "cannot encode".into();
    };
    // v5 = the v3 body plus ClusterId (null compact string) and NodeId (-1), before the tagged fields.
    let mut bytes = frame.to_vec();
    bytes[6..8].copy_from_slice(&5i16.to_be_bytes());
    bytes.pop();
    bytes.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0]);
    let size = (bytes.len() - 4) as i32;
    bytes[..4].copy_from_slice(&size.to_be_bytes());
    frame = Bytes::from(bytes);
    let _ = c.send_bytes(&frame).await;
    match tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
        Ok(Ok(answer)) => {
            match decode_answer::<ApiVersionsResponse>(ApiKey::ApiVersions, 0, answer) {
                Ok(r) => format!("answered with error code {}", r.error_code),
                Err(e) => format!("unreadable answer: {e}"),
            }
        }
        Ok(Err(e)) => format!("connection closed: {e}"),
        Err(_) => "no answer within 5 s".into(),
    }
}

/// 22 clients pipeline requests and never read their answers; how long until a new client is served.
async fn lockout(bootstrap: &str) -> String {
    let mut one = Vec::new();
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("x"))
        .with_client_software_version(StrBytes::from_static_str("1"));
    for corr in 0..20_000 {
        if let Ok(f) =
            kafka_eos_proxy::testkit::request_frame(ApiKey::ApiVersions, 3, corr, "lock", &req)
        {
            one.extend_from_slice(&f);
        }
    }
    let one = Bytes::from(one);
    let mut writers = Vec::new();
    for _ in 0..22 {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            continue;
        };
        let _ = socket.set_recv_buffer_size(4096);
        let Ok(addr) = bootstrap.parse() else {
            continue;
        };
        if let Ok(mut s) = socket.connect(addr).await {
            let bytes = one.clone();
            writers.push(tokio::spawn(async move {
                let _ = s.write_all(&bytes).await;
                tokio::time::sleep(Duration::from_secs(300)).await;
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let served = loop {
        if start.elapsed() > Duration::from_secs(120) {
            break None;
        }
        if let Ok(mut c) = RawClient::connect(bootstrap, "newcomer").await {
            let answer = tokio::time::timeout(
                Duration::from_secs(1),
                c.call::<_, ApiVersionsResponse>(ApiKey::ApiVersions, 3, &req),
            )
            .await;
            if matches!(answer, Ok(Ok(_))) {
                break Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for w in writers {
        w.abort();
    }
    match served {
        Some(d) => format!("a new client was served after {:.1} s", d.as_secs_f64()),
        None => "no new client served within 120 s".into(),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, broker, http, pid, chosen @ ..] = args.as_slice() else {
        eprintln!("usage: attacks BOOTSTRAP BROKER HTTP PID [ATTACK...]");
        std::process::exit(2);
    };
    let pid: u32 = pid.parse().unwrap_or(0);
    let all = [
        "client-id-producers",
        "client-id-inits",
        "long-topic-names",
        "producers-page",
        "fake-transactions",
        "stalled-http",
        "lockout",
        "api-versions-v5",
    ];
    let chosen: Vec<&str> = if chosen.is_empty() {
        all.to_vec()
    } else {
        chosen.iter().map(String::as_str).collect()
    };
    let topic = format!("attacks-{}", std::process::id());
    create_topic(bootstrap, &topic).await;
    for attack in chosen {
        reset_peak(pid);
        let before = status(pid, "VmRSS:");
        let started = Instant::now();
        let detail = match attack {
            "client-id-producers" => client_id_producers(broker, &topic).await,
            "client-id-inits" => client_id_inits(broker).await,
            "long-topic-names" => long_topic_names(broker).await,
            "producers-page" => format!("answer of {} bytes", http_get(http, "/producers").await),
            "fake-transactions" => fake_transactions(broker, http, &topic).await,
            "stalled-http" => stalled_http(http, pid).await,
            "lockout" => lockout(bootstrap).await,
            "api-versions-v5" => api_versions_v5(bootstrap).await,
            other => format!("unknown attack {other}"),
        };
        let alive = status(pid, "VmRSS:") >= 0.0;
        println!(
            "{{\"attack\":\"{attack}\",\"rss_before_mib\":{before:.1},\"rss_after_mib\":{:.1},\"peak_mib\":{:.1},\"seconds\":{:.1},\"proxy_alive\":{alive},\"detail\":\"{detail}\"}}",
            status(pid, "VmRSS:"),
            status(pid, "VmHWM:"),
            started.elapsed().as_secs_f64(),
        );
    }
}

//! Many idempotent producers at once (issue #6): PRODUCERS producer ids, each writing BATCHES batches to
//! every one of PARTITIONS partitions, spoken on the raw wire over a few pipelined connections (a
//! thousand librdkafka instances would measure librdkafka's threads, not the proxy). Each producer
//! always uses the same connection, so its sequences arrive in order. Prints one JSON line.
//!
//!   cargo run --release --example many_producers -- BOOTSTRAP TOPIC PRODUCERS PARTITIONS BATCHES LABEL
//!
//! The bootstrap must be a single-broker cluster (every partition's leader is behind it).

use bytes::Bytes;
use kafka_protocol::messages::{
    create_topics_request, produce_request, ApiKey, CreateTopicsRequest, CreateTopicsResponse,
    InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse, ProducerId,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const CONNECTIONS: usize = 8;
const IN_FLIGHT: usize = 64;
const RECORDS_PER_BATCH: i32 = 5;
const VALUE_BYTES: usize = 200;
const PRODUCE_VERSION: i16 = 9;
const INIT_VERSION: i16 = 4;

fn frame<R: Encodable>(key: ApiKey, version: i16, corr: i32, req: &R) -> Bytes {
    kafka_eos_proxy::testkit::request_frame(key, version, corr, "many-producers", req)
        .unwrap_or_else(|e| fail(&format!("encode: {e}")))
}

fn fail(msg: &str) -> ! {
    eprintln!("many_producers: {msg}");
    std::process::exit(1);
}

async fn read_frame(stream: &mut tokio::net::tcp::OwnedReadHalf) -> Bytes {
    let mut size = [0u8; 4];
    if stream.read_exact(&mut size).await.is_err() {
        fail("connection closed");
    }
    let mut body = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
    if stream.read_exact(&mut body).await.is_err() {
        fail("connection closed mid-frame");
    }
    Bytes::from(body)
}

fn decode<T: Decodable>(key: ApiKey, version: i16, mut body: Bytes) -> T {
    let hv = key.response_header_version(version);
    ResponseHeader::decode(&mut body, hv)
        .and_then(|_| T::decode(&mut body, version))
        .unwrap_or_else(|e| fail(&format!("decode {key:?}: {e}")))
}

fn batch(pid: i64, seq: i32) -> Bytes {
    kafka_eos_proxy::testkit::record_batch_sized(pid, 0, seq, RECORDS_PER_BATCH, VALUE_BYTES)
}

/// CreateTopics on the raw wire (an error other than "already exists" ends the run).
async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let stream = TcpStream::connect(bootstrap)
        .await
        .unwrap_or_else(|e| fail(&format!("connect {bootstrap}: {e}")));
    let (mut rd, mut wr) = stream.into_split();
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![create_topics_request::CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_num_partitions(partitions)
            .with_replication_factor(1)]);
    if wr
        .write_all(&frame(ApiKey::CreateTopics, 5, 1, &req))
        .await
        .is_err()
    {
        fail("write");
    }
    let r: CreateTopicsResponse = decode(ApiKey::CreateTopics, 5, read_frame(&mut rd).await);
    for t in &r.topics {
        if t.error_code != 0 && t.error_code != 36 {
            fail(&format!("create topic: error {}", t.error_code));
        }
    }
}

/// One connection's share: init its producers, then write their batches, pipelined.
async fn run_connection(
    bootstrap: String,
    topic: String,
    producers: usize,
    partitions: i32,
    batches: i32,
) -> (usize, usize) {
    let stream = TcpStream::connect(&bootstrap)
        .await
        .unwrap_or_else(|e| fail(&format!("connect {bootstrap}: {e}")));
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    // Producer ids, one round trip each (how a client starts).
    let mut pids = Vec::with_capacity(producers);
    for i in 0..producers {
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let f = frame(ApiKey::InitProducerId, INIT_VERSION, i as i32, &req);
        let mut attempts = 0;
        let pid = loop {
            if wr.write_all(&f).await.is_err() {
                fail("write");
            }
            let r: InitProducerIdResponse = decode(
                ApiKey::InitProducerId,
                INIT_VERSION,
                read_frame(&mut rd).await,
            );
            match r.error_code {
                0 => break r.producer_id.0,
                // Coordinator loading / not available (a broker that just started): retry.
                14 | 15 if attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                e => fail(&format!("InitProducerId error {e}")),
            }
        };
        pids.push(pid);
    }
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let total = producers * partitions as usize * batches as usize;
    let reader_window = window.clone();
    let reader = tokio::spawn(async move {
        let mut errors = 0usize;
        for _ in 0..total {
            let r: ProduceResponse =
                decode(ApiKey::Produce, PRODUCE_VERSION, read_frame(&mut rd).await);
            errors += r
                .responses
                .iter()
                .flat_map(|t| t.partition_responses.iter())
                .filter(|p| p.error_code != 0)
                .count();
            reader_window.add_permits(1);
        }
        errors
    });
    let mut corr = 1_000_000;
    for b in 0..batches {
        for pid in &pids {
            for p in 0..partitions {
                let req = ProduceRequest::default()
                    .with_acks(-1)
                    .with_timeout_ms(30_000)
                    .with_transactional_id(None)
                    .with_topic_data(vec![produce_request::TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_string(topic.clone())))
                        .with_partition_data(vec![
                            produce_request::PartitionProduceData::default()
                                .with_index(p)
                                .with_records(Some(batch(*pid, b * RECORDS_PER_BATCH))),
                        ])]);
                corr += 1;
                let f = frame(ApiKey::Produce, PRODUCE_VERSION, corr, &req);
                match window.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => fail("window closed"),
                }
                if wr.write_all(&f).await.is_err() {
                    fail("write");
                }
            }
        }
    }
    let errors = reader
        .await
        .unwrap_or_else(|e| fail(&format!("reader: {e}")));
    (total, errors)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        fail("usage: many_producers BOOTSTRAP TOPIC PRODUCERS PARTITIONS BATCHES LABEL");
    }
    let (bootstrap, topic, label) = (&args[1], &args[2], &args[6]);
    let num = |i: usize| -> usize { args[i].parse().unwrap_or_else(|_| fail("numbers please")) };
    let (producers, partitions, batches) = (num(3), num(4) as i32, num(5) as i32);
    create_topic(bootstrap, topic, partitions).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // leaders elected
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let share = producers / CONNECTIONS + usize::from(c < producers % CONNECTIONS);
            tokio::spawn(run_connection(
                bootstrap.clone(),
                topic.clone(),
                share,
                partitions,
                batches,
            ))
        })
        .collect();
    let (mut sent, mut errors) = (0, 0);
    for t in tasks {
        let (s, e) = t.await.unwrap_or_else(|e| fail(&format!("task: {e}")));
        sent += s;
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    let records = sent as f64 * f64::from(RECORDS_PER_BATCH);
    println!(
        "{{\"label\":\"{label}\",\"producers\":{producers},\"partitions\":{partitions},\"batches\":{sent},\"errors\":{errors},\"seconds\":{seconds:.3},\"batches_per_sec\":{:.1},\"records_per_sec\":{:.1},\"mb_per_sec\":{:.2}}}",
        sent as f64 / seconds,
        records / seconds,
        records * VALUE_BYTES as f64 / seconds / 1e6
    );
}

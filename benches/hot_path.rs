//! Micro-benchmarks of the proxy's hot path: what every request or batch pays.
//!
//!   cargo bench --bench hot_path            (full run, figures in target/criterion)
//!   cargo test --bench hot_path             (each benchmark once, as a smoke test)

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kafka_eos_proxy::config::Config;
use kafka_eos_proxy::eos::{self, Acked, Batch, PartitionState};
use kafka_eos_proxy::filters::{addresses, skim};
use kafka_eos_proxy::guard::store::ProducerStore;
use kafka_eos_proxy::protocol::batch::validate_client_records;
use kafka_eos_proxy::protocol::codec::encode_response;
use kafka_eos_proxy::protocol::header::{peek_request, produce_acks};
use kafka_eos_proxy::protocol::produce;
use kafka_eos_proxy::server::brokers::Brokers;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    ApiKey, BrokerId, MetadataResponse, ProduceRequest, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::StrBytes;

/// A v2 batch of `n` records of `size` bytes from producer 42, epoch 0, at sequence `seq`.
fn batch(seq: i32, n: i32, size: usize) -> Bytes {
    kafka_eos_proxy::testkit::record_batch_sized(42, 0, seq, n, size)
}

fn produce_frame(records: Bytes) -> Bytes {
    let version = 11;
    let body = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            kafka_protocol::messages::produce_request::TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partition_data(vec![
                    kafka_protocol::messages::produce_request::PartitionProduceData::default()
                        .with_index(3)
                        .with_records(Some(records)),
                ]),
        ]);
    kafka_eos_proxy::testkit::request_frame(ApiKey::Produce, version, 7, "bench-client", &body)
        .expect("encode produce")
}

fn bench(c: &mut Criterion) {
    // 16 records of 1 KiB: a typical batch.
    let records = batch(0, 16, 1024);
    let frame = produce_frame(records.clone());

    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("frame_header_peek", |b| {
        b.iter(|| {
            let head = peek_request(std::hint::black_box(&frame)).expect("peek");
            produce_acks(&frame, &head).expect("acks")
        })
    });
    g.bench_function("produce_walk", |b| {
        let head = peek_request(&frame).expect("peek");
        let names = produce::TopicNames::new();
        b.iter(|| {
            produce::parse(
                std::hint::black_box(&frame),
                head.body_offset.unwrap_or(0),
                11,
                &names,
            )
            .expect("walk")
            .partition_count()
        })
    });
    g.bench_function("batch_header_parse", |b| {
        b.iter(|| validate_client_records(std::hint::black_box(&records), false).expect("valid"))
    });
    g.throughput(Throughput::Bytes(records.len() as u64));
    g.bench_function("batch_header_parse_with_crc_16KiB", |b| {
        b.iter(|| validate_client_records(std::hint::black_box(&records), true).expect("valid"))
    });
    // The content window's share of a batch: its digest (a CRC-32C of the records) and its key.
    let window = kafka_eos_proxy::guard::content::ContentWindow::new(
        100_000,
        std::time::Duration::from_secs(300),
    );
    g.bench_function("content_digest_and_key_16KiB", |b| {
        b.iter(|| {
            let h =
                kafka_eos_proxy::protocol::batch::BatchHeader::new(std::hint::black_box(&records))
                    .expect("header");
            window.key(&("app", "10.0.0.1"), "topic", 0, h.content_digest())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("producer_state");
    g.throughput(Throughput::Elements(1));
    let mut state = PartitionState::new_complete(0);
    for i in 0..5 {
        state.acknowledge(
            0,
            Acked {
                first_seq: i * 16,
                last_seq: i * 16 + 15,
                first_offset: i64::from(i) * 16,
                timestamp: 1,
                acks_all: true,
            },
        );
    }
    let next = Batch {
        epoch: 0,
        first_seq: 80,
        last_seq: 95,
    };
    let in_flight = [Batch {
        epoch: 0,
        first_seq: 96,
        last_seq: 111,
    }];
    g.bench_function("check_in_order", |b| {
        b.iter(|| eos::check(Some(std::hint::black_box(&state)), &[], next))
    });
    g.bench_function("check_with_in_flight", |b| {
        b.iter(|| eos::check(Some(std::hint::black_box(&state)), &in_flight, next))
    });
    g.bench_function("check_duplicate", |b| {
        let dup = Batch {
            epoch: 0,
            first_seq: 32,
            last_seq: 47,
        };
        b.iter(|| eos::check(Some(std::hint::black_box(&state)), &[], dup))
    });
    // The shared store: check, track, and learn from the answer, over 10,000 producer-partitions.
    let store = ProducerStore::new(1_000_000, u64::MAX);
    let keys: Vec<_> = (0..10_000)
        .filter_map(|i| store.key(i, "orders", (i % 10) as i32))
        .collect();
    let mut seqs = vec![0i32; keys.len()];
    let mut i = 0usize;
    g.bench_function("store_check_track_acknowledge", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let (key, seq) = (&keys[i], seqs[i]);
            let batch = Batch {
                epoch: 0,
                first_seq: seq,
                last_seq: seq + 15,
            };
            let v = store.check_and_track(key, batch, 0);
            store.acknowledge(
                key,
                batch,
                Acked {
                    first_seq: seq,
                    last_seq: seq + 15,
                    first_offset: 0,
                    timestamp: 0,
                    acks_all: true,
                },
                0,
            );
            seqs[i] = seq + 16;
            v
        })
    });
    g.finish();

    // Metadata rewrite: 3 brokers, 100 topics of 10 partitions (the decode and re-encode dominate).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = Config::parse(
        "upstream: {bootstrap_servers: [\"127.0.0.1:1\"]}\nlisten: {bind_host: 127.0.0.1, advertised_host: proxy.example, bootstrap_port: 1, broker_ports: {range: {first_port: 40100, count: 10}}}\n",
    )
    .expect("bench config");
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let brokers = Brokers::new(&config.listen, tx);
    let response = MetadataResponse::default()
        .with_brokers(
            (1..=3)
                .map(|n| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(n))
                        .with_host(StrBytes::from_static_str("10.0.0.1"))
                        .with_port(9092)
                })
                .collect(),
        )
        .with_topics(
            (0..100)
                .map(|t| {
                    MetadataResponseTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_string(format!("topic-{t}")))))
                        .with_partitions(
                            (0..10)
                                .map(|p| {
                                    MetadataResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_leader_id(BrokerId(p % 3 + 1))
                                })
                                .collect(),
                        )
                })
                .collect(),
        );
    let metadata = encode_response(&ResponseHeader::default(), &response, ApiKey::Metadata, 12)
        .expect("encode metadata");
    // First pass binds the broker listeners; the benchmark then measures the steady state.
    runtime.block_on(async {
        let _ = addresses::rewrite_response(metadata.clone(), ApiKey::Metadata, 12, &brokers).await;
    });
    let mut g = c.benchmark_group("response");
    g.throughput(Throughput::Elements(1));
    g.bench_function("metadata_rewrite_100_topics", |b| {
        b.to_async(&runtime).iter_batched(
            || metadata.clone(),
            |m| async {
                addresses::rewrite_response(m, ApiKey::Metadata, 12, &brokers)
                    .await
                    .expect("rewrite")
            },
            BatchSize::SmallInput,
        )
    });
    let fetch = {
        use kafka_protocol::messages::fetch_response::{
            FetchResponse, FetchableTopicResponse, PartitionData,
        };
        let resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic_id(uuid::Uuid::from_bytes([7; 16]))
            .with_partitions(
                (0..10)
                    .map(|p| {
                        PartitionData::default()
                            .with_partition_index(p)
                            .with_records(Some(records.clone()))
                    })
                    .collect(),
            )]);
        encode_response(&ResponseHeader::default(), &resp, ApiKey::Fetch, 17).expect("encode fetch")
    };
    g.throughput(Throughput::Bytes(fetch.len() as u64));
    g.bench_function("fetch_skim_10_partitions_160KiB", |b| {
        b.iter(|| {
            skim::fetch_walk(std::hint::black_box(&fetch), 17, |p| {
                std::hint::black_box(p);
            })
            .expect("walk")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

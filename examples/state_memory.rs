//! Bytes of resident memory per tracked producer-partition, with a full window (5 acknowledged batches)
//! each: PRODUCERS producers x 10 partitions x 20 topics, measured as the RSS growth of this process.
//! Each producer also carries a client id and a transactional id of CLIENT_ID_BYTES bytes (default 10),
//! kept the way the guard keeps them (owner record, per-producer metric labels), so the figure includes
//! strings: a client that names itself with 30 KB must not cost 30 KB per producer.
//!
//!   cargo run --release --example state_memory [PRODUCERS] [CLIENT_ID_BYTES]
//!   (compare: ... 10000 10   and   ... 10000 30000)

use kafka_eos_proxy::eos::{Acked, Batch};
use kafka_eos_proxy::guard::store::ProducerStore;
use kafka_eos_proxy::metrics::{producer_labels, Metrics};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn main() {
    let producers: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let id_bytes: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let metrics = Metrics::new(1000).expect("metrics"); // the default metrics.max_producer_series
    let store = ProducerStore::new(100_000_000, u64::MAX);
    let before = rss_bytes();
    let mut entries = 0u64;
    let start = std::time::Instant::now();
    for pid in 0..producers {
        // Distinct per producer, as an attacker sends them: nothing can be shared.
        let client_id = format!("{pid:0>width$}", width = id_bytes.max(1));
        store.set_owner(pid, Some(&client_id), Some(&client_id));
        let labels = producer_labels(&client_id, &client_id);
        metrics.producers.admit(labels[0], labels[1]);
        metrics.producers.batches.with_label_values(&labels).inc();
        let topic = format!("topic-{}", pid % 20);
        for partition in 0..10 {
            let Some(key) = store.key(pid, &topic, partition) else {
                continue;
            };
            for b in 0..5 {
                let batch = Batch {
                    epoch: 0,
                    first_seq: b * 10,
                    last_seq: b * 10 + 9,
                };
                store.check_and_track(&key, batch, 0);
                let acked = Acked {
                    first_seq: batch.first_seq,
                    last_seq: batch.last_seq,
                    first_offset: i64::from(b) * 10,
                    timestamp: 1_700_000_000_000,
                    acks_all: true,
                };
                store.acknowledge(&key, batch, acked, 0);
            }
            entries += 1;
        }
    }
    let elapsed = start.elapsed();
    let after = rss_bytes();
    println!(
        "{{\"client_id_bytes\":{id_bytes},\"producer_partitions\":{entries},\"bytes_per_producer_partition\":{:.0},\"rss_growth_mib\":{:.1},\"ns_per_check_and_ack\":{:.0}}}",
        (after.saturating_sub(before)) as f64 / entries as f64,
        (after.saturating_sub(before)) as f64 / 1048576.0,
        elapsed.as_nanos() as f64 / (entries * 5) as f64,
    );
    assert_eq!(store.len() as u64, entries);
}

//! Consumer fetch throughput: reads RECORDS records of TOPIC from the beginning; prints one JSON line.
//!
//!   cargo run --release --example fetch_bench -- BOOTSTRAP TOPIC RECORDS LABEL

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: fetch_bench BOOTSTRAP TOPIC RECORDS LABEL");
        std::process::exit(2);
    }
    let (bootstrap, topic, label) = (&args[1], &args[2], &args[4]);
    let want: u64 = args[3].parse().unwrap_or(0);
    // BENCH_TLS_CA: speak TLS, trusting this CA (scripts/bench's TLS paths).
    let mut config = ClientConfig::new();
    if let Some(ca) = std::env::var("BENCH_TLS_CA").ok().filter(|c| !c.is_empty()) {
        config
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", ca);
    }
    let consumer: BaseConsumer = match config
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("group.id", format!("fetch-bench-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("consumer: {e}");
            std::process::exit(1);
        }
    };
    let mut tpl = TopicPartitionList::new();
    let _ = tpl.add_partition_offset(topic, 0, Offset::Beginning);
    if consumer.assign(&tpl).is_err() {
        std::process::exit(1);
    }
    let (mut n, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    while n < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
            bytes += m.payload().map_or(0, |p| p.len() as u64);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"label\":\"{label}\",\"records\":{n},\"seconds\":{secs:.3},\"records_per_sec\":{:.0},\"mb_per_sec\":{:.2}}}",
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    );
    if n < want {
        std::process::exit(1);
    }
}

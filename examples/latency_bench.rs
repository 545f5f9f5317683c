//! Produce round-trip latency without queueing: one 1 KiB record at a time (idempotent, acks=all), each
//! awaited before the next; prints p50/p99/p999 in one JSON line.
//!
//!   cargo run --release --example latency_bench -- BOOTSTRAP TOPIC RECORDS LABEL

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: latency_bench BOOTSTRAP TOPIC RECORDS LABEL");
        std::process::exit(2);
    }
    let (bootstrap, topic, label) = (&args[1], &args[2], &args[4]);
    let records: usize = args[3].parse().unwrap_or(1000);
    let producer: FutureProducer = match ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("producer: {e}");
            std::process::exit(1);
        }
    };
    let payload = vec![b'x'; 1024];
    // Warm up: metadata, connections, producer id.
    for _ in 0..20 {
        let _ = producer
            .send(
                FutureRecord::to(topic).key("w").payload(&payload),
                Duration::from_secs(30),
            )
            .await;
    }
    let mut micros = Vec::with_capacity(records);
    for i in 0..records {
        let key = i.to_string();
        let start = Instant::now();
        if producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .is_err()
        {
            eprintln!("delivery failed");
            std::process::exit(1);
        }
        micros.push(start.elapsed().as_micros() as u64);
    }
    micros.sort_unstable();
    let pct =
        |p: f64| micros[((micros.len() as f64 * p) as usize).min(micros.len() - 1)] as f64 / 1000.0;
    println!(
        "{{\"label\":\"{label}\",\"records\":{records},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3}}}",
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
}

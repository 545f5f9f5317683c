//! Transactional producer commits per second: for SECONDS, begin, write 10 records of 1 KiB, commit.
//! Prints one JSON line.
//!
//!   cargo run --release --example txn_bench -- BOOTSTRAP TOPIC SECONDS LABEL

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: txn_bench BOOTSTRAP TOPIC SECONDS LABEL");
        std::process::exit(2);
    }
    let seconds: u64 = args[3].parse().unwrap_or(10);
    let label = &args[4];
    let producer: ThreadedProducer<DefaultProducerContext> = match ClientConfig::new()
        .set("bootstrap.servers", &args[1])
        .set("broker.address.family", "v4")
        .set(
            "transactional.id",
            format!("txn-bench-{label}-{}", std::process::id()),
        )
        .set("linger.ms", "0")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("producer: {e}");
            std::process::exit(1);
        }
    };
    let t = Duration::from_secs(30);
    if producer.init_transactions(t).is_err() {
        std::process::exit(1);
    }
    let payload = vec![b'x'; 1024];
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut commits = 0u64;
    while Instant::now() < end {
        if producer.begin_transaction().is_err() {
            break;
        }
        for i in 0..10 {
            let k = i.to_string();
            let _ = producer.send(BaseRecord::to(&args[2]).key(&k).payload(&payload));
        }
        if producer.commit_transaction(t).is_err() {
            break;
        }
        commits += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"label\":\"{label}\",\"commits\":{commits},\"seconds\":{secs:.3},\"commits_per_sec\":{:.1}}}",
        commits as f64 / secs
    );
}

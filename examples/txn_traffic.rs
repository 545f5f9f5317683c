//! Transactional traffic for a while (commits and some aborts), for watching the dashboard:
//!
//!   cargo run --release --example txn_traffic -- BOOTSTRAP TOPIC SECONDS

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: txn_traffic BOOTSTRAP TOPIC SECONDS");
        std::process::exit(2);
    }
    let seconds: u64 = args[3].parse().unwrap_or(60);
    let producer: ThreadedProducer<DefaultProducerContext> = match ClientConfig::new()
        .set("bootstrap.servers", &args[1])
        .set("broker.address.family", "v4")
        .set("client.id", "txn-traffic")
        .set("transactional.id", "txn-traffic-1")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("producer: {e}");
            std::process::exit(1);
        }
    };
    let t = Duration::from_secs(30);
    if let Err(e) = producer.init_transactions(t) {
        eprintln!("init_transactions: {e}");
        std::process::exit(1);
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut commits, mut aborts) = (0, 0);
    let mut n = 0u64;
    while Instant::now() < end {
        if producer.begin_transaction().is_err() {
            break;
        }
        for _ in 0..50 {
            n += 1;
            let v = n.to_string();
            let _ = producer.send(BaseRecord::to(&args[2]).key(&v).payload(&v));
        }
        let _ = producer.flush(t);
        let ok = if n % 500 == 0 {
            aborts += 1;
            producer.abort_transaction(t)
        } else {
            commits += 1;
            producer.commit_transaction(t)
        };
        if let Err(e) = ok {
            eprintln!("end transaction: {e}");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{{\"commits\":{commits},\"aborts\":{aborts}}}");
}

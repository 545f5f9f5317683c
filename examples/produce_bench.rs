//! Produce throughput of a librdkafka producer (acks=all, idempotent by default) against one bootstrap
//! address; prints one JSON line. Used by scripts/bench-produce to compare direct vs through the proxy.
//!
//!   cargo run --release --example produce_bench -- BOOTSTRAP TOPIC RECORDS RECORD_BYTES LABEL

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    latency_us: std::sync::Mutex<Vec<u32>>,
}

struct Ctx(Arc<Counts>);
impl ClientContext for Ctx {}
impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, r: &DeliveryResult<'_>, sent: Box<Instant>) {
        match r {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut l) = self.0.latency_us.lock() {
                    l.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            Err(_) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: produce_bench BOOTSTRAP TOPIC RECORDS RECORD_BYTES LABEL");
        std::process::exit(2);
    }
    let (bootstrap, topic, label) = (&args[1], &args[2], &args[5]);
    let records: u64 = args[3].parse().expect("RECORDS");
    let size: usize = args[4].parse().expect("RECORD_BYTES");
    let counts = Arc::new(Counts::default());
    // BENCH_TLS_CA: speak TLS, trusting this CA (scripts/bench's TLS paths).
    let mut config = ClientConfig::new();
    if let Some(ca) = std::env::var("BENCH_TLS_CA").ok().filter(|c| !c.is_empty()) {
        config
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", ca);
    }
    let producer: ThreadedProducer<Ctx> = config
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("acks", "all")
        // BENCH_IDEMPOTENCE=false: a producer without idempotence (scripts/bench's upgrade paths).
        .set(
            "enable.idempotence",
            std::env::var("BENCH_IDEMPOTENCE").unwrap_or_else(|_| "true".into()),
        )
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(Ctx(counts.clone()))
        .expect("producer");
    let payload = vec![b'x'; size];
    let start = Instant::now();
    for i in 0..records {
        let key = i.to_string();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(Instant::now()))
            .key(&key)
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    use rdkafka::producer::Producer;
    producer.flush(Duration::from_secs(300)).expect("flush");
    let secs = start.elapsed().as_secs_f64();
    let ok = counts.ok.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let mut lat = counts
        .latency_us
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"label\":\"{label}\",\"records\":{ok},\"failed\":{failed},\"seconds\":{secs:.3},\"records_per_sec\":{:.0},\"mb_per_sec\":{:.2},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2}}}",
        ok as f64 / secs,
        ok as f64 * size as f64 / secs / 1e6,
        f64::from(pct(0.50)) / 1000.0,
        f64::from(pct(0.99)) / 1000.0,
        f64::from(pct(0.999)) / 1000.0,
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

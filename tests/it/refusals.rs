//! Errors the proxy invents, met by every client library as it meets the broker's own. Each policy
//! refusal is answered at the proxy with the error the broker uses for the same condition (see the
//! README's policy table), so each library reacts as it was built to: the write or the transaction fails
//! at once with that error, and no library retries it for ever. The same policy, the same four
//! refusals, librdkafka, kafka-clients 4.4 and franz-go 1.22, against real Kafka.

use crate::common::*;
use crate::franz_go::run_go;
use crate::java_client::run_java;
use crate::policies::{code, policies, policy_count, producer, transactional};
use crate::rdkafka_clients::create_topic;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureRecord, Producer};
use std::time::{Duration, Instant};

/// Topics under `refusal-idem-` take only idempotent writes, under `refusal-codec-` no gzip; a
/// transaction may last at most 60 s; `refusal-owned-` transactional ids belong to client id `owner-app`.
const POLICY: &str = r#"
policies:
  - name: refusal-idempotence
    match: { topics: { prefix: ["refusal-idem-"] } }
    produce: { idempotence: reject }
  - name: refusal-codec
    match: { topics: { prefix: ["refusal-codec-"] } }
    produce: { compression: { allowed: [none, lz4, zstd], action: reject } }
  - name: refusal-owner
    match: { client_ids: [owner-app] }
    producers: { owns_transactional_ids: { prefixes: ["refusal-owned-"], action: reject } }
  - name: refusal-producers
    producers:
      transaction_timeout_ms: { min: 1000, max: 60000, action: reject }
      new_producer_ids_per_minute: { limit: 1, action: reject }
"#;

/// Far below every client's own give-up time (60 s and more here): a client that retried the proxy's
/// answer would blow it.
const GIVES_UP_WITHIN: Duration = Duration::from_secs(15);

async fn start() -> TestProxy {
    let p = policies(POLICY);
    start_proxy_with(Cluster::Single, move |c| c.policies = p.clone()).await
}

/// Each refusal: (its name in the scenarios, what each library must report: Java class, franz-go text,
/// librdkafka code).
const EXPECTED: [(&str, &str, &str, RDKafkaErrorCode); 4] = [
    (
        "idempotence",
        "PolicyViolationException",
        "POLICY_VIOLATION",
        RDKafkaErrorCode::PolicyViolation,
    ),
    (
        "compression",
        "UnsupportedCompressionTypeException",
        "UNSUPPORTED_COMPRESSION_TYPE",
        RDKafkaErrorCode::UnsupportedCompressionType,
    ),
    (
        "transaction_timeout",
        // kafka-clients has no case for 50 in its InitProducerId handler: a fatal KafkaException
        // ("Unexpected error in InitProducerIdResponse; The transaction timeout is larger ..."), the
        // same as for the broker's own 50.
        "KafkaException",
        "INVALID_TRANSACTION_TIMEOUT",
        RDKafkaErrorCode::InvalidTransactionTimeout,
    ),
    (
        "owner",
        "TransactionalIdAuthorizationException",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
    ),
];

/// The rate limit is a throttle, not a refusal: THROTTLING_QUOTA_EXCEEDED (89) with the time until the
/// window has room (with a limit of 1 the sliding window frees it two minutes after the first id). The
/// client waits and its write lands; it asks again now and then, not in a tight loop. kafka-clients and
/// franz-go wait out `throttle_time_ms`; librdkafka retries the producer id every half second or so
/// until the window has room (each retry is answered at the proxy, and costs the cluster nothing).
fn waited_for_the_rate_limit(proxy: &TestProxy, library: &str, outcome: &str, ms: &str) {
    let throttled = policy_count(
        proxy,
        "refusal-producers",
        "new_producer_ids_per_minute",
        "rejected",
    );
    eprintln!("{library} rate: {outcome} after {ms} ms, {throttled} InitProducerId throttled");
    assert_eq!(outcome, "written");
    assert!(throttled >= 1, "the limit was hit");
    let waited = ms.parse::<f64>().expect("milliseconds") / 1000.0;
    assert!(
        (throttled as f64) <= 5.0 + 4.0 * waited,
        "{library} asked {throttled} times in {waited} s"
    );
}

fn gave_up_in_time(library: &str, name: &str, ms: &str) {
    let ms: u64 = ms.parse().expect("milliseconds");
    eprintln!("{library} {name}: gave up after {ms} ms");
    assert!(
        Duration::from_millis(ms) < GIVES_UP_WITHIN,
        "{library} kept at {name} for {ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_meets_each_refusal_as_the_brokers_own() {
    let proxy = start().await;
    let r = run_java("refusals", &proxy).await;
    eprintln!("kafka-clients: {r:?}");
    for (name, java, _, _) in EXPECTED {
        assert_eq!(r[name], vec![java.to_string()], "{name}");
        gave_up_in_time("kafka-clients", name, &r[&format!("{name}_ms")][0]);
    }
    assert!(
        r["transaction_timeout_message"][0].contains("transaction timeout is larger"),
        "{:?}",
        r["transaction_timeout_message"]
    );
    waited_for_the_rate_limit(&proxy, "kafka-clients", &r["rate"][0], &r["rate_ms"][0]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn franz_go_meets_each_refusal_as_the_brokers_own() {
    let proxy = start().await;
    let r = run_go("refusals", &proxy).await;
    for (name, _, go, _) in EXPECTED {
        assert!(r[name][0].contains(go), "{name}: {}", r[name][0]);
        gave_up_in_time("franz-go", name, &r[&format!("{name}_ms")][0]);
    }
    waited_for_the_rate_limit(&proxy, "franz-go", &r["rate"][0], &r["rate_ms"][0]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_meets_each_refusal_as_the_brokers_own() {
    let proxy = start().await;
    let suffix = unique_topic("rd");
    let idem = format!("refusal-idem-{suffix}");
    let codec = format!("refusal-codec-{suffix}");
    create_topic(proxy.bootstrap(), &idem, 1, 1).await;
    create_topic(proxy.bootstrap(), &codec, 1, 1).await;
    let mut got = Vec::new();
    // Compressible, so that the codec is really used (librdkafka sends a batch uncompressed when
    // compressing does not make it smaller).
    let value = "compressible ".repeat(100);
    let send_one = |extra: &'static [(&'static str, &'static str)], topic: String| {
        let p = producer(proxy.bootstrap(), extra);
        let value = value.clone();
        async move {
            let started = Instant::now();
            let r = p
                .send(
                    FutureRecord::to(&topic).key("k").payload(&value),
                    Duration::from_secs(240),
                )
                .await;
            (r.err().and_then(|(e, _)| code(&e)), started.elapsed())
        }
    };
    let no_idempotence: &[(&str, &str)] = &[
        ("enable.idempotence", "false"),
        ("acks", "1"),
        ("message.timeout.ms", "60000"),
    ];
    got.push(send_one(no_idempotence, idem.clone()).await);
    let gzip: &[(&str, &str)] = &[
        ("enable.idempotence", "true"),
        ("compression.type", "gzip"),
        ("message.timeout.ms", "60000"),
    ];
    got.push(send_one(gzip, codec.clone()).await);
    for (id, extra) in [
        (
            format!("{suffix}-long"),
            &[("transaction.timeout.ms", "120000")][..],
        ),
        (format!("refusal-owned-{suffix}"), &[][..]),
    ] {
        let p = transactional(proxy.bootstrap(), &id, extra);
        let started = Instant::now();
        let e = tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(60)))
            .await
            .unwrap()
            .err();
        got.push((e.and_then(|e| e.rdkafka_error_code()), started.elapsed()));
    }
    for ((name, _, _, rd), (code, took)) in EXPECTED.iter().zip(got) {
        assert_eq!(code, Some(*rd), "{name}");
        gave_up_in_time("librdkafka", name, &took.as_millis().to_string());
    }
    // The idempotent producer of the compression step took this client's one new producer id of the
    // minute: the next one is throttled until the minute has room.
    let patient: &[(&str, &str)] = &[
        ("enable.idempotence", "true"),
        ("message.timeout.ms", "240000"),
    ];
    let (refused, took) = send_one(patient, idem).await;
    let outcome = refused.map_or("written".to_string(), |c| format!("{c:?}"));
    waited_for_the_rate_limit(
        &proxy,
        "librdkafka",
        &outcome,
        &took.as_millis().to_string(),
    );
    proxy.stop().await;
}

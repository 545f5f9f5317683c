//! The Java client (kafka-clients, same version as the broker) against real Kafka, through the proxy.
//! tests/java/EosClient.java holds the scenarios; each checks itself and prints RESULT lines.

use crate::common::*;
use kafka_eos_proxy::audit::Kind;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn compiled_client() -> (PathBuf, PathBuf) {
    static CLASSES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    CLASSES
        .get_or_init(|| {
            let libs = kafka_libs();
            let out = repo_root().join("target/java-classes");
            std::fs::create_dir_all(&out).unwrap();
            let status = Command::new("javac")
                .arg("-cp")
                .arg(format!("{}/*", libs.display()))
                .arg("-d")
                .arg(&out)
                .arg(repo_root().join("tests/java/EosClient.java"))
                .status()
                .expect("javac");
            assert!(status.success(), "javac failed");
            (libs, out)
        })
        .clone()
}

/// Runs a scenario and returns its RESULT key=value lines (repeated keys keep every value).
pub(crate) async fn run_java(scenario: &str, proxy: &TestProxy) -> BTreeMap<String, Vec<String>> {
    run_java_with(scenario, proxy, &[]).await
}

/// [`run_java`] with environment variables for the client (the TLS settings, say).
pub(crate) async fn run_java_with(
    scenario: &str,
    proxy: &TestProxy,
    env: &[(&str, String)],
) -> BTreeMap<String, Vec<String>> {
    run_java_at(scenario, proxy.bootstrap(), env).await
}

/// A scenario against any bootstrap address (the direct path of a comparison, say).
pub(crate) async fn run_java_at(
    scenario: &str,
    bootstrap: &str,
    env: &[(&str, String)],
) -> BTreeMap<String, Vec<String>> {
    let (libs, classes) = compiled_client();
    let mut command = Command::new("java");
    command
        .arg("-cp")
        .arg(format!("{}/*:{}", libs.display(), classes.display()))
        .arg("-Xmx256m")
        .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
        .arg("-Dlog4j2.level=warn")
        .args(["EosClient", scenario, bootstrap])
        .arg(unique_topic(&format!("java-{scenario}")));
    run_scenario("the Java scenario", command, env).await
}

fn one(results: &BTreeMap<String, Vec<String>>, key: &str) -> i64 {
    results
        .get(key)
        .and_then(|v| v.first())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric RESULT {key} in {results:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_admin_sees_only_proxy_addresses() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("admin", &proxy).await;
    assert_eq!(one(&r, "partitions"), 4);
    let brokers = &r["broker"];
    assert_eq!(brokers.len(), 3, "{brokers:?}");
    for b in brokers {
        let (id, _) = b.split_once('@').unwrap();
        assert!(
            b.ends_with(&format!(":{}", proxy.broker_port(id.parse().unwrap()))),
            "{b}"
        );
        assert_proxy_address(&proxy, b);
    }
    for l in &r["leader"] {
        assert_proxy_address(&proxy, l);
    }
    assert_proxy_address(&proxy, &r["controller"][0]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_produce_and_consume() {
    let proxy = start_proxy(Cluster::Single).await;
    let r = run_java("produce", &proxy).await;
    assert_eq!(one(&r, "consumed"), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_idempotent_producer() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("idempotent", &proxy).await;
    assert_eq!(one(&r, "consumed"), 1500);
    // kafka-clients 4.4 names topics by id (Produce v13) where the broker offers it; the proxy names
    // them and tracks the producer.
    let newest =
        broker_max_version(Cluster::Three, kafka_protocol::messages::ApiKey::Produce).await;
    assert_eq!(proxy.produce_versions(), vec![newest.min(13)]);
    assert!(!proxy.tracked_topics().is_empty(), "producer state kept");
    assert!(proxy.events(Kind::UnknownTopicId).is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_transactions_commit_and_abort() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("txn", &proxy).await;
    assert_eq!(one(&r, "committed"), 25);
    assert_eq!(one(&r, "uncommitted"), 35);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_consume_transform_produce() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("ctp", &proxy).await;
    assert_eq!(one(&r, "transformed"), 120);
    assert_eq!(one(&r, "committed_offsets"), 120);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_consumer_group_rebalance() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("group", &proxy).await;
    assert_eq!(one(&r, "consumed"), 600);
    assert!(one(&r, "from_second_member") > 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_clients_under_policies() {
    let text = format!(
        "{}{}",
        proxy_yaml("127.0.0.1:1", 1, 2),
        r#"
policies:
  - name: java-eos
    match: { topics: { prefix: ["java-policy-"] } }
    produce: { idempotence: reject }
    consume: { read_committed: upgrade }
"#
    );
    let policies = kafka_eos_proxy::config::Config::parse(&text)
        .expect("policies")
        .policies;
    let proxy = start_proxy_with(Cluster::Single, move |c| c.policies = policies.clone()).await;
    let results = run_java("policy", &proxy).await;
    assert_eq!(one(&results, "refused"), 10);
    assert_eq!(one(&results, "consumed"), 25);
    proxy.stop().await;
}

/// Share groups (KIP-932): ShareFetch and ShareAcknowledge through the proxy, every record delivered once
/// between two share consumers, and the coordinator the admin client learns is a proxy address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_share_consumers_get_every_record_once() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("share", &proxy).await;
    assert_eq!(one(&r, "share_delivered"), 300);
    assert_eq!(
        one(&r, "share_from_first") + one(&r, "share_from_second"),
        300,
        "no record delivered twice"
    );
    assert_proxy_address(&proxy, &r["share_coordinator"][0]);
    proxy.stop().await;
}

/// Kafka Streams (kafka-streams 4.4.0) with processing.guarantee=exactly_once_v2 through the proxy, on the
/// classic group protocol and on the streams group protocol (KIP-1071, StreamsGroupHeartbeat and
/// StreamsGroupDescribe passing through): every input record in the output exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_streams_exactly_once_v2() {
    let proxy = start_proxy(Cluster::Three).await;
    let heartbeats = || {
        let metrics = proxy.proxy.as_ref().unwrap().shared().metrics.clone();
        let text = metrics.expect("metrics on").render();
        text.lines()
            .find(|l| l.contains("api=\"StreamsGroupHeartbeat\"") && l.contains("requests_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let r = run_java("streams", &proxy).await;
    assert_eq!(one(&r, "streams_output"), 500, "classic");
    assert_eq!(
        heartbeats(),
        0.0,
        "the classic protocol sends no streams heartbeats"
    );
    let r = run_java("streams-protocol", &proxy).await;
    assert_eq!(one(&r, "streams_output"), 500, "streams protocol");
    assert!(
        heartbeats() > 0.0,
        "the streams protocol went through the proxy"
    );
    proxy.stop().await;
}

/// A zombie transactional producer (kafka-clients 4.4.0) fenced at the proxy: the proxy's own answer
/// (INVALID_PRODUCER_EPOCH on Produce, PRODUCER_FENCED on EndTxn, as the broker answers) makes the client
/// fail fatally and at once, with no retry loop, and nothing of the zombie is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_zombie_is_fenced_by_the_proxys_answer() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_java("zombie", &proxy).await;
    let error = &r["zombie_error"][0];
    eprintln!("zombie: {error} after {} ms", r["zombie_ms"][0]);
    assert!(
        error == "ProducerFencedException" || error == "InvalidProducerEpochException",
        "a fencing error, got {error}"
    );
    proxy.assert_fenced_at_the_proxy();
    proxy.stop().await;
}

//! franz-go (github.com/twmb/franz-go 1.22, the Go client; it opens with ApiVersions v5) against real
//! Kafka, through the proxy. tests/go/main.go holds the scenarios; each checks itself and prints RESULT
//! lines.

use crate::common::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn built_client() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = repo_root().join("target/go-eosclient");
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(repo_root().join("tests/go"))
            .status()
            .expect("go build (is Go installed?)");
        assert!(status.success(), "go build failed");
        out
    })
    .clone()
}

pub(crate) async fn run_go(scenario: &str, proxy: &TestProxy) -> BTreeMap<String, Vec<String>> {
    run_go_with(scenario, proxy, &[]).await
}

/// [`run_go`] with environment variables for the client (the TLS settings, say).
pub(crate) async fn run_go_with(
    scenario: &str,
    proxy: &TestProxy,
    env: &[(&str, String)],
) -> BTreeMap<String, Vec<String>> {
    let mut command = Command::new(built_client());
    command.args([
        scenario,
        proxy.bootstrap(),
        &unique_topic(&format!("go-{scenario}")),
    ]);
    run_scenario("the Go scenario", command, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn franz_go_idempotent_producer_and_group_through_the_proxy() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_go("produce", &proxy).await;
    assert_eq!(r["consumed"], vec!["500"]);
    // franz-go 1.22 names topics by id (Produce v13); the proxy names them and tracks the producer.
    assert_eq!(proxy.produce_versions(), vec![13]);
    assert!(!proxy.tracked_topics().is_empty(), "producer state kept");
    assert!(proxy
        .events(kafka_eos_proxy::audit::Kind::UnknownTopicId)
        .is_empty());
    let brokers = &r["broker"];
    assert_eq!(brokers.len(), 3, "{brokers:?}");
    for b in brokers {
        assert_proxy_address(&proxy, b);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn franz_go_transactions_commit_and_abort() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_go("txn", &proxy).await;
    assert_eq!(r["committed"], vec!["25"]);
    assert_eq!(r["uncommitted"], vec!["35"]);
    proxy.stop().await;
}

/// A zombie transactional client (franz-go) fenced at the proxy: the proxy's own answer (the broker's
/// codes) makes it fail at once, with no retry loop, and nothing of it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn franz_go_zombie_is_fenced_by_the_proxys_answer() {
    let proxy = start_proxy(Cluster::Three).await;
    let r = run_go("zombie", &proxy).await;
    let error = &r["zombie_error"][0];
    eprintln!("zombie: {error} after {} ms", r["zombie_ms"][0]);
    assert!(
        error.contains("INVALID_PRODUCER_EPOCH") || error.contains("PRODUCER_FENCED"),
        "a fencing error, got {error}"
    );
    proxy.assert_fenced_at_the_proxy();
    proxy.stop().await;
}

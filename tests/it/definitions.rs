//! The project's own protocol definitions against the pinned Apache Kafka's: the api-key table and the
//! message codecs are generated from the message definitions inside the pinned kafka-clients jar, so a
//! version bump that changes what a message carries fails here until the generated files are refreshed
//! (and their diff reviewed).

use std::path::Path;
use std::process::Command;

fn run(script: &str, args: &[&str]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(script))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_api_table_is_the_pinned_kafkas() {
    let (ok, text) = run("scripts/protocol-table", &["--check"]);
    assert!(ok, "{text}");
}

#[test]
fn the_codecs_come_from_the_pinned_kafkas_definitions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pom = std::fs::read_to_string(root.join("scripts/kafka-fetch/pom.xml")).expect("pom");
    let pinned = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("kafka.version in the pom");
    let generated =
        std::fs::read_to_string(root.join("vendor/kafka-protocol/KAFKA_MESSAGES_VERSION"))
            .expect("KAFKA_MESSAGES_VERSION");
    assert_eq!(
        generated.trim(),
        pinned,
        "the codecs were generated from another Kafka release: run scripts/protocol-codegen and review the diff"
    );
    assert_eq!(
        kafka_eos_proxy::protocol::api_table::KAFKA_VERSION,
        pinned,
        "run scripts/protocol-table"
    );
}

//! The api keys and versions a broker offers, next to what the proxy in front of it offers, as a
//! Markdown table (the README's "Versions" table comes from this).
//!
//!   cargo run --example offered_versions -- <BROKER host:port> <PROXY host:port>

use kafka_eos_proxy::protocol::versions::api;
use kafka_eos_proxy::testkit::RawClient;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
use kafka_protocol::protocol::StrBytes;
use std::collections::BTreeMap;

async fn offered(addr: &str) -> BTreeMap<i16, (i16, i16)> {
    let mut c = RawClient::connect(addr, "offered-versions")
        .await
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("offered-versions"))
        .with_client_software_version(StrBytes::from_static_str("1"));
    let r: ApiVersionsResponse = c
        .call(ApiKey::ApiVersions, 3, &req)
        .await
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    r.api_keys
        .iter()
        .map(|k| (k.api_key, (k.min_version, k.max_version)))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [broker, proxy] = args.as_slice() else {
        eprintln!("usage: offered_versions <BROKER host:port> <PROXY host:port>");
        std::process::exit(2);
    };
    let (direct, via) = (offered(broker).await, offered(proxy).await);
    println!("| key | api | broker | proxy |");
    println!("|---|---|---|---|");
    for (key, (min, max)) in &direct {
        let name = api(*key).map_or("(not in the pinned Kafka)", |a| a.name);
        let proxied = match via.get(key) {
            Some((a, b)) if (a, b) == (min, max) => "same".to_string(),
            Some((a, b)) => format!("**{a}-{b}**"),
            None => "**hidden**".to_string(),
        };
        println!("| {key} | {name} | {min}-{max} | {proxied} |");
    }
}

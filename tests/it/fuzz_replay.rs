//! The fuzz targets' inputs on the stable toolchain: structured seeds (every inspected api key in every
//! version the crate can encode, Kafka 4.4's flexible ApiVersions v5 answer, real produce requests, the
//! example config), the saved seed corpus `fuzz/seeds/<target>/`, and every past crash
//! `fuzz/regressions/<target>/` (for the targets driven through `kafka_eos_proxy::fuzzing`; the older
//! targets' crashes became unit tests beside the code they broke). Runs in every `scripts/test`; the
//! fuzzers themselves run in `.ci/run` where a nightly toolchain is installed.
//!
//! `WRITE_FUZZ_SEEDS=1 cargo test --test it fuzz_replay` rewrites `fuzz/seeds/` from the structured seeds.

use crate::common::repo_root;
use crate::producer_state::{batch, produce};
use bytes::{BufMut, BytesMut};
use kafka_eos_proxy::fuzzing::{self, INSPECTED_REQUESTS, INSPECTED_RESPONSES};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Encodable;

fn encoded<T: Encodable>(body: &T, version: i16) -> Option<Vec<u8>> {
    let mut buf = BytesMut::new();
    body.encode(&mut buf, version).ok()?;
    Some(buf.to_vec())
}

fn response_header(key: ApiKey, version: i16) -> Vec<u8> {
    let mut h = BytesMut::new();
    h.put_i32(7);
    let flexible = key != ApiKey::ApiVersions && key.response_header_version(version) >= 1;
    if flexible {
        h.put_u8(0);
    }
    h.to_vec()
}

fn response_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for key in INSPECTED_RESPONSES {
        let range = key.valid_versions();
        for v in range.min..=range.max {
            let body =
                kafka_eos_proxy::with_response_type!(key, T => encoded(&T::default(), v)).flatten();
            if let Some(body) = body {
                let mut frame = response_header(key, v);
                frame.extend(body);
                out.push(fuzzing::response_input(key, v, &frame));
            }
        }
    }
    // Kafka 4.4's ApiVersions v5 answer is flexible (the v3 form and more); read as v0 it once asked
    // for 41,875,931,136 bytes. The v3 body of a full answer, presented as v0 and as v5.
    let full = ApiVersionsResponse::default().with_api_keys(
        (0..90)
            .map(|k| {
                api_versions_response::ApiVersion::default()
                    .with_api_key(k)
                    .with_max_version(9)
            })
            .collect(),
    );
    let mut v3 = response_header(ApiKey::ApiVersions, 3);
    v3.extend(encoded(&full, 3).unwrap());
    for claimed in [0, 5] {
        out.push(fuzzing::response_input(ApiKey::ApiVersions, claimed, &v3));
    }
    out
}

fn request_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for key in INSPECTED_REQUESTS {
        let range = key.valid_versions();
        for v in range.min..=range.max {
            let body = match key {
                ApiKey::Produce => encoded(
                    &produce("t", Some("txn"), vec![(0, batch(7, 1, 0, 3, true, "s"))]),
                    v,
                ),
                ApiKey::Fetch => encoded(&FetchRequest::default(), v),
                ApiKey::ListOffsets => encoded(&ListOffsetsRequest::default(), v),
                ApiKey::InitProducerId => encoded(&InitProducerIdRequest::default(), v),
                ApiKey::AddPartitionsToTxn => encoded(&AddPartitionsToTxnRequest::default(), v),
                ApiKey::AddOffsetsToTxn => encoded(&AddOffsetsToTxnRequest::default(), v),
                ApiKey::EndTxn => encoded(&EndTxnRequest::default(), v),
                ApiKey::TxnOffsetCommit => encoded(&TxnOffsetCommitRequest::default(), v),
                ApiKey::SaslHandshake => encoded(&SaslHandshakeRequest::default(), v),
                ApiKey::SaslAuthenticate => encoded(&SaslAuthenticateRequest::default(), v),
                _ => None,
            };
            if let Some(body) = body {
                let k = INSPECTED_REQUESTS.iter().position(|x| *x == key).unwrap() as u8;
                let mut input = vec![k, (v + 1) as u8];
                input.extend(body);
                out.push(input);
            }
        }
    }
    out
}

fn saved(kind: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = repo_root().join("fuzz").join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn write_seeds(target: &str, seeds: &[Vec<u8>]) {
    if std::env::var_os("WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = repo_root().join("fuzz/seeds").join(target);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:04}")), s).unwrap();
    }
}

/// What a broker answers the proxy's SCRAM login with: a server-first message extending the "fuzz"
/// nonce, a server-final one, and the two Kafka answers that carry them.
fn sasl_login_seeds() -> Vec<Vec<u8>> {
    let first = b"r=fuzzSERVER,s=QSXCR+Q6sek8bf92,i=4096".to_vec();
    let last = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec();
    let mut authenticate = vec![0, 0, 0, 1, 0, 0, 0xff, 0xff, 0, 0, 0, first.len() as u8];
    authenticate.extend_from_slice(&first);
    authenticate.extend_from_slice(&[0; 8]);
    let handshake = vec![
        0, 0, 0, 1, 0, 33, 0, 0, 0, 1, 0, 5, b'P', b'L', b'A', b'I', b'N',
    ];
    vec![first, last, authenticate, handshake]
}

/// A fuzz target: its name, its entry point and its structured seeds.
type Target = (&'static str, fn(&[u8]), Vec<Vec<u8>>);

/// Every target's structured seeds, saved seeds and past crashes run without a panic.
#[test]
fn fuzz_seeds_and_past_crashes_replay() {
    let targets: [Target; 4] = [
        ("responses", fuzzing::response, response_seeds()),
        ("requests", fuzzing::request, request_seeds()),
        (
            "config",
            fuzzing::config,
            vec![std::fs::read(repo_root().join("config/proxy.yaml")).unwrap()],
        ),
        ("sasl_login", fuzzing::sasl_login, sasl_login_seeds()),
    ];
    for (target, run, seeds) in targets {
        assert!(!seeds.is_empty(), "{target} has seeds");
        write_seeds(target, &seeds);
        let saved_seeds = saved("seeds", target);
        assert!(
            !saved_seeds.is_empty(),
            "fuzz/seeds/{target} holds the saved seeds (WRITE_FUZZ_SEEDS=1 writes them)"
        );
        for input in seeds
            .iter()
            .chain(&saved_seeds)
            .chain(&saved("regressions", target))
        {
            run(input);
            // Every prefix too: truncation is the commonest malformation.
            for cut in [1, input.len() / 2, input.len().saturating_sub(1)] {
                run(&input[..cut.min(input.len())]);
            }
        }
    }
}

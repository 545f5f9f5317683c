//! Entry points shared by the fuzz targets (`fuzz/fuzz_targets`, run with cargo-fuzz on nightly) and
//! the stable test that replays their seeds and every past crash (`tests/it/fuzz_replay.rs`). Each
//! takes arbitrary bytes through every decode the proxy performs on that kind of input. None may
//! panic, and none may allocate more than the input justifies (a length read off the wire is bounded
//! by the bytes present: see `vendor/kafka-protocol/PATCHES.md` and [`crate::protocol::wire`]).
//!
//! Not part of the proxy's API.
#![doc(hidden)]

use crate::filters::{api_versions, skim};
use crate::guard::coordinator;
use crate::policy::{sasl, wire};
use crate::protocol::batch::validate_client_records;
use crate::protocol::codec::decode_response;
use crate::protocol::frame::SIZE_PREFIX;
use crate::protocol::header::{peek_request, produce_acks, RequestHead};
use crate::protocol::produce;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;

/// The api keys whose responses the proxy reads (decodes, skims or learns from).
pub const INSPECTED_RESPONSES: [ApiKey; 16] = [
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::Metadata,
    ApiKey::FindCoordinator,
    ApiKey::DescribeCluster,
    ApiKey::DescribeQuorum,
    ApiKey::ShareFetch,
    ApiKey::ShareAcknowledge,
    ApiKey::ApiVersions,
    ApiKey::InitProducerId,
    ApiKey::AddPartitionsToTxn,
    ApiKey::AddOffsetsToTxn,
    ApiKey::EndTxn,
    ApiKey::TxnOffsetCommit,
    ApiKey::SaslAuthenticate,
    ApiKey::ListOffsets,
];

/// The api keys whose requests the proxy reads.
pub const INSPECTED_REQUESTS: [ApiKey; 10] = [
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
    ApiKey::InitProducerId,
    ApiKey::AddPartitionsToTxn,
    ApiKey::AddOffsetsToTxn,
    ApiKey::EndTxn,
    ApiKey::TxnOffsetCommit,
    ApiKey::SaslHandshake,
    ApiKey::SaslAuthenticate,
];

/// Runs `$body` with `$t` naming the response type of `$key`, for every inspected api key whose
/// responses are decoded whole (`None` for the others). One list, for the fuzz target and its replay.
#[macro_export]
#[doc(hidden)]
macro_rules! with_response_type {
    ($key:expr, $t:ident => $body:expr) => {{
        use $crate::fuzzing::kp::messages as m;
        use $crate::fuzzing::kp::messages::ApiKey as K;
        match $key {
            K::Produce => {
                type $t = m::ProduceResponse;
                Some($body)
            }
            K::Fetch => {
                type $t = m::FetchResponse;
                Some($body)
            }
            K::Metadata => {
                type $t = m::MetadataResponse;
                Some($body)
            }
            K::FindCoordinator => {
                type $t = m::FindCoordinatorResponse;
                Some($body)
            }
            K::DescribeCluster => {
                type $t = m::DescribeClusterResponse;
                Some($body)
            }
            K::DescribeQuorum => {
                type $t = m::DescribeQuorumResponse;
                Some($body)
            }
            K::ShareFetch => {
                type $t = m::ShareFetchResponse;
                Some($body)
            }
            K::ShareAcknowledge => {
                type $t = m::ShareAcknowledgeResponse;
                Some($body)
            }
            K::ApiVersions => {
                type $t = m::ApiVersionsResponse;
                Some($body)
            }
            K::InitProducerId => {
                type $t = m::InitProducerIdResponse;
                Some($body)
            }
            K::AddPartitionsToTxn => {
                type $t = m::AddPartitionsToTxnResponse;
                Some($body)
            }
            K::AddOffsetsToTxn => {
                type $t = m::AddOffsetsToTxnResponse;
                Some($body)
            }
            K::EndTxn => {
                type $t = m::EndTxnResponse;
                Some($body)
            }
            K::TxnOffsetCommit => {
                type $t = m::TxnOffsetCommitResponse;
                Some($body)
            }
            K::SaslAuthenticate => {
                type $t = m::SaslAuthenticateResponse;
                Some($body)
            }
            K::ListOffsets => {
                type $t = m::ListOffsetsResponse;
                Some($body)
            }
            _ => None,
        }
    }};
}

/// The protocol crate, for [`with_response_type!`] callers.
pub use kafka_protocol as kp;

/// The fuzz input for a response: key selector, version selector, then the frame body (no size
/// prefix). Versions run from -1 to three past what the crate knows, so newer forms are tried too.
pub fn response_input(key: ApiKey, version: i16, body: &[u8]) -> Vec<u8> {
    let k = INSPECTED_RESPONSES
        .iter()
        .position(|x| *x == key)
        .unwrap_or(0);
    let mut out = vec![k as u8, (version + 1).clamp(0, 255) as u8];
    out.extend_from_slice(body);
    out
}

fn sized(body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(SIZE_PREFIX + body.len());
    b.put_i32(body.len() as i32);
    b.put_slice(body);
    b.freeze()
}

/// Arbitrary broker bytes as the answer to a request of some inspected key and version.
pub fn response(data: &[u8]) {
    let [k, v, body @ ..] = data else { return };
    let key = INSPECTED_RESPONSES[usize::from(*k) % INSPECTED_RESPONSES.len()];
    let span = i16::from(*v) % (key.valid_versions().max + 4);
    let version = span - 1;
    let frame = sized(body);
    crate::with_response_type!(key, T => {
        let _ = decode_response::<T>(frame.clone(), key, version);
    });
    match key {
        ApiKey::ApiVersions => {
            let _ = api_versions::clamp_api_versions(frame.clone(), version, true);
        }
        ApiKey::Produce => {
            let _ = skim::produce_has_node_endpoints(&frame, version);
            let _ = crate::stages::produce::refusal(&frame, version);
        }
        ApiKey::Fetch => {
            let _ = skim::fetch_has_node_endpoints(&frame);
            let _ = skim::fetch_walk(&frame, version, |_| {});
            if let Ok(out) =
                crate::stages::read_committed::without_aborted_batches(frame.clone(), version)
            {
                // The filter only ever removes batches (or re-encodes the same answer).
                let _ = out;
            }
        }
        ApiKey::SaslAuthenticate => {
            let _ = sasl::authenticate_error(&frame, version);
        }
        _ => {}
    }
}

/// Arbitrary client bytes as a request of some inspected key and version (header included: the first
/// byte selects the key, the second the version, the rest is the body after a v1/v2 header).
pub fn request(data: &[u8]) {
    let [k, v, body @ ..] = data else { return };
    let key = INSPECTED_REQUESTS[usize::from(*k) % INSPECTED_REQUESTS.len()];
    let version = i16::from(*v) % (key.valid_versions().max + 4) - 1;
    // A real header, so the peeks walk the same path as in a session.
    let mut frame = BytesMut::new();
    frame.put_i32(0);
    frame.put_i16(key as i16);
    frame.put_i16(version);
    frame.put_i32(7);
    frame.put_i16(4);
    frame.put_slice(b"fuzz");
    if version >= 0 && key.request_header_version(version) >= 2 {
        frame.put_u8(0);
    }
    frame.put_slice(body);
    let size = (frame.len() - SIZE_PREFIX) as i32;
    frame[..SIZE_PREFIX].copy_from_slice(&size.to_be_bytes());
    let frame = frame.freeze();
    let Ok(head) = peek_request(&frame) else {
        return;
    };
    request_frame(key, &frame, &head);
}

fn request_frame(key: ApiKey, frame: &Bytes, head: &RequestHead) {
    let _ = head.client_id(frame);
    match key {
        ApiKey::Produce => {
            let _ = produce_acks(frame, head);
            if let Some(body) = head.body_offset {
                if let Ok(view) =
                    produce::parse(frame, body, head.api_version, &produce::TopicNames::new())
                {
                    for t in &view.topics {
                        for p in &t.partitions {
                            if let Some(records) = p.records {
                                let _ = validate_client_records(records, true);
                            }
                        }
                    }
                    let rebuilt = view.rebuild(frame, |t, p| (t + p) % 2 == 0);
                    assert!(
                        rebuilt.len() <= frame.len(),
                        "a rebuild never grows a request"
                    );
                }
            }
        }
        ApiKey::Fetch => {
            let _ = wire::fetch_request(frame, head);
        }
        ApiKey::ListOffsets => {
            let _ = wire::list_offsets_request(frame, head);
        }
        ApiKey::InitProducerId => {
            let _ = wire::init_producer_id_request(frame, head);
            let _ = crate::guard::init_producer_id_txn(frame, head);
        }
        ApiKey::AddPartitionsToTxn => {
            let _ = coordinator::parse_add_partitions(frame, head);
        }
        ApiKey::TxnOffsetCommit => {
            let _ = coordinator::parse_txn_offset_commit(frame, head);
        }
        ApiKey::AddOffsetsToTxn | ApiKey::EndTxn => {
            let _ = coordinator::parse_producer_first(frame, head, key);
        }
        ApiKey::SaslHandshake => {
            let _ = sasl::handshake_mechanism(frame, head);
        }
        ApiKey::SaslAuthenticate => {
            let _ = sasl::offered_principal(frame, head, "PLAIN");
            let _ = sasl::offered_principal(frame, head, "SCRAM-SHA-512");
        }
        _ => {}
    }
}

/// Arbitrary bytes as a config file's text: refused with problems, or accepted; never a panic, and
/// never work beyond what the size and nesting bounds allow.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::config::reader::nesting_depth(text);
    if let Ok(c) = crate::Config::parse(text) {
        let _ = c.explain();
    }
}

/// A broker's answers to the proxy's own SASL login: the SaslHandshake and SaslAuthenticate answers
/// (every version the proxy uses), and the SCRAM server-first and server-final messages they carry
/// (SHA-256 and SHA-512; the iteration count is bounded, so no input costs more than 16,384 rounds).
pub fn sasl_login(data: &[u8]) {
    use crate::server::sasl::{Credentials, Exchange};
    let frame = Bytes::copy_from_slice(data);
    let _ = decode_response::<SaslHandshakeResponse>(frame.clone(), ApiKey::SaslHandshake, 1);
    let _ = decode_response::<SaslAuthenticateResponse>(frame, ApiKey::SaslAuthenticate, 1);
    for mechanism in [
        crate::server::sasl::Mechanism::ScramSha256,
        crate::server::sasl::Mechanism::ScramSha512,
    ] {
        let creds = Credentials::for_fuzzing(mechanism);
        if let (Exchange::Scram(mut scram), _) = Exchange::start(&creds, "fuzz") {
            let _ = scram.answer(data);
            let _ = scram.finish(data);
        }
    }
}

//! Arbitrary bytes through everything policies read: Fetch, ListOffsets and InitProducerId request
//! walkers (every version), SASL tokens, and the aborted-batch filter over records. Nothing may panic,
//! and the filter never adds bytes.
#![no_main]

use kafka_eos_proxy::policy::{sasl, wire};
use kafka_eos_proxy::protocol::header::RequestHead;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let version = i16::from(data[0] % 19);
    let body = &data[1..];
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(body);
    let head = RequestHead {
        api_key: 1,
        api_version: version,
        correlation_id: 0,
        client_id: None,
        body_offset: Some(12),
    };
    if let Ok(r) = wire::fetch_request(&frame, &head) {
        if let Some((at, _)) = r.isolation {
            assert!(at < frame.len());
        }
    }
    let _ = wire::list_offsets_request(&frame, &head);
    let _ = wire::init_producer_id_request(&frame, &head);
    let _ = wire::produce_acks_offset(&frame, &head);
    let _ = sasl::principal_from_token("PLAIN", body);
    let _ = sasl::principal_from_token("SCRAM-SHA-256", body);
    let _ = sasl::offered_principal(&frame, &head, "PLAIN");
    let _ = sasl::authenticate_error(&frame, version);
    // Aborted list from the first bytes: (producer id, first offset) pairs of small numbers.
    let aborted: Vec<(i64, i64)> = body
        .iter()
        .take(4)
        .map(|b| (i64::from(b & 7), i64::from(b >> 3)))
        .collect();
    if let Some(kept) = wire::without_aborted(body, &aborted) {
        assert!(kept.len() <= body.len());
    }
});

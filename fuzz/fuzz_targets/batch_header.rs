//! Arbitrary bytes as a partition's records, and as a whole Produce request body: the batch-header view
//! and the produce walker must never panic, and a rebuilt request must be well-formed.
#![no_main]

use kafka_eos_proxy::protocol::batch::validate_client_records;
use kafka_eos_proxy::protocol::produce;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = validate_client_records(data, true);
    if data.len() < 2 {
        return;
    }
    // First byte picks a version (3..=13; v13 names topics by id), the rest is the request body after
    // a fake 12-byte header. Ids are named from a map of one (the rest stay unnamed).
    let version = 3 + (data[0] % 11) as i16;
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&data[1..]);
    let names: produce::TopicNames = [([0u8; 16], std::sync::Arc::from("t"))].into_iter().collect();
    if let Ok(view) = produce::parse(&frame, 12, version, &names) {
        let _ = view.unnamed_ids();
        for t in &view.topics {
            for p in &t.partitions {
                if let Some(r) = p.records {
                    let _ = validate_client_records(r, false);
                }
            }
        }
        let rebuilt = view.rebuild(&frame, |t, p| (t + p) % 2 == 0);
        assert!(
            produce::parse(&rebuilt, 12, version, &names).is_ok(),
            "a rebuilt request parses"
        );
    }
});

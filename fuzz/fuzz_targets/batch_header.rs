//! Arbitrary bytes as a partition's records, and as a whole Produce request body: the batch-header view
//! and the produce walker must never panic, a rebuilt request must be well-formed, and a batch the
//! idempotence upgrade restamps must keep its content (digest) and carry a valid CRC.
#![no_main]

use kafka_eos_proxy::guard::upgrade;
use kafka_eos_proxy::protocol::batch::{validate_client_records, BatchHeader};
use kafka_eos_proxy::protocol::produce;
use libfuzzer_sys::fuzz_target;

/// Restamping never panics; when it accepts the bytes, only producer, epoch, sequence and CRC change.
fn restamp(records: &[u8]) {
    let mut copy = records.to_vec();
    let Some(before) = BatchHeader::new(records).map(|h| h.content_digest()) else {
        return;
    };
    if upgrade::restamp(&mut copy, 7, 1, 42).is_some() {
        let h = BatchHeader::new(&copy).expect("still a header");
        assert!(h.crc_ok(), "a restamped batch carries its CRC");
        assert_eq!((h.producer_id(), h.producer_epoch(), h.base_sequence()), (7, 1, 42));
        assert_eq!(h.content_digest(), before, "restamping keeps the content");
        assert_eq!(copy.len(), records.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = validate_client_records(data, true);
    restamp(data);
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
                    restamp(r);
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

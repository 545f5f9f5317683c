//! Arbitrary upstream bytes through the zero-copy skims of Produce and Fetch responses.
#![no_main]

use kafka_eos_proxy::filters::skim::{fetch_has_node_endpoints, produce_has_node_endpoints};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, frame)) = data.split_first() else {
        return;
    };
    // The first byte picks a Produce response version with node endpoints (10..=13; v13 names topics
    // by id).
    let _ = produce_has_node_endpoints(frame, 10 + (first % 4) as i16);
    let _ = fetch_has_node_endpoints(data);
});

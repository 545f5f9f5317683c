//! Arbitrary upstream bytes through the zero-copy skims of Produce and Fetch responses.
#![no_main]

use kafka_eos_proxy::filters::skim::{fetch_has_node_endpoints, produce_has_node_endpoints};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = produce_has_node_endpoints(data);
    let _ = fetch_has_node_endpoints(data);
});

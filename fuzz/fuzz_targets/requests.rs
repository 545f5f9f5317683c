//! Arbitrary client bytes as a request of every api key whose requests the proxy reads, every version.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kafka_eos_proxy::fuzzing::request(data));

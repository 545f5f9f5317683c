//! Arbitrary broker bytes as the answer of every api key whose responses the proxy reads, in every
//! version from -1 to three past what it knows (ApiVersions v5's flexible form among them).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kafka_eos_proxy::fuzzing::response(data));

//! Arbitrary text as a config file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kafka_eos_proxy::fuzzing::config(data));

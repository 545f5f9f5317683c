//! A broker's answers to the proxy's own SASL login (SaslHandshake, SaslAuthenticate, SCRAM messages).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kafka_eos_proxy::fuzzing::sasl_login(data));

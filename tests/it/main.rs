//! Integration tests: everything here runs against a real Apache Kafka (scripts/kafka) through an
//! in-process proxy. One test binary, so librdkafka is linked once.

mod brokers;
mod common;
mod content;
mod definitions;
mod franz_go;
mod fuzz_replay;
mod java_client;
mod policies;
mod producer_state;
mod rdkafka_clients;
mod refusals;
mod telemetry;
mod tls;
mod upgrade;
mod wire;

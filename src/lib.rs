//! kafka-eos-proxy: a transparent Kafka protocol proxy that adds and proves exactly-once guarantees.
//!
//! ```text
//! client ──TCP──▶ listener (bootstrap, or one per broker node id)        [server]
//!                   └─▶ session: one per client connection, knows no feature [session]
//!                         frame codec ─▶ header peek (key, version, corr id)  [protocol]
//!                         ─▶ chain: the stages that asked for this api key     [stages]
//!                              api_versions · identity · produce · init_producer_id · txn_fence
//!                              · read_committed · fetch_watch · addresses (every other key: raw bytes)
//!                         ─▶ exactly one upstream connection, to the broker the listener stands for
//!                       response path: in-flight queue (request order) ─▶ chain ─▶ client
//! what stages use: filters (address rewrite, version clamp, skims), guard (producer state, dedup,
//!                  fencing) over eos (pure rules), policy (what each topic demands), audit, metrics
//! ```
//!
//! Module map, in data-flow order: [`config`] (YAML, validation) → [`server`] (listeners, broker
//! registry, discovery, watchdog, shutdown) → [`session`] (per-connection pumps, one [`client::Client`]
//! each: who is connected) → [`stages`] (one module per feature, the chain) → [`protocol`] (framing, header peeks, batch headers, produce walker,
//! version table, codecs, error codes) → [`filters`] (address rewrite, ApiVersions clamp, response
//! skims) → [`policy`] (what each topic demands, one catalogue row per check; reloadable) → [`guard`] (produce guard, producer
//! state, transaction tracker) → [`eos`] (pure producer-state rules) → [`audit`], [`metrics`] (what
//! operators see). [`testkit`] and [`fuzzing`] serve the tests, examples, benchmarks and fuzz targets.

pub mod audit;
pub mod client;
pub mod config;
pub mod eos;
pub mod filters;
pub mod fuzzing;
pub mod guard;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod session;
pub mod stages;
pub mod telemetry;
pub mod testkit;
pub mod tls;

pub use config::Config;
pub use server::{run, Hooks, Proxy};

//! kafka-eos-proxy: a transparent Kafka protocol proxy that adds and proves exactly-once guarantees.
//!
//! ```text
//! client ──TCP──▶ listener (bootstrap, or one per broker node id)
//!                   └─▶ session (one per client connection)
//!                         frame codec (INT32 size, max frame size) ─▶ header peek (key, version, corr id)
//!                         ─▶ filters that asked for this api key (everything else stays raw bytes)
//!                         ─▶ exactly one upstream connection, to the broker the listener stands for
//!                       response path: in-flight queue (request order) ─▶ filters ─▶ client
//! side channels: broker registry (node id ↔ upstream address ↔ proxy port, topic ids), producer state,
//!                transaction tracker, audit sinks, metrics, config
//! ```
//!
//! Module map, in data-flow order: [`config`] (YAML, validation) → [`server`] (listeners, broker
//! registry, discovery, watchdog, shutdown) → [`session`] (per-connection pumps) → [`protocol`] (framing,
//! header peeks, batch headers, produce walker, version table, codecs) → [`filters`] (address rewrite,
//! ApiVersions clamp, response skims) → [`policy`] (what each topic demands; reloadable) → [`guard`]
//! (produce guard, transaction fence) → [`eos`] (pure producer-state rules) → [`audit`], [`metrics`]
//! (what operators see).

pub mod audit;
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

pub use config::Config;
pub use server::{run, Hooks, Proxy};

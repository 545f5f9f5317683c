//! The decoders and rewriters the stages use ([`crate::stages`] decides when): broker-address rewrite,
//! the ApiVersions clamp, and zero-copy walks of Produce and Fetch answers.

pub mod addresses;
pub mod api_versions;
pub mod skim;

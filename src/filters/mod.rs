//! Filters: the parts of the data path that look inside a request or response. Each one is consulted
//! only for the api keys it declares; every other frame stays raw bytes.

pub mod addresses;
pub mod api_versions;
pub mod skim;

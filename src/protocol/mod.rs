//! Wire-level building blocks: framing, header peeks, bounds-checked primitives, the version table, and
//! helpers to decode and re-encode the few responses the proxy changes.

pub mod batch;
pub mod codec;
pub mod frame;
pub mod header;
pub mod produce;
pub mod versions;
pub mod wire;

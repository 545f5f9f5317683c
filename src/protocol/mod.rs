//! Wire-level building blocks: framing, header peeks, bounds-checked primitives, the version table, and
//! helpers to decode and re-encode the few responses the proxy changes.

pub mod api_table;
pub mod batch;
pub mod codec;
pub mod codes;
pub mod frame;
pub mod header;
pub mod produce;
pub mod versions;
pub mod wire;

/// Kafka's longest topic name (longer ones can never be created).
pub const MAX_TOPIC_NAME_BYTES: usize = 249;

/// `s` cut to at most `max` bytes, on a character boundary (a name from the wire kept or printed).
pub fn cut_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

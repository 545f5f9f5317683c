//! The few bytes policies touch, read and patched by hand:
//!
//! - Produce `acks` (INT16 after the transactional id): patched to -1 in a copy of the frame.
//! - Fetch (v4+) and ListOffsets (v2+) `IsolationLevel` (INT8 at a fixed offset): patched to 1.
//! - InitProducerId `TransactionTimeoutMs` (INT32 after the transactional id): clamped into bounds.
//! - Fetch responses to a fetch the proxy upgraded: aborted transactional batches are removed, because a
//!   client that asked for read_uncommitted does not filter them itself (the broker never removes
//!   aborted data; a read_committed client skips it using the AbortedTransactions list).

use crate::filters::skim::TopicRef;
use crate::protocol::batch::BatchHeader;
use crate::protocol::header::RequestHead;
use crate::protocol::wire::{Reader, WireError};
use bytes::{Bytes, BytesMut};

fn body(head: &RequestHead) -> Result<usize, WireError> {
    head.body_offset.ok_or(WireError::Invalid {
        what: "request header",
        offset: 0,
    })
}

/// Offset of the INT16 acks field of a Produce request (v3+: after the transactional id).
pub fn produce_acks_offset(frame: &[u8], head: &RequestHead) -> Result<usize, WireError> {
    let mut r = Reader::at(frame, body(head)?);
    if head.api_version >= 9 {
        r.compact_nullable_bytes()?;
    } else if head.api_version >= 3 {
        r.nullable_string()?;
    }
    let at = r.position();
    r.i16()?;
    Ok(at)
}

/// A copy of `frame` with `bytes` written at `at`.
pub fn patched(frame: &[u8], at: usize, bytes: &[u8]) -> Bytes {
    let mut out = BytesMut::from(frame);
    out[at..at + bytes.len()].copy_from_slice(bytes);
    out.freeze()
}

/// What a Fetch or ListOffsets request asks: its isolation level (and where it sits) and its topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest<'a> {
    /// Offset and value of the IsolationLevel byte; `None` for versions without one.
    pub isolation: Option<(usize, i8)>,
    pub topics: Vec<TopicRef<'a>>,
}

fn array_len(r: &mut Reader, flexible: bool) -> Result<usize, WireError> {
    Ok(if flexible {
        r.compact_array_len()?
    } else {
        r.array_len()?
    }
    .unwrap_or(0))
}

fn topic_name<'a>(r: &mut Reader<'a>, flexible: bool) -> Result<&'a str, WireError> {
    let at = r.position();
    let raw = if flexible {
        r.compact_nullable_bytes()?
    } else {
        r.nullable_string()?
    }
    .unwrap_or_default();
    std::str::from_utf8(raw).map_err(|_| WireError::Invalid {
        what: "topic name",
        offset: at,
    })
}

/// Walks a Fetch request (any version the proxy accepts) for its isolation level and topics.
pub fn fetch_request<'a>(
    frame: &'a [u8],
    head: &RequestHead,
) -> Result<ReadRequest<'a>, WireError> {
    let v = head.api_version;
    let flexible = v >= 12;
    let mut r = Reader::at(frame, body(head)?);
    if v < 15 {
        r.skip(4)?; // replica id
    }
    r.skip(4 + 4)?; // max wait, min bytes
    if v >= 3 {
        r.skip(4)?; // max bytes
    }
    let isolation = if v >= 4 {
        let at = r.position();
        Some((at, r.i8()?))
    } else {
        None
    };
    if v >= 7 {
        r.skip(4 + 4)?; // session id, epoch
    }
    let n = array_len(&mut r, flexible)?;
    let mut topics = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        topics.push(if v >= 13 {
            let mut id = [0u8; 16];
            id.copy_from_slice(r.take(16)?);
            TopicRef::Id(id)
        } else {
            TopicRef::Name(topic_name(&mut r, flexible)?)
        });
        let per_partition = 4
            + if v >= 9 { 4 } else { 0 }
            + 8
            + if v >= 12 { 4 } else { 0 }
            + if v >= 5 { 8 } else { 0 }
            + 4;
        skip_partitions_and_topic_end(&mut r, per_partition, flexible)?;
    }
    Ok(ReadRequest { isolation, topics })
}

/// Skips a topic's partitions, each `per_partition` fixed bytes (plus tagged fields when flexible), and
/// the topic's own tagged fields.
fn skip_partitions_and_topic_end(
    r: &mut Reader<'_>,
    per_partition: usize,
    flexible: bool,
) -> Result<(), WireError> {
    for _ in 0..array_len(r, flexible)? {
        r.skip(per_partition)?;
        if flexible {
            r.skip_tagged_fields(u32::MAX)?;
        }
    }
    if flexible {
        r.skip_tagged_fields(u32::MAX)?;
    }
    Ok(())
}

/// Walks a ListOffsets request for its isolation level (v2+) and topics.
pub fn list_offsets_request<'a>(
    frame: &'a [u8],
    head: &RequestHead,
) -> Result<ReadRequest<'a>, WireError> {
    let v = head.api_version;
    let flexible = v >= 6;
    let mut r = Reader::at(frame, body(head)?);
    r.skip(4)?; // replica id
    let isolation = if v >= 2 {
        let at = r.position();
        Some((at, r.i8()?))
    } else {
        None
    };
    let n = array_len(&mut r, flexible)?;
    let mut topics = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        topics.push(TopicRef::Name(topic_name(&mut r, flexible)?));
        let per_partition = 4 + if v >= 4 { 4 } else { 0 } + 8 + if v == 0 { 4 } else { 0 };
        skip_partitions_and_topic_end(&mut r, per_partition, flexible)?;
    }
    Ok(ReadRequest { isolation, topics })
}

/// InitProducerId: the transactional id, the timeout and where it sits, whether the request asks
/// for a new producer id (no existing producer id given, v3+), and the two-phase commit flags (v6+,
/// KIP-939).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitProducerIdRequest<'a> {
    pub transactional_id: Option<&'a str>,
    pub timeout_at: usize,
    pub timeout_ms: i32,
    pub existing_producer_id: Option<i64>,
    /// The client takes part in two-phase commit: its transactions never time out at the coordinator.
    pub enable_2pc: bool,
    /// Keep the transaction the id has prepared instead of aborting it (recovery after a restart).
    pub keep_prepared_txn: bool,
}

pub fn init_producer_id_request<'a>(
    frame: &'a [u8],
    head: &RequestHead,
) -> Result<InitProducerIdRequest<'a>, WireError> {
    let v = head.api_version;
    let mut r = Reader::at(frame, body(head)?);
    let at = r.position();
    let raw = if v >= 2 {
        r.compact_nullable_bytes()?
    } else {
        r.nullable_string()?
    };
    let transactional_id = raw
        .map(|b| {
            std::str::from_utf8(b).map_err(|_| WireError::Invalid {
                what: "transactional id",
                offset: at,
            })
        })
        .transpose()?;
    let timeout_at = r.position();
    let timeout_ms = r.i32()?;
    let existing_producer_id = if v >= 3 {
        let pid = r.i64()?;
        r.i16()?; // producer epoch
        Some(pid).filter(|pid| *pid >= 0)
    } else {
        None
    };
    let (enable_2pc, keep_prepared_txn) = if v >= 6 {
        (r.i8()? != 0, r.i8()? != 0)
    } else {
        (false, false)
    };
    Ok(InitProducerIdRequest {
        transactional_id,
        timeout_at,
        timeout_ms,
        existing_producer_id,
        enable_2pc,
        keep_prepared_txn,
    })
}

/// Removes the batches of aborted transactions from a partition's records, the way a read_committed
/// consumer skips them: walking batches in offset order, a producer joins the aborted set when the
/// first offset of one of its aborted transactions is reached, and leaves it at its ABORT marker.
/// Control batches are kept (every client skips them). A trailing partial batch is kept as is.
/// Returns `None` when nothing was removed (the records go out untouched).
pub fn without_aborted(records: &[u8], aborted: &[(i64, i64)]) -> Option<Bytes> {
    if aborted.is_empty() {
        return None;
    }
    let mut pending: Vec<(i64, i64)> = aborted.to_vec();
    // (producer id, first offset), consumed in first-offset order.
    pending.sort_by_key(|a| a.1);
    let mut next = 0;
    let mut active: Vec<i64> = Vec::new();
    let mut out = BytesMut::new();
    let mut removed = false;
    let mut pos = 0;
    while pos < records.len() {
        let rest = &records[pos..];
        let whole = (rest.len() >= 12)
            .then(|| i32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]))
            .filter(|len| *len >= 0)
            .map(|len| 12 + len as usize)
            .filter(|total| *total <= rest.len());
        let Some(total) = whole else {
            out.extend_from_slice(rest); // partial batch: the client fetches it again later
            break;
        };
        let batch = &rest[..total];
        pos += total;
        let Some(h) = BatchHeader::new(batch).filter(|h| h.magic() == 2) else {
            out.extend_from_slice(batch);
            continue;
        };
        if h.is_transactional() {
            let last = h
                .base_offset()
                .saturating_add(i64::from(h.last_offset_delta()));
            while next < pending.len() && pending[next].1 <= last {
                if !active.contains(&pending[next].0) {
                    active.push(pending[next].0);
                }
                next += 1;
            }
            if h.is_control() {
                if is_abort_marker(batch) {
                    active.retain(|p| *p != h.producer_id());
                }
            } else if active.contains(&h.producer_id()) {
                removed = true;
                continue;
            }
        }
        out.extend_from_slice(batch);
    }
    removed.then(|| out.freeze())
}

/// Whether a control batch holds an ABORT marker (control record key: INT16 version, INT16 type 0).
fn is_abort_marker(batch: &[u8]) -> bool {
    let mut r = Reader::at(batch, 61);
    let key_type = (|| -> Result<i16, WireError> {
        varint(&mut r)?; // record length
        r.i8()?; // attributes
        varint(&mut r)?; // timestamp delta
        varint(&mut r)?; // offset delta
        let key_len = varint(&mut r)?;
        if key_len < 4 {
            return Err(WireError::Invalid {
                what: "control key",
                offset: r.position(),
            });
        }
        r.i16()?; // version
        r.i16()
    })();
    // An unreadable marker counts as an abort: leaving a producer in the aborted set would hide its
    // later committed data, while leaving it would at worst show what the client would show anyway.
    key_type.map_or(true, |t| t == 0)
}

/// A zigzag varint (record fields), bounded to 10 bytes.
fn varint(r: &mut Reader) -> Result<i64, WireError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let b = r.i8()? as u8;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
        }
    }
    Err(WireError::Invalid {
        what: "varint",
        offset: r.position(),
    })
}

#[cfg(test)]
mod tests;

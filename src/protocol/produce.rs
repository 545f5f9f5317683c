//! Zero-copy walk over a Produce request (v3-v13): transactional id, acks, and for every partition its
//! records bytes and the raw byte range of its entry, so a request can be rebuilt without some partitions
//! by copying the others verbatim (their batches are never altered). Up to v12 a topic is named by its
//! name; from v13 by its topic id, whose name the caller resolves (see [`TopicNames`]).
//!
//! Written by hand rather than with kafka-protocol's decoder: the decoder pre-allocates arrays from the
//! counts on the wire, so a 100-byte request claiming 2^31 topics could make the proxy abort. Here every
//! element is read from bytes that are really there.

use super::frame::SIZE_PREFIX;
use super::wire::{Reader, WireError};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// The first Produce version that names topics by topic id (KIP-516 on produce, Kafka 4.1).
pub const TOPIC_ID_VERSION: i16 = 13;

/// Names of the topic ids a v13+ request carries, as the proxy knows them; an id missing here is a
/// topic the proxy cannot name.
pub type TopicNames = HashMap<[u8; 16], Arc<str>>;

/// A topic as the request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WireTopic<'a> {
    /// v3-v12.
    Name(&'a str),
    /// v13+.
    Id([u8; 16]),
}

impl WireTopic<'_> {
    /// The owned form, to match the broker's answer later.
    pub fn to_owned(self) -> OwnedWireTopic {
        match self {
            WireTopic::Name(n) => OwnedWireTopic::Name(n.into()),
            WireTopic::Id(id) => OwnedWireTopic::Id(id),
        }
    }
}

/// [`WireTopic`] kept past the request (its answer names the topic the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedWireTopic {
    Name(Box<str>),
    Id([u8; 16]),
}

#[derive(Debug, Clone)]
pub struct PartitionView<'a> {
    pub index: i32,
    pub records: Option<&'a [u8]>,
    /// The whole partition entry (index, records, tagged fields), for verbatim copies.
    entry: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct TopicView<'a> {
    /// The topic as the request names it.
    pub wire: WireTopic<'a>,
    /// Its name: as sent (v3-v12), or the name of its topic id (v13+; `None`: an id the proxy cannot
    /// name).
    pub name: Option<&'a str>,
    pub partitions: Vec<PartitionView<'a>>,
    /// The encoded name or topic id (length prefix included).
    name_range: Range<usize>,
    /// Tagged fields after the partitions (flexible versions; empty otherwise).
    tagged_range: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct ProduceView<'a> {
    pub version: i16,
    pub transactional_id: Option<&'a str>,
    pub acks: i16,
    pub timeout_ms: i32,
    pub topics: Vec<TopicView<'a>>,
    /// Header and the fields before the topic array.
    prefix: Range<usize>,
    /// Top-level tagged fields after the topic array.
    trailer: Range<usize>,
}

fn utf8(b: &[u8], at: usize) -> Result<&str, WireError> {
    std::str::from_utf8(b).map_err(|_| WireError::Invalid {
        what: "utf-8 string",
        offset: at,
    })
}

/// Walks a size-prefixed Produce request frame whose body starts at `body_offset`; topic ids (v13+)
/// are named from `names`.
pub fn parse<'a>(
    frame: &'a [u8],
    body_offset: usize,
    version: i16,
    names: &'a TopicNames,
) -> Result<ProduceView<'a>, WireError> {
    let flexible = version >= 9;
    let mut r = Reader::at(frame, body_offset);
    let at = r.position();
    let transactional_id = if flexible {
        r.compact_nullable_bytes()?
    } else {
        r.nullable_string()?
    }
    .map(|b| utf8(b, at))
    .transpose()?;
    let acks = r.i16()?;
    let timeout_ms = r.i32()?;
    let prefix = 0..r.position();
    let topic_count = if flexible {
        r.compact_array_len()?
    } else {
        r.array_len()?
    }
    .unwrap_or(0);
    let mut topics = Vec::new();
    for _ in 0..topic_count {
        let name_start = r.position();
        let (wire, name) = if version >= TOPIC_ID_VERSION {
            let id = r.uuid()?;
            (WireTopic::Id(id), names.get(&id).map(|n| &**n))
        } else {
            let name = if flexible {
                r.compact_nullable_bytes()?
            } else {
                r.nullable_string()?
            }
            .ok_or(WireError::Invalid {
                what: "null topic name",
                offset: name_start,
            })?;
            let name = utf8(name, name_start)?;
            (WireTopic::Name(name), Some(name))
        };
        let name_range = name_start..r.position();
        let count = if flexible {
            r.compact_array_len()?
        } else {
            r.array_len()?
        }
        .unwrap_or(0);
        let mut partitions = Vec::new();
        for _ in 0..count {
            let start = r.position();
            let index = r.i32()?;
            let records = if flexible {
                r.compact_nullable_bytes()?
            } else {
                r.nullable_bytes()?
            };
            if flexible {
                r.skip_tagged_fields(u32::MAX)?;
            }
            partitions.push(PartitionView {
                index,
                records,
                entry: start..r.position(),
            });
        }
        let tagged_start = r.position();
        if flexible {
            r.skip_tagged_fields(u32::MAX)?;
        }
        topics.push(TopicView {
            wire,
            name,
            partitions,
            name_range,
            tagged_range: tagged_start..r.position(),
        });
    }
    let trailer_start = r.position();
    if flexible {
        r.skip_tagged_fields(u32::MAX)?;
    }
    if r.remaining() != 0 {
        return Err(WireError::Invalid {
            what: "bytes after the produce request",
            offset: r.position(),
        });
    }
    Ok(ProduceView {
        version,
        transactional_id,
        acks,
        timeout_ms,
        topics,
        prefix,
        trailer: trailer_start..frame.len(),
    })
}

fn put_len(out: &mut BytesMut, n: usize, flexible: bool) {
    if flexible {
        let mut v = (n + 1) as u32;
        while v >= 0x80 {
            out.put_u8((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.put_u8(v as u8);
    } else {
        out.put_i32(n as i32);
    }
}

impl ProduceView<'_> {
    pub fn partition_count(&self) -> usize {
        self.topics.iter().map(|t| t.partitions.len()).sum()
    }

    /// The topic ids (v13+) the request names that `names` did not name.
    pub fn unnamed_ids(&self) -> Vec<[u8; 16]> {
        let mut ids: Vec<[u8; 16]> = self
            .topics
            .iter()
            .filter(|t| t.name.is_none())
            .filter_map(|t| match t.wire {
                WireTopic::Id(id) => Some(id),
                WireTopic::Name(_) => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The same request without the partitions for which `keep(topic, partition)` is false; every kept
    /// partition entry (and so its batch) is copied byte for byte. Topics left empty are dropped.
    pub fn rebuild(&self, frame: &[u8], keep: impl Fn(usize, usize) -> bool) -> Bytes {
        let flexible = self.version >= 9;
        let mut out = BytesMut::with_capacity(frame.len());
        out.extend_from_slice(&frame[self.prefix.clone()]);
        let kept: Vec<Vec<usize>> = self
            .topics
            .iter()
            .enumerate()
            .map(|(t, topic)| {
                (0..topic.partitions.len())
                    .filter(|&p| keep(t, p))
                    .collect()
            })
            .collect();
        put_len(
            &mut out,
            kept.iter().filter(|k| !k.is_empty()).count(),
            flexible,
        );
        for (topic, parts) in self.topics.iter().zip(&kept) {
            if parts.is_empty() {
                continue;
            }
            out.extend_from_slice(&frame[topic.name_range.clone()]);
            put_len(&mut out, parts.len(), flexible);
            for &p in parts {
                out.extend_from_slice(&frame[topic.partitions[p].entry.clone()]);
            }
            out.extend_from_slice(&frame[topic.tagged_range.clone()]);
        }
        out.extend_from_slice(&frame[self.trailer.clone()]);
        let size = (out.len() - SIZE_PREFIX) as i32;
        out[..SIZE_PREFIX].copy_from_slice(&size.to_be_bytes());
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::header::peek_request;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader, TopicName};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    const A: [u8; 16] = [0xa; 16];
    const B: [u8; 16] = [0xb; 16];

    /// Topics a and b, by name up to v12 and by id (A, B) from v13.
    fn request(version: i16) -> Bytes {
        let part = |i: i32, r: &'static [u8]| {
            PartitionProduceData::default()
                .with_index(i)
                .with_records(Some(Bytes::from_static(r)))
        };
        let body = ProduceRequest::default()
            .with_transactional_id(Some(StrBytes::from_static_str("tx").into()))
            .with_acks(-1)
            .with_timeout_ms(3000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("a")))
                    .with_topic_id(uuid::Uuid::from_bytes(A))
                    .with_partition_data(vec![part(0, b"a0"), part(1, b"a1")]),
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("b")))
                    .with_topic_id(uuid::Uuid::from_bytes(B))
                    .with_partition_data(vec![part(7, b"b7")]),
            ]);
        let header = RequestHeader::default()
            .with_request_api_key(0)
            .with_request_api_version(version)
            .with_correlation_id(5);
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header
            .encode(&mut buf, ApiKey::Produce.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        let n = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&n.to_be_bytes());
        buf.freeze()
    }

    fn decode(frame: &Bytes, version: i16) -> ProduceRequest {
        let head = peek_request(frame).unwrap();
        let mut b = frame.slice(head.body_offset.unwrap()..);
        ProduceRequest::decode(&mut b, version).unwrap()
    }

    #[test]
    fn walks_and_rebuilds_every_version() {
        // The proxy can name A but not B.
        let names: TopicNames = [(A, Arc::from("a"))].into_iter().collect();
        for v in 3..=13 {
            let frame = request(v);
            let head = peek_request(&frame).unwrap();
            let view = parse(&frame, head.body_offset.unwrap(), v, &names).unwrap();
            assert_eq!(view.transactional_id, Some("tx"));
            assert_eq!((view.acks, view.timeout_ms), (-1, 3000));
            assert_eq!(view.partition_count(), 3);
            assert_eq!(view.topics[0].name, Some("a"));
            if v >= TOPIC_ID_VERSION {
                assert_eq!(view.topics[1].wire, WireTopic::Id(B));
                assert_eq!(view.topics[1].name, None, "an id the proxy cannot name");
                assert_eq!(view.unnamed_ids(), vec![B]);
            } else {
                assert_eq!(view.topics[1].wire, WireTopic::Name("b"));
                assert_eq!(view.topics[1].name, Some("b"));
                assert!(view.unnamed_ids().is_empty());
            }
            assert_eq!(view.topics[0].partitions[1].records, Some(&b"a1"[..]));
            // Keep everything: byte-identical.
            assert_eq!(view.rebuild(&frame, |_, _| true), frame, "v{v}");
            // Drop a1 and all of b: a decodable request with only a0.
            let rebuilt = view.rebuild(&frame, |t, p| t == 0 && p == 0);
            let req = decode(&rebuilt, v);
            assert_eq!(req.topic_data.len(), 1);
            if v >= TOPIC_ID_VERSION {
                assert_eq!(req.topic_data[0].topic_id.as_bytes(), &A);
            } else {
                assert_eq!(req.topic_data[0].name.0.as_str(), "a");
            }
            assert_eq!(req.topic_data[0].partition_data.len(), 1);
            assert_eq!(req.topic_data[0].partition_data[0].index, 0);
            assert_eq!(req.acks, -1);
        }
    }

    #[test]
    fn truncations_are_errors() {
        for v in [9, 13] {
            let frame = request(v);
            let head = peek_request(&frame).unwrap();
            for cut in head.body_offset.unwrap()..frame.len() {
                let cut = &frame[..cut];
                assert!(parse(cut, head.body_offset.unwrap(), v, &TopicNames::new()).is_err());
            }
        }
    }
}

//! Peeking at request headers without decoding the body.
//!
//! Request header v1 and v2 share their first fields: INT16 api key, INT16 api version, INT32 correlation
//! id, INT16-length nullable client id. v2 (flexible request versions) adds a tagged-field section. We read
//! those by hand, bounds-checked: kafka-protocol's `decode_request_header_from_buffer` panics on short input.

use super::frame::SIZE_PREFIX;
use super::wire::{Reader, WireError};
use kafka_protocol::messages::ApiKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    /// Byte range of the client id inside the frame (size prefix included), if not null.
    pub client_id: Option<(usize, usize)>,
    /// Offset of the request body inside the frame, when the header version is known (known api key).
    pub body_offset: Option<usize>,
}

impl RequestHead {
    pub fn known_key(&self) -> Option<ApiKey> {
        ApiKey::try_from(self.api_key).ok()
    }

    pub fn client_id<'a>(&self, frame: &'a [u8]) -> Option<&'a str> {
        self.client_id
            .and_then(|(s, e)| frame.get(s..e))
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// Reads the request header of a size-prefixed frame.
pub fn peek_request(frame: &[u8]) -> Result<RequestHead, WireError> {
    let mut r = Reader::at(frame, SIZE_PREFIX);
    let api_key = r.i16()?;
    let api_version = r.i16()?;
    let correlation_id = r.i32()?;
    let id_start = r.position() + 2;
    let client_id = r.nullable_string()?.map(|s| (id_start, id_start + s.len()));
    let body_offset = match ApiKey::try_from(api_key) {
        Ok(key) if api_version >= 0 => {
            if key.request_header_version(api_version) >= 2 {
                r.skip_tagged_fields(u32::MAX)?;
            }
            Some(r.position())
        }
        _ => None,
    };
    Ok(RequestHead {
        api_key,
        api_version,
        correlation_id,
        client_id,
        body_offset,
    })
}

/// Correlation id of a size-prefixed response frame (first field of every response header version).
pub fn response_correlation_id(frame: &[u8]) -> Result<i32, WireError> {
    Reader::at(frame, SIZE_PREFIX).i32()
}

/// The `acks` field of a Produce request (api key 0), read without decoding the rest of the body.
/// Produce v3+ starts with a nullable transactional id (compact from v9), then INT16 acks.
pub fn produce_acks(frame: &[u8], head: &RequestHead) -> Result<i16, WireError> {
    let Some(body) = head.body_offset else {
        return Err(WireError::Invalid {
            what: "produce header",
            offset: SIZE_PREFIX,
        });
    };
    let mut r = Reader::at(frame, body);
    if head.api_version >= 9 {
        r.compact_nullable_bytes()?;
    } else if head.api_version >= 3 {
        r.nullable_string()?;
    }
    r.i16()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::{ProduceRequest, RequestHeader};
    use kafka_protocol::protocol::{Encodable, StrBytes};

    fn encode_produce(version: i16, acks: i16, txn: Option<&str>) -> BytesMut {
        let header = RequestHeader::default()
            .with_request_api_key(0)
            .with_request_api_version(version)
            .with_correlation_id(77)
            .with_client_id(Some(StrBytes::from_static_str("cli")));
        let body = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(1000)
            .with_transactional_id(txn.map(|t| StrBytes::from_string(t.to_string()).into()));
        let mut buf = BytesMut::new();
        header
            .encode(&mut buf, ApiKey::Produce.request_header_version(version))
            .unwrap();
        body.encode(&mut buf, version).unwrap();
        super::super::frame::with_size_prefix(&buf)
    }

    #[test]
    fn peeks_header_and_acks_in_every_produce_version() {
        for v in 3..=12 {
            for (acks, txn) in [(0, None), (1, None), (-1, Some("tx-1"))] {
                let frame = encode_produce(v, acks, txn);
                let head = peek_request(&frame).unwrap();
                assert_eq!(
                    (head.api_key, head.api_version, head.correlation_id),
                    (0, v, 77)
                );
                assert_eq!(head.client_id(&frame), Some("cli"));
                assert_eq!(produce_acks(&frame, &head).unwrap(), acks, "v{v}");
            }
        }
    }

    #[test]
    fn short_and_hostile_headers_are_errors() {
        assert!(peek_request(&[0, 0, 0, 3, 0, 0, 0]).is_err());
        // client id claims 300 bytes
        let f = [0, 0, 0, 10, 0, 3, 0, 1, 0, 0, 0, 1, 1, 44];
        assert!(peek_request(&f).is_err());
        // unknown api key: header readable, body offset unknown
        let f = [0, 0, 0, 10, 0x7f, 0x00, 0, 1, 0, 0, 0, 1, 0xff, 0xff];
        let h = peek_request(&f).unwrap();
        assert!(h.known_key().is_none());
        assert!(h.body_offset.is_none());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a client sends, peeking never panics, and a successful peek reads in bounds.
        #[test]
        fn peek_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut frame = (bytes.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&bytes);
            if let Ok(head) = peek_request(&frame) {
                prop_assert!(head.body_offset.is_none_or(|o| o <= frame.len()));
                let _ = head.client_id(&frame);
                let _ = produce_acks(&frame, &head);
            }
        }
    }
}

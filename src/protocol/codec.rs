//! Full decode / re-encode of a response, for the few responses the proxy changes.
//!
//! Only used on broker responses (trusted peer) for api keys listed as `Decoded` in the version table.

use super::frame::SIZE_PREFIX;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("cannot decode {key:?} v{version} response: {source}")]
    Decode {
        key: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error("cannot encode {key:?} v{version} response: {source}")]
    Encode {
        key: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error("{key:?} v{version} response has {extra} bytes after its body")]
    Trailing {
        key: ApiKey,
        version: i16,
        extra: usize,
    },
}

/// Header version of a response. ApiVersions answers always use header v0 (so that a client that does not
/// yet know the broker's versions can read them).
pub fn response_header_version(key: ApiKey, version: i16) -> i16 {
    if key == ApiKey::ApiVersions {
        0
    } else {
        key.response_header_version(version)
    }
}

/// Decodes a size-prefixed response frame into its header and body.
pub fn decode_response<T: Decodable>(
    frame: Bytes,
    key: ApiKey,
    version: i16,
) -> Result<(ResponseHeader, T), CodecError> {
    let mut buf = frame.slice(SIZE_PREFIX.min(frame.len())..);
    let err = |source| CodecError::Decode {
        key,
        version,
        source,
    };
    let header =
        ResponseHeader::decode(&mut buf, response_header_version(key, version)).map_err(err)?;
    let body = T::decode(&mut buf, version).map_err(err)?;
    if !buf.is_empty() {
        return Err(CodecError::Trailing {
            key,
            version,
            extra: buf.len(),
        });
    }
    Ok((header, body))
}

/// Encodes a response header and body into a size-prefixed frame.
pub fn encode_response<T: Encodable>(
    header: &ResponseHeader,
    body: &T,
    key: ApiKey,
    version: i16,
) -> Result<Bytes, CodecError> {
    let err = |source| CodecError::Encode {
        key,
        version,
        source,
    };
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    header
        .encode(&mut buf, response_header_version(key, version))
        .map_err(err)?;
    body.encode(&mut buf, version).map_err(err)?;
    let size = (buf.len() - SIZE_PREFIX) as i32;
    buf[..SIZE_PREFIX].copy_from_slice(&size.to_be_bytes());
    Ok(buf.freeze())
}

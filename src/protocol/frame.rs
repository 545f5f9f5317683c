//! Kafka framing: every request and response is an INT32 size followed by that many bytes.
//!
//! Frames are yielded *with* their 4-byte size prefix so that a frame nobody needs to change can be written
//! to the other side as the very same bytes (one `Bytes` handle, no copy).

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio_util::codec::Decoder;

pub const SIZE_PREFIX: usize = 4;

/// The most buffer space reserved ahead of bytes actually received.
const RESERVE_AHEAD: usize = 1024 * 1024;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: i64, limit: usize },
    #[error("negative frame size {0}")]
    Negative(i32),
    #[error("frame of {0} bytes is too short for a header")]
    TooShort(usize),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Splits a byte stream into size-prefixed frames, refusing any frame over `max_frame_bytes` as soon as its
/// size prefix is read (the body is never buffered).
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
    min_frame_bytes: usize,
}

impl FrameCodec {
    /// `min_frame_bytes`: the shortest body a peer may send (8 for requests and 4 for responses: the fixed
    /// part of their headers). Shorter frames are protocol violations.
    pub fn new(max_frame_bytes: usize, min_frame_bytes: usize) -> Self {
        FrameCodec {
            max_frame_bytes,
            min_frame_bytes,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if src.len() < SIZE_PREFIX {
            return Ok(None);
        }
        let size = i32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if size < 0 {
            return Err(FrameError::Negative(size));
        }
        let size = size as usize;
        if size > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                size: size as i64,
                limit: self.max_frame_bytes,
            });
        }
        if size < self.min_frame_bytes {
            return Err(FrameError::TooShort(size));
        }
        let total = SIZE_PREFIX + size;
        if src.len() < total {
            // Grow towards the frame, but never reserve a peer's whole claim up front: a client that
            // announces 100 MiB and sends nothing must not cost 100 MiB.
            src.reserve((total - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        Ok(Some(src.split_to(total)))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => {
                let n = buf.remaining();
                buf.advance(n);
                Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed inside a frame ({n} bytes pending)"),
                )))
            }
        }
    }
}

/// Prefixes a body with its INT32 size.
pub fn with_size_prefix(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(SIZE_PREFIX + body.len());
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_with_prefix() {
        let mut c = FrameCodec::new(100, 4);
        let mut buf = BytesMut::from(&[0, 0, 0, 4, 1, 2, 3, 4, 0, 0, 0, 5, 9][..]);
        let f = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&f[..], &[0, 0, 0, 4, 1, 2, 3, 4]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 5);
    }

    #[test]
    fn refuses_oversize_before_reading_body() {
        let mut c = FrameCodec::new(1024, 8);
        let mut buf = BytesMut::from(&0x7fff_ffffi32.to_be_bytes()[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&(-5i32).to_be_bytes()[..]);
        assert!(matches!(c.decode(&mut buf), Err(FrameError::Negative(-5))));
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 1, 1][..]);
        assert!(matches!(c.decode(&mut buf), Err(FrameError::TooShort(2))));
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let mut c = FrameCodec::new(100, 4);
        let mut buf = BytesMut::from(&[0, 0, 0, 9, 1][..]);
        assert!(c.decode_eof(&mut buf).is_err());
        let mut empty = BytesMut::new();
        assert!(c.decode_eof(&mut empty).unwrap().is_none());
    }
}

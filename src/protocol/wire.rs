//! Bounds-checked readers for Kafka's primitive wire types.
//!
//! Every read returns `Err(WireError)` instead of panicking on short or hostile input; these are the only
//! primitives the proxy uses on bytes that came from the network before handing them to a full decoder.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated: needed {needed} bytes at offset {offset}, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("invalid {what} at offset {offset}")]
    Invalid { what: &'static str, offset: usize },
}

/// Kafka's own caps (4.4's generated readers): more array elements or tagged fields than these are
/// refused whatever the frame size.
pub const MAX_ARRAY_ELEMENTS: usize = 1_000_000;
pub const MAX_TAGGED_FIELDS: u32 = 10_000;

/// A cursor over a byte slice. Reads advance the position; nothing is copied.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn at(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(WireError::Truncated {
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            }),
        }
    }

    pub fn skip(&mut self, n: usize) -> Result<(), WireError> {
        self.take(n).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn i8(&mut self) -> Result<i8, WireError> {
        Ok(i8::from_be_bytes(self.array()?))
    }
    pub fn i16(&mut self) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    pub fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    /// A UUID (topic ids): 16 bytes.
    pub fn uuid(&mut self) -> Result<[u8; 16], WireError> {
        self.array()
    }

    /// Unsigned LEB128 varint, at most 5 bytes (Kafka's UNSIGNED_VARINT is a u32).
    pub fn uvarint(&mut self) -> Result<u32, WireError> {
        let start = self.pos;
        let mut value: u32 = 0;
        for i in 0..5 {
            let b = self.array::<1>()?[0];
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WireError::Invalid {
            what: "unsigned varint",
            offset: start,
        })
    }

    /// INT16-length string (nullable: -1). Returns the raw bytes, not validated as UTF-8.
    pub fn nullable_string(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let start = self.pos;
        let len = self.i16()?;
        match len {
            -1 => Ok(None),
            n if n < 0 => Err(WireError::Invalid {
                what: "string length",
                offset: start,
            }),
            n => Ok(Some(self.take(n as usize)?)),
        }
    }

    /// COMPACT_NULLABLE_STRING / COMPACT_BYTES: uvarint length+1, 0 = null.
    pub fn compact_nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        match self.uvarint()? {
            0 => Ok(None),
            n => Ok(Some(self.take((n - 1) as usize)?)),
        }
    }

    /// INT32-length bytes (nullable: -1).
    pub fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let start = self.pos;
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(WireError::Invalid {
                what: "bytes length",
                offset: start,
            }),
            n => Ok(Some(self.take(n as usize)?)),
        }
    }

    /// Length of a COMPACT_ARRAY (uvarint N+1); `None` for a null array.
    pub fn compact_array_len(&mut self) -> Result<Option<usize>, WireError> {
        let start = self.pos;
        match self.uvarint()? {
            0 => Ok(None),
            n => self.bounded_count((n - 1) as usize, start).map(Some),
        }
    }

    /// Length of an INT32-counted ARRAY; `None` for a null array.
    pub fn array_len(&mut self) -> Result<Option<usize>, WireError> {
        let start = self.pos;
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(WireError::Invalid {
                what: "array length",
                offset: start,
            }),
            n => self.bounded_count(n as usize, start).map(Some),
        }
    }

    /// An element count is refused before anyone loops or allocates on it when it is above Kafka's own
    /// cap or above the bytes left (every element takes at least one byte on the wire).
    fn bounded_count(&self, n: usize, start: usize) -> Result<usize, WireError> {
        if n > MAX_ARRAY_ELEMENTS || n > self.remaining() {
            return Err(WireError::Invalid {
                what: "array length",
                offset: start,
            });
        }
        Ok(n)
    }

    /// Skips a tagged-field section and reports whether `tag` was among the fields.
    pub fn skip_tagged_fields(&mut self, tag: u32) -> Result<bool, WireError> {
        let start = self.pos;
        let count = self.uvarint()?;
        if count > MAX_TAGGED_FIELDS {
            return Err(WireError::Invalid {
                what: "tagged field count",
                offset: start,
            });
        }
        let mut seen = false;
        for _ in 0..count {
            let t = self.uvarint()?;
            let size = self.uvarint()?;
            self.skip(size as usize)?;
            seen |= t == tag;
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = Reader::new(&[0, 1, 0]);
        assert_eq!(r.i16(), Ok(1));
        assert!(matches!(
            r.i32(),
            Err(WireError::Truncated { offset: 2, .. })
        ));
    }

    #[test]
    fn uvarint_decodes_and_rejects_overlong() {
        assert_eq!(Reader::new(&[0x96, 0x01]).uvarint(), Ok(150));
        assert!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
            .uvarint()
            .is_err());
    }

    #[test]
    fn strings_and_nulls() {
        let mut r = Reader::new(&[0xff, 0xff, 0, 2, b'h', b'i', 0, 9]);
        assert_eq!(r.nullable_string(), Ok(None));
        assert_eq!(r.nullable_string(), Ok(Some(&b"hi"[..])));
        assert!(r.nullable_string().is_err());
        assert!(Reader::new(&[0xff, 0xfe]).nullable_string().is_err());
    }

    #[test]
    fn tagged_fields_are_skipped_and_found() {
        // two fields: tag 3 size 1, tag 0 size 2
        let bytes = [2, 3, 1, 9, 0, 2, 7, 7];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.skip_tagged_fields(0), Ok(true));
        assert_eq!(r.remaining(), 0);
        let mut r = Reader::new(&bytes);
        assert_eq!(r.skip_tagged_fields(5), Ok(false));
        // a size that runs past the end is an error, not a panic
        assert!(Reader::new(&[1, 0, 200]).skip_tagged_fields(0).is_err());
    }
}

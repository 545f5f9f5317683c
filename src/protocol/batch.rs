//! A zero-copy view of a v2 record-batch header (the first 61 bytes), no decompression.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | baseOffset | 8 | 4 | batchLength | 12 | 4 | partitionLeaderEpoch | 16 | 1 | magic |
//! | 17 | 4 | crc (CRC-32C over byte 21 to the end) | 21 | 2 | attributes | 23 | 4 | lastOffsetDelta |
//! | 27 | 8 | baseTimestamp | 35 | 8 | maxTimestamp | 43 | 8 | producerId | 51 | 2 | producerEpoch |
//! | 53 | 4 | baseSequence | 57 | 4 | recordCount |
//!
//! [`validate_client_records`] applies the broker's checks on client batches (one batch per partition,
//! magic 2, base offset 0, length consistent, record count = lastOffsetDelta + 1 > 0, no control batch,
//! producer id >= 0 needs base sequence >= 0, optional CRC) and returns the broker's error code.

pub const HEADER_LEN: usize = 61;

/// Kafka error codes used when refusing a batch, as the broker would.
pub mod errors {
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const INVALID_RECORD: i16 = 87;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader<'a> {
    bytes: &'a [u8],
}

fn be<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl<'a> BatchHeader<'a> {
    /// A view over `bytes` if they hold at least a whole header; fields are read on demand.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() >= HEADER_LEN).then_some(BatchHeader { bytes })
    }
    pub fn base_offset(&self) -> i64 {
        i64::from_be_bytes(be(self.bytes, 0))
    }
    pub fn batch_length(&self) -> i32 {
        i32::from_be_bytes(be(self.bytes, 8))
    }
    pub fn magic(&self) -> i8 {
        self.bytes[16] as i8
    }
    pub fn crc(&self) -> u32 {
        u32::from_be_bytes(be(self.bytes, 17))
    }
    pub fn attributes(&self) -> i16 {
        i16::from_be_bytes(be(self.bytes, 21))
    }
    pub fn compression(&self) -> u8 {
        (self.attributes() & 0x07) as u8
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & 0x10 != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & 0x20 != 0
    }
    pub fn last_offset_delta(&self) -> i32 {
        i32::from_be_bytes(be(self.bytes, 23))
    }
    pub fn max_timestamp(&self) -> i64 {
        i64::from_be_bytes(be(self.bytes, 35))
    }
    pub fn producer_id(&self) -> i64 {
        i64::from_be_bytes(be(self.bytes, 43))
    }
    pub fn producer_epoch(&self) -> i16 {
        i16::from_be_bytes(be(self.bytes, 51))
    }
    pub fn base_sequence(&self) -> i32 {
        i32::from_be_bytes(be(self.bytes, 53))
    }
    pub fn record_count(&self) -> i32 {
        i32::from_be_bytes(be(self.bytes, 57))
    }
    /// Last sequence of the batch, wrapping past i32::MAX to 0 like the broker.
    pub fn last_sequence(&self) -> i32 {
        crate::eos::seq_add(self.base_sequence(), self.last_offset_delta())
    }
    /// Whether the stored CRC matches the bytes (CRC-32C from the attributes to the end of the batch).
    pub fn crc_ok(&self) -> bool {
        crc32c::crc32c(&self.bytes[21..]) == self.crc()
    }

    /// What the batch says, whoever sends it: everything but the producer id, epoch and sequence (and
    /// the broker-owned offset and leader epoch), so the same records re-sent under a new epoch or
    /// producer id, as librdkafka does after an epoch bump, digest the same. The attributes, the
    /// offset delta, both timestamps and the record count, then a CRC-32C of the record bytes (hardware
    /// accelerated: it costs a fraction of the copy the kernel makes of the same bytes).
    pub fn content_digest(&self) -> [u64; 2] {
        let head = u64::from(self.attributes() as u16) << 48
            | u64::from(self.last_offset_delta() as u32) << 16
            | u64::from(self.bytes.len() as u32 & 0xffff);
        let ts = (i64::from_be_bytes(be(self.bytes, 27)) as u64).rotate_left(32)
            ^ self.max_timestamp() as u64;
        let records = u64::from(crc32c::crc32c(&self.bytes[HEADER_LEN..]))
            | u64::from(self.record_count() as u32) << 32;
        [
            head ^ ts.rotate_left(7),
            records ^ (self.bytes.len() as u64).rotate_left(40),
        ]
    }
}

/// The fields of a client batch the producer-state logic needs, copied out of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub last_sequence: i32,
    pub record_count: i32,
    pub max_timestamp: i64,
    pub transactional: bool,
    pub compression: u8,
    pub bytes: usize,
}

impl BatchInfo {
    pub fn is_idempotent(&self) -> bool {
        self.producer_id >= 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRefusal {
    pub error_code: i16,
    pub reason: &'static str,
}

fn refuse(error_code: i16, reason: &'static str) -> BatchRefusal {
    BatchRefusal { error_code, reason }
}

/// Checks the records of one partition of a Produce v3+ request the way the broker does, and returns the
/// batch's producer fields. `None` records (null) are the broker's business and pass.
pub fn validate_client_records(records: &[u8], check_crc: bool) -> Result<BatchInfo, BatchRefusal> {
    use errors::*;
    let Some(h) = BatchHeader::new(records) else {
        return Err(refuse(
            INVALID_RECORD,
            "records shorter than a batch header",
        ));
    };
    if h.magic() != 2 {
        return Err(refuse(INVALID_RECORD, "magic is not 2"));
    }
    let total = i64::from(h.batch_length()) + 12;
    if total < HEADER_LEN as i64 {
        return Err(refuse(
            CORRUPT_MESSAGE,
            "batch length shorter than a batch header",
        ));
    }
    if total > records.len() as i64 {
        // The broker's batch iterator stops at a batch cut short, so it counts no batch at all:
        // "exactly one record batch" fails with INVALID_RECORD (checked against Kafka 4.4).
        return Err(refuse(INVALID_RECORD, "batch length runs past the records"));
    }
    if total != records.len() as i64 {
        return Err(refuse(
            INVALID_RECORD,
            "more than one batch for a partition",
        ));
    }
    if h.base_offset() != 0 {
        return Err(refuse(INVALID_RECORD, "base offset is not 0"));
    }
    if h.is_control() {
        return Err(refuse(INVALID_RECORD, "control batch from a client"));
    }
    if h.record_count() <= 0 || i64::from(h.last_offset_delta()) + 1 != i64::from(h.record_count())
    {
        return Err(refuse(
            INVALID_RECORD,
            "record count disagrees with lastOffsetDelta",
        ));
    }
    if h.producer_id() >= 0 && h.base_sequence() < 0 {
        return Err(refuse(INVALID_RECORD, "producer id without a sequence"));
    }
    if check_crc && !h.crc_ok() {
        return Err(refuse(CORRUPT_MESSAGE, "CRC mismatch"));
    }
    Ok(BatchInfo {
        producer_id: h.producer_id(),
        producer_epoch: h.producer_epoch(),
        base_sequence: h.base_sequence(),
        last_sequence: h.last_sequence(),
        record_count: h.record_count(),
        max_timestamp: h.max_timestamp(),
        transactional: h.is_transactional(),
        compression: h.compression(),
        bytes: records.len(),
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Builds a batch header + `payload` with a correct CRC (test helper, also used by property tests).
    pub fn batch(
        pid: i64,
        epoch: i16,
        seq: i32,
        count: i32,
        attributes: i16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b.extend_from_slice(payload);
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        b[16] = 2;
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b[23..27].copy_from_slice(&(count - 1).to_be_bytes());
        b[35..43].copy_from_slice(&1234i64.to_be_bytes());
        b[43..51].copy_from_slice(&pid.to_be_bytes());
        b[51..53].copy_from_slice(&epoch.to_be_bytes());
        b[53..57].copy_from_slice(&seq.to_be_bytes());
        b[57..61].copy_from_slice(&count.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn reads_fields_and_wraps_sequences() {
        let b = batch(42, 3, i32::MAX - 1, 4, 0x10 | 4, b"abc");
        let info = validate_client_records(&b, true).unwrap();
        assert_eq!(info.producer_id, 42);
        assert_eq!(info.producer_epoch, 3);
        assert_eq!(info.base_sequence, i32::MAX - 1);
        assert_eq!(info.last_sequence, 1, "wraps past i32::MAX to 0");
        assert!(info.transactional);
        assert_eq!(info.compression, 4);
        assert_eq!(info.max_timestamp, 1234);
    }

    #[test]
    fn refuses_what_the_broker_refuses() {
        let ok = batch(1, 0, 0, 2, 0, b"xy");
        let code =
            |b: &[u8], crc: bool| validate_client_records(b, crc).err().map(|r| r.error_code);
        assert_eq!(code(&ok, true), None);
        assert_eq!(code(&ok[..40], false), Some(errors::INVALID_RECORD));
        let mut m = ok.clone();
        m[16] = 1;
        assert_eq!(code(&m, false), Some(errors::INVALID_RECORD), "magic");
        let mut m = ok.clone();
        m[8..12].copy_from_slice(&1000i32.to_be_bytes());
        assert_eq!(
            code(&m, false),
            Some(errors::INVALID_RECORD),
            "a length running past the records: no whole batch for the broker"
        );
        let mut m = ok.clone();
        m[8..12].copy_from_slice(&20i32.to_be_bytes());
        assert_eq!(
            code(&m, false),
            Some(errors::CORRUPT_MESSAGE),
            "a length shorter than a header"
        );
        let mut two = ok.clone();
        two.extend_from_slice(&ok);
        assert_eq!(
            code(&two, false),
            Some(errors::INVALID_RECORD),
            "two batches"
        );
        let m = batch(1, 0, 0, 3, 0x20, b"");
        assert_eq!(code(&m, false), Some(errors::INVALID_RECORD), "control");
        let mut m = ok.clone();
        m[57..61].copy_from_slice(&5i32.to_be_bytes());
        assert_eq!(
            code(&m, false),
            Some(errors::INVALID_RECORD),
            "count vs delta"
        );
        let m = batch(1, 0, -1, 1, 0, b"");
        assert_eq!(
            code(&m, false),
            Some(errors::INVALID_RECORD),
            "pid without sequence"
        );
        let mut m = ok.clone();
        let last = m.len() - 1;
        m[last] ^= 1;
        assert_eq!(code(&m, true), Some(errors::CORRUPT_MESSAGE), "crc");
        assert_eq!(code(&m, false), None, "crc check off");
    }

    #[test]
    fn the_content_digest_ignores_who_sent_it_and_sees_what_was_sent() {
        let digest = |b: &[u8]| BatchHeader::new(b).unwrap().content_digest();
        let original = batch(-1, -1, -1, 3, 0, b"payload");
        // The same records under a producer id, epoch and sequence, at another leader epoch.
        let mut stamped = batch(42, 7, 100, 3, 0, b"payload");
        stamped[12..16].copy_from_slice(&9i32.to_be_bytes());
        assert_eq!(digest(&original), digest(&stamped));
        for other in [
            batch(-1, -1, -1, 3, 0, b"paylpad"),
            batch(-1, -1, -1, 3, 0, b"payload!"),
            batch(-1, -1, -1, 2, 0, b"payload"),
            batch(-1, -1, -1, 3, 1, b"payload"),
        ] {
            assert_ne!(digest(&original), digest(&other));
        }
        let mut later = original.clone();
        later[27..35].copy_from_slice(&1i64.to_be_bytes());
        assert_ne!(
            digest(&original),
            digest(&later),
            "the base timestamp counts"
        );
    }
}

//! Support shared by the integration tests, examples and benchmarks: a raw-wire Kafka client (it speaks
//! exactly what it is told, which is what tests of hostile and unusual input need) and a record-batch
//! builder. Not part of the proxy's API.
#![doc(hidden)]

use crate::tls::stream::{ReadHalf, WriteHalf};
use crate::tls::Stream;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A v2 record batch of `n` records from producer (pid, epoch) starting at sequence `seq`, each record's
/// value `"{tag}-{sequence}"` (pid -1: no producer, as a non-idempotent client sends).
pub fn record_batch(
    pid: i64,
    epoch: i16,
    seq: i32,
    n: i32,
    transactional: bool,
    tag: &str,
) -> Bytes {
    build_batch(pid, epoch, seq, n, transactional, |s| {
        Bytes::from(format!("{tag}-{s}"))
    })
}

/// The same with every value `size` bytes long (benchmarks: the batch's size is what matters).
pub fn record_batch_sized(pid: i64, epoch: i16, seq: i32, n: i32, size: usize) -> Bytes {
    let value = Bytes::from(vec![b'v'; size]);
    build_batch(pid, epoch, seq, n, false, |_| value.clone())
}

/// The records' creation time: when this process first built a batch. Fixed, so a batch built twice
/// is byte-identical (the content window and the retry tests rely on that); recent, because a broker
/// deletes records older than its retention (7 days by default) at its first retention check, 30 s
/// after it starts: a fixed date in the past made reads in the tests come back short, but only
/// against a freshly started broker and only when the check fell between a write and its read.
pub fn batch_timestamp() -> i64 {
    static AT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

fn build_batch(
    pid: i64,
    epoch: i16,
    seq: i32,
    n: i32,
    transactional: bool,
    value: impl Fn(i32) -> Bytes,
) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional,
            control: false,
            partition_leader_epoch: 0,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i64::from(i),
            sequence: if pid < 0 { -1 } else { seq + i },
            timestamp: batch_timestamp(),
            key: None,
            value: Some(value(seq + i)),
            headers: Default::default(),
            delete_horizon: false,
        })
        .collect();
    let mut buf = BytesMut::new();
    // Encoding a batch of plain records into memory cannot fail.
    let _ = RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    );
    buf.freeze()
}

/// A size-prefixed request frame.
pub fn request_frame<R: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    client_id: &str,
    req: &R,
) -> io::Result<Bytes> {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_string(client_id.to_string())));
    header
        .encode(&mut buf, key.request_header_version(version))
        .and_then(|_| req.encode(&mut buf, version))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let n = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&n.to_be_bytes());
    Ok(buf.freeze())
}

/// A raw-wire client: one connection, requests encoded as asked, answers read in order.
pub struct RawClient {
    read: ReadHalf,
    write: WriteHalf,
    next_corr: i32,
    pub client_id: String,
}

impl RawClient {
    pub async fn connect(addr: &str, client_id: &str) -> io::Result<RawClient> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Ok(RawClient::on(stream, client_id))
    }

    /// A client on a connection made elsewhere (with socket options of its own).
    pub fn on(stream: TcpStream, client_id: &str) -> RawClient {
        RawClient::over(Stream::Plain(stream), client_id)
    }

    /// A client on a connection with or without TLS.
    pub fn over(stream: Stream, client_id: &str) -> RawClient {
        let (read, write) = stream.split();
        RawClient {
            read,
            write,
            next_corr: 1,
            client_id: client_id.to_string(),
        }
    }

    /// The next request's frame and correlation id (sent with [`RawClient::send_bytes`], or not).
    pub fn encode<R: Encodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &R,
    ) -> io::Result<(i32, Bytes)> {
        let corr = self.next_corr;
        self.next_corr += 1;
        Ok((
            corr,
            request_frame(key, version, corr, &self.client_id, req)?,
        ))
    }

    /// Sends a request without waiting for its answer; returns its correlation id.
    pub async fn send<R: Encodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &R,
    ) -> io::Result<i32> {
        let (corr, frame) = self.encode(key, version, req)?;
        self.write.write_all(&frame).await?;
        Ok(corr)
    }

    /// Half-closes: the peer reads end of stream after what was sent.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.write.shutdown().await
    }

    /// Whatever bytes arrive next (0: the peer closed).
    pub async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read.read(buf).await
    }

    /// Writes bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write.write_all(bytes).await
    }

    /// The next answer frame, size prefix included.
    pub async fn recv(&mut self) -> io::Result<Bytes> {
        let mut size = [0u8; 4];
        self.read.read_exact(&mut size).await?;
        let n = i32::from_be_bytes(size).max(0) as usize;
        let mut buf = vec![0u8; 4 + n];
        buf[..4].copy_from_slice(&size);
        self.read.read_exact(&mut buf[4..]).await?;
        Ok(Bytes::from(buf))
    }

    /// Sends a request and decodes its answer.
    pub async fn call<R: Encodable, S: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &R,
    ) -> io::Result<S> {
        self.send(key, version, req).await?;
        let frame = self.recv().await?;
        decode_answer(key, version, frame)
    }
}

/// Decodes a size-prefixed answer frame.
pub fn decode_answer<S: Decodable>(key: ApiKey, version: i16, frame: Bytes) -> io::Result<S> {
    let mut body = frame.slice(4.min(frame.len())..);
    let header_version = if key == ApiKey::ApiVersions {
        0
    } else {
        key.response_header_version(version)
    };
    ResponseHeader::decode(&mut body, header_version)
        .and_then(|_| S::decode(&mut body, version))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

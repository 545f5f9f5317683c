//! One client connection and its one upstream connection.
//!
//! ```text
//! client ──frames──▶ request pump ──raw bytes──▶ upstream broker
//!                        │ Pending (in request order)
//!                        ▼
//! client ◀──frames── response pump ◀──frames── upstream broker
//! ```
//!
//! The request pump peeks each request header, decides what its response will need (nothing, an address
//! rewrite, a version clamp) and queues that in request order; acks=0 produce requests queue nothing, as
//! the broker answers nothing. The response pump takes the queue in order, reads the matching upstream
//! response, checks its correlation id, and writes it (untouched, or rewritten) to the client. A
//! `Pending::Local` entry is an answer the proxy makes itself, delivered in its place in the order.
//! The queue is bounded (`limits.max_in_flight_per_connection`): a client that pipelines more waits.

mod close;

pub use close::Close;

use crate::filters::{addresses, api_versions};
use crate::protocol::frame::{FrameCodec, SIZE_PREFIX};
use crate::protocol::header::{peek_request, produce_acks, response_correlation_id};
use crate::protocol::versions;
use crate::server::Shared;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kafka_protocol::messages::ApiKey;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

/// Which upstream a listener's connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Bootstrap,
    Node(i32),
}

/// Smallest request body: api key, version, correlation id. Smallest response: correlation id.
const MIN_REQUEST: usize = 8;
const MIN_RESPONSE: usize = 4;
const WRITE_BUFFER: usize = 64 * 1024;

/// What the response of an in-flight request needs.
#[derive(Debug, Clone, Copy)]
enum ResponseAction {
    PassThrough,
    RewriteAddresses,
    ClampApiVersions,
}

#[derive(Debug)]
struct InFlight {
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    action: ResponseAction,
}

#[derive(Debug)]
enum Pending {
    Upstream(InFlight),
    /// A response the proxy built itself (issue #3's produce guard uses this).
    #[allow(dead_code)]
    Local(Bytes),
}

/// What every part of a session needs to know about its connection.
struct Conn<'a> {
    target: Target,
    shared: &'a Shared,
}

pub async fn run(
    client: TcpStream,
    peer: SocketAddr,
    target: Target,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let conn = Conn {
        target,
        shared: &shared,
    };
    let upstream = match connect_upstream(&conn).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, ?target, error = %e, "cannot reach upstream; closing client connection");
            return;
        }
    };
    let upstream_addr = upstream.peer_addr().ok();
    debug!(%peer, ?target, upstream = ?upstream_addr, "session open");

    let limits = &shared.config.limits;
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut requests = FramedRead::with_capacity(
        client_read,
        FrameCodec::new(limits.max_frame_bytes, MIN_REQUEST),
        WRITE_BUFFER,
    );
    let mut responses = FramedRead::with_capacity(
        upstream_read,
        FrameCodec::new(limits.max_frame_bytes, MIN_RESPONSE),
        WRITE_BUFFER,
    );
    let mut to_upstream = BufWriter::with_capacity(WRITE_BUFFER, upstream_write);
    let mut to_client = BufWriter::with_capacity(WRITE_BUFFER, client_write);
    let (tx, rx) = mpsc::channel(limits.max_in_flight_per_connection);

    let close = tokio::select! {
        c = request_pump(&conn, &mut requests, &mut to_upstream, tx) => c,
        c = response_pump(&conn, &mut responses, &mut to_client, rx) => c,
        _ = shared.shutdown.cancelled() => Close::Shutdown,
    };
    let _ = to_client.flush().await;
    if close.is_protocol_violation() {
        warn!(%peer, ?target, reason = close.kind(), detail = %close, "closing connection");
    } else {
        debug!(%peer, ?target, reason = close.kind(), detail = %close, "session closed");
    }
}

async fn connect_upstream(conn: &Conn<'_>) -> Result<TcpStream, String> {
    let up = &conn.shared.config.upstream;
    let candidates: Vec<String> = match conn.target {
        Target::Bootstrap => up.bootstrap_servers.clone(),
        Target::Node(id) => match conn.shared.brokers.upstream_of(id) {
            Some(a) => vec![a],
            None => return Err(format!("no upstream address known for node {id}")),
        },
    };
    let mut last = String::from("no candidates");
    for addr in candidates {
        match tokio::time::timeout(up.connect_timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connect timed out after {:?}", up.connect_timeout),
        }
    }
    Err(last)
}

/// True if `buf` already holds a whole frame, i.e. the next read will not wait on the network.
fn holds_complete_frame(buf: &BytesMut) -> bool {
    if buf.len() < SIZE_PREFIX {
        return false;
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    size >= 0 && buf.len() >= SIZE_PREFIX + size as usize
}

async fn request_pump(
    conn: &Conn<'_>,
    requests: &mut FramedRead<OwnedReadHalf, FrameCodec>,
    upstream: &mut BufWriter<OwnedWriteHalf>,
    tx: mpsc::Sender<Pending>,
) -> Close {
    let idle = conn.shared.config.limits.idle_timeout;
    loop {
        // Flush before any wait, so requests never sit in our buffer while we block.
        if !holds_complete_frame(requests.read_buffer()) {
            if let Err(e) = upstream.flush().await {
                return Close::UpstreamIo(e);
            }
        }
        let frame = match tokio::time::timeout(idle, requests.next()).await {
            Err(_) if tx.capacity() == tx.max_capacity() => return Close::Idle(idle),
            Err(_) => continue, // responses still pending: not idle
            Ok(None) => return Close::ClientClosed,
            Ok(Some(Err(e))) => return Close::ClientFrame(e),
            Ok(Some(Ok(frame))) => frame.freeze(),
        };
        let head = match peek_request(&frame) {
            Ok(h) => h,
            Err(e) => return Close::MalformedRequest(e.to_string()),
        };
        let Some(key) = head.known_key() else {
            return Close::UnknownApiKey(head.api_key);
        };
        if !versions::accepts(key, head.api_version) {
            return Close::UnsupportedVersion {
                key,
                version: head.api_version,
            };
        }
        let expects_response = match key {
            ApiKey::Produce => match produce_acks(&frame, &head) {
                Ok(acks) => acks != 0,
                Err(e) => return Close::MalformedRequest(format!("produce: {e}")),
            },
            _ => true,
        };
        if expects_response {
            let pending = Pending::Upstream(InFlight {
                correlation_id: head.correlation_id,
                key,
                version: head.api_version,
                action: response_action(key),
            });
            if let Err(e) = queue(&tx, pending, upstream).await {
                return e;
            }
        }
        if let Err(e) = upstream.write_all(&frame).await {
            return Close::UpstreamIo(e);
        }
    }
}

/// Queues a pending response; if the queue is full, flushes upstream first so the responses that will
/// free it can come.
async fn queue(
    tx: &mpsc::Sender<Pending>,
    pending: Pending,
    upstream: &mut BufWriter<OwnedWriteHalf>,
) -> Result<(), Close> {
    match tx.try_send(pending) {
        Ok(()) => Ok(()),
        Err(TrySendError::Closed(_)) => Err(Close::ResponseSideClosed),
        Err(TrySendError::Full(pending)) => {
            upstream.flush().await.map_err(Close::UpstreamIo)?;
            tx.send(pending)
                .await
                .map_err(|_| Close::ResponseSideClosed)
        }
    }
}

fn response_action(key: ApiKey) -> ResponseAction {
    match key {
        ApiKey::ApiVersions => ResponseAction::ClampApiVersions,
        ApiKey::Metadata
        | ApiKey::FindCoordinator
        | ApiKey::DescribeCluster
        | ApiKey::Produce
        | ApiKey::Fetch
        | ApiKey::ShareFetch
        | ApiKey::ShareAcknowledge => ResponseAction::RewriteAddresses,
        _ => ResponseAction::PassThrough,
    }
}

async fn response_pump(
    conn: &Conn<'_>,
    responses: &mut FramedRead<OwnedReadHalf, FrameCodec>,
    client: &mut BufWriter<OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Pending>,
) -> Close {
    loop {
        let pending = match rx.try_recv() {
            Ok(p) => p,
            Err(TryRecvError::Disconnected) => return Close::ClientClosed,
            Err(TryRecvError::Empty) => {
                if let Err(e) = client.flush().await {
                    return Close::ClientIo(e);
                }
                // Nothing expected: wait for the next request, but notice an upstream that closes (or
                // speaks out of turn) meanwhile. `biased`: the queue is always checked first, and an entry
                // is queued before its request is written, so a response never beats its own entry.
                tokio::select! {
                    biased;
                    p = rx.recv() => match p {
                        Some(p) => p,
                        None => return Close::ClientClosed,
                    },
                    f = responses.next() => return match f {
                        None => Close::UpstreamClosed,
                        Some(Err(e)) => Close::UpstreamFrame(e),
                        Some(Ok(_)) => Close::UnexpectedResponse,
                    },
                }
            }
        };
        let out = match pending {
            Pending::Local(bytes) => bytes,
            Pending::Upstream(inflight) => {
                if !holds_complete_frame(responses.read_buffer()) {
                    if let Err(e) = client.flush().await {
                        return Close::ClientIo(e);
                    }
                }
                let frame = match responses.next().await {
                    None => return Close::UpstreamClosed,
                    Some(Err(e)) => return Close::UpstreamFrame(e),
                    Some(Ok(f)) => f.freeze(),
                };
                match process_response(conn, frame, &inflight).await {
                    Ok(out) => out,
                    Err(close) => return close,
                }
            }
        };
        if let Some(hook) = &conn.shared.hooks.on_client_frame {
            hook(&out);
        }
        if let Err(e) = client.write_all(&out).await {
            return Close::ClientIo(e);
        }
    }
}

async fn process_response(
    conn: &Conn<'_>,
    frame: Bytes,
    inflight: &InFlight,
) -> Result<Bytes, Close> {
    match response_correlation_id(&frame) {
        Ok(id) if id == inflight.correlation_id => {}
        Ok(id) => {
            return Err(Close::CorrelationMismatch {
                expected: inflight.correlation_id,
                got: id,
            })
        }
        Err(e) => return Err(Close::MalformedResponse(e.to_string())),
    }
    let out = match inflight.action {
        ResponseAction::PassThrough => frame,
        ResponseAction::ClampApiVersions => {
            api_versions::clamp_api_versions(frame, inflight.version)
                .map_err(|e| Close::MalformedResponse(e.to_string()))?
        }
        ResponseAction::RewriteAddresses => {
            addresses::rewrite_response(frame, inflight.key, inflight.version, &conn.shared.brokers)
                .await
                .map_err(|e| Close::MalformedResponse(e.to_string()))?
        }
    };
    Ok(out)
}

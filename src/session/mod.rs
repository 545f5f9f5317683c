//! One client connection and its one upstream connection.
//!
//! ```text
//! client ──frames──▶ request pump ──▶ chain (request side) ──bytes──▶ upstream broker
//!                        │ Pending (in request order)
//!                        ▼
//! client ◀──frames── response pump ◀── chain (response side) ◀──frames── upstream broker
//! ```
//!
//! The session knows no feature: the request pump peeks each request header and hands the request to
//! the [`crate::stages::Chain`] (the stages that asked for its api key: see [`crate::stages`]), which may patch it,
//! leave memos for its answer, or answer it itself. What goes upstream is queued in request order first
//! (acks=0 produce requests queue nothing, as the broker answers nothing). The response pump takes the
//! queue in order, reads the matching upstream response, checks its correlation id, runs the chain's
//! response side and writes the result to the client. A `Pending::Local` entry is an answer the proxy
//! made itself, delivered in its place in the order. The queue is bounded
//! (`limits.max_in_flight_per_connection`): a client that pipelines more waits.

pub mod close;
pub mod link;

pub use crate::stages::{Handles, Hooks};
pub use close::Close;
pub use link::Writer;

use crate::client::Client;
use crate::protocol::frame::{FrameCodec, SIZE_PREFIX};
use crate::protocol::header::{peek_request, response_correlation_id};
use crate::stages::{ConnState, Exchange, Request, RequestCx, ResponseCx, Step};
use crate::tls::stream::ReadHalf;
use crate::tls::Stream;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use link::{Activity, Side};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// A request sent upstream whose answer is awaited.
struct InFlight {
    correlation_id: i32,
    exchange: Exchange,
    /// When the request was read from the client and written upstream (for latency metrics).
    timing: Option<(Instant, Instant)>,
}

enum Pending {
    Upstream(InFlight),
    /// A response the proxy built itself (a duplicate answered, a fenced request), in its place in order.
    Local(Bytes),
}

/// What every part of a session needs to know about its connection.
struct Conn<'a> {
    target: Target,
    shared: &'a Handles,
    /// Who the client is (learned as requests and answers pass; both pumps read it).
    client: Client,
}

pub async fn run(
    client: TcpStream,
    peer: SocketAddr,
    target: Target,
    shared: Arc<Handles>,
    _permit: OwnedSemaphorePermit,
) {
    // A TLS listener: the handshake first, bounded by its timeout (a client that stalls or speaks
    // plaintext to a TLS port costs one log line).
    let client = match shared.tls.accept(client).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, ?target, error = %e, "closing client connection");
            if let Some(m) = &shared.metrics {
                m.connection_closed("tls_handshake");
            }
            return;
        }
    };
    // One port for every broker: the name the client asked for picks the upstream.
    let target = if shared.brokers.routes_by_sni() {
        match shared.brokers.route_sni(client.sni()) {
            Ok(None) => Target::Bootstrap,
            Ok(Some(node)) => Target::Node(node),
            Err(e) => {
                warn!(%peer, error = %e, "closing client connection");
                if let Some(m) = &shared.metrics {
                    m.connection_closed("sni_unknown");
                }
                return;
            }
        }
    } else {
        target
    };
    let conn = Conn {
        target,
        shared: &shared,
        client: Client::new(
            peer,
            match target {
                Target::Node(id) => Some(id),
                Target::Bootstrap => None,
            },
        ),
    };
    if let Some(principal) = shared.tls.principal(&client) {
        conn.client.set_certificate_principal(principal);
    }
    let upstream = match connect_upstream(&conn).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, ?target, error = %e, "cannot reach upstream; closing client connection");
            if let Some(m) = &shared.metrics {
                m.connection_closed("upstream_unreachable");
            }
            return;
        }
    };
    let upstream_addr = upstream.tcp().peer_addr().ok();
    if let Some(m) = &shared.metrics {
        m.connections_active.inc();
    }
    debug!(%peer, ?target, upstream = ?upstream_addr, "session open");

    let limits = &shared.limits;
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
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
    let activity = Activity::new();
    let wt = limits.write_timeout;
    let mut to_upstream = Writer::new(upstream_write, WRITE_BUFFER, wt, Side::Upstream, &activity);
    let mut to_client = Writer::new(client_write, WRITE_BUFFER, wt, Side::Client, &activity);
    let (tx, rx) = mpsc::channel(limits.max_in_flight_per_connection);

    let close = tokio::select! {
        c = request_pump(&conn, &mut requests, &mut to_upstream, tx, &activity) => c,
        c = response_pump(&conn, &mut responses, &mut to_client, rx, &activity) => c,
        _ = shared.shutdown.cancelled() => Close::Shutdown,
    };
    // Bounded like every write: a client that stopped reading does not hold the slot any longer.
    let _ = to_client.flush().await;
    if let Some(m) = &shared.metrics {
        m.connections_active.dec();
        m.connection_closed(close.kind());
    }
    if close.is_protocol_violation() {
        warn!(%peer, ?target, reason = close.kind(), detail = %close, "closing connection");
    } else {
        debug!(%peer, ?target, reason = close.kind(), detail = %close, "session closed");
    }
}

async fn connect_upstream(conn: &Conn<'_>) -> Result<Stream, String> {
    let up = &conn.shared.upstream;
    let candidates: Vec<String> = match conn.target {
        Target::Bootstrap => up.bootstrap_servers.clone(),
        Target::Node(id) => match conn.shared.brokers.upstream_of(id) {
            Some(a) => vec![a],
            None => return Err(format!("no upstream address known for node {id}")),
        },
    };
    let mut last = String::from("no candidates");
    for addr in candidates {
        match conn.shared.tls.connect(&addr, up.connect_timeout).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
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
    requests: &mut FramedRead<ReadHalf, FrameCodec>,
    upstream: &mut Writer<'_>,
    tx: mpsc::Sender<Pending>,
    activity: &Activity,
) -> Close {
    let idle = conn.shared.limits.idle_timeout;
    let metrics = conn.shared.metrics.as_deref();
    let mut state = ConnState::default();
    loop {
        // Flush before any wait, so requests never sit in our buffer while we block.
        if !holds_complete_frame(requests.read_buffer()) {
            if let Err(e) = upstream.flush().await {
                return e;
            }
        }
        // Idle is measured from the last byte moved either way (answers still flowing keep it open).
        let wait = idle
            .saturating_sub(activity.idle_for())
            .max(Duration::from_millis(10));
        let frame = match tokio::time::timeout(wait, requests.next()).await {
            Err(_) if activity.idle_for() >= idle => return Close::Idle(idle),
            Err(_) => continue,
            Ok(None) => return Close::ClientClosed,
            Ok(Some(Err(e))) => return Close::client_read(e),
            Ok(Some(Ok(frame))) => frame.freeze(),
        };
        activity.touch();
        let received = metrics.map(|m| {
            m.bytes_from_client.inc_by(frame.len() as u64);
            Instant::now()
        });
        let head = match peek_request(&frame) {
            Ok(h) => h,
            Err(e) => return Close::MalformedRequest(e.to_string()),
        };
        let Some(key) = head.known_key() else {
            return Close::UnknownApiKey(head.api_key);
        };
        let mut req = Request::new(frame, head, key);
        let step = {
            let mut cx = RequestCx {
                handles: conn.shared,
                client: &conn.client,
                state: &mut state,
                upstream,
            };
            match conn.shared.chain.request(&mut cx, &mut req).await {
                Ok(step) => step,
                Err(close) => return close,
            }
        };
        if let Some(m) = metrics {
            m.api(req.head.api_key).requests.inc();
        }
        if let Step::Answer(answer) = step {
            if let Some(answer) = answer {
                if let Err(e) = queue(&tx, Pending::Local(answer), upstream).await {
                    return e;
                }
            }
            continue;
        }
        let correlation_id = req.head.correlation_id;
        let expects_response = req.expects_response;
        let (exchange, out) = req.exchange();
        if expects_response {
            let pending = Pending::Upstream(InFlight {
                correlation_id,
                exchange,
                timing: received.map(|r| (r, Instant::now())),
            });
            if let Err(e) = queue(&tx, pending, upstream).await {
                return e;
            }
        }
        if let Some(m) = metrics {
            m.bytes_to_upstream.inc_by(out.len() as u64);
        }
        if let Some(hook) = &conn.shared.hooks.on_upstream_frame {
            hook(&out);
        }
        if let Err(e) = upstream.write_all(&out).await {
            return e;
        }
    }
}

/// Queues a pending response; if the queue is full, flushes upstream first so the responses that will
/// free it can come.
async fn queue(
    tx: &mpsc::Sender<Pending>,
    pending: Pending,
    upstream: &mut Writer<'_>,
) -> Result<(), Close> {
    match tx.try_send(pending) {
        Ok(()) => Ok(()),
        Err(TrySendError::Closed(_)) => Err(Close::ResponseSideClosed),
        Err(TrySendError::Full(pending)) => {
            upstream.flush().await?;
            tx.send(pending)
                .await
                .map_err(|_| Close::ResponseSideClosed)
        }
    }
}

async fn response_pump(
    conn: &Conn<'_>,
    responses: &mut FramedRead<ReadHalf, FrameCodec>,
    client: &mut Writer<'_>,
    mut rx: mpsc::Receiver<Pending>,
    activity: &Activity,
) -> Close {
    let metrics = conn.shared.metrics.as_deref();
    loop {
        let pending = match rx.try_recv() {
            Ok(p) => p,
            Err(TryRecvError::Disconnected) => return Close::ClientClosed,
            Err(TryRecvError::Empty) => {
                if let Err(e) = client.flush().await {
                    return e;
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
                        Some(Err(e)) => Close::upstream_read(e),
                        Some(Ok(_)) => Close::UnexpectedResponse,
                    },
                }
            }
        };
        let (api_key, out) = match pending {
            Pending::Local(bytes) => (-1, bytes),
            Pending::Upstream(mut inflight) => {
                let api_key = inflight.exchange.key as i16;
                if !holds_complete_frame(responses.read_buffer()) {
                    if let Err(e) = client.flush().await {
                        return e;
                    }
                }
                let frame = match responses.next().await {
                    None => return Close::UpstreamClosed,
                    Some(Err(e)) => return Close::upstream_read(e),
                    Some(Ok(f)) => f.freeze(),
                };
                activity.touch();
                if let Some(break_it) = &conn.shared.hooks.break_before_answer {
                    if break_it(api_key) {
                        return Close::UpstreamClosed;
                    }
                }
                let answered = metrics.map(|m| {
                    m.bytes_from_upstream.inc_by(frame.len() as u64);
                    Instant::now()
                });
                let out = match process_response(conn, frame, &mut inflight).await {
                    Ok(out) => out,
                    Err(close) => return close,
                };
                if let (Some(m), Some((received, sent)), Some(answered)) =
                    (metrics, inflight.timing, answered)
                {
                    let api = m.api(api_key);
                    api.upstream_seconds
                        .observe(answered.saturating_duration_since(sent).as_secs_f64());
                    let inside = sent.saturating_duration_since(received) + answered.elapsed();
                    api.proxy_seconds.observe(inside.as_secs_f64());
                }
                if inflight.exchange.swallow {
                    // The answer to a request the proxy sent on the client's behalf: not the client's.
                    continue;
                }
                (api_key, out)
            }
        };
        if let Some(drop_it) = &conn.shared.hooks.drop_client_frame {
            if api_key >= 0 && drop_it(api_key, &out) {
                continue;
            }
        }
        if let Some(hook) = &conn.shared.hooks.on_client_frame {
            hook(&out);
        }
        if let Some(m) = metrics {
            m.bytes_to_client.inc_by(out.len() as u64);
        }
        if let Err(e) = client.write_all(&out).await {
            return e;
        }
    }
}

/// Checks the answer belongs to the request at the head of the queue, then runs the chain over it.
async fn process_response(
    conn: &Conn<'_>,
    frame: Bytes,
    inflight: &mut InFlight,
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
    let cx = ResponseCx {
        handles: conn.shared,
        client: &conn.client,
    };
    conn.shared
        .chain
        .response(&cx, &mut inflight.exchange, frame)
        .await
}

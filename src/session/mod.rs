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
mod link;
mod policy;

pub use close::Close;
pub use policy::Identity;

use crate::audit::ConnInfo;
use crate::audit::{Action, AuditEvent, Kind, Source};
use crate::filters::skim::{self, TopicRef};
use crate::filters::{addresses, api_versions};
use crate::guard::coordinator::{self, CoordinatorRequest};
use crate::guard::{eos_error_kind, init_producer_id_txn, Guard, ProduceAction, ProduceTracking};
use crate::metrics::bounded_label;
use crate::metrics::lso::LsoChange;
use crate::protocol::codec::{decode_response, encode_response};
use crate::protocol::codes;
use crate::protocol::frame::{FrameCodec, SIZE_PREFIX};
use crate::protocol::header::RequestHead;
use crate::protocol::header::{peek_request, produce_acks, response_correlation_id};
use crate::protocol::versions;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::{
    AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, EndTxnResponse, FetchResponse,
    InitProducerIdResponse, ProduceResponse, TxnOffsetCommitResponse,
};
use link::{Activity, Side, Writer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

/// Observation and fault-injection points for tests. Empty in production; each hook costs one branch.
#[derive(Clone, Default)]
#[allow(clippy::type_complexity)]
pub struct Hooks {
    /// Called with every frame the proxy writes to a client (size prefix included).
    pub on_client_frame: Option<Arc<dyn Fn(&[u8]) + Send + Sync>>,
    /// Called with the api key and frame of every broker response before it goes to the client; `true`
    /// drops it (the proxy has processed it, the client never sees it): a lost response, for retry tests.
    pub drop_client_frame: Option<Arc<dyn Fn(i16, &[u8]) -> bool + Send + Sync>>,
    /// Called with every request frame the proxy writes upstream (after any rewrite).
    pub on_upstream_frame: Option<Arc<dyn Fn(&[u8]) + Send + Sync>>,
    /// Called with every audit event.
    pub on_audit: Option<Arc<dyn Fn(&crate::audit::AuditEvent) + Send + Sync>>,
}

/// What a session needs of the rest of the proxy, handed over by the server: the connection limits and
/// upstream settings, the broker registry, the guard, the policies, the metrics, the test hooks.
pub struct Handles {
    pub limits: crate::config::LimitsConfig,
    pub upstream: crate::config::UpstreamConfig,
    pub brokers: Arc<crate::server::brokers::Brokers>,
    pub guard: Arc<Guard>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub lso: Arc<crate::metrics::lso::LsoTracker>,
    pub hooks: Hooks,
    pub policies: Arc<crate::policy::PolicyHolder>,
    pub shutdown: tokio_util::sync::CancellationToken,
}

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

/// Producer and transaction facts to learn (or audit) from a response.
enum Learn {
    Nothing,
    Produce(ProduceTracking),
    InitProducerId {
        transactional: Option<(String, i32)>,
        /// The producer-id rate buckets to charge if the answer hands out a new producer id.
        charge: Option<policy::NewIdCharge>,
    },
    EndTxn {
        transactional_id: String,
        committed: Option<bool>,
    },
    /// AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit: audit the errors the coordinator returns.
    Coordinator {
        transactional_id: Option<String>,
        /// AddPartitionsToTxn / AddOffsetsToTxn: a success opens the transaction at the proxy.
        opens: bool,
    },
    /// A fetch the proxy upgraded to read_committed for a read_uncommitted client: remove aborted
    /// batches from the answer (the client will not).
    ForcedFetch,
    /// A SaslAuthenticate exchange: its answer may confirm the principal.
    Sasl,
}

struct InFlight {
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    action: ResponseAction,
    learn: Learn,
    /// When the request was read from the client and written upstream (for latency metrics).
    timing: Option<(Instant, Instant)>,
    /// Held while an idempotent produce request is in flight (counts them per connection).
    _producing: Option<InFlightToken>,
    /// The client sent acks=0 and the proxy upgraded it: the answer is the proxy's, not the client's.
    swallow: bool,
}

/// Counts idempotent produce requests in flight on a connection while it lives.
struct InFlightToken(Arc<AtomicUsize>);

impl Drop for InFlightToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The most idempotent produce requests a connection may have in flight and keep its guarantees
/// (the broker keeps five batches per producer and partition).
const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

enum Pending {
    Upstream(InFlight),
    /// A response the proxy built itself (a duplicate answered, a fenced request), in its place in order.
    Local(Bytes),
}

/// What every part of a session needs to know about its connection.
struct Conn<'a> {
    target: Target,
    shared: &'a Handles,
    info: ConnInfo,
}

pub async fn run(
    client: TcpStream,
    peer: SocketAddr,
    target: Target,
    shared: Arc<Handles>,
    _permit: OwnedSemaphorePermit,
) {
    let conn = Conn {
        target,
        shared: &shared,
        info: ConnInfo {
            client_address: peer,
            client_id: None,
            broker_node_id: match target {
                Target::Node(id) => Some(id),
                Target::Bootstrap => None,
            },
        },
    };
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
    let upstream_addr = upstream.peer_addr().ok();
    if let Some(m) = &shared.metrics {
        m.connections_active.inc();
    }
    debug!(%peer, ?target, upstream = ?upstream_addr, "session open");

    let limits = &shared.limits;
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
    let activity = Activity::new();
    let wt = limits.write_timeout;
    let mut to_upstream = Writer::new(upstream_write, WRITE_BUFFER, wt, Side::Upstream, &activity);
    let mut to_client = Writer::new(client_write, WRITE_BUFFER, wt, Side::Client, &activity);
    let (tx, rx) = mpsc::channel(limits.max_in_flight_per_connection);
    // The client id, learned from the first request that names one (for audit lines).
    let identity = Identity::default();

    let close = tokio::select! {
        c = request_pump(&conn, &mut requests, &mut to_upstream, tx, &identity, &activity) => c,
        c = response_pump(&conn, &mut responses, &mut to_client, rx, &identity, &activity) => c,
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

async fn connect_upstream(conn: &Conn<'_>) -> Result<TcpStream, String> {
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
    upstream: &mut Writer<'_>,
    tx: mpsc::Sender<Pending>,
    identity: &Identity,
    activity: &Activity,
) -> Close {
    let client_id = &identity.client_id;
    let mut conn_policies = crate::policy::ConnPolicies::default();
    let mut sasl_mechanism: Option<String> = None;
    let idle = conn.shared.limits.idle_timeout;
    let guard = &conn.shared.guard;
    let guarding = guard.config.enabled;
    let metrics = conn.shared.metrics.as_deref();
    let producing = Arc::new(AtomicUsize::new(0));
    let mut warned_in_flight = false;
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
        if !versions::accepts(key, head.api_version) {
            if key == ApiKey::ApiVersions && head.api_version > 0 {
                let answer = match api_versions::unsupported_version_answer(head.correlation_id) {
                    Ok(a) => a,
                    Err(e) => return Close::MalformedRequest(e.to_string()),
                };
                if let Some(m) = metrics {
                    m.api(head.api_key).requests.inc();
                }
                if let Err(e) = queue(&tx, Pending::Local(answer), upstream).await {
                    return e;
                }
                continue;
            }
            return Close::UnsupportedVersion {
                key,
                version: head.api_version,
            };
        }
        if client_id.get().is_none() {
            if let Some(id) = head.client_id(&frame) {
                let _ = client_id.set(id.to_string());
            }
        }
        let info = || ConnInfo {
            // Bounded: a 30 KB client id is not copied into every audit line and producer record.
            client_id: client_id.get().map(|c| bounded_label(c).to_string()),
            ..conn.info.clone()
        };
        let conn_info = info();
        let facts = identity.facts(&conn_info);
        conn_policies.refresh(&conn.shared.policies, identity.facts_version(), &facts);
        let policies = conn_policies.policies().clone();
        let mut ctx = policy::Ctx {
            shared: conn.shared,
            cp: &mut conn_policies,
            facts,
            info: &conn_info,
        };
        let mut frame = frame;
        let mut out = frame.clone();
        let mut learn = Learn::Nothing;
        let mut swallow = false;
        let expects_response = match key {
            ApiKey::Produce => {
                let mut acks = match produce_acks(&frame, &head) {
                    Ok(acks) => acks,
                    Err(e) => return Close::MalformedRequest(format!("produce: {e}")),
                };
                if policies.produce_checks {
                    match policy::produce_acks(&mut ctx, &frame, &head, acks) {
                        Ok((Some(upgraded), swallowed)) => {
                            frame = upgraded;
                            out = frame.clone();
                            acks = -1;
                            swallow = swallowed;
                        }
                        Ok((None, _)) => {}
                        Err(close) => return close,
                    }
                }
                if guarding || policies.produce_checks {
                    let info = info();
                    let mut demands = |topic: &str| {
                        policies
                            .produce_checks
                            .then(|| ctx.cp.topic(&ctx.facts, topic))
                            .filter(|p| !p.is_empty())
                    };
                    let planned = guard.plan(&frame, &head, &info, &mut demands);
                    let mut plan = match planned {
                        Ok(p) => p,
                        Err(e) => return Close::MalformedRequest(format!("produce: {e}")),
                    };
                    if plan.has_waits() {
                        // The originals may still sit in our buffer: send them before waiting on them.
                        if let Err(e) = upstream.flush().await {
                            return e;
                        }
                        guard.resolve_waits(&mut plan, &info).await;
                    }
                    match guard.finish(plan, &frame, head.body_offset.unwrap_or(0)) {
                        ProduceAction::Forward(tracking) => {
                            if let Some(t) = tracking {
                                learn = Learn::Produce(t);
                            }
                        }
                        ProduceAction::Rebuilt(rebuilt, tracking) => {
                            out = rebuilt;
                            learn = Learn::Produce(tracking);
                        }
                        ProduceAction::Local(answer) => {
                            if let Some(m) = metrics {
                                m.api(head.api_key).requests.inc();
                            }
                            if swallow {
                                // Upgraded from acks=0: the client expects no answer; a refusal
                                // closes the connection, as the broker does for acks=0.
                                if let Some(e) = answer
                                    .as_ref()
                                    .and_then(|a| produce_refusal(a, head.api_version))
                                {
                                    return Close::AcksZeroRefused(e);
                                }
                                continue;
                            }
                            if let Some(answer) = answer {
                                if let Err(e) = queue(&tx, Pending::Local(answer), upstream).await {
                                    return e;
                                }
                            }
                            continue;
                        }
                    }
                }
                acks != 0
            }
            ApiKey::InitProducerId => {
                let mut rate_charge = None;
                if policies.producer_checks {
                    match policy::init_producer_id(&mut ctx, &frame, &head) {
                        Ok(policy::InitDecision::Forward {
                            patched,
                            count_new_ids,
                        }) => {
                            if let Some(patched) = patched {
                                out = patched;
                            }
                            rate_charge = count_new_ids;
                        }
                        Ok(policy::InitDecision::Answer(answer)) => {
                            if let Some(m) = metrics {
                                m.api(head.api_key).requests.inc();
                            }
                            if let Err(e) = queue(&tx, Pending::Local(answer), upstream).await {
                                return e;
                            }
                            continue;
                        }
                        Err(close) => return close,
                    }
                }
                learn = Learn::InitProducerId {
                    // From what is sent: a clamped timeout is the one the coordinator will apply.
                    transactional: init_producer_id_txn(&out, &head),
                    charge: rate_charge,
                };
                true
            }
            ApiKey::Fetch | ApiKey::ListOffsets if policies.consume_checks => {
                match policy::read_isolation(&mut ctx, key, &frame, &head) {
                    Ok(Some(patched)) => {
                        out = patched;
                        if key == ApiKey::Fetch {
                            learn = Learn::ForcedFetch;
                        }
                    }
                    Ok(None) => {}
                    Err(close) => return close,
                }
                true
            }
            ApiKey::SaslHandshake => {
                sasl_mechanism = crate::policy::sasl::handshake_mechanism(&frame, &head);
                true
            }
            ApiKey::SaslAuthenticate => {
                identity.on_sasl_request(&frame, &head, sasl_mechanism.as_deref());
                learn = Learn::Sasl;
                true
            }
            ApiKey::EndTxn
            | ApiKey::AddOffsetsToTxn
            | ApiKey::AddPartitionsToTxn
            | ApiKey::TxnOffsetCommit => {
                let request = match key {
                    ApiKey::AddPartitionsToTxn => coordinator::parse_add_partitions(&frame, &head),
                    ApiKey::TxnOffsetCommit => coordinator::parse_txn_offset_commit(&frame, &head),
                    _ => coordinator::parse_producer_first(&frame, &head, key),
                };
                if let Some(req) = &request {
                    // Transactions v2: an EndTxn retry may carry the epoch before the bump it caused.
                    let tolerance = i16::from(key == ApiKey::EndTxn && head.api_version >= 5);
                    let stale = guard.txns.stale(
                        &req.transactional_id,
                        req.producer_id,
                        req.producer_epoch,
                        tolerance,
                    );
                    if let Some(current) = stale {
                        if let Some(answer) = coordinator::fenced_response(key, &head, req) {
                            audit_fenced(guard, &info(), key, &head, req, current);
                            if let Err(e) = queue(&tx, Pending::Local(answer), upstream).await {
                                return e;
                            }
                            continue;
                        }
                    }
                }
                learn = match (key, request) {
                    (ApiKey::EndTxn, Some(r)) => Learn::EndTxn {
                        transactional_id: r.transactional_id,
                        committed: r.committed,
                    },
                    // Registering partitions or offsets opens the transaction (transactions v1), once
                    // the coordinator accepts it: a refused request leaves nothing behind.
                    (ApiKey::AddPartitionsToTxn | ApiKey::AddOffsetsToTxn, Some(r)) => {
                        Learn::Coordinator {
                            transactional_id: Some(r.transactional_id),
                            opens: true,
                        }
                    }
                    (_, r) => Learn::Coordinator {
                        transactional_id: r.map(|r| r.transactional_id),
                        opens: false,
                    },
                };
                true
            }
            _ => true,
        };
        let mut token = None;
        if let (true, Learn::Produce(t)) = (expects_response, &learn) {
            if t.tracks_idempotent_batches() {
                let now_in_flight = producing.fetch_add(1, Ordering::Relaxed) + 1;
                token = Some(InFlightToken(producing.clone()));
                if now_in_flight > MAX_IDEMPOTENT_IN_FLIGHT && !warned_in_flight {
                    // Once per connection: the condition persists while the client is configured so.
                    warned_in_flight = true;
                    guard.audit.emit(AuditEvent {
                        api_key: ApiKey::Produce as i16,
                        detail: Some(format!(
                            "{now_in_flight} idempotent produce requests in flight on one connection \
                             (max.in.flight.requests.per.connection must be <= {MAX_IDEMPOTENT_IN_FLIGHT}): \
                             retries beyond the broker's five-batch window cannot be deduplicated"
                        )),
                        ..AuditEvent::new(Kind::TooManyInFlight, Source::Proxy, Action::Observed)
                            .from_conn(&info())
                    });
                }
            }
        }
        if expects_response {
            let pending = Pending::Upstream(InFlight {
                correlation_id: head.correlation_id,
                key,
                version: head.api_version,
                action: response_action(key),
                learn,
                timing: received.map(|r| (r, Instant::now())),
                _producing: token,
                swallow,
            });
            if let Err(e) = queue(&tx, pending, upstream).await {
                return e;
            }
        }
        if let Some(m) = metrics {
            m.api(head.api_key).requests.inc();
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

/// Audits a coordinator request refused at the proxy because its epoch is fenced.
fn audit_fenced(
    guard: &Guard,
    info: &ConnInfo,
    key: ApiKey,
    head: &RequestHead,
    req: &CoordinatorRequest,
    current: i16,
) {
    guard.audit.emit(AuditEvent {
        error_code: coordinator::fenced_code(key, head.api_version),
        producer_id: req.producer_id,
        producer_epoch: req.producer_epoch,
        transactional_id: Some(req.transactional_id.clone()),
        expected_epoch: Some(current),
        api_key: key as i16,
        detail: Some(format!(
            "{key:?} from epoch {}, transactional id {} is at epoch {current}",
            req.producer_epoch, req.transactional_id
        )),
        ..AuditEvent::new(Kind::FencedEpoch, Source::Proxy, Action::Refused).from_conn(info)
    });
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
    client: &mut Writer<'_>,
    mut rx: mpsc::Receiver<Pending>,
    identity: &Identity,
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
            Pending::Upstream(inflight) => {
                let api_key = inflight.key as i16;
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
                let answered = metrics.map(|m| {
                    m.bytes_from_upstream.inc_by(frame.len() as u64);
                    Instant::now()
                });
                let timing = inflight.timing;
                let swallow = inflight.swallow;
                let inflight_version = inflight.version;
                match process_response(conn, frame, inflight, identity).await {
                    Ok(out) => {
                        if let (Some(m), Some((received, sent)), Some(answered)) =
                            (metrics, timing, answered)
                        {
                            let api = m.api(api_key);
                            api.upstream_seconds
                                .observe(answered.saturating_duration_since(sent).as_secs_f64());
                            let inside =
                                sent.saturating_duration_since(received) + answered.elapsed();
                            api.proxy_seconds.observe(inside.as_secs_f64());
                        }
                        if swallow {
                            // The answer to an acks=0 request the proxy upgraded: not the client's.
                            if let Some(e) = produce_refusal(&out, inflight_version) {
                                return Close::AcksZeroRefused(e);
                            }
                            continue;
                        }
                        (api_key, out)
                    }
                    Err(close) => return close,
                }
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

async fn process_response(
    conn: &Conn<'_>,
    mut frame: Bytes,
    inflight: InFlight,
    identity: &Identity,
) -> Result<Bytes, Close> {
    let client_id = &identity.client_id;
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
    let info = ConnInfo {
        // Bounded: a 30 KB client id is not copied into every audit line and producer record.
        client_id: client_id.get().map(|c| bounded_label(c).to_string()),
        ..conn.info.clone()
    };
    let shared = conn.shared;
    let (key, version) = (inflight.key, inflight.version);
    match inflight.learn {
        Learn::Produce(tracking) if Guard::needs_response(&tracking) => {
            let (header, mut resp) = shared
                .guard
                .on_produce_response(frame, version, tracking, &info)
                .map_err(Close::MalformedResponse)?;
            if !resp.node_endpoints.is_empty() {
                addresses::rewrite_produce_endpoints(&mut resp, &shared.brokers).await;
            }
            return encode_response(&header, &resp, key, version)
                .map_err(|e| Close::MalformedResponse(e.to_string()));
        }
        Learn::Produce(_) | Learn::Nothing => {}
        Learn::ForcedFetch => frame = without_aborted_batches(frame, version)?,
        Learn::Sasl => identity.on_sasl_response(&frame, version),
        learn => learn_from_coordinator(shared, &info, key, version, &frame, learn),
    }
    if key == ApiKey::Fetch && shared.metrics.is_some() {
        observe_fetch(shared, &frame, version, &info);
    }
    let out = match inflight.action {
        ResponseAction::PassThrough => frame,
        ResponseAction::ClampApiVersions => api_versions::clamp_api_versions(frame, version)
            .map_err(|e| Close::MalformedResponse(e.to_string()))?,
        ResponseAction::RewriteAddresses => {
            addresses::rewrite_response(frame, key, version, &shared.brokers)
                .await
                .map_err(|e| Close::MalformedResponse(e.to_string()))?
        }
    };
    Ok(out)
}

/// Read-committed lag and stuck last stable offsets, from a fetch answer (walked, never copied).
fn observe_fetch(shared: &Handles, frame: &Bytes, version: i16, info: &ConnInfo) {
    let Some(m) = &shared.metrics else { return };
    let now = Instant::now();
    let mut changes = Vec::new();
    let walked = skim::fetch_walk(frame, version, |p| {
        if p.error_code != 0 {
            return;
        }
        let topic = match p.topic {
            TopicRef::Name(n) => Arc::from(n),
            TopicRef::Id(id) => match shared.brokers.topic_name(&id) {
                Some(n) => n,
                None => return,
            },
        };
        let (_, change) = shared.lso.observe(
            &topic,
            p.partition,
            p.high_watermark,
            p.last_stable_offset,
            now,
            || {
                Some(
                    m.read_committed_lag
                        .with_label_values(&[&*topic, p.partition.to_string().as_str()]),
                )
            },
        );
        if let Some(c) = change {
            changes.push((topic, p.partition, c));
        }
    });
    if let Err(e) = walked {
        debug!(error = %e, "fetch answer not inspected");
    }
    for (topic, partition, change) in changes {
        let (kind, detail) = match change {
            LsoChange::Stuck { lag, for_how_long } => {
                m.stuck_partitions.inc();
                (
                    Kind::StuckPartition,
                    format!(
                        "last stable offset unchanged for {:.1} s while the high watermark moved; {lag} records held back",
                        for_how_long.as_secs_f64()
                    ),
                )
            }
            LsoChange::Cleared => {
                m.stuck_partitions.dec();
                (
                    Kind::StuckPartitionCleared,
                    "last stable offset moves again".to_string(),
                )
            }
        };
        shared.guard.audit.emit(AuditEvent {
            topic: Some(topic.to_string()),
            partition: Some(partition),
            api_key: ApiKey::Fetch as i16,
            detail: Some(detail),
            ..AuditEvent::new(kind, Source::Broker, Action::Observed).from_conn(info)
        });
    }
}

/// Learns producer ids and epochs from coordinator answers and audits their exactly-once errors. Only
/// looks: the frame goes to the client unchanged, and an answer it cannot read is passed on regardless.
fn learn_from_coordinator(
    shared: &Handles,
    info: &ConnInfo,
    key: ApiKey,
    version: i16,
    frame: &Bytes,
    learn: Learn,
) {
    let guard = &shared.guard;
    // (error code, topic-partition if per partition, producer id and epoch if known)
    type Found = (i16, Option<(String, i32)>, (i64, i16));
    let mut errors: Vec<Found> = Vec::new();
    let (txn, timeout_ms, committed) = match &learn {
        Learn::InitProducerId { transactional, .. } => (
            transactional.as_ref().map(|t| t.0.clone()),
            transactional.as_ref().map(|t| t.1),
            None,
        ),
        Learn::Coordinator {
            transactional_id, ..
        } => (transactional_id.clone(), None, None),
        Learn::EndTxn {
            transactional_id,
            committed,
        } => (Some(transactional_id.clone()), None, *committed),
        _ => (None, None, None),
    };
    let decoded = match key {
        ApiKey::InitProducerId => {
            decode_response::<InitProducerIdResponse>(frame.clone(), key, version).map(|(_, r)| {
                if r.error_code == codes::NONE {
                    if let Learn::InitProducerId {
                        charge: Some(charge),
                        ..
                    } = &learn
                    {
                        if r.producer_id.0 != charge.sent_producer_id {
                            let now = Instant::now();
                            for bucket in &charge.buckets {
                                shared.policies.new_pids.count(bucket, now);
                            }
                        }
                    }
                    guard.store.issued(r.producer_id.0, r.producer_epoch);
                    if let Some(t) = &txn {
                        guard.txns.learn(t, r.producer_id.0, r.producer_epoch);
                        if let Some(ms) = timeout_ms.filter(|ms| *ms > 0) {
                            guard.txns.set_timeout(t, Duration::from_millis(ms as u64));
                        }
                        // A new InitProducerId aborts whatever the transactional id had open.
                        guard.end_transaction(t, None, info);
                    }
                } else {
                    errors.push((r.error_code, None, (-1, -1)));
                }
            })
        }
        ApiKey::EndTxn => {
            decode_response::<EndTxnResponse>(frame.clone(), key, version).map(|(_, r)| {
                if r.error_code == codes::NONE {
                    if let Some(t) = &txn {
                        if version >= 5 {
                            guard.txns.learn(t, r.producer_id.0, r.producer_epoch);
                        }
                        guard.end_transaction(t, committed, info);
                    }
                } else {
                    errors.push((r.error_code, None, (r.producer_id.0, r.producer_epoch)));
                }
            })
        }
        ApiKey::AddOffsetsToTxn => {
            decode_response::<AddOffsetsToTxnResponse>(frame.clone(), key, version)
                .map(|(_, r)| errors.push((r.error_code, None, (-1, -1))))
        }
        ApiKey::AddPartitionsToTxn if version <= 3 => {
            decode_response::<AddPartitionsToTxnResponse>(frame.clone(), key, version).map(
                |(_, r)| {
                    for t in &r.results_by_topic_v3_and_below {
                        for p in &t.results_by_partition {
                            errors.push((
                                p.partition_error_code,
                                Some((t.name.0.to_string(), p.partition_index)),
                                (-1, -1),
                            ));
                        }
                    }
                },
            )
        }
        ApiKey::TxnOffsetCommit => {
            decode_response::<TxnOffsetCommitResponse>(frame.clone(), key, version).map(|(_, r)| {
                for t in &r.topics {
                    for p in &t.partitions {
                        errors.push((
                            p.error_code,
                            Some((t.name.0.to_string(), p.partition_index)),
                            (-1, -1),
                        ));
                    }
                }
            })
        }
        _ => return,
    };
    if let Err(e) = decoded {
        debug!(error = %e, ?key, "coordinator answer not inspected");
        return;
    }
    if let (Learn::Coordinator { opens: true, .. }, Some(t)) = (&learn, &txn) {
        if !errors.is_empty() && errors.iter().all(|e| e.0 == codes::NONE) {
            guard.begin_transaction(t, info.client_id.as_deref().unwrap_or(""));
        }
    }
    for (code, tp, producer) in errors {
        let Some(kind) = eos_error_kind(code) else {
            continue;
        };
        guard.audit.emit(AuditEvent {
            error_code: code,
            producer_id: producer.0,
            producer_epoch: producer.1,
            transactional_id: txn.clone(),
            topic: tp.as_ref().map(|t| t.0.clone()),
            partition: tp.map(|t| t.1),
            api_key: key as i16,
            ..AuditEvent::new(kind, Source::Broker, Action::Observed).from_conn(info)
        });
    }
}

/// The first partition error of a Produce response frame, as text (for acks=0 requests the proxy
/// upgraded, whose answers the client never sees). An answer that cannot be read counts as a refusal.
pub(crate) fn produce_refusal(frame: &Bytes, version: i16) -> Option<String> {
    let resp = match decode_response::<ProduceResponse>(frame.clone(), ApiKey::Produce, version) {
        Ok((_, resp)) => resp,
        Err(e) => return Some(format!("unreadable produce answer: {e}")),
    };
    resp.responses.iter().find_map(|t| {
        t.partition_responses
            .iter()
            .find(|p| p.error_code != 0)
            .map(|p| {
                format!(
                    "{}-{}: error {}{}",
                    t.name.0.as_str(),
                    p.index,
                    p.error_code,
                    p.error_message
                        .as_ref()
                        .map(|m| format!(" ({})", m.as_str()))
                        .unwrap_or_default()
                )
            })
    })
}

/// Removes aborted transactional batches from a fetch answer the proxy upgraded to read_committed.
/// Untouched (no copy) unless some partition lists aborted transactions.
pub(crate) fn without_aborted_batches(frame: Bytes, version: i16) -> Result<Bytes, Close> {
    let mut any = false;
    skim::fetch_walk(&frame, version, |p| any |= p.aborted_transactions > 0)
        .map_err(|e| Close::MalformedResponse(format!("fetch: {e}")))?;
    if !any {
        return Ok(frame);
    }
    let (header, mut resp) = decode_response::<FetchResponse>(frame, ApiKey::Fetch, version)
        .map_err(|e| Close::MalformedResponse(e.to_string()))?;
    let mut removed = 0usize;
    for t in &mut resp.responses {
        for p in &mut t.partitions {
            let (Some(aborted), Some(records)) = (&p.aborted_transactions, &p.records) else {
                continue;
            };
            let list: Vec<(i64, i64)> = aborted
                .iter()
                .map(|a| (a.producer_id.0, a.first_offset))
                .collect();
            if let Some(kept) = crate::policy::wire::without_aborted(records, &list) {
                removed += records.len() - kept.len();
                p.records = Some(kept);
            }
        }
    }
    debug!(
        removed_bytes = removed,
        "aborted batches removed from a forced read_committed fetch"
    );
    encode_response(&header, &resp, ApiKey::Fetch, version)
        .map_err(|e| Close::MalformedResponse(e.to_string()))
}

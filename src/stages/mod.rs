//! The stage chain: every feature that looks inside a request or a response is one stage, in one module.
//!
//! ```text
//!            request side (in this order)                         response side (in this order)
//! Produce     produce ──────────────────────────────────────▶  produce ─▶ addresses
//! Fetch       read_committed ───────────────────────────────▶  read_committed ─▶ fetch_watch ─▶ addresses
//! ListOffsets read_committed
//! InitProducerId  init_producer_id ─────────────────────────▶  init_producer_id
//! EndTxn, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit
//!             txn_fence ────────────────────────────────────▶  txn_fence
//! SaslHandshake, SaslAuthenticate  identity ────────────────▶  identity
//! ApiVersions                                                   api_versions
//! Metadata, FindCoordinator, DescribeCluster, ShareFetch, ShareAcknowledge   addresses
//! anything else: no stage; its bytes are never decoded
//! ```
//!
//! Each stage declares the api keys and sides it needs ([`Stage::interests`]); the [`Chain`] is built
//! once from those declarations and indexed by api key, so the session asks it for the stages of a key
//! and runs them, knowing no feature itself. A closed enum rather than boxed trait objects: the stages
//! are known at compile time, dispatch is a match, and async stages need no boxing. What a request leaves
//! for its response is one memo per stage, carried by [`Memo`].

pub mod addresses;
pub mod api_versions;
pub mod fetch_watch;
pub mod identity;
pub mod init_producer_id;
pub mod produce;
pub mod read_committed;
pub mod txn_fence;

use crate::client::Client;
use crate::policy::report::{report, Violation};
use crate::policy::ConnPolicies;
use crate::protocol::header::RequestHead;
#[cfg(test)]
use crate::protocol::versions;
use crate::session::close::Close;
use crate::session::link::Writer;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use std::sync::Arc;

/// Observation and fault-injection points for tests. Empty in production; each hook costs one branch.
#[derive(Clone, Default)]
#[allow(clippy::type_complexity)]
pub struct Hooks {
    /// Called with every frame the proxy writes to a client (size prefix included).
    pub on_client_frame: Option<Arc<dyn Fn(&[u8]) + Send + Sync>>,
    /// Called with the api key and frame of every broker response before it goes to the client; `true`
    /// drops it (the proxy has processed it, the client never sees it): a lost response, for retry tests.
    pub drop_client_frame: Option<Arc<dyn Fn(i16, &[u8]) -> bool + Send + Sync>>,
    /// Called with the api key of every broker response before the proxy reads it; `true` closes the
    /// session as if the broker connection had broken right then (the request was handled upstream,
    /// its answer never read): a batch of unknown fate, for the idempotence upgrade's tests.
    pub break_before_answer: Option<Arc<dyn Fn(i16) -> bool + Send + Sync>>,
    /// Called with every request frame the proxy writes upstream (after any rewrite).
    pub on_upstream_frame: Option<Arc<dyn Fn(&[u8]) + Send + Sync>>,
    /// Called with every audit event.
    pub on_audit: Option<Arc<dyn Fn(&crate::audit::AuditEvent) + Send + Sync>>,
}

/// What a session and its stages need of the rest of the proxy, handed over by the server: the
/// connection limits and upstream settings, the broker registry, the guard, the policies, the metrics,
/// the test hooks and the chain itself.
pub struct Handles {
    pub limits: crate::config::LimitsConfig,
    pub upstream: crate::config::UpstreamConfig,
    pub brokers: Arc<crate::server::brokers::Brokers>,
    pub guard: Arc<crate::guard::Guard>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub lso: Arc<crate::metrics::lso::LsoTracker>,
    pub hooks: Hooks,
    pub policies: Arc<crate::policy::PolicyHolder>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// TLS towards clients and brokers (plaintext where not configured).
    pub tls: crate::tls::Tls,
    /// The credentials the proxy's own connections log in with (`upstream.sasl`).
    pub own_sasl: Option<Arc<crate::tls::live::Live<crate::server::sasl::Credentials>>>,
    /// The stages of every api key, built once.
    pub chain: Chain,
}

/// One feature on the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// ApiVersions: versions the proxy cannot read answered as a broker would; answers clamped.
    ApiVersions,
    /// SASL: the principal the broker accepted, for policies that match on it.
    Identity,
    /// Produce: acks policy, the produce guard (dedup, fencing, sequence checks, batch policies).
    Produce,
    /// InitProducerId: transaction timeout, transactional-id owners, producer-id rate; learns ids.
    InitProducerId,
    /// Coordinator requests: zombies fenced; transactions opened and ended from the answers.
    TxnFence,
    /// Fetch / ListOffsets: read_committed forced where a policy says so; aborted batches removed.
    ReadCommitted,
    /// Fetch answers: read_committed lag and stuck last stable offsets.
    FetchWatch,
    /// Every broker address in an answer rewritten to the proxy's.
    Addresses,
}

/// Which sides of a key's exchanges a stage looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
    Both,
}

impl Side {
    fn request(self) -> bool {
        matches!(self, Side::Request | Side::Both)
    }
    fn response(self) -> bool {
        matches!(self, Side::Response | Side::Both)
    }
}

impl Stage {
    /// Every stage, in chain order (requests run in this order, responses too).
    pub const ALL: [Stage; 8] = [
        Stage::ApiVersions,
        Stage::Identity,
        Stage::Produce,
        Stage::InitProducerId,
        Stage::TxnFence,
        Stage::ReadCommitted,
        Stage::FetchWatch,
        Stage::Addresses,
    ];

    /// The api keys this stage needs, and on which side.
    pub fn interests(self) -> &'static [(ApiKey, Side)] {
        use ApiKey as K;
        match self {
            Stage::ApiVersions => &[(K::ApiVersions, Side::Response)],
            Stage::Identity => &[
                (K::SaslHandshake, Side::Request),
                (K::SaslAuthenticate, Side::Both),
            ],
            Stage::Produce => &[(K::Produce, Side::Both)],
            Stage::InitProducerId => &[(K::InitProducerId, Side::Both)],
            Stage::TxnFence => &[
                (K::EndTxn, Side::Both),
                (K::AddPartitionsToTxn, Side::Both),
                (K::AddOffsetsToTxn, Side::Both),
                (K::TxnOffsetCommit, Side::Both),
            ],
            Stage::ReadCommitted => &[(K::Fetch, Side::Both), (K::ListOffsets, Side::Request)],
            Stage::FetchWatch => &[(K::Fetch, Side::Response)],
            Stage::Addresses => addresses::INTERESTS,
        }
    }

    /// The request side: may patch the request, leave a memo for the answer, or answer it here.
    async fn on_request(
        self,
        cx: &mut RequestCx<'_, '_>,
        req: &mut Request,
    ) -> Result<Step, Close> {
        match self {
            Stage::Identity => Ok(identity::on_request(cx, req)),
            Stage::Produce => produce::on_request(cx, req).await,
            Stage::InitProducerId => init_producer_id::on_request(cx, req),
            Stage::TxnFence => Ok(txn_fence::on_request(cx, req)),
            Stage::ReadCommitted => read_committed::on_request(cx, req),
            Stage::ApiVersions | Stage::FetchWatch | Stage::Addresses => Ok(Step::Continue),
        }
    }

    /// The response side: learns from the answer and returns what goes on to the next stage.
    async fn on_response(
        self,
        cx: &ResponseCx<'_>,
        exchange: &mut Exchange,
        frame: Bytes,
    ) -> Result<Bytes, Close> {
        match self {
            Stage::ApiVersions => api_versions::on_response(cx, exchange, frame),
            Stage::Identity => Ok(identity::on_response(cx, exchange, frame)),
            Stage::Produce => produce::on_response(cx, exchange, frame),
            Stage::InitProducerId => Ok(init_producer_id::on_response(cx, exchange, frame)),
            Stage::TxnFence => Ok(txn_fence::on_response(cx, exchange, frame)),
            Stage::ReadCommitted => read_committed::on_response(exchange, frame),
            Stage::FetchWatch => Ok(fetch_watch::on_response(cx, exchange, frame)),
            Stage::Addresses => addresses::on_response(cx, exchange, frame).await,
        }
    }
}

/// The stages of every api key, per side, built once from the stages' declarations.
pub struct Chain {
    request: Vec<Vec<Stage>>,
    response: Vec<Vec<Stage>>,
}

/// Api keys are small non-negative numbers; the chain is a plain table over them.
const KEYS: usize = 128;

impl Chain {
    pub fn new() -> Chain {
        let mut chain = Chain {
            request: vec![Vec::new(); KEYS],
            response: vec![Vec::new(); KEYS],
        };
        for stage in Stage::ALL {
            for (key, side) in stage.interests() {
                let k = *key as usize;
                if side.request() {
                    chain.request[k].push(stage);
                }
                if side.response() {
                    chain.response[k].push(stage);
                }
            }
        }
        chain
    }

    fn request_stages(&self, key: ApiKey) -> &[Stage] {
        self.request.get(key as usize).map_or(&[], Vec::as_slice)
    }

    fn response_stages(&self, key: ApiKey) -> &[Stage] {
        self.response.get(key as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether any stage reads this key's answers (the others pass through as raw bytes).
    pub fn inspects_response(&self, key: ApiKey) -> bool {
        !self.response_stages(key).is_empty()
    }

    /// Runs the request side. `Ok(Step::Answer(..))`: answered at the proxy, nothing goes upstream.
    pub async fn request(
        &self,
        cx: &mut RequestCx<'_, '_>,
        req: &mut Request,
    ) -> Result<Step, Close> {
        // Every request's header: the ApiVersions version gate, and the client id for the identity.
        let unstable = cx.handles.upstream.unstable_api_versions;
        if let Some(step) = api_versions::gate(&req.head, req.key, unstable)? {
            return Ok(step);
        }
        identity::learn_client_id(cx.client, &req.frame, &req.head);
        if self.request_stages(req.key).is_empty() {
            return Ok(Step::Continue);
        }
        cx.refresh_policies();
        for stage in self.request_stages(req.key) {
            if let Step::Answer(answer) = stage.on_request(cx, req).await? {
                return Ok(Step::Answer(answer));
            }
        }
        Ok(Step::Continue)
    }

    /// Runs the response side over the answer to `exchange`'s request.
    pub async fn response(
        &self,
        cx: &ResponseCx<'_>,
        exchange: &mut Exchange,
        mut frame: Bytes,
    ) -> Result<Bytes, Close> {
        for stage in self.response_stages(exchange.key) {
            frame = stage.on_response(cx, exchange, frame).await?;
        }
        Ok(frame)
    }
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

/// What a stage decided about a request.
pub enum Step {
    /// On to the next stage, then upstream.
    Continue,
    /// Answered at the proxy with this frame (`None`: no answer at all, as for acks=0).
    Answer(Option<Bytes>),
}

/// A request on its way through the chain.
pub struct Request {
    pub head: RequestHead,
    pub key: ApiKey,
    /// The request as the stages read it (a patched one once a stage patched it).
    pub frame: Bytes,
    /// What goes upstream (the frame, or a rebuild of it without the partitions answered here).
    pub out: Bytes,
    /// What the stages leave for the answer.
    pub memo: Memo,
    /// The broker will answer (false for acks=0 produce).
    pub expects_response: bool,
    /// The answer is the proxy's, not the client's (an acks=0 request sent as acks=all).
    pub swallow: bool,
}

impl Request {
    pub fn new(frame: Bytes, head: RequestHead, key: ApiKey) -> Request {
        Request {
            head,
            key,
            out: frame.clone(),
            frame,
            memo: Memo::None,
            expects_response: true,
            swallow: false,
        }
    }

    /// A stage patched the request: later stages read the patch, and it is what goes upstream.
    fn patch(&mut self, patched: Bytes) {
        self.out = patched.clone();
        self.frame = patched;
    }

    /// What the answer will need: the exchange the response pump carries.
    pub fn exchange(self) -> (Exchange, Bytes) {
        let exchange = Exchange {
            key: self.key,
            version: self.head.api_version,
            memo: self.memo,
            swallow: self.swallow,
        };
        (exchange, self.out)
    }
}

/// What a request leaves for its answer: the memo of the one stage that needs one (each stage has its
/// own memo type; no api key has two stages that leave one).
#[derive(Default)]
pub enum Memo {
    #[default]
    None,
    Produce(produce::Memo),
    InitProducerId(init_producer_id::Memo),
    TxnFence(txn_fence::Memo),
    ReadCommitted(read_committed::Memo),
    Identity(identity::Memo),
}

/// Takes the memo of one stage out of an exchange (leaving any other where it is).
macro_rules! take_memo {
    ($memo:expr, $variant:ident) => {
        match std::mem::take($memo) {
            $crate::stages::Memo::$variant(m) => Some(m),
            other => {
                *$memo = other;
                None
            }
        }
    };
}
pub(crate) use take_memo;

/// A request sent upstream, as its answer's stages see it.
pub struct Exchange {
    pub key: ApiKey,
    pub version: i16,
    pub memo: Memo,
    /// The answer is the proxy's, not the client's: the session does not pass it on.
    pub swallow: bool,
}

/// What a connection's stages keep between requests.
#[derive(Default)]
pub struct ConnState {
    /// The policies that apply to this client, and their per-topic cache.
    pub policies: ConnPolicies,
    identity: identity::ConnState,
    produce: produce::ConnState,
}

/// What a request's stages may use.
pub struct RequestCx<'a, 'w> {
    pub handles: &'a Handles,
    /// Who sent it.
    pub client: &'a Client,
    pub state: &'a mut ConnState,
    /// The upstream connection: a stage that waits (a retry waiting for its original) flushes it first.
    pub upstream: &'a mut Writer<'w>,
}

impl RequestCx<'_, '_> {
    /// Brings the connection's policy view up to date (a reload, a client id or principal learned).
    fn refresh_policies(&mut self) {
        let version = self.client.facts_version();
        self.state
            .policies
            .refresh(&self.handles.policies, version, self.client);
    }

    fn report(&self, violation: Violation, event: bool) {
        report(
            &self.handles.guard.audit,
            self.handles.metrics.as_deref(),
            self.client,
            violation,
            event,
        );
    }
}

/// What a response's stages may use.
pub struct ResponseCx<'a> {
    pub handles: &'a Handles,
    pub client: &'a Client,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_no_stage_claims_have_no_stages() {
        let chain = Chain::new();
        for key in [ApiKey::OffsetCommit, ApiKey::JoinGroup, ApiKey::Heartbeat] {
            assert!(chain.request_stages(key).is_empty(), "{key:?}");
            assert!(!chain.inspects_response(key), "{key:?}");
        }
    }

    #[test]
    fn stages_run_in_chain_order() {
        let chain = Chain::new();
        assert_eq!(
            chain.response_stages(ApiKey::Fetch),
            &[Stage::ReadCommitted, Stage::FetchWatch, Stage::Addresses]
        );
        assert_eq!(
            chain.response_stages(ApiKey::Produce),
            &[Stage::Produce, Stage::Addresses]
        );
        assert_eq!(
            chain.request_stages(ApiKey::ListOffsets),
            &[Stage::ReadCommitted]
        );
        assert!(chain.response_stages(ApiKey::ListOffsets).is_empty());
    }

    /// Every key whose answers the version table says are decoded is claimed by a response stage, and
    /// the other way round: the two declarations cannot drift apart.
    #[test]
    fn the_version_table_and_the_chain_agree() {
        let chain = Chain::new();
        for key in Stage::ALL
            .iter()
            .flat_map(|s| s.interests())
            .filter(|(_, side)| side.response())
            .map(|(k, _)| *k)
        {
            if key == ApiKey::SaslAuthenticate {
                continue; // read by a bounded walker, not decoded whole
            }
            assert!(
                matches!(
                    versions::inspection(key as i16, false),
                    Some(versions::Inspection::Limited { .. })
                ),
                "{key:?} is decoded by a stage but passes through the version table"
            );
            assert!(chain.inspects_response(key));
        }
    }
}

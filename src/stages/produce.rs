//! Produce: the acks policy (upgrade acks=1/0 to acks=all, or refuse), then the produce guard
//! ([`crate::guard`]: retries answered with their original offsets, zombies fenced, sequence gaps caught,
//! batch-level policies), and on the answer what the broker confirmed is learned and the proxy's own
//! per-partition answers are merged in.

use super::{Exchange, Request, RequestCx, ResponseCx, Step};
use crate::audit::{Action, AuditEvent, Kind, Source};
use crate::guard::{Guard, ProduceAction, ProduceTracking};
use crate::policy::report::Violation;
use crate::policy::wire::{self, patched};
use crate::policy::{Action as PolicyAction, Check};
use crate::protocol::codec::{decode_response, encode_response};
use crate::protocol::header::{produce_acks, RequestHead};
use crate::protocol::produce::{self, TopicNames};
use crate::server::discovery;
use crate::session::close::Close;
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ProduceResponse};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The most idempotent produce requests a connection may have in flight and keep its guarantees
/// (the broker keeps five batches per producer and partition).
const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

/// Idempotent produce requests in flight on the connection, and whether that was reported.
#[derive(Default)]
pub struct ConnState {
    producing: Arc<AtomicUsize>,
    warned_in_flight: bool,
}

/// Counts an idempotent produce request in flight while it lives.
struct InFlightToken(Arc<AtomicUsize>);

impl Drop for InFlightToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the answer of a forwarded Produce request needs.
pub struct Memo {
    /// What the guard tracked (dropping it unanswered settles its batches).
    tracking: ProduceTracking,
    _in_flight: Option<InFlightToken>,
}

pub async fn on_request(cx: &mut RequestCx<'_, '_>, req: &mut Request) -> Result<Step, Close> {
    let handles = cx.handles;
    let guard = &handles.guard;
    let policies = cx.state.policies.policies().clone();
    let mut acks = produce_acks(&req.frame, &req.head)
        .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
    req.expects_response = acks != 0;
    if !guard.config.enabled && !policies.produce_checks {
        return Ok(Step::Continue);
    }
    let names = topic_names(cx, req).await?;
    if policies.produce_checks {
        if let (Some(upgraded), swallowed) = acks_policy(cx, &req.frame, &req.head, acks, &names)? {
            req.patch(upgraded);
            acks = -1;
            req.swallow = swallowed;
        }
    }
    req.expects_response = acks != 0;
    let client = cx.client;
    let cp = &mut cx.state.policies;
    let mut demands = |topic: &str| {
        policies
            .produce_checks
            .then(|| cp.topic(client, topic))
            .filter(|p| !p.is_empty())
    };
    let mut plan = guard
        .plan(&req.frame, &req.head, cx.client, &names, &mut demands)
        .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
    if plan.has_waits() {
        // The originals may still sit in our buffer: send them before waiting on them.
        cx.upstream.flush().await?;
        guard.resolve_waits(&mut plan, cx.client).await;
    }
    if plan.has_upgradable() {
        // Stamped last, right before the request goes upstream: sequences go out in the order given.
        match upgraded_producer(cx).await {
            Ok(producer) => guard.stamp(&mut plan, &producer, cx.client),
            Err(why) => guard.hold_upgradable(&mut plan, &why),
        }
    }
    let tracking = match guard.finish(plan, &req.frame, req.head.body_offset.unwrap_or(0)) {
        ProduceAction::Forward(tracking) => tracking,
        ProduceAction::Rebuilt(rebuilt, tracking) => {
            req.out = rebuilt;
            Some(tracking)
        }
        ProduceAction::Local(answer) => {
            if req.swallow {
                // Upgraded from acks=0: the client expects no answer; a refusal closes the
                // connection, as the broker does for acks=0.
                if let Some(e) = answer
                    .as_ref()
                    .and_then(|a| refusal(a, req.head.api_version))
                {
                    return Err(Close::AcksZeroRefused(e));
                }
                return Ok(Step::Answer(None));
            }
            return Ok(Step::Answer(answer));
        }
    };
    if let (Some(t), false) = (&tracking, acks == -1) {
        if t.upgraded() {
            // An idempotent producer writes with acks=all (the broker's dedup needs the write
            // replicated); an acks=0 client still gets no answer.
            let at = wire::produce_acks_offset(&req.out, &req.head)
                .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
            req.out = patched(&req.out, at, &(-1i16).to_be_bytes());
            req.swallow |= acks == 0;
            req.expects_response = true;
        }
    }
    if let Some(tracking) = tracking {
        let in_flight = (req.expects_response && tracking.tracks_idempotent_batches())
            .then(|| count_in_flight(cx));
        req.memo = super::Memo::Produce(Memo {
            tracking,
            _in_flight: in_flight,
        });
    }
    Ok(Step::Continue)
}

/// The names of the topic ids a Produce v13+ request carries: from the Metadata answers the proxy saw,
/// else asked of the cluster. An id left unnamed is audited (once per lookup) and its partitions go to
/// the broker untracked: the proxy never refuses a write for what it does not know.
async fn topic_names(cx: &mut RequestCx<'_, '_>, req: &Request) -> Result<TopicNames, Close> {
    let mut names = TopicNames::new();
    if req.head.api_version < produce::TOPIC_ID_VERSION {
        return Ok(names);
    }
    let body = req.head.body_offset.unwrap_or(0);
    let unresolved = TopicNames::new();
    let view = produce::parse(&req.frame, body, req.head.api_version, &unresolved)
        .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
    let topics = &cx.handles.brokers.topics;
    let mut missing = Vec::new();
    for id in view.unnamed_ids() {
        match topics.name(&id) {
            Some(name) => {
                names.insert(id, name);
            }
            None => missing.push(id),
        }
    }
    if !missing.is_empty() {
        let h = cx.handles;
        let unnamed = discovery::name_topic_ids(h, &missing).await;
        for (id, why) in unnamed {
            h.guard.audit.emit(AuditEvent {
                api_key: ApiKey::Produce as i16,
                transactional_id: view.transactional_id.map(str::to_string),
                topic: Some(uuid::Uuid::from_bytes(id).to_string()),
                detail: Some(format!(
                    "produce names topic id {} that the proxy cannot name ({why}): forwarded for \
                     the broker to judge, untracked, no topic policy applied",
                    uuid::Uuid::from_bytes(id)
                )),
                ..AuditEvent::new(Kind::UnknownTopicId, Source::Proxy, Action::Forwarded)
                    .from_conn(cx.client)
            });
        }
        // A lookup can reveal a topic created again under its name.
        super::addresses::drop_recreated(h);
        for id in missing {
            if let Some(name) = topics.name(&id) {
                names.insert(id, name);
            }
        }
    }
    Ok(names)
}

/// The upstream producer of this client's identity for the idempotence upgrade: the one its other
/// connections use, or a new producer id from the cluster (counted against the producer-id rate
/// policy, as a client's own InitProducerId is).
async fn upgraded_producer(
    cx: &mut RequestCx<'_, '_>,
) -> Result<Arc<std::sync::Mutex<crate::guard::upgrade::Producer>>, String> {
    use crate::policy::rate::Admission;
    let (handles, client) = (cx.handles, cx.client);
    let guard = &handles.guard;
    let identity =
        guard
            .content
            .identity(&(client.principal(), client.client_id_kept(), client.ip()));
    if let Some(p) = guard.upgrades.get(identity) {
        return Ok(p);
    }
    let _one_at_a_time = guard.upgrades.obtaining.lock().await;
    if let Some(p) = guard.upgrades.get(identity) {
        return Ok(p);
    }
    let pp = cx.state.policies.policies().producer_policy(client);
    let limit = pp
        .get(Check::NewProducerIdsPerMinute)
        .and_then(|d| Some((d.limit()?, d.rule.clone())));
    let buckets = super::init_producer_id::new_id_buckets(client);
    let rate = &handles.policies.new_pids;
    if let Some((limit, rule)) = &limit {
        let now = std::time::Instant::now();
        if let Some(b) = buckets
            .iter()
            .find(|b| rate.check(b, *limit, now) != Admission::Admitted)
        {
            return Err(format!(
                "policy '{rule}': {b} reached {limit} new producer ids per minute; the upgrade \
                 obtains one for it when the window has room"
            ));
        }
    }
    let producer_id = discovery::new_producer_id(handles)
        .await
        .map_err(|e| format!("no producer id for the idempotence upgrade: {e:#}"))?;
    if limit.is_some() {
        let now = std::time::Instant::now();
        for b in &buckets {
            rate.count(b, now);
        }
    }
    let producer = guard
        .upgrades
        .insert(identity, producer_id)
        .ok_or_else(|| {
            format!(
            "all {} upgraded producers have batches in flight (producer_state.upgraded_producers)",
            guard.config.upgraded_producers
        )
        })?;
    guard.audit.emit(AuditEvent {
        api_key: ApiKey::Produce as i16,
        producer_id,
        producer_epoch: 0,
        detail: Some(format!(
            "a client without idempotence writes where produce.idempotence is 'upgrade': its \
             batches go upstream as idempotent producer {producer_id}, with acks=all"
        )),
        ..AuditEvent::new(Kind::ProducerUpgraded, Source::Proxy, Action::Observed).from_conn(client)
    });
    Ok(producer)
}

/// One more idempotent produce request in flight; more than five on one connection is reported once.
fn count_in_flight(cx: &mut RequestCx<'_, '_>) -> InFlightToken {
    let state = &mut cx.state.produce;
    let now_in_flight = state.producing.fetch_add(1, Ordering::Relaxed) + 1;
    let token = InFlightToken(state.producing.clone());
    if now_in_flight > MAX_IDEMPOTENT_IN_FLIGHT && !state.warned_in_flight {
        // Once per connection: the condition persists while the client is configured so.
        state.warned_in_flight = true;
        cx.handles.guard.audit.emit(AuditEvent {
            api_key: ApiKey::Produce as i16,
            detail: Some(format!(
                "{now_in_flight} idempotent produce requests in flight on one connection \
                 (max.in.flight.requests.per.connection must be <= {MAX_IDEMPOTENT_IN_FLIGHT}): \
                 retries beyond the broker's five-batch window cannot be deduplicated"
            )),
            ..AuditEvent::new(Kind::TooManyInFlight, Source::Proxy, Action::Observed)
                .from_conn(cx.client)
        });
    }
    token
}

pub fn on_response(
    cx: &ResponseCx<'_>,
    exchange: &mut Exchange,
    frame: Bytes,
) -> Result<Bytes, Close> {
    let version = exchange.version;
    let out = match super::take_memo!(&mut exchange.memo, Produce) {
        Some(memo) if Guard::needs_response(&memo.tracking) => {
            let merged = memo.tracking.answers_locally();
            let (header, resp) = cx
                .handles
                .guard
                .on_produce_response(frame.clone(), version, memo.tracking, cx.client)
                .map_err(Close::MalformedResponse)?;
            // Only learned from: the broker's bytes go on as they came (no re-encode).
            if !merged {
                frame
            } else {
                encode_response(&header, &resp, ApiKey::Produce, version)
                    .map_err(|e| Close::MalformedResponse(e.to_string()))?
            }
        }
        _ => frame,
    };
    if exchange.swallow {
        // The answer to an acks=0 request the proxy upgraded: not the client's, but a refusal closes
        // the connection, as the broker does for acks=0.
        if let Some(e) = refusal(&out, version) {
            return Err(Close::AcksZeroRefused(e));
        }
    }
    Ok(out)
}

/// The first partition error of a Produce response frame, as text (for acks=0 requests the proxy
/// upgraded, whose answers the client never sees). An answer that cannot be read counts as a refusal.
pub fn refusal(frame: &Bytes, version: i16) -> Option<String> {
    let resp = match decode_response::<ProduceResponse>(frame.clone(), ApiKey::Produce, version) {
        Ok((_, resp)) => resp,
        Err(e) => return Some(format!("unreadable produce answer: {e}")),
    };
    resp.responses.iter().find_map(|t| {
        t.partition_responses
            .iter()
            .find(|p| p.error_code != 0)
            .map(|p| {
                let topic = if version >= produce::TOPIC_ID_VERSION {
                    t.topic_id.to_string()
                } else {
                    t.name.0.to_string()
                };
                format!(
                    "{topic}-{}: error {}{}",
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

/// Produce acks: what to send (a patched frame if upgraded) and whether the proxy must swallow the
/// answer (an acks=0 request upgraded to acks=all: its client expects none). acks=1 under `reject` is
/// refused per partition by the guard with INVALID_REQUIRED_ACKS; acks=0 under `reject` cannot be
/// answered, so nothing is written and the connection is closed, which is what the broker does when
/// an acks=0 write fails.
fn acks_policy(
    cx: &mut RequestCx<'_, '_>,
    frame: &Bytes,
    head: &RequestHead,
    acks: i16,
    names: &TopicNames,
) -> Result<(Option<Bytes>, bool), Close> {
    if acks == -1 {
        return Ok((None, false));
    }
    let body = head.body_offset.unwrap_or(0);
    let view = produce::parse(frame, body, head.api_version, names)
        .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
    let mut upgrade = false;
    let mut refuse: Option<String> = None;
    // A topic id the proxy cannot name was audited as such (see topic_names).
    for name in view.topics.iter().filter_map(|t| t.name) {
        let client = cx.client;
        let tp = cx.state.policies.topic(client, name);
        let Some(d) = tp.get(Check::AcksAll) else {
            continue;
        };
        let detail = format!("topic {name} requires acks=all, the request has acks={acks}");
        let (action, event) = match d.action {
            PolicyAction::Reject if acks == 0 => {
                refuse.get_or_insert_with(|| format!("policy '{}': {detail}", d.rule));
                (PolicyAction::Reject, true)
            }
            PolicyAction::Reject => continue, // acks=1: refused per partition by the guard
            PolicyAction::Upgrade => {
                upgrade = true;
                (
                    PolicyAction::Upgrade,
                    cx.state.policies.first_report(Check::AcksAll, name),
                )
            }
            a => (a, cx.state.policies.first_report(Check::AcksAll, name)),
        };
        let detail = if action == PolicyAction::Reject {
            format!("{detail}; nothing written, connection closed (acks=0 has no response)")
        } else if action == PolicyAction::Upgrade {
            format!("{detail}; sent as acks=all")
        } else {
            detail
        };
        cx.report(
            Violation {
                topic: Some(name),
                transactional_id: view.transactional_id,
                ..Violation::new(&d.rule, Check::AcksAll, action, 0, detail)
            },
            event,
        );
    }
    if let Some(why) = refuse {
        return Err(Close::AcksZeroRefused(why));
    }
    if !upgrade {
        return Ok((None, false));
    }
    let at = wire::produce_acks_offset(frame, head)
        .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
    Ok((Some(patched(frame, at, &(-1i16).to_be_bytes())), acks == 0))
}

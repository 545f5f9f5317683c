//! The policy side of a session: checks that may patch a request (acks, isolation level, transaction
//! timeout), answer it at the proxy (InitProducerId refusals) or close the connection (a refused acks=0
//! write). Batch-level produce checks run inside the produce guard (`Guard::plan`).

use super::Close;
use super::Handles;
use crate::audit::ConnInfo;
use crate::filters::skim::TopicRef;
use crate::policy::report::{report, Violation};
use crate::policy::wire::{self, patched};
use crate::policy::{sasl, Action, Check, ClientFacts, ConnPolicies};
use crate::protocol::codec::encode_response;
use crate::protocol::codes;
use crate::protocol::header::RequestHead;
use crate::protocol::produce;
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, InitProducerIdResponse, ProducerId, ResponseHeader};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Who the client is, as far as the proxy knows; shared by the request and response pumps.
#[derive(Default)]
pub struct Identity {
    pub client_id: OnceLock<String>,
    /// The SASL principal, once the broker accepted the exchange that named it.
    pub principal: OnceLock<String>,
    /// A principal offered in a SaslAuthenticate request, and how many successful rounds confirm it.
    sasl_pending: Mutex<Option<(String, u8)>>,
}

impl Identity {
    /// Changes whenever something rules can match on is learned.
    pub fn facts_version(&self) -> u32 {
        u32::from(self.client_id.get().is_some()) + 2 * u32::from(self.principal.get().is_some())
    }

    pub fn facts(&self, info: &ConnInfo) -> ClientFacts<'_> {
        ClientFacts {
            client_id: self.client_id.get().map(String::as_str),
            address: info.client_address.ip(),
            principal: self.principal.get().map(String::as_str),
        }
    }

    /// A SaslAuthenticate request: remember the user name it offers (first round only).
    pub fn on_sasl_request(&self, frame: &[u8], head: &RequestHead, mechanism: Option<&str>) {
        let Some(mechanism) = mechanism else { return };
        let Ok(mut pending) = self.sasl_pending.lock() else {
            return;
        };
        if pending.is_none() && self.principal.get().is_none() {
            if let Some(p) = sasl::offered_principal(frame, head, mechanism) {
                let rounds = if mechanism.starts_with("SCRAM") { 2 } else { 1 };
                *pending = Some((p, rounds));
            }
        }
    }

    /// A SaslAuthenticate answer: success counts a round; the last round confirms the principal.
    pub fn on_sasl_response(&self, frame: &[u8], version: i16) {
        let Ok(mut pending) = self.sasl_pending.lock() else {
            return;
        };
        match sasl::authenticate_error(frame, version) {
            Some(0) => {
                if let Some((p, rounds)) = pending.as_mut() {
                    *rounds -= 1;
                    if *rounds == 0 {
                        let _ = self.principal.set(std::mem::take(p));
                        *pending = None;
                    }
                }
            }
            _ => *pending = None,
        }
    }
}

/// What one request's policy checks need.
pub struct Ctx<'a> {
    pub shared: &'a Handles,
    pub cp: &'a mut ConnPolicies,
    pub facts: ClientFacts<'a>,
    pub info: &'a ConnInfo,
}

impl Ctx<'_> {
    fn report(&self, v: Violation, event: bool) {
        report(
            &self.shared.guard.audit,
            self.shared.metrics.as_deref(),
            self.info,
            v,
            event,
        );
    }
}

/// Produce acks: what to send (a patched frame if upgraded) and whether the proxy must swallow the
/// answer (an acks=0 request upgraded to acks=all: its client expects none). acks=1 under `reject` is
/// refused per partition by the guard with INVALID_REQUIRED_ACKS; acks=0 under `reject` cannot be
/// answered, so nothing is written and the connection is closed, which is what the broker does when
/// an acks=0 write fails.
pub fn produce_acks(
    ctx: &mut Ctx,
    frame: &Bytes,
    head: &RequestHead,
    acks: i16,
) -> Result<(Option<Bytes>, bool), Close> {
    if acks == -1 {
        return Ok((None, false));
    }
    let body = head.body_offset.unwrap_or(0);
    let view = produce::parse(frame, body, head.api_version)
        .map_err(|e| Close::MalformedRequest(format!("produce: {e}")))?;
    let mut upgrade = false;
    let mut refuse: Option<String> = None;
    for t in &view.topics {
        let tp = ctx.cp.topic(&ctx.facts, t.name);
        let Some(d) = &tp.acks_all else { continue };
        let detail = format!(
            "topic {} requires acks=all, the request has acks={acks}",
            t.name
        );
        let (action, event) = match d.action {
            Action::Reject if acks == 0 => {
                refuse.get_or_insert_with(|| format!("policy '{}': {detail}", d.rule));
                (Action::Reject, true)
            }
            Action::Reject => continue, // acks=1: refused per partition by the guard
            Action::Upgrade => {
                upgrade = true;
                (Action::Upgrade, ctx.cp.first_report(Check::AcksAll, t.name))
            }
            a => (a, ctx.cp.first_report(Check::AcksAll, t.name)),
        };
        let detail = if action == Action::Reject {
            format!("{detail}; nothing written, connection closed (acks=0 has no response)")
        } else if action == Action::Upgrade {
            format!("{detail}; sent as acks=all")
        } else {
            detail
        };
        ctx.report(
            Violation {
                topic: Some(t.name),
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

/// Fetch and ListOffsets: a read_uncommitted request that reads a topic under `read_committed:
/// upgrade` is sent as read_committed. Returns the patched frame, if any. For Fetch the upgrade sticks
/// to the connection (incremental fetch requests may name no topic).
pub fn read_isolation(
    ctx: &mut Ctx,
    key: ApiKey,
    frame: &Bytes,
    head: &RequestHead,
) -> Result<Option<Bytes>, Close> {
    let req = match key {
        ApiKey::Fetch => wire::fetch_request(frame, head),
        _ => wire::list_offsets_request(frame, head),
    }
    .map_err(|e| Close::MalformedRequest(format!("{key:?}: {e}")))?;
    let Some((at, 0)) = req.isolation else {
        return Ok(None); // already read_committed, or a version without isolation levels
    };
    let mut upgrade = key == ApiKey::Fetch && ctx.cp.read_committed_forced;
    for t in &req.topics {
        let name: std::sync::Arc<str> = match t {
            TopicRef::Name(n) => std::sync::Arc::from(*n),
            TopicRef::Id(id) => match ctx.shared.brokers.topic_name(id) {
                Some(n) => n,
                None => {
                    // An id no Metadata answer through this proxy has named yet (a fresh start, or
                    // learned through DescribeTopicPartitions): upgraded if any rule could demand it.
                    if let Some(rule) = ctx.cp.any_read_committed_upgrade() {
                        upgrade = true;
                        let id = uuid::Uuid::from_bytes(*id).to_string();
                        let event = ctx.cp.first_report(Check::ReadCommitted, &id);
                        let detail = format!(
                            "{key:?} of topic id {id}, which the proxy cannot name, with \
                             read_uncommitted; sent as read_committed (conservative)"
                        );
                        ctx.report(
                            Violation {
                                topic: Some(&id),
                                ..Violation::new(
                                    &rule,
                                    Check::ReadCommitted,
                                    Action::Upgrade,
                                    key as i16,
                                    detail,
                                )
                            },
                            event,
                        );
                    }
                    continue;
                }
            },
        };
        let tp = ctx.cp.topic(&ctx.facts, &name);
        let Some(d) = &tp.read_committed else {
            continue;
        };
        let event = ctx.cp.first_report(Check::ReadCommitted, &name);
        let detail = match d.action {
            Action::Upgrade => {
                upgrade = true;
                format!("{key:?} of topic {name} with read_uncommitted; sent as read_committed")
            }
            _ => format!("{key:?} of topic {name} with read_uncommitted"),
        };
        ctx.report(
            Violation {
                topic: Some(&name),
                ..Violation::new(&d.rule, Check::ReadCommitted, d.action, key as i16, detail)
            },
            event,
        );
    }
    if !upgrade {
        return Ok(None);
    }
    if key == ApiKey::Fetch {
        ctx.cp.read_committed_forced = true;
    }
    Ok(Some(patched(frame, at, &[1])))
}

/// What to do with an InitProducerId request.
pub enum InitDecision {
    /// Forward (the frame patched if the timeout was clamped). `count_new_ids`: the rate buckets to
    /// charge if the broker answers with a producer id the client did not already hold.
    Forward {
        patched: Option<Bytes>,
        count_new_ids: Option<NewIdCharge>,
    },
    /// Answer at the proxy with this error response.
    Answer(Bytes),
}

/// What a forwarded InitProducerId is charged if the broker hands out a new producer id.
pub struct NewIdCharge {
    /// The rate buckets: the client id and the client address (see [`new_id_buckets`]).
    pub buckets: [String; 2],
    /// The producer id the request carried (-1: none).
    pub sent_producer_id: i64,
}

/// The buckets a new producer id is counted in: the client id (cut to a label's length) and the
/// client's address, so that a client that takes a new client id per connection is limited too.
pub fn new_id_buckets(facts: &crate::policy::ClientFacts) -> [String; 2] {
    [
        format!(
            "client:{}",
            crate::metrics::bounded_label(facts.client_id.unwrap_or(""))
        ),
        format!("address:{}", facts.address),
    ]
}

/// InitProducerId checks: transactional-id ownership, transaction timeout bounds, new producer ids
/// per client per minute.
pub fn init_producer_id(
    ctx: &mut Ctx,
    frame: &Bytes,
    head: &RequestHead,
) -> Result<InitDecision, Close> {
    let req = wire::init_producer_id_request(frame, head)
        .map_err(|e| Close::MalformedRequest(format!("InitProducerId: {e}")))?;
    let policies = ctx.cp.policies().clone();
    let key = ApiKey::InitProducerId as i16;
    let answer = |code: i16, throttle_ms: i32| -> Result<InitDecision, Close> {
        let resp = InitProducerIdResponse::default()
            .with_throttle_time_ms(throttle_ms)
            .with_error_code(code)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let header = ResponseHeader::default().with_correlation_id(head.correlation_id);
        encode_response(&header, &resp, ApiKey::InitProducerId, head.api_version)
            .map(InitDecision::Answer)
            .map_err(|e| Close::MalformedRequest(format!("InitProducerId answer: {e}")))
    };
    if let Some(txn) = req.transactional_id {
        if let Some((rule, prefix, action)) = policies.foreign_transactional_id(&ctx.facts, txn) {
            let reject = action == Action::Reject;
            ctx.report(
                Violation {
                    transactional_id: Some(txn),
                    error_code: if reject {
                        codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
                    } else {
                        0
                    },
                    ..Violation::new(
                        &rule.name,
                        Check::TransactionalIdOwner,
                        action,
                        key,
                        format!(
                            "transactional id {txn} is under prefix '{prefix}', owned by {}",
                            rule.clients.describe()
                        ),
                    )
                },
                true,
            );
            if reject {
                return answer(codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED, 0);
            }
        }
    }
    let pp = policies.producer_policy(&ctx.facts);
    let mut out = None;
    if let (Some(d), Some(txn)) = (&pp.transaction_timeout, req.transactional_id) {
        let (min, max) = d.value;
        if !(min..=max).contains(&req.timeout_ms) {
            let clamped = req.timeout_ms.clamp(min, max);
            let reject = d.action == Action::Reject;
            let detail = format!(
                "transaction.timeout.ms {} is outside {min}..={max}{}",
                req.timeout_ms,
                match d.action {
                    Action::Upgrade => format!("; sent as {clamped}"),
                    _ => String::new(),
                }
            );
            ctx.report(
                Violation {
                    transactional_id: Some(txn),
                    error_code: if reject {
                        codes::INVALID_TRANSACTION_TIMEOUT
                    } else {
                        0
                    },
                    ..Violation::new(&d.rule, Check::TransactionTimeout, d.action, key, detail)
                },
                true,
            );
            match d.action {
                Action::Reject => return answer(codes::INVALID_TRANSACTION_TIMEOUT, 0),
                Action::Upgrade => {
                    out = Some(patched(frame, req.timeout_at, &clamped.to_be_bytes()));
                }
                _ => {}
            }
        }
    }
    let mut count_new_ids = None;
    if let Some(d) = &pp.new_producer_ids_per_minute {
        // Checked for every InitProducerId (a bump with a producer id the client never held still gets a
        // new one from the broker); counted only when the broker hands out an id the client did not
        // hold (see the session's InitProducerId answer).
        let buckets = new_id_buckets(&ctx.facts);
        let now = Instant::now();
        let rate = &ctx.shared.policies.new_pids;
        let over = buckets
            .iter()
            .map(|b| (b, rate.check(b, d.value, now)))
            .find(|(_, a)| *a != crate::policy::rate::Admission::Admitted);
        count_new_ids = Some(NewIdCharge {
            sent_producer_id: req.existing_producer_id.unwrap_or(-1),
            buckets: buckets.clone(),
        });
        if let Some((who, crate::policy::rate::Admission::Over { retry_after, count })) = over {
            let reject = d.action == Action::Reject;
            ctx.report(
                Violation {
                    transactional_id: req.transactional_id,
                    error_code: if reject {
                        codes::THROTTLING_QUOTA_EXCEEDED
                    } else {
                        0
                    },
                    ..Violation::new(
                        &d.rule,
                        Check::NewProducerIdsPerMinute,
                        d.action,
                        key,
                        format!(
                            "{who} asked for a new producer id with {count} in the last \
                                 minute (limit {})",
                            d.value
                        ),
                    )
                },
                true,
            );
            if reject {
                let ms = i32::try_from(retry_after.as_millis()).unwrap_or(i32::MAX);
                return answer(codes::THROTTLING_QUOTA_EXCEEDED, ms);
            }
        }
    }
    Ok(InitDecision::Forward {
        patched: out,
        count_new_ids,
    })
}

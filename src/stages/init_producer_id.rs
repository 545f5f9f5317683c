//! InitProducerId: the producer checks of the policies (transactional-id owners, transaction timeout
//! bounds, new producer ids per minute), and from the answer the producer id and epoch the cluster handed
//! out (the guard's fencing and the transaction tracker start from them).

use super::txn_fence::{audit_errors, Found};
use super::{Exchange, Request, RequestCx, ResponseCx, Step};
use crate::guard::{init_producer_id_txn, TxnInit};
use crate::policy::report::Violation;
use crate::policy::wire::{self, patched};
use crate::policy::{Action, Check};
use crate::protocol::codec::{decode_response, encode_response};
use crate::protocol::codes;
use crate::protocol::header::RequestHead;
use crate::session::close::Close;
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, InitProducerIdResponse, ProducerId, ResponseHeader};
use std::time::{Duration, Instant};
use tracing::debug;

/// What the answer needs: the transactional id and timeout sent (a clamped timeout is the one the
/// coordinator applies), and the rate buckets to charge for a new producer id.
pub struct Memo {
    transactional: Option<TxnInit>,
    charge: Option<NewIdCharge>,
}

pub fn on_request(cx: &mut RequestCx<'_, '_>, req: &mut Request) -> Result<Step, Close> {
    let mut charge = None;
    if cx.state.policies.policies().producer_checks {
        match policy_checks(cx, &req.frame, &req.head)? {
            InitDecision::Forward {
                patched,
                count_new_ids,
            } => {
                if let Some(patched) = patched {
                    req.patch(patched);
                }
                charge = count_new_ids;
            }
            InitDecision::Answer(answer) => return Ok(Step::Answer(Some(answer))),
        }
    }
    req.memo = super::Memo::InitProducerId(Memo {
        transactional: init_producer_id_txn(&req.frame, &req.head),
        charge,
    });
    Ok(Step::Continue)
}

pub fn on_response(cx: &ResponseCx<'_>, exchange: &mut Exchange, frame: Bytes) -> Bytes {
    let Some(memo) = super::take_memo!(&mut exchange.memo, InitProducerId) else {
        return frame;
    };
    let handles = cx.handles;
    let guard = &handles.guard;
    let key = ApiKey::InitProducerId;
    let txn = memo
        .transactional
        .as_ref()
        .map(|t| t.transactional_id.clone());
    let mut errors: Vec<Found> = Vec::new();
    match decode_response::<InitProducerIdResponse>(frame.clone(), key, exchange.version) {
        Ok((_, r)) if r.error_code == codes::NONE => {
            if let Some(charge) = &memo.charge {
                if r.producer_id.0 != charge.sent_producer_id {
                    let now = Instant::now();
                    for bucket in &charge.buckets {
                        handles.policies.new_pids.count(bucket, now);
                    }
                }
            }
            guard.store.issued(r.producer_id.0, r.producer_epoch);
            if let Some(init) = &memo.transactional {
                let t = &init.transactional_id;
                guard.txns.learn(t, r.producer_id.0, r.producer_epoch);
                // Two-phase commit (v6): the coordinator never times the transactions out.
                guard.txns.set_two_phase(t, init.two_phase);
                if init.timeout_ms > 0 {
                    guard
                        .txns
                        .set_timeout(t, Duration::from_millis(init.timeout_ms as u64));
                }
                // A new InitProducerId aborts whatever the transactional id had open, unless it asks to
                // keep a prepared transaction (two-phase commit recovery: the external coordinator
                // commits or aborts it next, and the coordinator answers with its producer id).
                if !(init.keep_prepared && r.ongoing_txn_producer_id.0 >= 0) {
                    guard.end_transaction(t, None, cx.client);
                }
            }
        }
        Ok((_, r)) => errors.push((r.error_code, None, (-1, -1))),
        Err(e) => debug!(error = %e, "InitProducerId answer not inspected"),
    }
    audit_errors(guard, cx.client, key, txn, errors);
    frame
}

/// The error a check's outcome gives the client: its reject error if it refused, else none.
fn refusal_code(check: Check, reject: bool) -> i16 {
    if reject {
        check.row().error.0
    } else {
        0
    }
}

/// What to do with an InitProducerId request.
enum InitDecision {
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
pub fn new_id_buckets(client: &crate::client::Client) -> [String; 2] {
    [
        format!(
            "client:{}",
            crate::metrics::bounded_label(client.client_id().unwrap_or(""))
        ),
        format!("address:{}", client.ip()),
    ]
}

/// InitProducerId checks: transactional-id ownership, transaction timeout bounds, new producer ids
/// per client per minute.
fn policy_checks(
    cx: &mut RequestCx<'_, '_>,
    frame: &Bytes,
    head: &RequestHead,
) -> Result<InitDecision, Close> {
    let req = wire::init_producer_id_request(frame, head)
        .map_err(|e| Close::MalformedRequest(format!("InitProducerId: {e}")))?;
    let policies = cx.state.policies.policies().clone();
    let client = cx.client;
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
        if let Some((rule, prefix, action)) = policies.foreign_transactional_id(client, txn) {
            let reject = action == Action::Reject;
            cx.report(
                Violation {
                    transactional_id: Some(txn),
                    error_code: refusal_code(Check::TransactionalIdOwner, reject),
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
                return answer(Check::TransactionalIdOwner.row().error.0, 0);
            }
        }
    }
    let pp = policies.producer_policy(client);
    let mut out = None;
    let timeout = pp.get(Check::TransactionTimeout);
    if let (Some((d, (min, max))), Some(txn)) = (
        timeout.and_then(|d| Some((d, d.bounds()?))),
        req.transactional_id,
    ) {
        if req.enable_2pc {
            // Two-phase commit (KIP-939): the coordinator ignores the timeout and never aborts these
            // transactions, so no clamp can bound them: refused under `reject`, reported otherwise.
            let reject = d.action == Action::Reject;
            let action = if reject {
                Action::Reject
            } else {
                Action::Audit
            };
            cx.report(
                Violation {
                    transactional_id: Some(txn),
                    error_code: refusal_code(Check::TransactionTimeout, reject),
                    ..Violation::new(
                        &d.rule,
                        Check::TransactionTimeout,
                        action,
                        key,
                        format!(
                            "two-phase commit (KIP-939): transactions of {txn} never time out, \
                             outside {min}..={max}"
                        ),
                    )
                },
                true,
            );
            if reject {
                return answer(Check::TransactionTimeout.row().error.0, 0);
            }
        } else if !(min..=max).contains(&req.timeout_ms) {
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
            cx.report(
                Violation {
                    transactional_id: Some(txn),
                    error_code: refusal_code(Check::TransactionTimeout, reject),
                    ..Violation::new(&d.rule, Check::TransactionTimeout, d.action, key, detail)
                },
                true,
            );
            match d.action {
                Action::Reject => return answer(Check::TransactionTimeout.row().error.0, 0),
                Action::Upgrade => {
                    out = Some(patched(frame, req.timeout_at, &clamped.to_be_bytes()));
                }
                _ => {}
            }
        }
    }
    let mut count_new_ids = None;
    let rate_limit = pp.get(Check::NewProducerIdsPerMinute);
    if let Some((d, limit)) = rate_limit.and_then(|d| Some((d, d.limit()?))) {
        // Checked for every InitProducerId (a bump with a producer id the client never held still gets a
        // new one from the broker); counted only when the broker hands out an id the client did not
        // hold (see the session's InitProducerId answer).
        let buckets = new_id_buckets(client);
        let now = Instant::now();
        let rate = &cx.handles.policies.new_pids;
        let over = buckets
            .iter()
            .map(|b| (b, rate.check(b, limit, now)))
            .find(|(_, a)| *a != crate::policy::rate::Admission::Admitted);
        count_new_ids = Some(NewIdCharge {
            sent_producer_id: req.existing_producer_id.unwrap_or(-1),
            buckets: buckets.clone(),
        });
        if let Some((who, crate::policy::rate::Admission::Over { retry_after, count })) = over {
            let reject = d.action == Action::Reject;
            cx.report(
                Violation {
                    transactional_id: req.transactional_id,
                    error_code: refusal_code(Check::NewProducerIdsPerMinute, reject),
                    ..Violation::new(
                        &d.rule,
                        Check::NewProducerIdsPerMinute,
                        d.action,
                        key,
                        format!(
                            "{who} asked for a new producer id with {count} in the last \
                                 minute (limit {limit})"
                        ),
                    )
                },
                true,
            );
            if reject {
                let ms = i32::try_from(retry_after.as_millis()).unwrap_or(i32::MAX);
                return answer(Check::NewProducerIdsPerMinute.row().error.0, ms);
            }
        }
    }
    Ok(InitDecision::Forward {
        patched: out,
        count_new_ids,
    })
}

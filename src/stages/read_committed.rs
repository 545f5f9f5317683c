//! read_committed where a policy demands it: a read_uncommitted Fetch or ListOffsets of such a topic
//! is sent as read_committed, and aborted batches are removed from the Fetch answer (a client that asked
//! for read_uncommitted does not filter them itself).

use super::{Exchange, Request, RequestCx, Step};
use crate::filters::skim::{self, TopicRef};
use crate::policy::report::Violation;
use crate::policy::wire::{self, patched};
use crate::policy::{Action, Check};
use crate::protocol::codec::{decode_response, encode_response};
use crate::protocol::header::RequestHead;
use crate::session::close::Close;
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, FetchResponse};
use tracing::debug;

/// A Fetch the proxy upgraded to read_committed for a read_uncommitted client: its answer loses its
/// aborted batches.
pub struct Memo;

pub fn on_request(cx: &mut RequestCx<'_, '_>, req: &mut Request) -> Result<Step, Close> {
    if !cx.state.policies.policies().consume_checks {
        return Ok(Step::Continue);
    }
    if let Some(patched) = read_isolation(cx, req.key, &req.frame, &req.head)? {
        req.patch(patched);
        if req.key == ApiKey::Fetch {
            req.memo = super::Memo::ReadCommitted(Memo);
        }
    }
    Ok(Step::Continue)
}

pub fn on_response(exchange: &mut Exchange, frame: Bytes) -> Result<Bytes, Close> {
    match super::take_memo!(&mut exchange.memo, ReadCommitted) {
        Some(Memo) => without_aborted_batches(frame, exchange.version),
        None => Ok(frame),
    }
}

/// Fetch and ListOffsets: a read_uncommitted request that reads a topic under `read_committed:
/// upgrade` is sent as read_committed. Returns the patched frame, if any. For Fetch the upgrade sticks
/// to the connection (incremental fetch requests may name no topic).
fn read_isolation(
    cx: &mut RequestCx<'_, '_>,
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
    let client = cx.client;
    let mut upgrade = key == ApiKey::Fetch && cx.state.policies.read_committed_forced;
    for t in &req.topics {
        let name: std::sync::Arc<str> = match t {
            TopicRef::Name(n) => std::sync::Arc::from(*n),
            TopicRef::Id(id) => match cx.handles.brokers.topics.name(id) {
                Some(n) => n,
                None => {
                    // An id no Metadata answer through this proxy has named yet (a fresh start, or
                    // learned through DescribeTopicPartitions): upgraded if any rule could demand it.
                    if let Some(rule) = cx.state.policies.any_read_committed_upgrade() {
                        upgrade = true;
                        let id = uuid::Uuid::from_bytes(*id).to_string();
                        let event = cx.state.policies.first_report(Check::ReadCommitted, &id);
                        let detail = format!(
                            "{key:?} of topic id {id}, which the proxy cannot name, with \
                             read_uncommitted; sent as read_committed (conservative)"
                        );
                        cx.report(
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
        let tp = cx.state.policies.topic(client, &name);
        let Some(d) = tp.get(Check::ReadCommitted) else {
            continue;
        };
        let event = cx.state.policies.first_report(Check::ReadCommitted, &name);
        let detail = match d.action {
            Action::Upgrade => {
                upgrade = true;
                format!("{key:?} of topic {name} with read_uncommitted; sent as read_committed")
            }
            _ => format!("{key:?} of topic {name} with read_uncommitted"),
        };
        cx.report(
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
        cx.state.policies.read_committed_forced = true;
    }
    Ok(Some(patched(frame, at, &[1])))
}

/// Removes aborted transactional batches from a fetch answer the proxy upgraded to read_committed.
/// Untouched (no copy) unless some partition lists aborted transactions.
pub fn without_aborted_batches(frame: Bytes, version: i16) -> Result<Bytes, Close> {
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

//! The broker's answer to a forwarded Produce request: what it confirmed is learned, its refusals
//! audited (echoes of one failure once), and the proxy's own per-partition answers merged in.

use super::*;
use crate::audit::{Action, Kind, Source};
use crate::client::Client;
use crate::eos::Acked;
use crate::metrics::producer_labels;
use crate::protocol::codec::decode_response;
use crate::protocol::codes;
use crate::protocol::produce::OwnedWireTopic;
use bytes::Bytes;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ApiKey, ProduceResponse, ResponseHeader, TopicName};
use kafka_protocol::protocol::StrBytes;
use std::time::Instant;

impl Guard {
    /// The broker's answer to a forwarded Produce request: learn, audit, merge the proxy's own answers.
    /// Returns the (possibly re-encoded) response frame and the decoded body for further rewriting.
    pub fn on_produce_response(
        &self,
        frame: Bytes,
        version: i16,
        mut tracking: ProduceTracking,
        conn: &Client,
    ) -> Result<(ResponseHeader, ProduceResponse), String> {
        let (header, mut resp) =
            decode_response::<ProduceResponse>(frame, ApiKey::Produce, version)
                .map_err(|e| e.to_string())?;
        let now = self.now();
        let accepted = resp
            .responses
            .iter()
            .flat_map(|t| t.partition_responses.iter())
            .any(|p| p.error_code == codes::NONE);
        if let (true, true, Some(t)) = (tracking.opens_txn, accepted, &tracking.transactional_id) {
            self.begin_transaction(t, conn.client_id_kept().unwrap_or(""));
        }
        if !tracking.remember.is_empty() {
            let at = Instant::now();
            for topic in &resp.responses {
                for p in topic
                    .partition_responses
                    .iter()
                    .filter(|p| p.error_code == 0)
                {
                    let Some(i) = tracking
                        .remember
                        .iter()
                        .position(|(w, partition, _)| names(w, topic) && *partition == p.index)
                    else {
                        continue;
                    };
                    let (_, _, r) = tracking.remember.swap_remove(i);
                    self.content.remember(
                        r.key,
                        super::content::Written {
                            producer_id: r.producer_id,
                            epoch: r.epoch,
                            base_offset: p.base_offset,
                            log_append_time: p.log_append_time_ms,
                            at,
                        },
                    );
                }
            }
        }
        // After the content window learned: a duplicate the upgrade turns into a success has no offset.
        self.settle_stamps(&mut tracking, &mut resp);
        for topic in &resp.responses {
            for p in &topic.partition_responses {
                let Some(i) = tracking
                    .tracked
                    .iter()
                    .position(|t| names(&t.wire, topic) && t.partition == p.index)
                else {
                    continue;
                };
                let Tracked {
                    name,
                    key,
                    batch,
                    max_timestamp: max_ts,
                    already_audited,
                    ..
                } = tracking.tracked.swap_remove(i);
                if p.error_code == codes::NONE {
                    self.failed.accepted(&key);
                    let acked = Acked::written(
                        batch,
                        p.base_offset,
                        p.log_append_time_ms,
                        max_ts,
                        tracking.acks_all,
                    );
                    if self.store.acknowledge(&key, batch, acked, now) {
                        if let Some(m) = &self.metrics {
                            let labels = producer_labels(
                                conn.client_id_kept().unwrap_or(""),
                                tracking.transactional_id.as_deref().unwrap_or(""),
                            );
                            m.producers.admit(labels[0], labels[1]);
                            m.producers.epoch_bumps.with_label_values(&labels).inc();
                        }
                    }
                } else {
                    self.store.settle(&key, batch);
                    let failure = self
                        .failed
                        .refused(&key, batch, p.error_code, Instant::now());
                    let echo = match failure {
                        failures::Failure::Behind { head, first_echo }
                            if p.error_code == codes::OUT_OF_ORDER_SEQUENCE_NUMBER =>
                        {
                            Some((head, first_echo))
                        }
                        _ => None,
                    };
                    // An echo of an earlier failure is audited once, as its cascade; anything else as
                    // the exactly-once error it is.
                    let audited = match echo {
                        Some((head, first_echo)) => first_echo.then(|| {
                            (
                                Kind::OutOfOrderCascade,
                                Some(head.first_seq),
                                Some(format!(
                                    "batches pipelined behind the batch at sequence {} (refused with \
                                     error {}) are answered 45 until it is retried; counted once",
                                    head.first_seq, head.error_code
                                )),
                            )
                        }),
                        None => eos_error_kind(p.error_code).map(|kind| {
                            let message = p.error_message.as_ref();
                            (kind, None, message.map(|m| m.as_str().to_string()))
                        }),
                    };
                    if let Some((kind, expected, detail)) = audited.filter(|_| !already_audited) {
                        self.event(
                            conn,
                            0,
                            kind,
                            Source::Broker,
                            Action::Observed,
                            p.error_code,
                            (key.producer_id, batch.epoch),
                            tracking.transactional_id.as_deref(),
                            Some((&name, p.index)),
                            (expected, Some(batch.first_seq)),
                            None,
                            detail,
                        );
                    }
                }
            }
        }
        for t in tracking.tracked.drain(..) {
            self.store.settle(&t.key, t.batch);
        }
        tracking.settled = true;
        merge_local(&mut resp, &tracking.local, version);
        Ok((header, resp))
    }
}

/// Whether the answer's topic entry is the topic the request named so.
pub(super) fn names(wire: &OwnedWireTopic, answer: &TopicProduceResponse) -> bool {
    match wire {
        OwnedWireTopic::Name(n) => answer.name.0.as_str() == &**n,
        OwnedWireTopic::Id(id) => answer.topic_id.as_bytes() == id,
    }
}

pub(super) fn merge_local(
    resp: &mut ProduceResponse,
    local: &[(OwnedWireTopic, i32, LocalAnswer)],
    version: i16,
) {
    for (topic, partition, answer) in local {
        let mut p = PartitionProduceResponse::default()
            .with_index(*partition)
            .with_error_code(answer.error_code)
            .with_base_offset(answer.base_offset)
            .with_log_append_time_ms(answer.log_append_time)
            .with_log_start_offset(-1);
        if version >= 8 {
            p.error_message = answer.message.clone().map(StrBytes::from_string);
        }
        match resp.responses.iter_mut().find(|t| names(topic, t)) {
            Some(t) => t.partition_responses.push(p),
            None => {
                let entry = match topic {
                    OwnedWireTopic::Name(n) => TopicProduceResponse::default()
                        .with_name(TopicName(StrBytes::from_string(n.to_string()))),
                    OwnedWireTopic::Id(id) => {
                        TopicProduceResponse::default().with_topic_id(uuid::Uuid::from_bytes(*id))
                    }
                };
                resp.responses.push(entry.with_partition_responses(vec![p]));
            }
        }
    }
}

//! The batch-level policy checks of a Produce partition (idempotence, transactions, acks, codecs,
//! batch size and records), in a fixed order.

use super::*;
use crate::audit::ConnInfo;
use crate::policy::report::Violation;
use crate::policy::{codec_name, Action as PolicyAction, Check, TopicPolicy};
use crate::protocol::batch::BatchInfo;
use crate::protocol::codes;
use crate::protocol::produce::ProduceView;
use kafka_protocol::messages::ApiKey;
use std::sync::Arc;

impl Guard {
    /// The batch-level policy checks of one partition, in a fixed order; the first `reject` answers the
    /// partition with the Kafka error that fits, `audit` only reports.
    pub(super) fn check_policy(
        &self,
        d: &TopicPolicy,
        view: &ProduceView,
        topic: &str,
        partition: i32,
        info: &BatchInfo,
        conn: &ConnInfo,
    ) -> Option<Outcome> {
        // Each failed check as (rule, action, check, error, message).
        let mut fails: Vec<(Arc<str>, PolicyAction, Check, i16, String)> = Vec::new();
        // acks=1 under `reject` is refused here, per partition; `upgrade` already rewrote the request and
        // `audit` is reported by the session once per request (acks is a request-level field).
        if let Some(x) = d
            .acks_all
            .as_ref()
            .filter(|x| x.action == PolicyAction::Reject)
        {
            if view.acks == 1 {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::AcksAll,
                    codes::INVALID_REQUIRED_ACKS,
                    format!("topic {topic} requires acks=all, the request has acks=1"),
                ));
            }
        }
        if let Some(x) = &d.idempotence {
            if !info.is_idempotent() {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::Idempotence,
                    codes::POLICY_VIOLATION,
                    format!(
                        "topic {topic} requires an idempotent producer (enable.idempotence=true)"
                    ),
                ));
            }
        }
        if let Some(x) = &d.transactions {
            if !info.transactional {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::Transactions,
                    codes::POLICY_VIOLATION,
                    format!("topic {topic} requires transactional writes (transactional.id)"),
                ));
            }
        }
        if let Some(x) = &d.compression {
            if x.value & (1u8 << info.compression.min(7)) == 0 {
                let allowed: Vec<&str> = (0..crate::policy::CODECS.len() as u8)
                    .filter(|c| x.value & (1 << c) != 0)
                    .map(codec_name)
                    .collect();
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::Compression,
                    codes::UNSUPPORTED_COMPRESSION_TYPE,
                    format!(
                        "topic {topic} allows compression {}, the batch uses {}",
                        allowed.join(", "),
                        codec_name(info.compression)
                    ),
                ));
            }
        }
        if let Some(x) = &d.max_batch_bytes {
            if info.bytes > x.value as usize {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::MaxBatchBytes,
                    codes::MESSAGE_TOO_LARGE,
                    format!(
                        "batch of {} bytes exceeds {} bytes allowed on topic {topic}",
                        info.bytes, x.value
                    ),
                ));
            }
        }
        if let Some(x) = &d.max_batch_records {
            if info.record_count > 0 && info.record_count as u32 > x.value {
                fails.push((
                    x.rule.clone(),
                    x.action,
                    Check::MaxBatchRecords,
                    codes::POLICY_VIOLATION,
                    format!(
                        "batch of {} records exceeds {} records allowed on topic {topic}",
                        info.record_count, x.value
                    ),
                ));
            }
        }
        let producer = (info.producer_id, info.producer_epoch);
        let mut refusal = None;
        for (rule, action, check, code, msg) in fails {
            let reject = action == PolicyAction::Reject && refusal.is_none();
            crate::policy::report::report(
                &self.audit,
                self.metrics.as_deref(),
                conn,
                Violation {
                    topic: Some(topic),
                    partition: Some(partition),
                    error_code: if reject { code } else { 0 },
                    producer,
                    transactional_id: view.transactional_id,
                    ..Violation::new(&rule, check, action, ApiKey::Produce as i16, msg.clone())
                },
                true,
            );
            if reject {
                refusal = Some(Outcome::Local(LocalAnswer {
                    error_code: code,
                    base_offset: -1,
                    log_append_time: -1,
                    message: Some(format!("kafka-eos-proxy policy '{rule}': {msg}")),
                }));
            }
        }
        refusal
    }
}

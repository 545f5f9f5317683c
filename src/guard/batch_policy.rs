//! The batch-level policy checks of a Produce partition (idempotence, transactions, acks, codecs,
//! batch size and records), in a fixed order.

use super::*;
use crate::client::Client;
use crate::policy::report::Violation;
use crate::policy::{codec_list, codec_name, Action as PolicyAction, Check, Decision, TopicPolicy};
use crate::protocol::batch::BatchInfo;
use crate::protocol::produce::ProduceView;
use kafka_protocol::messages::ApiKey;

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
        conn: &Client,
    ) -> Option<Outcome> {
        // Each failed check as (decision, check, message), in row order.
        let mut fails: Vec<(&Decision, Check, String)> = Vec::new();
        // acks=1 under `reject` is refused here, per partition; `upgrade` already rewrote the request and
        // `audit` is reported by the session once per request (acks is a request-level field).
        if let Some(x) = d
            .get(Check::AcksAll)
            .filter(|x| x.action == PolicyAction::Reject)
        {
            if view.acks == 1 {
                let msg = format!("topic {topic} requires acks=all, the request has acks=1");
                fails.push((x, Check::AcksAll, msg));
            }
        }
        // `upgrade`: not a violation, the batch goes upstream idempotent (see `upgrade`).
        if let Some(x) = d
            .get(Check::Idempotence)
            .filter(|x| x.action != PolicyAction::Upgrade)
        {
            if !info.is_idempotent() {
                let msg = format!(
                    "topic {topic} requires an idempotent producer (enable.idempotence=true)"
                );
                fails.push((x, Check::Idempotence, msg));
            }
        }
        if let Some(x) = d.get(Check::Transactions) {
            if !info.transactional {
                let msg = format!("topic {topic} requires transactional writes (transactional.id)");
                fails.push((x, Check::Transactions, msg));
            }
        }
        if let Some((x, allowed)) = d
            .get(Check::Compression)
            .and_then(|x| Some((x, x.codecs()?)))
        {
            if allowed & (1u8 << info.compression.min(7)) == 0 {
                let msg = format!(
                    "topic {topic} allows compression {}, the batch uses {}",
                    codec_list(allowed),
                    codec_name(info.compression)
                );
                fails.push((x, Check::Compression, msg));
            }
        }
        if let Some((x, limit)) = d
            .get(Check::MaxBatchBytes)
            .and_then(|x| Some((x, x.limit()?)))
        {
            if info.bytes > limit as usize {
                let msg = format!(
                    "batch of {} bytes exceeds {limit} bytes allowed on topic {topic}",
                    info.bytes
                );
                fails.push((x, Check::MaxBatchBytes, msg));
            }
        }
        if let Some((x, limit)) = d
            .get(Check::MaxBatchRecords)
            .and_then(|x| Some((x, x.limit()?)))
        {
            if info.record_count > 0 && info.record_count as u32 > limit {
                let msg = format!(
                    "batch of {} records exceeds {limit} records allowed on topic {topic}",
                    info.record_count
                );
                fails.push((x, Check::MaxBatchRecords, msg));
            }
        }
        let producer = (info.producer_id, info.producer_epoch);
        let mut refusal = None;
        for (decision, check, msg) in fails {
            let (rule, action, code) = (&decision.rule, decision.action, check.row().error.0);
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
                    ..Violation::new(rule, check, action, ApiKey::Produce as i16, msg.clone())
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

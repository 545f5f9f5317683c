//! Fetch answers, walked (never copied): each partition's high watermark and last stable offset give the
//! read_committed lag per partition, and a last stable offset that holds while the high watermark moves
//! is a stuck partition (typically a hanging transaction), reported and cleared.

use super::Handles;
use super::{Exchange, ResponseCx};
use crate::audit::{Action, AuditEvent, Kind, Source};
use crate::client::Client;
use crate::filters::skim::{self, TopicRef};
use crate::metrics::lso::LsoChange;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

pub fn on_response(cx: &ResponseCx<'_>, exchange: &mut Exchange, frame: Bytes) -> Bytes {
    if cx.handles.metrics.is_some() {
        observe(cx.handles, &frame, exchange.version, cx.client);
    }
    frame
}

/// Read-committed lag and stuck last stable offsets, from a fetch answer (walked, never copied).
fn observe(shared: &Handles, frame: &Bytes, version: i16, info: &Client) {
    let Some(m) = &shared.metrics else { return };
    let now = Instant::now();
    let mut changes = Vec::new();
    let walked = skim::fetch_walk(frame, version, |p| {
        if p.error_code != 0 {
            return;
        }
        let topic = match p.topic {
            TopicRef::Name(n) => Arc::from(n),
            TopicRef::Id(id) => match shared.brokers.topics.name(&id) {
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

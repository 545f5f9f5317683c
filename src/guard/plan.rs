//! Steps 1 to 3 of a Produce request: every partition decided (validation, policies, the producer
//! state's verdict), the waits for originals still in flight resolved, and what to forward built.

use super::answer::merge_local;
use super::*;
use crate::audit::{Action, AuditEvent, Kind, Source};
use crate::client::Client;
use crate::eos::{Acked, Batch, Verdict};
use crate::metrics::producer_labels;
use crate::policy::TopicPolicy;
use crate::protocol::batch::validate_client_records;
use crate::protocol::codec::encode_response;
use crate::protocol::codes;
use crate::protocol::header::RequestHead;
use crate::protocol::produce::{self, ProduceView, TopicNames, WireTopic};
use crate::protocol::MAX_TOPIC_NAME_BYTES;
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ProduceResponse, ResponseHeader};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::Key;

impl Guard {
    /// Step 1: decide every partition of a Produce request (sync; batches to forward are tracked now).
    /// `policy` gives what the policies demand of a topic (`None`: nothing).
    pub fn plan(
        &self,
        frame: &[u8],
        head: &RequestHead,
        conn: &Client,
        names: &TopicNames,
        policy: &mut dyn FnMut(&str) -> Option<Arc<TopicPolicy>>,
    ) -> Result<ProducePlan, String> {
        let body = head
            .body_offset
            .ok_or("produce request without a known header")?;
        let view =
            produce::parse(frame, body, head.api_version, names).map_err(|e| e.to_string())?;
        let mut plan = ProducePlan {
            outcomes: Vec::with_capacity(view.topics.len()),
            remember: Vec::with_capacity(view.topics.len()),
            upgradable: Vec::with_capacity(view.topics.len()),
            stamps: Vec::new(),
            shifted: Vec::with_capacity(view.topics.len()),
            upgraded: None,
            topics: view
                .topics
                .iter()
                .map(|t| (t.wire.to_owned(), t.name.map(str::to_string)))
                .collect(),
            partitions: view
                .topics
                .iter()
                .map(|t| t.partitions.iter().map(|p| p.index).collect())
                .collect(),
            acks: view.acks,
            timeout: Duration::from_millis(view.timeout_ms.max(0) as u64)
                .min(self.config.in_flight_wait),
            transactional_id: view.transactional_id.map(str::to_string),
            version: head.api_version,
            correlation_id: head.correlation_id,
            opens_txn: false,
        };
        let repeated = repeated_partitions(&view);
        if !repeated.is_empty() {
            self.audit_repeated(&view, &repeated, conn);
        }
        for topic in &view.topics {
            let mut outcomes = Vec::with_capacity(topic.partitions.len());
            let mut remember = vec![None; topic.partitions.len()];
            let Some(name) = topic.name else {
                // A topic id the proxy cannot name (the stage resolved what it could, and audited the
                // rest): the broker judges it, the proxy tracks nothing it could not name.
                outcomes.extend(topic.partitions.iter().map(|_| Outcome::Pass));
                plan.upgradable.push(Vec::new());
                plan.shifted.push(Vec::new());
                plan.outcomes.push(outcomes);
                plan.remember.push(remember);
                continue;
            };
            if name.len() > MAX_TOPIC_NAME_BYTES {
                // The broker knows no such topic and answers UNKNOWN_TOPIC_OR_PARTITION; the proxy does
                // the same before it keeps anything (a name, a policy lookup) for it.
                outcomes.extend(topic.partitions.iter().map(|_| {
                    Outcome::Local(LocalAnswer {
                        error_code: codes::UNKNOWN_TOPIC_OR_PARTITION,
                        base_offset: -1,
                        log_append_time: -1,
                        message: Some(format!(
                            "kafka-eos-proxy: topic names are at most {MAX_TOPIC_NAME_BYTES} bytes"
                        )),
                    })
                }));
                plan.upgradable.push(Vec::new());
                plan.shifted.push(Vec::new());
                plan.outcomes.push(outcomes);
                plan.remember.push(remember);
                continue;
            }
            let demands = policy(name);
            let upgrading = demands.as_deref().is_some_and(upgrades_idempotence);
            // Allocated only when the upgrade or an answered repeat can apply (empty: none).
            let n = topic.partitions.len();
            let mut upgradable = if upgrading { vec![None; n] } else { Vec::new() };
            let mut shifted = if self.shifts.is_empty() {
                Vec::new()
            } else {
                vec![None; n]
            };
            for (i, p) in topic.partitions.iter().enumerate() {
                let alone = !repeated.contains(&(topic.wire, p.index));
                outcomes.push(match p.records {
                    None => Outcome::Pass,
                    Some(records) => {
                        let (answered, learn) = match alone {
                            true => self.content_check(
                                &view,
                                (name, p.index),
                                records,
                                conn,
                                demands.as_deref(),
                            ),
                            // The broker keeps one of the repeated entries: nothing to credit.
                            false => (None, None),
                        };
                        remember[i] = learn;
                        match answered {
                            Some(answer) => answer,
                            None => {
                                let outcome = self.decide_partition(
                                    &view,
                                    (name, p.index, alone),
                                    records,
                                    conn,
                                    demands.as_deref(),
                                    &mut plan.opens_txn,
                                );
                                if upgrading && alone && matches!(outcome, Outcome::Pass) {
                                    upgradable[i] = upgrade_candidate(&view, records);
                                }
                                if !shifted.is_empty() && !matches!(outcome, Outcome::Local(_)) {
                                    shifted[i] = self.shifted(&view, (name, p.index), records);
                                }
                                outcome
                            }
                        }
                    }
                });
            }
            plan.outcomes.push(outcomes);
            plan.remember.push(remember);
            plan.upgradable.push(upgradable);
            plan.shifted.push(shifted);
        }
        Ok(plan)
    }

    /// The content window's say on a batch (see [`super::content`]): an answer with the original offset
    /// (a client without idempotence repeating a batch the broker wrote, where the policy says
    /// `answer`), and what to remember if the broker writes this one. Transactional batches are left
    /// alone: after an abort, writing the same records again under a new epoch is what a transactional
    /// producer must do.
    fn content_check(
        &self,
        view: &ProduceView,
        (topic, partition): (&str, i32),
        records: &[u8],
        conn: &Client,
        demands: Option<&TopicPolicy>,
    ) -> (Option<Outcome>, Option<Remember>) {
        use crate::policy::{Action as PolicyAction, Check};
        let decision = demands.and_then(|d| d.get(Check::DuplicateContent));
        // The idempotence upgrade promises that a retry is never written twice: unless the topic says
        // otherwise, a retry of a written batch is answered.
        let action = match decision {
            Some(d) => d.action,
            None if demands.is_some_and(upgrades_idempotence) => PolicyAction::Upgrade,
            None => PolicyAction::Audit,
        };
        if !self.content.enabled()
            || action == PolicyAction::Allow
            || view.transactional_id.is_some()
        {
            return (None, None);
        }
        let Some(header) = crate::protocol::batch::BatchHeader::new(records) else {
            return (None, None);
        };
        if header.is_transactional() || header.magic() != 2 {
            return (None, None);
        }
        let (producer_id, epoch) = (header.producer_id(), header.producer_epoch());
        let who = (conn.principal(), conn.client_id_kept(), conn.ip());
        let key = self
            .content
            .key(&who, topic, partition, header.content_digest());
        let learn = Some(Remember {
            key,
            producer_id,
            epoch,
        });
        let Some(seen) = self.content.seen(key, Instant::now()) else {
            return (None, learn);
        };
        if producer_id >= 0 && (seen.producer_id, seen.epoch) == (producer_id, epoch) {
            // The same producer and epoch: its sequence decides (a retry is answered as a duplicate).
            return (None, learn);
        }
        let answer = action == PolicyAction::Upgrade
            && (producer_id < 0 || self.credit_repeat((topic, partition), &header, &seen));
        let ago = Instant::now().saturating_duration_since(seen.at);
        let detail = if producer_id < 0 {
            format!(
                "a batch without idempotence with the content of one written {:.1} s ago at offset {}: \
                 a retry whose answer was lost{}",
                ago.as_secs_f64(),
                seen.base_offset,
                if answer {
                    "; answered with that offset instead of writing it again"
                } else {
                    "; forwarded, so the broker writes it again (policy duplicate_content: answer \
                     would answer it)"
                }
            )
        } else {
            format!(
                "producer {producer_id} epoch {epoch} sends the content producer {} epoch {} had \
                 written {:.1} s ago at offset {}: records re-sent under a new epoch or producer id{}",
                seen.producer_id,
                seen.epoch,
                ago.as_secs_f64(),
                seen.base_offset,
                if answer {
                    "; answered with that offset, and the producer's later sequences on this \
                     partition go upstream shifted down by its records"
                } else {
                    " are written again by the broker"
                }
            )
        };
        self.audit.emit(AuditEvent {
            api_key: ApiKey::Produce as i16,
            producer_id,
            producer_epoch: epoch,
            topic: Some(topic.to_string()),
            partition: Some(partition),
            received_sequence: (producer_id >= 0).then(|| header.base_sequence()),
            original_offset: Some(seen.base_offset),
            rule: decision.map(|d| d.rule.to_string()),
            check: decision.map(|_| Check::DuplicateContent.name()),
            detail: Some(detail),
            ..AuditEvent::new(
                Kind::DuplicateContent,
                Source::Proxy,
                if answer {
                    Action::Answered
                } else {
                    Action::Forwarded
                },
            )
            .from_conn(conn)
        });
        if answer {
            return (
                Some(Outcome::Local(LocalAnswer {
                    error_code: codes::NONE,
                    base_offset: seen.base_offset,
                    log_append_time: seen.log_append_time,
                    message: None,
                })),
                None,
            );
        }
        (None, learn)
    }

    /// An idempotent producer's repeat across epochs, to be answered: credited to the producer state
    /// as written at the original offset (so that its retry is answered as a duplicate and the next
    /// batch is in sequence), and a hole left in its upstream sequences. Only a batch in sequence (or of
    /// a producer-partition the proxy does not know) is answered; anything else goes to the broker.
    fn credit_repeat(
        &self,
        (topic, partition): (&str, i32),
        header: &crate::protocol::batch::BatchHeader,
        seen: &super::content::Written,
    ) -> bool {
        let (pid, epoch) = (header.producer_id(), header.producer_epoch());
        let Some(key) = self.store.key(pid, topic, partition) else {
            return false;
        };
        let batch = Batch {
            epoch,
            first_seq: header.base_sequence(),
            last_seq: header.last_sequence(),
        };
        let now = self.now();
        if !self.store.check_and_track(&key, batch, now).forwards() {
            return false;
        }
        let count = header.record_count();
        if !self
            .shifts
            .add((pid, epoch), (topic, partition), batch.first_seq, count)
        {
            self.store.settle(&key, batch);
            return false;
        }
        let acked = Acked::written(
            batch,
            seen.base_offset,
            seen.log_append_time,
            header.max_timestamp(),
            true,
        );
        self.store.acknowledge(&key, batch, acked, now);
        true
    }

    /// The sequence an idempotent batch goes upstream with, if repeats answered below it shift it.
    fn shifted(
        &self,
        view: &ProduceView,
        (topic, partition): (&str, i32),
        records: &[u8],
    ) -> Option<(i64, i16, i32)> {
        let h = crate::protocol::batch::BatchHeader::new(records)?;
        if view.transactional_id.is_some() || h.is_transactional() || h.producer_id() < 0 {
            return None;
        }
        let (pid, epoch, seq) = (h.producer_id(), h.producer_epoch(), h.base_sequence());
        let up = self
            .shifts
            .upstream_sequence((pid, epoch), (topic, partition), seq);
        (up != seq).then_some((pid, epoch, up))
    }

    fn audit_repeated(&self, view: &ProduceView, repeated: &[(WireTopic, i32)], conn: &Client) {
        let name = |t: &WireTopic| {
            let named = view
                .topics
                .iter()
                .find(|v| v.wire == *t)
                .and_then(|v| v.name);
            match (named, t) {
                (Some(n), _) | (None, &WireTopic::Name(n)) => format!("{n:.255}"),
                (None, WireTopic::Id(id)) => uuid::Uuid::from_bytes(*id).to_string(),
            }
        };
        let names: Vec<String> = repeated
            .iter()
            .take(8)
            .map(|(t, p)| format!("{}-{p}", name(t)))
            .collect();
        self.audit.emit(AuditEvent {
            api_key: ApiKey::Produce as i16,
            transactional_id: view.transactional_id.map(str::to_string),
            topic: repeated.first().map(|(t, _)| name(t)),
            partition: repeated.first().map(|(_, p)| *p),
            detail: Some(format!(
                "produce request names {} more than once ({} partition(s)); the broker writes only the \
                 last batch of each and answers once, so the proxy does not track them",
                names.join(", "),
                repeated.len()
            )),
            ..AuditEvent::new(Kind::DuplicatePartition, Source::Proxy, Action::Forwarded)
                .from_conn(conn)
        });
    }

    /// `alone`: this is the only entry for the partition in the request (see [`repeated_partitions`]).
    fn decide_partition(
        &self,
        view: &ProduceView,
        (topic, partition, alone): (&str, i32, bool),
        records: &[u8],
        conn: &Client,
        demands: Option<&TopicPolicy>,
        opens_txn: &mut bool,
    ) -> Outcome {
        let txn_id = view.transactional_id;
        let info = match validate_client_records(records, self.config.check_crc) {
            Ok(info) => info,
            Err(refusal) => {
                self.event(
                    conn,
                    0,
                    Kind::InvalidBatch,
                    Source::Proxy,
                    Action::Refused,
                    refusal.error_code,
                    (-1, -1),
                    txn_id,
                    Some((topic, partition)),
                    (None, None),
                    None,
                    Some(refusal.reason.to_string()),
                );
                return Outcome::Local(LocalAnswer {
                    error_code: refusal.error_code,
                    base_offset: -1,
                    log_append_time: -1,
                    message: Some(format!("kafka-eos-proxy: {}", refusal.reason)),
                });
            }
        };
        if let Some(refused) =
            demands.and_then(|d| self.check_policy(d, view, topic, partition, &info, conn))
        {
            return refused;
        }
        if !info.is_idempotent() || !self.config.enabled {
            return Outcome::Pass;
        }
        let client = conn.client_id_kept().unwrap_or("");
        self.store
            .set_owner(info.producer_id, conn.client_id_kept(), txn_id);
        if let Some(m) = &self.metrics {
            let labels = producer_labels(client, txn_id.unwrap_or(""));
            m.producers.admit(labels[0], labels[1]);
            if let Some(principal) = conn.principal() {
                m.producers.name_principal(labels[0], labels[1], principal);
            }
            m.producers.batches.with_label_values(&labels).inc();
            m.producers
                .records
                .with_label_values(&labels)
                .inc_by(info.record_count.max(0) as u64);
            m.producers
                .bytes
                .with_label_values(&labels)
                .inc_by(info.bytes as u64);
        }
        let batch = Batch {
            epoch: info.producer_epoch,
            first_seq: info.base_sequence,
            last_seq: info.last_sequence,
        };
        let producer = (info.producer_id, info.producer_epoch);
        let refuse = |code: i16,
                      kind: Kind,
                      seqs: (Option<i32>, Option<i32>),
                      epoch: Option<i16>,
                      msg: String| {
            self.event(
                conn,
                0,
                kind,
                Source::Proxy,
                Action::Refused,
                code,
                producer,
                txn_id,
                Some((topic, partition)),
                seqs,
                epoch,
                Some(msg.clone()),
            );
            Outcome::Local(LocalAnswer {
                error_code: code,
                base_offset: -1,
                log_append_time: -1,
                message: Some(format!("kafka-eos-proxy: {msg}")),
            })
        };
        if let Some(t) = txn_id.filter(|_| info.transactional) {
            if let Some(current) = self.txns.stale(t, info.producer_id, info.producer_epoch, 0) {
                return refuse(
                    codes::INVALID_PRODUCER_EPOCH,
                    Kind::FencedEpoch,
                    (None, Some(info.base_sequence)),
                    Some(current),
                    format!(
                        "producer epoch {} of transactional id {t} is fenced by epoch {current}",
                        info.producer_epoch
                    ),
                );
            }
        }
        // No room to name another topic (see ProducerStore::key): pass it on, untracked.
        let key = self.store.key(info.producer_id, topic, partition);
        let transactional = info.transactional && txn_id.is_some();
        if !alone {
            *opens_txn |= transactional;
            // The broker keeps one of the repeated entries: whatever the proxy knew of this producer
            // here no longer holds, and the answer cannot be credited to one batch.
            if let Some(key) = &key {
                self.store.forget(key);
            }
            return Outcome::Pass;
        }
        let verdict = match &key {
            Some(key) => self.store.check_and_track(key, batch, self.now()),
            None => Verdict::Unknown,
        };
        // A transactional write going to the cluster: the transaction is open once the broker accepts it
        // (see on_produce_response), never on the request alone.
        *opens_txn |= transactional && verdict.forwards();
        let Some(key) = key else {
            return Outcome::Pass;
        };
        match verdict {
            Verdict::Unknown | Verdict::InOrder => Outcome::Track {
                key,
                batch,
                max_timestamp: info.max_timestamp,
            },
            Verdict::DuplicateInFlight => Outcome::Wait {
                key,
                batch,
                max_timestamp: info.max_timestamp,
            },
            Verdict::Duplicate(acked) => self.duplicate(
                conn,
                txn_id,
                (topic, partition),
                key,
                batch,
                info.max_timestamp,
                acked,
            ),
            Verdict::StaleEpoch { current } => refuse(
                codes::INVALID_PRODUCER_EPOCH,
                Kind::FencedEpoch,
                (None, Some(info.base_sequence)),
                Some(current),
                format!(
                    "producer epoch {} is older than the current epoch {current}",
                    info.producer_epoch
                ),
            ),
            Verdict::OutOfOrder { .. } | Verdict::EpochBumpNotAtZero { .. }
                if self
                    .failed
                    .head_before(&key, batch, Instant::now())
                    .is_some() =>
            {
                // Pipelined behind a batch the broker refused and the client has not retried yet:
                // not a gap of its own. The broker judges it (an echo of its 45 is audited as part of
                // that first failure).
                Outcome::Track {
                    key,
                    batch,
                    max_timestamp: info.max_timestamp,
                }
            }
            verdict @ (Verdict::OutOfOrder { .. } | Verdict::EpochBumpNotAtZero { .. }) => {
                let (expected, epoch, msg) = match verdict {
                    Verdict::OutOfOrder { expected, received } => (
                        Some(expected),
                        None,
                        format!("sequence {received} out of order, expected {expected}"),
                    ),
                    Verdict::EpochBumpNotAtZero { current } => (
                        Some(0),
                        Some(current),
                        format!(
                            "new epoch {} must start at sequence 0, got {}",
                            info.producer_epoch, info.base_sequence
                        ),
                    ),
                    _ => (None, None, String::new()),
                };
                if self.config.mode == Mode::Enforce {
                    // Batches pipelined behind this one are its echoes, not gaps of their own.
                    self.failed.refused(
                        &key,
                        batch,
                        codes::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        Instant::now(),
                    );
                    refuse(
                        codes::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        Kind::OutOfOrderSequence,
                        (expected, Some(info.base_sequence)),
                        epoch,
                        msg,
                    )
                } else {
                    self.event(
                        conn,
                        0,
                        Kind::OutOfOrderSequence,
                        Source::Proxy,
                        Action::Forwarded,
                        codes::OUT_OF_ORDER_SEQUENCE_NUMBER,
                        producer,
                        txn_id,
                        Some((topic, partition)),
                        (expected, Some(info.base_sequence)),
                        epoch,
                        Some(msg),
                    );
                    // In flight like any forwarded batch (a batch pipelined right behind it follows
                    // it, and is no gap of its own); learned only if the broker accepts it after all.
                    self.store.track(&key, batch, self.now());
                    Outcome::Watch {
                        key,
                        batch,
                        max_timestamp: info.max_timestamp,
                    }
                }
            }
        }
    }

    /// A retry of an acknowledged batch: answered with the original offset and timestamp, if the original
    /// was acknowledged with acks=all. An acks=1 original may have been lost in a leader failover before
    /// it was replicated; the new leader would then rightly accept the retry, so the broker answers it
    /// (and the batch is watched).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn duplicate(
        &self,
        conn: &Client,
        transactional_id: Option<&str>,
        (topic, partition): (&str, i32),
        key: Key,
        batch: Batch,
        max_timestamp: i64,
        acked: Acked,
    ) -> Outcome {
        if !acked.acks_all {
            return Outcome::Track {
                key,
                batch,
                max_timestamp,
            };
        }
        self.event(
            conn,
            0,
            Kind::DuplicateAnswered,
            Source::Proxy,
            Action::Answered,
            codes::NONE,
            (key.producer_id, batch.epoch),
            transactional_id,
            Some((topic, partition)),
            (Some(acked.first_seq), Some(batch.first_seq)),
            None,
            Some(format!(
                "answered with original offset {}",
                acked.first_offset
            )),
        );
        Outcome::Local(LocalAnswer {
            error_code: codes::NONE,
            base_offset: acked.first_offset,
            log_append_time: acked.timestamp,
            message: None,
        })
    }

    /// Step 2: wait for the originals of in-flight duplicates, then decide those partitions again.
    pub async fn resolve_waits(&self, plan: &mut ProducePlan, conn: &Client) {
        let deadline = tokio::time::Instant::now() + plan.timeout;
        for t in 0..plan.outcomes.len() {
            for p in 0..plan.outcomes[t].len() {
                let Outcome::Wait {
                    key,
                    batch,
                    max_timestamp,
                } = plan.outcomes[t][p].clone()
                else {
                    continue;
                };
                while self.store.in_flight(&key, batch) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Only named topics are tracked, so only they wait.
                let topic = plan.topics[t].1.clone().unwrap_or_default();
                let partition = plan.partitions[t][p];
                plan.outcomes[t][p] = match self.store.check_and_track(&key, batch, self.now()) {
                    Verdict::Duplicate(acked) => self.duplicate(
                        conn,
                        plan.transactional_id.as_deref(),
                        (&topic, partition),
                        key,
                        batch,
                        max_timestamp,
                        acked,
                    ),
                    v if v.forwards() => Outcome::Track {
                        key,
                        batch,
                        max_timestamp,
                    },
                    // Still in flight after the wait, or anything else: the broker deduplicates.
                    _ => Outcome::Pass,
                };
            }
        }
    }

    /// Step 3: what to send, and what to remember for the answer.
    pub fn finish(
        self: &Arc<Self>,
        plan: ProducePlan,
        frame: &Bytes,
        view_frame_body: usize,
    ) -> ProduceAction {
        let mut tracked = Vec::new();
        let mut local = Vec::new();
        let mut remember = Vec::new();
        let mut stamps = Vec::new();
        // Batches whose header changes on the way up: (topic, partition, producer id, epoch, sequence).
        let mut rewrites = Vec::new();
        let mut forwarded = 0usize;
        let total: usize = plan.outcomes.iter().map(Vec::len).sum();
        for (t, outcomes) in plan.outcomes.iter().enumerate() {
            for (p, o) in outcomes.iter().enumerate() {
                let ((wire, name), partition) = (&plan.topics[t], plan.partitions[t][p]);
                if let (Some(r), false) = (plan.remember[t][p], matches!(o, Outcome::Local(_))) {
                    remember.push((wire.clone(), partition, r));
                }
                let stamp = plan.stamps.get(t).and_then(|s| s.get(p).copied().flatten());
                let shifted = plan
                    .shifted
                    .get(t)
                    .and_then(|s| s.get(p).copied().flatten());
                if let (Some((pid, epoch, seq)), false) = (shifted, matches!(o, Outcome::Local(_)))
                {
                    rewrites.push((wire.clone(), partition, pid, epoch, seq));
                }
                if let (Some(stamp), false) = (stamp, matches!(o, Outcome::Local(_))) {
                    let pid = plan.upgraded.as_ref().map_or(-1, |u| u.1);
                    rewrites.push((wire.clone(), partition, pid, stamp.epoch, stamp.seq));
                    stamps.push(upgrade::Stamped {
                        wire: wire.clone(),
                        name: name.clone().unwrap_or_default(),
                        partition,
                        stamp,
                    });
                }
                match o {
                    Outcome::Pass | Outcome::Wait { .. } => forwarded += 1,
                    Outcome::Track {
                        key,
                        batch,
                        max_timestamp,
                    }
                    | Outcome::Watch {
                        key,
                        batch,
                        max_timestamp,
                    } => {
                        forwarded += 1;
                        tracked.push(Tracked {
                            wire: wire.clone(),
                            name: name.clone().unwrap_or_default(),
                            partition,
                            key: *key,
                            batch: *batch,
                            max_timestamp: *max_timestamp,
                            already_audited: matches!(o, Outcome::Watch { .. }),
                        });
                    }
                    Outcome::Local(answer) => local.push((wire.clone(), partition, answer.clone())),
                }
            }
        }
        let tracking = ProduceTracking {
            guard: self.clone(),
            tracked,
            remember,
            local,
            acks_all: plan.acks == -1,
            transactional_id: plan.transactional_id.clone(),
            opens_txn: plan.opens_txn && plan.acks != 0,
            settled: false,
            stamps,
            upgraded: plan.upgraded.as_ref().map(|u| u.0.clone()),
        };
        if !rewrites.is_empty() {
            // Upgraded batches and shifted sequences: the request goes with them written in (only the
            // forwarded partitions, if some are answered here).
            let no_names = TopicNames::new();
            let base = if forwarded == total {
                frame.clone()
            } else {
                match produce::parse(frame, view_frame_body, plan.version, &no_names) {
                    Ok(view) => {
                        let keep =
                            |t: usize, p: usize| !matches!(plan.outcomes[t][p], Outcome::Local(_));
                        view.rebuild(frame, keep)
                    }
                    Err(_) => frame.clone(),
                }
            };
            let out = stamp_request(&base, view_frame_body, plan.version, &rewrites);
            return match out {
                Some(out) => ProduceAction::Rebuilt(out, tracking),
                // Cannot happen for bytes the plan read; if it did, the request goes as it came and
                // the lanes learn that their stamps never reached the broker.
                None => {
                    let mut tracking = tracking;
                    if let Some((producer, _)) = &plan.upgraded {
                        upgrade::lock(producer)
                            .settle_all(tracking.stamps.drain(..), upgrade::Fate::NotWritten);
                    }
                    ProduceAction::Forward(Some(tracking))
                }
            };
        }
        if forwarded == total {
            let needed =
                !tracking.tracked.is_empty() || !tracking.remember.is_empty() || tracking.opens_txn;
            return ProduceAction::Forward(needed.then_some(tracking));
        }
        if forwarded == 0 {
            let mut tracking = tracking;
            tracking.settled = true;
            if plan.acks == 0 {
                return ProduceAction::Local(None);
            }
            let mut resp = ProduceResponse::default();
            merge_local(&mut resp, &tracking.local, plan.version);
            let header = ResponseHeader::default().with_correlation_id(plan.correlation_id);
            return match encode_response(&header, &resp, ApiKey::Produce, plan.version) {
                Ok(bytes) => ProduceAction::Local(Some(bytes)),
                Err(_) => ProduceAction::Forward(None),
            };
        }
        // Mixed: forward the rest, byte for byte.
        let no_names = TopicNames::new();
        let Ok(view) = produce::parse(frame, view_frame_body, plan.version, &no_names) else {
            return ProduceAction::Forward(Some(tracking));
        };
        let keep = |t: usize, p: usize| !matches!(plan.outcomes[t][p], Outcome::Local(_));
        ProduceAction::Rebuilt(view.rebuild(frame, keep), tracking)
    }
}

/// `frame` with the upgrade's stamps written into its batches (a copy; the records are not touched).
fn stamp_request(
    frame: &Bytes,
    body: usize,
    version: i16,
    rewrites: &[(OwnedWireTopic, i32, i64, i16, i32)],
) -> Option<Bytes> {
    let no_names = TopicNames::new();
    let view = produce::parse(frame, body, version, &no_names).ok()?;
    let mut at = Vec::with_capacity(rewrites.len());
    for (wire, partition, pid, epoch, seq) in rewrites {
        let records = view
            .topics
            .iter()
            .filter(|t| t.wire.to_owned() == *wire)
            .flat_map(|t| t.partitions.iter())
            .find(|p| p.index == *partition)
            .and_then(|p| p.records)?;
        let start = records.as_ptr() as usize - frame.as_ptr() as usize;
        at.push((start..start + records.len(), *pid, *epoch, *seq));
    }
    let mut out = bytes::BytesMut::from(&frame[..]);
    for (range, pid, epoch, seq) in at {
        upgrade::restamp(&mut out[range], pid, epoch, seq)?;
    }
    Some(out.freeze())
}

/// Whether the policies upgrade the idempotence of a topic's writers.
fn upgrades_idempotence(d: &TopicPolicy) -> bool {
    d.get(crate::policy::Check::Idempotence)
        .is_some_and(|x| x.action == crate::policy::Action::Upgrade)
}

/// A batch the idempotence upgrade can stamp: (record count, content digest). Only what a client
/// without idempotence sends outside a transaction, in the v2 format; a control batch or one with a
/// producer id is left as it came (the broker judges it).
fn upgrade_candidate(view: &ProduceView, records: &[u8]) -> Option<upgrade::Candidate> {
    let h = crate::protocol::batch::BatchHeader::new(records)?;
    let whole = usize::try_from(h.batch_length()).ok()? + 12 == records.len();
    (view.transactional_id.is_none()
        && whole
        && h.magic() == 2
        && h.producer_id() < 0
        && !h.is_transactional()
        && !h.is_control()
        && h.record_count() > 0)
        .then(|| (h.record_count(), h.content_digest()))
}

/// The topic partitions a Produce request names more than once (sorted, each once).
///
/// What the broker does with them (Kafka 4.3/4.4 `KafkaApis.handleProduceRequest`): it walks the topics
/// and partitions in request order into a map keyed by topic partition, so a later entry replaces an
/// earlier one. Only the last entry's records are validated and appended, and the answer has one entry
/// per topic partition. No client library sends this; a proxy that credited that one answer to the first
/// batch would later answer a retry of a batch that was never written.
fn repeated_partitions<'a>(view: &ProduceView<'a>) -> Vec<(WireTopic<'a>, i32)> {
    // Most requests name one partition: nothing to collect or sort then (this runs on every request).
    let count: usize = view.topics.iter().map(|t| t.partitions.len()).sum();
    if count < 2 {
        return Vec::new();
    }
    let mut all: Vec<(WireTopic, i32)> = view
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.wire, p.index)))
        .collect();
    all.sort_unstable();
    let mut repeated: Vec<(WireTopic, i32)> = all
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    repeated.dedup();
    repeated
}

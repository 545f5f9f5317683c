//! Every policy outcome is counted (`policy_actions_total{rule,check,action}`) and becomes an audit
//! event of kind `policy_violation` naming the rule and the check.

use super::{Action, Check};
use crate::audit::{self, AuditEvent, AuditSink, Kind, Source};
use crate::client::Client;
use crate::metrics::Metrics;

/// One policy outcome.
#[derive(Debug, Clone)]
pub struct Violation<'a> {
    pub rule: &'a str,
    pub check: Check,
    pub action: Action,
    pub api_key: i16,
    pub topic: Option<&'a str>,
    pub partition: Option<i32>,
    /// The Kafka error the client got (0 unless rejected).
    pub error_code: i16,
    pub producer: (i64, i16),
    pub transactional_id: Option<&'a str>,
    pub detail: String,
}

impl<'a> Violation<'a> {
    pub fn new(rule: &'a str, check: Check, action: Action, api_key: i16, detail: String) -> Self {
        Violation {
            rule,
            check,
            action,
            api_key,
            topic: None,
            partition: None,
            error_code: 0,
            producer: (-1, -1),
            transactional_id: None,
            detail,
        }
    }
}

/// Counts the outcome, and writes an audit event unless `event` is false (request-level findings such
/// as a connection's acks or isolation level are written once per connection and topic; the counter
/// still counts every request).
pub fn report(
    audit: &AuditSink,
    metrics: Option<&Metrics>,
    conn: &Client,
    v: Violation,
    event: bool,
) {
    if let Some(m) = metrics {
        m.policy_actions
            .with_label_values(&[v.rule, v.check.name(), v.action.past()])
            .inc();
    }
    if !event {
        return;
    }
    let action = match v.action {
        Action::Reject => audit::Action::Refused,
        Action::Upgrade => audit::Action::Upgraded,
        Action::Audit | Action::Allow => audit::Action::Forwarded,
    };
    audit.emit(AuditEvent {
        error_code: v.error_code,
        producer_id: v.producer.0,
        producer_epoch: v.producer.1,
        transactional_id: v.transactional_id.map(str::to_string),
        topic: v.topic.map(str::to_string),
        partition: v.partition,
        api_key: v.api_key,
        detail: Some(v.detail),
        rule: Some(v.rule.to_string()),
        check: Some(v.check.name()),
        ..AuditEvent::new(Kind::PolicyViolation, Source::Proxy, action).from_conn(conn)
    });
}

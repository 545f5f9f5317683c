//! The catalogue of policy checks: one row per check (config key, scope, value shape, allowed actions,
//! the Kafka error a `reject` answers with, how `check-config` words it). Parsing, validation,
//! explanations and resolution loop over [`ROWS`]; adding a check is a [`Check`] variant, its row, its
//! enforcement (in the stage that sees the request) and its tests.

use crate::protocol::codes;
use std::sync::Arc;

/// What happens when a check fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Explicitly fine: stops later rules from deciding this check.
    Allow,
    /// Let it through; count it and write an audit event.
    Audit,
    /// Make it compliant where that is safe (acks=1 -> acks=all, read_uncommitted -> read_committed,
    /// a transaction timeout clamped into bounds); count and audit.
    Upgrade,
    /// Refuse it with the Kafka error that fits; count and audit.
    Reject,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Allow,
        Action::Audit,
        Action::Upgrade,
        Action::Reject,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Audit => "audit",
            Action::Upgrade => "upgrade",
            Action::Reject => "reject",
        }
    }

    /// The label used on counters and audit lines for what was done.
    pub fn past(self) -> &'static str {
        match self {
            Action::Allow => "allowed",
            Action::Audit => "audited",
            Action::Upgrade => "upgraded",
            Action::Reject => "rejected",
        }
    }
}

/// The checks a rule can set (the order of [`ROWS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    Idempotence,
    Transactions,
    AcksAll,
    Compression,
    MaxBatchBytes,
    MaxBatchRecords,
    ReadCommitted,
    TransactionTimeout,
    NewProducerIdsPerMinute,
    TransactionalIdOwner,
    DuplicateContent,
}

/// How many checks there are (the length of [`ROWS`] and of every per-check table).
pub const CHECK_COUNT: usize = 11;

impl Check {
    pub fn row(self) -> &'static Row {
        &ROWS[self as usize]
    }

    /// The config key, also the `check` label and audit field.
    pub fn name(self) -> &'static str {
        self.row().key
    }

    /// The actions that make sense for this check (the parser refuses the others, saying why).
    pub fn actions(self) -> &'static [Action] {
        self.row().actions
    }
}

/// Where a check applies, which is also the config section that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Produce requests, per topic (`produce:`).
    Produce,
    /// Fetch and ListOffsets, per topic (`consume:`).
    Consume,
    /// InitProducerId, from rules without topics (`producers:`).
    Producers,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Produce, Scope::Consume, Scope::Producers];

    pub fn section(self) -> &'static str {
        match self {
            Scope::Produce => "produce",
            Scope::Consume => "consume",
            Scope::Producers => "producers",
        }
    }

    /// Whether the check is decided per topic (else per client, at InitProducerId).
    pub fn per_topic(self) -> bool {
        self != Scope::Producers
    }
}

/// How the config spells a check's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `key: action`.
    Action,
    /// `key: { allowed: [codec, ...], action }`.
    Codecs,
    /// `key: { limit: N, action }` with N in `min..=max`.
    Limit { min: i64, max: i64 },
    /// `key: { min, max, action }` (either bound may be left out), in milliseconds.
    Bounds,
    /// `key: { prefixes: [...], action }`: resolved by the longest prefix, not by the first rule.
    Prefixes,
}

/// The value a setting carries besides its action (by [`Shape`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    /// Allowed codecs as a mask over [`CODECS`].
    Codecs(u8),
    Limit(u32),
    Bounds(i32, i32),
    Prefixes(Vec<String>),
}

/// One check as a rule sets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub action: Action,
    pub value: Value,
}

/// A check decided by a rule: which rule, what to do, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub rule: Arc<str>,
    pub action: Action,
    pub value: Value,
}

impl Decision {
    pub fn limit(&self) -> Option<u32> {
        match self.value {
            Value::Limit(n) => Some(n),
            _ => None,
        }
    }

    pub fn codecs(&self) -> Option<u8> {
        match self.value {
            Value::Codecs(m) => Some(m),
            _ => None,
        }
    }

    pub fn bounds(&self) -> Option<(i32, i32)> {
        match self.value {
            Value::Bounds(a, b) => Some((a, b)),
            _ => None,
        }
    }
}

/// One check's metadata.
pub struct Row {
    pub check: Check,
    /// The config key (under [`Scope::section`]).
    pub key: &'static str,
    pub scope: Scope,
    pub shape: Shape,
    pub actions: &'static [Action],
    /// Why an action outside `actions` is refused (the parser's message).
    pub not_possible: &'static str,
    /// The Kafka error a `reject` answers with, and its name.
    pub error: (i16, &'static str),
    /// Said after the error when `check-config` explains a `reject`.
    pub reject_note: &'static str,
    /// `check-config`: what fails this check, given the setting's value.
    pub fails: fn(&Value) -> String,
    /// `check-config`: what `upgrade` does (empty where upgrade is not an action).
    pub upgrade: fn(&Value) -> String,
}

impl Row {
    /// The config path of this check within a rule (`produce.acks_all`).
    pub fn path(&self) -> String {
        format!("{}.{}", self.scope.section(), self.key)
    }

    /// Whether the first matching rule decides it (every check but transactional-id ownership).
    pub fn first_match(&self) -> bool {
        self.shape != Shape::Prefixes
    }
}

/// Compression codecs, as bits of a mask (bit n = codec id n in the batch attributes).
pub const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

pub fn codec_name(id: u8) -> &'static str {
    CODECS.get(usize::from(id)).copied().unwrap_or("unknown")
}

/// The codecs a mask allows, as a list for people.
pub fn codec_list(mask: u8) -> String {
    (0..CODECS.len() as u8)
        .filter(|c| mask & (1 << c) != 0)
        .map(codec_name)
        .collect::<Vec<_>>()
        .join(", ")
}

const ALLOW_AUDIT_REJECT: &[Action] = &[Action::Allow, Action::Audit, Action::Reject];
const CANNOT_MAKE_COMPLIANT: &str =
    "the proxy cannot make such a request compliant without changing what was written";
fn nothing(_: &Value) -> String {
    String::new()
}

/// Every check, in [`Check`] order (a unit test holds the two together).
pub static ROWS: [Row; CHECK_COUNT] = [
    Row {
        check: Check::Idempotence,
        key: "idempotence",
        scope: Scope::Produce,
        shape: Shape::Action,
        actions: &Action::ALL,
        not_possible: "",
        error: (codes::POLICY_VIOLATION, "POLICY_VIOLATION"),
        reject_note: "",
        fails: |_| "non-idempotent batches".into(),
        upgrade: |_| {
            "send a client's batches upstream as an idempotent producer's: a producer id the proxy \
             obtains for the client (principal, client id, address), sequences per partition, \
             acks=all; its retries are written once"
                .into()
        },
    },
    Row {
        check: Check::Transactions,
        key: "transactions",
        scope: Scope::Produce,
        shape: Shape::Action,
        actions: ALLOW_AUDIT_REJECT,
        not_possible: CANNOT_MAKE_COMPLIANT,
        error: (codes::POLICY_VIOLATION, "POLICY_VIOLATION"),
        reject_note: "",
        fails: |_| "non-transactional batches".into(),
        upgrade: nothing,
    },
    Row {
        check: Check::AcksAll,
        key: "acks_all",
        scope: Scope::Produce,
        shape: Shape::Action,
        actions: &Action::ALL,
        not_possible: "",
        error: (codes::INVALID_REQUIRED_ACKS, "INVALID_REQUIRED_ACKS"),
        reject_note: " for acks=1; acks=0 cannot be answered, so nothing is written and the \
                      connection is closed (as the broker does)",
        fails: |_| "acks=1 and acks=0 produce requests".into(),
        upgrade: |_| {
            "send acks=1 and acks=0 requests as acks=all (an acks=0 client still gets no answer; \
             a refused write closes its connection)"
                .into()
        },
    },
    Row {
        check: Check::Compression,
        key: "compression",
        scope: Scope::Produce,
        shape: Shape::Codecs,
        actions: ALLOW_AUDIT_REJECT,
        not_possible: CANNOT_MAKE_COMPLIANT,
        error: (
            codes::UNSUPPORTED_COMPRESSION_TYPE,
            "UNSUPPORTED_COMPRESSION_TYPE",
        ),
        reject_note: "",
        fails: |v| match v {
            Value::Codecs(m) => format!("batches compressed other than {}", codec_list(*m)),
            _ => String::new(),
        },
        upgrade: nothing,
    },
    Row {
        check: Check::MaxBatchBytes,
        key: "max_batch_bytes",
        scope: Scope::Produce,
        shape: Shape::Limit {
            min: 1,
            max: i32::MAX as i64,
        },
        actions: ALLOW_AUDIT_REJECT,
        not_possible: CANNOT_MAKE_COMPLIANT,
        error: (codes::MESSAGE_TOO_LARGE, "MESSAGE_TOO_LARGE"),
        reject_note: "",
        fails: |v| match v {
            Value::Limit(n) => format!("batches over {n} bytes"),
            _ => String::new(),
        },
        upgrade: nothing,
    },
    Row {
        check: Check::MaxBatchRecords,
        key: "max_batch_records",
        scope: Scope::Produce,
        shape: Shape::Limit {
            min: 1,
            max: i32::MAX as i64,
        },
        actions: ALLOW_AUDIT_REJECT,
        not_possible: CANNOT_MAKE_COMPLIANT,
        error: (codes::POLICY_VIOLATION, "POLICY_VIOLATION"),
        reject_note: "",
        fails: |v| match v {
            Value::Limit(n) => format!("batches over {n} records"),
            _ => String::new(),
        },
        upgrade: nothing,
    },
    Row {
        check: Check::ReadCommitted,
        key: "read_committed",
        scope: Scope::Consume,
        shape: Shape::Action,
        actions: &[Action::Allow, Action::Audit, Action::Upgrade],
        not_possible:
            "a read_uncommitted fetch cannot be refused with a useful error; use 'upgrade'",
        error: (codes::NONE, "NONE"),
        reject_note: "",
        fails: |_| "read_uncommitted Fetch/ListOffsets".into(),
        upgrade: |_| {
            "send read_uncommitted Fetch/ListOffsets as read_committed and remove aborted batches \
             from the answers"
                .into()
        },
    },
    Row {
        check: Check::TransactionTimeout,
        key: "transaction_timeout_ms",
        scope: Scope::Producers,
        shape: Shape::Bounds,
        actions: &Action::ALL,
        not_possible: "",
        error: (
            codes::INVALID_TRANSACTION_TIMEOUT,
            "INVALID_TRANSACTION_TIMEOUT",
        ),
        reject_note: "",
        fails: |v| match v {
            Value::Bounds(min, max) => {
                format!("InitProducerId with transaction.timeout.ms outside {min}..={max}")
            }
            _ => String::new(),
        },
        upgrade: |v| match v {
            Value::Bounds(min, max) => format!("clamp transaction.timeout.ms into {min}..={max}"),
            _ => String::new(),
        },
    },
    Row {
        check: Check::NewProducerIdsPerMinute,
        key: "new_producer_ids_per_minute",
        scope: Scope::Producers,
        shape: Shape::Limit {
            min: 1,
            max: 1_000_000,
        },
        actions: ALLOW_AUDIT_REJECT,
        not_possible: CANNOT_MAKE_COMPLIANT,
        error: (
            codes::THROTTLING_QUOTA_EXCEEDED,
            "THROTTLING_QUOTA_EXCEEDED",
        ),
        reject_note: " and a throttle time until the window has room",
        fails: |v| match v {
            Value::Limit(n) => format!(
                "more than {n} new producer ids per client (client id, else address) per minute"
            ),
            _ => String::new(),
        },
        upgrade: nothing,
    },
    Row {
        check: Check::TransactionalIdOwner,
        key: "owns_transactional_ids",
        scope: Scope::Producers,
        shape: Shape::Prefixes,
        actions: &[Action::Audit, Action::Reject],
        not_possible: "a foreign transactional id can only be audited or refused",
        error: (
            codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        ),
        reject_note: "",
        fails: |v| match v {
            Value::Prefixes(p) => {
                let p: Vec<String> = p.iter().map(|p| format!("'{p}*'")).collect();
                format!(
                    "InitProducerId for transactional ids {} (owned by the clients this rule \
                     matches) from any other client",
                    p.join(", ")
                )
            }
            _ => String::new(),
        },
        upgrade: nothing,
    },
    Row {
        check: Check::DuplicateContent,
        key: "duplicate_content",
        scope: Scope::Produce,
        shape: Shape::Action,
        actions: &[Action::Allow, Action::Audit, Action::Upgrade],
        not_possible: "content written before is not wrong in itself: the proxy reports it, or \
                       answers it with the original offset (`upgrade`, also spelled `answer`)",
        error: (codes::NONE, ""),
        reject_note: "",
        fails: |_| {
            "batches whose content this client (transactional id, else principal, client id and \
             address) had written on the partition within producer_state.content_window_ms: a \
             retry whose answer was lost, or records re-sent under a new epoch or producer id"
                .into()
        },
        upgrade: |_| {
            "answer a repeat with the offset its original batch got instead of writing it again (an \
             idempotent producer's later batches on the partition then go upstream with their \
             sequences shifted down by the records answered)"
                .into()
        },
    },
];

/// What one rule sets, per check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings([Option<Setting>; CHECK_COUNT]);

impl Settings {
    pub fn get(&self, check: Check) -> Option<&Setting> {
        self.0[check as usize].as_ref()
    }

    pub fn action(&self, check: Check) -> Option<Action> {
        self.get(check).map(|s| s.action)
    }

    pub fn set(&mut self, check: Check, setting: Setting) {
        self.0[check as usize] = Some(setting);
    }

    /// The checks set, in [`ROWS`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static Row, &Setting)> + '_ {
        ROWS.iter()
            .zip(&self.0)
            .filter_map(|(r, s)| Some((r, s.as_ref()?)))
    }

    pub fn any_in(&self, scope: Scope) -> bool {
        self.iter().any(|(r, _)| r.scope == scope)
    }
}

/// What the rules decided for one topic or one InitProducerId, per check. A check decided `allow` is
/// absent (unless kept for an explanation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decisions([Option<Decision>; CHECK_COUNT]);

impl Decisions {
    pub fn get(&self, check: Check) -> Option<&Decision> {
        self.0[check as usize].as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// First match per check: each rule, in order, decides the checks in `scope` it sets that no
    /// earlier rule decided. With `keep_allow` an `allow` stays visible (for explanations); the data
    /// path drops it.
    pub fn first_match<'r>(
        rules: impl Iterator<Item = (&'r Arc<str>, &'r Settings)>,
        scope: impl Fn(Scope) -> bool,
        keep_allow: bool,
    ) -> Decisions {
        let mut decided = [false; CHECK_COUNT];
        let mut out = Decisions::default();
        for (name, settings) in rules {
            for (row, s) in settings.iter() {
                let i = row.check as usize;
                if decided[i] || !scope(row.scope) || !row.first_match() {
                    continue;
                }
                decided[i] = true;
                // Content dedup is on (audit) unless a rule says `allow`: that `allow` must reach the
                // data path to switch it off.
                if keep_allow || s.action != Action::Allow || row.check == Check::DuplicateContent {
                    out.0[i] = Some(Decision {
                        rule: name.clone(),
                        action: s.action,
                        value: s.value.clone(),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_check_order_and_are_complete() {
        for (i, row) in ROWS.iter().enumerate() {
            assert_eq!(row.check as usize, i, "{} is out of place", row.key);
            assert!(!row.actions.is_empty(), "{}", row.key);
            let rejects = row.actions.contains(&Action::Reject);
            assert_eq!(
                rejects,
                row.error.0 != codes::NONE,
                "{}: a check that can reject names its error, and only then",
                row.key
            );
            let upgrades = row.actions.contains(&Action::Upgrade);
            let example = match row.shape {
                Shape::Action => Value::None,
                Shape::Codecs => Value::Codecs(1),
                Shape::Limit { .. } => Value::Limit(7),
                Shape::Bounds => Value::Bounds(1, 2),
                Shape::Prefixes => Value::Prefixes(vec!["p-".into()]),
            };
            assert!(!(row.fails)(&example).is_empty(), "{}", row.key);
            assert_eq!(
                upgrades,
                !(row.upgrade)(&example).is_empty(),
                "{}: says what upgrade does exactly when it can upgrade",
                row.key
            );
            assert_eq!(
                row.actions.len() == Action::ALL.len(),
                row.not_possible.is_empty(),
                "{}: says why an action is not possible exactly when one is not",
                row.key
            );
        }
        let keys: std::collections::HashSet<&str> = ROWS.iter().map(|r| r.key).collect();
        assert_eq!(keys.len(), CHECK_COUNT, "config keys are unique");
    }
}

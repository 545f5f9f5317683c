//! Live policy reload: on SIGHUP and when the config file changes on disk.
//!
//! The whole file is parsed and validated again; only a fully valid file replaces the rules (one
//! atomic swap, so no request ever sees half a rule set). A refused file leaves the old rules in force,
//! with an error log listing every problem and `policy_config_valid` at 0. Connections are never
//! touched: each reads the rules afresh on its next request. Sections other than `policies` need a
//! restart; a change to them is logged and otherwise ignored.

use super::Shared;
use crate::config::{Config, ConfigErrors};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{error, info, warn};

/// How often the file is looked at. Polling (a stat per second) works the same on every filesystem,
/// including bind-mounted ConfigMaps whose symlink swaps inotify watchers miss.
pub const POLL: Duration = Duration::from_secs(1);

/// Reloads the policies from `path`. Returns the number of rules now in force, or every problem.
pub fn reload(shared: &Shared, path: &Path, why: &str) -> Result<usize, ConfigErrors> {
    match Config::load(path) {
        Ok(new) => {
            let rules = new.policies.rules.len();
            let mut rest = new.clone();
            rest.policies = shared.config.policies.clone();
            if rest != shared.config {
                warn!(file = %path.display(), "config sections other than 'policies' changed; they take effect at restart");
            }
            shared.policies.replace(new.policies);
            if let Some(m) = &shared.metrics {
                m.policy_reloads.with_label_values(&["applied"]).inc();
                m.policy_rules.set(rules as i64);
                m.policy_config_valid.set(1);
            }
            info!(file = %path.display(), rules, trigger = why, "policies reloaded");
            Ok(rules)
        }
        Err(problems) => {
            if let Some(m) = &shared.metrics {
                m.policy_reloads.with_label_values(&["refused"]).inc();
                m.policy_config_valid.set(0);
            }
            let list: Vec<String> = problems.0.iter().map(|p| p.to_string()).collect();
            error!(
                file = %path.display(),
                trigger = why,
                problems = %list.join("; "),
                "config reload refused; the previous policies stay in force"
            );
            Err(problems)
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Watches `path` (and SIGHUP, on unix) until shutdown.
pub async fn watch(shared: Arc<Shared>, path: PathBuf, poll: Duration) {
    let mut last = stamp(&path);
    let mut hangups = super::Hangups::new();
    loop {
        let why = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = hangups.next() => "SIGHUP",
            _ = tokio::time::sleep(poll) => {
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                "file changed"
            }
        };
        last = stamp(&path);
        // Reading and validating a file (up to 1 MiB, regexes compiled) is blocking work: off the
        // runtime workers, so no connection waits on a parse.
        let (s, p) = (shared.clone(), path.clone());
        let _ = tokio::task::spawn_blocking(move || reload(&s, &p, why)).await;
    }
}

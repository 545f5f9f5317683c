//! Certificates (and the operator endpoint's token) follow their files: every configuration built from
//! files is looked at every [`POLL`] and on SIGHUP, and rebuilt when a file changed (see
//! [`crate::tls::live`]). Each outcome is logged and counted in
//! `credential_reloads_total{source, result}`; after a rotation the expiry gauges are set again.

use super::Shared;
use crate::tls::live::Reload;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info};

/// How often the files are looked at (a stat each: cheap, and it works on every filesystem,
/// Kubernetes Secret volumes swapped by symlink included).
pub const POLL: Duration = Duration::from_secs(1);

/// Sets `tls_certificate_expiry_seconds{file}` from every configured certificate file.
pub fn set_expiry_gauges(shared: &Shared) {
    let Some(m) = &shared.metrics else { return };
    let c = &shared.config;
    let files = crate::tls::certificate_files(
        c.listen.tls.as_ref(),
        c.upstream.tls.as_ref(),
        c.metrics.tls.as_ref(),
    );
    for (file, path) in files {
        if let Some(expiry) = crate::tls::earliest_expiry(path) {
            m.tls_certificate_expiry
                .with_label_values(&[file])
                .set(expiry);
        }
    }
}

/// One look at every configuration (blocking file reads: run off the workers).
pub fn reload_all(shared: &Shared, force: bool, why: &str) {
    let mut rotated = false;
    for live in &shared.credentials {
        let source = live.what();
        let result = match live.reload(force) {
            Reload::Unchanged => continue,
            Reload::Applied => {
                info!(
                    source,
                    trigger = why,
                    "credentials reloaded; new connections use them"
                );
                rotated = true;
                "applied"
            }
            Reload::Refused(problems) => {
                let list: Vec<String> = problems
                    .iter()
                    .map(|p| match p.key {
                        "" => format!("{source}: {}", p.message),
                        key => format!("{source}.{key}: {}", p.message),
                    })
                    .collect();
                error!(
                    source,
                    trigger = why,
                    problems = %list.join("; "),
                    "credential files refused; the previous ones stay in use"
                );
                "refused"
            }
        };
        if let Some(m) = &shared.metrics {
            m.credential_reloads
                .with_label_values(&[source, result])
                .inc();
        }
    }
    if rotated {
        set_expiry_gauges(shared);
    }
}

/// Watches the files until shutdown.
pub async fn watch(shared: Arc<Shared>, poll: Duration) {
    if shared.credentials.is_empty() {
        return;
    }
    let mut hangups = super::Hangups::new();
    loop {
        let (force, why) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = hangups.next() => (true, "SIGHUP"),
            _ = tokio::time::sleep(poll) => (false, "file changed"),
        };
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || reload_all(&s, force, why)).await;
    }
}

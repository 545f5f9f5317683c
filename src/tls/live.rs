//! TLS configurations that follow their files: certificates rotate without a restart.
//!
//! A [`Live`] holds the rustls configuration built from some PEM files and the files' stamps (modified
//! time and length). [`Live::reload`] looks at the stamps (the watcher calls it every second, and on
//! SIGHUP with `force`); when one moved, the configuration is built again from the files, and only a
//! configuration that builds whole replaces the old one (one atomic swap). New connections take the
//! configuration current when they start; established connections keep the one they started with, so
//! nothing in flight is disturbed. A broken file (half written, a key that does not fit, garbage) is
//! refused with every problem; the old configuration stays in use, and the next change is tried again.

use super::TlsProblem;
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

type Build<C> = Box<dyn Fn() -> Result<Arc<C>, Vec<TlsProblem>> + Send + Sync>;

/// What [`Live::reload`] did.
#[derive(Debug, PartialEq)]
pub enum Reload {
    /// No file changed (and the reload was not forced).
    Unchanged,
    /// The configuration was built again from the files and is in use for new connections.
    Applied,
    /// The files changed but do not build a configuration; the previous one stays in use.
    Refused(Vec<TlsProblem>),
}

pub struct Live<C> {
    /// The settings' key path (`listen.tls`, `upstream.tls`, `metrics.tls`), for logs and metrics.
    pub what: &'static str,
    files: Vec<PathBuf>,
    build: Build<C>,
    current: ArcSwap<C>,
    stamps: Mutex<Vec<Stamp>>,
}

impl<C> Live<C> {
    /// Builds the first configuration; the problems if it cannot.
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<Arc<C>, Vec<TlsProblem>> + Send + Sync + 'static,
    ) -> Result<Live<C>, Vec<TlsProblem>> {
        // Stamps first: a file replaced while it is read is seen as changed at the next look.
        let stamps = files.iter().map(|f| stamp(f)).collect();
        let first = build()?;
        Ok(Live {
            what,
            files,
            build: Box::new(build),
            current: ArcSwap::new(first),
            stamps: Mutex::new(stamps),
        })
    }

    /// The configuration for a connection starting now.
    pub fn current(&self) -> Arc<C> {
        self.current.load_full()
    }

    /// Builds the configuration again if a file changed since the last look (or always, with `force`).
    /// Blocking file reads: call it off the runtime's workers.
    pub fn reload(&self, force: bool) -> Reload {
        let now: Vec<Stamp> = self.files.iter().map(|f| stamp(f)).collect();
        {
            let mut last = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if !force && *last == now {
                return Reload::Unchanged;
            }
            // Recorded before building: a refused set of files is not tried again until one changes.
            *last = now;
        }
        match (self.build)() {
            Ok(config) => {
                self.current.store(config);
                Reload::Applied
            }
            Err(problems) => Reload::Refused(problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn only_a_change_or_force_builds_again_and_a_refusal_keeps_the_old_one() {
        let dir = std::env::temp_dir().join(format!("live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("value");
        std::fs::write(&file, "1").unwrap();
        let builds = Arc::new(AtomicUsize::new(0));
        let (f, b) = (file.clone(), builds.clone());
        let live = Live::new("test", vec![file.clone()], move || {
            b.fetch_add(1, Ordering::Relaxed);
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            text.trim().parse::<u32>().map(Arc::new).map_err(|e| {
                vec![TlsProblem {
                    key: "value",
                    message: e.to_string(),
                }]
            })
        })
        .unwrap();
        assert_eq!(*live.current(), 1);
        assert_eq!(live.reload(false), Reload::Unchanged);
        assert_eq!(builds.load(Ordering::Relaxed), 1);
        std::fs::write(&file, "22").unwrap();
        assert_eq!(live.reload(false), Reload::Applied);
        assert_eq!(*live.current(), 22);
        std::fs::write(&file, "garbage").unwrap();
        assert!(matches!(live.reload(false), Reload::Refused(p) if p.len() == 1));
        assert_eq!(*live.current(), 22, "the old configuration stays");
        assert_eq!(
            live.reload(false),
            Reload::Unchanged,
            "not retried unchanged"
        );
        assert!(matches!(live.reload(true), Reload::Refused(_)), "forced");
        std::fs::write(&file, "333").unwrap();
        assert_eq!(live.reload(false), Reload::Applied);
        assert_eq!(*live.current(), 333);
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Listeners, connection limits, shutdown and drain.
//!
//! One bootstrap listener (its connections go to the upstream bootstrap servers) and one listener per
//! broker node id (its connections go to that broker). [`Proxy::start`] is the testable entry point: it
//! binds, spawns everything and returns a handle; [`run`] is what the binary calls.

pub mod brokers;
pub mod certificates;
pub mod discovery;
pub mod own;
pub mod reload;
pub mod sasl;
pub mod topics;

use crate::audit::AuditSink;
use crate::config::Config;
use crate::guard::Guard;
use crate::metrics::Metrics;
use crate::session::{self, Target};
use brokers::Brokers;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use crate::session::Hooks;

/// The server's own state: listeners, limits, discovery, reload, shutdown. Sessions and the operator
/// endpoint are handed the narrow handle sets they need ([`crate::stages::Handles`],
/// [`crate::metrics::http::Handles`]), never this.
pub struct Shared {
    pub config: Config,
    pub brokers: Arc<Brokers>,
    pub guard: Arc<Guard>,
    pub metrics: Option<Arc<Metrics>>,
    /// The policies in force (swapped whole on reload).
    pub policies: Arc<crate::policy::PolicyHolder>,
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub upstream_ready: Arc<AtomicBool>,
    /// What each session is handed.
    pub session: Arc<session::Handles>,
    /// The configurations built from certificate and token files (see [`certificates`]).
    pub credentials: Vec<Arc<dyn crate::tls::Reloadable>>,
    tracker: TaskTracker,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    bootstrap_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
}

/// SIGHUP, one wake-up per signal (never, where there are no such signals). Every holder gets each
/// signal: the policy reload and the certificate watcher each hold one.
pub(crate) struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    pub(crate) fn new() -> Hangups {
        Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    pub(crate) async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.signal.as_mut() {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// How long connections may take to finish after shutdown is requested.
const DRAIN: Duration = Duration::from_secs(5);

impl Proxy {
    pub async fn start(config: Config, hooks: Hooks) -> anyhow::Result<Proxy> {
        let bind = (
            config.listen.bind_host.clone(),
            config.listen.bootstrap_port,
        );
        let bootstrap = TcpListener::bind(&bind).await.map_err(|e| {
            anyhow::anyhow!("cannot bind bootstrap listener {}:{}: {e}", bind.0, bind.1)
        })?;
        let bootstrap_addr = bootstrap.local_addr()?;
        let (listener_tx, mut listener_rx) = mpsc::unbounded_channel();
        let metrics = match config.metrics.enabled {
            true => Some(Arc::new(
                Metrics::new(config.metrics.max_producer_series)
                    .map_err(|e| anyhow::anyhow!("cannot set up metrics: {e}"))?,
            )),
            false => None,
        };
        // The metrics count audit events by watching them, like any other observer.
        let mut observers: Vec<crate::audit::Observer> = Vec::new();
        if let Some(m) = metrics.clone() {
            observers.push(Arc::new(move |e| m.on_audit(e)));
        }
        observers.extend(hooks.on_audit.clone());
        let audit = AuditSink::start(&config.audit, observers)
            .map_err(|e| anyhow::anyhow!("cannot open the audit file: {e}"))?;
        let guard = Arc::new(Guard::new(
            config.producer_state.clone(),
            Arc::new(audit),
            metrics.clone(),
        ));
        let http =
            match &config.metrics.listen {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("cannot bind the metrics endpoint {addr}: {e}")
                })?),
                None => None,
            };
        let brokers = Arc::new(Brokers::new(&config.listen, listener_tx));
        let policies = Arc::new(crate::policy::PolicyHolder::new(config.policies.clone()));
        let shutdown = CancellationToken::new();
        let tls = crate::tls::Tls::new(config.listen.tls.as_ref(), config.upstream.tls.as_ref())?;
        let operator_tls = match &config.metrics.tls {
            Some(t) => Some(crate::tls::live_server("metrics.tls", t)?),
            None => None,
        };
        let operator_token = match &config.metrics.token_file {
            Some(path) => Some(crate::metrics::http::live_token(path)?),
            None => None,
        };
        let own_sasl = match &config.upstream.sasl {
            Some(s) => Some(sasl::live(s)?),
            None => None,
        };
        let mut watched = tls.reloadables();
        watched.extend(
            own_sasl
                .clone()
                .map(|l| l as Arc<dyn crate::tls::Reloadable>),
        );
        watched.extend(
            operator_tls
                .clone()
                .map(|l| l as Arc<dyn crate::tls::Reloadable>),
        );
        watched.extend(
            operator_token
                .clone()
                .map(|l| l as Arc<dyn crate::tls::Reloadable>),
        );
        let session = Arc::new(session::Handles {
            limits: config.limits.clone(),
            upstream: config.upstream.clone(),
            brokers: brokers.clone(),
            guard: guard.clone(),
            metrics: metrics.clone(),
            lso: Arc::new(crate::metrics::lso::LsoTracker::new(
                config.watchdog.max_partitions,
                config.watchdog.lso_stuck,
            )),
            hooks,
            policies: policies.clone(),
            shutdown: shutdown.clone(),
            tls,
            own_sasl,
            chain: crate::stages::Chain::new(),
        });
        let shared = Arc::new(Shared {
            brokers,
            guard,
            metrics,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            policies,
            config,
            shutdown,
            upstream_ready: Arc::new(AtomicBool::new(false)),
            session,
            credentials: watched,
            tracker: TaskTracker::new(),
        });
        info!(addr = %bootstrap_addr, "bootstrap listener up");
        let mut http_addr = None;
        if let Some(listener) = http {
            http_addr = listener.local_addr().ok();
            info!(addr = ?http_addr, "metrics endpoint up");
            let handles = Arc::new(crate::metrics::http::Handles {
                metrics: shared.metrics.clone(),
                guard: shared.guard.clone(),
                policies: shared.policies.clone(),
                brokers: shared.brokers.clone(),
                upstream_ready: shared.upstream_ready.clone(),
                shutdown: shared.shutdown.clone(),
                tls: operator_tls,
                token: operator_token,
            });
            shared
                .tracker
                .spawn(crate::metrics::http::serve(listener, handles));
        }
        certificates::set_expiry_gauges(&shared);
        shared
            .tracker
            .spawn(certificates::watch(shared.clone(), certificates::POLL));
        shared.tracker.spawn(watchdog(shared.clone()));
        shared
            .tracker
            .spawn(accept_loop(shared.clone(), bootstrap, Target::Bootstrap));
        // Broker listeners are bound by the registry as nodes are discovered; accept on each here.
        let s = shared.clone();
        shared.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = s.shutdown.cancelled() => return,
                    next = listener_rx.recv() => match next {
                        Some((node_id, listener)) => {
                            s.tracker.spawn(accept_loop(s.clone(), listener, Target::Node(node_id)));
                        }
                        None => return,
                    }
                }
            }
        });
        // A first refresh before returning, so node listeners exist as soon as the cluster answers.
        match discovery::refresh_once(&shared).await {
            Ok(_) => shared
                .upstream_ready
                .store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => warn!(
                error = format!("{e:#}"),
                "upstream cluster not reachable yet; will keep trying"
            ),
        }
        shared
            .tracker
            .spawn(discovery::refresh_loop(shared.clone()));
        // Idle producer state expires (KIP-854's producer.id.expiration.ms is the broker's analogue).
        let s = shared.clone();
        shared.tracker.spawn(async move {
            let every = (s.config.producer_state.idle_expiry / 10)
                .clamp(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = s.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => { s.guard.expire_idle(); }
                }
            }
        });
        Ok(Proxy {
            shared,
            bootstrap_addr,
            http_addr,
        })
    }

    pub fn bootstrap_addr(&self) -> SocketAddr {
        self.bootstrap_addr
    }

    /// Where /metrics, /healthz, /readyz and /producers are served, if configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Reloads the policies from `path` on SIGHUP and whenever the file changes (polled every `poll`).
    pub fn watch_config(&self, path: std::path::PathBuf, poll: Duration) {
        if let Some(m) = &self.shared.metrics {
            m.policy_rules
                .set(self.shared.config.policies.rules.len() as i64);
            m.policy_config_valid.set(1);
        }
        self.shared
            .tracker
            .spawn(reload::watch(self.shared.clone(), path, poll));
    }

    /// Stops accepting, closes connections, and waits (bounded) for tasks to end.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(DRAIN, self.shared.tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not finish within the drain period");
        }
    }
}

/// Runs the proxy until `shutdown` completes.
/// Runs the proxy until `shutdown` completes; `config_path` is watched for policy reloads.
pub async fn run(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let proxy = Proxy::start(config, Hooks::default()).await?;
    if let Some(path) = config_path {
        proxy.watch_config(path, reload::POLL);
    }
    shutdown.await;
    info!("shutting down");
    proxy.shutdown().await;
    Ok(())
}

/// Flags transactions open longer than their timeout plus the margin (gauge + audit event).
async fn watchdog(shared: Arc<Shared>) {
    let cfg = &shared.config.watchdog;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
        let now = std::time::Instant::now();
        for (txn, client, open_for) in shared.guard.txns.newly_hanging(cfg.margin, now) {
            if let Some(m) = &shared.metrics {
                m.hanging_transactions.inc();
            }
            use crate::audit::{Action, AuditEvent, Kind, Source};
            let (pid, epoch) = shared.guard.txns.current(&txn).unwrap_or((-1, -1));
            shared.guard.audit.emit(AuditEvent {
                producer_id: pid,
                producer_epoch: epoch,
                transactional_id: Some(txn.clone()),
                client_id: Some(client),
                detail: Some(format!(
                    "open for {:.1} s, timeout {:.1} s + margin {:.1} s",
                    open_for.as_secs_f64(),
                    shared.guard.txns.timeout(&txn).as_secs_f64(),
                    cfg.margin.as_secs_f64()
                )),
                ..AuditEvent::new(Kind::HangingTransaction, Source::Proxy, Action::Observed)
            });
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, target: Target) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            if let Some(m) = &shared.metrics {
                m.connections_rejected.inc();
            }
            warn!(%peer, limit = shared.config.limits.max_connections, "connection limit reached; closing new connection");
            drop(socket);
            continue;
        };
        if let Some(m) = &shared.metrics {
            match target {
                Target::Bootstrap => m.connections_accepted_bootstrap.inc(),
                Target::Node(_) => m.connections_accepted_broker.inc(),
            }
        }
        let _ = socket.set_nodelay(true);
        shared.tracker.spawn(session::run(
            socket,
            peer,
            target,
            shared.session.clone(),
            permit,
        ));
    }
}

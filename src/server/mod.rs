//! Listeners, connection limits, shutdown and drain.
//!
//! One bootstrap listener (its connections go to the upstream bootstrap servers) and one listener per
//! broker node id (its connections go to that broker). [`Proxy::start`] is the testable entry point: it
//! binds, spawns everything and returns a handle; [`run`] is what the binary calls.

pub mod brokers;
pub mod discovery;

use crate::audit::AuditSink;
use crate::config::Config;
use crate::guard::Guard;
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

/// Observation and fault-injection points for tests. Empty in production; each hook costs one branch.
#[derive(Clone, Default)]
#[allow(clippy::type_complexity)]
pub struct Hooks {
    /// Called with every frame the proxy writes to a client (size prefix included).
    pub on_client_frame: Option<Arc<dyn Fn(&[u8]) + Send + Sync>>,
    /// Called with the api key and frame of every broker response before it goes to the client; `true`
    /// drops it (the proxy has processed it, the client never sees it): a lost response, for retry tests.
    pub drop_client_frame: Option<Arc<dyn Fn(i16, &[u8]) -> bool + Send + Sync>>,
    /// Called with every audit event.
    pub on_audit: Option<Arc<dyn Fn(&crate::audit::AuditEvent) + Send + Sync>>,
}

/// State shared by every listener and session.
pub struct Shared {
    pub config: Config,
    pub brokers: Brokers,
    pub guard: Arc<Guard>,
    pub hooks: Hooks,
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub upstream_ready: AtomicBool,
    tracker: TaskTracker,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    bootstrap_addr: SocketAddr,
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
        let audit = AuditSink::start(&config.audit, hooks.on_audit.clone())
            .map_err(|e| anyhow::anyhow!("cannot open the audit file: {e}"))?;
        let guard = Arc::new(Guard::new(config.producer_state.clone(), Arc::new(audit)));
        let shared = Arc::new(Shared {
            brokers: Brokers::new(&config.listen, listener_tx),
            guard,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            hooks,
            shutdown: CancellationToken::new(),
            upstream_ready: AtomicBool::new(false),
            tracker: TaskTracker::new(),
        });
        info!(addr = %bootstrap_addr, "bootstrap listener up");
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
        if let Err(e) = discovery::refresh_once(&shared).await {
            warn!(error = %e, "upstream cluster not reachable yet; will keep trying");
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
        })
    }

    pub fn bootstrap_addr(&self) -> SocketAddr {
        self.bootstrap_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
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
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let proxy = Proxy::start(config, Hooks::default()).await?;
    shutdown.await;
    info!("shutting down");
    proxy.shutdown().await;
    Ok(())
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
            warn!(%peer, limit = shared.config.limits.max_connections, "connection limit reached; closing new connection");
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        shared
            .tracker
            .spawn(session::run(socket, peer, target, shared.clone(), permit));
    }
}

//! The operator's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process runs),
//! `/readyz` (the upstream cluster answered the last metadata refresh), `/producers` (tracked producer
//! state as JSON, a bounded page at a time: `?limit=N&after=PRODUCER_ID`).
//!
//! Optionally protected (`metrics.tls`, `metrics.token_file`): TLS with a certificate that follows its
//! files, and a bearer token `/metrics` and `/producers` require (`Authorization: Bearer <token>`,
//! compared in constant time; the file is re-read when it changes). `/healthz` and `/readyz` stay open:
//! they tell nothing but up/ready, and probes carry no credentials.
//!
//! Deliberately tiny: GET only, one request per connection, a bounded request head, a read timeout, a
//! write timeout, at most [`MAX_CONNECTIONS`] connections at once (more are closed at once) and answers
//! bounded in size. It serves a scraper and an operator's curl, not the internet: a client that never
//! reads its answer is let go after [`WRITE_TIMEOUT`] and holds at most one page meanwhile.

use crate::tls::live::Live;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// What the endpoint reads, handed over by the server.
pub struct Handles {
    pub metrics: Option<Arc<super::Metrics>>,
    pub guard: Arc<crate::guard::Guard>,
    pub policies: Arc<crate::policy::PolicyHolder>,
    /// Brokers and topic ids (for the `state_bytes` of the topic-id table).
    pub brokers: Arc<crate::server::brokers::Brokers>,
    /// The upstream cluster answered the last metadata refresh (`/readyz`).
    pub upstream_ready: Arc<std::sync::atomic::AtomicBool>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// TLS, when `metrics.tls` is set.
    pub tls: Option<Arc<Live<rustls::ServerConfig>>>,
    /// The bearer token, when `metrics.token_file` is set.
    pub token: Option<Arc<Live<Token>>>,
}

/// A bearer token read from its file.
pub struct Token(String);

/// The most a token file may hold.
const MAX_TOKEN_BYTES: u64 = 4096;

/// The token in `path`: a regular file of at most 4 KiB holding one printable ASCII word (surrounding
/// white space, such as a final newline, is ignored).
pub fn read_token(path: &std::path::Path) -> Result<Token, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let bytes = crate::config::reader::read_bounded(path, MAX_TOKEN_BYTES).map_err(|e| at(&e))?;
    let text = String::from_utf8_lossy(&bytes);
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(at(&"must hold one word of printable ASCII"));
    }
    Ok(Token(token.to_string()))
}

/// The token as a reloadable setting: a broken new file is refused and the old token stays.
pub fn live_token(path: &std::path::Path) -> anyhow::Result<Arc<Live<Token>>> {
    let p = path.to_path_buf();
    let build = move || {
        read_token(&p)
            .map(Arc::new)
            .map_err(|message| vec![crate::tls::TlsProblem { key: "", message }])
    };
    Live::new("metrics.token_file", vec![path.to_path_buf()], build)
        .map(Arc::new)
        .map_err(|p| anyhow::anyhow!("metrics.token_file: {}", p[0].message))
}

impl Token {
    /// Whether a request head carries `Authorization: Bearer <this token>`; the comparison takes the
    /// same time wherever the first difference is.
    fn admits(&self, head: &[u8]) -> bool {
        let text = String::from_utf8_lossy(head);
        let offered = text.lines().skip(1).find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("authorization")
                .then(|| value.trim().strip_prefix("Bearer ").map(str::trim))
                .flatten()
        });
        let Some(offered) = offered else {
            return false;
        };
        crate::tls::secrets_equal(offered.as_bytes(), self.0.as_bytes())
    }
}

const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once; one more is closed without an answer.
pub const MAX_CONNECTIONS: usize = 16;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read its whole answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// `/producers` page size: the default and the most one request may ask for.
const PRODUCERS_DEFAULT: usize = 100;
const PRODUCERS_MAX: usize = 1_000;
/// Partitions listed per producer (all are counted in `partitions_tracked`).
const PARTITIONS_LISTED: usize = 100;

pub async fn serve(listener: TcpListener, shared: Arc<Handles>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "http connection refused: {MAX_CONNECTIONS} already open");
                    drop(socket);
                    continue;
                };
                let s = shared.clone();
                tokio::spawn(async move {
                    let served = match &s.tls {
                        None => handle(socket, &s).await,
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                            match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(socket)).await
                            {
                                Ok(Ok(stream)) => handle(stream, &s).await,
                                Ok(Err(e)) => Err(e),
                                Err(_) => Ok(()),
                            }
                        }
                    };
                    if let Err(e) = served {
                        debug!(%peer, error = %e, "http request failed");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    shared: &Handles,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line =
        String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).to_string();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let protected = matches!(path, "/metrics" | "/producers");
    let admitted = match &shared.token {
        Some(token) if protected => token.current().admits(&head),
        _ => true,
    };
    let (status, content_type, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else if !admitted {
        (
            "401 Unauthorized\r\nWWW-Authenticate: Bearer",
            "text/plain",
            "a bearer token is required\n".to_string(),
        )
    } else if path == "/producers" {
        match ProducersQuery::parse(query) {
            Ok(q) => {
                let guard = shared.guard.clone();
                // A scan of the whole store: off the runtime workers that carry client traffic.
                let body = tokio::task::spawn_blocking(move || producers_json(&guard, q))
                    .await
                    .unwrap_or_else(|_| "{}".into());
                ("200 OK", "application/json", body)
            }
            Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
        }
    } else {
        route(path, shared)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        socket.write_all(response.as_bytes()).await?;
        socket.write_all(body.as_bytes()).await?;
        socket.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(done) => done,
        Err(_) => {
            debug!("http client did not read its answer within {WRITE_TIMEOUT:?}; closed");
            Ok(())
        }
    }
}

fn route(path: &str, shared: &Handles) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => match &shared.metrics {
            Some(m) => {
                refresh_gauges(shared);
                ("200 OK", "text/plain; version=0.0.4", m.render())
            }
            None => (
                "404 Not Found",
                "text/plain",
                "metrics are disabled\n".into(),
            ),
        },
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" => {
            if shared.upstream_ready.load(Ordering::Relaxed) {
                ("200 OK", "text/plain", "ready\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "upstream cluster not answering\n".into(),
                )
            }
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz, /readyz, /producers\n".into(),
        ),
    }
}

/// Gauges read from state at scrape time rather than kept up to date on the data path.
fn refresh_gauges(shared: &Handles) {
    if let Some(m) = &shared.metrics {
        let store = &shared.guard.store;
        m.tracked_producer_partitions.set(store.len() as i64);
        let evicted = store.evictions();
        let seen = m.producer_state_evictions.get();
        if evicted > seen {
            m.producer_state_evictions.inc_by(evicted - seen);
        }
        let txns = &shared.guard.txns;
        // Each table counts its own evictions; the counter catches up with them here.
        for (table, evicted) in [
            ("producer_state", store.evictions()),
            ("topic_names", store.topic_name_evictions()),
            ("transactions", txns.evictions()),
            ("failed_batches", shared.guard.failed.evictions()),
            ("producer_id_rates", shared.policies.new_pids.evictions()),
            ("policy_caches", crate::policy::cache_evictions()),
            ("content_window", shared.guard.content.evictions()),
            ("upgraded_producers", shared.guard.upgrades.evictions()),
        ] {
            let counter = m.state_evictions.with_label_values(&[table]);
            let seen = counter.get();
            if evicted > seen {
                counter.inc_by(evicted - seen);
            }
        }
        m.state_bytes
            .with_label_values(&["producer_state"])
            .set(store.approx_bytes() as i64);
        m.state_bytes
            .with_label_values(&["transactions"])
            .set(txns.approx_bytes() as i64);
        m.state_bytes
            .with_label_values(&["content_window"])
            .set(shared.guard.content.approx_bytes() as i64);
        m.state_bytes
            .with_label_values(&["sequence_shifts"])
            .set(shared.guard.shifts.approx_bytes() as i64);
        m.state_bytes
            .with_label_values(&["upgraded_producers"])
            .set(shared.guard.upgrades.approx_bytes() as i64);
        m.state_bytes
            .with_label_values(&["topic_ids"])
            .set(shared.brokers.topics.bytes() as i64);
        let dropped = shared.guard.audit.dropped();
        let seen = m.audit_dropped.get();
        if dropped > seen {
            m.audit_dropped.inc_by(dropped - seen);
        }
    }
}

/// `/producers?limit=N&after=PRODUCER_ID`: at most N producers (default 100, at most 1000), those with
/// ids above `after` (the `next_after` of the previous page).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProducersQuery {
    limit: usize,
    after: i64,
}

impl ProducersQuery {
    fn parse(query: &str) -> Result<ProducersQuery, String> {
        let mut q = ProducersQuery {
            limit: PRODUCERS_DEFAULT,
            after: -1,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" => {
                    q.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=PRODUCERS_MAX).contains(n))
                        .ok_or(format!("limit must be 1 to {PRODUCERS_MAX}"))?
                }
                "after" => {
                    q.after = v
                        .parse()
                        .map_err(|_| "after must be a producer id".to_string())?
                }
                _ => return Err(format!("unknown parameter {k:.32} (limit, after)")),
            }
        }
        Ok(q)
    }
}

#[derive(Serialize)]
struct PartitionJson {
    topic: String,
    partition: i32,
    epoch: Option<i16>,
    last_sequence: Option<i32>,
    last_offset: Option<i64>,
    batches_in_window: usize,
    in_flight: usize,
    last_seen_ms_ago: u64,
}

#[derive(Serialize)]
struct ProducerJson {
    producer_id: i64,
    client_id: Option<String>,
    transactional_id: Option<String>,
    epoch: Option<i16>,
    /// Every partition the proxy tracks for this producer; at most 100 are listed.
    partitions_tracked: usize,
    partitions: Vec<PartitionJson>,
}

#[derive(Serialize)]
struct ProducersPage {
    producers: Vec<ProducerJson>,
    /// Pass as `after` for the next page; null on the last page.
    next_after: Option<i64>,
}

fn producers_json(guard: &crate::guard::Guard, q: ProducersQuery) -> String {
    let store = &guard.store;
    let page = guard.page(q.after, q.limit, PARTITIONS_LISTED);
    let last = page.producers.keys().next_back().copied();
    let producers = page
        .producers
        .into_iter()
        .map(|(producer_id, (tracked, entries))| {
            let (client_id, transactional_id) = store.owner(producer_id).unwrap_or_default();
            let partitions: Vec<PartitionJson> = entries
                .iter()
                .map(|e| {
                    let last = e.state.as_ref().and_then(|s| s.last());
                    PartitionJson {
                        topic: e.topic.to_string(),
                        partition: e.key.partition,
                        epoch: e.state.as_ref().map(|s| s.epoch),
                        last_sequence: last.map(|a| a.last_seq),
                        last_offset: last.map(|a| a.first_offset),
                        batches_in_window: e.state.as_ref().map_or(0, |s| s.window().count()),
                        in_flight: e.in_flight.len(),
                        last_seen_ms_ago: e.idle_ms,
                    }
                })
                .collect();
            ProducerJson {
                producer_id,
                client_id,
                transactional_id,
                epoch: partitions.iter().filter_map(|p| p.epoch).max(),
                partitions_tracked: tracked,
                partitions,
            }
        })
        .collect();
    let body = ProducersPage {
        producers,
        next_after: last.filter(|_| page.more),
    };
    serde_json::to_string(&body).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producers_query_is_bounded() {
        assert_eq!(
            ProducersQuery::parse(""),
            Ok(ProducersQuery {
                limit: 100,
                after: -1
            })
        );
        assert_eq!(
            ProducersQuery::parse("limit=5&after=42"),
            Ok(ProducersQuery {
                limit: 5,
                after: 42
            })
        );
        assert!(ProducersQuery::parse("limit=1001").is_err());
        assert!(ProducersQuery::parse("limit=0").is_err());
        assert!(ProducersQuery::parse("after=x").is_err());
        assert!(ProducersQuery::parse("what=1").is_err());
    }
}

//! The operator's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process runs),
//! `/readyz` (the upstream cluster answered the last metadata refresh), `/producers` (tracked producer
//! state as JSON).
//!
//! Deliberately tiny: GET only, one request per connection, a bounded request head, a read timeout. It
//! serves a scraper and an operator's curl, not the internet.

use crate::server::Shared;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

const MAX_HEAD: usize = 8 * 1024;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, _)) => {
                let s = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(socket, &s).await {
                        debug!(error = %e, "http request failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut socket: TcpStream, shared: &Shared) -> std::io::Result<()> {
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
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line =
        String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).to_string();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else {
        route(path, shared)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}

fn route(path: &str, shared: &Shared) -> (&'static str, &'static str, String) {
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
        "/producers" => ("200 OK", "application/json", producers_json(shared)),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz, /readyz, /producers\n".into(),
        ),
    }
}

/// Gauges read from state at scrape time rather than kept up to date on the data path.
fn refresh_gauges(shared: &Shared) {
    if let Some(m) = &shared.metrics {
        let store = &shared.guard.store;
        m.tracked_producer_partitions.set(store.len() as i64);
        let evicted = store.evictions();
        let seen = m.producer_state_evictions.get();
        if evicted > seen {
            m.producer_state_evictions.inc_by(evicted - seen);
        }
        let dropped = shared.guard.audit.dropped();
        let seen = m.audit_dropped.get();
        if dropped > seen {
            m.audit_dropped.inc_by(dropped - seen);
        }
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
    partitions: Vec<PartitionJson>,
}

fn producers_json(shared: &Shared) -> String {
    let store = &shared.guard.store;
    let mut by_producer: BTreeMap<i64, ProducerJson> = BTreeMap::new();
    for e in shared.guard.snapshot() {
        let (client_id, transactional_id) = store.owner(e.key.producer_id).unwrap_or_default();
        let p = by_producer
            .entry(e.key.producer_id)
            .or_insert_with(|| ProducerJson {
                producer_id: e.key.producer_id,
                client_id,
                transactional_id,
                epoch: None,
                partitions: Vec::new(),
            });
        let last = e.state.as_ref().and_then(|s| s.last());
        let epoch = e.state.as_ref().map(|s| s.epoch);
        p.epoch = p.epoch.max(epoch);
        p.partitions.push(PartitionJson {
            topic: e.topic.to_string(),
            partition: e.key.partition,
            epoch,
            last_sequence: last.map(|a| a.last_seq),
            last_offset: last.map(|a| a.first_offset),
            batches_in_window: e.state.as_ref().map_or(0, |s| s.window().count()),
            in_flight: e.in_flight.len(),
            last_seen_ms_ago: e.idle_ms,
        });
    }
    let list: Vec<ProducerJson> = by_producer.into_values().collect();
    serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into())
}

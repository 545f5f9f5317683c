//! The proxy's own metadata refresh: at start and every `upstream.metadata_refresh_ms`, ask the cluster
//! which brokers exist, so that listeners appear for new brokers even before a client asks, and so that
//! clients reconnecting after a proxy restart find their node ports listening. Its outcome is also the
//! readiness signal.

use super::Shared;
use crate::protocol::codec::decode_response;
use crate::protocol::frame::FrameCodec;
use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, RequestHeader};
use kafka_protocol::protocol::{Encodable, StrBytes};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

/// Metadata v12: understood by every Kafka broker from 3.0 through 4.x.
const METADATA_VERSION: i16 = 12;

pub async fn refresh_loop(shared: Arc<Shared>) {
    loop {
        match refresh_once(&shared).await {
            Ok(n) => {
                shared.upstream_ready.store(true, Ordering::Relaxed);
                debug!(brokers = n, "metadata refreshed");
            }
            Err(e) => {
                shared.upstream_ready.store(false, Ordering::Relaxed);
                warn!(error = %e, "metadata refresh failed");
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.config.upstream.metadata_refresh) => {}
        }
    }
}

/// One refresh; returns how many brokers the cluster announced.
pub async fn refresh_once(shared: &Shared) -> anyhow::Result<usize> {
    let up = &shared.config.upstream;
    let mut last_err = anyhow::anyhow!("no bootstrap servers");
    for server in &up.bootstrap_servers {
        match fetch_brokers(shared, server).await {
            Ok(n) => return Ok(n),
            Err(e) => last_err = e.context(format!("bootstrap server {server}")),
        }
    }
    Err(last_err)
}

async fn fetch_brokers(shared: &Shared, server: &str) -> anyhow::Result<usize> {
    let up = &shared.config.upstream;
    let mut stream = tokio::time::timeout(up.connect_timeout, TcpStream::connect(server)).await??;
    let key = ApiKey::Metadata;
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(METADATA_VERSION)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("kafka-eos-proxy")));
    let body = MetadataRequest::default().with_topics(Some(vec![]));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header.encode(&mut buf, key.request_header_version(METADATA_VERSION))?;
    body.encode(&mut buf, METADATA_VERSION)?;
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    stream.write_all(&buf).await?;
    let (read, _write) = stream.split();
    let mut frames = FramedRead::new(
        read,
        FrameCodec::new(shared.config.limits.max_frame_bytes, 4),
    );
    let frame = tokio::time::timeout(up.connect_timeout, frames.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("closed before answering"))??;
    let (_, resp) = decode_response::<MetadataResponse>(frame.freeze(), key, METADATA_VERSION)?;
    for b in &resp.brokers {
        shared
            .brokers
            .advertise(b.node_id.0, b.host.as_str(), b.port)
            .await;
    }
    Ok(resp.brokers.len())
}

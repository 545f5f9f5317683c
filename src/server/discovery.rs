//! The proxy's own metadata refresh: at start and every `upstream.metadata_refresh_ms`, ask the cluster
//! which brokers exist, so that listeners appear for new brokers even before a client asks, and so that
//! clients reconnecting after a proxy restart find their node ports listening. Its outcome is also the
//! readiness signal. Also the proxy's own lookups of topic ids no Metadata answer has named yet.

use super::topics::{Topics, Unnamed, MAX_LOOKUP_IDS};
use super::Shared;
use crate::protocol::codes;
use crate::stages::Handles;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
use kafka_protocol::protocol::{Decodable, Encodable};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
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
                warn!(error = format!("{e:#}"), "metadata refresh failed");
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
    let body = MetadataRequest::default().with_topics(Some(vec![]));
    let resp = ask_metadata(&shared.session, server, &body).await?;
    for b in &resp.brokers {
        shared
            .brokers
            .advertise(b.node_id.0, b.host.as_str(), b.port)
            .await;
    }
    Ok(resp.brokers.len())
}

/// One Metadata request of the proxy's own, on a connection of its own (TLS if the proxy reaches
/// brokers so), answered within the connect timeout.
async fn ask_metadata(
    handles: &Handles,
    server: &str,
    body: &MetadataRequest,
) -> anyhow::Result<MetadataResponse> {
    ask(handles, server, ApiKey::Metadata, METADATA_VERSION, body).await
}

/// One request of the proxy's own to `server` on a connection of its own, bounded by the connect
/// timeout as a whole.
async fn ask<Req: Encodable, Resp: Decodable>(
    handles: &Handles,
    server: &str,
    key: ApiKey,
    version: i16,
    body: &Req,
) -> anyhow::Result<Resp> {
    let up = &handles.upstream;
    let exchange = async {
        let mut conn = super::own::OwnConnection::open(handles, server).await?;
        conn.call(key, version, body).await
    };
    tokio::time::timeout(up.connect_timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", up.connect_timeout))?
}

/// Names the topic ids in `ids` that `topics` cannot name yet, by asking the cluster (Metadata v12 by
/// topic id, one lookup at a time, the bootstrap servers in turn). Returns the ids left unnamed that
/// were asked about now (or could not be), with why; ids found unknown lately are not asked again, and
/// not returned again.
pub async fn name_topic_ids(handles: &Handles, ids: &[[u8; 16]]) -> Vec<([u8; 16], Unnamed)> {
    let topics: &Topics = &handles.brokers.topics;
    let up = &handles.upstream;
    let now = Instant::now();
    let wanted: Vec<[u8; 16]> = ids
        .iter()
        .filter(|id| topics.name(id).is_none() && !topics.recently_unknown(id, now))
        .copied()
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let (asked, too_many) = wanted.split_at(wanted.len().min(MAX_LOOKUP_IDS));
    let mut unnamed: Vec<([u8; 16], Unnamed)> =
        too_many.iter().map(|id| (*id, Unnamed::TooMany)).collect();
    let _one_at_a_time = topics.lookups.lock().await;
    // Another connection's lookup may have named them meanwhile, or found them unknown (and audited
    // them): waiters behind a failing lookup do not each wait out a timeout of their own.
    let now = Instant::now();
    let asked: Vec<[u8; 16]> = asked
        .iter()
        .filter(|id| topics.name(id).is_none() && !topics.recently_unknown(id, now))
        .copied()
        .collect();
    if asked.is_empty() {
        return unnamed;
    }
    let body = MetadataRequest::default()
        .with_topics(Some(
            asked
                .iter()
                .map(|id| {
                    MetadataRequestTopic::default().with_topic_id(uuid::Uuid::from_bytes(*id))
                })
                .collect(),
        ))
        .with_allow_auto_topic_creation(false);
    let mut last_err = anyhow::anyhow!("no bootstrap servers");
    let mut answer = None;
    for server in &up.bootstrap_servers {
        match ask_metadata(handles, server, &body).await {
            Ok(resp) => {
                answer = Some(resp);
                break;
            }
            Err(e) => last_err = e.context(format!("bootstrap server {server}")),
        }
    }
    let now = Instant::now();
    match answer {
        Some(resp) => {
            for t in &resp.topics {
                match &t.name {
                    Some(name) if t.error_code == 0 => {
                        topics.learn(*t.topic_id.as_bytes(), name.0.as_str())
                    }
                    _ => {}
                }
            }
            for id in asked {
                if topics.name(&id).is_none() {
                    let code = resp
                        .topics
                        .iter()
                        .find(|t| t.topic_id.as_bytes() == &id)
                        .map_or(codes::UNKNOWN_TOPIC_ID, |t| t.error_code);
                    topics.mark_unknown(id, now);
                    unnamed.push((id, Unnamed::UnknownToCluster(code)));
                }
            }
        }
        None => {
            let why = format!("{last_err:#}");
            for id in asked {
                topics.mark_unknown(id, now);
                unnamed.push((id, Unnamed::LookupFailed(why.clone())));
            }
        }
    }
    unnamed
}

/// InitProducerId v4 (Kafka 2.7+): what the proxy asks for an upgraded producer.
const INIT_PRODUCER_ID_VERSION: i16 = 4;

/// A new idempotent producer id from the cluster, for the idempotence upgrade (no transactional id,
/// as an idempotent Java producer asks; the bootstrap servers in turn, each bounded by the connect
/// timeout). Returns the producer id (its epoch is 0).
pub async fn new_producer_id(handles: &Handles) -> anyhow::Result<i64> {
    use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse};
    let up = &handles.upstream;
    let body = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(i32::MAX)
        .with_producer_id((-1).into())
        .with_producer_epoch(-1);
    let mut last_err = anyhow::anyhow!("no bootstrap servers");
    for server in &up.bootstrap_servers {
        let answer = ask::<_, InitProducerIdResponse>(
            handles,
            server,
            ApiKey::InitProducerId,
            INIT_PRODUCER_ID_VERSION,
            &body,
        )
        .await;
        match answer {
            Ok(resp) if resp.error_code == 0 && resp.producer_id.0 >= 0 => {
                return Ok(resp.producer_id.0)
            }
            Ok(resp) => {
                last_err = anyhow::anyhow!(
                    "bootstrap server {server} answered InitProducerId with error {}",
                    resp.error_code
                )
            }
            Err(e) => last_err = e.context(format!("bootstrap server {server}")),
        }
    }
    Err(last_err)
}

//! Broker address rewriting: every host/port the cluster hands out becomes a proxy address, so that no
//! client ever learns (and slips past the proxy to) an upstream broker.
//!
//! | api | versions | fields |
//! |---|---|---|
//! | Metadata | all | brokers[] |
//! | FindCoordinator | 0-3 / 4+ | node_id, host, port / coordinators[] |
//! | DescribeCluster | all | brokers[] |
//! | Produce | 10+ | node_endpoints (tagged) |
//! | Fetch | 16+ | node_endpoints (tagged) |
//! | ShareFetch, ShareAcknowledge | all | node_endpoints |
//!
//! A broker whose node id has no proxy port (outside the configured range or map) is dropped from the
//! answer rather than leaked; the proxy logs it and the client sees that node as unavailable.

use crate::protocol::codec::{decode_response, encode_response, CodecError};
use crate::server::brokers::Brokers;
use bytes::Bytes;
use kafka_protocol::messages::{
    describe_cluster_response, fetch_response, find_coordinator_response, metadata_response,
    produce_response, share_acknowledge_response, share_fetch_response, ApiKey,
    DescribeClusterResponse, FetchResponse, FindCoordinatorResponse, MetadataResponse,
    ProduceResponse, ShareAcknowledgeResponse, ShareFetchResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// A response element that names a broker.
trait Addressed {
    fn node_id(&self) -> i32;
    fn address_mut(&mut self) -> (&mut StrBytes, &mut i32);
}

macro_rules! addressed {
    ($($ty:ty => $id:ident),* $(,)?) => {$(
        impl Addressed for $ty {
            fn node_id(&self) -> i32 { self.$id.0 }
            fn address_mut(&mut self) -> (&mut StrBytes, &mut i32) { (&mut self.host, &mut self.port) }
        }
    )*};
}

addressed!(
    metadata_response::MetadataResponseBroker => node_id,
    find_coordinator_response::Coordinator => node_id,
    describe_cluster_response::DescribeClusterBroker => broker_id,
    produce_response::NodeEndpoint => node_id,
    fetch_response::NodeEndpoint => node_id,
    share_fetch_response::NodeEndpoint => node_id,
    share_acknowledge_response::NodeEndpoint => node_id,
);

/// Rewrites one address in place; returns false if the node has no proxy port (caller drops it).
async fn rewrite_one(node_id: i32, host: &mut StrBytes, port: &mut i32, brokers: &Brokers) -> bool {
    match brokers.advertise(node_id, host.as_str(), *port).await {
        Some(proxy_port) => {
            *host = brokers.advertised_host().clone();
            *port = i32::from(proxy_port);
            true
        }
        None => false,
    }
}

async fn rewrite_list<T: Addressed>(list: &mut Vec<T>, brokers: &Brokers) {
    let mut keep = Vec::with_capacity(list.len());
    for item in list.iter_mut() {
        let id = item.node_id();
        let (host, port) = item.address_mut();
        keep.push(rewrite_one(id, host, port, brokers).await);
    }
    let mut flags = keep.into_iter();
    list.retain(|_| flags.next().unwrap_or(false));
}

async fn rewrite_decoded<T, F>(
    frame: Bytes,
    key: ApiKey,
    version: i16,
    brokers: &Brokers,
    rewrite: F,
) -> Result<Bytes, CodecError>
where
    T: Decodable + Encodable,
    F: AsyncFnOnce(&mut T, &Brokers),
{
    let (header, mut body) = decode_response::<T>(frame, key, version)?;
    rewrite(&mut body, brokers).await;
    encode_response(&header, &body, key, version)
}

/// Rewrites the NodeEndpoints of an already decoded Produce response.
pub async fn rewrite_produce_endpoints(resp: &mut ProduceResponse, brokers: &Brokers) {
    rewrite_list(&mut resp.node_endpoints, brokers).await
}

/// Returns the response to send to the client: the same bytes if nothing names a broker, otherwise a
/// re-encoded frame with proxy addresses.
pub async fn rewrite_response(
    frame: Bytes,
    key: ApiKey,
    version: i16,
    brokers: &Brokers,
) -> Result<Bytes, RewriteError> {
    use super::skim;
    let out = match key {
        ApiKey::Metadata => {
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut MetadataResponse, b| {
                    for t in &r.topics {
                        if let Some(name) = &t.name {
                            b.learn_topic(*t.topic_id.as_bytes(), name.0.as_str());
                        }
                    }
                    rewrite_list(&mut r.brokers, b).await
                },
            )
            .await?
        }
        ApiKey::FindCoordinator => {
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut FindCoordinatorResponse, b| {
                    if version < 4 {
                        // A failed lookup answers node -1, host "", port -1: nothing to rewrite.
                        if r.node_id.0 >= 0
                            && !rewrite_one(r.node_id.0, &mut r.host, &mut r.port, b).await
                        {
                            r.host = StrBytes::default();
                            r.port = -1;
                            r.node_id.0 = -1;
                            r.error_code = 15; // COORDINATOR_NOT_AVAILABLE: the client retries
                        }
                    } else {
                        let mut unmapped = Vec::new();
                        for c in r.coordinators.iter_mut().filter(|c| c.node_id.0 >= 0) {
                            if !rewrite_one(c.node_id.0, &mut c.host, &mut c.port, b).await {
                                unmapped.push(c.key.clone());
                            }
                        }
                        for c in r.coordinators.iter_mut() {
                            if unmapped.contains(&c.key) {
                                c.host = StrBytes::default();
                                c.port = -1;
                                c.node_id.0 = -1;
                                c.error_code = 15;
                            }
                        }
                    }
                },
            )
            .await?
        }
        ApiKey::DescribeCluster => {
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut DescribeClusterResponse, b| rewrite_list(&mut r.brokers, b).await,
            )
            .await?
        }
        ApiKey::Produce if version >= 10 => {
            if !skim::produce_has_node_endpoints(&frame).map_err(RewriteError::Skim)? {
                return Ok(frame);
            }
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut ProduceResponse, b| rewrite_list(&mut r.node_endpoints, b).await,
            )
            .await?
        }
        ApiKey::Fetch if version >= 16 => {
            if !skim::fetch_has_node_endpoints(&frame).map_err(RewriteError::Skim)? {
                return Ok(frame);
            }
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut FetchResponse, b| rewrite_list(&mut r.node_endpoints, b).await,
            )
            .await?
        }
        ApiKey::ShareFetch => {
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut ShareFetchResponse, b| rewrite_list(&mut r.node_endpoints, b).await,
            )
            .await?
        }
        ApiKey::ShareAcknowledge => {
            rewrite_decoded(
                frame,
                key,
                version,
                brokers,
                async |r: &mut ShareAcknowledgeResponse, b| {
                    rewrite_list(&mut r.node_endpoints, b).await
                },
            )
            .await?
        }
        _ => frame,
    };
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("malformed response: {0}")]
    Skim(crate::protocol::wire::WireError),
}

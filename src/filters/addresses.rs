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
        Some((proxy_host, proxy_port)) => {
            *host = proxy_host;
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

/// A coordinator on a node without a proxy port is answered as COORDINATOR_NOT_AVAILABLE (15), which
/// clients retry, rather than handed out with its upstream address.
fn unavailable(node_id: &mut i32, host: &mut StrBytes, port: &mut i32, error_code: &mut i16) {
    *node_id = -1;
    *host = StrBytes::default();
    *port = -1;
    *error_code = 15;
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
    // The answers whose only broker addresses are one list field.
    macro_rules! list {
        ($ty:ty, $field:ident) => {
            rewrite_decoded(frame, key, version, brokers, async |r: &mut $ty, b| {
                rewrite_list(&mut r.$field, b).await
            })
            .await?
        };
    }
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
                            b.topics.learn(*t.topic_id.as_bytes(), name.0.as_str());
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
                            unavailable(
                                &mut r.node_id.0,
                                &mut r.host,
                                &mut r.port,
                                &mut r.error_code,
                            );
                        }
                    } else {
                        for c in r.coordinators.iter_mut().filter(|c| c.node_id.0 >= 0) {
                            if !rewrite_one(c.node_id.0, &mut c.host, &mut c.port, b).await {
                                unavailable(
                                    &mut c.node_id.0,
                                    &mut c.host,
                                    &mut c.port,
                                    &mut c.error_code,
                                );
                            }
                        }
                    }
                },
            )
            .await?
        }
        ApiKey::DescribeCluster => list!(DescribeClusterResponse, brokers),
        ApiKey::Produce if version >= 10 => {
            if !skim::produce_has_node_endpoints(&frame, version).map_err(RewriteError::Skim)? {
                return Ok(frame);
            }
            list!(ProduceResponse, node_endpoints)
        }
        ApiKey::Fetch if version >= 16 => {
            if !skim::fetch_has_node_endpoints(&frame).map_err(RewriteError::Skim)? {
                return Ok(frame);
            }
            list!(FetchResponse, node_endpoints)
        }
        ApiKey::ShareFetch => list!(ShareFetchResponse, node_endpoints),
        ApiKey::ShareAcknowledge => list!(ShareAcknowledgeResponse, node_endpoints),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::protocol::codec::{decode_response, encode_response};
    use kafka_protocol::messages::{BrokerId, ResponseHeader};

    /// Node 7 has no proxy port (the range covers nodes 0-2), so it never binds a listener.
    fn brokers() -> Brokers {
        let config = Config::parse(
            "upstream: {bootstrap_servers: [\"127.0.0.1:1\"]}\nlisten: {bind_host: 127.0.0.1, advertised_host: p, bootstrap_port: 1, broker_ports: {range: {first_port: 2, count: 3}}}\n",
        )
        .unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        Brokers::new(&config.listen, tx)
    }

    #[tokio::test]
    async fn a_node_without_a_proxy_port_is_never_handed_out() {
        let b = brokers();
        for version in [3, 4] {
            let mut resp = FindCoordinatorResponse::default();
            if version < 4 {
                resp = resp
                    .with_node_id(BrokerId(7))
                    .with_host(StrBytes::from_static_str("10.0.0.7"))
                    .with_port(9092);
            } else {
                resp.coordinators = vec![
                    kafka_protocol::messages::find_coordinator_response::Coordinator::default()
                        .with_key(StrBytes::from_static_str("g"))
                        .with_node_id(BrokerId(7))
                        .with_host(StrBytes::from_static_str("10.0.0.7"))
                        .with_port(9092),
                ];
            }
            let frame = encode_response(
                &ResponseHeader::default(),
                &resp,
                ApiKey::FindCoordinator,
                version,
            )
            .unwrap();
            let out = rewrite_response(frame, ApiKey::FindCoordinator, version, &b)
                .await
                .unwrap();
            let (_, r) =
                decode_response::<FindCoordinatorResponse>(out, ApiKey::FindCoordinator, version)
                    .unwrap();
            let (node, host, port, code) = if version < 4 {
                (r.node_id.0, r.host.to_string(), r.port, r.error_code)
            } else {
                let c = &r.coordinators[0];
                (c.node_id.0, c.host.to_string(), c.port, c.error_code)
            };
            assert_eq!(
                (node, host.as_str(), port, code),
                (-1, "", -1, 15),
                "v{version}"
            );
        }
        let resp = MetadataResponse::default().with_brokers(vec![
            metadata_response::MetadataResponseBroker::default()
                .with_node_id(BrokerId(7))
                .with_host(StrBytes::from_static_str("10.0.0.7"))
                .with_port(9092),
        ]);
        let frame =
            encode_response(&ResponseHeader::default(), &resp, ApiKey::Metadata, 12).unwrap();
        let out = rewrite_response(frame, ApiKey::Metadata, 12, &b)
            .await
            .unwrap();
        let (_, r) = decode_response::<MetadataResponse>(out, ApiKey::Metadata, 12).unwrap();
        assert!(r.brokers.is_empty(), "dropped, not leaked");
    }
}

//! Every broker address in an answer rewritten to the proxy's listener for that node, so no client
//! ever connects past the proxy (see [`crate::filters::addresses`]).

use super::{Exchange, ResponseCx, Side};
use crate::filters::addresses::rewrite_response;
use crate::session::close::Close;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;

/// The answers that can carry broker addresses.
pub const INTERESTS: &[(ApiKey, Side)] = &[
    (ApiKey::Metadata, Side::Response),
    (ApiKey::FindCoordinator, Side::Response),
    (ApiKey::DescribeCluster, Side::Response),
    (ApiKey::Produce, Side::Response),
    (ApiKey::Fetch, Side::Response),
    (ApiKey::ShareFetch, Side::Response),
    (ApiKey::ShareAcknowledge, Side::Response),
];

pub async fn on_response(
    cx: &ResponseCx<'_>,
    exchange: &Exchange,
    frame: Bytes,
) -> Result<Bytes, Close> {
    rewrite_response(frame, exchange.key, exchange.version, &cx.handles.brokers)
        .await
        .map_err(|e| Close::MalformedResponse(e.to_string()))
}

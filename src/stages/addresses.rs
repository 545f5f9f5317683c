//! Every broker address in an answer rewritten to the proxy's listener for that node, so no client
//! ever connects past the proxy (see [`crate::filters::addresses`]); Metadata answers also teach topic
//! ids, and a topic re-created under its name drops the old one's producer state.

use super::{Exchange, ResponseCx, Side};
use crate::filters::addresses::rewrite_response;
use crate::session::close::Close;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use tracing::info;

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
    let brokers = &cx.handles.brokers;
    let out = rewrite_response(frame, exchange.key, exchange.version, brokers)
        .await
        .map_err(|e| Close::MalformedResponse(e.to_string()))?;
    if exchange.key == ApiKey::Metadata {
        drop_recreated(cx.handles);
    }
    Ok(out)
}

/// A topic deleted and created again under its name (a Metadata answer or a topic-id lookup showed
/// the name with a new id): the producer state of the old one must never answer for the new one (a
/// retry would get an offset of the deleted topic).
pub fn drop_recreated(handles: &super::Handles) {
    for name in handles.brokers.topics.take_recreated() {
        if handles.guard.store.forget_topic(&name) {
            info!(topic = %name, "topic re-created (new topic id): its old producer state is dropped");
        }
    }
}

//! ApiVersions: the gate every request passes (a version the proxy cannot read is never forwarded), and
//! the clamp of the broker's answer to what the proxy can read (see [`crate::protocol::versions`]).

use super::{Exchange, ResponseCx, Step};
use crate::filters::api_versions::{clamp_api_versions, unsupported_version_answer};
use crate::protocol::header::RequestHead;
use crate::protocol::versions;
use crate::session::close::Close;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;

/// `None`: the proxy reads this version. An ApiVersions version above what it reads is answered as a
/// broker answers a version it does not know (UNSUPPORTED_VERSION with the range to retry with); any
/// other unreadable version closes the connection, as a broker does.
pub fn gate(head: &RequestHead, key: ApiKey, unstable: bool) -> Result<Option<Step>, Close> {
    if versions::accepts(key as i16, head.api_version, unstable) {
        return Ok(None);
    }
    if key == ApiKey::ApiVersions && head.api_version > 0 {
        let answer = unsupported_version_answer(head.correlation_id)
            .map_err(|e| Close::MalformedRequest(e.to_string()))?;
        return Ok(Some(Step::Answer(Some(answer))));
    }
    Err(Close::UnsupportedVersion {
        key,
        version: head.api_version,
    })
}

pub fn on_response(cx: &ResponseCx<'_>, exchange: &Exchange, frame: Bytes) -> Result<Bytes, Close> {
    let unstable = cx.handles.upstream.unstable_api_versions;
    clamp_api_versions(frame, exchange.version, unstable)
        .map_err(|e| Close::MalformedResponse(e.to_string()))
}

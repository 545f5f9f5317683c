//! ApiVersions: intersect what the broker offers with what the proxy can handle (see
//! [`crate::protocol::versions`]). The response header is always v0. A broker that does not know the
//! requested ApiVersions version answers UNSUPPORTED_VERSION (35) with a v0 body listing its ranges.

use crate::protocol::codec::{decode_response, encode_response, CodecError};
use crate::protocol::versions::offered;
use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

const UNSUPPORTED_VERSION: i16 = 35;

pub fn clamp_api_versions(frame: Bytes, version: i16) -> Result<Bytes, CodecError> {
    let key = ApiKey::ApiVersions;
    let max_known = key.valid_versions().max;
    // Decode at the requested version when we know it; otherwise (or when the broker fell back) at v0.
    let attempt = if version <= max_known {
        decode_response::<ApiVersionsResponse>(frame.clone(), key, version)
            .ok()
            .filter(|(_, body)| body.error_code != UNSUPPORTED_VERSION)
            .map(|decoded| (decoded, version))
    } else {
        None
    };
    let ((header, mut body), used) = match attempt {
        Some(found) => found,
        None => (decode_response::<ApiVersionsResponse>(frame, key, 0)?, 0),
    };
    body.api_keys.retain_mut(|entry| {
        match offered(entry.api_key, entry.min_version, entry.max_version) {
            Some((min, max)) => {
                entry.min_version = min;
                entry.max_version = max;
                true
            }
            None => false,
        }
    });
    encode_response(&header, &body, key, used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    use kafka_protocol::messages::ResponseHeader;

    fn response(error: i16) -> ApiVersionsResponse {
        let entry = |k: i16, min: i16, max: i16| {
            ApiVersion::default()
                .with_api_key(k)
                .with_min_version(min)
                .with_max_version(max)
        };
        ApiVersionsResponse::default()
            .with_error_code(error)
            .with_api_keys(vec![
                entry(0, 3, 13),     // Produce: capped to 12
                entry(3, 0, 13),     // Metadata: kept
                entry(8, 2, 10),     // OffsetCommit: passes through as is
                entry(55, 0, 2),     // DescribeQuorum: capped to 1
                entry(31_000, 0, 3), // unknown to the proxy: hidden
            ])
    }

    fn ranges(frame: Bytes, version: i16) -> Vec<(i16, i16, i16)> {
        let (_, body) =
            decode_response::<ApiVersionsResponse>(frame, ApiKey::ApiVersions, version).unwrap();
        body.api_keys
            .iter()
            .map(|e| (e.api_key, e.min_version, e.max_version))
            .collect()
    }

    #[test]
    fn clamps_inspected_keys_and_hides_unknown_ones() {
        for v in [0, 3, 4] {
            let frame = encode_response(
                &ResponseHeader::default(),
                &response(0),
                ApiKey::ApiVersions,
                v,
            )
            .unwrap();
            let out = clamp_api_versions(frame, v).unwrap();
            assert_eq!(
                ranges(out, v),
                vec![(0, 3, 12), (3, 0, 13), (8, 2, 10), (55, 0, 1)],
                "v{v}"
            );
        }
    }

    #[test]
    fn unsupported_version_fallback_is_read_as_v0() {
        let frame = encode_response(
            &ResponseHeader::default(),
            &response(35),
            ApiKey::ApiVersions,
            0,
        )
        .unwrap();
        // the client asked for a version newer than anyone knows; the broker answered v0
        let out = clamp_api_versions(frame, 9).unwrap();
        assert_eq!(ranges(out, 0).len(), 4);
    }
}

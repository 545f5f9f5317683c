//! ApiVersions: intersect what the broker offers with what the proxy can handle (see
//! [`crate::protocol::versions`]). The response header is always v0. A broker that does not know the
//! requested ApiVersions version answers UNSUPPORTED_VERSION (35) with a v0 body listing its ranges.

use crate::protocol::codec::{decode_response, encode_response, CodecError};
use crate::protocol::versions::offered;
use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, ResponseHeader};

use crate::protocol::codes::UNSUPPORTED_VERSION;

/// The proxy's own answer to an ApiVersions request newer than it can read, shaped as a broker's answer
/// to an ApiVersions version it does not know: UNSUPPORTED_VERSION in a v0 body that lists only the
/// ApiVersions range the proxy reads. Clients (the Java client, librdkafka, franz-go) then retry with the
/// highest version listed. The request never reaches the broker, so its answer, in a form the proxy
/// cannot read, never comes back (kafka-clients 4.4 opened with ApiVersions v5 before the codecs knew
/// it; a client newer than the pinned Kafka will do the same with v6).
pub fn unsupported_version_answer(correlation_id: i32) -> Result<Bytes, CodecError> {
    let key = ApiKey::ApiVersions;
    let range = key.valid_versions();
    let body = ApiVersionsResponse::default()
        .with_error_code(UNSUPPORTED_VERSION)
        .with_api_keys(vec![ApiVersion::default()
            .with_api_key(key as i16)
            .with_min_version(range.min)
            .with_max_version(range.max)]);
    encode_response(
        &ResponseHeader::default().with_correlation_id(correlation_id),
        &body,
        key,
        0,
    )
}

/// The broker's ApiVersions answer with every range clamped to what the proxy offers (`unstable`: see
/// [`crate::protocol::versions::inspection`]).
pub fn clamp_api_versions(frame: Bytes, version: i16, unstable: bool) -> Result<Bytes, CodecError> {
    let key = ApiKey::ApiVersions;
    let max_known = key.valid_versions().max;
    // Decode at the requested version (the session only forwards versions the proxy reads); a broker that
    // did not know that version fell back to a v0 body, read as v0.
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
        match offered(
            entry.api_key,
            entry.min_version,
            entry.max_version,
            unstable,
        ) {
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
                entry(0, 0, 13),     // Produce: v0-2 are not in the codecs
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
            let out = clamp_api_versions(frame, v, false).unwrap();
            assert_eq!(
                ranges(out, v),
                vec![(0, 3, 13), (3, 0, 13), (8, 2, 10), (55, 0, 1)],
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
        let out = clamp_api_versions(frame, 9, false).unwrap();
        assert_eq!(ranges(out, 0).len(), 4);
    }

    #[test]
    fn a_version_the_proxy_cannot_read_is_answered_like_a_broker_would() {
        let out = unsupported_version_answer(77).unwrap();
        let (header, body) =
            decode_response::<ApiVersionsResponse>(out, ApiKey::ApiVersions, 0).unwrap();
        assert_eq!(header.correlation_id, 77);
        assert_eq!(body.error_code, UNSUPPORTED_VERSION);
        let max = ApiKey::ApiVersions.valid_versions().max;
        assert_eq!(
            body.api_keys
                .iter()
                .map(|e| (e.api_key, e.min_version, e.max_version))
                .collect::<Vec<_>>(),
            vec![(18, 0, max)]
        );
    }

    /// Kafka 4.4 answers ApiVersions v5 in the flexible form. Read as v0, its first compact-array byte
    /// and the following bytes made a huge INT32 count and aborted the process (memory allocation of
    /// 41875931136 bytes failed). Whatever form arrives, the clamp returns an error or a frame, never more.
    #[test]
    fn a_flexible_answer_read_as_v0_is_an_error_not_an_abort() {
        let v3 = encode_response(
            &ResponseHeader::default(),
            &response(0),
            ApiKey::ApiVersions,
            3,
        )
        .unwrap();
        // a v3+ body read as v0 (the old code path for versions above what the proxy knew)
        let _ = clamp_api_versions(v3.clone(), 0, false);
        let _ = clamp_api_versions(v3, 9, false);
        // a body whose array count claims ~2^31 entries with none present
        let hostile = vec![0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0x7f, 0xff, 0xff, 0xff];
        assert!(clamp_api_versions(Bytes::from(hostile), 0, false).is_err());
    }
}

//! Which api versions the proxy lets clients use.
//!
//! The proxy decodes the responses of a few api keys (those that carry broker addresses, plus ApiVersions
//! itself). For those it must understand every version a client may pick, so the versions the broker
//! advertises are intersected with the versions we can decode. Every other *known* api key passes through
//! untouched in every version the broker offers: its bytes are never decoded. Api keys the proxy does not
//! know at all are removed from ApiVersions answers and refused if sent anyway, because an unknown response
//! might carry a broker address we would fail to rewrite.

use kafka_protocol::messages::ApiKey;

/// What the proxy does with the responses of one api key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspection {
    /// Bytes pass through untouched.
    PassThrough,
    /// The response is decoded (in the versions up to `max`) to rewrite broker addresses or versions.
    Decoded { max: i16 },
}

/// Produce v13 names topics by topic id instead of name (KIP-516 on produce). Until the proxy keeps a
/// topic-id map, Produce is capped at v12 so that every produce request it inspects carries topic names.
pub const PRODUCE_MAX: i16 = 12;

/// DescribeQuorum v2 returns controller listener addresses; the proxy fronts brokers, not controllers, so it
/// offers v0-1, which carry node ids only.
pub const DESCRIBE_QUORUM_MAX: i16 = 1;

pub fn inspection(key: ApiKey) -> Inspection {
    let kp_max = key.valid_versions().max;
    match key {
        ApiKey::Produce => Inspection::Decoded {
            max: PRODUCE_MAX.min(kp_max),
        },
        ApiKey::DescribeQuorum => Inspection::Decoded {
            max: DESCRIBE_QUORUM_MAX.min(kp_max),
        },
        ApiKey::Fetch
        | ApiKey::Metadata
        | ApiKey::FindCoordinator
        | ApiKey::DescribeCluster
        | ApiKey::ShareFetch
        | ApiKey::ShareAcknowledge
        | ApiKey::ApiVersions
        // Producer ids, epochs and coordinator errors are read from these (audit, transaction fence).
        | ApiKey::InitProducerId
        | ApiKey::AddPartitionsToTxn
        | ApiKey::AddOffsetsToTxn
        | ApiKey::EndTxn
        | ApiKey::TxnOffsetCommit => Inspection::Decoded { max: kp_max },
        _ => Inspection::PassThrough,
    }
}

/// The version range the proxy offers for `key`, given what the broker offers; `None` to hide the key.
pub fn offered(api_key: i16, broker_min: i16, broker_max: i16) -> Option<(i16, i16)> {
    let key = ApiKey::try_from(api_key).ok()?;
    let (min, max) = match inspection(key) {
        Inspection::PassThrough => (broker_min, broker_max),
        Inspection::Decoded { max } => {
            let kp = key.valid_versions();
            (broker_min.max(kp.min), broker_max.min(max))
        }
    };
    (min <= max).then_some((min, max))
}

/// Whether the proxy can handle a request of this key and version. A key whose answers the proxy decodes
/// is accepted only in the versions it decodes: a newer one is never forwarded, since its answer could not
/// be read safely (the session answers a newer ApiVersions itself, as a broker would; see
/// [`crate::filters::api_versions::unsupported_version_answer`]).
pub fn accepts(key: ApiKey, version: i16) -> bool {
    match inspection(key) {
        Inspection::PassThrough => version >= 0,
        Inspection::Decoded { max } => version >= key.valid_versions().min && version <= max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails loudly when the kafka-protocol crate moves: every decoded api key's supported range is pinned
    /// here, so an upgrade forces a look at what the new versions carry (new address fields? topic ids?).
    #[test]
    fn kafka_protocol_ranges_are_the_ones_we_reviewed() {
        let reviewed = [
            (ApiKey::Produce, 3, 13),
            (ApiKey::Fetch, 4, 18),
            (ApiKey::Metadata, 0, 13),
            (ApiKey::FindCoordinator, 0, 6),
            (ApiKey::DescribeCluster, 0, 2),
            (ApiKey::DescribeQuorum, 0, 2),
            (ApiKey::ShareFetch, 1, 1),
            (ApiKey::ShareAcknowledge, 1, 1),
            (ApiKey::ApiVersions, 0, 4),
            (ApiKey::InitProducerId, 0, 6),
            (ApiKey::AddPartitionsToTxn, 0, 5),
            (ApiKey::AddOffsetsToTxn, 0, 4),
            (ApiKey::EndTxn, 0, 5),
            (ApiKey::TxnOffsetCommit, 0, 5),
        ];
        for (key, min, max) in reviewed {
            let r = key.valid_versions();
            assert_eq!(
                (r.min, r.max),
                (min, max),
                "{key:?} moved in kafka-protocol"
            );
        }
    }

    #[test]
    fn offered_ranges() {
        assert_eq!(offered(0, 3, 13), Some((3, 12)));
        assert_eq!(offered(55, 0, 2), Some((0, 1)));
        // pass-through keys keep the broker's range, even beyond what kafka-protocol knows
        assert_eq!(offered(ApiKey::OffsetCommit as i16, 2, 99), Some((2, 99)));
        // unknown keys are hidden
        assert_eq!(offered(31_000, 0, 1), None);
        // empty intersection is hidden
        assert_eq!(offered(3, 14, 20), None);
    }

    #[test]
    fn accepts_only_decodable_versions_of_inspected_keys() {
        assert!(accepts(ApiKey::Produce, 12));
        assert!(!accepts(ApiKey::Produce, 13));
        assert!(accepts(ApiKey::ApiVersions, 4));
        assert!(!accepts(ApiKey::ApiVersions, 5));
        assert!(accepts(ApiKey::OffsetCommit, 42));
        assert!(!accepts(ApiKey::Metadata, -1));
    }
}

//! Which api keys and versions the proxy lets clients use, decided by the project's own table of
//! Apache Kafka's api keys ([`super::api_table`], generated from the pinned Kafka's message definitions by
//! `scripts/protocol-table`), not by what the decoding crate happens to know.
//!
//! - A key whose answers the proxy decodes (broker addresses to rewrite, producer state to learn) is
//!   offered only in the versions the proxy decodes, intersected with the broker's.
//! - Every other key that brokers serve passes through untouched in every version the broker offers
//!   (its bytes are never decoded), including versions newer than the pinned Kafka defines.
//! - A key whose answers carry a broker address the proxy does not rewrite, a controller-only key, and a
//!   key the pinned Kafka does not define are hidden from ApiVersions answers and refused if sent
//!   anyway: an unknown answer might carry a broker address the proxy would fail to rewrite.

use super::api_table::APIS;
use kafka_protocol::messages::ApiKey;

/// One api key as the pinned Kafka defines it.
#[derive(Debug)]
pub struct Api {
    pub key: i16,
    pub name: &'static str,
    /// The versions a broker of the pinned release can offer (an unstable latest version left out).
    pub min: i16,
    pub max: i16,
    /// Brokers serve it (the others are controller-only).
    pub broker: bool,
    pub addresses: Addresses,
}

/// Whether an api key's answers carry network addresses (places found by shape, classified by review).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    None,
    /// A broker's address, which the proxy must rewrite (the places, as paths in the answer).
    Broker(&'static str),
    /// An address that is not one of the brokers the proxy fronts (the places, and why).
    NotBroker(&'static str),
}

/// The pinned Kafka's definition of `key`, if it has one.
pub fn api(key: i16) -> Option<&'static Api> {
    APIS.binary_search_by_key(&key, |a| a.key)
        .ok()
        .map(|i| &APIS[i])
}

/// What the proxy does with the responses of one api key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspection {
    /// Bytes pass through untouched, in every version the broker offers.
    PassThrough,
    /// Only the versions `min..=max` are let through: the proxy decodes them (or a newer version would
    /// carry something it has to rewrite).
    Limited { min: i16, max: i16 },
}

/// The keys whose answers (or requests) the proxy decodes: broker addresses, producer ids and epochs,
/// coordinator errors, ApiVersions itself.
const DECODED: &[ApiKey] = &[
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::Metadata,
    ApiKey::FindCoordinator,
    ApiKey::DescribeCluster,
    ApiKey::ShareFetch,
    ApiKey::ShareAcknowledge,
    ApiKey::ApiVersions,
    ApiKey::InitProducerId,
    ApiKey::AddPartitionsToTxn,
    ApiKey::AddOffsetsToTxn,
    ApiKey::EndTxn,
    ApiKey::TxnOffsetCommit,
];

/// DescribeQuorum v2 returns controller listener addresses; the proxy fronts brokers, not controllers, so it
/// offers v0-1, which carry node ids only.
pub const DESCRIBE_QUORUM_MAX: i16 = 1;

/// Unstable versions of the pinned release the proxy can read, offered only when the operator asks
/// (`upstream.unstable_api_versions`): InitProducerId v6 (KIP-939, two-phase commit) adds two flags to
/// the request, which the proxy reads by hand, and two fields to the answer, which the codecs read.
const UNSTABLE: &[(ApiKey, i16)] = &[(ApiKey::InitProducerId, 6)];

/// Versions held below what the proxy could decode, and why (see the constants).
const CAPS: &[(ApiKey, i16)] = &[(ApiKey::DescribeQuorum, DESCRIBE_QUORUM_MAX)];

/// How the proxy treats `key`; `None`: hidden and refused. `unstable`: also the latest versions the
/// pinned release marks unstable, where the codecs read them (`upstream.unstable_api_versions`).
pub fn inspection(key: i16, unstable: bool) -> Option<Inspection> {
    let api = api(key).filter(|a| a.broker)?;
    let known = ApiKey::try_from(key).ok();
    let cap = known.and_then(|k| CAPS.iter().find(|(c, _)| *c == k).map(|(_, max)| *max));
    let decoded = known.filter(|k| DECODED.contains(k));
    match (decoded, api.addresses, cap) {
        // Never beyond what the pinned Kafka defines as stable, even where the codecs know more.
        (Some(k), _, cap) => Some(Inspection::Limited {
            min: k.valid_versions().min.max(api.min),
            max: k
                .valid_versions()
                .max
                .min(if unstable {
                    UNSTABLE
                        .iter()
                        .find(|(u, _)| *u == k)
                        .map_or(api.max, |u| u.1)
                } else {
                    api.max
                })
                .min(cap.unwrap_or(i16::MAX)),
        }),
        (None, Addresses::Broker(_), _) => None,
        (None, _, Some(max)) => Some(Inspection::Limited { min: api.min, max }),
        (None, _, None) => Some(Inspection::PassThrough),
    }
}

/// The version range the proxy offers for `key`, given what the broker offers; `None` to hide the key.
pub fn offered(
    api_key: i16,
    broker_min: i16,
    broker_max: i16,
    unstable: bool,
) -> Option<(i16, i16)> {
    let (min, max) = match inspection(api_key, unstable)? {
        Inspection::PassThrough => (broker_min, broker_max),
        Inspection::Limited { min, max } => (broker_min.max(min), broker_max.min(max)),
    };
    (min <= max).then_some((min, max))
}

/// Whether the proxy can handle a request of this key and version. A key whose answers the proxy decodes
/// is accepted only in the versions it decodes: a newer one is never forwarded, since its answer could not
/// be read safely (the session answers a newer ApiVersions itself, as a broker would; see
/// [`crate::filters::api_versions::unsupported_version_answer`]).
pub fn accepts(key: i16, version: i16, unstable: bool) -> bool {
    match inspection(key, unstable) {
        None => false,
        Some(Inspection::PassThrough) => version >= 0,
        Some(Inspection::Limited { min, max }) => (min..=max).contains(&version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails loudly when the decoding crate moves: every decoded api key's range is pinned here, so a
    /// regeneration forces a look at what the new versions carry (new address fields? topic ids?).
    #[test]
    fn decoded_ranges_are_the_ones_we_reviewed() {
        let reviewed = [
            (ApiKey::Produce, 3, 13),
            (ApiKey::Fetch, 4, 18),
            (ApiKey::Metadata, 0, 13),
            (ApiKey::FindCoordinator, 0, 6),
            (ApiKey::DescribeCluster, 0, 2),
            (ApiKey::DescribeQuorum, 0, 2),
            (ApiKey::ShareFetch, 1, 2),
            (ApiKey::ShareAcknowledge, 1, 2),
            (ApiKey::ApiVersions, 0, 5),
            // v6 (KIP-939) is unstable in Kafka 4.4: the table holds it back, its codec stops at v5.
            (ApiKey::InitProducerId, 0, 6),
            (ApiKey::AddPartitionsToTxn, 0, 5),
            (ApiKey::AddOffsetsToTxn, 0, 4),
            (ApiKey::EndTxn, 0, 5),
            (ApiKey::TxnOffsetCommit, 0, 6),
        ];
        for (key, min, max) in reviewed {
            let r = key.valid_versions();
            assert_eq!((r.min, r.max), (min, max), "{key:?} moved in the codecs");
        }
    }

    /// The codecs and the table come from the same Kafka release: every key brokers serve is one the
    /// codecs know, in every version the table lists (so a key the table passes is never closed as
    /// unknown). The codecs' ApiKey ranges include an unstable latest version the table leaves out.
    #[test]
    fn the_codecs_know_every_key_of_the_table() {
        for api in APIS.iter().filter(|a| a.broker) {
            let key = ApiKey::try_from(api.key)
                .unwrap_or_else(|_| panic!("{} ({}) unknown to the codecs", api.name, api.key));
            let r = key.valid_versions();
            assert!(r.min <= api.min && api.max <= r.max, "{}", api.name);
        }
        assert!(APIS.windows(2).all(|w| w[0].key < w[1].key), "sorted");
    }

    /// Every key whose answers the proxy decodes is among the fuzz targets' inspected keys, so a decoder
    /// added here is fuzzed too.
    #[test]
    fn every_decoded_key_is_fuzzed() {
        for key in DECODED {
            assert!(
                crate::fuzzing::INSPECTED_RESPONSES.contains(key),
                "{key:?} is decoded but not in fuzzing::INSPECTED_RESPONSES"
            );
        }
    }

    /// Every answer that carries a broker address is decoded (so rewritten) or hidden.
    #[test]
    fn every_broker_address_is_decoded_or_hidden() {
        for api in APIS {
            if let Addresses::Broker(places) = api.addresses {
                let decoded = ApiKey::try_from(api.key).is_ok_and(|k| DECODED.contains(&k));
                assert!(
                    decoded || inspection(api.key, false).is_none(),
                    "{} carries {places} but passes",
                    api.name
                );
            }
        }
    }

    #[test]
    fn offered_ranges() {
        // Produce v13 names topics by id: the proxy names them (see stages::produce::topic_names)
        assert_eq!(offered(0, 3, 13, false), Some((3, 13)));
        // Produce v0-2 (message format v0/v1, which brokers still offer) are not in the codecs
        assert_eq!(offered(0, 0, 13, false), Some((3, 13)));
        assert_eq!(offered(55, 0, 2, false), Some((0, 1)));
        // pass-through keys keep the broker's range, even beyond what the pinned Kafka defines
        assert_eq!(
            offered(ApiKey::OffsetCommit as i16, 2, 99, false),
            Some((2, 99))
        );
        // Kafka Streams' group protocol: an application endpoint, not a broker's, so it passes
        assert_eq!(offered(88, 0, 1, false), Some((0, 1)));
        assert_eq!(offered(89, 0, 1, false), Some((0, 1)));
        // keys the pinned Kafka does not define, and controller-only keys, are hidden
        assert_eq!(offered(31_000, 0, 1, false), None);
        assert_eq!(offered(95, 0, 1, false), None);
        assert_eq!(offered(ApiKey::Vote as i16, 0, 2, false), None);
        // empty intersection is hidden
        assert_eq!(offered(3, 14, 20, false), None);
        // share groups in every version the proxy decodes
        assert_eq!(offered(78, 1, 2, false), Some((1, 2)));
        // TxnOffsetCommit v6 names topics by id, which the transaction fence reads
        assert_eq!(offered(28, 0, 6, false), Some((0, 6)));
    }

    #[test]
    fn accepts_only_decodable_versions_of_inspected_keys() {
        assert!(accepts(ApiKey::Produce as i16, 13, false));
        assert!(!accepts(ApiKey::Produce as i16, 14, false));
        assert!(!accepts(ApiKey::Produce as i16, 2, false));
        assert!(accepts(ApiKey::ApiVersions as i16, 5, false));
        assert!(!accepts(ApiKey::ApiVersions as i16, 6, false));
        assert!(accepts(ApiKey::OffsetCommit as i16, 42, false));
        assert!(!accepts(ApiKey::Metadata as i16, -1, false));
        assert!(accepts(88, 1, false));
        assert!(!accepts(95, 0, false));
        assert!(accepts(ApiKey::InitProducerId as i16, 5, false));
        assert!(
            !accepts(ApiKey::InitProducerId as i16, 6, false),
            "unstable in the pinned Kafka"
        );
        // ... unless the operator asks for the unstable versions the proxy can read
        assert!(accepts(ApiKey::InitProducerId as i16, 6, true));
        assert!(!accepts(ApiKey::InitProducerId as i16, 7, true));
        assert_eq!(offered(22, 0, 6, true), Some((0, 6)));
        assert_eq!(offered(22, 0, 6, false), Some((0, 5)));
        assert_eq!(offered(0, 3, 14, true), Some((3, 13)), "nothing else moves");
    }
}

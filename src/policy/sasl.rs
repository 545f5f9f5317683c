//! The SASL principal of a connection, for rules that match `principals`.
//!
//! The proxy does not authenticate anyone: the broker does. It reads the user name the client offers
//! in its first SaslAuthenticate token and believes it only once the broker answers that exchange with
//! success. Mechanisms: PLAIN (`authzid NUL authcid NUL password`, principal `User:authcid`) and
//! SCRAM-SHA-256/512 (client-first message `n,,n=user,r=nonce`, principal `User:user`), which is how
//! Kafka's default principal builder names them. Other mechanisms (GSSAPI, OAUTHBEARER) leave the
//! principal unknown, so rules with `principals` never match those connections.

use crate::protocol::frame::SIZE_PREFIX;
use crate::protocol::header::RequestHead;
use crate::protocol::wire::Reader;

/// The user name offered in a SaslAuthenticate request's auth bytes, if the mechanism is one we read.
pub fn offered_principal(frame: &[u8], head: &RequestHead, mechanism: &str) -> Option<String> {
    let mut r = Reader::at(frame, head.body_offset?);
    let token = if head.api_version >= 2 {
        r.compact_nullable_bytes().ok()??
    } else {
        r.nullable_bytes().ok()??
    };
    principal_from_token(mechanism, token)
}

pub fn principal_from_token(mechanism: &str, token: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(token).ok()?;
    let user = match mechanism {
        "PLAIN" => {
            let mut parts = text.split('\0');
            let authzid = parts.next()?;
            let authcid = parts.next()?;
            parts.next()?; // a password must follow
            if !authzid.is_empty() && authzid != authcid {
                return None; // the broker refuses this; no principal
            }
            authcid.to_string()
        }
        "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
            // gs2 header ("n,," or "n,a=authzid,"), then "n=user,r=nonce".
            let mut fields = text.splitn(3, ',');
            fields.next()?;
            fields.next()?;
            let bare = fields.next()?;
            let user = bare.split(',').find_map(|f| f.strip_prefix("n="))?;
            user.replace("=2C", ",").replace("=3D", "=")
        }
        _ => return None,
    };
    (!user.is_empty()).then(|| format!("User:{user}"))
}

/// The mechanism a SaslHandshake request names.
pub fn handshake_mechanism(frame: &[u8], head: &RequestHead) -> Option<String> {
    let mut r = Reader::at(frame, head.body_offset?);
    let m = r.nullable_string().ok()??;
    std::str::from_utf8(m).ok().map(str::to_string)
}

/// The error code of a SaslAuthenticate response (header v0 before v2, v1 with tagged fields after).
pub fn authenticate_error(frame: &[u8], version: i16) -> Option<i16> {
    let mut r = Reader::at(frame, SIZE_PREFIX);
    r.i32().ok()?;
    if version >= 2 {
        r.skip_tagged_fields(u32::MAX).ok()?;
    }
    r.i16().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_scram_tokens_name_the_user() {
        assert_eq!(
            principal_from_token("PLAIN", b"\0alice\0secret"),
            Some("User:alice".into())
        );
        assert_eq!(
            principal_from_token("PLAIN", b"alice\0alice\0secret"),
            Some("User:alice".into())
        );
        assert_eq!(principal_from_token("PLAIN", b"bob\0alice\0secret"), None);
        assert_eq!(principal_from_token("PLAIN", b"\0alice"), None);
        assert_eq!(
            principal_from_token("SCRAM-SHA-256", b"n,,n=al=2Cice,r=abc"),
            Some("User:al,ice".into())
        );
        assert_eq!(
            principal_from_token("SCRAM-SHA-512", b"n,a=x,n=bob,r=1"),
            Some("User:bob".into())
        );
        assert_eq!(principal_from_token("GSSAPI", b"\0alice\0pw"), None);
        assert_eq!(principal_from_token("PLAIN", &[0xff, 0, 1]), None);
    }
}

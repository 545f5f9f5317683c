//! Who the client is: its client id (from the request header) and, for SASL PLAIN and SCRAM, the
//! principal the broker accepted. Policies match on both; audit lines carry the client id.

use super::{Exchange, Request, RequestCx, ResponseCx, Step};
use crate::policy::{sasl, ClientFacts};
use crate::protocol::header::RequestHead;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};

/// A connection's client facts, shared by its request and response pumps.
#[derive(Default)]
pub struct Identity {
    pub client_id: OnceLock<String>,
    /// The SASL principal, once the broker accepted the exchange that named it.
    pub principal: OnceLock<String>,
    /// A principal offered in a SaslAuthenticate request, and how many successful rounds confirm it.
    sasl_pending: Mutex<Option<(String, u8)>>,
}

impl Identity {
    /// Changes whenever something rules can match on is learned.
    pub fn facts_version(&self) -> u32 {
        u32::from(self.client_id.get().is_some()) + 2 * u32::from(self.principal.get().is_some())
    }

    pub fn facts(&self, address: IpAddr) -> ClientFacts<'_> {
        ClientFacts {
            client_id: self.client_id.get().map(String::as_str),
            address,
            principal: self.principal.get().map(String::as_str),
        }
    }

    /// The first request that names a client id sets it for the connection.
    pub fn learn_client_id(&self, frame: &[u8], head: &RequestHead) {
        if self.client_id.get().is_none() {
            if let Some(id) = head.client_id(frame) {
                let _ = self.client_id.set(id.to_string());
            }
        }
    }

    /// A SaslAuthenticate request: remember the user name it offers (first round only).
    fn on_sasl_request(&self, frame: &[u8], head: &RequestHead, mechanism: Option<&str>) {
        let Some(mechanism) = mechanism else { return };
        let Ok(mut pending) = self.sasl_pending.lock() else {
            return;
        };
        if pending.is_none() && self.principal.get().is_none() {
            if let Some(p) = sasl::offered_principal(frame, head, mechanism) {
                let rounds = if mechanism.starts_with("SCRAM") { 2 } else { 1 };
                *pending = Some((p, rounds));
            }
        }
    }

    /// A SaslAuthenticate answer: success counts a round; the last round confirms the principal.
    fn on_sasl_response(&self, frame: &[u8], version: i16) {
        let Ok(mut pending) = self.sasl_pending.lock() else {
            return;
        };
        match sasl::authenticate_error(frame, version) {
            Some(0) => {
                if let Some((p, rounds)) = pending.as_mut() {
                    *rounds -= 1;
                    if *rounds == 0 {
                        let _ = self.principal.set(std::mem::take(p));
                        *pending = None;
                    }
                }
            }
            _ => *pending = None,
        }
    }
}

/// The SASL mechanism the client chose (SaslHandshake), for reading its tokens.
#[derive(Default)]
pub struct ConnState {
    mechanism: Option<String>,
}

/// A SaslAuthenticate request went upstream: its answer may confirm the principal.
pub struct Memo;

pub fn on_request(cx: &mut RequestCx<'_, '_>, req: &mut Request) -> Step {
    match req.key {
        ApiKey::SaslHandshake => {
            cx.state.identity.mechanism = sasl::handshake_mechanism(&req.frame, &req.head);
        }
        ApiKey::SaslAuthenticate => {
            let mechanism = cx.state.identity.mechanism.as_deref();
            cx.identity
                .on_sasl_request(&req.frame, &req.head, mechanism);
            req.memo = super::Memo::Identity(Memo);
        }
        _ => {}
    }
    Step::Continue
}

pub fn on_response(cx: &ResponseCx<'_>, exchange: &mut Exchange, frame: Bytes) -> Bytes {
    if super::take_memo!(&mut exchange.memo, Identity).is_some() {
        cx.identity.on_sasl_response(&frame, exchange.version);
    }
    frame
}

//! Who the client is: its client id (from the request header) and, for SASL PLAIN and SCRAM, the
//! principal the broker accepted. Policies match on both; audit lines carry the client id.

use super::{Exchange, Request, RequestCx, ResponseCx, Step};
use crate::client::Client;
use crate::policy::sasl;
use crate::protocol::header::RequestHead;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;

/// The first request that names a client id sets it for the connection.
pub fn learn_client_id(client: &Client, frame: &[u8], head: &RequestHead) {
    if client.client_id().is_none() {
        if let Some(id) = head.client_id(frame) {
            client.learn_client_id(id);
        }
    }
}

/// A SaslAuthenticate request: remember the user name it offers (first round only).
fn on_sasl_request(client: &Client, frame: &[u8], head: &RequestHead, mechanism: Option<&str>) {
    let Some(mechanism) = mechanism else { return };
    let Ok(mut pending) = client.sasl_offered.lock() else {
        return;
    };
    if pending.is_none() && client.principal().is_none() {
        if let Some(p) = sasl::offered_principal(frame, head, mechanism) {
            let rounds = if mechanism.starts_with("SCRAM") { 2 } else { 1 };
            *pending = Some((p, rounds));
        }
    }
}

/// A SaslAuthenticate answer: success counts a round; the last round confirms the principal.
fn on_sasl_response(client: &Client, frame: &[u8], version: i16) {
    let Ok(mut pending) = client.sasl_offered.lock() else {
        return;
    };
    match sasl::authenticate_error(frame, version) {
        Some(0) => {
            if let Some((p, rounds)) = pending.as_mut() {
                *rounds -= 1;
                if *rounds == 0 {
                    client.confirm_principal(std::mem::take(p));
                    *pending = None;
                }
            }
        }
        _ => *pending = None,
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
            on_sasl_request(cx.client, &req.frame, &req.head, mechanism);
            req.memo = super::Memo::Identity(Memo);
        }
        _ => {}
    }
    Step::Continue
}

pub fn on_response(cx: &ResponseCx<'_>, exchange: &mut Exchange, frame: Bytes) -> Bytes {
    if super::take_memo!(&mut exchange.memo, Identity).is_some() {
        on_sasl_response(cx.client, &frame, exchange.version);
    }
    frame
}

//! The proxy's own connections to brokers (its metadata refresh and topic-id lookups): TLS when the
//! proxy reaches brokers so, then a SASL login when `upstream.sasl` is set, then one request at a time,
//! each bounded by the frame limit. Clients' sessions never use these.

use super::sasl::{self, Exchange};
use crate::protocol::codec::decode_response;
use crate::protocol::frame::FrameCodec;
use crate::stages::Handles;
use crate::tls::Stream;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use kafka_protocol::messages::{
    ApiKey, RequestHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

/// SaslHandshake v1: the tokens that follow travel in SaslAuthenticate requests (every broker since 1.0).
const HANDSHAKE_VERSION: i16 = 1;
/// SaslAuthenticate v1 (Kafka 2.2+, KIP-368's session lifetime; our connections are short-lived).
const AUTHENTICATE_VERSION: i16 = 1;

pub struct OwnConnection {
    frames: FramedRead<Stream, FrameCodec>,
    next_correlation_id: i32,
}

impl OwnConnection {
    /// Connects to `server` (TLS as configured) and logs in (SASL as configured). The caller bounds it
    /// in time.
    pub async fn open(handles: &Handles, server: &str) -> anyhow::Result<OwnConnection> {
        let stream = handles
            .tls
            .connect(server, handles.upstream.connect_timeout)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut conn = OwnConnection {
            frames: FramedRead::new(stream, FrameCodec::new(handles.limits.max_frame_bytes, 4)),
            next_correlation_id: 1,
        };
        if let Some(creds) = &handles.own_sasl {
            conn.log_in(&creds.current()).await.map_err(|e| {
                anyhow::anyhow!("SASL login as '{}' failed: {e:#}", creds.current().username)
            })?;
        }
        Ok(conn)
    }

    /// One request and its answer.
    pub async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body: &Req,
    ) -> anyhow::Result<Resp> {
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.next_correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("kafka-eos-proxy")));
        self.next_correlation_id += 1;
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header.encode(&mut buf, key.request_header_version(version))?;
        body.encode(&mut buf, version)?;
        let size = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&size.to_be_bytes());
        let stream = self.frames.get_mut();
        stream.write_all(&buf).await?;
        stream.flush().await?;
        let frame = self
            .frames
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("closed before answering"))??;
        let (_, resp) = decode_response::<Resp>(frame.freeze(), key, version)?;
        Ok(resp)
    }

    async fn authenticate(&mut self, token: Vec<u8>) -> anyhow::Result<Bytes> {
        let req = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token));
        let resp: SaslAuthenticateResponse = self
            .call(ApiKey::SaslAuthenticate, AUTHENTICATE_VERSION, &req)
            .await?;
        if resp.error_code != 0 {
            anyhow::bail!(
                "error {}: {}",
                resp.error_code,
                resp.error_message.as_deref().unwrap_or("")
            );
        }
        Ok(resp.auth_bytes)
    }

    async fn log_in(&mut self, creds: &sasl::Credentials) -> anyhow::Result<()> {
        let req = SaslHandshakeRequest::default()
            .with_mechanism(StrBytes::from_static_str(creds.mechanism.name()));
        let resp: SaslHandshakeResponse = self
            .call(ApiKey::SaslHandshake, HANDSHAKE_VERSION, &req)
            .await?;
        if resp.error_code != 0 {
            let offered: Vec<&str> = resp.mechanisms.iter().map(|m| m.as_str()).collect();
            anyhow::bail!(
                "the broker does not take {} (error {}; it offers {offered:?})",
                creds.mechanism.name(),
                resp.error_code
            );
        }
        let nonce = sasl::nonce().map_err(|e| anyhow::anyhow!(e))?;
        let (exchange, first) = Exchange::start(creds, &nonce);
        let challenge = self.authenticate(first).await?;
        if let Exchange::Scram(mut scram) = exchange {
            let final_message = scram.answer(&challenge).map_err(|e| anyhow::anyhow!(e))?;
            let server_final = self.authenticate(final_message).await?;
            scram
                .finish(&server_final)
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(())
    }
}

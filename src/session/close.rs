//! Why a session ended. `kind()` is a bounded label for logs and metrics.

use crate::protocol::frame::FrameError;
use kafka_protocol::messages::ApiKey;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Close {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("upstream closed the connection")]
    UpstreamClosed,
    #[error("proxy shutting down")]
    Shutdown,
    #[error("nothing moved in either direction for {0:?}")]
    Idle(Duration),
    #[error("bad frame from client: {0}")]
    ClientFrame(FrameError),
    #[error("bad frame from upstream: {0}")]
    UpstreamFrame(FrameError),
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    #[error("malformed response from upstream: {0}")]
    MalformedResponse(String),
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    #[error("{key:?} v{version} is not supported by the proxy")]
    UnsupportedVersion { key: ApiKey, version: i16 },
    #[error("upstream answered correlation id {got}, expected {expected}")]
    CorrelationMismatch { expected: i32, got: i32 },
    #[error("upstream sent a response nobody asked for")]
    UnexpectedResponse,
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("upstream i/o: {0}")]
    UpstreamIo(std::io::Error),
    /// The peer left what the proxy wrote unread for longer than `limits.write_timeout_ms`.
    #[error("{peer} read nothing the proxy wrote for {after:?}")]
    WriteTimeout { peer: &'static str, after: Duration },
    #[error("response side ended")]
    ResponseSideClosed,
    /// An acks=0 produce request a policy refused, or an upgraded one the broker refused: there is no
    /// response to carry the error, so (like the broker) the proxy closes the connection.
    #[error("acks=0 produce refused: {0}")]
    AcksZeroRefused(String),
}

impl Close {
    /// A read error from the client: an I/O failure (a reset, say) is the client's connection going
    /// away, not a bad frame.
    pub fn client_read(e: FrameError) -> Close {
        match e {
            FrameError::Io(io) => Close::ClientIo(io),
            e => Close::ClientFrame(e),
        }
    }

    /// A read error from the broker, likewise.
    pub fn upstream_read(e: FrameError) -> Close {
        match e {
            FrameError::Io(io) => Close::UpstreamIo(io),
            e => Close::UpstreamFrame(e),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Close::ClientClosed => "client_closed",
            Close::UpstreamClosed => "upstream_closed",
            Close::Shutdown => "shutdown",
            Close::Idle(_) => "idle",
            Close::ClientFrame(_) => "bad_frame",
            Close::UpstreamFrame(_) => "upstream_bad_frame",
            Close::MalformedRequest(_) => "malformed_request",
            Close::MalformedResponse(_) => "malformed_response",
            Close::UnknownApiKey(_) => "unknown_api_key",
            Close::UnsupportedVersion { .. } => "unsupported_version",
            Close::CorrelationMismatch { .. } => "correlation_mismatch",
            Close::UnexpectedResponse => "unexpected_response",
            Close::ClientIo(_) => "client_io",
            Close::UpstreamIo(_) => "upstream_io",
            Close::WriteTimeout { .. } => "write_timeout",
            Close::ResponseSideClosed => "response_side_closed",
            Close::AcksZeroRefused(_) => "acks0_refused",
        }
    }

    /// Closes caused by a peer breaking the protocol (worth a warning with the peer's address).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            Close::ClientFrame(_)
                | Close::UpstreamFrame(_)
                | Close::MalformedRequest(_)
                | Close::MalformedResponse(_)
                | Close::UnknownApiKey(_)
                | Close::UnsupportedVersion { .. }
                | Close::CorrelationMismatch { .. }
                | Close::UnexpectedResponse
                | Close::AcksZeroRefused(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_io_not_a_bad_frame() {
        let reset = || FrameError::Io(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(Close::client_read(reset()).kind(), "client_io");
        assert_eq!(Close::upstream_read(reset()).kind(), "upstream_io");
        assert_eq!(
            Close::client_read(FrameError::Negative(-5)).kind(),
            "bad_frame"
        );
        assert!(!Close::client_read(reset()).is_protocol_violation());
    }
}

//! Arbitrary client bytes through what the proxy does with them before forwarding: frame splitting,
//! header peek, produce acks peek. None of it may panic.
#![no_main]

use bytes::BytesMut;
use kafka_eos_proxy::protocol::frame::FrameCodec;
use kafka_eos_proxy::protocol::header::{peek_request, produce_acks};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(1 << 20, 8);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if let Ok(head) = peek_request(&frame) {
            let _ = head.client_id(&frame);
            if head.api_key == 0 {
                let _ = produce_acks(&frame, &head);
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});

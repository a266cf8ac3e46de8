//! Feeds arbitrary bytes to the frame decoder and everything it yields to
//! the method and content-header decoders: no input may panic, and the
//! decoder must never hold more than one frame-max of unconsumed input
//! while claiming to need more bytes.
#![no_main]

use bytes::BytesMut;
use handler_amqp::codec::{decode_frame, ContentHeader, Method, FRAME_HEADER, FRAME_METHOD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        match decode_frame(&mut buf, 4096) {
            Ok(Some(f)) => {
                if f.kind == FRAME_METHOD {
                    if let Ok(m) = Method::decode(f.payload.clone()) {
                        // Re-encoding is stable (bytes, since NaN != NaN).
                        let mut a = BytesMut::new();
                        m.encode(&mut a);
                        let again = Method::decode(a.clone().freeze()).expect("re-decodes");
                        let mut b = BytesMut::new();
                        again.encode(&mut b);
                        assert_eq!(a, b);
                    }
                } else if f.kind == FRAME_HEADER {
                    let _ = ContentHeader::decode(f.payload);
                }
            }
            Ok(None) => {
                assert!(buf.len() < 4096 + 8);
                break;
            }
            Err(_) => break,
        }
    }
});

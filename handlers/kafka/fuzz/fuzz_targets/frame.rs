//! The frame layer and request decoding: any byte stream, fed in arbitrary
//! chunks, must yield frames, "need more bytes" or an error, never a panic
//! or an allocation beyond the configured maximum.
#![no_main]

use bytes::BytesMut;
use handler_kafka::codec::{decode_frame, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::new();
    // The first byte picks a chunk size so partial reads are exercised.
    let chunk = data.first().map_or(1, |b| usize::from(*b % 64) + 1);
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame(&mut buf, 1 << 20) {
                Ok(Some(frame)) => {
                    let _ = parse_request(frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    // A frame body on its own, without the length prefix.
    let _ = parse_request(bytes::Bytes::copy_from_slice(data));
});

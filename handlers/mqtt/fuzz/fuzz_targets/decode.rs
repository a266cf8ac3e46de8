//! Any bytes, for any negotiated version: decoding never panics, never
//! consumes more than it was given, and whatever decodes re-encodes to a
//! packet that decodes to the same value.
#![no_main]

use bytes::BytesMut;
use handler_mqtt::codec::{decode, encode, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let v = match sel % 3 {
        0 => Version::V31,
        1 => Version::V311,
        _ => Version::V5,
    };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(p)) = decode(&mut buf, v, 64 * 1024) {
        let mut out = BytesMut::new();
        encode(&p, v, &mut out);
        let again = decode(&mut out, v, usize::MAX).expect("re-encoded packet decodes");
        assert_eq!(again.as_ref(), Some(&p));
    }
});

//! Arbitrary bytes as a message batch: decoding never panics, and whatever
//! decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = bytes::Bytes::copy_from_slice(data);
    if let Ok(msgs) = broker::message::decode_batch(&input) {
        let again = broker::message::encode_batch(&msgs);
        let round = broker::message::decode_batch(&again).expect("re-encoded batch decodes");
        assert_eq!(round, msgs);
    }
});

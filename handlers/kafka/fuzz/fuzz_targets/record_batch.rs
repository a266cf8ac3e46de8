//! Record batch validation and decoding (all codecs): never a panic, and
//! decompression stays bounded.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    if let Ok(batches) = mapping::kafka::split_and_validate(&b) {
        for v in batches {
            let _ = mapping::kafka::decode_records(&v.header, &v.bytes);
        }
    }
    let _ = mapping::kafka::batch_to_messages(&b);
});

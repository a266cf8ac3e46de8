//! Arbitrary bytes as the last segment of a ledger: recovery never panics,
//! keeps only whole valid entries, and the ledger then accepts appends and
//! reads back everything it kept.
#![no_main]

use std::sync::Arc;

use broker::{AppendEntry, EntryFormat, Ledger, LedgerOptions, NamespacePolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00000000000000000000.log"), data).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let l = Ledger::open(
            "fuzz",
            dir.path(),
            NamespacePolicy::default(),
            LedgerOptions::default(),
            Arc::new(tokio::sync::Semaphore::new(1 << 16)),
        )
        .unwrap();
        let end = l.end_offset();
        let mut at = 0;
        while at < end {
            let es = l.read(at, 1 << 20).await.unwrap();
            assert!(!es.is_empty());
            for e in es {
                assert_eq!(e.base_offset, at);
                at = e.end_offset();
            }
        }
        let a = l
            .append(AppendEntry {
                format: EntryFormat::Messages,
                count: 1,
                first_timestamp: 0,
                max_timestamp: 0,
                payload: bytes::Bytes::from_static(b"x"),
            })
            .await
            .unwrap();
        assert_eq!(a.base_offset, end);
        l.close().await;
    });
});

//! Arbitrary bytes as the last segment of a ledger: recovery never panics,
//! keeps only whole valid entries, and the ledger then accepts appends and
//! reads back everything it kept.
#![no_main]

use std::sync::Arc;

use broker::{Ledger, LedgerOptions, NamespacePolicy};
use libfuzzer_sys::fuzz_target;

mod recovered;

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
        recovered::reads_back_and_appends(&l).await;
    });
});

//! Arbitrary bytes as a journal file, and arbitrary records replayed into a
//! ledger: parsing never panics and gives back exactly the records it was
//! given; replay never panics, and the ledger it was replayed into then
//! recovers, reads back everything it kept and accepts appends.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use broker::ledger::journal::{encode, parse, StoredRecord};
use broker::{Journal, JournalOptions, Ledger, LedgerOptions};
use libfuzzer_sys::fuzz_target;

mod recovered;

const JOURNAL: &str = "journal/00000000000000000001.jnl";

fn options() -> JournalOptions {
    JournalOptions {
        group_wait: Duration::ZERO,
        file_bytes: 1 << 16,
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The raw bytes as journal file 1.
    let (records, _) = parse(data, 1);
    let mut again = Vec::new();
    for r in &records {
        encode(&mut again, 1, r);
    }
    assert_eq!(&data[..again.len()], &again[..], "records re-encode to their bytes");

    // 2. The bytes cut into records aimed at a real ledger (its key and
    // incarnation), at positions in its first segment.
    let root = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = root.path().join("ledgers/l/0");
    let open = |j: &Arc<Journal>| {
        Ledger::open(
            "fuzz",
            &dir,
            broker::NamespacePolicy::default(),
            LedgerOptions {
                journal: Some(j.clone()),
                ..LedgerOptions::default()
            },
            Arc::new(tokio::sync::Semaphore::new(1 << 16)),
        )
        .unwrap()
    };
    rt.block_on(async {
        let j = Journal::open(root.path(), options()).unwrap();
        let l = open(&j);
        l.close().await;
        j.shutdown();
    });
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("ledger.json")).unwrap()).unwrap();
    let incarnation = meta["incarnation"].as_u64().unwrap();
    let mut file = Vec::new();
    for chunk in data.chunks(64) {
        if chunk.len() < 2 {
            break;
        }
        encode(
            &mut file,
            1,
            &StoredRecord {
                incarnation,
                segment_base: 0,
                position: u64::from(u16::from_le_bytes([chunk[0], chunk[1]])),
                key: "ledgers/l/0",
                data: &chunk[2..],
            },
        );
    }
    std::fs::remove_dir_all(root.path().join("journal")).unwrap();
    std::fs::create_dir_all(root.path().join("journal")).unwrap();
    std::fs::write(root.path().join(JOURNAL), &file).unwrap();
    rt.block_on(async {
        let j = Journal::open(root.path(), options()).unwrap();
        let l = open(&j);
        recovered::reads_back_and_appends(&l).await;
        j.shutdown();
    });
});

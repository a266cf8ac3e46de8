//! The check the recovery targets share.

use std::sync::Arc;

use broker::{AppendEntry, EntryFormat, Ledger};

/// A recovered ledger reads back densely from its start to its end, then
/// takes an append at its end; closes it.
pub async fn reads_back_and_appends(l: &Arc<Ledger>) {
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
}

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::Arc;

use broker::{AppendEntry, EntryFormat, Ledger, LedgerOptions, NamespacePolicy};
use bytes::Bytes;
use tokio::sync::Semaphore;

pub fn policy(segment_bytes: u64) -> NamespacePolicy {
    NamespacePolicy {
        segment_bytes,
        ..NamespacePolicy::default()
    }
}

pub fn open(dir: &Path, policy: NamespacePolicy) -> Arc<Ledger> {
    open_with(dir, policy, LedgerOptions::default())
}

pub fn open_with(dir: &Path, policy: NamespacePolicy, options: LedgerOptions) -> Arc<Ledger> {
    Ledger::open(
        "test",
        dir,
        policy,
        options,
        Arc::new(Semaphore::new(1 << 20)),
    )
    .expect("ledger opens")
}

pub fn entry(payload: impl Into<Bytes>, count: u32, ts: i64) -> AppendEntry {
    AppendEntry {
        format: EntryFormat::Messages,
        count,
        first_timestamp: ts,
        max_timestamp: ts,
        payload: payload.into(),
    }
}

//! Ledger behaviour through its public API: append/read, rollover,
//! recovery of torn and corrupt tails, timestamps, tailing, trims,
//! retention, cursors and their persistence.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

use broker::{BrokerError, InitialPosition, LedgerOptions, NamespacePolicy};
use common::{entry, open, open_with, policy};

#[tokio::test]
async fn append_and_read_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(4096));
    let mut bases = Vec::new();
    for i in 0..100u32 {
        let a = l
            .append(entry(vec![i as u8; 200], 1 + i % 3, 1000 + i64::from(i)))
            .await
            .unwrap();
        bases.push((a.base_offset, a.count, i));
    }
    assert!(l.stats().segments > 1, "small segments must roll over");
    assert_eq!(
        l.end_offset(),
        bases.last().map(|(b, c, _)| b + u64::from(*c)).unwrap()
    );
    // Every offset resolves to the entry that contains it.
    for &(base, count, i) in &bases {
        for o in base..base + u64::from(count) {
            let got = l.read(o, 1).await.unwrap();
            assert_eq!(got[0].base_offset, base);
            assert_eq!(got[0].payload.as_ref(), &vec![i as u8; 200][..]);
        }
    }
    // A large read crosses segments and returns consecutive entries.
    let all = l.read(0, 1 << 20).await.unwrap();
    assert_eq!(all.len(), 100);
    for w in all.windows(2) {
        assert_eq!(w[0].end_offset(), w[1].base_offset);
    }
    // Reading at the end is empty; beyond it is an error.
    assert!(l.read(l.end_offset(), 100).await.unwrap().is_empty());
    assert!(matches!(
        l.read(l.end_offset() + 1, 100).await,
        Err(BrokerError::OffsetOutOfRange { .. })
    ));
    l.close().await;
}

#[tokio::test]
async fn the_zeros_kept_ahead_of_appends_are_the_clean_end_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("00000000000000000000.log");
    let l = open(dir.path(), policy(8 << 20));
    for i in 0..10u8 {
        l.append(entry(vec![i; 100], 1, 0)).await.unwrap();
    }
    // While open, the segment file holds zeros past the last entry, so a
    // group commit's fdatasync does not have to write the file size.
    let logical = l.stats().size_bytes;
    let on_disk = std::fs::metadata(&seg).unwrap().len();
    assert!(
        on_disk >= 1 << 20 && on_disk > logical,
        "{on_disk} vs {logical}"
    );
    // A crash leaves them there: copy the files as they are now.
    let crashed = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), crashed.path().join(f.file_name())).unwrap();
    }
    l.close().await;
    // Closed cleanly, the segment ends at its last entry.
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), logical);
    let l = open(crashed.path(), policy(8 << 20));
    assert_eq!(l.end_offset(), 10);
    assert_eq!(l.stats().size_bytes, logical);
    let e = l.read(9, 1).await.unwrap();
    assert_eq!(e[0].payload.as_ref(), &[9u8; 100][..]);
    assert_eq!(l.append(entry("next", 1, 0)).await.unwrap().base_offset, 10);
    assert_eq!(l.read(10, 1).await.unwrap()[0].payload.as_ref(), b"next");
    l.close().await;
    // A torn entry inside the zeros is still a torn tail: dropped.
    let l = open(crashed.path(), policy(8 << 20));
    assert_eq!(l.end_offset(), 11);
    l.close().await;
    let seg = crashed.path().join("00000000000000000000.log");
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len + 4096).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x30, 0, 0, 0, 1, 2, 3], len).unwrap();
    drop(f);
    let l = open(crashed.path(), policy(8 << 20));
    assert_eq!(l.end_offset(), 11);
    assert_eq!(
        l.append(entry("after", 1, 0)).await.unwrap().base_offset,
        11
    );
    l.close().await;
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), l.stats().size_bytes);
}

#[tokio::test]
async fn small_appends_past_the_first_mebibyte_keep_zeros_ahead_and_their_bytes() {
    // The writer extends the zeros in steps between runs (this ledger has
    // no journal, so its segment keeps zeros ahead); none of them may land
    // on an entry, and they must keep ahead of 3 MiB of small appends.
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("00000000000000000000.log");
    let l = open(dir.path(), policy(64 << 20));
    let n = 3 * 1024 * 1024 / 1000;
    let body = |i: usize| vec![(i % 251) as u8 + 1; 1000]; // no zero byte
    for i in 0..n {
        l.append(entry(body(i), 1, 0)).await.unwrap();
        if i % 500 == 499 {
            let logical = l.stats().size_bytes;
            let on_disk = std::fs::metadata(&seg).unwrap().len();
            assert!(on_disk > logical, "after {i}: {on_disk} vs {logical}");
        }
    }
    let all = l.read(0, 8 << 20).await.unwrap();
    assert_eq!(all.len(), n);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.payload.as_ref(), &body(i)[..], "entry {i}");
    }
    l.close().await;
    // And after a reopen, from the file.
    let l = open(dir.path(), policy(64 << 20));
    assert_eq!(l.end_offset(), n as u64);
    let e = l.read(n as u64 - 1, 1).await.unwrap();
    assert_eq!(e[0].payload.as_ref(), &body(n - 1)[..]);
    l.close().await;
}

#[tokio::test]
async fn sealed_segments_end_at_their_last_entry() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(4096));
    for i in 1..=100u8 {
        l.append(entry(vec![i; 200], 1, 0)).await.unwrap(); // no zero byte
    }
    assert!(l.stats().segments > 2);
    let mut logs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop(); // the active one
    for p in logs {
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= 4096 + 300, "{}: {len} bytes", p.display());
        let bytes = std::fs::read(&p).unwrap();
        assert_ne!(bytes.last(), Some(&0), "{} ends in zeros", p.display());
    }
    l.close().await;
}

/// A torn write of the last entry (of 100-byte entries) in the first
/// segment: 70 bytes of it are missing.
fn tear_last_entry(dir: &std::path::Path) {
    let seg = dir.join("00000000000000000000.log");
    let len = std::fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 70)
        .unwrap();
}

#[tokio::test]
async fn recovery_truncates_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    for i in 0..10u8 {
        l.append(entry(vec![i; 100], 1, 0)).await.unwrap();
    }
    l.close().await;
    drop(l);
    tear_last_entry(dir.path());
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(l.end_offset(), 9, "the torn entry is dropped");
    let e = l.read(8, 1).await.unwrap();
    assert_eq!(e[0].payload.as_ref(), &[8u8; 100][..]);
    // New appends continue right after the valid prefix.
    assert_eq!(l.append(entry("new", 1, 0)).await.unwrap().base_offset, 9);
    assert_eq!(l.read(9, 1).await.unwrap()[0].payload.as_ref(), b"new");
    l.close().await;
}

#[tokio::test]
async fn cursors_past_what_a_crash_lost_are_clamped_to_the_recovered_end() {
    // Readers see entries before their fdatasync, so a cursor can be
    // persisted past entries a crash then loses. Reopened, it must not
    // skip the entries written at those offsets afterwards.
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    for i in 0..10u8 {
        l.append(entry(vec![i; 100], 1, 0)).await.unwrap();
    }
    let c = l
        .open_cursor("sub", InitialPosition::Earliest)
        .await
        .unwrap();
    c.ack_cumulative(10);
    let d = l
        .open_cursor("gaps", InitialPosition::Earliest)
        .await
        .unwrap();
    d.ack(3);
    d.ack(9);
    l.persist_cursors().await.unwrap();
    l.close().await;
    drop((l, c, d));
    // The crash lost the last entry.
    tear_last_entry(dir.path());
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(l.end_offset(), 9);
    let c = l.cursor("sub").unwrap();
    assert_eq!(c.mark_delete(), 9, "clamped to the recovered end");
    let d = l.cursor("gaps").unwrap();
    assert_eq!(d.mark_delete(), 0);
    assert!(d.is_acked(3), "acks below the end are kept");
    assert!(!d.is_acked(9), "acks at or past the end are dropped");
    // The entry written in the lost one's place is delivered.
    assert_eq!(l.append(entry("new", 1, 0)).await.unwrap().base_offset, 9);
    assert!(!c.is_acked(9));
    assert_eq!(l.backlog(&c).messages, 1);
    // And the clamp is what is persisted.
    l.persist_cursors().await.unwrap();
    l.close().await;
    drop((l, c, d));
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(l.cursor("sub").unwrap().mark_delete(), 9);
    assert!(!l.cursor("gaps").unwrap().is_acked(9));
    l.close().await;
}

#[tokio::test]
async fn recovery_truncates_at_a_corrupt_entry_and_never_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    for i in 0..5u8 {
        l.append(entry(vec![i; 64], 1, 0)).await.unwrap();
    }
    l.close().await;
    drop(l);
    let seg = dir.path().join("00000000000000000000.log");
    let mut data = std::fs::read(&seg).unwrap();
    // Flip a payload byte of the fourth entry (each is 40 + 64 bytes).
    data[3 * 104 + 50] ^= 0xff;
    std::fs::write(&seg, &data).unwrap();
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(l.end_offset(), 3);
    let got = l.read(0, 1 << 20).await.unwrap();
    assert_eq!(got.len(), 3);
    l.close().await;
}

#[tokio::test]
async fn garbage_appended_after_a_clean_close_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    l.append(entry("a", 1, 0)).await.unwrap();
    l.close().await;
    drop(l);
    let seg = dir.path().join("00000000000000000000.log");
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0xff; 13]).unwrap();
    f.write_all(&u32::MAX.to_le_bytes()).unwrap();
    drop(f);
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(l.end_offset(), 1);
    assert_eq!(l.append(entry("b", 1, 0)).await.unwrap().base_offset, 1);
    l.close().await;
}

#[tokio::test]
async fn find_offset_by_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(2048));
    for i in 0..50i64 {
        l.append(entry(vec![0u8; 100], 2, 1_000 + i * 10))
            .await
            .unwrap();
    }
    assert_eq!(l.find_offset_by_timestamp(0).await.unwrap(), Some(0));
    assert_eq!(l.find_offset_by_timestamp(1_000).await.unwrap(), Some(0));
    assert_eq!(l.find_offset_by_timestamp(1_001).await.unwrap(), Some(2));
    assert_eq!(l.find_offset_by_timestamp(1_250).await.unwrap(), Some(50));
    assert_eq!(l.find_offset_by_timestamp(1_490).await.unwrap(), Some(98));
    assert_eq!(l.find_offset_by_timestamp(1_491).await.unwrap(), None);
    // Sealed segments reload their indexes after a restart.
    l.close().await;
    drop(l);
    let l = open(dir.path(), policy(2048));
    assert_eq!(l.find_offset_by_timestamp(1_250).await.unwrap(), Some(50));
    assert_eq!(l.read(77, 1).await.unwrap()[0].base_offset, 76);
    l.close().await;
}

#[tokio::test]
async fn tailing_read_wakes_on_append_without_polling() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    let reader = {
        let l = l.clone();
        tokio::spawn(async move { l.read_or_wait(0, 100, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!reader.is_finished());
    let t0 = std::time::Instant::now();
    l.append(entry("hello", 1, 0)).await.unwrap();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got[0].payload.as_ref(), b"hello");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // With nothing new it returns empty after the timeout.
    let empty = l
        .read_or_wait(1, 100, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(empty.is_empty());
    l.close().await;
}

#[tokio::test]
async fn a_tailing_read_ends_when_the_ledger_closes() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    l.append(entry("one", 1, 0)).await.unwrap();
    let reader = {
        let l = l.clone();
        tokio::spawn(async move { l.read_or_wait(1, 100, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!reader.is_finished());
    let t0 = std::time::Instant::now();
    l.close().await;
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the reader returns when the ledger closes, not after its 30 s")
        .unwrap();
    assert!(matches!(got, Err(BrokerError::Closed)), "{got:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_follower_is_woken_with_its_token_by_appends_and_by_close() {
    use std::collections::VecDeque;
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir.path().join("a"), policy(1 << 20));
    let b = open(&dir.path().join("b"), policy(1 << 20));
    let set = broker::ReadySet::new();
    let fa = a.follow(&set, 7);
    let _fb = b.follow(&set, 9);
    let mut ready = VecDeque::new();
    set.take_into(&mut ready);
    assert_eq!(ready, [7, 9], "both are looked at once when followed");
    // The wake-up stored while nobody waited is used by the next wait.
    tokio::time::timeout(Duration::from_secs(5), set.wait())
        .await
        .unwrap();
    // An append to b wakes the waiter with b's token only.
    let waiter = {
        let set = set.clone();
        tokio::spawn(async move { set.wait().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "nothing moved yet");
    b.append(entry("x", 1, 0)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    ready.clear();
    set.take_into(&mut ready);
    assert_eq!(ready, [9]);
    // A dropped follow is not woken; closing a followed ledger wakes it.
    drop(fa);
    a.append(entry("y", 1, 0)).await.unwrap();
    b.close().await;
    assert!(b.is_closed() && !a.is_closed());
    ready.clear();
    set.take_into(&mut ready);
    assert_eq!(ready, [9]);
    a.close().await;
}

#[tokio::test]
async fn try_submit_queues_without_waiting_or_gives_the_entry_back() {
    let dir = tempfile::tempdir().unwrap();
    // A budget of one unit: the first append holds it until it completes.
    let l = broker::Ledger::open(
        "test",
        dir.path(),
        policy(1 << 20),
        LedgerOptions::default(),
        std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
    )
    .unwrap();
    let first = l
        .try_submit(entry("a", 1, 0))
        .expect("room")
        .expect("valid");
    let back = match l.try_submit(entry("b", 1, 0)) {
        Err(e) => e,
        Ok(_) => panic!("the second append must wait for the budget"),
    };
    assert_eq!(back.payload.as_ref(), b"b", "the entry is given back whole");
    assert_eq!(first.await.unwrap().base_offset, 0);
    let second = l.try_submit(back).expect("room again").expect("valid");
    assert_eq!(second.await.unwrap().base_offset, 1);
    assert!(matches!(
        l.try_submit(entry("", 0, 0)),
        Ok(Err(BrokerError::InvalidArgument(_)))
    ));
    let got = l.read(0, 1 << 20).await.unwrap();
    let payloads: Vec<&[u8]> = got.iter().map(|e| e.payload.as_ref()).collect();
    assert_eq!(payloads, [b"a".as_ref(), b"b".as_ref()]);
    l.close().await;
    assert!(matches!(
        l.try_submit(entry("c", 1, 0)),
        Ok(Err(BrokerError::Closed))
    ));
}

#[tokio::test]
async fn trim_moves_start_and_deletes_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(4096));
    for _ in 0..100 {
        l.append(entry(vec![1u8; 300], 1, 0)).await.unwrap();
    }
    let before = l.stats().segments;
    assert_eq!(l.trim(50).await.unwrap(), 50);
    assert_eq!(l.start_offset(), 50);
    assert!(l.stats().segments < before);
    assert!(matches!(
        l.read(10, 1).await,
        Err(BrokerError::OffsetOutOfRange { .. })
    ));
    assert_eq!(l.read(50, 1).await.unwrap()[0].base_offset, 50);
    l.close().await;
    drop(l);
    let l = open(dir.path(), policy(4096));
    assert_eq!(l.start_offset(), 50, "the start offset survives a restart");
    l.close().await;
}

#[tokio::test]
async fn retention_waits_for_durable_cursors_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(4096));
    let c = l
        .open_cursor("sub", InitialPosition::Earliest)
        .await
        .unwrap();
    for _ in 0..100 {
        l.append(entry(vec![1u8; 300], 1, 1_000)).await.unwrap();
    }
    let segments = l.stats().segments;
    let expire_all = NamespacePolicy {
        retention_ms: 10,
        ..policy(4096)
    };
    // The cursor has read nothing: nothing may go.
    assert_eq!(l.apply_retention(&expire_all, 1_000_000).await.unwrap(), 0);
    c.ack_cumulative(40);
    let n = l.apply_retention(&expire_all, 1_000_000).await.unwrap();
    assert!(n > 0 && l.stats().segments == segments - n);
    assert!(l.start_offset() <= 40, "never past the cursor");
    // A policy that keeps everything deletes nothing even when acked.
    c.ack_cumulative(100);
    let keep = NamespacePolicy {
        retention_ms: -1,
        retention_bytes: -1,
        ..policy(4096)
    };
    assert_eq!(l.apply_retention(&keep, 1_000_000).await.unwrap(), 0);
    // Size retention keeps the newest bytes; the active segment always stays.
    let by_size = NamespacePolicy {
        retention_ms: -1,
        retention_bytes: 8192,
        ..policy(4096)
    };
    l.apply_retention(&by_size, 1_000_000).await.unwrap();
    assert!(l.stats().size_bytes <= 8192 + 4096);
    assert_eq!(l.end_offset(), 100);
    l.close().await;
}

#[tokio::test]
async fn cursors_persist_with_individual_acks_and_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    for _ in 0..10 {
        l.append(entry(vec![0u8; 60], 1, 0)).await.unwrap();
    }
    let c = l
        .open_cursor("group", InitialPosition::Earliest)
        .await
        .unwrap();
    c.ack_cumulative(3);
    c.ack(5);
    c.ack(6);
    c.set_property("meta", "hello");
    assert_eq!(l.backlog(&c).messages, 5);
    let latest = l
        .open_cursor("late", InitialPosition::Latest)
        .await
        .unwrap();
    assert_eq!(latest.mark_delete(), 10);
    l.persist_cursors().await.unwrap();
    l.close().await;
    drop((l, c, latest));
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(
        l.cursor_names(),
        vec!["group".to_string(), "late".to_string()]
    );
    let c = l
        .open_cursor("group", InitialPosition::Latest)
        .await
        .unwrap();
    assert_eq!(c.mark_delete(), 3, "an existing cursor keeps its position");
    assert!(c.is_acked(5) && c.is_acked(6) && !c.is_acked(4) && !c.is_acked(7));
    assert_eq!(c.property("meta").as_deref(), Some("hello"));
    let b = l.backlog(&c);
    assert_eq!(b.messages, 5);
    assert!(b.bytes > 0);
    c.ack(3);
    c.ack(4);
    assert_eq!(c.mark_delete(), 7);
    assert!(l.delete_cursor("late").await.unwrap());
    l.close().await;
    drop(l);
    let l = open(dir.path(), policy(1 << 20));
    assert_eq!(l.cursor_names(), vec!["group".to_string()]);
    assert_eq!(l.cursor("group").unwrap().mark_delete(), 7);
    l.close().await;
}

#[tokio::test]
async fn fsync_policies_all_complete_appends() {
    for fsync in [
        broker::FsyncPolicy::Always,
        broker::FsyncPolicy::Group,
        broker::FsyncPolicy::Interval,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = NamespacePolicy {
            fsync,
            fsync_interval_ms: 5,
            ..policy(1 << 20)
        };
        let l = open(dir.path(), p.clone());
        let mut handles = Vec::new();
        for i in 0..64u32 {
            let l = l.clone();
            handles.push(tokio::spawn(async move {
                l.append(entry(vec![i as u8; 10], 1, 0)).await
            }));
        }
        let mut offsets: Vec<u64> = Vec::new();
        for h in handles {
            offsets.push(h.await.unwrap().unwrap().base_offset);
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..64).collect::<Vec<_>>(), "{fsync:?}");
        if fsync != broker::FsyncPolicy::Interval {
            assert_eq!(l.durable_end(), 64, "acknowledged is durable: {fsync:?}");
        }
        // Under `interval`, the periodic sync makes them durable.
        tokio::time::timeout(Duration::from_secs(5), l.wait_durable(64))
            .await
            .expect("durable in time")
            .unwrap();
        assert_eq!(l.durable_end(), l.end_offset());
        l.close().await;
        // Nothing more becomes durable after close: waiters are told.
        assert!(matches!(l.wait_durable(65).await, Err(BrokerError::Closed)));
        drop(l);
        let l = open(dir.path(), p);
        assert_eq!(l.end_offset(), 64, "{fsync:?}");
        l.close().await;
    }
}

#[tokio::test]
async fn oversized_and_empty_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(1 << 20));
    let big = vec![0u8; broker::LedgerOptions::default().max_entry_bytes + 1];
    assert!(matches!(
        l.append(entry(big, 1, 0)).await,
        Err(BrokerError::EntryTooLarge { .. })
    ));
    assert!(matches!(
        l.append(entry("x", 0, 0)).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    assert_eq!(l.end_offset(), 0);
    l.close().await;
}

mod arbitrary_segments {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A valid segment with random bytes overwritten and a random cut:
        /// recovery keeps a prefix of whole, intact entries and the ledger
        /// goes on appending after it.
        #[test]
        fn recovery_keeps_an_intact_prefix(
            flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..4),
            cut in any::<u16>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let l = open(dir.path(), policy(1 << 20));
                let mut payloads = Vec::new();
                for i in 0..20u8 {
                    let p = vec![i; 10 + usize::from(i) * 7];
                    l.append(entry(p.clone(), 1 + u32::from(i % 2), 0)).await.unwrap();
                    payloads.push(p);
                }
                l.close().await;
                drop(l);
                let seg = dir.path().join("00000000000000000000.log");
                let mut data = std::fs::read(&seg).unwrap();
                for (at, v) in &flips {
                    let i = usize::from(*at) % data.len();
                    data[i] ^= v | 1;
                }
                let keep = data.len() - usize::from(cut) % (data.len() / 2);
                data.truncate(keep);
                std::fs::write(&seg, &data).unwrap();

                let l = open(dir.path(), policy(1 << 20));
                let end = l.end_offset();
                let mut at = 0;
                let mut i = 0;
                while at < end {
                    for e in l.read(at, 1 << 20).await.unwrap() {
                        assert_eq!(e.base_offset, at);
                        assert_eq!(e.payload.as_ref(), &payloads[i][..], "a kept entry is intact");
                        at = e.end_offset();
                        i += 1;
                    }
                }
                assert_eq!(l.append(entry("next", 1, 0)).await.unwrap().base_offset, end);
                l.close().await;
            });
        }
    }
}

#[tokio::test]
async fn cursors_that_do_not_hold_retention() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), policy(4096));
    let group = l
        .open_cursor_with(
            "kafka.g",
            InitialPosition::Earliest,
            broker::CursorOptions {
                holds_retention: false,
            },
        )
        .await
        .unwrap();
    for _ in 0..60 {
        l.append(entry(vec![1u8; 300], 1, 1_000)).await.unwrap();
    }
    let expire = NamespacePolicy {
        retention_ms: 10,
        ..policy(4096)
    };
    assert!(
        l.apply_retention(&expire, 1_000_000).await.unwrap() > 0,
        "the group does not pin data"
    );
    assert!(l.start_offset() > 0);
    assert_eq!(group.mark_delete(), 0);
    assert!(l.backlog(&group).messages <= 60);
    l.close().await;
    drop((l, group));
    let l = open(dir.path(), policy(4096));
    assert!(
        !l.cursor("kafka.g").unwrap().holds_retention(),
        "the option is persisted"
    );
    l.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_cache_serves_exactly_what_was_appended() {
    // Concurrent appends (so group commits hold several entries) into a
    // ledger whose cache is small enough to evict; every read at every
    // offset, from the cache or from the segments, must match what the
    // appends reported.
    let dir = tempfile::tempdir().unwrap();
    let small_cache = LedgerOptions {
        tail_cache_bytes: 3000,
        ..LedgerOptions::default()
    };
    let l = open_with(dir.path(), policy(8192), small_cache);
    let mut model = std::collections::BTreeMap::new();
    for round in 0..20u32 {
        let mut tasks = Vec::new();
        for k in 0..8u32 {
            let l = l.clone();
            let n = round * 8 + k;
            tasks.push(tokio::spawn(async move {
                let payload = vec![n as u8; 50 + (n as usize * 37) % 900];
                let a = l
                    .append(entry(payload.clone(), 1 + n % 4, i64::from(n)))
                    .await
                    .unwrap();
                (a, payload)
            }));
        }
        for t in tasks {
            let (a, payload) = t.await.unwrap();
            model.insert(a.base_offset, (a.count, payload));
        }
        // Read the tail as a live reader would, between rounds.
        let tail = l.read(l.end_offset() - 1, 1).await.unwrap();
        assert_eq!(tail.len(), 1);
    }
    let end = l.end_offset();
    for from in 0..end {
        for max in [1usize, 500, 4000, 1 << 20] {
            let got = l.read(from, max).await.unwrap();
            assert!(!got.is_empty(), "from {from}");
            assert!(got[0].base_offset <= from && got[0].end_offset() > from);
            let mut size = 0;
            for (i, e) in got.iter().enumerate() {
                let (count, payload) = &model[&e.base_offset];
                assert_eq!(e.count, *count, "from {from} max {max}");
                assert_eq!(e.payload.as_ref(), &payload[..], "from {from} max {max}");
                if i > 0 {
                    assert_eq!(got[i - 1].end_offset(), e.base_offset);
                }
                size += e.stored_size();
            }
            // "About max_bytes": everything but the last entry fits (a read
            // that crosses into another segment takes one whole entry
            // there).
            let last = got.last().unwrap().stored_size();
            assert!(size - last <= max, "from {from} max {max}");
        }
    }
    // Everything up to the end is readable in one go.
    let all = l.read(0, 1 << 24).await.unwrap();
    assert_eq!(all.last().unwrap().end_offset(), end);
    l.close().await;
}

/// Drops the page cache of every file under `dir` (clean pages only, so
/// the data must be durable first).
fn drop_page_cache(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    for e in walk(dir) {
        let f = std::fs::File::open(&e).unwrap();
        // SAFETY: posix_fadvise touches no memory of ours: it takes a
        // descriptor and a byte range.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "fadvise {}", e.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Bytes of `path` the page cache holds (mincore(2) over a mapping).
fn cached_bytes(path: &std::path::Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a private read-only mapping of `len` bytes of an open file,
    // only inspected by mincore (never dereferenced) and unmapped before
    // returning; `vec` holds one byte per page as mincore requires.
    #[allow(unsafe_code)]
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(m, libc::MAP_FAILED);
        assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0);
        libc::munmap(m, len);
    }
    vec.iter().filter(|b| **b & 1 == 1).count() as u64 * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_data_behind_the_window_leaves_the_page_cache_and_reads_back_intact() {
    // 12 MiB appended into one segment with a 2 MiB drop-behind window:
    // once durable, what is behind the window is no longer cached (so
    // sustained appends do not grow the page cache), and every entry still
    // reads back exactly, now from the disk.
    let dir = tempfile::tempdir().unwrap();
    let opts = LedgerOptions {
        tail_cache_bytes: 0,
        drop_behind_bytes: 2 << 20,
        ..LedgerOptions::default()
    };
    let l = open_with(dir.path(), policy(64 << 20), opts);
    let mut model = Vec::new();
    for i in 0..192u32 {
        let payload: Vec<u8> = (0..64 * 1024).map(|k| (k as u32 ^ i) as u8).collect();
        let a = l.append(entry(payload.clone(), 1, 0)).await.unwrap();
        model.push(payload);
        assert_eq!(a.base_offset, u64::from(i));
    }
    let seg = walk(dir.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let cached = cached_bytes(&seg);
    assert!(
        cached <= 6 << 20,
        "{cached} bytes of the segment still cached after 12 MiB of durable appends"
    );
    // Entry by entry, then in reads large enough to be dropped behind the
    // reader too.
    for (i, p) in model.iter().enumerate() {
        let got = l.read(i as u64, 1).await.unwrap();
        assert_eq!(got[0].base_offset, i as u64);
        assert_eq!(got[0].payload.as_ref(), &p[..], "entry {i}");
    }
    let mut from = 0u64;
    while from < l.end_offset() {
        let got = l.read(from, 3 << 20).await.unwrap();
        for e in &got {
            assert_eq!(e.payload.as_ref(), &model[e.base_offset as usize][..]);
        }
        from = got.last().unwrap().end_offset();
    }
    l.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_the_same_from_the_page_cache_and_from_the_disk() {
    // A read first tries the page cache on the calling thread and falls
    // back to a blocking read when the data is not cached; both must return
    // exactly what was appended, including entries cut by `max_bytes`.
    let dir = tempfile::tempdir().unwrap();
    let no_cache = LedgerOptions {
        tail_cache_bytes: 0,
        ..LedgerOptions::default()
    };
    let l = open_with(dir.path(), policy(64 * 1024), no_cache);
    let mut model = Vec::new();
    for i in 0..300u32 {
        let payload = vec![(i % 251) as u8; 10 + (i as usize * 97) % 3000];
        let a = l
            .append(entry(payload.clone(), 1 + i % 3, 0))
            .await
            .unwrap();
        model.push((a.base_offset, a.count, payload));
    }
    assert!(l.stats().segments > 3);
    let check = |got: &[broker::Entry], from: u64| {
        assert!(!got.is_empty());
        let first = model.partition_point(|(b, c, _)| b + u64::from(*c) <= from);
        for (k, e) in got.iter().enumerate() {
            let (b, c, p) = &model[first + k];
            assert_eq!((e.base_offset, e.count), (*b, *c), "from {from}");
            assert_eq!(e.payload.as_ref(), &p[..], "from {from}");
        }
    };
    for pass in 0..2 {
        for from in (0..l.end_offset()).step_by(7) {
            if pass == 1 {
                drop_page_cache(dir.path());
            }
            for max in [1usize, 5000, 1 << 20, 4 << 20] {
                check(&l.read(from, max).await.unwrap(), from);
            }
        }
    }
    l.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_caches_of_many_ledgers_share_one_budget() {
    // Four ledgers whose own caches could hold 64 KiB each share a 20 KiB
    // budget: together they never hold more, every read is still exact, and
    // closing the ledgers gives the budget back.
    let budget = broker::CacheBudget::new(20 * 1024);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let ledgers: Vec<_> = dirs
        .iter()
        .map(|d| {
            open_with(
                d.path(),
                policy(1 << 20),
                LedgerOptions {
                    tail_cache_bytes: 64 * 1024,
                    cache_budget: budget.clone(),
                    ..LedgerOptions::default()
                },
            )
        })
        .collect();
    let mut model = vec![Vec::new(); ledgers.len()];
    for i in 0..200usize {
        let k = i % ledgers.len();
        let payload = vec![i as u8; 300 + i * 13 % 700];
        let a = ledgers[k]
            .append(entry(payload.clone(), 1, 0))
            .await
            .unwrap();
        model[k].push((a.base_offset, payload));
        assert!(budget.used() <= 20 * 1024, "used {}", budget.used());
    }
    assert!(budget.used() > 0, "some commits are cached");
    for (l, m) in ledgers.iter().zip(&model) {
        for (base, payload) in m {
            let got = l.read(*base, 1).await.unwrap();
            assert_eq!(got[0].base_offset, *base);
            assert_eq!(got[0].payload.as_ref(), &payload[..]);
        }
    }
    for l in ledgers {
        l.close().await;
        drop(l);
    }
    assert_eq!(budget.used(), 0, "closed ledgers give their cache back");
}

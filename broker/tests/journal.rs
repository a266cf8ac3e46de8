//! The shared journal: small group-commit appends are made durable by it,
//! its replay restores what the segments lost in a crash (the page cache
//! lost with the machine is simulated by cutting the segment file back),
//! a topic deleted and created again is not replayed into, full journal
//! files are checkpointed and deleted (and one a crash left half deleted
//! is not replayed), and journaled segments get no zeros ahead.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use broker::ledger::ENTRY_OVERHEAD;
use broker::{Journal, JournalOptions, Ledger, LedgerOptions};
use common::{entry, open_with, policy};

fn options(j: &Arc<Journal>) -> LedgerOptions {
    LedgerOptions {
        journal: Some(j.clone()),
        ..LedgerOptions::default()
    }
}

fn journal(root: &Path, file_bytes: u64) -> Arc<Journal> {
    Journal::open(
        root,
        JournalOptions {
            group_wait: Duration::from_micros(100),
            file_bytes,
        },
    )
    .expect("journal opens")
}

/// A partition directory under `root`, with a journal of 64 MiB files
/// open there and a runtime.
fn setup(root: &Path) -> (PathBuf, Arc<Journal>, tokio::runtime::Runtime) {
    (root.join("ledgers/t/0"), journal(root, 64 << 20), runtime())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn segment0(dir: &Path) -> PathBuf {
    dir.join("00000000000000000000.log")
}

fn payload(i: u32) -> Vec<u8> {
    format!("message-{i:04}-{}", "p".repeat((i % 7) as usize * 10)).into_bytes()
}

/// Appends `n` entries one after the other (each acknowledged before the
/// next), then drops the runtime without closing anything: what a crash
/// leaves on disk, page cache included.
fn append_and_crash(root: &Path, dir: &Path, n: u32, file_bytes: u64) -> (u64, u64) {
    let j = journal(root, file_bytes);
    let rt = runtime();
    let (first_end, fsyncs) = rt.block_on(async {
        let l: Arc<Ledger> = open_with(dir, policy(64 << 20), options(&j));
        let mut first_end = 0;
        for i in 0..n {
            let a = l.append(entry(payload(i), 1, i64::from(i))).await.unwrap();
            assert_eq!(a.base_offset, u64::from(i));
            if i == 0 {
                first_end = (ENTRY_OVERHEAD + payload(0).len()) as u64;
            }
        }
        (first_end, l.stats().fsyncs)
    });
    drop(rt);
    j.shutdown();
    (first_end, fsyncs)
}

/// What the machine loses with its page cache: the segment keeps only
/// its first `keep` bytes (the first entry).
fn lose_unsynced_pages(dir: &Path, keep: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(segment0(dir))
        .unwrap()
        .set_len(keep)
        .unwrap();
}

/// The ledger holds exactly the `n` entries `append_and_crash` wrote.
async fn assert_holds_all(l: &Arc<Ledger>, n: u32) {
    assert_eq!(
        l.end_offset(),
        u64::from(n),
        "every acknowledged append is back"
    );
    let all = read_all(l).await;
    assert_eq!(all.len(), n as usize);
    for (i, (o, p)) in all.iter().enumerate() {
        assert_eq!(*o, i as u64);
        assert_eq!(p, &payload(i as u32), "entry {i} intact");
    }
}

async fn read_all(l: &Arc<Ledger>) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < l.end_offset() {
        for e in l.read(at, 1 << 20).await.unwrap() {
            at = e.end_offset();
            out.push((e.base_offset, e.payload.to_vec()));
        }
    }
    out
}

#[test]
fn replay_restores_acknowledged_appends_the_segment_lost() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledgers/t/0");
    let n = 200;
    let (first_end, fsyncs) = append_and_crash(root.path(), &dir, n, 64 << 20);
    // The journal made them durable, not the segment's own fdatasync.
    assert!(
        fsyncs < u64::from(n) / 4,
        "{fsyncs} segment fdatasyncs for {n} appends: the journal was not used"
    );
    // The machine lost the segment's unsynced pages.
    lose_unsynced_pages(&dir, first_end);

    let j = journal(root.path(), 64 << 20);
    let rt = runtime();
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        assert_holds_all(&l, n).await;
        // And the ledger goes on from there.
        let a = l.append(entry("after", 1, 0)).await.unwrap();
        assert_eq!(a.base_offset, u64::from(n));
        l.close().await;
    });
    // Replayed journal files are deleted; one new file is open.
    let files = std::fs::read_dir(root.path().join("journal"))
        .unwrap()
        .count();
    assert_eq!(files, 1);
}

#[test]
fn a_topic_created_again_is_not_replayed_into() {
    let root = tempfile::tempdir().unwrap();
    let (dir, j, rt) = setup(root.path());
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        for i in 0..50 {
            l.append(entry(format!("first-life-{i:04}"), 1, 0))
                .await
                .unwrap();
        }
        l.delete().await.unwrap();
        // Same directory, a new ledger with less in it, in entries of the
        // same sizes: the old records would line up as valid entries.
        let l = open_with(&dir, policy(64 << 20), options(&j));
        for i in 0..3 {
            l.append(entry(format!("later-life-{i:04}"), 1, 0))
                .await
                .unwrap();
        }
    });
    drop(rt);
    j.shutdown();

    let j = journal(root.path(), 64 << 20);
    let rt = runtime();
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        let all = read_all(&l).await;
        let got: Vec<_> = all.iter().map(|(_, p)| p.clone()).collect();
        let want: Vec<Vec<u8>> = (0..3)
            .map(|i| format!("later-life-{i:04}").into_bytes())
            .collect();
        assert_eq!(got, want, "the old topic's records must not be replayed");
        l.close().await;
    });
}

#[test]
fn full_journal_files_are_checkpointed_and_deleted() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledgers/t/0");
    let n = 400;
    // About 100 bytes a record: dozens of 4 KiB files.
    let (_, _) = append_and_crash(root.path(), &dir, n, 4096);
    let jdir = root.path().join("journal");
    // Checkpoints run in the background: give the last ones a moment.
    let mut files = usize::MAX;
    for _ in 0..100 {
        files = std::fs::read_dir(&jdir).unwrap().count();
        if files <= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        files <= 2,
        "{files} journal files left: full ones were not deleted"
    );
    // Everything is still there after a replay of what is left.
    let j = journal(root.path(), 4096);
    let rt = runtime();
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        assert_holds_all(&l, n).await;
        l.close().await;
    });
}

/// A checkpoint renames its synced journal file (`.del`) before freeing
/// it a step at a time. One that a crash left behind is removed at start,
/// never replayed: here its records would bring back the entries the
/// segment was cut to lose.
#[test]
fn a_journal_file_left_half_deleted_is_removed_not_replayed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledgers/t/0");
    let (first_end, _) = append_and_crash(root.path(), &dir, 50, 64 << 20);
    let jdir = root.path().join("journal");
    let files: Vec<PathBuf> = std::fs::read_dir(&jdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let doomed = files[0].with_extension("del");
    std::fs::rename(&files[0], &doomed).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&doomed)
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    drop(f);
    lose_unsynced_pages(&dir, first_end);

    let j = journal(root.path(), 64 << 20);
    let rt = runtime();
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        assert_eq!(l.end_offset(), 1, "a file being deleted was replayed");
        l.close().await;
    });
    assert!(!doomed.exists(), "the half-deleted file is still there");
}

/// A journaled run is made durable by the journal, so its segment gets no
/// zeros ahead (they spare only a segment's own fdatasync an inode write):
/// the file ends at its last entry, also while the ledger is open.
#[test]
fn journaled_segments_get_no_zeros_ahead() {
    let root = tempfile::tempdir().unwrap();
    let (dir, j, rt) = setup(root.path());
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        for i in 0..300 {
            l.append(entry(payload(i), 1, 0)).await.unwrap();
        }
        assert!(l.stats().fsyncs < 10, "not made durable by the journal");
        let logical = l.stats().size_bytes;
        let on_disk = std::fs::metadata(segment0(&dir)).unwrap().len();
        assert_eq!(on_disk, logical, "bytes after the last entry");
        assert_eq!(read_all(&l).await.len(), 300);
        l.close().await;
    });
}

#[test]
fn a_broker_without_the_journal_now_still_replays_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledgers/t/0");
    let n = 100;
    let (first_end, _) = append_and_crash(root.path(), &dir, n, 64 << 20);
    lose_unsynced_pages(&dir, first_end);

    Journal::recover(root.path()).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), LedgerOptions::default());
        assert_holds_all(&l, n).await;
        l.close().await;
    });
    let left = std::fs::read_dir(root.path().join("journal"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "replayed journal files are deleted");
}

/// Rounds are spaced by `group_wait` from the end of the previous one: an
/// append that finds the journal idle for longer is made durable at once,
/// and one that comes right after a round waits for the next.
#[test]
fn rounds_are_spaced_from_the_previous_round_not_held_after_a_quiet_spell() {
    let wait = Duration::from_millis(1500);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledgers/t/0");
    let j = Journal::open(
        root.path(),
        JournalOptions {
            group_wait: wait,
            file_bytes: 64 << 20,
        },
    )
    .unwrap();
    let rt = runtime();
    rt.block_on(async {
        let l = open_with(&dir, policy(64 << 20), options(&j));
        // The first append syncs its segment; the second is journaled.
        for i in 0..2 {
            l.append(entry(payload(i), 1, 0)).await.unwrap();
        }
        let segment_syncs = l.stats().fsyncs;
        tokio::time::sleep(wait + Duration::from_millis(100)).await;

        let t0 = std::time::Instant::now();
        l.append(entry(payload(2), 1, 0)).await.unwrap();
        let after_quiet = t0.elapsed();
        let t1 = std::time::Instant::now();
        l.append(entry(payload(3), 1, 0)).await.unwrap();
        let right_after = t1.elapsed();

        assert!(
            after_quiet < wait * 2 / 3,
            "an append after a quiet spell took {after_quiet:?} (group_wait {wait:?})"
        );
        assert!(
            right_after >= wait * 4 / 5,
            "an append right after a round took {right_after:?}, less than group_wait {wait:?}"
        );
        assert_eq!(
            l.stats().fsyncs,
            segment_syncs,
            "both went through the journal"
        );
        assert_holds_all(&l, 4).await;
        l.close().await;
    });
    drop(rt);
    j.shutdown();
}

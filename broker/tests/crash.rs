//! Kill -9 durability: a child process appends under the default `group`
//! policy and reports every completed append (and every persisted cursor
//! position); it is killed with SIGKILL at random points. After each kill
//! the ledger must reopen with every reported append present and intact,
//! the cursor at or past its last reported position, and accept new
//! appends.
//!
//! The same runs once more with the broker's shared journal, whose replay
//! runs before the ledger reopens.
//!
//! The child is this same test binary, re-run with `CRASH_CHILD_DIR` set.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use broker::{InitialPosition, Journal, JournalOptions, Ledger, LedgerOptions};
use common::{entry, open_with, policy};

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
const JOURNAL_ENV: &str = "CRASH_JOURNAL";

/// Opens the ledger under `root` (with the journal in `root` if asked,
/// replayed first).
fn open_ledger(root: &Path, journal: bool) -> (Arc<Ledger>, Option<Arc<Journal>>) {
    let (dir, j) = if journal {
        let j = Journal::open(root, JournalOptions::default()).expect("journal opens");
        (root.join("ledgers/t/0"), Some(j))
    } else {
        (PathBuf::from(root), None)
    };
    let options = LedgerOptions {
        journal: j.clone(),
        ..LedgerOptions::default()
    };
    (open_with(&dir, policy(64 * 1024), options), j)
}

/// The child: appends forever from several concurrent tasks.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // only meaningful as the child of `appends_survive_sigkill`
    };
    let round: u64 = std::env::var("CRASH_ROUND").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let journal = std::env::var(JOURNAL_ENV).is_ok();
    rt.block_on(async move {
        let (l, _journal) = open_ledger(Path::new(&dir), journal);
        let cursor = l.open_cursor("c", InitialPosition::Earliest).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let payload =
                        format!("r{round}-t{t}-i{i}-{}", "x".repeat((i % 50) as usize * 20));
                    let count = 1 + (i % 3) as u32;
                    let a = l
                        .append(entry(payload.clone(), count, i as i64))
                        .await
                        .unwrap();
                    println!("APPENDED {} {} {}", a.base_offset, a.count, payload);
                }
            }));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(7)).await;
            let upto = l.end_offset() / 2;
            cursor.ack_cumulative(upto);
            l.persist_cursors().await.unwrap();
            println!("CURSOR {}", cursor.mark_delete());
        }
    });
}

fn pseudo_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn appends_survive_sigkill() {
    sigkill_rounds(false);
}

#[test]
fn appends_survive_sigkill_with_the_journal() {
    sigkill_rounds(true);
}

fn sigkill_rounds(journal: bool) {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut acked: BTreeMap<u64, (u32, String)> = BTreeMap::new();
    let mut cursor_floor = 0u64;
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .envs(journal.then_some((JOURNAL_ENV, "1")))
            .env("CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // The kill lands after a random number of reported appends, not
        // after a random time: how fast the child appends depends on the
        // disk (an fdatasync costs microseconds on some machines and
        // milliseconds on others), and a time-based kill makes the work
        // this test verifies unbounded on a fast disk.
        let kill_after = 50 + pseudo_random(&mut seed) % 3000;
        let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut appends = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("APPENDED ") {
                    appends += 1;
                    if appends == kill_after {
                        let _ = reached_tx.send(());
                    }
                }
                lines.push(line);
            }
            lines
        });
        // Bounded: a child that stops reporting is killed after a minute
        // and the round fails below if it reported nothing.
        let _ = reached_rx.recv_timeout(Duration::from_secs(60));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut appended = 0;
        for line in lines {
            // A line cut by the kill is not a report.
            if let Some(rest) = line.strip_prefix("APPENDED ") {
                let mut p = rest.splitn(3, ' ');
                let (Some(b), Some(c), Some(payload)) = (p.next(), p.next(), p.next()) else {
                    continue;
                };
                let (Ok(b), Ok(c)) = (b.parse::<u64>(), c.parse::<u32>()) else {
                    continue;
                };
                if payload.len() < 8 {
                    continue;
                }
                acked.insert(b, (c, payload.to_owned()));
                appended += 1;
            } else if let Some(c) = line.strip_prefix("CURSOR ") {
                if let Ok(c) = c.parse::<u64>() {
                    cursor_floor = cursor_floor.max(c);
                }
            }
        }
        assert!(appended > 0, "round {round}: the child reported no appends");

        // Recover in this process and check every acknowledged append.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (l, j) = open_ledger(dir.path(), journal);
            let end = l.end_offset();
            for (&base, (count, payload)) in &acked {
                // Reported lines may be cut mid-payload by the kill; the
                // payload we hold is a prefix of the stored one at worst.
                assert!(
                    base + u64::from(*count) <= end,
                    "round {round}: acked entry {base} lost (end {end})"
                );
                let e = l.read(base, 1).await.unwrap();
                assert_eq!(e[0].base_offset, base);
                assert_eq!(e[0].count, *count);
                let stored = std::str::from_utf8(&e[0].payload).unwrap();
                assert!(
                    stored.starts_with(payload.as_str()),
                    "round {round}: entry {base} damaged"
                );
            }
            // Offsets are dense: the whole ledger reads back entry by entry.
            let mut o = 0;
            while o < end {
                let e = l.read(o, 1 << 16).await.unwrap();
                for x in &e {
                    assert_eq!(x.base_offset, o, "round {round}: offsets must be dense");
                    o = x.end_offset();
                }
            }
            let c = l.cursor("c").expect("the cursor survives");
            assert!(
                c.mark_delete() >= cursor_floor,
                "round {round}: cursor went back"
            );
            let a = l.append(entry("after-recovery", 1, 0)).await.unwrap();
            assert_eq!(a.base_offset, end);
            l.close().await;
            if let Some(j) = j {
                j.shutdown();
            }
        });
    }
}

//! `ledger-bench`: append and read throughput of the managed ledger against
//! the raw ceiling of the same disk, measured in the same run.
//!
//! For each message size (100 B, 1 KiB, 64 KiB) and fsync policy, 64
//! concurrent producers append one message per entry for a fixed time. The
//! raw ceiling then writes the same number of bytes to a plain file in the
//! same directory with the same fsync cadence (the ledger's own fsync count
//! over the same bytes). Reads: a catch-up read of the whole ledger through
//! `Ledger::read`, against a plain read of its segment files (both from the
//! page cache), and the throughput a tailing reader sees while producers
//! append. Last, the disk's commit latency when the same commits go to 8
//! files at once or to one file (the case for one journal shared by all
//! ledgers).
//!
//! Prints a table and appends it to BENCHMARKS.md (or the file given with
//! `--out`). Usage: `cargo run --release -p broker --bin ledger-bench --
//! [--seconds N] [--dir DIR] [--out FILE]`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{AppendEntry, EntryFormat, FsyncPolicy, Ledger, LedgerOptions, NamespacePolicy};
use tokio::sync::Semaphore;

const PRODUCERS: usize = 64;

struct Args {
    seconds: f64,
    rounds: usize,
    only: Option<String>,
    dir: Option<PathBuf>,
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 2.0,
        rounds: 3,
        only: None,
        dir: None,
        out: PathBuf::from("BENCHMARKS.md"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        match k.as_str() {
            "--seconds" => a.seconds = v.parse().unwrap_or(2.0),
            "--rounds" => a.rounds = v.parse().unwrap_or(3).max(1),
            "--only" => a.only = Some(v),
            "--dir" => a.dir = Some(PathBuf::from(v)),
            "--out" => a.out = PathBuf::from(v),
            _ => {
                eprintln!("usage: ledger-bench [--seconds N] [--rounds N] [--only always|group|interval] [--dir DIR] [--out FILE]");
                std::process::exit(2);
            }
        }
    }
    a
}

struct AppendResult {
    messages: u64,
    bytes: u64,
    secs: f64,
    fsyncs: u64,
    tail_messages: u64,
}

async fn append_run(
    dir: &Path,
    size: usize,
    fsync: FsyncPolicy,
    secs: f64,
) -> (Arc<Ledger>, AppendResult) {
    let policy = NamespacePolicy {
        fsync,
        segment_bytes: 256 * 1024 * 1024,
        ..NamespacePolicy::default()
    };
    let l = Ledger::open(
        "bench",
        dir,
        policy,
        LedgerOptions::default(),
        Arc::new(Semaphore::new(1 << 20)),
    )
    .expect("ledger opens");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![0x5au8; size]);
    // A tailing reader follows the producers.
    let tail = {
        let l = l.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut at = 0u64;
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match l.read_or_wait(at, 1 << 20, Duration::from_millis(50)).await {
                    Ok(es) => {
                        for e in es {
                            seen += u64::from(e.count);
                            at = e.end_offset();
                        }
                    }
                    Err(_) => break,
                }
            }
            seen
        })
    };
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..PRODUCERS {
        let l = l.clone();
        let stop = stop.clone();
        let count = count.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                l.append(AppendEntry {
                    format: EntryFormat::Messages,
                    count: 1,
                    first_timestamp: 0,
                    max_timestamp: 0,
                    payload: payload.clone(),
                })
                .await
                .expect("append");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("producer");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let tail_messages = tail.await.unwrap_or(0);
    let messages = count.load(Ordering::Relaxed);
    let st = l.stats();
    (
        l,
        AppendResult {
            messages,
            bytes: messages * size as u64,
            secs: elapsed,
            fsyncs: st.fsyncs,
            tail_messages,
        },
    )
}

/// Writes `total` bytes sequentially to a plain file with `fsyncs` evenly
/// spaced fdatasyncs; returns MB/s. Plain appends (`ahead` false) grow the
/// file with every write, so each fdatasync also writes the file size;
/// with `ahead` the file keeps zeros up to 1 MiB ahead of the data, as the
/// ledger's writer does, so that neither has to.
fn raw_write(dir: &Path, total: u64, fsyncs: u64, ahead: bool) -> f64 {
    use std::os::unix::fs::FileExt;
    const AHEAD: u64 = 1 << 20;
    let path = dir.join("raw-ceiling.bin");
    let f = std::fs::File::create(&path).expect("raw file");
    let chunk = (total / fsyncs.max(1)).max(1) as usize;
    let buf = vec![0x5au8; chunk.min(8 << 20)];
    let zeros = vec![0u8; AHEAD as usize];
    let t0 = Instant::now();
    let mut written = 0u64;
    let mut zeroed = 0u64;
    while written < total {
        let mut left = chunk.min((total - written) as usize);
        let end = written + left as u64;
        while ahead && zeroed < end {
            let to = end.div_ceil(AHEAD) * AHEAD;
            let n = (to - zeroed).min(AHEAD) as usize;
            f.write_all_at(&zeros[..n], zeroed).expect("write");
            zeroed += n as u64;
        }
        while left > 0 {
            let n = left.min(buf.len());
            f.write_all_at(&buf[..n], written).expect("write");
            left -= n;
            written += n as u64;
        }
        if fsyncs > 0 {
            f.sync_data().expect("fdatasync");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    total as f64 / secs / 1e6
}

/// Paced commits to `files` files at once, one thread each: every thread
/// writes `bytes` and fdatasyncs, `rate / files` times a second, for
/// `secs`, into zeros written ahead. Returns the sorted latencies of the
/// commits (write + fdatasync) of all threads.
fn spread_commits(dir: &Path, files: usize, rate: f64, bytes: usize, secs: f64) -> Vec<Duration> {
    use std::os::unix::fs::FileExt;
    let per_file = rate / files as f64;
    let n = (per_file * secs) as usize;
    let threads: Vec<_> = (0..files)
        .map(|i| {
            let path = dir.join(format!("spread-{i}.bin"));
            std::thread::spawn(move || {
                let f = std::fs::File::create(&path).expect("spread file");
                f.write_all_at(&vec![0u8; n * bytes + 4096], 0)
                    .expect("zeros");
                f.sync_all().expect("fsync");
                let buf = vec![0x5au8; bytes];
                let mut lat = Vec::with_capacity(n);
                let start = Instant::now();
                for k in 0..n {
                    let due = start + Duration::from_secs_f64(k as f64 / per_file);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    let t = Instant::now();
                    f.write_all_at(&buf, (k * bytes) as u64).expect("write");
                    f.sync_data().expect("fdatasync");
                    lat.push(t.elapsed());
                }
                drop(f);
                let _ = std::fs::remove_file(&path);
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("spread thread"))
        .collect();
    all.sort();
    all
}

/// Plain read of every file in `dir` (after one warm-up pass); MB/s.
fn raw_read(dir: &Path) -> f64 {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut pass = || {
        let mut total = 0u64;
        for p in &files {
            let mut f = std::fs::File::open(p).expect("open");
            loop {
                let n = f.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
        total
    };
    pass();
    let t0 = Instant::now();
    let total = pass();
    total as f64 / t0.elapsed().as_secs_f64() / 1e6
}

async fn ledger_read(l: &Arc<Ledger>) -> f64 {
    // Warm-up pass, then the measured one.
    let mut mbps = 0.0;
    for _ in 0..2 {
        let t0 = Instant::now();
        let mut at = l.start_offset();
        let mut bytes = 0u64;
        while at < l.end_offset() {
            let es = l.read(at, 1 << 20).await.expect("read");
            for e in es {
                bytes += e.stored_size() as u64;
                at = e.end_offset();
            }
        }
        mbps = bytes as f64 / t0.elapsed().as_secs_f64() / 1e6;
    }
    mbps
}

#[tokio::main]
async fn main() {
    let a = args();
    let base = a
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/ledger-bench"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("bench dir");
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| policy | msg size | msgs/s | MB/s | fsyncs | raw MB/s (same fsyncs) | ratio | raw MB/s, zeros ahead | ratio | tail msgs/s | read MB/s | raw read MB/s | read ratio |"
    );
    let _ = writeln!(
        table,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    println!(
        "{PRODUCERS} concurrent producers, one message per entry, {}s x {} rounds per case",
        a.seconds, a.rounds
    );
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::Group,
        FsyncPolicy::Interval,
    ] {
        let name = format!("{fsync:?}").to_lowercase();
        if a.only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        for size in [100usize, 1024, 65536] {
            // Ledger and raw runs alternate so that both see the same disk
            // weather; the round with the median ratio is reported.
            let mut rounds = Vec::new();
            for round in 0..a.rounds {
                let dir = base.join(format!("{name}-{size}-{round}"));
                let (l, r) = append_run(&dir, size, fsync, a.seconds).await;
                let ledger_mbps = r.bytes as f64 / r.secs / 1e6;
                let raw = raw_write(&dir, r.bytes, r.fsyncs, false);
                let raw_ahead = raw_write(&dir, r.bytes, r.fsyncs, true);
                let reads = if round + 1 == a.rounds {
                    let read = ledger_read(&l).await;
                    Some((read, raw_read(&dir)))
                } else {
                    None
                };
                l.close().await;
                drop(l);
                let _ = std::fs::remove_dir_all(&dir);
                rounds.push((ledger_mbps / raw, ledger_mbps, raw, r, reads, raw_ahead));
            }
            let (read, raw_read) = rounds.iter().find_map(|x| x.4).unwrap_or((0.0, 1.0));
            rounds.sort_by(|x, y| x.0.total_cmp(&y.0));
            let (ratio, ledger_mbps, raw, r, _, raw_ahead) = &rounds[rounds.len() / 2];
            let row = format!(
                "| {} | {} B | {:.0} | {:.1} | {} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} |",
                name,
                size,
                r.messages as f64 / r.secs,
                ledger_mbps,
                r.fsyncs,
                raw,
                ratio,
                raw_ahead,
                ledger_mbps / raw_ahead,
                r.tail_messages as f64 / r.secs,
                read,
                raw_read,
                read / raw_read,
            );
            println!("{row}");
            let _ = writeln!(table, "{row}");
        }
    }
    // How the disk takes commits spread over files: the same commits per
    // second and bytes in total, to 8 files at once (8 ledgers, each its
    // own fdatasync) and to one file (one shared journal).
    let mut spread = String::new();
    let _ = writeln!(
        spread,
        "| files | commits/s per file | bytes per commit | p50 ms | p99 ms | max ms |"
    );
    let _ = writeln!(spread, "| --- | --- | --- | --- | --- | --- |");
    let spread_dir = base.join("spread");
    std::fs::create_dir_all(&spread_dir).expect("spread dir");
    let spread_secs = a.seconds.max(2.0) * 2.0;
    // (files, commits/s in total, bytes per commit)
    for (files, rate, bytes) in [
        (8usize, 1600.0, 2048usize),
        (1, 1600.0, 2048),
        (1, 200.0, 16384),
    ] {
        let lat = spread_commits(&spread_dir, files, rate, bytes, spread_secs);
        let ms = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let row = format!(
            "| {files} | {:.0} | {bytes} | {:.2} | {:.2} | {:.2} |",
            rate / files as f64,
            ms(0.5),
            ms(0.99),
            ms(1.0),
        );
        println!("{row}");
        let _ = writeln!(spread, "{row}");
    }
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let only = a
        .only
        .as_ref()
        .map(|o| format!(" --only {o}"))
        .unwrap_or_default();
    let section = format!(
        "\n## ledger-bench, {date}\n\n`cargo run --release -p broker --bin ledger-bench -- --seconds {} --rounds {}{only}`\n\n\
         {PRODUCERS} concurrent producers append one message per entry. \"raw\" writes the same bytes to a plain file \
         in the same directory with the same number of fdatasyncs, as plain appends (each fdatasync also writes \
         the grown file size) and, in \"zeros ahead\", into zeros written up to 1 MiB ahead of the data as the \
         ledger's writer does (no size to write); each \"ratio\" is ledger / that raw. Each case runs ledger \
         then both raws {} times, alternating, and shows the round with the median first ratio. Reads (last round): a catch-up \
         read of the whole ledger vs a plain read of its segment files, both from the page cache. \"tail\" is what \
         a concurrent `read_or_wait` reader received.\n\n{table}\n\
         Commit latency (write + fdatasync, into zeros written ahead) when commits are spread over files: \
         1,600 commits/s of 2 KiB for {spread_secs} s to 8 files at once (one thread each, like 8 ledgers), \
         the same to one file, and 200 commits/s of 16 KiB to one file (what one journal shared by the 8 \
         would write).\n\n{spread}",
        a.seconds, a.rounds, a.rounds
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.out)
        .expect("open output");
    if f.metadata().map(|m| m.len() == 0).unwrap_or(true) {
        let _ = f.write_all(
            b"# Benchmarks\n\nEach section is one run, appended by the program named in it.\n",
        );
    }
    f.write_all(section.as_bytes()).expect("append");
    let _ = std::fs::remove_dir_all(&base);
    println!("appended to {}", a.out.display());
}

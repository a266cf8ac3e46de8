//! The managed ledger: one topic partition's ordered, append-only log of
//! entries, stored as segment files under one directory, with durable
//! cursors.
//!
//! Concurrency model: a single writer task per ledger owns every mutation
//! (appends, rollover, trims, retention). Appends queue on a bounded
//! channel; the writer takes everything queued and writes it with one
//! `write` (a small run on the writer's own task; a large one, one that
//! rolls the segment over or one that would first need zeros ahead, see
//! `Writer::zeros_wanted`, on a blocking thread). Under
//! [`FsyncPolicy::Group`] writing and syncing are decoupled: one
//! `fdatasync` at a time runs on a blocking thread and completes every
//! append written before it started, while the writer goes on writing what
//! arrives meanwhile (acknowledged by the next one). With
//! the broker's [`journal`], small runs are made durable by it instead
//! (one fdatasync for the small runs of all ledgers).
//! Readers never take the writer's path: they
//! look up a segment under a short read lock and read with positional I/O,
//! seeing what the writer has published.
//!
//! Visibility: the writer publishes a run (new end offset on a `watch`
//! channel, tail cache) as soon as it is written to the page cache, before
//! its fdatasync, as Kafka and RabbitMQ hand messages to consumers before
//! they are flushed; the producer's acknowledgement still waits for the
//! fdatasync. Consumers therefore do not wait for the disk, and a crash
//! can lose entries a reader saw but whose producer was never acknowledged
//! (the producer retries them). Cursors are clamped to the recovered end on
//! open, so a position persisted past lost entries cannot skip the entries
//! written in their place. Readers that must only see durable entries use
//! [`Ledger::durable_end`] / [`Ledger::wait_durable`]. A failed fdatasync
//! after a run was published fails the ledger (no further appends until it
//! is reopened and recovered), since readers may have seen the run.
//!
//! A read is first tried on the calling thread against
//! the page cache only (`RWF_NOWAIT`); one that would wait for the disk runs
//! on a blocking thread instead.
//!
//! Tail cache: the writer keeps the most recent entries (up to
//! [`LedgerOptions::tail_cache_bytes`]) in memory, as slices of the buffer
//! it just wrote. A reader at the tail — every live subscriber, consumer
//! or queue — is served from it without a blocking-pool hop or a `pread`;
//! only readers further behind go to the segment files. All the ledgers of
//! a broker share one [`CacheBudget`]: a run that does not fit in it is not
//! cached, so the caches of many partitions stay within one bound.

mod cursor;
mod follow;
pub mod journal;
mod segment;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

pub use follow::{Follow, ReadySet};

pub use cursor::{Cursor, CursorOptions, InitialPosition, RangeSet};
pub use journal::{Journal, JournalOptions};
pub use segment::{Entry, ENTRY_OVERHEAD};

use crate::error::{BrokerError, Result};
use crate::message::EntryFormat;
use crate::topic::{FsyncPolicy, NamespacePolicy};
use cursor::CursorSnapshot;
use segment::{IndexPoint, ReadMode, Segment};

/// Settings of one ledger that do not come from its namespace policy.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Largest payload of one entry.
    pub max_entry_bytes: usize,
    /// Depth of the append queue (appends beyond it wait).
    pub queue_depth: usize,
    /// Most bytes the writer takes in one group commit.
    pub max_batch_bytes: usize,
    /// Size of the shared in-flight memory budget, in KiB units (an append
    /// of `n` bytes holds `n / 1024 + 1` units, at most this many).
    pub budget_units: u32,
    /// Most bytes of recent entries kept in memory for tailing readers (0
    /// disables the cache). A group commit larger than this is not cached.
    pub tail_cache_bytes: usize,
    /// The budget the tail caches of many ledgers share.
    pub cache_budget: Arc<CacheBudget>,
    /// Written bytes further than this behind the durable end of the
    /// active segment are dropped from the OS page cache after their
    /// fdatasync (see [`segment::Segment::drop_cached_below`]); 0 leaves
    /// the page cache to the kernel.
    pub drop_behind_bytes: u64,
    /// The broker's journal: small appends under the `group` policy are
    /// made durable by it instead of by an fdatasync of the segment (see
    /// [`journal`]). `None`: every ledger syncs its own segments.
    pub journal: Option<Arc<Journal>>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            max_entry_bytes: 16 * 1024 * 1024,
            queue_depth: 1024,
            max_batch_bytes: 8 * 1024 * 1024,
            budget_units: 256 * 1024,
            tail_cache_bytes: 1024 * 1024,
            cache_budget: CacheBudget::new(usize::MAX),
            drop_behind_bytes: 64 * 1024 * 1024,
            journal: None,
        }
    }
}

/// Bytes that the tail caches of many ledgers may hold together.
///
/// A ledger takes from it before caching a group commit and gives back
/// what it evicts; when the budget is spent, new commits are simply not
/// cached and their readers go to the segment files (normally still in the
/// page cache).
#[derive(Debug)]
pub struct CacheBudget {
    limit: usize,
    used: AtomicUsize,
}

impl CacheBudget {
    /// A budget of `limit` bytes.
    #[must_use]
    pub fn new(limit: usize) -> Arc<CacheBudget> {
        Arc::new(CacheBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes taken now.
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One group commit's entries, as slices of the bytes that were written.
#[derive(Debug)]
struct CachedRun {
    /// Bytes the run pins (its whole write buffer).
    bytes: usize,
    entries: Vec<Entry>,
}

/// The most recent durable entries, contiguous in offsets: runs are added
/// at the back by the writer (before it publishes the new end offset) and
/// dropped whole from the front.
#[derive(Debug)]
struct TailCache {
    runs: std::collections::VecDeque<CachedRun>,
    bytes: usize,
    budget: Arc<CacheBudget>,
}

impl Drop for TailCache {
    fn drop(&mut self) {
        self.clear();
    }
}

impl TailCache {
    fn new(budget: Arc<CacheBudget>) -> TailCache {
        TailCache {
            runs: std::collections::VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn pop_front(&mut self) -> bool {
        match self.runs.pop_front() {
            Some(r) => {
                self.bytes -= r.bytes;
                self.budget.give(r.bytes);
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        while self.pop_front() {}
    }

    /// First offset the cache holds, if any.
    fn first_offset(&self) -> Option<u64> {
        self.runs
            .front()
            .and_then(|r| r.entries.first())
            .map(|e| e.base_offset)
    }

    /// Adds `run` after evicting the oldest runs to stay within `cap` and
    /// the shared budget. Returns false (and leaves the cache empty, so that
    /// what it holds stays contiguous) if the budget has no room for it.
    fn push(&mut self, run: CachedRun, cap: usize) -> bool {
        if run.entries.is_empty() {
            return true;
        }
        while self.bytes + run.bytes > cap && self.pop_front() {}
        while !self.budget.try_take(run.bytes) {
            if !self.pop_front() {
                return false;
            }
        }
        self.bytes += run.bytes;
        self.runs.push_back(run);
        true
    }

    /// Entries from the one containing `from` up to about `max_bytes`
    /// (at least one), below `end`; `None` if `from` is not cached.
    fn read(&self, from: u64, end: u64, max_bytes: usize) -> Option<Vec<Entry>> {
        if self.first_offset()? > from {
            return None;
        }
        // Runs are never empty and are in offset order.
        let first_run = self
            .runs
            .partition_point(|r| r.entries.last().is_none_or(|e| e.end_offset() <= from));
        if first_run == self.runs.len() {
            return None;
        }
        let mut out = Vec::new();
        let mut taken = 0usize;
        for run in self.runs.iter().skip(first_run) {
            let skip = run.entries.partition_point(|e| e.end_offset() <= from);
            for e in &run.entries[skip..] {
                if e.base_offset >= end || (!out.is_empty() && taken + e.stored_size() > max_bytes)
                {
                    return Some(out);
                }
                taken += e.stored_size();
                out.push(e.clone());
            }
        }
        Some(out)
    }
}

/// One entry to append.
#[derive(Debug, Clone)]
pub struct AppendEntry {
    /// Encoding of `payload`.
    pub format: EntryFormat,
    /// Number of messages in the entry; offsets `base..base + count` are
    /// assigned to it. Must be at least 1.
    pub count: u32,
    /// Timestamp of the first message (ms since the epoch).
    pub first_timestamp: i64,
    /// Largest timestamp of the entry's messages.
    pub max_timestamp: i64,
    /// The bytes to store.
    pub payload: Bytes,
}

/// Where an appended entry landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the entry's first message.
    pub base_offset: u64,
    /// Number of messages (the entry covers `base_offset..base_offset + count`).
    pub count: u32,
}

/// An append that is queued and not yet durable (see [`Ledger::submit`]).
/// Awaiting it gives the append's result; dropping it does not cancel the
/// append.
#[derive(Debug)]
pub struct PendingAppend {
    rx: oneshot::Receiver<Result<Appended>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl PendingAppend {
    /// The result if the append has already completed, without waiting
    /// (for a caller that answers every completed append at once).
    pub fn try_result(&mut self) -> Option<Result<Appended>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(BrokerError::Closed)),
        }
    }
}

impl std::future::Future for PendingAppend {
    type Output = Result<Appended>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(BrokerError::Closed)))
    }
}

/// Point-in-time numbers of a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerStats {
    pub start_offset: u64,
    pub end_offset: u64,
    pub size_bytes: u64,
    pub segments: usize,
    /// fsyncs of segment data since the ledger was opened.
    pub fsyncs: u64,
}

/// Backlog of a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Messages not yet acknowledged.
    pub messages: u64,
    /// Bytes stored from the mark-delete position to the end (entry
    /// granularity: an estimate from the sparse index).
    pub bytes: u64,
}

enum Command {
    Append {
        entry: AppendEntry,
        reply: oneshot::Sender<Result<Appended>>,
    },
    Trim {
        before: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    Retention {
        policy: NamespacePolicy,
        min_cursor: Option<u64>,
        now_ms: i64,
        reply: oneshot::Sender<Result<usize>>,
    },
    Flush {
        reply: oneshot::Sender<Result<()>>,
    },
    SetPolicy(NamespacePolicy),
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// A managed ledger. Shared as `Arc<Ledger>`.
#[derive(Debug)]
pub struct Ledger {
    name: String,
    dir: PathBuf,
    options: LedgerOptions,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    start_offset: AtomicU64,
    end_tx: watch::Sender<u64>,
    /// One past the last durable offset (<= the end).
    durable_tx: watch::Sender<u64>,
    tx: mpsc::Sender<Command>,
    cursors: Mutex<HashMap<String, Arc<Cursor>>>,
    /// Serializes writes of the cursor file; holds the last version written
    /// per cursor.
    cursor_persist: tokio::sync::Mutex<HashMap<String, u64>>,
    cursors_removed: AtomicBool,
    budget: Arc<Semaphore>,
    closed: AtomicBool,
    /// The writer has stopped (closed, or failed): nothing more becomes
    /// durable.
    stopped: AtomicBool,
    fsyncs: AtomicU64,
    /// The last large read buffer, reused when its entries are dropped.
    read_buf: Mutex<Option<Bytes>>,
    /// Recent entries for tailing readers.
    tail: RwLock<TailCache>,
    /// Readers following this ledger from a [`ReadySet`].
    followers: follow::Followers,
    /// Tells this ledger from an earlier one in the same directory (a topic
    /// deleted and created again), for the journal's replay.
    incarnation: u64,
    /// The ledger's key in the journal, if it uses one.
    journal_key: Option<String>,
    metrics: Metrics,
}

/// The ledger's metric handles, made once (a `counter!` on every read and
/// write looked its key up in the registry each time). They belong to the
/// recorder installed when the ledger opens: the gateway installs its
/// recorder before it opens the broker.
#[derive(Debug)]
struct Metrics {
    cache_reads: metrics::Counter,
    reads: metrics::Counter,
    disk_reads: metrics::Counter,
    fsyncs: metrics::Counter,
    fsync_micros: metrics::Counter,
    write_micros: metrics::Counter,
    appends: metrics::Counter,
    append_bytes: metrics::Counter,
    cache_full: metrics::Counter,
    cache_bytes: metrics::Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            cache_reads: metrics::counter!("manifold_ledger_cache_reads_total"),
            reads: metrics::counter!("manifold_ledger_reads_total"),
            disk_reads: metrics::counter!("manifold_ledger_disk_reads_total"),
            fsyncs: metrics::counter!("manifold_ledger_fsyncs_total"),
            fsync_micros: metrics::counter!("manifold_ledger_fsync_micros_total"),
            write_micros: metrics::counter!("manifold_ledger_write_micros_total"),
            appends: metrics::counter!("manifold_ledger_appends_total"),
            append_bytes: metrics::counter!("manifold_ledger_append_bytes_total"),
            cache_full: metrics::counter!("manifold_ledger_cache_full_total"),
            cache_bytes: metrics::gauge!("manifold_ledger_cache_bytes"),
        }
    }
}

/// Largest read tried on the calling (async) thread from the page cache
/// before falling back to the blocking pool: copying and checking this much
/// takes a fraction of a millisecond.
const INLINE_READ_MAX: usize = 1 << 20;

/// A group commit slower than this is logged: it delays every append in it.
const SLOW_WRITE: Duration = Duration::from_millis(100);

const CURSORS_FILE: &str = "cursors.json";
const LEDGER_META_FILE: &str = "ledger.json";

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct LedgerMetaFile {
    start_offset: u64,
    /// See [`Ledger::incarnation`]; 0 in files written before it existed.
    #[serde(default)]
    incarnation: u64,
}

/// A number no earlier ledger in the same directory had (the clock in
/// nanoseconds, the process id and a counter).
fn new_incarnation() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (nanos ^ (u64::from(std::process::id()) << 40) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1)
}

/// Writes `data` to `path` crash-safely: temp file, fsync, rename, fsync of
/// the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    res.map_err(|e| BrokerError::io(path, e))
}

fn write_meta(dir: &Path, meta: &LedgerMetaFile) -> Result<()> {
    let path = dir.join(LEDGER_META_FILE);
    let data = serde_json::to_vec(meta).map_err(|e| BrokerError::Metadata {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&path, &data)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BrokerError::io(dir, e))
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, recovering its last
    /// consistent state: sealed segments are trusted (their index files are
    /// reloaded or rebuilt), the last segment is scanned and a torn or
    /// corrupt tail is truncated and logged. Cursors are reloaded.
    ///
    /// Blocking; must be called on a Tokio runtime (it spawns the writer).
    ///
    /// # Errors
    /// I/O errors on the directory, and unreadable cursor or ledger files.
    pub fn open(
        name: &str,
        dir: &Path,
        policy: NamespacePolicy,
        options: LedgerOptions,
        budget: Arc<Semaphore>,
    ) -> Result<Arc<Ledger>> {
        fs::create_dir_all(dir).map_err(|e| BrokerError::io(dir, e))?;
        let mut meta: LedgerMetaFile = read_json(&dir.join(LEDGER_META_FILE))?.unwrap_or_default();
        if meta.incarnation == 0 {
            meta.incarnation = new_incarnation();
            write_meta(dir, &meta)?;
        }
        let mut bases: Vec<u64> = fs::read_dir(dir)
            .map_err(|e| BrokerError::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| segment::parse_segment_name(&e.file_name().to_string_lossy()))
            .collect();
        bases.sort_unstable();
        // Drop segments wholly below the persisted start (a trim that
        // crashed before deleting them).
        while bases.len() > 1 && bases[1] <= meta.start_offset {
            Segment::remove_files(dir, bases[0]);
            bases.remove(0);
        }
        let mut segments = BTreeMap::new();
        let max_entry = options.max_entry_bytes;
        let count = bases.len();
        for (i, &base) in bases.iter().enumerate() {
            let path = segment::segment_path(dir, base, "log");
            let file = Segment::open_file(&path)?;
            let size = file
                .metadata()
                .map_err(|e| BrokerError::io(&path, e))?
                .len();
            let last = i + 1 == count;
            let (from, index) = match (last, Segment::load_index_files(dir, base, size)) {
                (false, Some(idx)) if !idx.is_empty() => (*idx.last().unwrap_or(&idx[0]), idx),
                _ => (
                    IndexPoint {
                        offset: base,
                        pos: 0,
                        max_ts_before: i64::MIN,
                    },
                    Vec::new(),
                ),
            };
            let index_from_file = !index.is_empty();
            let mut res = segment::scan(&file, from, index, max_entry)
                .map_err(|e| BrokerError::io(&path, e))?;
            if index_from_file && res.stopped.is_some() {
                // The index did not match the data: rebuild from scratch.
                res = segment::scan(
                    &file,
                    IndexPoint {
                        offset: base,
                        pos: 0,
                        max_ts_before: i64::MIN,
                    },
                    Vec::new(),
                    max_entry,
                )
                .map_err(|e| BrokerError::io(&path, e))?;
            }
            let next_base = bases.get(i + 1).copied();
            let zero_tail = res.stopped.is_some()
                && segment::is_zero(&file, res.valid_size, size)
                    .map_err(|e| BrokerError::io(&path, e))?;
            if zero_tail {
                // The zeros the writer keeps ahead of its appends
                // (`segment::ZERO_AHEAD`): the clean end of the segment.
                tracing::debug!(ledger = name, segment = %path.display(),
                    valid_bytes = res.valid_size, file_bytes = size, "dropping the zeros after the last entry");
                file.set_len(res.valid_size)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| BrokerError::io(&path, e))?;
            } else if let Some(why) = res.stopped {
                tracing::warn!(
                    ledger = name,
                    segment = %path.display(),
                    valid_bytes = res.valid_size,
                    file_bytes = size,
                    reason = why,
                    "truncating invalid segment tail"
                );
                file.set_len(res.valid_size)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| BrokerError::io(&path, e))?;
                if next_base.is_some() {
                    // A hole in the middle of the ledger: later segments
                    // cannot be trusted to follow on. Keep the consistent
                    // prefix only.
                    for &b in &bases[i + 1..] {
                        tracing::warn!(
                            ledger = name,
                            base = b,
                            "dropping segment after a corrupt one"
                        );
                        Segment::remove_files(dir, b);
                    }
                }
            } else if let Some(nb) = next_base {
                if nb != res.end_offset {
                    tracing::warn!(
                        ledger = name,
                        base = nb,
                        expected = res.end_offset,
                        "segment does not follow its predecessor; dropping it and later ones"
                    );
                    for &b in &bases[i + 1..] {
                        Segment::remove_files(dir, b);
                    }
                }
            }
            let broken = res.stopped.is_some() || next_base.is_some_and(|nb| nb != res.end_offset);
            let seg = Segment::from_scan(base, path, file, res);
            if !last || broken {
                seg.write_index_files(dir)?;
            }
            segments.insert(base, Arc::new(seg));
            if broken {
                break;
            }
        }
        if segments.is_empty() {
            let seg = Segment::create(dir, meta.start_offset)?;
            sync_dir(dir)?;
            segments.insert(meta.start_offset, Arc::new(seg));
        }
        let first_base = *segments.keys().next().unwrap_or(&0);
        let end = segments.values().next_back().map_or(0, |s| s.end());
        let start = meta.start_offset.max(first_base).min(end);

        let (tx, rx) = mpsc::channel(options.queue_depth.max(1));
        let options_journal_key = options.journal.as_ref().and_then(|j| j.key_for(dir));
        let tail = RwLock::new(TailCache::new(options.cache_budget.clone()));
        let (end_tx, _) = watch::channel(end);
        let (durable_tx, _) = watch::channel(end);
        let cursors = load_cursors(&dir.join(CURSORS_FILE))?;
        let persisted: HashMap<String, u64> = cursors
            .iter()
            .map(|(n, c)| (n.clone(), c.version()))
            .collect();
        for c in cursors.values() {
            // A cursor persisted past entries a crash lost (they were
            // visible before their fdatasync) must not skip the entries
            // that will be written at those offsets.
            if c.clamp_below(end) {
                tracing::info!(
                    ledger = name,
                    cursor = c.name(),
                    end,
                    "cursor clamped to the recovered end"
                );
            }
        }
        let ledger = Arc::new(Ledger {
            name: name.to_owned(),
            dir: dir.to_owned(),
            options,
            segments: RwLock::new(segments),
            start_offset: AtomicU64::new(start),
            end_tx,
            durable_tx,
            tx,
            cursor_persist: tokio::sync::Mutex::new(persisted),
            cursors: Mutex::new(cursors),
            cursors_removed: AtomicBool::new(false),
            budget,
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            read_buf: Mutex::new(None),
            tail,
            followers: follow::Followers::default(),
            incarnation: meta.incarnation,
            journal_key: options_journal_key,
            metrics: Metrics::new(),
        });
        let writer = Writer::new(ledger.clone(), policy)?;
        tokio::spawn(writer.run(rx));
        Ok(ledger)
    }

    /// The ledger's name (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// First offset that can be read.
    pub fn start_offset(&self) -> u64 {
        self.start_offset.load(Ordering::Acquire)
    }

    /// One past the last written (readable) offset: the next offset to be
    /// assigned once everything queued is written. Entries below it may
    /// not be durable yet (see [`Ledger::durable_end`]).
    pub fn end_offset(&self) -> u64 {
        *self.end_tx.borrow()
    }

    /// A receiver of the end offset, changed whenever new entries are
    /// written. Tailing readers wait on it.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end_tx.subscribe()
    }

    /// One past the last offset that is durable under the namespace's
    /// fsync policy (under `interval`: fsynced by the last periodic sync).
    pub fn durable_end(&self) -> u64 {
        *self.durable_tx.borrow()
    }

    /// Waits until every offset below `offset` is durable (returns at once
    /// if it already is).
    ///
    /// # Errors
    /// [`BrokerError::Closed`] if the ledger closes or fails first.
    pub async fn wait_durable(&self, offset: u64) -> Result<()> {
        let mut rx = self.durable_tx.subscribe();
        let mut stopped = false;
        rx.wait_for(|&d| {
            stopped = self.stopped.load(Ordering::Acquire);
            stopped || d >= offset
        })
        .await
        .map_err(|_| BrokerError::Closed)?;
        if stopped && self.durable_end() < offset {
            return Err(BrokerError::Closed);
        }
        Ok(())
    }

    /// Appends one entry; completes once it is durable under the
    /// namespace's fsync policy. Same as `submit(entry).await?.await`.
    ///
    /// Back-pressure: waits for room in the broker's in-flight memory budget
    /// and in the ledger's append queue.
    ///
    /// # Errors
    /// [`BrokerError::EntryTooLarge`], [`BrokerError::InvalidArgument`] for
    /// a zero count, [`BrokerError::Closed`], and I/O errors of the write
    /// (the entry is then not stored).
    pub async fn append(&self, entry: AppendEntry) -> Result<Appended> {
        self.submit(entry).await?.await
    }

    /// Queues one entry for appending and returns once it is queued, with
    /// a [`PendingAppend`] that completes when it is durable. Entries one
    /// task submits one after the other are stored in that order, so a
    /// connection can keep many appends in flight (and answer them in
    /// order) without waiting for each one's fsync before reading the next
    /// request.
    ///
    /// Back-pressure: waits for room in the broker's in-flight memory budget
    /// (held until the append completes) and in the ledger's append queue.
    ///
    /// # Errors
    /// As [`Ledger::append`], for what can be known before the write.
    pub async fn submit(&self, entry: AppendEntry) -> Result<PendingAppend> {
        let units = self.admit(&entry)?;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| BrokerError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append { entry, reply })
            .await
            .map_err(|_| BrokerError::Closed)?;
        Ok(PendingAppend {
            rx,
            _permit: permit,
        })
    }

    /// The checks of an append that need no writer, and the in-flight
    /// budget units it holds (`payload / 1024 + 1`, at most the whole
    /// budget).
    fn admit(&self, entry: &AppendEntry) -> Result<u32> {
        if entry.payload.len() > self.options.max_entry_bytes {
            return Err(BrokerError::EntryTooLarge {
                size: entry.payload.len(),
                max: self.options.max_entry_bytes,
            });
        }
        if entry.count == 0 {
            return Err(BrokerError::InvalidArgument(
                "entry with zero messages".into(),
            ));
        }
        Ok(((entry.payload.len() / 1024 + 1) as u32).min(self.options.budget_units.max(1)))
    }

    /// [`Ledger::submit`] without waiting: `Err` gives the entry back when
    /// it would wait for room in the in-flight budget or the append queue
    /// (submit it then). `Ok(Err)` is an error known before the write, as
    /// with `submit`.
    #[allow(clippy::result_large_err)]
    pub fn try_submit(
        &self,
        entry: AppendEntry,
    ) -> std::result::Result<Result<PendingAppend>, AppendEntry> {
        let units = match self.admit(&entry) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        let permit = match self.budget.clone().try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Ok(Err(BrokerError::Closed)),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(entry),
        };
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Command::Append { entry, reply }) {
            Ok(()) => Ok(Ok(PendingAppend {
                rx,
                _permit: permit,
            })),
            Err(mpsc::error::TrySendError::Full(Command::Append { entry, .. })) => Err(entry),
            Err(_) => Ok(Err(BrokerError::Closed)),
        }
    }

    /// Reads entries from `from` until about `max_bytes` are collected
    /// (always at least one entry if any exists at `from`). The first entry
    /// returned is the one containing `from`, so its `base_offset` may be
    /// below `from`. Returns an empty vector at the end of the ledger.
    ///
    /// # Errors
    /// [`BrokerError::OffsetOutOfRange`] if `from` is below the start or
    /// above the end; [`BrokerError::Corrupt`] if stored data fails its
    /// checksum.
    pub async fn read(self: &Arc<Self>, from: u64, max_bytes: usize) -> Result<Vec<Entry>> {
        let start = self.start_offset();
        let end = self.end_offset();
        if from < start || from > end {
            return Err(BrokerError::OffsetOutOfRange {
                offset: from,
                start,
                end,
            });
        }
        if from == end {
            return Ok(Vec::new());
        }
        let cached = self
            .tail
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .read(from, end, max_bytes);
        if let Some(entries) = cached {
            if !entries.is_empty() {
                self.metrics.cache_reads.increment(1);
                return Ok(entries);
            }
        }
        // Data in the page cache is read right here: a hop to the blocking
        // pool and back costs about as much as copying and checking a
        // megabyte. Only a read that would wait for the disk goes there.
        if max_bytes <= INLINE_READ_MAX {
            match self.read_segments(from, end, max_bytes, ReadMode::CachedOnly) {
                Ok(entries) => {
                    self.metrics.reads.increment(1);
                    return Ok(entries);
                }
                Err(BrokerError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let this = self.clone();
        let entries = tokio::task::spawn_blocking(move || {
            this.read_segments(from, end, max_bytes, ReadMode::Blocking)
        })
        .await
        .map_err(|_| BrokerError::Closed)??;
        self.metrics.reads.increment(1);
        self.metrics.disk_reads.increment(1);
        Ok(entries)
    }

    fn read_segments(
        &self,
        from: u64,
        end: u64,
        max_bytes: usize,
        mode: ReadMode,
    ) -> Result<Vec<Entry>> {
        let segs: Vec<Arc<Segment>> = {
            let map = self.segments.read().unwrap_or_else(|e| e.into_inner());
            let first = map.range(..=from).next_back().map(|(&b, _)| b).unwrap_or(0);
            map.range(first..).map(|(_, s)| s.clone()).collect()
        };
        let mut out = Vec::new();
        let mut budget = max_bytes;
        let mut offset = from;
        for seg in segs {
            if offset >= end || (budget == 0 && !out.is_empty()) {
                break;
            }
            let limit = seg.size();
            let seg_end = seg.end();
            if offset >= seg_end {
                continue;
            }
            // Find the entry containing `offset`, starting at the index floor.
            let mut pos = seg.floor_pos(offset);
            while let Some(h) = seg.header_at(pos, limit, mode)? {
                if h.base_offset + u64::from(h.count) > offset {
                    break;
                }
                pos += h.frame_size();
            }
            let read = seg.read_entries(
                pos..limit,
                budget,
                self.options.max_entry_bytes,
                &mut out,
                &self.read_buf,
                mode,
            )?;
            budget = budget.saturating_sub(read);
            if let Some(last) = out.last() {
                offset = last.end_offset();
            }
            // The budget ran out inside this segment: the next segment's
            // entries would not follow on from what was read.
            if offset < seg_end {
                break;
            }
        }
        out.retain(|e| e.base_offset < end);
        Ok(out)
    }

    /// Like [`Ledger::read`], but if `from` is at the end, waits up to
    /// `timeout` for new entries (woken as soon as they are written), or
    /// until the ledger closes.
    ///
    /// # Errors
    /// As [`Ledger::read`]; [`BrokerError::Closed`] once the ledger closed.
    pub async fn read_or_wait(
        self: &Arc<Self>,
        from: u64,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<Entry>> {
        let mut rx = self.watch_end();
        if *rx.borrow_and_update() <= from {
            let waited =
                tokio::time::timeout(timeout, rx.wait_for(|&end| end > from || self.is_closed()))
                    .await;
            match waited {
                Err(_) => return Ok(Vec::new()),
                Ok(Err(_)) => return Err(BrokerError::Closed),
                Ok(Ok(_)) if self.is_closed() => return Err(BrokerError::Closed),
                Ok(Ok(_)) => {}
            }
        }
        self.read(from, max_bytes).await
    }

    /// The first offset whose entry has a timestamp at or after `ts`, or
    /// `None` if every entry is older. Entry granularity: the offset
    /// returned is the base offset of the first such entry.
    ///
    /// # Errors
    /// I/O errors reading segment headers.
    pub async fn find_offset_by_timestamp(self: &Arc<Self>, ts: i64) -> Result<Option<u64>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.find_by_ts_blocking(ts))
            .await
            .map_err(|_| BrokerError::Closed)?
    }

    fn find_by_ts_blocking(&self, ts: i64) -> Result<Option<u64>> {
        let start = self.start_offset();
        let segs: Vec<Arc<Segment>> = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for seg in segs {
            if seg.max_timestamp.load(Ordering::Acquire) < ts {
                continue;
            }
            let limit = seg.size();
            let mut pos = seg.time_floor_pos(ts);
            while let Some(h) = seg.header_at(pos, limit, ReadMode::Blocking)? {
                if h.max_timestamp >= ts && h.base_offset + u64::from(h.count) > start {
                    return Ok(Some(h.base_offset.max(start)));
                }
                pos += h.frame_size();
            }
        }
        Ok(None)
    }

    /// Moves the start offset forward to `before` (clamped to the end):
    /// offsets below it can no longer be read, and segments wholly below it
    /// are deleted. Returns the new start offset.
    ///
    /// # Errors
    /// [`BrokerError::Closed`] or I/O errors persisting the new start.
    pub async fn trim(&self, before: u64) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Trim { before, reply })
            .await
            .map_err(|_| BrokerError::Closed)?;
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    /// Applies a retention policy: deletes the oldest sealed segments that
    /// every durable cursor has passed and that are older than
    /// `retention_ms` or beyond `retention_bytes`. Returns how many
    /// segments were deleted.
    ///
    /// # Errors
    /// [`BrokerError::Closed`] or I/O errors.
    pub async fn apply_retention(&self, policy: &NamespacePolicy, now_ms: i64) -> Result<usize> {
        let min_cursor = {
            let cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            cursors
                .values()
                .filter(|c| c.is_durable() && c.holds_retention())
                .map(|c| c.mark_delete())
                .min()
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Retention {
                policy: policy.clone(),
                min_cursor,
                now_ms,
                reply,
            })
            .await
            .map_err(|_| BrokerError::Closed)?;
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    /// Changes the policy used by the writer (fsync, rollover).
    pub async fn set_policy(&self, policy: NamespacePolicy) {
        let _ = self.tx.send(Command::SetPolicy(policy)).await;
    }

    /// Forces everything written to disk (used at shutdown and by the
    /// `interval` policy's callers that need a barrier).
    ///
    /// # Errors
    /// I/O errors of the fsync.
    pub async fn flush(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush { reply })
            .await
            .map_err(|_| BrokerError::Closed)?;
        rx.await.map_err(|_| BrokerError::Closed)?
    }

    /// Flushes, persists cursors and stops the writer. Appends after this
    /// fail with [`BrokerError::Closed`].
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.persist_cursors().await {
            tracing::warn!(ledger = %self.name, error = %e, "could not persist cursors at close");
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(ledger = %self.name, error = %e, "could not flush at close");
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Close { reply }).await.is_ok() {
            let _ = rx.await;
        }
        // The writer has stopped: give the cache's share of the budget back.
        self.tail.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.followers.wake();
        // Tailing readers waiting on the end (`watch_end`) look again and
        // find the ledger closed.
        self.end_tx.send_modify(|_| {});
    }

    /// Whether [`Ledger::close`] (or a delete) has begun: a follower stops
    /// reading.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Registers `set` to be given `token` whenever this ledger's end
    /// moves, and when it closes, until the returned [`Follow`] is dropped.
    /// The token is given once at once, so the reader looks at the entries
    /// already there.
    pub fn follow(&self, set: &Arc<ReadySet>, token: u32) -> Follow {
        self.followers.add(set, token)
    }

    /// Closes the ledger and removes its directory.
    ///
    /// # Errors
    /// I/O errors removing the files.
    pub async fn delete(&self) -> Result<()> {
        self.close().await;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BrokerError::io(&dir, e)),
        })
        .await
        .map_err(|_| BrokerError::Closed)?
    }

    /// Size, offsets and segment count.
    pub fn stats(&self) -> LedgerStats {
        let map = self.segments.read().unwrap_or_else(|e| e.into_inner());
        LedgerStats {
            start_offset: self.start_offset(),
            end_offset: self.end_offset(),
            size_bytes: map.values().map(|s| s.size()).sum(),
            segments: map.len(),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
        }
    }

    /// Bytes stored before `offset` (estimate at index granularity).
    fn position_of(&self, offset: u64) -> u64 {
        let map = self.segments.read().unwrap_or_else(|e| e.into_inner());
        let mut total = 0;
        for seg in map.values() {
            if seg.end() <= offset {
                total += seg.size();
            } else {
                if offset > seg.base {
                    total += seg.floor_pos(offset);
                }
                break;
            }
        }
        total
    }

    // ---- cursors ----

    /// Opens the durable cursor `name`, creating it at `initial` if it does
    /// not exist (an existing cursor keeps its position). A new cursor is
    /// persisted before this returns.
    ///
    /// # Errors
    /// [`BrokerError::InvalidName`] for an empty name; I/O errors persisting.
    pub async fn open_cursor(&self, name: &str, initial: InitialPosition) -> Result<Arc<Cursor>> {
        self.open_cursor_with(name, initial, CursorOptions::default())
            .await
    }

    /// Like [`Ledger::open_cursor`], with options for a new cursor (an
    /// existing cursor keeps the options it was created with).
    ///
    /// # Errors
    /// As [`Ledger::open_cursor`].
    pub async fn open_cursor_with(
        &self,
        name: &str,
        initial: InitialPosition,
        options: CursorOptions,
    ) -> Result<Arc<Cursor>> {
        if name.is_empty() {
            return Err(BrokerError::InvalidName {
                name: String::new(),
                reason: "empty cursor name",
            });
        }
        let (cursor, created) = {
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            match cursors.get(name) {
                Some(c) => (c.clone(), false),
                None => {
                    let c = Arc::new(Cursor::with_retention(
                        name,
                        true,
                        options.holds_retention,
                        self.initial_offset(initial),
                    ));
                    cursors.insert(name.to_owned(), c.clone());
                    (c, true)
                }
            }
        };
        if created {
            self.persist_cursors().await?;
        }
        Ok(cursor)
    }

    /// A non-durable cursor (a reader): not persisted, holds nothing back.
    pub fn open_reader(&self, initial: InitialPosition) -> Cursor {
        Cursor::new("", false, self.initial_offset(initial))
    }

    fn initial_offset(&self, initial: InitialPosition) -> u64 {
        let (start, end) = (self.start_offset(), self.end_offset());
        match initial {
            InitialPosition::Earliest => start,
            InitialPosition::Latest => end,
            InitialPosition::Offset(o) => o.clamp(start, end),
        }
    }

    /// The durable cursor `name`, if it exists.
    pub fn cursor(&self, name: &str) -> Option<Arc<Cursor>> {
        self.cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Names of the durable cursors.
    pub fn cursor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Deletes the durable cursor `name` (persisted before returning).
    /// Returns whether it existed.
    ///
    /// # Errors
    /// I/O errors persisting.
    pub async fn delete_cursor(&self, name: &str) -> Result<bool> {
        let existed = self
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some();
        if existed {
            self.cursors_removed.store(true, Ordering::Release);
            self.persist_cursors().await?;
        }
        Ok(existed)
    }

    /// Moves `cursor` to `offset`, clamped into `[start, end]`.
    pub fn seek(&self, cursor: &Cursor, offset: u64) {
        cursor.reset(offset.clamp(self.start_offset(), self.end_offset()));
    }

    /// Moves `cursor` to the first entry with a timestamp at or after `ts`
    /// (the end if there is none).
    ///
    /// # Errors
    /// As [`Ledger::find_offset_by_timestamp`].
    pub async fn seek_timestamp(self: &Arc<Self>, cursor: &Cursor, ts: i64) -> Result<u64> {
        let o = self
            .find_offset_by_timestamp(ts)
            .await?
            .unwrap_or_else(|| self.end_offset());
        self.seek(cursor, o);
        Ok(o)
    }

    /// Messages and bytes between `cursor` and the end of the ledger.
    pub fn backlog(&self, cursor: &Cursor) -> Backlog {
        let (start, end) = (self.start_offset(), self.end_offset());
        cursor.clamp_to(start);
        let md = cursor.mark_delete().min(end);
        let acked_above = cursor.acked_above_mark_delete();
        let size: u64 = self.stats().size_bytes;
        let before = self.position_of(md);
        Backlog {
            messages: (end - md).saturating_sub(acked_above),
            bytes: size.saturating_sub(before),
        }
    }

    /// Persists every durable cursor changed since the last call
    /// (crash-safe: the whole cursor file is replaced atomically). Returns
    /// once the state is on disk.
    ///
    /// # Errors
    /// I/O errors writing the file.
    pub async fn persist_cursors(&self) -> Result<()> {
        let mut written = self.cursor_persist.lock().await;
        let cursors: Vec<Arc<Cursor>> = self
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let removed = self.cursors_removed.swap(false, Ordering::AcqRel);
        let changed = cursors
            .iter()
            .any(|c| written.get(c.name()) != Some(&c.version()));
        if !changed && !removed {
            return Ok(());
        }
        let mut snaps = BTreeMap::new();
        let mut versions = HashMap::new();
        for c in &cursors {
            let (s, v) = c.snapshot();
            snaps.insert(c.name().to_owned(), s);
            versions.insert(c.name().to_owned(), v);
        }
        let data = serde_json::to_vec(&snaps).map_err(|e| BrokerError::Metadata {
            path: self.dir.join(CURSORS_FILE),
            reason: e.to_string(),
        })?;
        let path = self.dir.join(CURSORS_FILE);
        tokio::task::spawn_blocking(move || write_atomic(&path, &data))
            .await
            .map_err(|_| BrokerError::Closed)??;
        *written = versions;
        Ok(())
    }

    /// Individually acknowledged ranges of `cursor` (for diagnostics).
    pub fn acked_ranges(cursor: &Cursor) -> Vec<Range<u64>> {
        cursor.acked_ranges()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| BrokerError::Metadata {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BrokerError::io(path, e)),
    }
}

fn load_cursors(path: &Path) -> Result<HashMap<String, Arc<Cursor>>> {
    let snaps: BTreeMap<String, CursorSnapshot> = read_json(path)?.unwrap_or_default();
    Ok(snaps
        .into_iter()
        .map(|(n, s)| {
            let c = Arc::new(Cursor::from_snapshot(&n, s));
            (n, c)
        })
        .collect())
}

/// Largest run the writer writes on its own task (see
/// `Writer::fits_inline`); larger ones go to a blocking thread.
const INLINE_WRITE_MAX: usize = 64 * 1024;

/// Smallest step of zeros the writer adds ahead of a segment's end at a
/// time (see `Writer::zero_step`).
const ZERO_STEP: u64 = 16 * 1024;

type AppendReply = oneshot::Sender<Result<Appended>>;

/// Group commit under the `group` policy, decoupled from writing: runs are
/// written and published as they arrive, and one fdatasync at a time covers
/// everything written before it started and completes those appends. What
/// arrives during an fdatasync is readable at once and acknowledged by the
/// next one.
#[derive(Default)]
struct SyncPipe {
    /// Written; waiting for an fdatasync to start.
    waiting: Vec<(AppendReply, Appended)>,
    /// The fdatasync running, the end offset it covers, and its appends.
    #[allow(clippy::type_complexity)]
    inflight: Option<(
        tokio::task::JoinHandle<(std::io::Result<()>, Duration)>,
        u64,
        Vec<(AppendReply, Appended)>,
    )>,
}

/// The result of a blocking task of the writer. A panic in it is a bug,
/// passed on.
async fn joined<T>(h: &mut tokio::task::JoinHandle<T>) -> T {
    match h.await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl SyncPipe {
    /// Waits for the running fdatasync (pending forever if none).
    async fn wait(&mut self) -> (std::io::Result<()>, Duration) {
        match self.inflight.as_mut() {
            Some((h, _, _)) => joined(h).await,
            None => std::future::pending().await,
        }
    }
}

/// The writer's private state: the active segment and its append position.
struct Writer {
    ledger: Arc<Ledger>,
    policy: NamespacePolicy,
    active: Arc<Segment>,
    size: u64,
    next_offset: u64,
    max_ts: i64,
    last_index_pos: Option<u64>,
    opened_at: Instant,
    /// Written but not yet fsynced (interval policy).
    dirty: bool,
    /// A write failed and could not be undone: refuse further appends.
    failed: bool,
    buf: Vec<u8>,
    /// The active segment's file holds zeros from `size` up to here
    /// (`segment::ZERO_AHEAD`; kept only where wanted, see
    /// `Writer::zeros_wanted`).
    zeroed_to: u64,
    /// `write_batch` keeps the run it writes (for the journal) in
    /// `kept_run`: its position in the active segment and its bytes.
    keep_run: bool,
    kept_run: Option<(u64, Bytes)>,
    /// Every entry below this offset is in segment data an fdatasync (or
    /// a sealing sync) has made durable.
    synced_to: u64,
    /// The end of the last run written outside the journal. A run may be
    /// journaled only when everything written before it outside the
    /// journal is durable (`synced_to >= unjournaled_to`): the journal
    /// replays its own runs, and an acknowledged run replayed after a hole
    /// of lost bytes would be cut off by recovery with the hole.
    unjournaled_to: u64,
}

impl Writer {
    fn new(ledger: Arc<Ledger>, policy: NamespacePolicy) -> Result<Writer> {
        let active = ledger
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .next_back()
            .cloned()
            .ok_or(BrokerError::Closed)?;
        let last_index_pos = active
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .map(|p| p.pos);
        Ok(Writer {
            size: active.size(),
            zeroed_to: active.size(),
            next_offset: active.end(),
            max_ts: active.max_timestamp.load(Ordering::Acquire),
            last_index_pos,
            opened_at: Instant::now(),
            dirty: false,
            failed: false,
            buf: Vec::new(),
            keep_run: false,
            kept_run: None,
            // What recovery found may be in the page cache only (after a
            // process crash): not durable until the first segment sync.
            synced_to: 0,
            unjournaled_to: active.end(),
            active,
            ledger,
            policy,
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut pending: Option<Command> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(self.policy.fsync_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pipe = SyncPipe::default();
        loop {
            let interval = self.policy.fsync == FsyncPolicy::Interval;
            let cmd = match pending.take() {
                Some(c) => c,
                None => tokio::select! {
                    c = rx.recv() => match c {
                        Some(c) => c,
                        None => {
                            self.settle(&mut pipe).await;
                            self.stop();
                            return;
                        }
                    },
                    r = pipe.wait(), if pipe.inflight.is_some() => {
                        self.finish_sync(r, &mut pipe);
                        self.start_sync(&mut pipe);
                        continue;
                    }
                    _ = tick.tick(), if self.dirty && interval => {
                        // Not with the writer moved to a blocking thread,
                        // as it was: appends then waited for the whole
                        // fdatasync (milliseconds for a tenth of a second
                        // of appends) every `fsync_interval_ms`.
                        self.spawn_sync(&mut pipe);
                        continue;
                    }
                },
            };
            match cmd {
                Command::Append { entry, reply } => {
                    let mut batch = vec![(entry, reply)];
                    let mut bytes = batch[0].0.payload.len();
                    while bytes < self.ledger.options.max_batch_bytes {
                        match rx.try_recv() {
                            Ok(Command::Append { entry, reply }) => {
                                bytes += entry.payload.len();
                                batch.push((entry, reply));
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let (entries, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let group = self.policy.fsync == FsyncPolicy::Group;
                    // `always` fdatasyncs inside the write: never inline.
                    let inline = self.policy.fsync != FsyncPolicy::Always;
                    let journal = match (&self.ledger.options.journal, &self.ledger.journal_key) {
                        (Some(j), Some(_)) if group && self.synced_to >= self.unjournaled_to => {
                            Some(j.clone())
                        }
                        _ => None,
                    };
                    let results = if inline && self.fits_inline(&entries, journal.is_some()) {
                        // A small copy into the page cache without a
                        // rollover: microseconds. Under `group` with a
                        // journal, the journal makes the run durable.
                        self.keep_run = journal.is_some();
                        let r = self.write_batch(&entries);
                        self.keep_run = false;
                        r
                    } else {
                        // It may zero ahead or roll over itself.
                        let (w, r) = self
                            .blocking(move |mut w| {
                                let r = w.write_batch(&entries);
                                (w, r)
                            })
                            .await;
                        self = w;
                        r
                    };
                    let run = self.kept_run.take();
                    let zeros = self.zeros_wanted(run.is_some()) && self.zeros_short();
                    let mut journaled = Vec::new();
                    for (reply, r) in replies.into_iter().zip(results) {
                        match r {
                            Ok(a) if run.is_some() => journaled.push((reply, a)),
                            Ok(a) if group => pipe.waiting.push((reply, a)),
                            r => {
                                let _ = reply.send(r);
                            }
                        }
                    }
                    if let (Some(j), Some((pos, data))) = (journal, run) {
                        j.submit(journal::Record {
                            ledger: self.ledger.clone(),
                            seg: self.active.clone(),
                            pos,
                            data,
                            end: self.next_offset,
                            replies: journaled,
                        });
                    }
                    self.start_sync(&mut pipe);
                    if zeros {
                        // What this run woke (the readers of the ledger)
                        // runs first.
                        tokio::task::yield_now().await;
                        self.zero_step(bytes as u64);
                    }
                }
                Command::Trim { before, reply } => {
                    let (w, r) = self
                        .blocking(move |mut w| {
                            let r = w.trim(before);
                            (w, r)
                        })
                        .await;
                    self = w;
                    let _ = reply.send(r);
                }
                Command::Retention {
                    policy,
                    min_cursor,
                    now_ms,
                    reply,
                } => {
                    let (w, r) = self
                        .blocking(move |mut w| {
                            let r = w.retention(&policy, min_cursor, now_ms);
                            (w, r)
                        })
                        .await;
                    self = w;
                    let _ = reply.send(r);
                }
                Command::Flush { reply } => {
                    self.settle(&mut pipe).await;
                    let (w, r) = self
                        .blocking(|mut w| {
                            let r = w.sync();
                            (w, r)
                        })
                        .await;
                    self = w;
                    let _ = reply.send(r);
                }
                Command::SetPolicy(p) => {
                    self.settle(&mut pipe).await;
                    if p.fsync_interval_ms != self.policy.fsync_interval_ms {
                        tick = tokio::time::interval(Duration::from_millis(p.fsync_interval_ms));
                    }
                    self.policy = p;
                }
                Command::Close { reply } => {
                    self.settle(&mut pipe).await;
                    let (w, _) = self
                        .blocking(|mut w| {
                            let r = w.sync();
                            // Closed cleanly, the segment ends at its last
                            // entry (only a crash leaves the zeros ahead).
                            if w.zeroed_to > w.size && w.active.file.set_len(w.size).is_ok() {
                                w.zeroed_to = w.size;
                            }
                            (w, r)
                        })
                        .await;
                    let _ = w.active.write_index_files(&w.ledger.dir);
                    self = w;
                    self.stop();
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    /// Whether `entries` can be written on the writer's task instead of a
    /// blocking thread: a small run without a rollover, into the zeros
    /// already ahead of the segment's end where they are wanted (see
    /// [`Writer::zeros_wanted`]; `journaled`: the journal will make the run
    /// durable). Such a write is a copy into the page cache.
    fn fits_inline(&self, entries: &[AppendEntry], journaled: bool) -> bool {
        let len: usize = entries
            .iter()
            .map(|e| ENTRY_OVERHEAD + e.payload.len())
            .sum();
        !self.failed
            && len <= INLINE_WRITE_MAX
            && (!self.zeros_wanted(journaled) || self.size + len as u64 <= self.zeroed_to)
            && !self.should_roll(len)
    }

    /// Whether a run gets zeros ahead of it in the segment: only where the
    /// segment's own fdatasync completes appends (`always`, and `group`
    /// outside the journal), which the zeros spare an inode write each
    /// (see [`segment::ZERO_AHEAD`]). A journaled run is made durable by
    /// the journal's fdatasync and its segment is synced only at a
    /// checkpoint; under `interval` one fdatasync covers many appends.
    fn zeros_wanted(&self, journaled: bool) -> bool {
        !journaled && self.policy.fsync != FsyncPolicy::Interval
    }

    /// Whether fewer than [`segment::ZERO_AHEAD`] bytes of zeros are left
    /// ahead of the active segment's end (and the segment has room for more).
    fn zeros_short(&self) -> bool {
        let from = self.zeroed_to.max(self.size);
        !self.failed
            && from - self.size < segment::ZERO_AHEAD
            && from < self.policy.segment_bytes.max(self.size)
    }

    /// Extends the zeros ahead of the segment's end by one step, on the
    /// writer's own task: [`ZERO_STEP`], or the `consumed` bytes the last
    /// run took from them if more, so that small runs keep landing in
    /// zeros instead of stopping for a whole [`segment::ZERO_AHEAD`] of
    /// them (measured: about 2.5 ms for 1 MiB into memory the VM had not
    /// touched yet).
    ///
    /// Not on a thread of its own, as it was: a buffered write holds the
    /// file's inode lock for its whole length, and the kernel may preempt
    /// the writing thread in the middle of it. Appends on a runtime worker
    /// then waited for the zeroing thread to run again, up to 2.6 ms at
    /// 20,000 MQTT messages/s and 0.5 ms at p50 (4 ms at most) at 50,000,
    /// where the zeroing thread, switched out in `generic_perform_write`
    /// -> `__cond_resched`, waited up to 615 ms to run again
    /// (`perf record -e sched:sched_switch -g`). Here the file has one
    /// writer.
    fn zero_step(&mut self, consumed: u64) {
        let from = self.zeroed_to.max(self.size);
        let step = consumed.div_ceil(ZERO_STEP).max(1) * ZERO_STEP;
        let to = (from + step).min(self.policy.segment_bytes.max(self.size));
        if to <= from {
            return;
        }
        match segment::write_zeros(&self.active.file, from, to) {
            Ok(()) => self.zeroed_to = to,
            Err(e) => {
                tracing::warn!(ledger = %self.ledger.name, error = %e, "zeroing ahead failed");
            }
        }
    }

    /// Starts an fdatasync covering every append written so far, if an
    /// append waits for one, unless one is running (its completion starts
    /// the next).
    fn start_sync(&mut self, pipe: &mut SyncPipe) {
        if !pipe.waiting.is_empty() {
            self.spawn_sync(pipe);
        }
    }

    /// Starts an fdatasync covering everything written so far on a
    /// blocking thread, unless one is running; the writer goes on writing
    /// meanwhile. Under `interval` (nobody waits) its completion only moves
    /// the durable end.
    fn spawn_sync(&mut self, pipe: &mut SyncPipe) {
        if pipe.inflight.is_some() {
            return;
        }
        if self.failed {
            for (reply, _) in pipe.waiting.drain(..) {
                let _ = reply.send(Err(BrokerError::Closed));
            }
            return;
        }
        self.ledger.metrics.fsyncs.increment(1);
        self.ledger.fsyncs.fetch_add(1, Ordering::Relaxed);
        let seg = self.active.clone();
        let drop_below = self.drop_below();
        let handle = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let r = seg.file.sync_data();
            // Timed before the drop: the metric is the fdatasync's.
            let took = t0.elapsed();
            if r.is_ok() {
                if let Some(upto) = drop_below {
                    seg.drop_cached_below(upto);
                }
            }
            (r, took)
        });
        pipe.inflight = Some((handle, self.next_offset, std::mem::take(&mut pipe.waiting)));
    }

    /// Completes the appends of the fdatasync that just finished (or, if
    /// it failed, stops the writer and fails them and everything after).
    fn finish_sync(&mut self, r: (std::io::Result<()>, Duration), pipe: &mut SyncPipe) {
        let Some((_, end, group)) = pipe.inflight.take() else {
            return;
        };
        let (r, took) = r;
        self.ledger
            .metrics
            .fsync_micros
            .increment(took.as_micros() as u64);
        if took >= SLOW_WRITE {
            tracing::warn!(ledger = %self.ledger.name, ms = took.as_millis() as u64,
                appends = group.len(), "slow group commit (fdatasync)");
        }
        match r {
            Ok(()) => {
                if end == self.next_offset {
                    self.dirty = false;
                }
                self.synced_to = self.synced_to.max(end);
                self.ledger.durable_tx.send_if_modified(|d| {
                    let moved = end > *d;
                    *d = (*d).max(end);
                    moved
                });
                for (reply, a) in group {
                    let _ = reply.send(Ok(a));
                }
            }
            Err(e) => {
                let err = self.fsync_failed(e);
                for (reply, _) in group.into_iter().chain(pipe.waiting.drain(..)) {
                    let _ = reply.send(Err(clone_err(&err)));
                }
            }
        }
    }

    /// Waits until every written append is durable and completed.
    async fn settle(&mut self, pipe: &mut SyncPipe) {
        while pipe.inflight.is_some() || !pipe.waiting.is_empty() {
            if pipe.inflight.is_some() {
                let r = pipe.wait().await;
                self.finish_sync(r, pipe);
            }
            self.start_sync(pipe);
        }
    }

    /// Runs `f` on a blocking thread with the writer moved into it.
    async fn blocking<R: Send + 'static>(
        self,
        f: impl FnOnce(Writer) -> (Writer, R) + Send + 'static,
    ) -> (Writer, R) {
        // A panic in the closure leaves no writer to go on with.
        joined(&mut tokio::task::spawn_blocking(move || f(self))).await
    }

    fn sync(&mut self) -> Result<()> {
        if self.failed {
            return Err(BrokerError::Closed);
        }
        if self.dirty {
            self.active
                .file
                .sync_data()
                .map_err(|e| BrokerError::io(&self.active.path, e))?;
            self.ledger.metrics.fsyncs.increment(1);
            self.ledger.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.dirty = false;
            self.synced_to = self.next_offset;
            if let Some(upto) = self.drop_below() {
                self.active.drop_cached_below(upto);
            }
        }
        self.ledger.durable_tx.send_replace(self.next_offset);
        Ok(())
    }

    /// Where the page cache of the active segment may be dropped once
    /// what is written now is durable (`None`: dropping is off).
    fn drop_below(&self) -> Option<u64> {
        let keep = self.ledger.options.drop_behind_bytes;
        (keep > 0).then(|| self.size.saturating_sub(keep))
    }

    /// A failed fdatasync of the active segment. Readers may have seen
    /// what it was to make durable, and what the page cache holds after it
    /// is unknown: the writer stops, and recovery at the next open decides
    /// what is stored. Returns the error for the appends it fails.
    fn fsync_failed(&mut self, e: std::io::Error) -> BrokerError {
        let err = BrokerError::io(&self.active.path, e);
        tracing::error!(ledger = %self.ledger.name, error = %err,
            "fdatasync failed; ledger refuses further appends until reopened");
        self.stop();
        err
    }

    /// Stops the writer for good (a failure readers may have seen, or
    /// close) and wakes whoever waits for durability.
    fn stop(&mut self) {
        self.failed = true;
        self.ledger.stopped.store(true, Ordering::Release);
        self.ledger.durable_tx.send_modify(|_| {});
    }

    fn should_roll(&self, next_len: usize) -> bool {
        self.size > 0
            && (self.size + next_len as u64 > self.policy.segment_bytes
                || self.opened_at.elapsed() >= Duration::from_millis(self.policy.segment_ms))
    }

    fn roll(&mut self) -> Result<()> {
        // A sealed segment ends at its last entry.
        self.active
            .file
            .set_len(self.size)
            .and_then(|()| self.active.file.sync_all())
            .map_err(|e| BrokerError::io(&self.active.path, e))?;
        self.active.write_index_files(&self.ledger.dir)?;
        let seg = Arc::new(Segment::create(&self.ledger.dir, self.next_offset)?);
        sync_dir(&self.ledger.dir)?;
        self.ledger
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.next_offset, seg.clone());
        self.active = seg;
        self.size = 0;
        self.zeroed_to = 0;
        self.max_ts = i64::MIN;
        self.last_index_pos = None;
        self.opened_at = Instant::now();
        self.dirty = false;
        // The sealed segment was synced whole, with everything before it.
        self.synced_to = self.next_offset;
        Ok(())
    }

    /// Makes sure the active segment's file has bytes (zeros) up to at
    /// least `end`, writing [`segment::ZERO_AHEAD`] steps of zeros, but not
    /// far past the size at which the segment rolls.
    fn zero_ahead(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.zeroed_to {
            return Ok(());
        }
        let step = segment::ZERO_AHEAD;
        let to = end
            .div_ceil(step)
            .saturating_mul(step)
            .min(end.max(self.policy.segment_bytes));
        segment::write_zeros(&self.active.file, self.zeroed_to.max(self.size), to)?;
        self.zeroed_to = to;
        Ok(())
    }

    /// Writes a group of entries. Under `group` they share one write and
    /// one fsync; under `always` each gets its own; under `interval` none.
    fn write_batch(&mut self, entries: &[AppendEntry]) -> Vec<Result<Appended>> {
        if self.failed {
            return entries.iter().map(|_| Err(BrokerError::Closed)).collect();
        }
        let mut results = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            // One run: entries that fit in the active segment.
            if self.should_roll(ENTRY_OVERHEAD + entries[i].payload.len()) {
                if let Err(e) = self.roll() {
                    tracing::error!(ledger = %self.ledger.name, error = %e, "segment rollover failed");
                    results.extend(entries[i..].iter().map(|_| Err(clone_err(&e))));
                    return results;
                }
            }
            let run_start = i;
            let mut run_bytes = 0u64;
            let per_entry = self.policy.fsync == FsyncPolicy::Always;
            let mut points = Vec::new();
            self.buf.clear();
            let start_size = self.size;
            let mut max_ts = self.max_ts;
            let mut next = self.next_offset;
            let mut last_idx = self.last_index_pos;
            // (payload position in `buf`, payload length, entry) of each
            // frame, for the tail cache.
            let mut frames: Vec<(usize, usize, Entry)> = Vec::new();
            let caching = self.ledger.options.tail_cache_bytes > 0;
            while i < entries.len() {
                let e = &entries[i];
                let len = (ENTRY_OVERHEAD + e.payload.len()) as u64;
                if i > run_start
                    && (per_entry || self.size + run_bytes + len > self.policy.segment_bytes)
                {
                    break;
                }
                let pos = start_size + run_bytes;
                if last_idx.is_none_or(|p| pos - p >= segment::INDEX_INTERVAL) {
                    points.push(IndexPoint {
                        offset: next,
                        pos,
                        max_ts_before: max_ts,
                    });
                    last_idx = Some(pos);
                }
                if caching {
                    frames.push((
                        self.buf.len() + ENTRY_OVERHEAD,
                        e.payload.len(),
                        Entry {
                            base_offset: next,
                            count: e.count,
                            format: e.format,
                            first_timestamp: e.first_timestamp,
                            max_timestamp: e.max_timestamp,
                            payload: Bytes::new(),
                        },
                    ));
                }
                segment::encode_frame(
                    &mut self.buf,
                    e.format,
                    e.count,
                    next,
                    e.first_timestamp,
                    e.max_timestamp,
                    &e.payload,
                );
                results.push(Ok(Appended {
                    base_offset: next,
                    count: e.count,
                }));
                next += u64::from(e.count);
                max_ts = max_ts.max(e.max_timestamp);
                run_bytes += len;
                i += 1;
            }
            let t0 = Instant::now();
            let end = start_size + self.buf.len() as u64;
            let zeros = if self.zeros_wanted(self.keep_run) {
                self.zero_ahead(end)
            } else {
                Ok(())
            };
            let write = zeros.and_then(|()| self.active.file.write_all_at(&self.buf, start_size));
            let written = t0.elapsed();
            self.ledger
                .metrics
                .write_micros
                .increment(written.as_micros() as u64);
            if let Err(e) = write {
                let err = BrokerError::io(&self.active.path, e);
                tracing::error!(ledger = %self.ledger.name, error = %err, "append failed");
                // Nobody has seen the run: undo the partial write so later
                // appends follow valid data.
                self.zeroed_to = start_size;
                if let Err(e2) = self.active.file.set_len(start_size) {
                    tracing::error!(ledger = %self.ledger.name, error = %e2,
                        "could not truncate after a failed append; ledger refuses further appends");
                    self.stop();
                }
                fail_from(&mut results, run_start, entries.len(), &err);
                return results;
            }
            // Published before the fdatasync: readers need not wait for
            // the disk (see the module documentation).
            self.size += run_bytes;
            self.next_offset = next;
            self.max_ts = max_ts;
            self.last_index_pos = last_idx;
            if !points.is_empty() {
                self.active
                    .index
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(points);
            }
            self.active.max_timestamp.store(max_ts, Ordering::Release);
            self.active.visible_size.store(self.size, Ordering::Release);
            self.active.visible_end.store(next, Ordering::Release);
            let bytes = self.buf.len();
            let cache = caching && bytes <= self.ledger.options.tail_cache_bytes;
            if caching && !cache {
                // Too large to cache: what is cached would no longer be
                // contiguous with the next run.
                self.ledger
                    .tail
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            }
            if cache || self.keep_run {
                // The buffer goes with the run (a new one is allocated for
                // the next), so cached payloads and the journal's record
                // are exactly what was written.
                let written =
                    Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(bytes)));
                if cache {
                    self.cache_run(frames, written.clone());
                }
                if self.keep_run {
                    debug_assert!(self.kept_run.is_none(), "a journaled batch is one run");
                    self.kept_run = Some((start_size, written));
                }
            }
            self.ledger.end_tx.send_replace(next);
            self.ledger.followers.wake();
            self.ledger
                .metrics
                .appends
                .increment((i - run_start) as u64);
            self.ledger.metrics.append_bytes.increment(run_bytes);
            if !self.keep_run {
                self.unjournaled_to = next;
            }
            if self.policy.fsync != FsyncPolicy::Always {
                // `group`: the run loop's fdatasync covers it (SyncPipe).
                self.dirty = true;
                continue;
            }
            self.ledger.metrics.fsyncs.increment(1);
            self.ledger.fsyncs.fetch_add(1, Ordering::Relaxed);
            let synced = self.active.file.sync_data();
            self.ledger
                .metrics
                .fsync_micros
                .increment((t0.elapsed() - written).as_micros() as u64);
            let took = t0.elapsed();
            if took >= SLOW_WRITE {
                tracing::warn!(
                    ledger = %self.ledger.name,
                    ms = took.as_millis() as u64,
                    bytes,
                    "slow group commit (write and fdatasync)"
                );
            }
            if let Err(e) = synced {
                let err = self.fsync_failed(e);
                fail_from(&mut results, run_start, entries.len(), &err);
                return results;
            }
            if let Some(upto) = self.drop_below() {
                self.active.drop_cached_below(upto);
            }
            self.synced_to = next;
            self.ledger.durable_tx.send_replace(next);
        }
        results
    }

    /// Hands the run just written to the tail cache (its payloads become
    /// slices of `written`).
    fn cache_run(&mut self, frames: Vec<(usize, usize, Entry)>, written: Bytes) {
        let cap = self.ledger.options.tail_cache_bytes;
        let mut cache = self.ledger.tail.write().unwrap_or_else(|e| e.into_inner());
        let entries = frames
            .into_iter()
            .map(|(at, len, mut e)| {
                e.payload = written.slice(at..at + len);
                e
            })
            .collect();
        let cached = cache.push(
            CachedRun {
                bytes: written.len(),
                entries,
            },
            cap,
        );
        if !cached {
            self.ledger.metrics.cache_full.increment(1);
        }
        self.ledger
            .metrics
            .cache_bytes
            .set(cache.budget.used() as f64);
    }

    fn persist_start(&self, start: u64) -> Result<()> {
        write_meta(
            &self.ledger.dir,
            &LedgerMetaFile {
                start_offset: start,
                incarnation: self.ledger.incarnation,
            },
        )
    }

    fn trim(&mut self, before: u64) -> Result<u64> {
        let current = self.ledger.start_offset();
        let new_start = before.min(self.next_offset);
        if new_start <= current {
            return Ok(current);
        }
        self.persist_start(new_start)?;
        self.ledger.start_offset.store(new_start, Ordering::Release);
        self.delete_sealed_while(|seg_end, _, _| seg_end <= new_start);
        Ok(new_start)
    }

    /// Deletes sealed segments from the oldest while `pred(end, size,
    /// max_ts)` holds.
    fn delete_sealed_while(&mut self, mut pred: impl FnMut(u64, u64, i64) -> bool) -> usize {
        let mut deleted = 0;
        loop {
            let victim = {
                let map = self
                    .ledger
                    .segments
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                let mut it = map.values();
                match (it.next(), it.next()) {
                    (Some(first), Some(second)) => {
                        if pred(
                            second.base,
                            first.size(),
                            first.max_timestamp.load(Ordering::Acquire),
                        ) {
                            Some((first.base, second.base))
                        } else {
                            None
                        }
                    }
                    _ => None,
                }
            };
            let Some((base, next_base)) = victim else {
                break;
            };
            self.ledger
                .segments
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&base);
            Segment::remove_files(&self.ledger.dir, base);
            deleted += 1;
            if self.ledger.start_offset() < next_base {
                self.ledger.start_offset.store(next_base, Ordering::Release);
                if let Err(e) = self.persist_start(next_base) {
                    tracing::warn!(ledger = %self.ledger.name, error = %e, "could not persist start offset");
                }
            }
        }
        if deleted > 0 {
            let _ = sync_dir(&self.ledger.dir);
        }
        deleted
    }

    fn retention(
        &mut self,
        policy: &NamespacePolicy,
        min_cursor: Option<u64>,
        now_ms: i64,
    ) -> Result<usize> {
        let start = self.ledger.start_offset();
        let mut total: u64 = self
            .ledger
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.size())
            .sum();
        let n = self.delete_sealed_while(|seg_end, size, max_ts| {
            if seg_end <= start {
                total -= size;
                return true;
            }
            if min_cursor.is_some_and(|c| seg_end > c) {
                return false;
            }
            let by_time = policy.retention_ms >= 0 && max_ts < now_ms - policy.retention_ms;
            let by_size = policy.retention_bytes >= 0
                && total.saturating_sub(policy.retention_bytes as u64) >= size;
            if by_time || by_size {
                total -= size;
                true
            } else {
                false
            }
        });
        if n > 0 {
            tracing::info!(ledger = %self.ledger.name, segments = n, "retention deleted segments");
        }
        Ok(n)
    }
}

/// Fails the results of a batch of `total` entries from `from` on (those
/// already pushed and those not reached).
fn fail_from(results: &mut Vec<Result<Appended>>, from: usize, total: usize, err: &BrokerError) {
    results.truncate(from);
    results.resize_with(total, || Err(clone_err(err)));
}

fn clone_err(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Io { path, source } => BrokerError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        BrokerError::Closed => BrokerError::Closed,
        other => BrokerError::InvalidArgument(other.to_string()),
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("ledger", &self.ledger.name)
            .field("next_offset", &self.next_offset)
            .finish()
    }
}

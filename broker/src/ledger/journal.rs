//! The journal: one write-ahead log shared by all the ledgers of a broker,
//! which makes small appends under the `group` policy durable with one
//! `fdatasync` per round whatever the number of ledgers they went to.
//!
//! Why: each ledger's own group commit costs one `fdatasync` of its active
//! segment. With many ledgers each taking a trickle of small appends (an
//! MQTT gateway: one ledger per topic, a few messages per millisecond
//! each), every fdatasync covers one or two messages and the syncs
//! dominate the broker's CPU (measured on the development VM: 59-72 us of
//! CPU per fdatasync, 8.8k of them per second for 20k messages/s over 10
//! topics). BookKeeper's journal and RabbitMQ's quorum-queue WAL solve the
//! same problem the same way.
//!
//! Protocol: a ledger writer writes a small run into its segment (page
//! cache only) and publishes it as before, then hands the journal a
//! [`Record`]: its ledger's key (the ledger directory under the data root)
//! and incarnation, the segment, the run's position in it, its bytes, and
//! the appends it completes. The journal thread takes everything queued
//! (a round starts no earlier than [`JournalOptions::group_wait`] after
//! the previous round ended, so that it covers more; a record that finds
//! the journal idle for longer starts one at once), writes it with one
//! `write` at the end of
//! the current journal file, fdatasyncs that file, advances each record's
//! ledger's durable end and completes its appends. Larger runs (Kafka
//! batches) keep the ledger's own fdatasync, so they are not written twice.
//!
//! Recovery ([`Journal::open`], before any ledger opens): every journal
//! file is replayed in order. Each valid record's bytes are written back at
//! its position in its segment when the ledger directory still holds the
//! same incarnation (a topic deleted and created again is a new one) and
//! the segment file still exists (one deleted by trim or retention held
//! nothing anyone needs); the segments are fdatasynced and the journal
//! files deleted. Replaying is idempotent: a record's bytes are exactly
//! what the segment was given at that position, and a position is written
//! once per incarnation.
//!
//! Checkpoint: when the current file is full ([`JournalOptions::file_bytes`])
//! a new one takes over and, on a background thread, the segments the full
//! file's records went to are fdatasynced, then the file is deleted.
//!
//! Format: files are never recycled; like segments they get zeros written
//! ahead of their end (so an fdatasync writes data, not the inode). A
//! record is the body length (u32 LE), the CRC-32C of the body (u32 LE) and
//! the body: the file's sequence number, the ledger incarnation, the
//! segment base and the position (u64 LE each), the key length (u16 LE),
//! the key (UTF-8) and the run's bytes. A zero length ends a file's records
//! cleanly; a bad checksum, another file's sequence number or a record cut
//! short ends them as a torn tail (never acknowledged).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::segment::{self, Segment};
use super::{AppendReply, Appended, Ledger};
use crate::checksum::crc32c;
use crate::error::{BrokerError, Result};

/// Length and checksum before each record's body.
const PREFIX: usize = 8;
/// The body's fixed fields: sequence, incarnation, base, position, key length.
const FIXED: usize = 4 * 8 + 2;
/// Bytes queued that end a round's wait early.
const ROUND_BYTES: usize = 1 << 20;

/// Smallest step of zeros written ahead of the journal file's end at a
/// time (see `Active::zero_ahead`).
const ZERO_STEP: u64 = 64 * 1024;
const DIR: &str = "journal";
const EXT: &str = "jnl";
/// A checkpointed journal file being deleted (never replayed).
const DELETED_EXT: &str = "del";
/// Bytes [`delete_gradually`] frees at a time, and its pause after each.
const DELETE_STEP: u64 = 1 << 20;
const DELETE_PAUSE: Duration = Duration::from_millis(5);

/// Settings of the journal.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Least time between the end of one round and the start of the
    /// next, so that records arriving meanwhile share one fdatasync; also
    /// the longest any record waits for a round to start (zero: a round
    /// starts as soon as the previous one ends).
    pub group_wait: Duration,
    /// A journal file is checkpointed and a new one started beyond this.
    pub file_bytes: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            group_wait: Duration::from_micros(200),
            file_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One run of one ledger, for the journal to make durable.
pub(crate) struct Record {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) seg: Arc<Segment>,
    pub(crate) pos: u64,
    pub(crate) data: Bytes,
    /// The ledger's end offset after the run (its durable end once synced).
    pub(crate) end: u64,
    pub(crate) replies: Vec<(AppendReply, Appended)>,
}

#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    bytes: usize,
    /// The journal thread waits for a first record: a submit wakes it.
    idle: bool,
    shutdown: bool,
    /// A write or fdatasync of the journal failed: everything fails.
    failed: Option<String>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The broker's journal (see the module documentation). Shared as
/// `Arc<Journal>` by every ledger that uses it.
pub struct Journal {
    root: PathBuf,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("root", &self.root).finish()
    }
}

/// A record as stored (see [`parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord<'a> {
    pub incarnation: u64,
    pub segment_base: u64,
    pub position: u64,
    pub key: &'a str,
    pub data: &'a [u8],
}

/// Appends one record of journal file `seq` to `buf`.
///
/// # Panics
/// If `key` is longer than 65535 bytes (ledger keys are directory paths).
pub fn encode(buf: &mut Vec<u8>, seq: u64, r: &StoredRecord<'_>) {
    let key_len = u16::try_from(r.key.len()).expect("journal key too long");
    let body_len = FIXED + r.key.len() + r.data.len();
    let start = buf.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    for v in [seq, r.incarnation, r.segment_base, r.position] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    buf.extend_from_slice(&key_len.to_le_bytes());
    buf.extend_from_slice(r.key.as_bytes());
    buf.extend_from_slice(r.data);
    let crc = crc32c(&buf[start + PREFIX..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The valid records of journal file `seq` held in `buf`, and why they end
/// before `buf` does (`None`: at its end or at zeros, the clean end).
pub fn parse(buf: &[u8], seq: u64) -> (Vec<StoredRecord<'_>>, Option<&'static str>) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while buf.len() - at >= PREFIX {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if len == 0 {
            return (out, None);
        }
        let crc = u32::from_le_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
        let body_at = at + PREFIX;
        if len < FIXED || buf.len() - body_at < len {
            return (out, Some("record cut short"));
        }
        let body = &buf[body_at..body_at + len];
        if crc32c(body) != crc {
            return (out, Some("checksum mismatch"));
        }
        if u64_at(body, 0) != seq {
            return (out, Some("record of another journal file"));
        }
        let key_len = u16::from_le_bytes([body[32], body[33]]) as usize;
        if FIXED + key_len > len {
            return (out, Some("key longer than its record"));
        }
        let Ok(key) = std::str::from_utf8(&body[FIXED..FIXED + key_len]) else {
            return (out, Some("key is not UTF-8"));
        };
        out.push(StoredRecord {
            incarnation: u64_at(body, 8),
            segment_base: u64_at(body, 16),
            position: u64_at(body, 24),
            key,
            data: &body[FIXED + key_len..],
        });
        at = body_at + len;
    }
    if buf[at..].iter().any(|&b| b != 0) {
        return (out, Some("record cut short"));
    }
    (out, None)
}

/// Deletes a file by cutting [`DELETE_STEP`] bytes off its end at a time.
///
/// Why: the file system may discard the blocks a deletion frees (ext4
/// mounted with `discard`, as on the benchmark machine), and discarding a
/// whole 64 MiB journal file at once held the next journal rounds'
/// fdatasyncs for up to 11 ms (MQTT fan-in at 50,000 messages/s); freed a
/// step at a time, they waited for at most a few milliseconds.
fn delete_gradually(path: &Path) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > DELETE_STEP {
        len = (len - 1) / DELETE_STEP * DELETE_STEP;
        file.set_len(len)?;
        std::thread::sleep(DELETE_PAUSE);
    }
    drop(file);
    fs::remove_file(path)
}

/// Removes what a checkpoint was deleting when the process stopped (a
/// file that cannot be removed is only logged: it is never replayed).
fn remove_deleted(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| BrokerError::io(dir, e))? {
        let path = e.map_err(|e| BrokerError::io(dir, e))?.path();
        if path.extension().is_some_and(|x| x == DELETED_EXT) {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e,
                    "could not remove a checkpointed journal file");
            }
        }
    }
    Ok(())
}

fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{EXT}"))
}

fn parse_journal_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(&format!(".{EXT}"))?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A key names a directory under the root, nothing else.
fn key_is_safe(key: &str) -> bool {
    !key.is_empty()
        && Path::new(key)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The incarnation stored in a ledger directory (`None`: no ledger there).
fn stored_incarnation(dir: &Path) -> Option<u64> {
    super::read_json::<super::LedgerMetaFile>(&dir.join(super::LEDGER_META_FILE))
        .ok()
        .flatten()
        .map(|m| m.incarnation)
}

/// What [`replay`] did.
#[derive(Debug, Default)]
struct Replayed {
    files: usize,
    applied: usize,
    skipped: usize,
    next_seq: u64,
}

/// Writes every valid journal record under `root` back into its segment,
/// syncs the segments and deletes the journal files.
fn replay(root: &Path, dir: &Path) -> Result<Replayed> {
    let mut files: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map_err(|e| BrokerError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let seq = parse_journal_name(&e.file_name().to_string_lossy())?;
            Some((seq, e.path()))
        })
        .collect();
    files.sort_unstable();
    let mut done = Replayed {
        files: files.len(),
        next_seq: files.last().map_or(1, |f| f.0 + 1),
        ..Replayed::default()
    };
    let mut incarnations: HashMap<String, Option<u64>> = HashMap::new();
    let mut segments: HashMap<PathBuf, Option<File>> = HashMap::new();
    for (seq, path) in &files {
        let data = fs::read(path).map_err(|e| BrokerError::io(path, e))?;
        let (records, stop) = parse(&data, *seq);
        if let Some(why) = stop {
            tracing::info!(journal = %path.display(), records = records.len(), reason = why,
                "journal ends in a torn tail (appends never acknowledged)");
        }
        for r in records {
            let inc = incarnations.entry(r.key.to_owned()).or_insert_with(|| {
                key_is_safe(r.key)
                    .then(|| stored_incarnation(&root.join(r.key)))
                    .flatten()
            });
            if *inc != Some(r.incarnation) {
                done.skipped += 1;
                continue;
            }
            let seg_path = segment::segment_path(&root.join(r.key), r.segment_base, "log");
            let file = segments.entry(seg_path.clone()).or_insert_with(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&seg_path)
                    .ok()
            });
            let Some(file) = file else {
                done.skipped += 1;
                continue;
            };
            file.write_all_at(r.data, r.position)
                .map_err(|e| BrokerError::io(&seg_path, e))?;
            done.applied += 1;
        }
    }
    for (path, file) in &segments {
        if let Some(f) = file {
            f.sync_data().map_err(|e| BrokerError::io(path, e))?;
        }
    }
    for (_, path) in &files {
        fs::remove_file(path).map_err(|e| BrokerError::io(path, e))?;
    }
    if !files.is_empty() {
        super::sync_dir(dir)?;
    }
    Ok(done)
}

/// The journal file being written.
struct Active {
    seq: u64,
    path: PathBuf,
    file: File,
    /// Where the next round goes.
    pos: u64,
    /// The file holds zeros from `pos` up to here.
    zeroed: u64,
    /// The segments this file's records went to (by address), with their
    /// ledger's drop-behind distance.
    touched: HashMap<usize, (Arc<Segment>, u64)>,
}

impl Active {
    fn create(dir: &Path, seq: u64, step: u64) -> Result<Active> {
        let path = journal_path(dir, seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| {
                segment::write_zeros(&f, 0, step)?;
                f.sync_all()?;
                Ok(f)
            })
            .map_err(|e| BrokerError::io(&path, e))?;
        super::sync_dir(dir)?;
        Ok(Active {
            seq,
            path,
            file,
            pos: 0,
            zeroed: step,
            touched: HashMap::new(),
        })
    }

    /// Makes sure the file holds bytes up to `end` before a write there.
    fn ensure(&mut self, end: u64, step: u64) -> std::io::Result<()> {
        if end > self.zeroed {
            let to = end.div_ceil(step) * step;
            segment::write_zeros(&self.file, self.zeroed, to)?;
            self.zeroed = to;
        }
        Ok(())
    }

    /// Adds [`ZERO_STEP`] bytes of zeros (or the `consumed` bytes the last
    /// round took, if more) once less than half a step is left ahead, on
    /// the journal thread between rounds, so that a round writes into bytes
    /// the file already has and its fdatasync writes no inode.
    ///
    /// Not on a thread of its own, as it was: a buffered write holds the
    /// file's inode lock for its whole length, and the kernel may preempt
    /// the writer in the middle of it. A zeroing thread preempted so held
    /// the journal's next round for up to 61 ms (MQTT fan-in at 50,000
    /// messages/s; `perf record -e sched:sched_switch -g`: the thread
    /// switched out in `generic_perform_write` -> `__cond_resched`, the
    /// journal thread in `pwrite` -> `down_write`), even with the zeros
    /// written in 8 KiB pieces that gave way to the journal's writes.
    fn zero_ahead(&mut self, step: u64, limit: u64, consumed: u64) {
        if self.zeroed - self.pos >= step / 2 || self.zeroed >= limit {
            return;
        }
        let to = (self.zeroed + consumed.div_ceil(ZERO_STEP).max(1) * ZERO_STEP).min(limit);
        match segment::write_zeros(&self.file, self.zeroed, to) {
            Ok(()) => self.zeroed = to,
            Err(e) => tracing::warn!(journal = %self.path.display(), error = %e,
                "zeroing ahead failed"),
        }
    }

    /// Syncs the segments this file's records went to, then deletes it (on
    /// a thread of its own: the journal goes on with the next file).
    fn checkpoint(self, dir: PathBuf) {
        std::thread::spawn(move || {
            let t0 = Instant::now();
            for (seg, keep) in self.touched.values() {
                let size = seg.visible_size.load(std::sync::atomic::Ordering::Acquire);
                if let Err(e) = seg.file.sync_data() {
                    tracing::error!(journal = %self.path.display(), segment = %seg.path.display(),
                        error = %e, "checkpoint fdatasync failed; the journal file is kept for recovery");
                    return;
                }
                // Durable now: its pages may go, as after a segment's own
                // fdatasync (journaled runs get none).
                if *keep > 0 {
                    seg.drop_cached_below(size.saturating_sub(*keep));
                }
            }
            let doomed = self.path.with_extension(DELETED_EXT);
            if let Err(e) = fs::rename(&self.path, &doomed)
                .map_err(|e| BrokerError::io(&self.path, e))
                .and_then(|()| super::sync_dir(&dir))
                .and_then(|()| delete_gradually(&doomed).map_err(|e| BrokerError::io(&doomed, e)))
            {
                tracing::warn!(error = %e, "could not delete a checkpointed journal file");
            }
            tracing::debug!(journal = %self.path.display(), segments = self.touched.len(),
                ms = t0.elapsed().as_millis() as u64, "journal file checkpointed");
        });
    }
}

/// The journal thread's state.
struct Committer {
    dir: PathBuf,
    options: JournalOptions,
    step: u64,
    active: Active,
    buf: Vec<u8>,
}

impl Committer {
    fn run(mut self, shared: &Shared) {
        // Rounds are spaced from the end of the previous one rather than
        // from their first record: under a steady stream of records the
        // thread sleeps once per round (then syncs) instead of waiting
        // for a first record and then again for the rest, and a record
        // that comes after a quiet spell is not held back at all. No
        // record waits longer than `group_wait` either way.
        let mut last_end = Instant::now();
        loop {
            let batch = {
                let mut q = shared.lock();
                loop {
                    if !q.records.is_empty() {
                        break;
                    }
                    if q.shutdown {
                        return;
                    }
                    q.idle = true;
                    q = shared.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.idle = false;
                let deadline = last_end + self.options.group_wait;
                loop {
                    let now = Instant::now();
                    if now >= deadline || q.bytes >= ROUND_BYTES || q.shutdown {
                        break;
                    }
                    q = shared
                        .cv
                        .wait_timeout(q, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                q.bytes = 0;
                std::mem::take(&mut q.records)
            };
            if let Err(e) = self.commit(&batch) {
                tracing::error!(journal = %self.active.path.display(), error = %e,
                    "journal write failed; appends fail until the broker restarts");
                shared.lock().failed = Some(e.to_string());
                for r in batch {
                    for (reply, _) in r.replies {
                        let _ = reply.send(Err(BrokerError::io(
                            &self.active.path,
                            std::io::Error::new(e.kind(), e.to_string()),
                        )));
                    }
                }
                // Whatever is queued meanwhile fails too.
                let rest = std::mem::take(&mut shared.lock().records);
                fail_records(rest, &e.to_string());
                continue;
            }
            for r in batch {
                r.ledger.durable_tx.send_if_modified(|d| {
                    let moved = r.end > *d;
                    *d = (*d).max(r.end);
                    moved
                });
                for (reply, a) in r.replies {
                    let _ = reply.send(Ok(a));
                }
                // Durable in the journal: the segment's copy may go to the
                // disk now, a little at a time, rather than all at the
                // checkpoint.
                r.seg.write_back_below(r.pos + r.data.len() as u64);
            }
            last_end = Instant::now();
            // Within the spacing before the next round.
            let limit = self.options.file_bytes.max(self.active.pos);
            self.active
                .zero_ahead(self.step, limit, self.buf.len() as u64);
        }
    }

    /// Writes and syncs one round.
    fn commit(&mut self, batch: &[Record]) -> std::io::Result<()> {
        if self.active.pos > 0 && self.active.pos >= self.options.file_bytes {
            let next = Active::create(&self.dir, self.active.seq + 1, self.step)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let full = std::mem::replace(&mut self.active, next);
            full.checkpoint(self.dir.clone());
        }
        self.buf.clear();
        for r in batch {
            encode(
                &mut self.buf,
                self.active.seq,
                &StoredRecord {
                    incarnation: r.ledger.incarnation,
                    segment_base: r.seg.base,
                    position: r.pos,
                    key: r.ledger.journal_key.as_deref().unwrap_or_default(),
                    data: &r.data,
                },
            );
        }
        let end = self.active.pos + self.buf.len() as u64;
        let t0 = Instant::now();
        self.active.ensure(end, self.step)?;
        self.active.file.write_all_at(&self.buf, self.active.pos)?;
        let t1 = Instant::now();
        self.active.file.sync_data()?;
        let synced = t1.elapsed();
        metrics::counter!("manifold_journal_commits_total").increment(1);
        metrics::counter!("manifold_journal_records_total").increment(batch.len() as u64);
        metrics::counter!("manifold_journal_bytes_total").increment(self.buf.len() as u64);
        metrics::counter!("manifold_journal_fsync_micros_total")
            .increment(synced.as_micros() as u64);
        if t0.elapsed() >= super::SLOW_WRITE {
            tracing::warn!(journal = %self.active.path.display(), ms = t0.elapsed().as_millis() as u64,
                records = batch.len(), "slow journal commit");
        }
        self.active.pos = end;
        for r in batch {
            let at = Arc::as_ptr(&r.seg) as usize;
            self.active
                .touched
                .entry(at)
                .or_insert_with(|| (r.seg.clone(), r.ledger.options.drop_behind_bytes));
        }
        Ok(())
    }
}

fn fail_records(records: Vec<Record>, why: &str) {
    for r in records {
        for (reply, _) in r.replies {
            let _ = reply.send(Err(BrokerError::Io {
                path: PathBuf::from(DIR),
                source: std::io::Error::other(why.to_owned()),
            }));
        }
    }
}

fn replay_logged(root: &Path, dir: &Path) -> Result<Replayed> {
    let t0 = Instant::now();
    remove_deleted(dir)?;
    let done = replay(root, dir)?;
    if done.files > 0 {
        tracing::info!(
            files = done.files,
            applied = done.applied,
            skipped = done.skipped,
            ms = t0.elapsed().as_millis() as u64,
            "journal replayed"
        );
    }
    Ok(done)
}

impl Journal {
    /// Replays (and deletes) what an earlier run left in the journal of
    /// `root` without starting one: for a broker that runs without the
    /// journal now but may have crashed with it. Blocking; call it before
    /// opening any ledger under `root`.
    ///
    /// # Errors
    /// As [`Journal::open`].
    pub fn recover(root: &Path) -> Result<()> {
        let dir = root.join(DIR);
        if dir.is_dir() {
            replay_logged(root, &dir)?;
        }
        Ok(())
    }

    /// Opens the journal of the data directory `root` (in `root/journal`):
    /// replays what an earlier run left there into the segments (see the
    /// module documentation) and starts the journal thread. Blocking; call
    /// it before opening any ledger under `root`.
    ///
    /// # Errors
    /// I/O errors reading the journal or writing segments back.
    pub fn open(root: &Path, options: JournalOptions) -> Result<Arc<Journal>> {
        let dir = root.join(DIR);
        fs::create_dir_all(&dir).map_err(|e| BrokerError::io(&dir, e))?;
        let done = replay_logged(root, &dir)?;
        let step = segment::ZERO_AHEAD.min(options.file_bytes).max(4096);
        let active = Active::create(&dir, done.next_seq, step)?;
        let shared = Arc::new(Shared::default());
        let committer = Committer {
            dir,
            options,
            step,
            active,
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("manifold-journal".into())
            .spawn({
                let shared = shared.clone();
                move || committer.run(&shared)
            })
            .map_err(|e| BrokerError::io(root, e))?;
        Ok(Arc::new(Journal {
            root: root.to_owned(),
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The key of the ledger in `dir` (its path under the root), or `None`
    /// if it is not under the root (such a ledger syncs on its own).
    pub(crate) fn key_for(&self, dir: &Path) -> Option<String> {
        let rel = dir.strip_prefix(&self.root).ok()?.to_str()?;
        (key_is_safe(rel) && rel.len() <= usize::from(u16::MAX)).then(|| rel.to_owned())
    }

    /// Queues a record; its appends complete once it is durable.
    pub(crate) fn submit(&self, record: Record) {
        let mut q = self.shared.lock();
        if let Some(why) = q.failed.clone() {
            drop(q);
            fail_records(vec![record], &why);
            return;
        }
        if q.shutdown {
            drop(q);
            fail_records(vec![record], "journal closed");
            return;
        }
        let before = q.bytes;
        q.bytes += record.data.len();
        q.records.push(record);
        if q.idle || (before < ROUND_BYTES && q.bytes >= ROUND_BYTES) {
            q.idle = false;
            self.shared.cv.notify_one();
        }
    }

    /// Completes what is queued and stops the journal thread. Idempotent.
    pub fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(key: &'a str, pos: u64, data: &'a [u8]) -> StoredRecord<'a> {
        StoredRecord {
            incarnation: 7,
            segment_base: 100,
            position: pos,
            key,
            data,
        }
    }

    #[test]
    fn round_trip_and_ends() {
        let mut buf = Vec::new();
        encode(&mut buf, 3, &rec("ledgers/a/b/t/0", 0, b"hello"));
        encode(&mut buf, 3, &rec("ledgers/a/b/t/1", 40, b""));
        let whole = buf.len();
        buf.extend_from_slice(&[0; 64]);
        let (rs, stop) = parse(&buf, 3);
        assert_eq!(stop, None);
        assert_eq!(
            rs,
            vec![
                rec("ledgers/a/b/t/0", 0, b"hello"),
                rec("ledgers/a/b/t/1", 40, b"")
            ]
        );
        // Another file's records are not this file's.
        assert_eq!(
            parse(&buf, 4),
            (vec![], Some("record of another journal file"))
        );
        // A torn last record ends the valid ones.
        let (rs, stop) = parse(&buf[..whole - 1], 3);
        assert_eq!(rs.len(), 1);
        assert_eq!(stop, Some("record cut short"));
        let mut bad = buf.clone();
        bad[whole - 1] ^= 1;
        let (rs, stop) = parse(&bad, 3);
        assert_eq!(rs.len(), 1);
        assert_eq!(stop, Some("checksum mismatch"));
    }

    #[test]
    fn keys_stay_under_the_root() {
        assert!(key_is_safe("ledgers/public/default/t/0"));
        for k in ["", "/etc", "../x", "a/../../b", "./a"] {
            assert!(!key_is_safe(k), "{k}");
        }
    }
}

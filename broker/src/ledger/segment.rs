//! One segment of a ledger: a file of framed entries plus its offset index
//! (`.idx`) and time index (`.tix`).
//!
//! Entry frame (little-endian):
//!
//! ```text
//! len:u32  crc32c:u32  | format:u8 reserved:u8 reserved:u16 count:u32
//!                        base_offset:u64 first_timestamp:i64 max_timestamp:i64
//!                        payload:[u8; len - 32]
//! ```
//!
//! `len` counts the bytes after the crc; the crc covers exactly those bytes.
//! Index entries are sparse: one at the first entry of a segment and then
//! one every [`INDEX_INTERVAL`] bytes. `.idx` holds `(offset:u64, pos:u64)`
//! pairs, `.tix` holds `(max_timestamp_before:i64, offset:u64)` pairs where
//! the timestamp is the largest of all entries before that point. Both are
//! derived data: they are rebuilt by scanning when missing or inconsistent.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::RwLock;

use bytes::{Bytes, BytesMut};

use crate::error::{BrokerError, Result};
use crate::message::EntryFormat;

/// Bytes of `len` + `crc`.
pub(crate) const FRAME_PREFIX: usize = 8;
/// Bytes of the fixed part after the crc.
pub(crate) const BODY_HEADER: usize = 32;
/// Total overhead of one entry on disk.
pub const ENTRY_OVERHEAD: usize = FRAME_PREFIX + BODY_HEADER;
/// Distance in bytes between sparse index points.
pub(crate) const INDEX_INTERVAL: u64 = 4096;

/// One stored entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the first message of the entry.
    pub base_offset: u64,
    /// Number of messages in the entry (at least 1).
    pub count: u32,
    /// Encoding of the payload.
    pub format: EntryFormat,
    /// Timestamp of the first message (ms since the epoch).
    pub first_timestamp: i64,
    /// Largest timestamp in the entry.
    pub max_timestamp: i64,
    /// The payload, as appended.
    pub payload: Bytes,
}

impl Entry {
    /// One past the last offset of the entry.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }

    /// Size of the entry on disk.
    pub fn stored_size(&self) -> usize {
        ENTRY_OVERHEAD + self.payload.len()
    }
}

/// Reads at least this large keep their buffer for reuse.
const RECYCLE_MIN: usize = 64 * 1024;

/// An empty buffer with room for `len` bytes: the previous read's buffer if
/// every entry handed out from it has been dropped (a consumer loop's
/// steady state), else a new one.
fn take_buffer(recycle: &std::sync::Mutex<Option<Bytes>>, len: usize) -> BytesMut {
    let prev = recycle.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(prev) = prev {
        if let Ok(mut b) = prev.try_into_mut() {
            if b.capacity() >= len {
                b.clear();
                return b;
            }
        }
    }
    BytesMut::with_capacity(len)
}

/// How a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// An ordinary read (on a blocking-pool thread).
    Blocking,
    /// Only what the page cache already holds (`preadv2` with
    /// `RWF_NOWAIT`): anything else fails with `WouldBlock` instead of
    /// waiting, so the read may run on an async worker thread.
    CachedOnly,
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` on `len` bytes from `pos`: a hint,
/// so a failure is only logged.
#[allow(unsafe_code)]
fn advise_dontneed(file: &File, pos: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(pos), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise takes no pointers; the descriptor is open for
    // as long as `file` is borrowed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        tracing::debug!(error = %io::Error::from_raw_os_error(r), "posix_fadvise failed");
    }
}

/// One `pread` of up to `len` bytes into `dst`; returns how many bytes it
/// wrote (0 at the end of the file).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
#[allow(unsafe_code)]
unsafe fn pread_raw(
    file: &File,
    dst: *mut u8,
    len: usize,
    pos: u64,
    mode: ReadMode,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset = libc::off_t::try_from(pos)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    loop {
        let n = match mode {
            // SAFETY: the caller guarantees `dst` is valid for `len` bytes;
            // pread(2) only writes into it.
            ReadMode::Blocking => unsafe { libc::pread(file.as_raw_fd(), dst.cast(), len, offset) },
            ReadMode::CachedOnly => {
                let iov = libc::iovec {
                    iov_base: dst.cast(),
                    iov_len: len,
                };
                // SAFETY: as above, through one iovec that describes `dst`.
                unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) }
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            // Not cached, or a kernel or file system without RWF_NOWAIT: the
            // caller falls back to a blocking read.
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                if mode == ReadMode::CachedOnly =>
            {
                return Err(io::ErrorKind::WouldBlock.into())
            }
            _ => return Err(e),
        }
    }
}

/// Fills `dst` from `file` at `pos`.
///
/// # Errors
/// I/O errors, `UnexpectedEof` if the file ends first, and `WouldBlock`
/// under [`ReadMode::CachedOnly`] when the bytes are not cached.
#[allow(unsafe_code)]
fn read_exact_at(file: &File, dst: &mut [u8], pos: u64, mode: ReadMode) -> io::Result<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let rest = &mut dst[done..];
        // SAFETY: `rest` is a live, writable slice of `rest.len()` bytes.
        let n = unsafe { pread_raw(file, rest.as_mut_ptr(), rest.len(), pos + done as u64, mode)? };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "segment shorter than expected",
            ));
        }
        done += n;
    }
    Ok(())
}

/// Appends exactly `len` bytes read from `file` at `pos` to `buf`, reading
/// straight into its spare capacity instead of zero-filling it first (the
/// zero fill costs about a fifth of a page-cache read).
///
/// # Errors
/// As [`read_exact_at`].
#[allow(unsafe_code)]
fn read_into_spare(
    file: &File,
    pos: u64,
    len: usize,
    buf: &mut BytesMut,
    mode: ReadMode,
) -> io::Result<()> {
    buf.reserve(len);
    let mut done = 0usize;
    while done < len {
        let spare = buf.spare_capacity_mut();
        let want = (len - done).min(spare.len());
        // SAFETY: `spare` is the uninitialised tail of `buf`'s allocation and
        // is valid for writes of `spare.len() >= want` bytes; pread only
        // writes into it.
        let n = unsafe {
            pread_raw(
                file,
                spare.as_mut_ptr().cast(),
                want,
                pos + done as u64,
                mode,
            )?
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "segment shorter than expected",
            ));
        }
        // SAFETY: pread initialised exactly the first `n <= want` bytes of
        // the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        done += n;
    }
    Ok(())
}

/// Header fields of a frame, parsed without its payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHeader {
    pub(crate) len: u32,
    pub(crate) format: u8,
    pub(crate) count: u32,
    pub(crate) base_offset: u64,
    pub(crate) first_timestamp: i64,
    pub(crate) max_timestamp: i64,
}

impl FrameHeader {
    pub(crate) fn frame_size(&self) -> u64 {
        FRAME_PREFIX as u64 + u64::from(self.len)
    }
}

/// Appends the frame of one entry to `buf`.
pub(crate) fn encode_frame(
    buf: &mut Vec<u8>,
    format: EntryFormat,
    count: u32,
    base_offset: u64,
    first_timestamp: i64,
    max_timestamp: i64,
    payload: &[u8],
) {
    let len = (BODY_HEADER + payload.len()) as u32;
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    let body = buf.len();
    buf.push(format as u8);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&base_offset.to_le_bytes());
    buf.extend_from_slice(&first_timestamp.to_le_bytes());
    buf.extend_from_slice(&max_timestamp.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crate::checksum::crc32c(&buf[body..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Why a frame at some position is not a valid entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Fewer bytes than the frame claims (a torn write).
    Short,
    /// The frame is malformed or its checksum does not match.
    Bad(&'static str),
}

/// Parses and verifies the frame at the start of `buf`.
pub(crate) fn parse_frame(
    buf: &[u8],
    max_entry: usize,
) -> std::result::Result<(FrameHeader, &[u8]), FrameError> {
    if buf.len() < FRAME_PREFIX + BODY_HEADER {
        return Err(FrameError::Short);
    }
    let len = le_u32(&buf[0..4]);
    if (len as usize) < BODY_HEADER {
        return Err(FrameError::Bad("frame length below header size"));
    }
    if len as usize > max_entry + BODY_HEADER {
        return Err(FrameError::Bad("frame length above the entry maximum"));
    }
    let end = FRAME_PREFIX + len as usize;
    if buf.len() < end {
        return Err(FrameError::Short);
    }
    let body = &buf[FRAME_PREFIX..end];
    if crate::checksum::crc32c(body) != le_u32(&buf[4..8]) {
        return Err(FrameError::Bad("checksum mismatch"));
    }
    let h = FrameHeader {
        len,
        format: body[0],
        count: le_u32(&body[4..8]),
        base_offset: le_u64(&body[8..16]),
        first_timestamp: le_u64(&body[16..24]) as i64,
        max_timestamp: le_u64(&body[24..32]) as i64,
    };
    if EntryFormat::from_u8(h.format).is_none() {
        return Err(FrameError::Bad("unknown entry format"));
    }
    if h.count == 0 {
        return Err(FrameError::Bad("entry with zero messages"));
    }
    Ok((h, &body[BODY_HEADER..]))
}

/// A sparse index point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexPoint {
    /// Base offset of the entry at `pos`.
    pub(crate) offset: u64,
    /// File position of that entry.
    pub(crate) pos: u64,
    /// Largest timestamp of all entries before `pos` in this segment.
    pub(crate) max_ts_before: i64,
}

/// The part of a segment shared between the writer and readers.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// Bytes that readers may see (durable under the policy).
    pub(crate) visible_size: AtomicU64,
    /// One past the last visible offset.
    pub(crate) visible_end: AtomicU64,
    /// Largest visible timestamp (i64::MIN when empty).
    pub(crate) max_timestamp: AtomicI64,
    pub(crate) index: RwLock<Vec<IndexPoint>>,
    /// Below this position the segment's pages were last dropped from the
    /// page cache ([`Segment::drop_cached_below`]).
    dropped_to: AtomicU64,
    /// Below this position writeback of the segment's pages was started
    /// ([`Segment::write_back_below`]).
    written_back_to: AtomicU64,
}

/// The fewest bytes [`Segment::drop_cached_below`] drops at once (fewer
/// system calls for small appends).
const DROP_STEP: u64 = 1 << 20;

/// The fewest bytes [`Segment::write_back_below`] starts writing back at
/// once.
const WRITE_BACK_STEP: u64 = 128 * 1024;

/// Moves the watermark `mark` up to the page boundary at or below `upto`
/// if that is at least `step` bytes further, and returns the pages it
/// passed (`from..upto`); `None` if they are too few, or another thread
/// moved the mark first (it handles them).
fn claim_pages(mark: &AtomicU64, upto: u64, step: u64) -> Option<(u64, u64)> {
    let upto = upto & !4095;
    let from = mark.load(Ordering::Acquire);
    (upto >= from.saturating_add(step)
        && mark
            .compare_exchange(from, upto, Ordering::AcqRel, Ordering::Acquire)
            .is_ok())
    .then_some((from, upto))
}

pub(crate) fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

/// Parses `00000000000000000042.log` into 42.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// What scanning a segment file found.
#[derive(Debug)]
pub(crate) struct ScanResult {
    pub(crate) valid_size: u64,
    pub(crate) end_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) index: Vec<IndexPoint>,
    /// Why the scan stopped before the end of the file, if it did.
    pub(crate) stopped: Option<&'static str>,
}

/// Bytes of zeros kept ahead of the end of a file that an `fdatasync`
/// per commit makes durable: the active segment where the segment's own
/// fdatasync completes appends (not for journaled runs), and the journal's
/// file. Appending into bytes the file already has changes no file
/// metadata, so the `fdatasync` of a group commit writes the data alone
/// and not also the inode (its size): on the disk of the benchmarks this
/// halves the fsync latency (0.19 -> 0.11 ms at p50 for 4 KiB commits,
/// ext4). The zeros are written by the file's own writer (never by a
/// thread beside it: see `Writer::zero_step`), not synced on their own,
/// and dropped when the segment is sealed or recovered.
pub(crate) const ZERO_AHEAD: u64 = 1 << 20;

/// Writes zeros to `file` over `from..to`.
pub(crate) fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Whether `file` holds only zero bytes over `from..to` (what the writer
/// wrote ahead of its last append, see [`ZERO_AHEAD`]).
pub(crate) fn is_zero(file: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; (to.saturating_sub(from)).min(64 * 1024) as usize];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// Validates every frame from index point `from` (whose entries before it
/// are described by `index`) to the end of the file; stops at the first
/// invalid or torn frame. Scanning a whole segment starts from
/// `IndexPoint { offset: base, pos: 0, max_ts_before: i64::MIN }` with an
/// empty index.
pub(crate) fn scan(
    file: &File,
    from: IndexPoint,
    index: Vec<IndexPoint>,
    max_entry: usize,
) -> io::Result<ScanResult> {
    let len = file.metadata()?.len();
    let mut res = ScanResult {
        valid_size: from.pos,
        end_offset: from.offset,
        max_timestamp: from.max_ts_before,
        index,
        stopped: None,
    };
    let mut pos = from.pos;
    let mut last_index_pos: Option<u64> = res.index.last().map(|p| p.pos);
    let chunk = 1 << 20;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = pos;
    while pos < len {
        // Make sure the buffer holds at least the header at `pos`.
        let need_header = (pos + (FRAME_PREFIX + BODY_HEADER) as u64).min(len);
        if pos < buf_start || need_header > buf_start + buf.len() as u64 {
            buf_start = pos;
            let want = (len - pos).min(chunk as u64) as usize;
            buf = vec![0; want];
            file.read_exact_at(&mut buf, pos)?;
        }
        let rel = (pos - buf_start) as usize;
        let mut frame = &buf[rel..];
        if frame.len() >= FRAME_PREFIX {
            let flen = le_u32(&frame[0..4]) as usize;
            let total = FRAME_PREFIX + flen;
            if flen <= max_entry + BODY_HEADER && total > frame.len() && pos + total as u64 <= len {
                // A valid-looking frame larger than the buffer: read it whole.
                buf_start = pos;
                buf = vec![0; total];
                file.read_exact_at(&mut buf, pos)?;
                frame = &buf[..];
            }
        }
        match parse_frame(frame, max_entry) {
            Ok((h, _)) => {
                if h.base_offset != res.end_offset {
                    res.stopped = Some("entry offset does not follow its predecessor");
                    break;
                }
                if last_index_pos.is_none_or(|p| pos - p >= INDEX_INTERVAL) {
                    res.index.push(IndexPoint {
                        offset: h.base_offset,
                        pos,
                        max_ts_before: res.max_timestamp,
                    });
                    last_index_pos = Some(pos);
                }
                res.end_offset = h.base_offset + u64::from(h.count);
                res.max_timestamp = res.max_timestamp.max(h.max_timestamp);
                pos += h.frame_size();
                res.valid_size = pos;
            }
            Err(FrameError::Short) => {
                res.stopped = Some("torn write (frame shorter than its length)");
                break;
            }
            Err(FrameError::Bad(why)) => {
                res.stopped = Some(why);
                break;
            }
        }
    }
    Ok(res)
}

impl Segment {
    /// Opens an existing segment file for reading and writing.
    pub(crate) fn open_file(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| BrokerError::io(path, e))
    }

    /// Creates a new, empty segment file (and its index files).
    pub(crate) fn create(dir: &Path, base: u64) -> Result<Segment> {
        let path = segment_path(dir, base, "log");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| BrokerError::io(&path, e))?;
        for ext in ["idx", "tix"] {
            let p = segment_path(dir, base, ext);
            File::create(&p).map_err(|e| BrokerError::io(&p, e))?;
        }
        Ok(Segment {
            base,
            path,
            file,
            visible_size: AtomicU64::new(0),
            visible_end: AtomicU64::new(base),
            max_timestamp: AtomicI64::new(i64::MIN),
            index: RwLock::new(Vec::new()),
            dropped_to: AtomicU64::new(0),
            written_back_to: AtomicU64::new(0),
        })
    }

    pub(crate) fn from_scan(base: u64, path: PathBuf, file: File, s: ScanResult) -> Segment {
        Segment {
            base,
            path,
            file,
            visible_size: AtomicU64::new(s.valid_size),
            visible_end: AtomicU64::new(s.end_offset),
            max_timestamp: AtomicI64::new(s.max_timestamp),
            index: RwLock::new(s.index),
            dropped_to: AtomicU64::new(0),
            written_back_to: AtomicU64::new(s.valid_size & !4095),
        }
    }

    /// Drops the segment's pages below `upto` from the page cache, from
    /// where the last call stopped, once at least [`DROP_STEP`] bytes are
    /// due. Only for bytes already made durable: their pages are clean, so
    /// the kernel frees them (best effort; a page it cannot drop stays).
    ///
    /// Sustained appends otherwise grow the page cache by everything ever
    /// written; freeing what is behind lets the next appends reuse the same
    /// memory (BookKeeper drops its journal's pages the same way). Readers
    /// of dropped data read it back from the file, which is correct, only
    /// slower.
    pub(crate) fn drop_cached_below(&self, upto: u64) {
        if let Some((from, upto)) = claim_pages(&self.dropped_to, upto, DROP_STEP) {
            advise_dontneed(&self.file, from, upto - from);
        }
    }

    /// Starts writing the segment's whole pages below `upto` to the disk
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for
    /// them), in steps of at least [`WRITE_BACK_STEP`]. For data the
    /// journal makes durable: without it, the segment's pages stayed dirty
    /// until the journal file's checkpoint synced them all at once, tens
    /// of megabytes every few seconds under load, and the journal's own
    /// fdatasyncs waited behind that burst (journal rounds of up to 35 ms,
    /// and an MQTT p99 of 5-25 ms instead of about 1 ms at 50,000
    /// messages/s). Written back as they come, the checkpoint finds them
    /// clean. A hint: a failure is only logged (the checkpoint's fdatasync
    /// still writes the pages).
    #[allow(unsafe_code)]
    pub(crate) fn write_back_below(&self, upto: u64) {
        use std::os::fd::AsRawFd;
        let Some((from, upto)) = claim_pages(&self.written_back_to, upto, WRITE_BACK_STEP) else {
            return;
        };
        let (Ok(off), Ok(len)) = (
            libc::off64_t::try_from(from),
            libc::off64_t::try_from(upto - from),
        ) else {
            return;
        };
        // SAFETY: sync_file_range takes no pointers; the descriptor is open
        // for as long as `self.file` is borrowed.
        let r = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range failed");
        }
    }

    /// After a read of `len` bytes from `pos` wholly behind the written
    /// data already dropped from the page cache: drops what it brought in,
    /// too, so a reader catching up through old data reuses memory as
    /// appends do instead of refilling the page cache with all it reads.
    fn drop_read(&self, pos: u64, len: u64) {
        let end = pos + len;
        if len >= DROP_STEP && end <= self.dropped_to.load(Ordering::Acquire) {
            let from = pos & !4095;
            advise_dontneed(&self.file, from, (end & !4095) - from);
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.visible_size.load(Ordering::Acquire)
    }

    pub(crate) fn end(&self) -> u64 {
        self.visible_end.load(Ordering::Acquire)
    }

    /// Position of the last index point at or before `offset`.
    pub(crate) fn floor_pos(&self, offset: u64) -> u64 {
        let idx = self.index.read().unwrap_or_else(|e| e.into_inner());
        match idx.partition_point(|p| p.offset <= offset) {
            0 => 0,
            i => idx[i - 1].pos,
        }
    }

    /// Position of the last index point whose preceding entries all have
    /// timestamps below `ts` (scanning from there finds the first entry
    /// with `max_timestamp >= ts`).
    pub(crate) fn time_floor_pos(&self, ts: i64) -> u64 {
        let idx = self.index.read().unwrap_or_else(|e| e.into_inner());
        match idx.partition_point(|p| p.max_ts_before < ts) {
            0 => 0,
            i => idx[i - 1].pos,
        }
    }

    /// Reads the frame header at `pos`, or `None` at the visible end.
    pub(crate) fn header_at(
        &self,
        pos: u64,
        limit: u64,
        mode: ReadMode,
    ) -> Result<Option<FrameHeader>> {
        if pos + (FRAME_PREFIX + BODY_HEADER) as u64 > limit {
            return Ok(None);
        }
        let mut b = [0u8; FRAME_PREFIX + BODY_HEADER];
        read_exact_at(&self.file, &mut b, pos, mode).map_err(|e| BrokerError::io(&self.path, e))?;
        let len = le_u32(&b[0..4]);
        let body = &b[FRAME_PREFIX..];
        Ok(Some(FrameHeader {
            len,
            format: body[0],
            count: le_u32(&body[4..8]),
            base_offset: le_u64(&body[8..16]),
            first_timestamp: le_u64(&body[16..24]) as i64,
            max_timestamp: le_u64(&body[24..32]) as i64,
        }))
    }

    /// Reads whole entries of the file range `span` from its start until at
    /// least `max_bytes` are collected (always at least one entry), without
    /// passing its end. Every entry's checksum is verified.
    pub(crate) fn read_entries(
        &self,
        span: std::ops::Range<u64>,
        max_bytes: usize,
        max_entry: usize,
        out: &mut Vec<Entry>,
        recycle: &std::sync::Mutex<Option<Bytes>>,
        mode: ReadMode,
    ) -> Result<usize> {
        let (pos, limit) = (span.start, span.end);
        if pos >= limit {
            return Ok(0);
        }
        let want = ((limit - pos) as usize).min(max_bytes.max(ENTRY_OVERHEAD));
        let mut buf = take_buffer(recycle, want);
        read_into_spare(&self.file, pos, want, &mut buf, mode)
            .map_err(|e| BrokerError::io(&self.path, e))?;
        // The first entry may be larger than `max_bytes`: read it whole.
        if buf.len() >= FRAME_PREFIX {
            let first = FRAME_PREFIX + le_u32(&buf[0..4]) as usize;
            if first > buf.len()
                && pos + first as u64 <= limit
                && first <= max_entry + ENTRY_OVERHEAD
            {
                buf = BytesMut::new();
                read_into_spare(&self.file, pos, first, &mut buf, mode)
                    .map_err(|e| BrokerError::io(&self.path, e))?;
            }
        }
        self.drop_read(pos, buf.len() as u64);
        let buf = buf.freeze();
        if buf.len() >= RECYCLE_MIN {
            *recycle.lock().unwrap_or_else(|e| e.into_inner()) = Some(buf.clone());
        }
        let mut at = 0usize;
        let mut read = 0usize;
        while at < buf.len() {
            match parse_frame(&buf[at..], max_entry) {
                Ok((h, payload)) => {
                    let start = at + ENTRY_OVERHEAD;
                    out.push(Entry {
                        base_offset: h.base_offset,
                        count: h.count,
                        format: EntryFormat::from_u8(h.format)
                            .ok_or(BrokerError::Malformed("unknown entry format"))?,
                        first_timestamp: h.first_timestamp,
                        max_timestamp: h.max_timestamp,
                        payload: buf.slice(start..start + payload.len()),
                    });
                    at += h.frame_size() as usize;
                    read += h.frame_size() as usize;
                }
                Err(FrameError::Short) if at > 0 => break,
                Err(FrameError::Short) => {
                    return Err(BrokerError::Corrupt {
                        path: self.path.clone(),
                        position: pos,
                        reason: "entry extends past the end of the segment",
                    })
                }
                Err(FrameError::Bad(reason)) => {
                    return Err(BrokerError::Corrupt {
                        path: self.path.clone(),
                        position: pos + at as u64,
                        reason,
                    })
                }
            }
        }
        Ok(read)
    }

    /// Writes the in-memory index to the `.idx` and `.tix` files and syncs
    /// them.
    pub(crate) fn write_index_files(&self, dir: &Path) -> Result<()> {
        let idx = self.index.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut ob = Vec::with_capacity(idx.len() * 16);
        let mut tb = Vec::with_capacity(idx.len() * 16);
        for p in &idx {
            ob.extend_from_slice(&p.offset.to_le_bytes());
            ob.extend_from_slice(&p.pos.to_le_bytes());
            tb.extend_from_slice(&p.max_ts_before.to_le_bytes());
            tb.extend_from_slice(&p.offset.to_le_bytes());
        }
        for (ext, data) in [("idx", ob), ("tix", tb)] {
            let path = segment_path(dir, self.base, ext);
            let mut f = File::create(&path).map_err(|e| BrokerError::io(&path, e))?;
            f.write_all(&data)
                .and_then(|()| f.sync_data())
                .map_err(|e| BrokerError::io(&path, e))?;
        }
        Ok(())
    }

    /// Loads the index files of a sealed segment if they are consistent
    /// with a segment of `size` bytes.
    pub(crate) fn load_index_files(dir: &Path, base: u64, size: u64) -> Option<Vec<IndexPoint>> {
        let ob = std::fs::read(segment_path(dir, base, "idx")).ok()?;
        let tb = std::fs::read(segment_path(dir, base, "tix")).ok()?;
        if ob.len() % 16 != 0 || ob.len() != tb.len() || (size > 0 && ob.is_empty()) {
            return None;
        }
        let mut out = Vec::with_capacity(ob.len() / 16);
        for (o, t) in ob.chunks_exact(16).zip(tb.chunks_exact(16)) {
            let p = IndexPoint {
                offset: le_u64(&o[0..8]),
                pos: le_u64(&o[8..16]),
                max_ts_before: le_u64(&t[0..8]) as i64,
            };
            if le_u64(&t[8..16]) != p.offset || p.pos >= size || p.offset < base {
                return None;
            }
            if out
                .last()
                .is_some_and(|l: &IndexPoint| l.pos >= p.pos || l.offset >= p.offset)
            {
                return None;
            }
            out.push(p);
        }
        if out.first().is_some_and(|p| p.pos != 0) {
            return None;
        }
        Some(out)
    }

    pub(crate) fn remove_files(dir: &Path, base: u64) {
        for ext in ["log", "idx", "tix"] {
            let p = segment_path(dir, base, ext);
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove segment file");
                }
            }
        }
    }
}

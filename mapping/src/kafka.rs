//! Kafka <-> core mapping: topic names, record batches and error codes.
//!
//! # Names
//!
//! A Kafka topic `t` is the broker topic `<tenant>/<namespace>/t`, where
//! tenant and namespace come from the `[kafka]` section (`public/default`
//! unless configured). A Kafka topic name must be 1 to 249 characters of
//! `[a-zA-Z0-9._-]` and not `.` or `..` (Kafka's own rule), so every Kafka
//! name is a valid broker topic component; see [`validate_topic_name`].
//! Partition `p` of the Kafka topic is partition `p` of the broker topic and
//! a Kafka offset is the ledger offset, unchanged.
//!
//! A consumer group `g` commits its offsets as the durable cursor
//! `kafka.<g>` of each partition ledger ([`group_cursor_name`]); the
//! commit's metadata string is the cursor property `kafka.metadata`.
//! The cursor cannot stand outside the ledger (it is clamped to
//! `[start, end]`), but Kafka stores a committed offset exactly as given,
//! even below the log start or past the end: the offset as committed is
//! kept in the property `kafka.offset`, with the commit's leader epoch,
//! and reported while the cursor has not been moved by anything but that
//! clamping ([`reported_commit`]).
//!
//! # Record batches
//!
//! Kafka producers' record batches (magic 2) are stored verbatim as
//! [`EntryFormat::KafkaRecordBatch`](broker::EntryFormat) entries, one
//! batch per entry. The batch's `baseOffset` and `partitionLeaderEpoch`
//! fields lie before the CRC-covered part (the CRC-32C covers `attributes`
//! to the end), so the handler rewrites `baseOffset` to the ledger offset
//! when it serves the batch ([`set_base_offset`]) without touching the CRC.
//!
//! # Interop contract (Kafka record <-> [`Message`])
//!
//! | Kafka record | `Message` |
//! | --- | --- |
//! | key (null = none) | `key` (or `ordering_key` when there is no key, Kafka-bound) |
//! | value (null is read as empty) | `payload` |
//! | headers, in order (a null header value is read as empty) | `headers`, in order |
//! | timestamp (CreateTime) | `event_time` and `publish_time` |
//! | timestamp (LogAppendTime) | `publish_time` |
//! | producer id, base sequence + offset delta | `producer` |
//!
//! Header names are passed through unchanged in both directions, so an MQTT
//! user property `a` or an AMQP header `a` is the Kafka header `a`.
//! Messages written by other protocols are served to Kafka consumers as an
//! uncompressed batch built by [`messages_to_batch`] (timestamp =
//! `event_time`, else `publish_time`).
//!
//! # Error codes
//!
//! [`ErrorCode`] lists the Kafka error codes Manifold answers with, with
//! their wire values; [`ErrorCode::from_broker`] maps broker errors.

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};

use broker::{BrokerError, Message, ProducerInfo};

/// Kafka wire error codes used by Manifold (values from the Kafka protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum ErrorCode {
    UnknownServerError = -1,
    None = 0,
    OffsetOutOfRange = 1,
    CorruptMessage = 2,
    UnknownTopicOrPartition = 3,
    InvalidFetchSize = 4,
    NotLeaderOrFollower = 6,
    RequestTimedOut = 7,
    MessageTooLarge = 10,
    CoordinatorNotAvailable = 15,
    NotCoordinator = 16,
    InvalidTopicException = 17,
    RecordListTooLarge = 18,
    InvalidRequiredAcks = 21,
    IllegalGeneration = 22,
    InconsistentGroupProtocol = 23,
    InvalidGroupId = 24,
    UnknownMemberId = 25,
    InvalidSessionTimeout = 26,
    RebalanceInProgress = 27,
    InvalidCommitOffsetSize = 28,
    TopicAuthorizationFailed = 29,
    GroupAuthorizationFailed = 30,
    ClusterAuthorizationFailed = 31,
    InvalidTimestamp = 32,
    UnsupportedSaslMechanism = 33,
    IllegalSaslState = 34,
    UnsupportedVersion = 35,
    TopicAlreadyExists = 36,
    InvalidPartitions = 37,
    InvalidReplicationFactor = 38,
    InvalidReplicaAssignment = 39,
    InvalidConfig = 40,
    NotController = 41,
    InvalidRequest = 42,
    UnsupportedForMessageFormat = 43,
    PolicyViolation = 44,
    OutOfOrderSequenceNumber = 45,
    DuplicateSequenceNumber = 46,
    InvalidProducerEpoch = 47,
    InvalidTxnState = 48,
    InvalidProducerIdMapping = 49,
    InvalidTransactionTimeout = 50,
    ConcurrentTransactions = 51,
    TransactionalIdAuthorizationFailed = 53,
    SecurityDisabled = 54,
    OperationNotAttempted = 55,
    KafkaStorageError = 56,
    UnknownProducerId = 59,
    GroupIdNotFound = 69,
    NonEmptyGroup = 68,
    FetchSessionIdNotFound = 70,
    InvalidFetchSessionEpoch = 71,
    FencedLeaderEpoch = 74,
    UnknownLeaderEpoch = 75,
    UnsupportedCompressionType = 76,
    MemberIdRequired = 79,
    GroupMaxSizeReached = 81,
    FencedInstanceId = 82,
    InvalidRecord = 87,
    UnknownTopicId = 100,
    InconsistentTopicId = 103,
}

impl ErrorCode {
    /// The wire value.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The Kafka error code for a broker error.
    pub fn from_broker(e: &BrokerError) -> ErrorCode {
        match e {
            BrokerError::TopicNotFound(_)
            | BrokerError::PartitionNotFound { .. }
            | BrokerError::NamespaceNotFound(_)
            | BrokerError::TenantNotFound(_) => ErrorCode::UnknownTopicOrPartition,
            BrokerError::AlreadyExists(_) => ErrorCode::TopicAlreadyExists,
            BrokerError::InvalidName { .. } => ErrorCode::InvalidTopicException,
            BrokerError::InvalidArgument(_) => ErrorCode::InvalidRequest,
            BrokerError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            BrokerError::EntryTooLarge { .. } => ErrorCode::MessageTooLarge,
            BrokerError::Malformed(_) => ErrorCode::CorruptMessage,
            BrokerError::Io { .. } | BrokerError::Corrupt { .. } => ErrorCode::KafkaStorageError,
            // A closed ledger is a topic being deleted or a shutdown: the
            // client should refresh metadata and retry.
            BrokerError::Closed => ErrorCode::NotLeaderOrFollower,
            BrokerError::NotEmpty(_) | BrokerError::Metadata { .. } => {
                ErrorCode::UnknownServerError
            }
        }
    }
}

/// Longest legal Kafka topic name.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// Checks a Kafka topic name against Kafka's rule: 1..=249 characters of
/// `[a-zA-Z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// Why the name is invalid.
pub fn validate_topic_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("topic name is empty");
    }
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err("topic name is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be `.` or `..`");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err("topic name may only contain ASCII letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// The durable cursor that holds consumer group `group`'s committed offset
/// on each partition.
pub fn group_cursor_name(group: &str) -> String {
    format!("{GROUP_CURSOR_PREFIX}{group}")
}

/// Prefix of every Kafka consumer group cursor.
pub const GROUP_CURSOR_PREFIX: &str = "kafka.";

/// Cursor property holding the metadata string of the last offset commit.
pub const COMMIT_METADATA_PROPERTY: &str = "kafka.metadata";

/// Cursor property holding the last offset commit exactly as sent, with
/// the cursor position it produced and the commit's leader epoch:
/// `"<committed> <mark-delete> <leader-epoch>"` (older values have no
/// epoch, which reads as -1, "none").
pub const COMMIT_OFFSET_PROPERTY: &str = "kafka.offset";

/// The [`COMMIT_OFFSET_PROPERTY`] value for a commit of `committed` with
/// `leader_epoch` (-1: none given) that left the cursor at `mark_delete`.
pub fn commit_offset_property(committed: u64, mark_delete: u64, leader_epoch: i32) -> String {
    format!("{committed} {mark_delete} {leader_epoch}")
}

/// A committed offset as OffsetFetch reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedCommit {
    pub offset: u64,
    /// The leader epoch the commit carried; -1 when none is known.
    pub leader_epoch: i32,
}

/// The commit to report for a group cursor now at `mark_delete` on a
/// ledger starting at `start`, given its [`COMMIT_OFFSET_PROPERTY`].
///
/// The offset as committed, with its leader epoch, is reported while the
/// cursor is where that commit left it, or has only been pulled up to a
/// later log start (retention or DeleteRecords trimmed past it): then the
/// client sees what it committed, as in Kafka, and its fetch there is
/// OFFSET_OUT_OF_RANGE, which applies its `auto.offset.reset`. If anything
/// else moved the cursor, or the property is missing or unreadable, the
/// cursor's position is the commit, with no leader epoch.
pub fn reported_commit(property: Option<&str>, mark_delete: u64, start: u64) -> ReportedCommit {
    let parsed = property.and_then(|p| {
        let mut it = p.split(' ');
        let c = it.next()?.parse::<u64>().ok()?;
        let m = it.next()?.parse::<u64>().ok()?;
        let e = match it.next() {
            None => -1,
            Some(e) => e.parse::<i32>().ok()?,
        };
        it.next().is_none().then_some((c, m, e))
    });
    match parsed {
        Some((committed, at, leader_epoch))
            if mark_delete == at || (at < mark_delete && mark_delete <= start) =>
        {
            ReportedCommit {
                offset: committed,
                leader_epoch,
            }
        }
        _ => ReportedCommit {
            offset: mark_delete,
            leader_epoch: -1,
        },
    }
}

// ---------------------------------------------------------------------
// Record batch v2
// ---------------------------------------------------------------------

/// Size of the fixed record batch header (up to and including the record
/// count).
pub const BATCH_HEADER_LEN: usize = 61;
/// Offset of the fields the CRC covers (attributes onwards).
const CRC_START: usize = 21;
/// Bytes before the batch length is known: baseOffset + batchLength.
const LOG_OVERHEAD: usize = 12;

/// Largest decompressed size of one batch's records.
pub const MAX_DECOMPRESSED_BYTES: usize = 128 * 1024 * 1024;

/// Compression of a record batch (attributes bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// The fixed header of one record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Length of the batch after the batchLength field.
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Total bytes of the batch including baseOffset and batchLength.
    pub fn total_len(&self) -> usize {
        LOG_OVERHEAD + self.batch_length as usize
    }

    /// The compression codec.
    ///
    /// # Errors
    /// An unknown codec id.
    pub fn compression(&self) -> Result<Compression, String> {
        match self.attributes & 0x7 {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Snappy),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            c => Err(format!("unknown compression codec {c}")),
        }
    }

    /// Timestamps are the broker's append time (attributes bit 3).
    pub fn log_append_time(&self) -> bool {
        self.attributes & 0x8 != 0
    }

    /// Part of a transaction (attributes bit 4).
    pub fn is_transactional(&self) -> bool {
        self.attributes & 0x10 != 0
    }

    /// A control batch (transaction marker, attributes bit 5).
    pub fn is_control(&self) -> bool {
        self.attributes & 0x20 != 0
    }

    /// Whether the producer asked for idempotence (id and sequence set).
    pub fn is_idempotent(&self) -> bool {
        self.producer_id >= 0 && self.base_sequence >= 0
    }

    /// Sequence of the last record in the batch (wraps at `i32::MAX`).
    pub fn last_sequence(&self) -> i32 {
        let s = i64::from(self.base_sequence) + i64::from(self.last_offset_delta);
        (s % (i64::from(i32::MAX) + 1)) as i32
    }
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses the fixed header at the start of `data` (no CRC check).
///
/// # Errors
/// Truncated input, a magic other than 2, or an impossible length.
pub fn parse_batch_header(data: &[u8]) -> Result<BatchHeader, String> {
    if data.len() < BATCH_HEADER_LEN {
        return Err(format!(
            "record batch truncated: {} bytes, header needs {BATCH_HEADER_LEN}",
            data.len()
        ));
    }
    let h = BatchHeader {
        base_offset: be_i64(data, 0),
        batch_length: be_i32(data, 8),
        partition_leader_epoch: be_i32(data, 12),
        magic: data[16] as i8,
        crc: be_i32(data, 17) as u32,
        attributes: be_i16(data, 21),
        last_offset_delta: be_i32(data, 23),
        base_timestamp: be_i64(data, 27),
        max_timestamp: be_i64(data, 35),
        producer_id: be_i64(data, 43),
        producer_epoch: be_i16(data, 51),
        base_sequence: be_i32(data, 53),
        records_count: be_i32(data, 57),
    };
    if h.magic != 2 {
        return Err(format!(
            "record batch magic {} is not supported (only 2)",
            h.magic
        ));
    }
    if h.batch_length < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
        return Err(format!(
            "record batch length {} is too small",
            h.batch_length
        ));
    }
    if h.records_count < 0 {
        return Err("negative record count".into());
    }
    Ok(h)
}

/// One record of a batch, borrowed from its (decompressed) buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub attributes: i8,
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// A batch as found in a produce request's records field, validated.
#[derive(Debug, Clone)]
pub struct ValidatedBatch {
    pub header: BatchHeader,
    /// The batch's bytes, exactly as sent.
    pub bytes: Bytes,
}

/// Splits a produce request's records field into its batches and validates
/// each: magic 2, consistent lengths, CRC-32C, a record count that matches
/// `lastOffsetDelta + 1`, known compression, and records that decode
/// (decompressing, bounded by [`MAX_DECOMPRESSED_BYTES`]).
///
/// # Errors
/// `(ErrorCode, reason)`: [`ErrorCode::CorruptMessage`] for a CRC mismatch
/// or malformed framing, [`ErrorCode::InvalidRecord`] for records that do
/// not decode, [`ErrorCode::UnsupportedCompressionType`].
pub fn split_and_validate(records: &Bytes) -> Result<Vec<ValidatedBatch>, (ErrorCode, String)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < records.len() {
        let rest = &records[pos..];
        let h = parse_batch_header(rest).map_err(|e| (ErrorCode::CorruptMessage, e))?;
        let total = h.total_len();
        if total > rest.len() {
            return Err((
                ErrorCode::CorruptMessage,
                format!(
                    "record batch length {} exceeds the {} bytes sent",
                    total,
                    rest.len()
                ),
            ));
        }
        let bytes = records.slice(pos..pos + total);
        let crc = broker::checksum::crc32c(&bytes[CRC_START..]);
        if crc != h.crc {
            return Err((
                ErrorCode::CorruptMessage,
                format!(
                    "record batch CRC mismatch: stored {:#010x}, computed {crc:#010x}",
                    h.crc
                ),
            ));
        }
        if h.records_count == 0 || h.last_offset_delta != h.records_count - 1 {
            return Err((
                ErrorCode::InvalidRecord,
                format!(
                    "record count {} does not match lastOffsetDelta {}",
                    h.records_count, h.last_offset_delta
                ),
            ));
        }
        if h.compression().is_err() {
            return Err((
                ErrorCode::UnsupportedCompressionType,
                format!("unknown compression codec {}", h.attributes & 7),
            ));
        }
        check_records(&h, &bytes).map_err(|e| (ErrorCode::InvalidRecord, e))?;
        out.push(ValidatedBatch { header: h, bytes });
        pos += total;
    }
    if out.is_empty() {
        return Err((ErrorCode::CorruptMessage, "no record batch".into()));
    }
    Ok(out)
}

/// Rewrites the `baseOffset` field of the batch at the start of `batch`
/// (outside the CRC-covered part, so the CRC stays valid).
///
/// # Panics
/// If `batch` is shorter than 8 bytes (callers pass stored batches).
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[..8].copy_from_slice(&(base_offset as i64).to_be_bytes());
}

/// The (decompressed) records section of a batch and its record count,
/// checked to be plausible for the section's size.
fn records_data(h: &BatchHeader, bytes: &Bytes) -> Result<(Bytes, usize), String> {
    let body = bytes.slice(BATCH_HEADER_LEN..h.total_len().min(bytes.len()));
    let data = match h.compression()? {
        Compression::None => body,
        c => Bytes::from(decompress(c, &body, MAX_DECOMPRESSED_BYTES)?),
    };
    let count = h.records_count as usize;
    // Every record takes at least 7 bytes; a larger count is a lie.
    if count > data.len() / 7 + 1 {
        return Err("record count exceeds the batch size".into());
    }
    Ok((data, count))
}

/// Decodes the records of one batch (`bytes` is the whole batch).
///
/// # Errors
/// What is malformed.
pub fn decode_records(h: &BatchHeader, bytes: &Bytes) -> Result<Vec<Record>, String> {
    let (data, count) = records_data(h, bytes)?;
    let mut r = Reader {
        data: &data,
        pos: 0,
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.varint()?;
        if len < 0 || len as usize > r.remaining() {
            return Err("record length out of range".into());
        }
        let end = r.pos + len as usize;
        let attributes = r.u8()? as i8;
        let timestamp_delta = r.varlong()?;
        let offset_delta = r.varint()?;
        let key = r.nullable_bytes(end)?;
        let value = r.nullable_bytes(end)?;
        let hcount = r.varint()?;
        if hcount < 0 || hcount as usize > (end.saturating_sub(r.pos)) / 2 {
            return Err("header count out of range".into());
        }
        let mut headers = Vec::with_capacity(hcount as usize);
        for _ in 0..hcount {
            let name = r
                .nullable_bytes(end)?
                .ok_or_else(|| "null header key".to_string())?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| "header key is not UTF-8".to_string())?;
            let value = r.nullable_bytes(end)?;
            headers.push((name, value));
        }
        if r.pos != end {
            return Err("record length does not match its fields".into());
        }
        out.push(Record {
            attributes,
            timestamp_delta,
            offset_delta,
            key,
            value,
            headers,
        });
    }
    if r.pos != data.len() {
        return Err("trailing bytes after the last record".into());
    }
    Ok(out)
}

/// Checks that a batch's records decode exactly as [`decode_records`]
/// would decode them and that their offset deltas are 0, 1, 2, ..., without
/// building them (no allocation for an uncompressed batch).
fn check_records(h: &BatchHeader, bytes: &Bytes) -> Result<(), String> {
    let (data, count) = records_data(h, bytes)?;
    let mut r = Reader {
        data: &data,
        pos: 0,
    };
    for i in 0..count {
        let len = r.varint()?;
        if len < 0 || len as usize > r.remaining() {
            return Err("record length out of range".into());
        }
        let end = r.pos + len as usize;
        r.u8()?;
        r.varlong()?;
        if r.varint()? != i as i32 {
            return Err("record offset deltas are not 0, 1, 2, ...".into());
        }
        r.skip_nullable_bytes(end)?;
        r.skip_nullable_bytes(end)?;
        let hcount = r.varint()?;
        if hcount < 0 || hcount as usize > (end.saturating_sub(r.pos)) / 2 {
            return Err("header count out of range".into());
        }
        for _ in 0..hcount {
            let name = r
                .nullable_slice(end)?
                .ok_or_else(|| "null header key".to_string())?;
            std::str::from_utf8(name).map_err(|_| "header key is not UTF-8".to_string())?;
            r.skip_nullable_bytes(end)?;
        }
        if r.pos != end {
            return Err("record length does not match its fields".into());
        }
    }
    if r.pos != data.len() {
        return Err("trailing bytes after the last record".into());
    }
    Ok(())
}

fn decompress(c: Compression, data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let limited = |r: &mut dyn Read, out: &mut Vec<u8>| -> Result<(), String> {
        r.take(max as u64 + 1)
            .read_to_end(out)
            .map_err(|e| format!("{c:?} decompression failed: {e}"))?;
        if out.len() > max {
            return Err(format!("decompressed batch exceeds {max} bytes"));
        }
        Ok(())
    };
    match c {
        Compression::None => out.extend_from_slice(data),
        Compression::Gzip => limited(&mut flate2::read::GzDecoder::new(data), &mut out)?,
        Compression::Lz4 => limited(&mut lz4_flex::frame::FrameDecoder::new(data), &mut out)?,
        Compression::Zstd => {
            let mut d = ruzstd::decoding::StreamingDecoder::new(data)
                .map_err(|e| format!("zstd decompression failed: {e}"))?;
            limited(&mut d, &mut out)?;
        }
        Compression::Snappy => snappy_decompress(data, max, &mut out)?,
    }
    Ok(out)
}

/// The xerial framing snappy-java writes (Kafka's Java client, kafka-python):
/// magic, version, compatible version, then `len:u32 block` chunks.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";

fn snappy_decompress(data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let block = |b: &[u8], out: &mut Vec<u8>| -> Result<(), String> {
        let n = snap::raw::decompress_len(b).map_err(|e| format!("snappy: {e}"))?;
        if out.len() + n > max {
            return Err(format!("decompressed batch exceeds {max} bytes"));
        }
        let start = out.len();
        out.resize(start + n, 0);
        snap::raw::Decoder::new()
            .decompress(b, &mut out[start..])
            .map_err(|e| format!("snappy: {e}"))?;
        Ok(())
    };
    if data.len() >= 16 && data.starts_with(XERIAL_MAGIC) {
        let mut pos = 16;
        while pos < data.len() {
            if data.len() - pos < 4 {
                return Err("snappy: truncated xerial chunk length".into());
            }
            let len = be_i32(data, pos) as u32 as usize;
            pos += 4;
            if len > data.len() - pos {
                return Err("snappy: xerial chunk exceeds the batch".into());
            }
            block(&data[pos..pos + len], out)?;
            pos += len;
        }
        Ok(())
    } else {
        block(data, out)
    }
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn u8(&mut self) -> Result<u8, String> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or_else(|| "record truncated".to_string())?;
        self.pos += 1;
        Ok(b)
    }

    fn uvarint(&mut self, max_bytes: u32) -> Result<u64, String> {
        let mut v: u64 = 0;
        for i in 0..max_bytes {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn varint(&mut self) -> Result<i32, String> {
        let v = self.uvarint(5)? as u32;
        Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
    }

    fn varlong(&mut self) -> Result<i64, String> {
        let v = self.uvarint(10)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// Where the next nullable bytes field lies (`None`: null), moving past it.
    fn nullable_range(&mut self, end: usize) -> Result<Option<std::ops::Range<usize>>, String> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        let len = len as usize;
        if self.pos + len > end || self.pos + len > self.data.len() {
            return Err("field length exceeds the record".into());
        }
        let r = self.pos..self.pos + len;
        self.pos += len;
        Ok(Some(r))
    }

    fn nullable_slice(&mut self, end: usize) -> Result<Option<&[u8]>, String> {
        let data: &Bytes = self.data;
        Ok(self.nullable_range(end)?.map(|r| &data[r]))
    }

    fn skip_nullable_bytes(&mut self, end: usize) -> Result<(), String> {
        self.nullable_range(end).map(|_| ())
    }

    fn nullable_bytes(&mut self, end: usize) -> Result<Option<Bytes>, String> {
        Ok(self.nullable_range(end)?.map(|r| self.data.slice(r)))
    }
}

/// Decodes a Kafka record batch (magic v2, any compression; several
/// concatenated batches are accepted) into messages: key, value, headers,
/// timestamps, producer id and sequence.
///
/// # Errors
/// A description of what is malformed.
pub fn batch_to_messages(batch: &Bytes) -> Result<Vec<Message>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < batch.len() {
        let h = parse_batch_header(&batch[pos..])?;
        let total = h.total_len();
        if total > batch.len() - pos {
            return Err("record batch length exceeds the entry".into());
        }
        let bytes = batch.slice(pos..pos + total);
        pos += total;
        if h.is_control() {
            continue;
        }
        for r in decode_records(&h, &bytes)? {
            let ts = h.base_timestamp.saturating_add(r.timestamp_delta);
            let (event_time, publish_time) = if h.log_append_time() {
                (None, h.max_timestamp)
            } else {
                (Some(ts), ts)
            };
            let producer = (h.producer_id >= 0).then(|| ProducerInfo {
                id: h.producer_id as u64,
                sequence: if h.base_sequence >= 0 {
                    i64::from(h.base_sequence) + i64::from(r.offset_delta)
                } else {
                    -1
                },
            });
            out.push(Message {
                key: r.key,
                payload: r.value.unwrap_or_default(),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(n, v)| (n.into(), v.unwrap_or_default()))
                    .collect(),
                event_time,
                publish_time,
                producer,
                ordering_key: None,
                replicated_from: None,
            });
        }
    }
    Ok(out)
}

fn put_uvarint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_varint(buf: &mut BytesMut, v: i32) {
    put_uvarint(buf, u64::from(((v << 1) ^ (v >> 31)) as u32));
}

fn put_varlong(buf: &mut BytesMut, v: i64) {
    put_uvarint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_nullable(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i32);
            buf.put_slice(b);
        }
    }
}

/// Builds one uncompressed record batch (magic 2, CreateTime, no producer
/// id) holding `messages` at offsets `base_offset..`, with a correct CRC-32C.
/// Used to serve entries written by other protocols to Kafka consumers.
/// Returns empty bytes for no messages.
pub fn messages_to_batch(base_offset: u64, messages: &[Message]) -> Bytes {
    if messages.is_empty() {
        return Bytes::new();
    }
    let ts = |m: &Message| m.event_time.unwrap_or(m.publish_time);
    let base_ts = messages.iter().map(ts).min().unwrap_or(0);
    let max_ts = messages.iter().map(ts).max().unwrap_or(0);
    let mut records = BytesMut::new();
    let mut rec = BytesMut::new();
    for (i, m) in messages.iter().enumerate() {
        rec.clear();
        rec.put_u8(0);
        put_varlong(&mut rec, ts(m).saturating_sub(base_ts));
        put_varint(&mut rec, i as i32);
        let key = m.key.as_deref().or(m.ordering_key.as_deref());
        put_nullable(&mut rec, key);
        put_nullable(&mut rec, Some(&m.payload));
        put_varint(&mut rec, m.headers.len() as i32);
        for (n, v) in &m.headers {
            put_nullable(&mut rec, Some(n.as_bytes()));
            put_nullable(&mut rec, Some(v));
        }
        put_varint(&mut records, rec.len() as i32);
        records.put_slice(&rec);
    }
    let mut b = BytesMut::with_capacity(BATCH_HEADER_LEN + records.len());
    b.put_i64(base_offset as i64);
    b.put_i32((BATCH_HEADER_LEN - LOG_OVERHEAD + records.len()) as i32);
    b.put_i32(0); // partition leader epoch
    b.put_i8(2); // magic
    b.put_u32(0); // CRC, filled below
    b.put_i16(0); // attributes: no compression, CreateTime
    b.put_i32(messages.len() as i32 - 1);
    b.put_i64(base_ts);
    b.put_i64(max_ts);
    b.put_i64(-1); // producer id
    b.put_i16(-1); // producer epoch
    b.put_i32(-1); // base sequence
    b.put_i32(messages.len() as i32);
    b.put_slice(&records);
    let crc = broker::checksum::crc32c(&b[CRC_START..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(key: Option<&str>, value: &str, headers: &[(&str, &str)], ts: i64) -> Message {
        Message {
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            payload: Bytes::copy_from_slice(value.as_bytes()),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string().into(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            event_time: Some(ts),
            publish_time: ts,
            ..Message::default()
        }
    }

    #[test]
    fn round_trip_and_validate() {
        let msgs = vec![
            msg(Some("k1"), "v1", &[("h", "x")], 1000),
            msg(None, "v2", &[], 1005),
        ];
        let b = messages_to_batch(42, &msgs);
        let v = split_and_validate(&b).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].header.base_offset, 42);
        assert_eq!(v[0].header.records_count, 2);
        assert_eq!(v[0].header.max_timestamp, 1005);
        assert_eq!(batch_to_messages(&b).unwrap(), msgs);
    }

    #[test]
    fn commits_outside_the_ledger_are_reported_as_sent() {
        let at = |offset, leader_epoch| ReportedCommit {
            offset,
            leader_epoch,
        };
        // Committed 5 on a ledger starting at 10: the cursor sits at 10.
        let p = commit_offset_property(5, 10, 0);
        assert_eq!(reported_commit(Some(&p), 10, 10), at(5, 0));
        // The log start moved on and pulled the cursor along: still 5.
        assert_eq!(reported_commit(Some(&p), 20, 20), at(5, 0));
        // Committed 1000 past an end of 50, without a leader epoch.
        let p = commit_offset_property(1000, 50, -1);
        assert_eq!(reported_commit(Some(&p), 50, 0), at(1000, -1));
        // Inside the ledger the two agree.
        let p = commit_offset_property(7, 7, 3);
        assert_eq!(reported_commit(Some(&p), 7, 0), at(7, 3));
        // Moved by something else (forward past the start, or back): the
        // cursor is the commit, and its epoch is unknown.
        assert_eq!(reported_commit(Some(&p), 9, 0), at(9, -1));
        assert_eq!(reported_commit(Some(&p), 3, 0), at(3, -1));
        // Written before the epoch was kept: no epoch.
        assert_eq!(reported_commit(Some("5 10"), 10, 10), at(5, -1));
        // No property (commits from before it existed) or garbage.
        assert_eq!(reported_commit(None, 4, 0), at(4, -1));
        assert_eq!(reported_commit(Some("x y"), 4, 0), at(4, -1));
        assert_eq!(reported_commit(Some("12"), 4, 0), at(4, -1));
        assert_eq!(reported_commit(Some("4 4 x"), 4, 0), at(4, -1));
        assert_eq!(reported_commit(Some("5 4 0 9"), 4, 0), at(4, -1));
    }

    #[test]
    fn crc_mismatch_is_corrupt() {
        let b = messages_to_batch(0, &[msg(Some("k"), "v", &[], 1)]);
        let mut m = b.to_vec();
        let last = m.len() - 1;
        m[last] ^= 0xff;
        let e = split_and_validate(&Bytes::from(m)).unwrap_err();
        assert_eq!(e.0, ErrorCode::CorruptMessage);
    }

    #[test]
    fn base_offset_patch_keeps_crc() {
        let b = messages_to_batch(0, &[msg(Some("k"), "v", &[], 1)]);
        let mut m = b.to_vec();
        set_base_offset(&mut m, 99);
        let v = split_and_validate(&Bytes::from(m)).unwrap();
        assert_eq!(v[0].header.base_offset, 99);
    }

    /// Compresses the records of an uncompressed batch with `codec`,
    /// producing a batch a client would send.
    fn compress_batch(b: &Bytes, codec: Compression) -> Bytes {
        let h = parse_batch_header(b).unwrap();
        let body = &b[BATCH_HEADER_LEN..];
        let comp: Vec<u8> = match codec {
            Compression::None => body.to_vec(),
            Compression::Gzip => {
                use std::io::Write;
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
            Compression::Snappy => {
                // xerial framing, as kafka-python writes it
                let block = snap::raw::Encoder::new().compress_vec(body).unwrap();
                let mut v = XERIAL_MAGIC.to_vec();
                v.extend_from_slice(&1i32.to_be_bytes());
                v.extend_from_slice(&1i32.to_be_bytes());
                v.extend_from_slice(&(block.len() as i32).to_be_bytes());
                v.extend_from_slice(&block);
                v
            }
            Compression::Lz4 => {
                use std::io::Write;
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => {
                ruzstd::encoding::compress_to_vec(body, ruzstd::encoding::CompressionLevel::Fastest)
            }
        };
        let mut out = BytesMut::new();
        out.put_slice(&b[..BATCH_HEADER_LEN]);
        out.put_slice(&comp);
        let len = (out.len() - LOG_OVERHEAD) as i32;
        out[8..12].copy_from_slice(&len.to_be_bytes());
        let attrs = h.attributes
            | match codec {
                Compression::None => 0,
                Compression::Gzip => 1,
                Compression::Snappy => 2,
                Compression::Lz4 => 3,
                Compression::Zstd => 4,
            };
        out[21..23].copy_from_slice(&attrs.to_be_bytes());
        let crc = broker::checksum::crc32c(&out[CRC_START..]);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
        out.freeze()
    }

    #[test]
    fn every_codec_decodes() {
        let msgs: Vec<Message> = (0..20)
            .map(|i| {
                msg(
                    Some(&format!("k{i}")),
                    &"x".repeat(100 + i),
                    &[("n", "v")],
                    5000 + i as i64,
                )
            })
            .collect();
        let plain = messages_to_batch(0, &msgs);
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = compress_batch(&plain, c);
            split_and_validate(&b).unwrap_or_else(|e| panic!("{c:?}: {e:?}"));
            assert_eq!(batch_to_messages(&b).unwrap(), msgs, "{c:?}");
        }
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-y").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a/b").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(
                ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..16)),
                0..3,
            ),
            0i64..1 << 45,
        )
            .prop_map(|(k, v, h, ts)| Message {
                key: k.map(Bytes::from),
                payload: Bytes::from(v),
                headers: h
                    .into_iter()
                    .map(|(n, v)| (n.into(), Bytes::from(v)))
                    .collect(),
                event_time: Some(ts),
                publish_time: ts,
                ..Message::default()
            })
    }

    proptest! {
        #[test]
        fn batches_round_trip(msgs in proptest::collection::vec(arb_message(), 1..8), base in 0u64..1 << 40) {
            let b = messages_to_batch(base, &msgs);
            let v = split_and_validate(&b).unwrap();
            prop_assert_eq!(v[0].header.base_offset as u64, base);
            prop_assert_eq!(batch_to_messages(&b).unwrap(), msgs);
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let b = Bytes::from(data);
            let _ = split_and_validate(&b);
            let _ = batch_to_messages(&b);
        }

        #[test]
        fn corrupted_batches_never_panic(msgs in proptest::collection::vec(arb_message(), 1..4), at in any::<usize>(), x in 1u8..) {
            let b = messages_to_batch(0, &msgs);
            let mut m = b.to_vec();
            let i = at % m.len();
            m[i] ^= x;
            let b = Bytes::from(m);
            let _ = split_and_validate(&b);
            let _ = batch_to_messages(&b);
        }
    }
}

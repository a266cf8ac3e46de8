//! The broker's error type.

use std::path::PathBuf;

/// Everything a broker operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// An I/O error on a file of the data directory.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tenant does not exist.
    #[error("tenant `{0}` does not exist")]
    TenantNotFound(String),
    /// The namespace does not exist.
    #[error("namespace `{0}` does not exist")]
    NamespaceNotFound(String),
    /// The topic does not exist (and auto-creation did not apply).
    #[error("topic `{0}` does not exist")]
    TopicNotFound(String),
    /// The partition index is outside the topic's partition count.
    #[error("topic `{topic}` has no partition {partition}")]
    PartitionNotFound { topic: String, partition: u32 },
    /// Creating something that already exists.
    #[error("`{0}` already exists")]
    AlreadyExists(String),
    /// A tenant or namespace still holds namespaces or topics.
    #[error("`{0}` is not empty")]
    NotEmpty(String),
    /// A name that is not allowed (empty, reserved characters, too long).
    #[error("invalid name `{name}`: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A request argument outside its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An offset below the ledger's start or above its end.
    #[error("offset {offset} out of range [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    /// An entry larger than the configured maximum.
    #[error("entry of {size} bytes exceeds the maximum of {max} bytes")]
    EntryTooLarge { size: usize, max: usize },
    /// Stored data failed its checksum or framing when read back.
    #[error("corrupt data in {path} at position {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: &'static str,
    },
    /// A message batch could not be decoded.
    #[error("malformed message batch: {0}")]
    Malformed(&'static str),
    /// The ledger (or the broker) has been closed or deleted.
    #[error("ledger closed")]
    Closed,
    /// Persisted metadata could not be parsed.
    #[error("metadata in {path} is unreadable: {reason}")]
    Metadata { path: PathBuf, reason: String },
}

impl BrokerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BrokerError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the broker crate.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

//! Manifold's broker core: managed ledgers of entries with durable cursors
//! on local disk, the `tenant/namespace/topic` namespace with its policies,
//! and the one [`Message`] model every protocol maps to.
//!
//! This crate knows no wire protocol. Protocol handlers reach it through the
//! [`Broker`] handle; the translation from each protocol's concepts to
//! ledgers, cursors and messages lives in the `mapping` crate.

mod broker;
pub mod checksum;
mod error;
pub mod ledger;
pub mod message;
pub mod topic;

pub use broker::{Broker, BrokerConfig, CursorStats, PartitionStats, TopicStats};
pub use error::{BrokerError, Result};
pub use ledger::{
    AppendEntry, Appended, Backlog, CacheBudget, Cursor, CursorOptions, Entry, Follow,
    InitialPosition, Journal, JournalOptions, Ledger, LedgerOptions, PendingAppend, ReadySet,
};
pub use message::{EntryFormat, HeaderName, Message, ProducerInfo};
pub use topic::{FsyncPolicy, NamespaceName, NamespacePolicy, TopicConfig, TopicMeta, TopicName};

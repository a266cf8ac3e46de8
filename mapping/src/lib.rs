//! Every translation between a wire protocol's concepts and the broker
//! core lives here, so it can be read, tested and reviewed in one place:
//! names (a Kafka topic, an MQTT topic, an AMQP queue -> a
//! `tenant/namespace/topic`), message conversion between protocol formats
//! and [`broker::Message`], and the tables of wire error codes.
//!
//! This crate is pure: no I/O, no async, no sockets. It knows the broker's
//! types but the broker does not know it.
//!
//! Cross-protocol contract: a handler stores what it receives as entries of
//! some [`EntryFormat`]; any handler reads any entry through
//! [`entry_messages`], and writes its own protocol's view of a message from
//! the [`Message`] fields. Protocol-specific properties travel as headers
//! (see each protocol module for its header names); the AMQP 0-9-1 and
//! MQTT 5 properties that mean the same thing (content type, correlation,
//! reply address, expiry) are read across protocols by the rule in
//! [`interop`].

pub mod amqp;
pub mod interop;
pub mod kafka;
pub mod mqtt;
pub mod names;

use broker::{Entry, EntryFormat, Message};

/// Why an entry could not be turned into messages.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The entry's payload is malformed for its format.
    #[error("malformed {format:?} entry: {reason}")]
    Malformed { format: EntryFormat, reason: String },
}

/// The messages of a stored entry, whatever protocol wrote it. Message `i`
/// of the result has offset `entry.base_offset + i`.
///
/// # Errors
/// [`MappingError::Malformed`] if the payload does not decode.
pub fn entry_messages(entry: &Entry) -> Result<Vec<Message>, MappingError> {
    match entry.format {
        EntryFormat::Messages => {
            broker::message::decode_batch(&entry.payload).map_err(|e| MappingError::Malformed {
                format: entry.format,
                reason: e.to_string(),
            })
        }
        EntryFormat::KafkaRecordBatch => {
            kafka::batch_to_messages(&entry.payload).map_err(|e| MappingError::Malformed {
                format: entry.format,
                reason: e.to_string(),
            })
        }
    }
}

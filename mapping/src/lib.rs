//! Every translation between a wire protocol's concepts and the broker
//! core lives here, so it can be read, tested and reviewed in one place:
//! names (a Kafka topic, an MQTT topic filter, an AMQP queue -> a
//! `tenant/namespace/topic`), message conversion between protocol formats
//! and [`broker::Message`], and the tables of wire error codes.
//!
//! This crate is pure: no I/O, no async, no sockets. It knows the broker's
//! types but the broker does not know it.

pub mod names;

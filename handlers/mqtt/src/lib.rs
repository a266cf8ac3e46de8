//! The MQTT protocol handler: MQTT 3.1, 3.1.1 and 5 over TCP and
//! WebSocket, translated into ledger operations on the broker core.
//!
//! - [`codec`] is the sans-IO packet codec (both directions, all three
//!   versions).
//! - `session` runs one connection: CONNECT, session takeover, publish
//!   flows at QoS 0/1/2 in both directions, subscriptions, wills, keep-alive.
//! - `ws` adapts a WebSocket connection (`mqtt` sub-protocol, binary
//!   frames) into the byte stream the session runs over.
//!
//! Storage model (the names are `mapping::mqtt`'s): an MQTT topic is one
//! broker topic in the configured namespace; a message is appended to
//! partition 0 of it. A subscriber reads every partition of every topic
//! its filters match: a persistent session through a durable cursor
//! `mqtt.<client id>` per partition (so queued messages survive restarts
//! and acknowledged ones are never delivered again), a clean session
//! through an in-memory position. Session state (subscriptions, expiry) is
//! kept as a property of a durable cursor per client id on the ledger
//! `<tenant>/<system_namespace>/sessions`; retained messages are an
//! append-only log `<tenant>/<system_namespace>/retained` replayed at start.
//!
//! This crate must not know other protocols: it reads foreign messages
//! only through `mapping::entry_messages`.

pub mod codec;
mod feeds;
mod session;
mod share;
mod state;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use handler_api::{
    BoxFuture, Connection, HandlerContext, HandlerError, HandlerFactory, ListenerSpec,
    ProtocolHandler,
};
use serde::Deserialize;

use crate::state::Shared;

/// The `[mqtt]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// MQTT over TCP.
    pub listen: SocketAddr,
    /// MQTT over WebSocket.
    pub ws_listen: SocketAddr,
    /// Whether the WebSocket listener is started.
    pub ws_enabled: bool,
    /// HTTP path of the WebSocket endpoint.
    pub ws_path: String,
    /// Connection limit per listener.
    pub max_connections: usize,
    /// Tenant of the namespace MQTT topics map to.
    pub tenant: String,
    /// Namespace MQTT topics map to.
    pub namespace: String,
    /// Namespace (same tenant) for session records and retained messages.
    pub system_namespace: String,
    /// Largest packet accepted (and advertised as v5 Maximum Packet Size).
    pub max_packet_size: u32,
    /// Longest client id accepted, in bytes.
    pub max_client_id_len: usize,
    /// QoS 1/2 publishes a client may have in flight towards us (v5
    /// Receive Maximum).
    pub receive_maximum: u16,
    /// QoS 1/2 deliveries in flight towards a client (also bounded by the
    /// client's Receive Maximum).
    pub max_inflight: u16,
    /// Topic aliases a v5 client may use.
    pub topic_alias_maximum: u16,
    /// Session expiry (seconds) of a 3.1/3.1.1 session with clean
    /// session = 0. 4294967295 = never.
    pub persistent_session_expiry_secs: u32,
    /// Upper bound on a v5 client's Session Expiry Interval.
    pub max_session_expiry_secs: u32,
    /// Subscriptions per session.
    pub max_subscriptions: usize,
    /// Time allowed between accept and CONNECT.
    pub connect_timeout_ms: u64,
    /// How often the namespace is scanned for topics created by other
    /// protocols (MQTT's own topics are seen at once).
    pub topic_scan_interval_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            ws_listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            ws_enabled: true,
            ws_path: "/mqtt".into(),
            max_connections: 100_000,
            tenant: "public".into(),
            namespace: "default".into(),
            system_namespace: "mqtt-system".into(),
            max_packet_size: 4 * 1024 * 1024,
            max_client_id_len: 256,
            receive_maximum: 256,
            max_inflight: 64,
            topic_alias_maximum: 64,
            persistent_session_expiry_secs: u32::MAX,
            max_session_expiry_secs: u32::MAX,
            max_subscriptions: 1000,
            connect_timeout_ms: 10_000,
            topic_scan_interval_ms: 1_000,
        }
    }
}

impl MqttConfig {
    fn validate(&self) -> Result<(), HandlerError> {
        let bad = |k: &str, why: &str| Err(HandlerError::Config(format!("mqtt.{k}: {why}")));
        if self.max_packet_size < 64 || self.max_packet_size > 268_435_460 {
            return bad("max_packet_size", "must be in 64..=268435460");
        }
        if self.receive_maximum == 0 {
            return bad("receive_maximum", "must be positive");
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be positive");
        }
        if !self.ws_path.starts_with('/') {
            return bad("ws_path", "must start with `/`");
        }
        if self.max_client_id_len < 23 {
            return bad(
                "max_client_id_len",
                "must be at least 23 (the spec's minimum)",
            );
        }
        mapping::mqtt::namespace(&self.tenant, &self.namespace)
            .map_err(|e| HandlerError::Config(format!("mqtt.namespace: {e}")))?;
        mapping::mqtt::namespace(&self.tenant, &self.system_namespace)
            .map_err(|e| HandlerError::Config(format!("mqtt.system_namespace: {e}")))?;
        if self.system_namespace == self.namespace {
            return bad("system_namespace", "must differ from namespace");
        }
        Ok(())
    }
}

/// The MQTT handler.
#[derive(Debug)]
pub struct MqttHandler {
    config: MqttConfig,
    shared: std::sync::OnceLock<Arc<Shared>>,
}

impl MqttHandler {
    /// Builds the handler from its config (starts nothing).
    ///
    /// # Errors
    /// [`HandlerError::Config`] naming the invalid key.
    pub fn new(config: MqttConfig) -> Result<Self, HandlerError> {
        config.validate()?;
        Ok(MqttHandler {
            config,
            shared: std::sync::OnceLock::new(),
        })
    }
}

/// The handler's factory, registered by the gateway as `mqtt`.
pub const FACTORY: HandlerFactory = HandlerFactory {
    name: "mqtt",
    build: |section| {
        let config: MqttConfig = handler_api::parse_section(section)?;
        Ok(Arc::new(MqttHandler::new(config)?))
    },
};

impl ProtocolHandler for MqttHandler {
    fn protocol(&self) -> &'static str {
        "mqtt"
    }

    fn listeners(&self) -> Vec<ListenerSpec> {
        let mut v = vec![ListenerSpec {
            name: "mqtt".into(),
            addr: self.config.listen,
            max_connections: self.config.max_connections,
        }];
        if self.config.ws_enabled {
            v.push(ListenerSpec {
                name: "mqtt-ws".into(),
                addr: self.config.ws_listen,
                max_connections: self.config.max_connections,
            });
        }
        v
    }

    fn start(&self, ctx: HandlerContext) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            let shared = Shared::start(self.config.clone(), ctx).await?;
            let _ = self.shared.set(shared);
            Ok(())
        })
    }

    fn serve(self: Arc<Self>, conn: Connection) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(async move {
            let Some(shared) = self.shared.get().cloned() else {
                return Err(HandlerError::Protocol("mqtt handler not started".into()));
            };
            if conn.listener == "mqtt-ws" {
                // Boxed: a TCP connection's task does not pay for the
                // WebSocket adapter's state.
                Box::pin(ws::serve(shared, conn)).await
            } else {
                session::run(shared, conn.stream, conn.shutdown).await
            }
        })
    }

    fn drain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(s) = self.shared.get() {
                s.drain().await;
            }
        })
    }
}

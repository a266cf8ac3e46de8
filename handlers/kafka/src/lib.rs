//! Manifold's Kafka protocol handler: unchanged Kafka clients produce,
//! consume and run consumer groups against the broker core.
//!
//! Layers, bottom up:
//! - [`codec`]: the sans-IO frame layer and the table of supported APIs;
//!   request and response bodies are the `kafka-protocol` crate's.
//! - `conn`: one task per connection, requests answered strictly in order
//!   (as a Kafka broker does), one at a time.
//! - services: `produce` (validation, idempotence, append), `fetch` (long
//!   polling on the ledger's end offset), `group` (the classic group
//!   coordinator), `offsets` (commits as durable cursors, list offsets),
//!   `admin` (topics, partitions, records, configs), `cluster`
//!   (ApiVersions, Metadata, FindCoordinator, DescribeCluster).
//!
//! Record batch formats, the Kafka topic name rule and the error-code table
//! live in `mapping::kafka`. This crate knows no other protocol.

mod admin;
pub mod codec;
mod conn;
mod fetch;
mod group;
mod offsets;
mod produce;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use handler_api::{
    BoxFuture, Connection, HandlerContext, HandlerError, HandlerFactory, ListenerSpec,
    ProtocolHandler,
};
use serde::Deserialize;

use crate::state::State;

/// The `[kafka]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Address to listen on (default `0.0.0.0:9092`).
    pub listen: SocketAddr,
    /// Most connections open at once.
    pub max_connections: usize,
    /// `host:port` advertised to clients in Metadata and FindCoordinator.
    /// Default: the bound address (with `0.0.0.0` replaced by `127.0.0.1`).
    pub advertised_listener: Option<String>,
    /// Largest request frame accepted (Kafka's `socket.request.max.bytes`).
    pub max_frame_bytes: usize,
    /// Tenant Kafka topics live in.
    pub tenant: String,
    /// Namespace Kafka topics live in.
    pub namespace: String,
    /// The node id this gateway reports as the broker and controller.
    pub node_id: i32,
    /// Cluster id reported in Metadata and DescribeCluster.
    pub cluster_id: String,
    /// Delay before the first rebalance of an empty group completes, so
    /// that members starting together join one generation (Kafka's
    /// `group.initial.rebalance.delay.ms`).
    pub group_initial_rebalance_delay_ms: u64,
    /// Smallest and largest session timeout a member may ask for.
    pub group_min_session_timeout_ms: i32,
    pub group_max_session_timeout_ms: i32,
    /// Most bytes of one Fetch response (a cap on the client's max_bytes).
    pub fetch_max_bytes: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9092)),
            max_connections: 10_000,
            advertised_listener: None,
            max_frame_bytes: 100 * 1024 * 1024,
            tenant: broker::topic::DEFAULT_TENANT.to_owned(),
            namespace: broker::topic::DEFAULT_NAMESPACE.to_owned(),
            node_id: 0,
            cluster_id: "manifold".to_owned(),
            group_initial_rebalance_delay_ms: 3000,
            group_min_session_timeout_ms: 6_000,
            group_max_session_timeout_ms: 1_800_000,
            fetch_max_bytes: 55 * 1024 * 1024,
        }
    }
}

impl KafkaConfig {
    fn validate(&self) -> Result<(), HandlerError> {
        let bad = |m: String| Err(HandlerError::Config(format!("[kafka] {m}")));
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes must be at least 1024".into());
        }
        if let Err(e) = mapping::names::NamespaceMapping::new(&self.tenant, &self.namespace) {
            return bad(format!("tenant/namespace: {e}"));
        }
        if let Some(a) = &self.advertised_listener {
            if parse_host_port(a).is_none() {
                return bad(format!("advertised_listener `{a}` is not host:port"));
            }
        }
        if self.group_min_session_timeout_ms > self.group_max_session_timeout_ms {
            return bad("group_min_session_timeout_ms exceeds the maximum".into());
        }
        Ok(())
    }
}

pub(crate) fn parse_host_port(s: &str) -> Option<(String, i32)> {
    let (h, p) = s.rsplit_once(':')?;
    let p: u16 = p.parse().ok()?;
    if h.is_empty() {
        return None;
    }
    Some((
        h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        i32::from(p),
    ))
}

/// The Kafka handler.
#[derive(Debug)]
pub struct KafkaHandler {
    config: KafkaConfig,
    state: OnceLock<Arc<State>>,
}

impl KafkaHandler {
    /// A handler with `config` (validated).
    ///
    /// # Errors
    /// [`HandlerError::Config`] naming the bad key.
    pub fn new(config: KafkaConfig) -> Result<Self, HandlerError> {
        config.validate()?;
        Ok(KafkaHandler {
            config,
            state: OnceLock::new(),
        })
    }
}

/// The handler's factory, registered by the gateway as `kafka`.
pub const FACTORY: HandlerFactory = HandlerFactory {
    name: "kafka",
    build: |section| {
        let config: KafkaConfig = handler_api::parse_section(section)?;
        Ok(Arc::new(KafkaHandler::new(config)?))
    },
};

impl ProtocolHandler for KafkaHandler {
    fn protocol(&self) -> &'static str {
        "kafka"
    }

    fn listeners(&self) -> Vec<ListenerSpec> {
        vec![ListenerSpec {
            name: "kafka".into(),
            addr: self.config.listen,
            max_connections: self.config.max_connections,
        }]
    }

    fn start(&self, ctx: HandlerContext) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            let state = State::start(self.config.clone(), ctx).await?;
            self.state
                .set(state)
                .map_err(|_| HandlerError::Protocol("kafka handler started twice".into()))?;
            Ok(())
        })
    }

    fn serve(self: Arc<Self>, conn: Connection) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(async move {
            let state = self
                .state
                .get()
                .cloned()
                .ok_or_else(|| HandlerError::Protocol("kafka handler not started".into()))?;
            conn::serve(state, conn).await
        })
    }

    fn drain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(s) = self.state.get() {
                s.broker.persist_cursors().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(toml_text: &str) -> Result<Arc<dyn ProtocolHandler>, HandlerError> {
        let v: toml::Value = toml::from_str(toml_text).expect("valid TOML");
        (FACTORY.build)(Some(&v))
    }

    #[test]
    fn defaults_listen_on_9092() {
        let h = (FACTORY.build)(None).unwrap();
        assert_eq!(
            h.listeners()[0].addr,
            SocketAddr::from(([0, 0, 0, 0], 9092))
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = build("listne = \"127.0.0.1:1\"").err().unwrap().to_string();
        assert!(e.contains("listne"), "{e}");
        let e = build("advertised_listener = \"nohost\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("advertised_listener"), "{e}");
        let e = build("tenant = \"a/b\"").err().unwrap().to_string();
        assert!(e.contains("tenant"), "{e}");
        assert!(
            build("advertised_listener = \"kafka.example:9093\"\nmax_frame_bytes = 1048576")
                .is_ok()
        );
    }
}

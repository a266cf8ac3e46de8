//! The `[amqp]` config section.

use std::net::SocketAddr;

/// A user allowed to log in (SASL PLAIN or AMQPLAIN).
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Password (compared in constant time).
    pub password: String,
}

/// Settings of the AMQP 0-9-1 handler.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Largest frame the server accepts and proposes in connection.tune
    /// (bytes, at least 4096).
    pub frame_max: u32,
    /// Most channels per connection proposed in connection.tune.
    pub channel_max: u16,
    /// Heartbeat interval proposed in connection.tune, in seconds (0 = off).
    pub heartbeat: u16,
    /// Tenant of the namespaces that virtual hosts other than `/` map to.
    pub vhost_tenant: String,
    /// Whether connection.open creates a missing virtual host (namespace).
    pub create_vhosts: bool,
    /// Users allowed to log in.
    pub users: Vec<User>,
    /// Largest message body accepted (bytes); bigger publishes fail with
    /// 406 PRECONDITION_FAILED. Clamped to the broker's entry size limit.
    pub max_message_bytes: u64,
    /// Publishes queued per channel waiting for storage before the
    /// connection stops reading (and sends connection.blocked).
    pub publish_queue_depth: usize,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5672)),
            max_connections: 10_000,
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            vhost_tenant: "amqp".into(),
            create_vhosts: true,
            users: vec![User {
                name: "guest".into(),
                password: "guest".into(),
            }],
            max_message_bytes: 16 * 1024 * 1024 - 64 * 1024,
            publish_queue_depth: 4096,
        }
    }
}

impl AmqpConfig {
    /// Checks value ranges.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.frame_max < crate::codec::FRAME_MIN_SIZE {
            return Err("amqp.frame_max must be at least 4096".into());
        }
        if self.max_connections == 0 {
            return Err("amqp.max_connections must be at least 1".into());
        }
        if self.publish_queue_depth == 0 {
            return Err("amqp.publish_queue_depth must be at least 1".into());
        }
        broker::NamespaceName::new(&self.vhost_tenant, "x")
            .map_err(|e| format!("amqp.vhost_tenant: {e}"))?;
        Ok(())
    }
}

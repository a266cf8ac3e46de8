//! AMQP 0-9-1 <-> core mapping.
//!
//! # Model
//!
//! - **Virtual host -> namespace.** The vhost `/` is the default namespace
//!   `public/default`; any other vhost `v` is the namespace
//!   `<tenant>/<escape(v)>` with the tenant from the handler's
//!   configuration (created on demand).
//! - **Queue -> topic with one durable cursor.** A queue `q` owns the
//!   single-partition topic [`queue_topic_name`]`(q)` in its vhost's
//!   namespace (partition 0) and the durable cursor [`QUEUE_CURSOR`] on it.
//!   Acknowledgements are cursor acks (individual, persisted as ranges);
//!   the cursor's mark-delete is the queue's head. A message routed to a
//!   queue is appended to that topic, so a Kafka or MQTT consumer of the
//!   same topic name reads everything routed to the queue, and anything
//!   a Kafka or MQTT producer appends to that topic is delivered to the
//!   queue's AMQP consumers. Queue names made of `[A-Za-z0-9._-]` (at most
//!   249 bytes, not `.`/`..`) are used as topic names unchanged; others
//!   are escaped (see [`queue_topic_name`]).
//! - **Exchange and binding -> handler metadata.** Exchanges and bindings
//!   hold no messages: they are routing tables kept by the AMQP handler in
//!   its own crash-safe metadata. A publish is routed once and appended to
//!   every destination queue's topic (one copy per queue, as RabbitMQ's
//!   classic queues do).
//!
//! # Messages
//!
//! A published AMQP message becomes one [`Message`]: the body is the
//! payload, the routing key is the key (so Kafka consumers see it as the
//! record key), and the exchange and every content property travel as
//! headers named below. User headers of the `headers` property whose value
//! is a long string or a byte array are also copied as plain headers (name
//! unchanged), so other protocols see them, except names starting with
//! `amqp.` or `mqtt.`: those are the handlers' own (a table an AMQP
//! consumer got from an MQTT message holds `mqtt.topic`; republished, it
//! must not make the message look MQTT's, for an old topic). The complete
//! table, with its value types, travels encoded in [`H_HEADERS`] so AMQP
//! consumers get it back exactly.
//!
//! A message written by another protocol (no [`H_HEADERS`]) is delivered
//! to AMQP consumers with its headers as a `headers` table of long
//! strings, its key as the routing key (the queue name if it has none),
//! and the exchange `""`.
//!
//! A message the AMQP handler did not write (it has no [`H_EXCHANGE`])
//! gets MQTT 5 properties as AMQP properties; the header a property is
//! made of is then not in the `headers` table (the rule and its reasons:
//! [`crate::interop`]):
//!
//! | MQTT header | AMQP property |
//! |-------------|---------------|
//! | `content-type` | content-type, if at most 255 bytes (else it stays a header) |
//! | `mqtt.correlation-data` | correlation-id if UTF-8 of at most 255 bytes; else the header `x-correlation-id` (long string, the bytes unchanged) |
//! | `mqtt.response-topic` `t` | reply-to: the broker topic name of `t`, `a/b` -> `a.b` ([`crate::interop::reply_to_for_response_topic`]) |
//! | `mqtt.expires-at` (deadline, ms) | expiration: deadline - `publish_time`, in ms (the interval as published); the queue expires the message at that deadline |
//!
//! Where those are absent, the `amqp.*` headers below are read, as for any
//! message.
//!
//! | AMQP                  | message header          | value |
//! |-----------------------|-------------------------|-------|
//! | exchange              | `amqp.exchange`         | UTF-8 |
//! | routing key           | `amqp.routing-key` and the key | UTF-8 |
//! | content-type          | `amqp.content-type`     | UTF-8 |
//! | content-encoding      | `amqp.content-encoding` | UTF-8 |
//! | headers               | `amqp.headers`          | AMQP field table, encoded |
//! | delivery-mode         | `amqp.delivery-mode`    | `1` or `2` |
//! | priority              | `amqp.priority`         | decimal |
//! | correlation-id        | `amqp.correlation-id`   | UTF-8 |
//! | reply-to              | `amqp.reply-to`         | UTF-8 |
//! | expiration            | `amqp.expiration`       | UTF-8 (ms) |
//! | message-id            | `amqp.message-id`       | UTF-8 |
//! | timestamp             | `amqp.timestamp`        | decimal seconds; also `event_time` |
//! | type                  | `amqp.type`             | UTF-8 |
//! | user-id               | `amqp.user-id`          | UTF-8 |
//! | app-id                | `amqp.app-id`           | UTF-8 |
//! | cluster-id            | `amqp.cluster-id`       | UTF-8 |

use broker::{BrokerError, HeaderName, Message, NamespaceName, TopicName};
use bytes::Bytes;

use crate::interop::{self, as_shortstr};
use crate::mqtt;

/// Name of the durable cursor that is an AMQP queue's consumption state.
pub const QUEUE_CURSOR: &str = "amqp";

/// Header carrying the exchange a message was published to.
pub const H_EXCHANGE: &str = "amqp.exchange";
/// Header carrying the routing key.
pub const H_ROUTING_KEY: &str = "amqp.routing-key";
/// Header carrying the encoded `headers` field table.
pub const H_HEADERS: &str = "amqp.headers";
/// Header carrying the content-type property.
pub const H_CONTENT_TYPE: &str = "amqp.content-type";
/// Header carrying the correlation-id property.
pub const H_CORRELATION_ID: &str = "amqp.correlation-id";
/// Header carrying the reply-to property.
pub const H_REPLY_TO: &str = "amqp.reply-to";
/// Header carrying the expiration property (decimal ms, counted from the
/// message's `publish_time`).
pub const H_EXPIRATION: &str = "amqp.expiration";
/// Prefix of every AMQP header.
pub const H_PREFIX: &str = "amqp.";

/// AMQP 0-9-1 reply codes (the spec's constants), for channel.close and
/// connection.close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReplyCode {
    /// 200
    Success = 200,
    /// 311: channel
    ContentTooLarge = 311,
    /// 312: basic.return only
    NoRoute = 312,
    /// 313: basic.return only
    NoConsumers = 313,
    /// 320: connection
    ConnectionForced = 320,
    /// 402: connection
    InvalidPath = 402,
    /// 403: channel
    AccessRefused = 403,
    /// 404: channel
    NotFound = 404,
    /// 405: channel
    ResourceLocked = 405,
    /// 406: channel
    PreconditionFailed = 406,
    /// 501: connection
    FrameError = 501,
    /// 502: connection
    SyntaxError = 502,
    /// 503: connection
    CommandInvalid = 503,
    /// 504: connection
    ChannelError = 504,
    /// 505: connection
    UnexpectedFrame = 505,
    /// 506: connection
    ResourceError = 506,
    /// 530: connection
    NotAllowed = 530,
    /// 540: connection
    NotImplemented = 540,
    /// 541: connection
    InternalError = 541,
}

impl ReplyCode {
    /// The code on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The spec's name, as RabbitMQ puts it at the start of reply texts.
    pub fn text(self) -> &'static str {
        match self {
            ReplyCode::Success => "OK",
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Whether the code closes the whole connection (a "hard error").
    pub fn is_connection_error(self) -> bool {
        matches!(
            self,
            ReplyCode::ConnectionForced
                | ReplyCode::InvalidPath
                | ReplyCode::FrameError
                | ReplyCode::SyntaxError
                | ReplyCode::CommandInvalid
                | ReplyCode::ChannelError
                | ReplyCode::UnexpectedFrame
                | ReplyCode::ResourceError
                | ReplyCode::NotAllowed
                | ReplyCode::NotImplemented
                | ReplyCode::InternalError
        )
    }
}

/// The reply code for a broker error met while serving a method.
pub fn reply_for_broker_error(e: &BrokerError) -> ReplyCode {
    match e {
        BrokerError::TopicNotFound(_)
        | BrokerError::NamespaceNotFound(_)
        | BrokerError::TenantNotFound(_)
        | BrokerError::PartitionNotFound { .. } => ReplyCode::NotFound,
        BrokerError::InvalidName { .. } | BrokerError::InvalidArgument(_) => {
            ReplyCode::PreconditionFailed
        }
        BrokerError::EntryTooLarge { .. } => ReplyCode::ContentTooLarge,
        BrokerError::Closed => ReplyCode::ConnectionForced,
        _ => ReplyCode::InternalError,
    }
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'
}

/// Escapes a name into `[A-Za-z0-9._-]`: a byte outside `[A-Za-z0-9.-]`
/// becomes `_` and two lowercase hex digits (so `_` is `_5f`).
pub fn escape_name(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("_{b:02x}"));
        }
    }
    s
}

/// The topic (within its vhost's namespace) that holds queue `queue`:
/// the name itself when it is valid as a Kafka topic name
/// (`[A-Za-z0-9._-]{1,249}`, not `.` or `..`), otherwise `amqp-` followed
/// by [`escape_name`] of the name (e.g. `a b` -> `amqp-a_20b`), cut to 249
/// bytes with a hash suffix when longer.
pub fn queue_topic_name(queue: &str) -> String {
    if !queue.is_empty()
        && queue.len() <= 249
        && queue != "."
        && queue != ".."
        && queue.bytes().all(is_plain)
    {
        return queue.to_owned();
    }
    let mut t = format!("amqp-{}", escape_name(queue));
    if t.len() > 249 {
        // FNV-1a keeps long names distinct after the cut.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in queue.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        t.truncate(232);
        t.push_str(&format!("-{h:016x}"));
    }
    t
}

/// The namespace of a virtual host (see the module docs).
///
/// # Errors
/// [`BrokerError::InvalidName`] if the tenant is invalid or the vhost is
/// too long.
pub fn vhost_namespace(tenant: &str, vhost: &str) -> Result<NamespaceName, BrokerError> {
    if vhost == "/" {
        return Ok(NamespaceName::default_namespace());
    }
    let ns = if vhost.is_empty() {
        "_".to_owned()
    } else {
        escape_name(vhost)
    };
    NamespaceName::new(tenant, &ns)
}

/// The topic of queue `queue` in vhost namespace `ns`.
///
/// # Errors
/// [`BrokerError::InvalidName`] (cannot happen for names from
/// [`queue_topic_name`], which are always valid components).
pub fn queue_topic(ns: &NamespaceName, queue: &str) -> Result<TopicName, BrokerError> {
    TopicName::new(ns.clone(), &queue_topic_name(queue))
}

/// AMQP content properties in protocol-neutral form (the AMQP handler
/// converts its wire type to and from this).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmqpProperties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The `headers` table in its AMQP encoding (length prefix included).
    pub headers_table: Option<Bytes>,
    /// Entries of the `headers` table that have a long string or byte
    /// array value, exported as plain headers for other protocols.
    pub string_headers: Vec<(String, Bytes)>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    pub cluster_id: Option<String>,
}

/// An AMQP message as routed: where it was published and its content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmqpMessage {
    pub exchange: String,
    pub routing_key: String,
    pub properties: AmqpProperties,
    pub body: Bytes,
}

fn s(v: &str) -> Bytes {
    Bytes::copy_from_slice(v.as_bytes())
}

/// The core message for a published AMQP message (`now_ms`: publish time).
pub fn to_message(m: &AmqpMessage, now_ms: i64) -> Message {
    let p = &m.properties;
    let mut h: Vec<(HeaderName, Bytes)> = Vec::with_capacity(4);
    h.push((H_EXCHANGE.into(), s(&m.exchange)));
    h.push((H_ROUTING_KEY.into(), s(&m.routing_key)));
    let mut opt = |name: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            h.push((name.into(), s(v)));
        }
    };
    opt(H_CONTENT_TYPE, &p.content_type);
    opt("amqp.content-encoding", &p.content_encoding);
    opt(H_CORRELATION_ID, &p.correlation_id);
    opt(H_REPLY_TO, &p.reply_to);
    opt(H_EXPIRATION, &p.expiration);
    opt("amqp.message-id", &p.message_id);
    opt("amqp.type", &p.kind);
    opt("amqp.user-id", &p.user_id);
    opt("amqp.app-id", &p.app_id);
    opt("amqp.cluster-id", &p.cluster_id);
    if let Some(v) = p.delivery_mode {
        h.push(("amqp.delivery-mode".into(), s(&v.to_string())));
    }
    if let Some(v) = p.priority {
        h.push(("amqp.priority".into(), s(&v.to_string())));
    }
    if let Some(v) = p.timestamp {
        h.push(("amqp.timestamp".into(), s(&v.to_string())));
    }
    if let Some(t) = &p.headers_table {
        h.push((H_HEADERS.into(), t.clone()));
    }
    for (n, v) in &p.string_headers {
        if !n.starts_with(H_PREFIX) && !n.starts_with(mqtt::RESERVED_PREFIX) {
            h.push((n.clone().into(), v.clone()));
        }
    }
    Message {
        key: if m.routing_key.is_empty() {
            None
        } else {
            Some(s(&m.routing_key))
        },
        payload: m.body.clone(),
        headers: h,
        event_time: p.timestamp.map(|t| (t as i64).saturating_mul(1000)),
        publish_time: now_ms,
        ..Message::default()
    }
}

/// The AMQP properties of a message another protocol wrote, read from its
/// MQTT 5 headers (see [`crate::interop`]), the headers they came from,
/// and headers to add to the `headers` table.
#[derive(Default)]
struct FromMqtt {
    content_type: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    used: Vec<&'static str>,
    extra: Vec<(String, Bytes)>,
}

fn from_mqtt(m: &Message) -> FromMqtt {
    let mut f = FromMqtt::default();
    if let Some(ct) = m.header(mqtt::H_CONTENT_TYPE).and_then(|v| as_shortstr(v)) {
        f.content_type = Some(ct.to_owned());
        f.used.push(mqtt::H_CONTENT_TYPE);
    }
    if let Some(c) = m.header(mqtt::H_CORRELATION_DATA) {
        if let Some(id) = as_shortstr(c) {
            f.correlation_id = Some(id.to_owned());
            f.used.push(mqtt::H_CORRELATION_DATA);
        } else if m.header(interop::H_X_CORRELATION_ID).is_none() {
            f.extra
                .push((interop::H_X_CORRELATION_ID.to_owned(), c.clone()));
            f.used.push(mqtt::H_CORRELATION_DATA);
        }
    }
    if let Some(t) = m
        .header(mqtt::H_RESPONSE_TOPIC)
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|t| !t.is_empty())
    {
        f.reply_to = Some(interop::reply_to_for_response_topic(t));
        f.used.push(mqtt::H_RESPONSE_TOPIC);
    }
    if let Some(at) = m
        .header(mqtt::H_EXPIRES_AT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        f.expiration = Some(at.saturating_sub(m.publish_time).max(0).to_string());
        f.used.push(mqtt::H_EXPIRES_AT);
    }
    f
}

/// The AMQP view of a stored message of any protocol; `queue` is the
/// routing key used when the message has none.
pub fn from_message(m: &Message, queue: &str) -> AmqpMessage {
    let text = |name: &str| {
        m.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let num = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
    let foreign = if m.header(H_EXCHANGE).is_some() {
        FromMqtt::default()
    } else {
        from_mqtt(m)
    };
    let routing_key = text(H_ROUTING_KEY)
        .or_else(|| {
            m.key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
        })
        .unwrap_or_else(|| queue.to_owned());
    let headers_table = m.header(H_HEADERS).cloned();
    let string_headers = if headers_table.is_some() {
        Vec::new()
    } else {
        m.headers
            .iter()
            .filter(|(n, _)| !n.starts_with(H_PREFIX) && !foreign.used.contains(&n.as_str()))
            .map(|(n, v)| (n.to_string(), v.clone()))
            .chain(foreign.extra)
            .collect()
    };
    AmqpMessage {
        exchange: text(H_EXCHANGE).unwrap_or_default(),
        routing_key,
        properties: AmqpProperties {
            content_type: foreign.content_type.or_else(|| text(H_CONTENT_TYPE)),
            content_encoding: text("amqp.content-encoding"),
            headers_table,
            string_headers,
            delivery_mode: num("amqp.delivery-mode").map(|v| v as u8),
            priority: num("amqp.priority").map(|v| v as u8),
            correlation_id: foreign.correlation_id.or_else(|| text(H_CORRELATION_ID)),
            reply_to: foreign.reply_to.or_else(|| text(H_REPLY_TO)),
            expiration: foreign.expiration.or_else(|| text(H_EXPIRATION)),
            message_id: text("amqp.message-id"),
            timestamp: num("amqp.timestamp"),
            kind: text("amqp.type"),
            user_id: text("amqp.user-id"),
            app_id: text("amqp.app-id"),
            cluster_id: text("amqp.cluster-id"),
        },
        body: m.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_map_to_kafka_valid_topics() {
        assert_eq!(queue_topic_name("orders"), "orders");
        assert_eq!(queue_topic_name("a.b-c_d"), "a.b-c_d");
        assert_eq!(queue_topic_name("a b"), "amqp-a_20b");
        assert_eq!(queue_topic_name(""), "amqp-");
        assert_eq!(queue_topic_name("amq.gen-x/y"), "amqp-amq.gen-x_2fy");
        let long = "é".repeat(200);
        let t = queue_topic_name(&long);
        assert!(t.len() <= 249);
        assert!(t.bytes().all(is_plain));
        assert_ne!(t, queue_topic_name(&"é".repeat(201)));
    }

    #[test]
    fn vhosts_map_to_namespaces() {
        assert_eq!(
            vhost_namespace("amqp", "/").unwrap().to_string(),
            "public/default"
        );
        assert_eq!(
            vhost_namespace("amqp", "dev").unwrap().to_string(),
            "amqp/dev"
        );
        assert_eq!(
            vhost_namespace("amqp", "a/b").unwrap().to_string(),
            "amqp/a_2fb"
        );
    }

    #[test]
    fn properties_round_trip_through_message() {
        let m = AmqpMessage {
            exchange: "ex".into(),
            routing_key: "rk".into(),
            properties: AmqpProperties {
                content_type: Some("text/plain".into()),
                headers_table: Some(Bytes::from_static(b"\0\0\0\0")),
                string_headers: vec![("h".into(), Bytes::from_static(b"v"))],
                delivery_mode: Some(2),
                priority: Some(4),
                timestamp: Some(1_700_000_000),
                message_id: Some("m1".into()),
                ..AmqpProperties::default()
            },
            body: Bytes::from_static(b"body"),
        };
        let msg = to_message(&m, 5);
        assert_eq!(msg.key.as_deref(), Some(&b"rk"[..]));
        assert_eq!(msg.header("h").map(|v| &v[..]), Some(&b"v"[..]));
        assert_eq!(msg.event_time, Some(1_700_000_000_000));
        let mut back = from_message(&msg, "q");
        assert!(back.properties.string_headers.is_empty());
        back.properties.string_headers = m.properties.string_headers.clone();
        assert_eq!(back, m);
    }

    #[test]
    fn foreign_messages_get_defaults() {
        let mut msg = Message::new(Bytes::from_static(b"x"));
        msg.headers.push(("trace".into(), Bytes::from_static(b"1")));
        let a = from_message(&msg, "q");
        assert_eq!(a.routing_key, "q");
        assert_eq!(a.exchange, "");
        assert_eq!(a.properties.string_headers.len(), 1);
    }
}

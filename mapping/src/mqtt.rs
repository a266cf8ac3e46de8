//! MQTT <-> core mapping: topic names, topic filters, messages and reason
//! codes.
//!
//! # Names
//!
//! An MQTT topic `t` is stored in the broker topic
//! `<tenant>/<namespace>/<encode(t)>` (tenant and namespace from the `[mqtt]`
//! section, `public/default` unless configured). [`encode_topic`] produces a
//! valid Kafka topic name (`[a-zA-Z0-9._-]`, at most 249 characters), so a
//! Kafka consumer of the same namespace reads MQTT topics directly:
//!
//! | MQTT | stored / Kafka name |
//! | --- | --- |
//! | `/` (level separator) | `.` |
//! | `A-Z a-z 0-9 -` | unchanged |
//! | `_` | `_`, or `__` when what follows would read as an escape |
//! | any other byte of the UTF-8 encoding (`.`, `$`, space, `é`...) | `_XX` (upper-case hex) |
//!
//! so `sensors/room-1/temp` is `sensors.room-1.temp` and `$SYS/uptime` is
//! `_24SYS.uptime`. The rule is injective and reversible
//! ([`decode_topic`]), which is how wildcard subscribers find MQTT topics
//! among the namespace's broker topics, including topics that Kafka
//! producers created: a Kafka topic `orders.eu` is the MQTT topic
//! `orders/eu`; `my_topic` is `my_topic`. A name whose `_XX` escapes do not
//! decode to valid UTF-8 (e.g. Kafka's `a_FF`) is not visible to MQTT
//! wildcard subscriptions. The names `.` and `..` (MQTT `/` and `//`) are
//! not valid broker names and are written with escapes (`_2F`, `_2F_2F`).
//!
//! An encoded name longer than 248 characters is shortened to exactly 249:
//! a 216-character prefix, `-h`, and 31 hex digits of a 128-bit FNV-1a hash
//! of the MQTT topic ([`encode_topic`]). Such a name cannot be decoded; its
//! MQTT topic is read from the [`H_TOPIC`] header of its messages.
//!
//! Every MQTT message stores its MQTT topic in the [`H_TOPIC`] header, so
//! the original topic is known whatever the name.
//!
//! A persistent MQTT session `c` keeps a durable cursor [`session_cursor_name`]
//! (`mqtt.<c>`) on each partition ledger its subscriptions match; a shared
//! subscription `$share/<g>/<f>` keeps one cursor per group and filter,
//! [`shared_cursor_name`] (`mqtt-share.<g>/<f>`; a group name has no `/`).
//!
//! # Messages (MQTT PUBLISH <-> [`Message`])
//!
//! | MQTT | `Message` |
//! | --- | --- |
//! | payload | `payload` |
//! | topic | header [`H_TOPIC`] |
//! | QoS of the PUBLISH | header [`H_QOS`] (`"0"`, `"1"`, `"2"`; absent = QoS 1 for messages from other protocols) |
//! | RETAIN | header [`H_RETAIN`] = `"1"` |
//! | publishing client id (for no-local) | header [`H_CLIENT_ID`] |
//! | v5 payload format indicator | header [`H_PAYLOAD_FORMAT`] (`"1"` = UTF-8) |
//! | v5 message expiry interval | header [`H_EXPIRES_AT`]: absolute deadline, ms since the epoch (a subscriber gets what is left, in seconds rounded up; an expired message is not delivered) |
//! | v5 content type | header `content-type` (a neutral name: a Kafka record's `content-type` header is a Content Type too) |
//! | v5 response topic | header [`H_RESPONSE_TOPIC`] |
//! | v5 correlation data | header [`H_CORRELATION_DATA`] |
//! | v5 user property `(n, v)` | header `(n, v)`; a name starting with `mqtt.` is stored as `mqtt.user.<n>` |
//! | — | `publish_time` = time of acceptance |
//!
//! A message from another protocol delivered to MQTT gets its headers that
//! do not start with `mqtt.` and whose names and values are UTF-8 without
//! U+0000 as v5 user properties (a v3 client gets the payload only),
//! except the AMQP headers that become v5 properties (below) and
//! `amqp.headers` (an encoded AMQP table; its string entries are plain
//! headers already).
//!
//! A message MQTT did not write (it has no [`H_TOPIC`]; e.g. an AMQP one)
//! gets its AMQP properties as v5 properties, before any MQTT header of
//! the same meaning it carries (the rule and its reasons:
//! [`crate::interop`]):
//!
//! | AMQP header | v5 property |
//! | --- | --- |
//! | `amqp.content-type` | Content Type |
//! | `amqp.correlation-id`, else the header `x-correlation-id` | Correlation Data (the string's bytes) |
//! | `amqp.reply-to` `r` | Response Topic: the MQTT topic of queue `r`'s topic, `a.b` -> `a/b` ([`crate::interop::response_topic_for_reply_to`]); kept as a user property if there is none |
//! | `amqp.expiration` (ms) | Message Expiry Interval: what is left of `publish_time` + expiration, in seconds rounded up; the message is not delivered once that has passed ([`is_expired`]) |

use broker::{BrokerError, HeaderName, Message, NamespaceName, TopicName};
use bytes::Bytes;

use crate::amqp;
use crate::interop::{self, as_mqtt_string};
use crate::names::NamespaceMapping;

/// Header holding the MQTT topic a message was published to.
pub const H_TOPIC: &str = "mqtt.topic";
/// Header holding the QoS the message was published with.
pub const H_QOS: &str = "mqtt.qos";
/// Header present (`"1"`) when the message was published with RETAIN.
pub const H_RETAIN: &str = "mqtt.retain";
/// Header holding the publishing MQTT client id.
pub const H_CLIENT_ID: &str = "mqtt.client-id";
/// Header holding the v5 payload format indicator.
pub const H_PAYLOAD_FORMAT: &str = "mqtt.payload-format";
/// Header holding the absolute expiry deadline (ms since the epoch).
pub const H_EXPIRES_AT: &str = "mqtt.expires-at";
/// Header holding the v5 response topic.
pub const H_RESPONSE_TOPIC: &str = "mqtt.response-topic";
/// Header holding the v5 correlation data.
pub const H_CORRELATION_DATA: &str = "mqtt.correlation-data";
/// Header holding the v5 content type (shared with other protocols).
pub const H_CONTENT_TYPE: &str = "content-type";
/// Prefix reserved for MQTT's own headers.
pub const RESERVED_PREFIX: &str = "mqtt.";
const USER_PREFIX: &str = "mqtt.user.";

/// Longest encoded name kept as is; longer ones are hashed to exactly
/// [`HASHED_LEN`] characters, so a name of that length is always a hash.
pub const MAX_PLAIN_LEN: usize = 248;
/// Length of a hashed (shortened) name: Kafka's limit.
pub const HASHED_LEN: usize = 249;
const HASH_PREFIX_LEN: usize = HASHED_LEN - 2 - 31;

const PLACEHOLDER: u8 = 0;

fn is_hex_upper(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b)
}

/// Encodes an MQTT topic name into a broker topic component that is also a
/// valid Kafka topic name. See the module docs for the rule.
pub fn encode_topic(topic: &str) -> String {
    // First pass: `_` becomes a placeholder; whether it needs doubling
    // depends on what follows in the *encoded* output.
    let mut out: Vec<u8> = Vec::with_capacity(topic.len() + 8);
    for &b in topic.as_bytes() {
        match b {
            b'/' => out.push(b'.'),
            b'_' => out.push(PLACEHOLDER),
            b if b.is_ascii_alphanumeric() || b == b'-' => out.push(b),
            b => {
                out.push(b'_');
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
        }
    }
    let mut s = String::with_capacity(out.len() + 4);
    for i in 0..out.len() {
        let b = out[i];
        if b == PLACEHOLDER {
            let next = out.get(i + 1).copied();
            let escape = match next {
                Some(b'_') | Some(PLACEHOLDER) => true,
                Some(n) if is_hex_upper(n) => out.get(i + 2).is_some_and(|&m| is_hex_upper(m)),
                _ => false,
            };
            s.push_str(if escape { "__" } else { "_" });
        } else {
            s.push(b as char);
        }
    }
    if s == "." || s == ".." {
        return "_2F".repeat(s.len());
    }
    if s.len() > MAX_PLAIN_LEN {
        let h = fnv128(topic.as_bytes());
        let mut cut = HASH_PREFIX_LEN;
        // Do not end the prefix inside an escape (cosmetic only).
        while cut > 0 && s.as_bytes()[cut - 1] == b'_' {
            cut -= 1;
        }
        let mut t = String::with_capacity(HASHED_LEN);
        t.push_str(&s[..cut]);
        while t.len() < HASH_PREFIX_LEN {
            t.push('-');
        }
        t.push_str("-h");
        t.push_str(&format!("{h:032x}")[1..]);
        debug_assert_eq!(t.len(), HASHED_LEN);
        return t;
    }
    s
}

const HEX: [u8; 16] = *b"0123456789ABCDEF";

fn fnv128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for &b in data {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// The MQTT topic of a broker topic component, if it is the plain (not
/// hashed) encoding of one. `None` for hashed names (read [`H_TOPIC`]
/// instead) and for names that decode to invalid UTF-8.
pub fn decode_topic(name: &str) -> Option<String> {
    if name.len() >= HASHED_LEN || name.is_empty() {
        return None;
    }
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'.' => {
                out.push(b'/');
                i += 1;
            }
            b'_' => {
                if b.get(i + 1) == Some(&b'_') {
                    out.push(b'_');
                    i += 2;
                } else if i + 2 < b.len() && is_hex_upper(b[i + 1]) && is_hex_upper(b[i + 2]) {
                    let hi = hex_val(b[i + 1]);
                    let lo = hex_val(b[i + 2]);
                    out.push(hi << 4 | lo);
                    i += 3;
                } else {
                    out.push(b'_');
                    i += 1;
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    let s = String::from_utf8(out).ok()?;
    if s.contains('\0') || s.is_empty() {
        return None;
    }
    Some(s)
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'A' + 10,
    }
}

/// Where MQTT topics land: the broker topic of an MQTT topic, in the
/// configured namespace.
///
/// # Errors
/// [`BrokerError::InvalidName`] only if the encoding produced an invalid
/// component (it does not for valid MQTT topic names).
pub fn broker_topic(ns: &NamespaceMapping, mqtt_topic: &str) -> Result<TopicName, BrokerError> {
    TopicName::new(ns.namespace.clone(), &encode_topic(mqtt_topic))
}

/// The namespace mapping for MQTT from configured tenant and namespace.
///
/// # Errors
/// [`BrokerError::InvalidName`] for invalid components.
pub fn namespace(tenant: &str, namespace: &str) -> Result<NamespaceMapping, BrokerError> {
    Ok(NamespaceMapping {
        namespace: NamespaceName::new(tenant, namespace)?,
    })
}

/// The durable cursor of persistent session `client_id` on a partition.
pub fn session_cursor_name(client_id: &str) -> String {
    format!("mqtt.{client_id}")
}

/// The durable cursor of shared subscription `$share/<group>/<filter>` on
/// a partition (the group's position, shared by its members).
pub fn shared_cursor_name(group: &str, filter: &str) -> String {
    format!("mqtt-share.{group}/{filter}")
}

// ---- topic names and filters ----

/// Why a topic name or filter is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topic or filter.
    #[error("empty")]
    Empty,
    /// A wildcard in a topic name (PUBLISH).
    #[error("wildcard in a topic name")]
    Wildcard,
    /// `#` not last or not a whole level, `+` not a whole level.
    #[error("misplaced wildcard")]
    BadWildcard,
    /// U+0000 in a topic.
    #[error("contains U+0000")]
    Nul,
    /// A `$share/group/filter` with an invalid group or filter.
    #[error("invalid shared subscription")]
    BadShare,
}

/// Checks a PUBLISH topic name: non-empty, no wildcards, no U+0000.
///
/// # Errors
/// The reason it is invalid.
pub fn validate_topic_name(t: &str) -> Result<(), TopicError> {
    if t.is_empty() {
        return Err(TopicError::Empty);
    }
    if t.contains('\0') {
        return Err(TopicError::Nul);
    }
    if t.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// Checks a topic filter: `#` only as the last whole level, `+` only as a
/// whole level.
///
/// # Errors
/// The reason it is invalid.
pub fn validate_topic_filter(f: &str) -> Result<(), TopicError> {
    if f.is_empty() {
        return Err(TopicError::Empty);
    }
    if f.contains('\0') {
        return Err(TopicError::Nul);
    }
    let levels: Vec<&str> = f.split('/').collect();
    let n = levels.len();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != n) {
            return Err(TopicError::BadWildcard);
        }
        if l.contains('+') && *l != "+" {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// Splits `$share/<group>/<filter>` into `(group, filter)`; `Ok(None)` for
/// a filter that is not shared.
///
/// # Errors
/// [`TopicError::BadShare`] for an empty group, a group with wildcards, or
/// a missing filter.
pub fn parse_shared(f: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let Some(rest) = f.strip_prefix("$share/") else {
        if f == "$share" {
            return Err(TopicError::BadShare);
        }
        return Ok(None);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err(TopicError::BadShare);
    };
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return Err(TopicError::BadShare);
    }
    validate_topic_filter(filter).map_err(|_| TopicError::BadShare)?;
    Ok(Some((group, filter)))
}

/// Whether the topic name `topic` matches the filter `filter` (both
/// assumed valid). Topics starting with `$` are not matched by a filter
/// whose first level is a wildcard.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some(fl), Some(tl)) => {
                if fl != "+" && fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a filter contains wildcards (so it may match many topics).
pub fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

// ---- messages ----

/// The MQTT view of a publish, protocol-independent of the codec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttPublish {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0..=2.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Publishing client id.
    pub client_id: Option<String>,
    /// v5 payload format indicator.
    pub payload_format: Option<u8>,
    /// v5 message expiry interval, seconds.
    pub message_expiry: Option<u32>,
    /// v5 content type.
    pub content_type: Option<String>,
    /// v5 response topic.
    pub response_topic: Option<String>,
    /// v5 correlation data.
    pub correlation_data: Option<Bytes>,
    /// v5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// Builds the stored message of an MQTT publish accepted at `now_ms`.
pub fn publish_to_message(p: &MqttPublish, now_ms: i64) -> Message {
    let mut headers: Vec<(HeaderName, Bytes)> = Vec::with_capacity(4 + p.user_properties.len());
    headers.push((H_TOPIC.into(), Bytes::copy_from_slice(p.topic.as_bytes())));
    headers.push((H_QOS.into(), Bytes::from_static(qos_str(p.qos))));
    if p.retain {
        headers.push((H_RETAIN.into(), Bytes::from_static(b"1")));
    }
    if let Some(c) = &p.client_id {
        headers.push((H_CLIENT_ID.into(), Bytes::copy_from_slice(c.as_bytes())));
    }
    if let Some(f) = p.payload_format {
        headers.push((H_PAYLOAD_FORMAT.into(), Bytes::from(f.to_string())));
    }
    if let Some(e) = p.message_expiry {
        let at = now_ms.saturating_add(i64::from(e) * 1000);
        headers.push((H_EXPIRES_AT.into(), Bytes::from(at.to_string())));
    }
    if let Some(c) = &p.content_type {
        headers.push((H_CONTENT_TYPE.into(), Bytes::copy_from_slice(c.as_bytes())));
    }
    if let Some(r) = &p.response_topic {
        headers.push((
            H_RESPONSE_TOPIC.into(),
            Bytes::copy_from_slice(r.as_bytes()),
        ));
    }
    if let Some(c) = &p.correlation_data {
        headers.push((H_CORRELATION_DATA.into(), c.clone()));
    }
    for (n, v) in &p.user_properties {
        let name = if n.starts_with(RESERVED_PREFIX) {
            format!("{USER_PREFIX}{n}")
        } else {
            n.clone()
        };
        headers.push((name.into(), Bytes::copy_from_slice(v.as_bytes())));
    }
    Message {
        payload: p.payload.clone(),
        headers,
        publish_time: now_ms,
        ..Message::default()
    }
}

fn qos_str(q: u8) -> &'static [u8] {
    match q {
        0 => b"0",
        1 => b"1",
        _ => b"2",
    }
}

fn header_str<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.header(name).and_then(|v| std::str::from_utf8(v).ok())
}

/// The MQTT topic stored with a message, if any.
pub fn message_topic(m: &Message) -> Option<&str> {
    header_str(m, H_TOPIC)
}

/// Whether the MQTT handler wrote the message (it always stores [`H_TOPIC`]).
fn written_by_mqtt(m: &Message) -> bool {
    m.header(H_TOPIC).is_some()
}

/// The v5 properties of a message another protocol wrote, read from its
/// AMQP headers (see [`crate::interop`]), and the headers they came from.
#[derive(Default)]
struct FromAmqp {
    content_type: Option<String>,
    correlation_data: Option<Bytes>,
    response_topic: Option<String>,
    used: Vec<&'static str>,
}

fn from_amqp(m: &Message) -> FromAmqp {
    let mut f = FromAmqp::default();
    if let Some(ct) = m
        .header(amqp::H_CONTENT_TYPE)
        .and_then(|v| as_mqtt_string(v))
    {
        f.content_type = Some(ct.to_owned());
        f.used.push(amqp::H_CONTENT_TYPE);
    }
    for name in [amqp::H_CORRELATION_ID, interop::H_X_CORRELATION_ID] {
        if let Some(c) = m.header(name) {
            f.correlation_data = Some(c.clone());
            f.used.push(name);
            break;
        }
    }
    if let Some(rt) = header_str(m, amqp::H_REPLY_TO).and_then(interop::response_topic_for_reply_to)
    {
        f.response_topic = Some(rt);
        f.used.push(amqp::H_REPLY_TO);
    }
    if amqp_deadline(m).is_some() {
        f.used.push(amqp::H_EXPIRATION);
    }
    f
}

/// The deadline of an AMQP expiration: it counts from when the message
/// was enqueued, its `publish_time`.
fn amqp_deadline(m: &Message) -> Option<i64> {
    let ms = header_str(m, amqp::H_EXPIRATION)?.parse::<u64>().ok()?;
    Some(
        m.publish_time
            .saturating_add(ms.min(i64::MAX as u64) as i64),
    )
}

/// When a stored message expires (ms since the epoch): its v5 deadline
/// [`H_EXPIRES_AT`]; for a message another protocol wrote, its AMQP
/// expiration counted from `publish_time` first. `None`: it does not
/// expire.
pub fn expires_at(m: &Message) -> Option<i64> {
    deadline(m, written_by_mqtt(m), header_str(m, H_EXPIRES_AT))
}

/// [`expires_at`] from the message's own [`H_EXPIRES_AT`] value (`own`:
/// the MQTT handler wrote it).
fn deadline(m: &Message, own: bool, expires_at: Option<&str>) -> Option<i64> {
    let mqtt = expires_at.and_then(|s| s.parse::<i64>().ok());
    if own {
        mqtt
    } else {
        amqp_deadline(m).or(mqtt)
    }
}

/// Whether the message was published over MQTT at QoS 2 (exactly once):
/// such a message is forwarded only once it is durable, so that a crash
/// cannot make its publisher's resend a second delivery.
pub fn published_exactly_once(m: &Message) -> bool {
    written_by_mqtt(m) && header_str(m, H_QOS) == Some("2")
}

/// The MQTT view of a stored message. `fallback_topic` is used when the
/// message carries no [`H_TOPIC`] header (it came from another protocol).
/// `message_expiry` is the remaining interval at `now_ms`, rounded up;
/// whether the message has expired is [`is_expired`].
pub fn message_to_publish(m: &Message, fallback_topic: &str, now_ms: i64) -> MqttPublish {
    to_publish(m, fallback_topic, now_ms).0
}

/// [`message_to_publish`] for delivery: `None` if the message has expired
/// at `now_ms` ([`is_expired`]). One pass over the headers does both.
pub fn deliverable(m: &Message, fallback_topic: &str, now_ms: i64) -> Option<MqttPublish> {
    let (p, at) = to_publish(m, fallback_topic, now_ms);
    at.is_none_or(|at| at > now_ms).then_some(p)
}

/// The publish and its expiry ([`expires_at`]), reading the MQTT headers
/// in the same pass as the rest (the first of each name counts, as with
/// [`Message::header`]).
fn to_publish(m: &Message, fallback_topic: &str, now_ms: i64) -> (MqttPublish, Option<i64>) {
    fn utf8(v: &Bytes) -> Option<&str> {
        std::str::from_utf8(v).ok()
    }
    let own = written_by_mqtt(m);
    let foreign = if own {
        FromAmqp::default()
    } else {
        from_amqp(m)
    };
    let mut p = MqttPublish {
        payload: m.payload.clone(),
        ..MqttPublish::default()
    };
    let (mut topic, mut qos, mut retain, mut client_id, mut own_expiry) =
        (None, None, None, None, None);
    for (n, v) in &m.headers {
        match n.as_str() {
            H_TOPIC => topic = topic.or(Some(utf8(v))),
            H_QOS => qos = qos.or(Some(utf8(v))),
            H_RETAIN => retain = retain.or(Some(utf8(v))),
            H_CLIENT_ID => client_id = client_id.or(Some(utf8(v))),
            H_EXPIRES_AT => own_expiry = own_expiry.or(Some(utf8(v))),
            H_PAYLOAD_FORMAT => p.payload_format = utf8(v).and_then(|s| s.parse().ok()),
            H_CONTENT_TYPE => p.content_type = as_mqtt_string(v).map(str::to_owned),
            H_RESPONSE_TOPIC => p.response_topic = as_mqtt_string(v).map(str::to_owned),
            H_CORRELATION_DATA => p.correlation_data = Some(v.clone()),
            n if n.starts_with(USER_PREFIX) => {
                if let Some(v) = as_mqtt_string(v) {
                    p.user_properties
                        .push((n[USER_PREFIX.len()..].to_owned(), v.to_owned()));
                }
            }
            n if n.starts_with(RESERVED_PREFIX) => {}
            amqp::H_HEADERS => {}
            n if foreign.used.contains(&n) => {}
            n => {
                if let (Some(n), Some(v)) = (as_mqtt_string(n.as_bytes()), as_mqtt_string(v)) {
                    p.user_properties.push((n.to_owned(), v.to_owned()));
                }
            }
        }
    }
    if !own {
        p.content_type = foreign.content_type.or(p.content_type);
        p.correlation_data = foreign.correlation_data.or(p.correlation_data);
        p.response_topic = foreign.response_topic.or(p.response_topic);
    }
    p.topic = topic.flatten().unwrap_or(fallback_topic).to_owned();
    p.qos = match qos.flatten() {
        Some("0") => 0,
        Some("2") => 2,
        _ => 1,
    };
    p.retain = retain.flatten() == Some("1");
    p.client_id = client_id.flatten().map(str::to_owned);
    let at = deadline(m, own, own_expiry.flatten());
    p.message_expiry = at.map(|at| {
        let left = at.saturating_sub(now_ms).max(0);
        (left.saturating_add(999) / 1000).min(i64::from(u32::MAX)) as u32
    });
    (p, at)
}

/// Whether a stored message's expiry ([`expires_at`]) has passed at
/// `now_ms`.
pub fn is_expired(m: &Message, now_ms: i64) -> bool {
    expires_at(m).is_some_and(|at| at <= now_ms)
}

// ---- reason codes ----

/// MQTT 5 reason codes (a subset of them is also what v3 return codes are
/// derived from; see [`ReasonCode::connack_v3`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReasonCode {
    Success = 0x00,
    GrantedQos1 = 0x01,
    GrantedQos2 = 0x02,
    DisconnectWithWill = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierInUse = 0x91,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    QuotaExceeded = 0x97,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QosNotSupported = 0x9B,
    ServerShuttingDown = 0x8B,
    SharedSubscriptionsNotSupported = 0x9E,
    SubscriptionIdentifiersNotSupported = 0xA1,
    WildcardSubscriptionsNotSupported = 0xA2,
}

impl ReasonCode {
    /// The wire value.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The MQTT 3.1/3.1.1 CONNACK return code for a v5 CONNACK reason.
    pub fn connack_v3(self) -> u8 {
        match self {
            ReasonCode::Success => 0,
            ReasonCode::UnsupportedProtocolVersion => 1,
            ReasonCode::ClientIdentifierNotValid => 2,
            ReasonCode::ServerUnavailable
            | ReasonCode::ServerBusy
            | ReasonCode::ServerShuttingDown => 3,
            ReasonCode::BadUserNameOrPassword => 4,
            ReasonCode::NotAuthorized => 5,
            _ => 3,
        }
    }

    /// Whether this code reports a failure (0x80 and above).
    pub fn is_error(self) -> bool {
        self.code() >= 0x80
    }
}

/// The reason code for a broker failure on the publish path.
pub fn publish_error_reason(e: &BrokerError) -> ReasonCode {
    match e {
        BrokerError::EntryTooLarge { .. } => ReasonCode::PacketTooLarge,
        BrokerError::TopicNotFound(_) | BrokerError::NamespaceNotFound(_) => {
            ReasonCode::NotAuthorized
        }
        BrokerError::InvalidName { .. } => ReasonCode::TopicNameInvalid,
        BrokerError::Closed => ReasonCode::ServerUnavailable,
        _ => ReasonCode::ImplementationSpecificError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kafka_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 249
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    }

    #[test]
    fn examples() {
        assert_eq!(encode_topic("sensors/room-1/temp"), "sensors.room-1.temp");
        assert_eq!(encode_topic("$SYS/uptime"), "_24SYS.uptime");
        assert_eq!(encode_topic("my_topic"), "my_topic");
        assert_eq!(encode_topic("a.b"), "a_2Eb");
        assert_eq!(encode_topic("a_2E"), "a__2E");
        assert_eq!(encode_topic("_."), "___2E");
        assert_eq!(encode_topic("/"), "_2F");
        assert_eq!(encode_topic("//"), "_2F_2F");
        assert_eq!(encode_topic("///"), "...");
        assert_eq!(decode_topic("orders.eu").as_deref(), Some("orders/eu"));
        assert_eq!(decode_topic("my_topic").as_deref(), Some("my_topic"));
        assert_eq!(decode_topic("a_FF"), None);
        assert_eq!(decode_topic("_2F").as_deref(), Some("/"));
        assert_eq!(encode_topic("é"), "_C3_A9");
    }

    #[test]
    fn long_names_are_hashed_to_kafka_limit() {
        let t = "x/".repeat(200);
        let e = encode_topic(&t);
        assert_eq!(e.len(), HASHED_LEN);
        assert!(kafka_valid(&e));
        assert_eq!(decode_topic(&e), None);
        assert_ne!(
            encode_topic(&format!("{t}a")),
            encode_topic(&format!("{t}b"))
        );
        let t2 = "é".repeat(100);
        assert!(kafka_valid(&encode_topic(&t2)));
    }

    #[test]
    fn filters() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("#", "a/b"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("+/x", "$SYS/x"));
        assert!(topic_matches("$SYS/#", "$SYS/x"));
        assert!(topic_matches("+", ""));
        assert!(topic_matches("/+", "/x"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("a/b", "a"));
        assert!(topic_matches("+/+", "/"));
        assert!(validate_topic_filter("a/#/b").is_err());
        assert!(validate_topic_filter("a#").is_err());
        assert!(validate_topic_filter("a/b+").is_err());
        assert!(validate_topic_filter("+/#").is_ok());
        assert_eq!(parse_shared("$share/g/a/+").unwrap(), Some(("g", "a/+")));
        assert!(parse_shared("$share/g").is_err());
        assert!(parse_shared("$share//a").is_err());
        assert_eq!(parse_shared("a/b").unwrap(), None);
        assert!(validate_topic_name("a/+").is_err());
    }

    #[test]
    fn message_round_trip() {
        let p = MqttPublish {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hi"),
            qos: 2,
            retain: true,
            client_id: Some("c1".into()),
            payload_format: Some(1),
            message_expiry: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("r".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("mqtt.x".into(), "y".into())],
        };
        let m = publish_to_message(&p, 1000);
        assert!(published_exactly_once(&m));
        let back = message_to_publish(&m, "ignored", 1000);
        assert_eq!(back, p);
        let once = publish_to_message(
            &MqttPublish {
                qos: 1,
                ..p.clone()
            },
            1000,
        );
        assert!(!published_exactly_once(&once));
        assert!(!is_expired(&m, 60_999));
        assert!(is_expired(&m, 61_000));
        // A foreign message: headers become user properties, default QoS 1.
        let mut f = Message::new(&b"x"[..]);
        f.headers.push(("trace".into(), Bytes::from_static(b"1")));
        f.headers.push(("bin".into(), Bytes::from_static(b"\xff")));
        let q = message_to_publish(&f, "orders/eu", 0);
        assert!(!published_exactly_once(&f));
        // Only MQTT's own QoS 2 waits for durability, not a look-alike header.
        f.headers.push((H_QOS.into(), Bytes::from_static(b"2")));
        assert!(!published_exactly_once(&f));
        assert_eq!(q.topic, "orders/eu");
        assert_eq!(q.qos, 1);
        assert_eq!(
            q.user_properties,
            vec![("trace".to_owned(), "1".to_owned())]
        );
    }

    proptest! {
        #[test]
        fn encode_is_kafka_valid_and_reversible(t in "[a-zA-Z0-9_./$ é+-]{1,120}") {
            let e = encode_topic(&t);
            prop_assert!(kafka_valid(&e), "{:?} -> {:?}", t, e);
            prop_assert!(broker::topic::validate_component(&e).is_ok());
            if e.len() < HASHED_LEN {
                prop_assert_eq!(decode_topic(&e), Some(t));
            }
        }

        #[test]
        fn encode_is_injective(a in "[_A-F0-9./]{1,12}", b in "[_A-F0-9./]{1,12}") {
            if a != b {
                prop_assert_ne!(encode_topic(&a), encode_topic(&b));
            }
        }

        #[test]
        fn matching_agrees_with_levels(t in "[ab/]{0,8}") {
            prop_assert!(topic_matches("#", &t));
            prop_assert!(topic_matches(&t, &t) || t.is_empty());
        }
    }
}

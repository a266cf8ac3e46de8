//! The one message model every protocol maps to and from, and its compact
//! binary batch encoding (the payload of an entry of format
//! [`EntryFormat::Messages`]).
//!
//! Encoding of a batch (all integers are LEB128 varints, signed ones
//! zig-zag encoded):
//!
//! ```text
//! batch   := version:u8(=1) count:varint message*
//! message := flags:u8 publish_time:zz
//!            [event_time:zz]            if flags & EVENT_TIME
//!            [key:bytes]                if flags & KEY
//!            payload:bytes
//!            header_count:varint (name:str value:bytes)*
//!            [producer_id:varint seq:zz] if flags & PRODUCER
//!            [ordering_key:bytes]       if flags & ORDERING_KEY
//!            [replicated_from:str]      if flags & REPLICATED
//! bytes   := len:varint byte*len
//! ```
//!
//! Decoding never allocates more than the input holds: every length is
//! checked against the bytes that remain, and payloads, keys, header names
//! and values are zero-copy slices of the input buffer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{BrokerError, Result};

/// How the payload of a ledger entry is encoded. The broker stores entries
/// opaquely; `mapping` converts between formats when a consumer of one
/// protocol reads an entry written by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryFormat {
    /// A batch of [`Message`]s in this module's encoding.
    Messages = 1,
    /// A Kafka record batch (magic v2), stored exactly as the producer sent it.
    KafkaRecordBatch = 2,
}

impl EntryFormat {
    /// The format for a stored tag byte, if known.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(EntryFormat::Messages),
            2 => Some(EntryFormat::KafkaRecordBatch),
            _ => None,
        }
    }
}

/// Identity of the producer of a message, for de-duplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProducerInfo {
    /// Producer id (Kafka producer id, Pulsar producer name hash, ...).
    pub id: u64,
    /// Sequence number of the message within the producer's stream.
    pub sequence: i64,
}

/// The name of a header: UTF-8 text kept as [`Bytes`], so that names
/// decoded from a stored batch are slices of it and names a protocol
/// mapping sets are static strings. Reading a message's headers allocates
/// nothing per name (an MQTT delivery decodes three or more per message and
/// subscriber).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderName(Bytes);

impl HeaderName {
    /// A name that is a static string (no allocation).
    pub const fn from_static(name: &'static str) -> HeaderName {
        HeaderName(Bytes::from_static(name.as_bytes()))
    }

    /// The name, if `bytes` is UTF-8 (a slice of `bytes`, no copy).
    pub fn from_utf8(bytes: Bytes) -> Option<HeaderName> {
        std::str::from_utf8(&bytes).ok()?;
        Some(HeaderName(bytes))
    }

    /// The name as text.
    #[allow(unsafe_code)]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor takes a `&str` or `String`, or checks
        // the bytes with `str::from_utf8` first, and the bytes never change.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl std::ops::Deref for HeaderName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for HeaderName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::hash::Hash for HeaderName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for HeaderName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for HeaderName {
    fn from(name: &'static str) -> HeaderName {
        HeaderName::from_static(name)
    }
}

impl From<String> for HeaderName {
    fn from(name: String) -> HeaderName {
        HeaderName(Bytes::from(name))
    }
}

impl PartialEq<str> for HeaderName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for HeaderName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<HeaderName> for str {
    fn eq(&self, other: &HeaderName) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<HeaderName> for &str {
    fn eq(&self, other: &HeaderName) -> bool {
        *self == other.as_str()
    }
}

impl std::fmt::Debug for HeaderName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for HeaderName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message, independent of the protocol it arrived with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// Partitioning / routing key (Kafka key, AMQP routing key, ...).
    pub key: Option<Bytes>,
    /// The message body.
    pub payload: Bytes,
    /// Headers / properties / user properties, in order; names may repeat.
    pub headers: Vec<(HeaderName, Bytes)>,
    /// Time the producer says the event happened (ms since the Unix epoch).
    pub event_time: Option<i64>,
    /// Time the broker accepted the message (ms since the Unix epoch).
    pub publish_time: i64,
    /// Producer identity and sequence, for de-duplication.
    pub producer: Option<ProducerInfo>,
    /// Key that orders messages within a shared subscription.
    pub ordering_key: Option<Bytes>,
    /// Cluster this message was replicated from; `None` if produced locally.
    pub replicated_from: Option<String>,
}

impl Message {
    /// A message with just a payload, published now.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            publish_time: now_ms(),
            ..Message::default()
        }
    }

    /// The first header with the given name.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }

    fn encoded_len_hint(&self) -> usize {
        16 + self.payload.len()
            + self.key.as_ref().map_or(0, |k| k.len() + 5)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 10)
                .sum::<usize>()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const BATCH_VERSION: u8 = 1;
const F_KEY: u8 = 1;
const F_EVENT_TIME: u8 = 2;
const F_PRODUCER: u8 = 4;
const F_ORDERING_KEY: u8 = 8;
const F_REPLICATED: u8 = 16;
const F_KNOWN: u8 = F_KEY | F_EVENT_TIME | F_PRODUCER | F_ORDERING_KEY | F_REPLICATED;

/// Encodes messages as one batch (the payload of a `Messages` entry).
pub fn encode_batch(messages: &[Message]) -> Bytes {
    let mut buf = BytesMut::with_capacity(
        8 + messages
            .iter()
            .map(Message::encoded_len_hint)
            .sum::<usize>(),
    );
    buf.put_u8(BATCH_VERSION);
    put_varint(&mut buf, messages.len() as u64);
    for m in messages {
        let mut flags = 0;
        if m.key.is_some() {
            flags |= F_KEY;
        }
        if m.event_time.is_some() {
            flags |= F_EVENT_TIME;
        }
        if m.producer.is_some() {
            flags |= F_PRODUCER;
        }
        if m.ordering_key.is_some() {
            flags |= F_ORDERING_KEY;
        }
        if m.replicated_from.is_some() {
            flags |= F_REPLICATED;
        }
        buf.put_u8(flags);
        put_zigzag(&mut buf, m.publish_time);
        if let Some(t) = m.event_time {
            put_zigzag(&mut buf, t);
        }
        if let Some(k) = &m.key {
            put_bytes(&mut buf, k);
        }
        put_bytes(&mut buf, &m.payload);
        put_varint(&mut buf, m.headers.len() as u64);
        for (n, v) in &m.headers {
            put_bytes(&mut buf, n.as_bytes());
            put_bytes(&mut buf, v);
        }
        if let Some(p) = &m.producer {
            put_varint(&mut buf, p.id);
            put_zigzag(&mut buf, p.sequence);
        }
        if let Some(k) = &m.ordering_key {
            put_bytes(&mut buf, k);
        }
        if let Some(r) = &m.replicated_from {
            put_bytes(&mut buf, r.as_bytes());
        }
    }
    buf.freeze()
}

/// Decodes a batch produced by [`encode_batch`]. Payloads, keys, header
/// names and values are zero-copy slices of `data`.
///
/// # Errors
/// [`BrokerError::Malformed`] if the input is truncated, has trailing bytes,
/// an unknown version or flag, or a header name that is not UTF-8.
pub fn decode_batch(data: &Bytes) -> Result<Vec<Message>> {
    let mut r = Reader { data, pos: 0 };
    if r.u8()? != BATCH_VERSION {
        return Err(BrokerError::Malformed("unknown batch version"));
    }
    let count = r.varint()?;
    // Every message takes at least 4 bytes; a larger count is a lie.
    if count > (data.len() as u64) / 4 + 1 {
        return Err(BrokerError::Malformed("message count exceeds batch size"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let flags = r.u8()?;
        if flags & !F_KNOWN != 0 {
            return Err(BrokerError::Malformed("unknown message flags"));
        }
        let publish_time = r.zigzag()?;
        let event_time = if flags & F_EVENT_TIME != 0 {
            Some(r.zigzag()?)
        } else {
            None
        };
        let key = if flags & F_KEY != 0 {
            Some(r.bytes()?)
        } else {
            None
        };
        let payload = r.bytes()?;
        let header_count = r.varint()?;
        if header_count > (data.len() - r.pos) as u64 / 2 {
            return Err(BrokerError::Malformed("header count exceeds batch size"));
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        for _ in 0..header_count {
            let name = HeaderName::from_utf8(r.bytes()?)
                .ok_or(BrokerError::Malformed("header name is not UTF-8"))?;
            let value = r.bytes()?;
            headers.push((name, value));
        }
        let producer = if flags & F_PRODUCER != 0 {
            let id = r.varint()?;
            let sequence = r.zigzag()?;
            Some(ProducerInfo { id, sequence })
        } else {
            None
        };
        let ordering_key = if flags & F_ORDERING_KEY != 0 {
            Some(r.bytes()?)
        } else {
            None
        };
        let replicated_from = if flags & F_REPLICATED != 0 {
            Some(r.string()?)
        } else {
            None
        };
        out.push(Message {
            key,
            payload,
            headers,
            event_time,
            publish_time,
            producer,
            ordering_key,
            replicated_from,
        });
    }
    if r.pos != data.len() {
        return Err(BrokerError::Malformed("trailing bytes after batch"));
    }
    Ok(out)
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_zigzag(buf: &mut BytesMut, v: i64) {
    put_varint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    put_varint(buf, b.len() as u64);
    buf.put_slice(b);
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or(BrokerError::Malformed("truncated batch"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(BrokerError::Malformed("varint longer than 10 bytes"))
    }

    fn zigzag(&mut self) -> Result<i64> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn bytes(&mut self) -> Result<Bytes> {
        let len = self.varint()?;
        let remaining = (self.data.len() - self.pos) as u64;
        if len > remaining {
            return Err(BrokerError::Malformed("length exceeds batch size"));
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(self.data.slice(start..self.pos))
    }

    fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| BrokerError::Malformed("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            proptest::option::of(arb_bytes()),
            arb_bytes(),
            proptest::collection::vec(("[a-zA-Z0-9_-]{0,12}", arb_bytes()), 0..4),
            proptest::option::of(any::<i64>()),
            any::<i64>(),
            proptest::option::of((any::<u64>(), any::<i64>())),
            proptest::option::of(arb_bytes()),
            proptest::option::of("[a-z]{1,8}"),
        )
            .prop_map(
                |(key, payload, headers, event_time, publish_time, p, ok, rf)| Message {
                    key,
                    payload,
                    headers: headers
                        .into_iter()
                        .map(|(n, v): (String, Bytes)| (n.into(), v))
                        .collect(),
                    event_time,
                    publish_time,
                    producer: p.map(|(id, sequence)| ProducerInfo { id, sequence }),
                    ordering_key: ok,
                    replicated_from: rf,
                },
            )
    }

    #[test]
    fn header_names_are_text_and_look_up_as_str() {
        let m = Message {
            headers: vec![
                (HeaderName::from_static("a"), Bytes::from_static(b"1")),
                ("b".to_string().into(), Bytes::from_static(b"2")),
            ],
            ..Message::default()
        };
        let enc = encode_batch(std::slice::from_ref(&m));
        let dec = decode_batch(&enc).unwrap();
        assert_eq!(dec[0], m);
        assert_eq!(dec[0].header("b").map(|v| &v[..]), Some(&b"2"[..]));
        assert!(dec[0].headers[0].0 == "a");
        assert!("a" == dec[0].headers[0].0);
        // `Borrow<str>`: hashed and compared as the text.
        let set: std::collections::HashSet<HeaderName> =
            dec[0].headers.iter().map(|(n, _)| n.clone()).collect();
        assert!(set.contains("a") && set.contains("b") && !set.contains("c"));
        assert_eq!(
            format!("{}/{:?}", dec[0].headers[1].0, dec[0].headers[1].0),
            "b/\"b\""
        );
    }

    #[test]
    fn a_header_name_that_is_not_utf8_is_refused() {
        let m = Message {
            headers: vec![(HeaderName::from_static("zz"), Bytes::new())],
            ..Message::default()
        };
        let enc = encode_batch(&[m]).to_vec();
        let at = enc.windows(2).position(|w| w == b"zz").unwrap();
        let mut bad = enc.clone();
        bad[at] = 0xff;
        assert!(matches!(
            decode_batch(&Bytes::from(bad)),
            Err(BrokerError::Malformed(_))
        ));
        assert!(HeaderName::from_utf8(Bytes::from_static(b"\xff")).is_none());
    }

    proptest! {
        #[test]
        fn batch_round_trips(msgs in proptest::collection::vec(arb_message(), 0..8)) {
            let enc = encode_batch(&msgs);
            let dec = decode_batch(&enc).unwrap();
            prop_assert_eq!(dec, msgs);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_batch(&Bytes::from(data));
        }

        #[test]
        fn truncation_is_an_error(msgs in proptest::collection::vec(arb_message(), 1..4), cut in 1usize..32) {
            let enc = encode_batch(&msgs);
            let cut = cut.min(enc.len());
            let short = enc.slice(..enc.len() - cut);
            prop_assert!(decode_batch(&short).is_err());
        }
    }
}

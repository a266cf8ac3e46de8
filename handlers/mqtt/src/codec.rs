//! A sans-IO MQTT 3.1 / 3.1.1 / 5 packet codec, both directions.
//!
//! Written for a server rather than taken from `mqttbytes`
//! (frozen since 2021) or `rumqttc::mqttbytes` (client-oriented: no v5
//! DISCONNECT/AUTH with remaining length 0, passwords must be UTF-8, one
//! crate per protocol version). [`decode`] takes bytes and returns a packet,
//! `Ok(None)` when the frame is incomplete, or an error that maps to the
//! version's reason code. Every length is checked against the configured
//! maximum packet size before anything is allocated, and payloads are
//! zero-copy slices of the input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol level negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5 (level 5).
    V5,
}

impl Version {
    /// The protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            Version::V31 => 3,
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet does not follow the grammar (reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but not allowed (reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The remaining length exceeds the maximum packet size (reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// CONNECT with a protocol name that is not MQTT's.
    #[error("unknown protocol name")]
    BadProtocolName,
    /// CONNECT with an unsupported protocol level.
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
}

/// MQTT 5 properties. Only what a packet carries is `Some`/non-empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_ids: Vec<u32>,
    pub session_expiry: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
    pub request_problem_info: Option<u8>,
    pub will_delay: Option<u32>,
    pub request_response_info: Option<u8>,
    pub response_info: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_sub_available: Option<u8>,
    pub sub_id_available: Option<u8>,
    pub shared_sub_available: Option<u8>,
}

/// Last will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    /// Binary data: v5 and 3.1.1 allow any bytes.
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    pub properties: Properties,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// v5 reason code, or the v3 return code.
    pub code: u8,
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// May be empty in v5 when a topic alias is used.
    pub topic: String,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub pkid: u16,
    pub reason: u8,
    pub properties: Properties,
}

impl Ack {
    /// A successful acknowledgement.
    pub fn ok(pkid: u16) -> Ack {
        Ack {
            pkid,
            reason: 0,
            properties: Properties::default(),
        }
    }
}

/// Options of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub properties: Properties,
    pub filters: Vec<(String, SubOptions)>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    pub properties: Properties,
    pub codes: Vec<u8>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub properties: Properties,
    pub filters: Vec<String>,
}

/// UNSUBACK (codes only in v5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub pkid: u16,
    pub properties: Properties,
    pub codes: Vec<u8>,
}

/// DISCONNECT (v5 reason and properties) or AUTH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: u8,
    pub properties: Properties,
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Disconnect),
}

// ---- primitives ----

type R<T> = Result<T, DecodeError>;

fn need(buf: &Bytes, n: usize) -> R<()> {
    if buf.remaining() < n {
        Err(DecodeError::Malformed("truncated"))
    } else {
        Ok(())
    }
}

fn get_u8(buf: &mut Bytes) -> R<u8> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut Bytes) -> R<u16> {
    need(buf, 2)?;
    Ok(buf.get_u16())
}

fn get_u32(buf: &mut Bytes) -> R<u32> {
    need(buf, 4)?;
    Ok(buf.get_u32())
}

fn get_binary(buf: &mut Bytes) -> R<Bytes> {
    let n = usize::from(get_u16(buf)?);
    need(buf, n)?;
    Ok(buf.split_to(n))
}

fn get_string(buf: &mut Bytes) -> R<String> {
    let b = get_binary(buf)?;
    let s = std::str::from_utf8(&b).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("U+0000 in a string"));
    }
    Ok(s.to_owned())
}

/// Variable byte integer from a buffer (at most 4 bytes).
fn get_varint(buf: &mut Bytes) -> R<u32> {
    let mut v: u32 = 0;
    for i in 0..4 {
        let b = get_u8(buf)?;
        v |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

fn put_binary(out: &mut BytesMut, b: &[u8]) {
    let n = b.len().min(usize::from(u16::MAX));
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

// ---- properties ----

const P_PAYLOAD_FORMAT: u8 = 0x01;
const P_MESSAGE_EXPIRY: u8 = 0x02;
const P_CONTENT_TYPE: u8 = 0x03;
const P_RESPONSE_TOPIC: u8 = 0x08;
const P_CORRELATION_DATA: u8 = 0x09;
const P_SUBSCRIPTION_ID: u8 = 0x0B;
const P_SESSION_EXPIRY: u8 = 0x11;
const P_ASSIGNED_CLIENT_ID: u8 = 0x12;
const P_SERVER_KEEP_ALIVE: u8 = 0x13;
const P_AUTH_METHOD: u8 = 0x15;
const P_AUTH_DATA: u8 = 0x16;
const P_REQUEST_PROBLEM_INFO: u8 = 0x17;
const P_WILL_DELAY: u8 = 0x18;
const P_REQUEST_RESPONSE_INFO: u8 = 0x19;
const P_RESPONSE_INFO: u8 = 0x1A;
const P_SERVER_REFERENCE: u8 = 0x1C;
const P_REASON_STRING: u8 = 0x1F;
const P_RECEIVE_MAXIMUM: u8 = 0x21;
const P_TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const P_TOPIC_ALIAS: u8 = 0x23;
const P_MAXIMUM_QOS: u8 = 0x24;
const P_RETAIN_AVAILABLE: u8 = 0x25;
const P_USER_PROPERTY: u8 = 0x26;
const P_MAXIMUM_PACKET_SIZE: u8 = 0x27;
const P_WILDCARD_SUB: u8 = 0x28;
const P_SUB_ID_AVAILABLE: u8 = 0x29;
const P_SHARED_SUB: u8 = 0x2A;

/// Which properties a packet kind may carry (the spec's table 2-4).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    Disconnect,
    Auth,
}

fn allowed(ctx: Ctx, id: u8) -> bool {
    use Ctx::*;
    match id {
        P_PAYLOAD_FORMAT | P_MESSAGE_EXPIRY | P_CONTENT_TYPE | P_RESPONSE_TOPIC
        | P_CORRELATION_DATA => matches!(ctx, Publish | Will),
        P_SUBSCRIPTION_ID => matches!(ctx, Publish | Subscribe),
        P_SESSION_EXPIRY => matches!(ctx, Connect | ConnAck | Disconnect),
        P_ASSIGNED_CLIENT_ID | P_SERVER_KEEP_ALIVE | P_RESPONSE_INFO | P_MAXIMUM_QOS
        | P_RETAIN_AVAILABLE | P_WILDCARD_SUB | P_SUB_ID_AVAILABLE | P_SHARED_SUB => ctx == ConnAck,
        P_AUTH_METHOD | P_AUTH_DATA => matches!(ctx, Connect | ConnAck | Auth),
        P_REQUEST_PROBLEM_INFO | P_REQUEST_RESPONSE_INFO => ctx == Connect,
        P_WILL_DELAY => ctx == Will,
        P_SERVER_REFERENCE => matches!(ctx, ConnAck | Disconnect),
        P_REASON_STRING => matches!(ctx, ConnAck | Ack | SubAck | Disconnect | Auth),
        P_RECEIVE_MAXIMUM | P_TOPIC_ALIAS_MAXIMUM | P_MAXIMUM_PACKET_SIZE => {
            matches!(ctx, Connect | ConnAck)
        }
        P_TOPIC_ALIAS => ctx == Publish,
        P_USER_PROPERTY => true,
        _ => false,
    }
}

fn set_once<T>(slot: &mut Option<T>, v: T) -> R<()> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property appears twice"));
    }
    *slot = Some(v);
    Ok(())
}

fn get_properties(buf: &mut Bytes, ctx: Ctx) -> R<Properties> {
    let len = get_varint(buf)? as usize;
    need(buf, len)?;
    let mut b = buf.split_to(len);
    let mut p = Properties::default();
    while b.has_remaining() {
        let id = get_varint(&mut b)?;
        let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property"))?;
        if !allowed(ctx, id) {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
        match id {
            P_PAYLOAD_FORMAT => {
                let v = get_u8(&mut b)?;
                if v > 1 {
                    return Err(DecodeError::Protocol("payload format indicator"));
                }
                set_once(&mut p.payload_format, v)?
            }
            P_MESSAGE_EXPIRY => set_once(&mut p.message_expiry, get_u32(&mut b)?)?,
            P_CONTENT_TYPE => set_once(&mut p.content_type, get_string(&mut b)?)?,
            P_RESPONSE_TOPIC => set_once(&mut p.response_topic, get_string(&mut b)?)?,
            P_CORRELATION_DATA => set_once(&mut p.correlation_data, get_binary(&mut b)?)?,
            P_SUBSCRIPTION_ID => {
                let v = get_varint(&mut b)?;
                if v == 0 {
                    return Err(DecodeError::Protocol("subscription identifier 0"));
                }
                if ctx == Ctx::Subscribe && !p.subscription_ids.is_empty() {
                    return Err(DecodeError::Protocol("property appears twice"));
                }
                p.subscription_ids.push(v);
            }
            P_SESSION_EXPIRY => set_once(&mut p.session_expiry, get_u32(&mut b)?)?,
            P_ASSIGNED_CLIENT_ID => set_once(&mut p.assigned_client_id, get_string(&mut b)?)?,
            P_SERVER_KEEP_ALIVE => set_once(&mut p.server_keep_alive, get_u16(&mut b)?)?,
            P_AUTH_METHOD => set_once(&mut p.auth_method, get_string(&mut b)?)?,
            P_AUTH_DATA => set_once(&mut p.auth_data, get_binary(&mut b)?)?,
            P_REQUEST_PROBLEM_INFO => {
                let v = get_u8(&mut b)?;
                if v > 1 {
                    return Err(DecodeError::Protocol("request problem information"));
                }
                set_once(&mut p.request_problem_info, v)?
            }
            P_WILL_DELAY => set_once(&mut p.will_delay, get_u32(&mut b)?)?,
            P_REQUEST_RESPONSE_INFO => {
                let v = get_u8(&mut b)?;
                if v > 1 {
                    return Err(DecodeError::Protocol("request response information"));
                }
                set_once(&mut p.request_response_info, v)?
            }
            P_RESPONSE_INFO => set_once(&mut p.response_info, get_string(&mut b)?)?,
            P_SERVER_REFERENCE => set_once(&mut p.server_reference, get_string(&mut b)?)?,
            P_REASON_STRING => set_once(&mut p.reason_string, get_string(&mut b)?)?,
            P_RECEIVE_MAXIMUM => {
                let v = get_u16(&mut b)?;
                if v == 0 {
                    return Err(DecodeError::Protocol("receive maximum 0"));
                }
                set_once(&mut p.receive_maximum, v)?
            }
            P_TOPIC_ALIAS_MAXIMUM => set_once(&mut p.topic_alias_maximum, get_u16(&mut b)?)?,
            P_TOPIC_ALIAS => set_once(&mut p.topic_alias, get_u16(&mut b)?)?,
            P_MAXIMUM_QOS => set_once(&mut p.maximum_qos, get_u8(&mut b)?)?,
            P_RETAIN_AVAILABLE => set_once(&mut p.retain_available, get_u8(&mut b)?)?,
            P_USER_PROPERTY => {
                let k = get_string(&mut b)?;
                let v = get_string(&mut b)?;
                p.user.push((k, v));
            }
            P_MAXIMUM_PACKET_SIZE => {
                let v = get_u32(&mut b)?;
                if v == 0 {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                set_once(&mut p.maximum_packet_size, v)?
            }
            P_WILDCARD_SUB => set_once(&mut p.wildcard_sub_available, get_u8(&mut b)?)?,
            P_SUB_ID_AVAILABLE => set_once(&mut p.sub_id_available, get_u8(&mut b)?)?,
            P_SHARED_SUB => set_once(&mut p.shared_sub_available, get_u8(&mut b)?)?,
            _ => return Err(DecodeError::Malformed("unknown property")),
        }
    }
    Ok(p)
}

fn put_properties(out: &mut BytesMut, p: &Properties) {
    let mut b = BytesMut::new();
    let u8p = |b: &mut BytesMut, id: u8, v: Option<u8>| {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u8(v);
        }
    };
    let u16p = |b: &mut BytesMut, id: u8, v: Option<u16>| {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u16(v);
        }
    };
    let u32p = |b: &mut BytesMut, id: u8, v: Option<u32>| {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u32(v);
        }
    };
    let strp = |b: &mut BytesMut, id: u8, v: &Option<String>| {
        if let Some(v) = v {
            b.put_u8(id);
            put_string(b, v);
        }
    };
    let binp = |b: &mut BytesMut, id: u8, v: &Option<Bytes>| {
        if let Some(v) = v {
            b.put_u8(id);
            put_binary(b, v);
        }
    };
    u8p(&mut b, P_PAYLOAD_FORMAT, p.payload_format);
    u32p(&mut b, P_MESSAGE_EXPIRY, p.message_expiry);
    strp(&mut b, P_CONTENT_TYPE, &p.content_type);
    strp(&mut b, P_RESPONSE_TOPIC, &p.response_topic);
    binp(&mut b, P_CORRELATION_DATA, &p.correlation_data);
    for id in &p.subscription_ids {
        b.put_u8(P_SUBSCRIPTION_ID);
        put_varint(&mut b, *id as usize);
    }
    u32p(&mut b, P_SESSION_EXPIRY, p.session_expiry);
    strp(&mut b, P_ASSIGNED_CLIENT_ID, &p.assigned_client_id);
    u16p(&mut b, P_SERVER_KEEP_ALIVE, p.server_keep_alive);
    strp(&mut b, P_AUTH_METHOD, &p.auth_method);
    binp(&mut b, P_AUTH_DATA, &p.auth_data);
    u8p(&mut b, P_REQUEST_PROBLEM_INFO, p.request_problem_info);
    u32p(&mut b, P_WILL_DELAY, p.will_delay);
    u8p(&mut b, P_REQUEST_RESPONSE_INFO, p.request_response_info);
    strp(&mut b, P_RESPONSE_INFO, &p.response_info);
    strp(&mut b, P_SERVER_REFERENCE, &p.server_reference);
    strp(&mut b, P_REASON_STRING, &p.reason_string);
    u16p(&mut b, P_RECEIVE_MAXIMUM, p.receive_maximum);
    u16p(&mut b, P_TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    u16p(&mut b, P_TOPIC_ALIAS, p.topic_alias);
    u8p(&mut b, P_MAXIMUM_QOS, p.maximum_qos);
    u8p(&mut b, P_RETAIN_AVAILABLE, p.retain_available);
    for (k, v) in &p.user {
        b.put_u8(P_USER_PROPERTY);
        put_string(&mut b, k);
        put_string(&mut b, v);
    }
    u32p(&mut b, P_MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    u8p(&mut b, P_WILDCARD_SUB, p.wildcard_sub_available);
    u8p(&mut b, P_SUB_ID_AVAILABLE, p.sub_id_available);
    u8p(&mut b, P_SHARED_SUB, p.shared_sub_available);
    put_varint(out, b.len());
    out.put_slice(&b);
}

// ---- framing ----

/// Decodes one packet from the front of `buf`, consuming its bytes.
///
/// `version` is the connection's negotiated version (before CONNECT, pass
/// [`Version::V311`]; CONNECT carries its own). `max_size` bounds the whole
/// packet (fixed header included) and is checked before the body arrives.
///
/// # Errors
/// See [`DecodeError`]; after an error the connection must be closed (the
/// buffer is left in an unspecified state).
pub fn decode(buf: &mut BytesMut, version: Version, max_size: usize) -> R<Option<Packet>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut rl: usize = 0;
    let mut hdr = 1;
    loop {
        if hdr > 4 {
            return Err(DecodeError::Malformed(
                "remaining length longer than 4 bytes",
            ));
        }
        let Some(&b) = buf.get(hdr) else {
            return Ok(None);
        };
        rl |= usize::from(b & 0x7F) << (7 * (hdr - 1));
        hdr += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = hdr + rl;
    if total > max_size {
        return Err(DecodeError::TooLarge {
            size: total,
            max: max_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    let mut frame = buf.split_to(total).freeze();
    frame.advance(hdr);
    decode_body(first, frame, version).map(Some)
}

fn check_flags(first: u8, want: u8) -> R<()> {
    if first & 0x0F != want {
        return Err(DecodeError::Malformed("reserved fixed header flags"));
    }
    Ok(())
}

fn decode_body(first: u8, mut b: Bytes, v: Version) -> R<Packet> {
    let v5 = v == Version::V5;
    let p = match first >> 4 {
        1 => {
            check_flags(first, 0)?;
            Packet::Connect(Box::new(decode_connect(&mut b)?))
        }
        2 => {
            check_flags(first, 0)?;
            let flags = get_u8(&mut b)?;
            let code = get_u8(&mut b)?;
            let properties = if v5 {
                get_properties(&mut b, Ctx::ConnAck)?
            } else {
                Properties::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: flags & 1 == 1,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(first, &mut b, v5)?),
        4 => {
            check_flags(first, 0)?;
            Packet::PubAck(decode_ack(&mut b, v5)?)
        }
        5 => {
            check_flags(first, 0)?;
            Packet::PubRec(decode_ack(&mut b, v5)?)
        }
        6 => {
            check_flags(first, 2)?;
            Packet::PubRel(decode_ack(&mut b, v5)?)
        }
        7 => {
            check_flags(first, 0)?;
            Packet::PubComp(decode_ack(&mut b, v5)?)
        }
        8 => {
            check_flags(first, 2)?;
            let pkid = get_pkid(&mut b)?;
            let properties = if v5 {
                get_properties(&mut b, Ctx::Subscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while b.has_remaining() {
                let f = get_string(&mut b)?;
                let o = get_u8(&mut b)?;
                let qos = o & 3;
                if qos == 3 {
                    return Err(DecodeError::Malformed("subscription QoS 3"));
                }
                let opts = if v5 {
                    if o & 0xC0 != 0 {
                        return Err(DecodeError::Malformed("reserved subscription option bits"));
                    }
                    let rh = (o >> 4) & 3;
                    if rh == 3 {
                        return Err(DecodeError::Protocol("retain handling 3"));
                    }
                    SubOptions {
                        qos,
                        no_local: o & 4 != 0,
                        retain_as_published: o & 8 != 0,
                        retain_handling: rh,
                    }
                } else {
                    if o & 0xFC != 0 {
                        return Err(DecodeError::Malformed("reserved subscription option bits"));
                    }
                    SubOptions {
                        qos,
                        ..SubOptions::default()
                    }
                };
                filters.push((f, opts));
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
            }
            Packet::Subscribe(Subscribe {
                pkid,
                properties,
                filters,
            })
        }
        9 => {
            check_flags(first, 0)?;
            let pkid = get_u16(&mut b)?;
            let properties = if v5 {
                get_properties(&mut b, Ctx::SubAck)?
            } else {
                Properties::default()
            };
            let codes = b.to_vec();
            b.advance(b.remaining());
            Packet::SubAck(SubAck {
                pkid,
                properties,
                codes,
            })
        }
        10 => {
            check_flags(first, 2)?;
            let pkid = get_pkid(&mut b)?;
            let properties = if v5 {
                get_properties(&mut b, Ctx::Unsubscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while b.has_remaining() {
                filters.push(get_string(&mut b)?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe(Unsubscribe {
                pkid,
                properties,
                filters,
            })
        }
        11 => {
            check_flags(first, 0)?;
            let pkid = get_u16(&mut b)?;
            let properties = if v5 {
                get_properties(&mut b, Ctx::SubAck)?
            } else {
                Properties::default()
            };
            let codes = if v5 { b.to_vec() } else { Vec::new() };
            b.advance(b.remaining());
            Packet::UnsubAck(UnsubAck {
                pkid,
                properties,
                codes,
            })
        }
        12 => {
            check_flags(first, 0)?;
            Packet::PingReq
        }
        13 => {
            check_flags(first, 0)?;
            Packet::PingResp
        }
        14 => {
            check_flags(first, 0)?;
            let mut d = Disconnect {
                reason: 0,
                properties: Properties::default(),
            };
            if v5 && b.has_remaining() {
                d.reason = get_u8(&mut b)?;
                if b.has_remaining() {
                    d.properties = get_properties(&mut b, Ctx::Disconnect)?;
                }
            }
            Packet::Disconnect(d)
        }
        15 if v5 => {
            check_flags(first, 0)?;
            let mut d = Disconnect {
                reason: 0,
                properties: Properties::default(),
            };
            if b.has_remaining() {
                d.reason = get_u8(&mut b)?;
                if b.has_remaining() {
                    d.properties = get_properties(&mut b, Ctx::Auth)?;
                }
            }
            Packet::Auth(d)
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    };
    if b.has_remaining() {
        return Err(DecodeError::Malformed("bytes after the end of the packet"));
    }
    Ok(p)
}

fn get_pkid(b: &mut Bytes) -> R<u16> {
    let id = get_u16(b)?;
    if id == 0 {
        return Err(DecodeError::Malformed("packet identifier 0"));
    }
    Ok(id)
}

fn decode_ack(b: &mut Bytes, v5: bool) -> R<Ack> {
    let pkid = get_u16(b)?;
    let mut a = Ack::ok(pkid);
    if v5 && b.has_remaining() {
        a.reason = get_u8(b)?;
        if b.has_remaining() {
            a.properties = get_properties(b, Ctx::Ack)?;
        }
    }
    Ok(a)
}

fn decode_publish(first: u8, b: &mut Bytes, v5: bool) -> R<Publish> {
    let dup = first & 8 != 0;
    let qos = (first >> 1) & 3;
    let retain = first & 1 != 0;
    if qos == 3 {
        return Err(DecodeError::Malformed("PUBLISH QoS 3"));
    }
    if qos == 0 && dup {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = get_string(b)?;
    let pkid = if qos > 0 { get_pkid(b)? } else { 0 };
    let properties = if v5 {
        get_properties(b, Ctx::Publish)?
    } else {
        Properties::default()
    };
    let payload = b.split_to(b.remaining());
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        properties,
        payload,
    })
}

fn decode_connect(b: &mut Bytes) -> R<Connect> {
    let name = get_binary(b).map_err(|_| DecodeError::BadProtocolName)?;
    let level = get_u8(b)?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQIsdp", 3) => Version::V31,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(DecodeError::UnsupportedLevel(l)),
        _ => return Err(DecodeError::BadProtocolName),
    };
    let v5 = version == Version::V5;
    let flags = get_u8(b)?;
    if flags & 1 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag"));
    }
    let clean_start = flags & 2 != 0;
    let will_flag = flags & 4 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(DecodeError::Malformed("will QoS 3"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed("will QoS/retain without will flag"));
    }
    if !v5 && has_password && !has_username {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = get_u16(b)?;
    let properties = if v5 {
        get_properties(b, Ctx::Connect)?
    } else {
        Properties::default()
    };
    let client_id = get_string(b)?;
    let will = if will_flag {
        let properties = if v5 {
            get_properties(b, Ctx::Will)?
        } else {
            Properties::default()
        };
        let topic = get_string(b)?;
        let payload = get_binary(b)?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(get_string(b)?)
    } else {
        None
    };
    let password = if has_password {
        Some(get_binary(b)?)
    } else {
        None
    };
    Ok(Connect {
        version,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

// ---- encoding ----

fn frame(out: &mut BytesMut, first: u8, body: &[u8]) {
    out.reserve(5 + body.len());
    out.put_u8(first);
    put_varint(out, body.len());
    out.put_slice(body);
}

fn ack_body(a: &Ack, v5: bool) -> BytesMut {
    let mut b = BytesMut::with_capacity(4);
    b.put_u16(a.pkid);
    if v5 && (a.reason != 0 || a.properties != Properties::default()) {
        b.put_u8(a.reason);
        if a.properties != Properties::default() {
            put_properties(&mut b, &a.properties);
        }
    }
    b
}

/// The encoded size of a PUBLISH, to compare with a client's maximum
/// packet size before sending.
pub fn publish_size(p: &Publish, v: Version) -> usize {
    let mut props = BytesMut::new();
    if v == Version::V5 {
        put_properties(&mut props, &p.properties);
    }
    let body = 2 + p.topic.len() + if p.qos > 0 { 2 } else { 0 } + props.len() + p.payload.len();
    1 + varint_len(body) + body
}

/// Appends the encoding of `p` for a connection of version `v` to `out`.
pub fn encode(p: &Packet, v: Version, out: &mut BytesMut) {
    let v5 = v == Version::V5;
    match p {
        Packet::Connect(c) => {
            let mut b = BytesMut::new();
            match c.version {
                Version::V31 => put_string(&mut b, "MQIsdp"),
                _ => put_string(&mut b, "MQTT"),
            }
            b.put_u8(c.version.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 2;
            }
            if let Some(w) = &c.will {
                flags |= 4 | (w.qos << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            b.put_u8(flags);
            b.put_u16(c.keep_alive);
            let cv5 = c.version == Version::V5;
            if cv5 {
                put_properties(&mut b, &c.properties);
            }
            put_string(&mut b, &c.client_id);
            if let Some(w) = &c.will {
                if cv5 {
                    put_properties(&mut b, &w.properties);
                }
                put_string(&mut b, &w.topic);
                put_binary(&mut b, &w.payload);
            }
            if let Some(u) = &c.username {
                put_string(&mut b, u);
            }
            if let Some(pw) = &c.password {
                put_binary(&mut b, pw);
            }
            frame(out, 0x10, &b);
        }
        Packet::ConnAck(c) => {
            let mut b = BytesMut::with_capacity(8);
            b.put_u8(u8::from(c.session_present));
            b.put_u8(c.code);
            if v5 {
                put_properties(&mut b, &c.properties);
            }
            frame(out, 0x20, &b);
        }
        Packet::Publish(p) => {
            let mut props = BytesMut::new();
            if v5 {
                put_properties(&mut props, &p.properties);
            }
            let body =
                2 + p.topic.len() + if p.qos > 0 { 2 } else { 0 } + props.len() + p.payload.len();
            out.reserve(5 + body);
            let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos & 3) << 1) | u8::from(p.retain);
            out.put_u8(first);
            put_varint(out, body);
            put_string(out, &p.topic);
            if p.qos > 0 {
                out.put_u16(p.pkid);
            }
            out.put_slice(&props);
            out.put_slice(&p.payload);
        }
        Packet::PubAck(a) => frame(out, 0x40, &ack_body(a, v5)),
        Packet::PubRec(a) => frame(out, 0x50, &ack_body(a, v5)),
        Packet::PubRel(a) => frame(out, 0x62, &ack_body(a, v5)),
        Packet::PubComp(a) => frame(out, 0x70, &ack_body(a, v5)),
        Packet::Subscribe(s) => {
            let mut b = BytesMut::new();
            b.put_u16(s.pkid);
            if v5 {
                put_properties(&mut b, &s.properties);
            }
            for (f, o) in &s.filters {
                put_string(&mut b, f);
                let mut x = o.qos;
                if v5 {
                    x |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | o.retain_handling << 4;
                }
                b.put_u8(x);
            }
            frame(out, 0x82, &b);
        }
        Packet::SubAck(s) => {
            let mut b = BytesMut::with_capacity(4 + s.codes.len());
            b.put_u16(s.pkid);
            if v5 {
                put_properties(&mut b, &s.properties);
            }
            b.put_slice(&s.codes);
            frame(out, 0x90, &b);
        }
        Packet::Unsubscribe(u) => {
            let mut b = BytesMut::new();
            b.put_u16(u.pkid);
            if v5 {
                put_properties(&mut b, &u.properties);
            }
            for f in &u.filters {
                put_string(&mut b, f);
            }
            frame(out, 0xA2, &b);
        }
        Packet::UnsubAck(u) => {
            let mut b = BytesMut::with_capacity(4 + u.codes.len());
            b.put_u16(u.pkid);
            if v5 {
                put_properties(&mut b, &u.properties);
                b.put_slice(&u.codes);
            }
            frame(out, 0xB0, &b);
        }
        Packet::PingReq => frame(out, 0xC0, &[]),
        Packet::PingResp => frame(out, 0xD0, &[]),
        Packet::Disconnect(d) | Packet::Auth(d) => {
            let first = if matches!(p, Packet::Auth(_)) {
                0xF0
            } else {
                0xE0
            };
            let mut b = BytesMut::new();
            if v5 && (d.reason != 0 || d.properties != Properties::default()) {
                b.put_u8(d.reason);
                put_properties(&mut b, &d.properties);
            }
            frame(out, first, &b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(p: &Packet, v: Version) -> Packet {
        let mut out = BytesMut::new();
        encode(p, v, &mut out);
        let whole = out.clone();
        // Every strict prefix is "need more bytes".
        for i in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..i]);
            assert_eq!(
                decode(&mut part, v, 1 << 20),
                Ok(None),
                "prefix {i} of {p:?}"
            );
        }
        let got = decode(&mut out, v, 1 << 20).unwrap().unwrap();
        assert!(out.is_empty());
        got
    }

    #[test]
    fn v5_disconnect_and_auth_with_no_body() {
        let mut b = BytesMut::from(&[0xE0u8, 0][..]);
        assert_eq!(
            decode(&mut b, Version::V5, 100).unwrap(),
            Some(Packet::Disconnect(Disconnect {
                reason: 0,
                properties: Properties::default()
            }))
        );
        let mut b = BytesMut::from(&[0xF0u8, 0][..]);
        assert!(matches!(
            decode(&mut b, Version::V5, 100),
            Ok(Some(Packet::Auth(_)))
        ));
    }

    #[test]
    fn bad_input() {
        // remaining length too long
        let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(matches!(
            decode(&mut b, Version::V311, 1 << 28),
            Err(DecodeError::Malformed(_))
        ));
        // over the maximum, rejected before the body arrives
        let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            decode(&mut b, Version::V311, 1024),
            Err(DecodeError::TooLarge { .. })
        ));
        // QoS 3
        let mut b = BytesMut::from(&[0x36u8, 3, 0, 1, b'a'][..]);
        assert!(decode(&mut b, Version::V311, 1024).is_err());
        // wrong protocol name
        let mut b = BytesMut::from(&[0x10u8, 10, 0, 4, b'H', b'T', b'T', b'P', 4, 2, 0, 60][..]);
        assert_eq!(
            decode(&mut b, Version::V311, 1024),
            Err(DecodeError::BadProtocolName)
        );
        // unsupported level
        let mut b = BytesMut::from(&[0x10u8, 10, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60][..]);
        assert_eq!(
            decode(&mut b, Version::V311, 1024),
            Err(DecodeError::UnsupportedLevel(9))
        );
        // invalid UTF-8 topic
        let mut b = BytesMut::from(&[0x30u8, 4, 0, 2, 0xC3, 0x28][..]);
        assert!(matches!(
            decode(&mut b, Version::V311, 1024),
            Err(DecodeError::Malformed(_))
        ));
        // SUBSCRIBE with wrong flags
        let mut b = BytesMut::from(&[0x80u8, 6, 0, 1, 0, 1, b'a', 0][..]);
        assert!(decode(&mut b, Version::V311, 1024).is_err());
    }

    #[test]
    fn connect_all_versions() {
        for v in [Version::V31, Version::V311, Version::V5] {
            let c = Connect {
                version: v,
                client_id: "c".into(),
                clean_start: true,
                keep_alive: 30,
                username: Some("u".into()),
                password: Some(Bytes::from_static(b"\xff\x00")),
                will: Some(Will {
                    topic: "w".into(),
                    payload: Bytes::from_static(b"bye"),
                    qos: 1,
                    retain: true,
                    properties: if v == Version::V5 {
                        Properties {
                            will_delay: Some(5),
                            ..Properties::default()
                        }
                    } else {
                        Properties::default()
                    },
                }),
                properties: if v == Version::V5 {
                    Properties {
                        session_expiry: Some(100),
                        receive_maximum: Some(10),
                        user: vec![("a".into(), "b".into())],
                        ..Properties::default()
                    }
                } else {
                    Properties::default()
                },
            };
            let p = Packet::Connect(Box::new(c));
            assert_eq!(round_trip(&p, Version::V311), p);
        }
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-z/é+#]{0,20}"
    }

    fn arb_props() -> impl Strategy<Value = Properties> {
        (
            proptest::option::of(0u8..2),
            proptest::option::of(any::<u32>()),
            proptest::option::of(arb_string()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::collection::vec(1u32..268_435_455, 0..3),
            proptest::collection::vec((arb_string(), arb_string()), 0..3),
            proptest::option::of(1u16..),
        )
            .prop_map(|(pf, me, ct, cd, ids, user, alias)| Properties {
                payload_format: pf,
                message_expiry: me,
                content_type: ct,
                correlation_data: cd.map(Bytes::from),
                subscription_ids: ids,
                user,
                topic_alias: alias,
                ..Properties::default()
            })
    }

    proptest! {
        #[test]
        fn publish_round_trips(
            topic in arb_string(), qos in 0u8..3, retain: bool, dup: bool, pkid in 1u16..,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            props in arb_props(), v5: bool,
        ) {
            let v = if v5 { Version::V5 } else { Version::V311 };
            let p = Packet::Publish(Publish {
                dup: dup && qos > 0, qos, retain, topic,
                pkid: if qos > 0 { pkid } else { 0 },
                properties: if v5 { props } else { Properties::default() },
                payload: Bytes::from(payload),
            });
            let mut out = BytesMut::new();
            encode(&p, v, &mut out);
            if let Packet::Publish(pp) = &p {
                prop_assert_eq!(publish_size(pp, v), out.len());
            }
            prop_assert_eq!(round_trip(&p, v), p);
        }

        #[test]
        fn acks_round_trip(pkid in 1u16.., reason in prop::sample::select(vec![0u8, 0x10, 0x80, 0x92]), kind in 0..4, v5: bool) {
            let v = if v5 { Version::V5 } else { Version::V311 };
            let a = Ack { pkid, reason: if v5 { reason } else { 0 }, properties: Properties::default() };
            let p = match kind { 0 => Packet::PubAck(a), 1 => Packet::PubRec(a), 2 => Packet::PubRel(a), _ => Packet::PubComp(a) };
            prop_assert_eq!(round_trip(&p, v), p);
        }

        #[test]
        fn subscribe_round_trips(pkid in 1u16.., fs in proptest::collection::vec((arb_string(), 0u8..3, any::<bool>(), any::<bool>(), 0u8..3), 1..5), v5: bool) {
            let v = if v5 { Version::V5 } else { Version::V311 };
            let filters = fs.into_iter().map(|(f, qos, nl, rap, rh)| (f, if v5 {
                SubOptions { qos, no_local: nl, retain_as_published: rap, retain_handling: rh }
            } else { SubOptions { qos, ..SubOptions::default() } })).collect();
            let p = Packet::Subscribe(Subscribe { pkid, properties: Properties::default(), filters });
            prop_assert_eq!(round_trip(&p, v), p);
            let p = Packet::SubAck(SubAck { pkid, properties: Properties::default(), codes: vec![0, 1, 2, 0x80] });
            prop_assert_eq!(round_trip(&p, v), p);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), v5: bool) {
            let v = if v5 { Version::V5 } else { Version::V311 };
            let mut b = BytesMut::from(&data[..]);
            for _ in 0..8 {
                match decode(&mut b, v, 1024) {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }
    }
}

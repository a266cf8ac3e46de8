//! The AMQP 0-9-1 wire codec, sans-IO: frames, methods, content headers
//! and field tables as pure functions over bytes.
//!
//! Decoding is bounded by its input: every length is checked against the
//! bytes that remain before anything is allocated, and tables nest at most
//! [`MAX_TABLE_DEPTH`] levels. An incomplete frame is `Ok(None)` ("need more
//! bytes"), never an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol header a 0-9-1 client opens with (and the one a server
/// answers a wrong header with before closing).
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Frame types.
pub const FRAME_METHOD: u8 = 1;
/// Content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Header + end octet around a frame payload.
pub const FRAME_OVERHEAD: usize = 8;
/// Smallest frame-max a peer may negotiate; also the limit before tune.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// Deepest nesting of tables/arrays accepted.
pub const MAX_TABLE_DEPTH: usize = 32;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type (`FRAME_*`).
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// The payload.
    pub payload: Bytes,
}

/// Why a frame could not be taken from the input (all are connection
/// errors: 501 FRAME_ERROR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is larger than the negotiated frame-max.
    #[error("frame of {size} bytes exceeds frame-max {max}")]
    TooLarge { size: u64, max: u32 },
    /// The frame does not end with 0xCE.
    #[error("frame does not end with 0xCE")]
    BadEnd,
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
}

/// Takes one frame from the front of `buf`. `Ok(None)` when more bytes are
/// needed. `frame_max` bounds the whole frame (header, payload, end).
///
/// # Errors
/// [`FrameError`] when the input cannot be a valid frame.
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownType(kind));
    }
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as u64;
    let total = size + FRAME_OVERHEAD as u64;
    if frame_max != 0 && total > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    let total = total as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(FrameError::BadEnd);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(7);
    frame.truncate(total - FRAME_OVERHEAD);
    Ok(Some(Frame {
        kind,
        channel,
        payload: frame,
    }))
}

/// Appends one frame with `payload` to `out`.
pub fn encode_frame(out: &mut BytesMut, kind: u8, channel: u16, payload: &[u8]) {
    out.reserve(payload.len() + FRAME_OVERHEAD);
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.put_u8(FRAME_END);
}

/// Appends a method frame.
pub fn encode_method_frame(out: &mut BytesMut, channel: u16, m: &Method) {
    let start = out.len();
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(0);
    let body = out.len();
    m.encode(out);
    let len = (out.len() - body) as u32;
    out[start + 3..start + 7].copy_from_slice(&len.to_be_bytes());
    out.put_u8(FRAME_END);
}

/// Appends a content header frame and the body frames of a message, each
/// body frame at most `frame_max` bytes in total.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    props: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) {
    let start = out.len();
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32(0);
    let hdr = out.len();
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    props.encode(out);
    let len = (out.len() - hdr) as u32;
    out[start + 3..start + 7].copy_from_slice(&len.to_be_bytes());
    out.put_u8(FRAME_END);
    let chunk = (frame_max.max(FRAME_MIN_SIZE) as usize) - FRAME_OVERHEAD;
    for part in body.chunks(chunk) {
        encode_frame(out, FRAME_BODY, channel, part);
    }
}

/// Why a method, header or table could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended early or is malformed (502 SYNTAX_ERROR).
    #[error("malformed frame payload: {0}")]
    Syntax(&'static str),
    /// An unknown class or method id (540 NOT_IMPLEMENTED).
    #[error("unknown method {class}.{method}")]
    UnknownMethod { class: u16, method: u16 },
}

// ---- field tables ----

/// A field value (RabbitMQ's type letters).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s`
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: scale, unscaled value
    Decimal(u8, u32),
    /// `S`
    LongStr(Bytes),
    /// `A`
    Array(Vec<Value>),
    /// `T`: seconds since the epoch
    Timestamp(u64),
    /// `F`
    Table(Table),
    /// `V`
    Void,
    /// `x`
    ByteArray(Bytes),
}

impl Value {
    /// An integer value of any width.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::I8(v) => v.into(),
            Value::U8(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I64(v) => v,
            Value::Timestamp(v) => v as i64,
            _ => return None,
        })
    }

    /// A string value (long string or byte array) as UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::LongStr(b) | Value::ByteArray(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// A long string from text.
    pub fn str(s: &str) -> Value {
        Value::LongStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A field table: ordered `(name, value)` pairs.
pub type Table = Vec<(String, Value)>;

/// The first value named `name`.
pub fn table_get<'a>(t: &'a Table, name: &str) -> Option<&'a Value> {
    t.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

// ---- reader / writer ----

/// Reads AMQP primitive types from a payload; bit fields pack into octets.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
    bits: u8,
    nbits: u8,
}

type R<T> = Result<T, DecodeError>;

impl Reader {
    /// A reader over `buf`.
    pub fn new(buf: Bytes) -> Self {
        Reader {
            buf,
            bits: 0,
            nbits: 0,
        }
    }
    fn need(&self, n: usize) -> R<()> {
        if self.buf.remaining() < n {
            Err(DecodeError::Syntax("payload too short"))
        } else {
            Ok(())
        }
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.remaining()
    }
    /// An octet.
    pub fn u8(&mut self) -> R<u8> {
        self.nbits = 0;
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    /// A short.
    pub fn u16(&mut self) -> R<u16> {
        self.nbits = 0;
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    /// A long.
    pub fn u32(&mut self) -> R<u32> {
        self.nbits = 0;
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    /// A long long.
    pub fn u64(&mut self) -> R<u64> {
        self.nbits = 0;
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    /// A bit (consecutive bits share an octet).
    pub fn bit(&mut self) -> R<bool> {
        if self.nbits == 0 || self.nbits == 8 {
            self.bits = self.u8()?;
            self.nbits = 0;
        }
        let v = (self.bits >> self.nbits) & 1 == 1;
        self.nbits += 1;
        Ok(v)
    }
    fn bytes(&mut self, n: usize) -> R<Bytes> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    /// A short string (UTF-8 required).
    pub fn shortstr(&mut self) -> R<String> {
        let n = self.u8()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Syntax("short string is not UTF-8"))
    }
    /// A long string (binary).
    pub fn longstr(&mut self) -> R<Bytes> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
    /// A field table.
    pub fn table(&mut self) -> R<Table> {
        self.table_at(0)
    }
    fn table_at(&mut self, depth: usize) -> R<Table> {
        if depth > MAX_TABLE_DEPTH {
            return Err(DecodeError::Syntax("field table nested too deeply"));
        }
        let n = self.u32()? as usize;
        let data = self.bytes(n)?;
        let mut r = Reader::new(data);
        let mut t = Vec::new();
        while r.remaining() > 0 {
            let name = r.shortstr()?;
            let v = r.value(depth)?;
            t.push((name, v));
        }
        Ok(t)
    }
    fn value(&mut self, depth: usize) -> R<Value> {
        let tag = self.u8()?;
        Ok(match tag {
            b't' => Value::Bool(self.u8()? != 0),
            b'b' => Value::I8(self.u8()? as i8),
            b'B' => Value::U8(self.u8()?),
            b's' => Value::I16(self.u16()? as i16),
            b'u' => Value::U16(self.u16()?),
            b'I' => Value::I32(self.u32()? as i32),
            b'i' => Value::U32(self.u32()?),
            b'l' | b'L' => Value::I64(self.u64()? as i64),
            b'f' => Value::F32(f32::from_bits(self.u32()?)),
            b'd' => Value::F64(f64::from_bits(self.u64()?)),
            b'D' => {
                let s = self.u8()?;
                Value::Decimal(s, self.u32()?)
            }
            b'S' => Value::LongStr(self.longstr()?),
            b'x' => Value::ByteArray(self.longstr()?),
            b'A' => {
                if depth >= MAX_TABLE_DEPTH {
                    return Err(DecodeError::Syntax("field array nested too deeply"));
                }
                let data = self.longstr()?;
                let mut r = Reader::new(data);
                let mut v = Vec::new();
                while r.remaining() > 0 {
                    v.push(r.value(depth + 1)?);
                }
                Value::Array(v)
            }
            b'T' => Value::Timestamp(self.u64()?),
            b'F' => Value::Table(self.table_at(depth + 1)?),
            b'V' => Value::Void,
            _ => return Err(DecodeError::Syntax("unknown field value type")),
        })
    }
}

/// Writes AMQP primitive types; consecutive bits share an octet.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut BytesMut,
    bit_at: usize,
    nbits: u8,
}

impl<'a> Writer<'a> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut BytesMut) -> Self {
        Writer {
            out,
            bit_at: 0,
            nbits: 0,
        }
    }
    /// An octet.
    pub fn u8(&mut self, v: &u8) {
        self.nbits = 0;
        self.out.put_u8(*v);
    }
    /// A short.
    pub fn u16(&mut self, v: &u16) {
        self.nbits = 0;
        self.out.put_u16(*v);
    }
    /// A long.
    pub fn u32(&mut self, v: &u32) {
        self.nbits = 0;
        self.out.put_u32(*v);
    }
    /// A long long.
    pub fn u64(&mut self, v: &u64) {
        self.nbits = 0;
        self.out.put_u64(*v);
    }
    /// A bit.
    pub fn bit(&mut self, v: &bool) {
        if self.nbits == 0 || self.nbits == 8 {
            self.bit_at = self.out.len();
            self.out.put_u8(0);
            self.nbits = 0;
        }
        if *v {
            self.out[self.bit_at] |= 1 << self.nbits;
        }
        self.nbits += 1;
    }
    /// A short string; longer than 255 bytes is truncated at a char
    /// boundary (the server only writes names it validated).
    pub fn shortstr(&mut self, v: &String) {
        self.nbits = 0;
        let mut n = v.len().min(255);
        while !v.is_char_boundary(n) {
            n -= 1;
        }
        self.out.put_u8(n as u8);
        self.out.put_slice(&v.as_bytes()[..n]);
    }
    /// A long string.
    pub fn longstr(&mut self, v: &Bytes) {
        self.nbits = 0;
        self.out.put_u32(v.len() as u32);
        self.out.put_slice(v);
    }
    /// A field table.
    pub fn table(&mut self, t: &Table) {
        self.nbits = 0;
        encode_table(self.out, t);
    }
}

/// Appends a field table (with its length prefix).
pub fn encode_table(out: &mut BytesMut, t: &Table) {
    let at = out.len();
    out.put_u32(0);
    for (name, v) in t {
        let mut n = name.len().min(255);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        out.put_u8(n as u8);
        out.put_slice(&name.as_bytes()[..n]);
        encode_value(out, v);
    }
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn encode_value(out: &mut BytesMut, v: &Value) {
    match v {
        Value::Bool(b) => {
            out.put_u8(b't');
            out.put_u8(u8::from(*b));
        }
        Value::I8(x) => {
            out.put_u8(b'b');
            out.put_i8(*x);
        }
        Value::U8(x) => {
            out.put_u8(b'B');
            out.put_u8(*x);
        }
        Value::I16(x) => {
            out.put_u8(b's');
            out.put_i16(*x);
        }
        Value::U16(x) => {
            out.put_u8(b'u');
            out.put_u16(*x);
        }
        Value::I32(x) => {
            out.put_u8(b'I');
            out.put_i32(*x);
        }
        Value::U32(x) => {
            out.put_u8(b'i');
            out.put_u32(*x);
        }
        Value::I64(x) => {
            out.put_u8(b'l');
            out.put_i64(*x);
        }
        Value::F32(x) => {
            out.put_u8(b'f');
            out.put_u32(x.to_bits());
        }
        Value::F64(x) => {
            out.put_u8(b'd');
            out.put_u64(x.to_bits());
        }
        Value::Decimal(s, x) => {
            out.put_u8(b'D');
            out.put_u8(*s);
            out.put_u32(*x);
        }
        Value::LongStr(b) => {
            out.put_u8(b'S');
            out.put_u32(b.len() as u32);
            out.put_slice(b);
        }
        Value::ByteArray(b) => {
            out.put_u8(b'x');
            out.put_u32(b.len() as u32);
            out.put_slice(b);
        }
        Value::Array(items) => {
            out.put_u8(b'A');
            let at = out.len();
            out.put_u32(0);
            for i in items {
                encode_value(out, i);
            }
            let len = (out.len() - at - 4) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        Value::Timestamp(x) => {
            out.put_u8(b'T');
            out.put_u64(*x);
        }
        Value::Table(t) => {
            out.put_u8(b'F');
            encode_table(out, t);
        }
        Value::Void => out.put_u8(b'V'),
    }
}

/// Decodes a table from its encoding with the length prefix.
///
/// # Errors
/// [`DecodeError::Syntax`] for malformed input.
pub fn decode_table(data: Bytes) -> Result<Table, DecodeError> {
    Reader::new(data).table()
}

// ---- methods ----

macro_rules! field_type {
    (u8) => {
        u8
    };
    (u16) => {
        u16
    };
    (u32) => {
        u32
    };
    (u64) => {
        u64
    };
    (bit) => {
        bool
    };
    (shortstr) => {
        String
    };
    (longstr) => {
        Bytes
    };
    (table) => {
        Table
    };
}

macro_rules! methods {
    ($( $name:ident = ($class:expr, $method:expr, $text:expr) { $($field:ident : $kind:ident),* $(,)? } ),* $(,)?) => {
        /// Every 0-9-1 method (both directions).
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method { $( $name($name), )* }

        $(
            #[doc = concat!("`", $text, "`")]
            #[derive(Debug, Clone, PartialEq, Default)]
            pub struct $name { $( #[allow(missing_docs)] pub $field: field_type!($kind), )* }
            impl From<$name> for Method {
                fn from(m: $name) -> Method { Method::$name(m) }
            }
        )*

        impl Method {
            /// Decodes a method frame's payload.
            ///
            /// # Errors
            /// [`DecodeError::UnknownMethod`] for unknown ids,
            /// [`DecodeError::Syntax`] for malformed arguments.
            #[allow(unused_mut)]
            pub fn decode(payload: Bytes) -> Result<Method, DecodeError> {
                let mut r = Reader::new(payload);
                let class = r.u16()?;
                let method = r.u16()?;
                match (class, method) {
                    $( ($class, $method) => Ok(Method::$name($name { $( $field: r.$kind()?, )* })), )*
                    _ => Err(DecodeError::UnknownMethod { class, method }),
                }
            }

            /// Appends the method's payload (class id, method id, arguments).
            #[allow(unused_mut, unused_variables)]
            pub fn encode(&self, out: &mut BytesMut) {
                let mut w = Writer::new(out);
                match self {
                    $( Method::$name(m) => {
                        w.u16(&$class);
                        w.u16(&$method);
                        $( w.$kind(&m.$field); )*
                    } )*
                }
            }

            /// `(class id, method id)`.
            pub fn ids(&self) -> (u16, u16) {
                match self { $( Method::$name(_) => ($class, $method), )* }
            }

            /// The method's name as the spec writes it, e.g. `basic.publish`.
            pub fn name(&self) -> &'static str {
                match self { $( Method::$name(_) => $text, )* }
            }
        }
    };
}

methods! {
    ConnectionStart = (10, 10, "connection.start") { version_major: u8, version_minor: u8, server_properties: table, mechanisms: longstr, locales: longstr },
    ConnectionStartOk = (10, 11, "connection.start-ok") { client_properties: table, mechanism: shortstr, response: longstr, locale: shortstr },
    ConnectionSecure = (10, 20, "connection.secure") { challenge: longstr },
    ConnectionSecureOk = (10, 21, "connection.secure-ok") { response: longstr },
    ConnectionTune = (10, 30, "connection.tune") { channel_max: u16, frame_max: u32, heartbeat: u16 },
    ConnectionTuneOk = (10, 31, "connection.tune-ok") { channel_max: u16, frame_max: u32, heartbeat: u16 },
    ConnectionOpen = (10, 40, "connection.open") { virtual_host: shortstr, capabilities: shortstr, insist: bit },
    ConnectionOpenOk = (10, 41, "connection.open-ok") { known_hosts: shortstr },
    ConnectionClose = (10, 50, "connection.close") { reply_code: u16, reply_text: shortstr, class_id: u16, method_id: u16 },
    ConnectionCloseOk = (10, 51, "connection.close-ok") {},
    ConnectionBlocked = (10, 60, "connection.blocked") { reason: shortstr },
    ConnectionUnblocked = (10, 61, "connection.unblocked") {},
    ConnectionUpdateSecret = (10, 70, "connection.update-secret") { new_secret: longstr, reason: shortstr },
    ConnectionUpdateSecretOk = (10, 71, "connection.update-secret-ok") {},
    ChannelOpen = (20, 10, "channel.open") { out_of_band: shortstr },
    ChannelOpenOk = (20, 11, "channel.open-ok") { channel_id: longstr },
    ChannelFlow = (20, 20, "channel.flow") { active: bit },
    ChannelFlowOk = (20, 21, "channel.flow-ok") { active: bit },
    ChannelClose = (20, 40, "channel.close") { reply_code: u16, reply_text: shortstr, class_id: u16, method_id: u16 },
    ChannelCloseOk = (20, 41, "channel.close-ok") {},
    ExchangeDeclare = (40, 10, "exchange.declare") { ticket: u16, exchange: shortstr, kind: shortstr, passive: bit, durable: bit, auto_delete: bit, internal: bit, nowait: bit, arguments: table },
    ExchangeDeclareOk = (40, 11, "exchange.declare-ok") {},
    ExchangeDelete = (40, 20, "exchange.delete") { ticket: u16, exchange: shortstr, if_unused: bit, nowait: bit },
    ExchangeDeleteOk = (40, 21, "exchange.delete-ok") {},
    ExchangeBind = (40, 30, "exchange.bind") { ticket: u16, destination: shortstr, source: shortstr, routing_key: shortstr, nowait: bit, arguments: table },
    ExchangeBindOk = (40, 31, "exchange.bind-ok") {},
    ExchangeUnbind = (40, 40, "exchange.unbind") { ticket: u16, destination: shortstr, source: shortstr, routing_key: shortstr, nowait: bit, arguments: table },
    ExchangeUnbindOk = (40, 51, "exchange.unbind-ok") {},
    QueueDeclare = (50, 10, "queue.declare") { ticket: u16, queue: shortstr, passive: bit, durable: bit, exclusive: bit, auto_delete: bit, nowait: bit, arguments: table },
    QueueDeclareOk = (50, 11, "queue.declare-ok") { queue: shortstr, message_count: u32, consumer_count: u32 },
    QueueBind = (50, 20, "queue.bind") { ticket: u16, queue: shortstr, exchange: shortstr, routing_key: shortstr, nowait: bit, arguments: table },
    QueueBindOk = (50, 21, "queue.bind-ok") {},
    QueuePurge = (50, 30, "queue.purge") { ticket: u16, queue: shortstr, nowait: bit },
    QueuePurgeOk = (50, 31, "queue.purge-ok") { message_count: u32 },
    QueueDelete = (50, 40, "queue.delete") { ticket: u16, queue: shortstr, if_unused: bit, if_empty: bit, nowait: bit },
    QueueDeleteOk = (50, 41, "queue.delete-ok") { message_count: u32 },
    QueueUnbind = (50, 50, "queue.unbind") { ticket: u16, queue: shortstr, exchange: shortstr, routing_key: shortstr, arguments: table },
    QueueUnbindOk = (50, 51, "queue.unbind-ok") {},
    BasicQos = (60, 10, "basic.qos") { prefetch_size: u32, prefetch_count: u16, global: bit },
    BasicQosOk = (60, 11, "basic.qos-ok") {},
    BasicConsume = (60, 20, "basic.consume") { ticket: u16, queue: shortstr, consumer_tag: shortstr, no_local: bit, no_ack: bit, exclusive: bit, nowait: bit, arguments: table },
    BasicConsumeOk = (60, 21, "basic.consume-ok") { consumer_tag: shortstr },
    BasicCancel = (60, 30, "basic.cancel") { consumer_tag: shortstr, nowait: bit },
    BasicCancelOk = (60, 31, "basic.cancel-ok") { consumer_tag: shortstr },
    BasicPublish = (60, 40, "basic.publish") { ticket: u16, exchange: shortstr, routing_key: shortstr, mandatory: bit, immediate: bit },
    BasicReturn = (60, 50, "basic.return") { reply_code: u16, reply_text: shortstr, exchange: shortstr, routing_key: shortstr },
    BasicDeliver = (60, 60, "basic.deliver") { consumer_tag: shortstr, delivery_tag: u64, redelivered: bit, exchange: shortstr, routing_key: shortstr },
    BasicGet = (60, 70, "basic.get") { ticket: u16, queue: shortstr, no_ack: bit },
    BasicGetOk = (60, 71, "basic.get-ok") { delivery_tag: u64, redelivered: bit, exchange: shortstr, routing_key: shortstr, message_count: u32 },
    BasicGetEmpty = (60, 72, "basic.get-empty") { cluster_id: shortstr },
    BasicAck = (60, 80, "basic.ack") { delivery_tag: u64, multiple: bit },
    BasicReject = (60, 90, "basic.reject") { delivery_tag: u64, requeue: bit },
    BasicRecoverAsync = (60, 100, "basic.recover-async") { requeue: bit },
    BasicRecover = (60, 110, "basic.recover") { requeue: bit },
    BasicRecoverOk = (60, 111, "basic.recover-ok") {},
    BasicNack = (60, 120, "basic.nack") { delivery_tag: u64, multiple: bit, requeue: bit },
    ConfirmSelect = (85, 10, "confirm.select") { nowait: bit },
    ConfirmSelectOk = (85, 11, "confirm.select-ok") {},
    TxSelect = (90, 10, "tx.select") {},
    TxSelectOk = (90, 11, "tx.select-ok") {},
    TxCommit = (90, 20, "tx.commit") {},
    TxCommitOk = (90, 21, "tx.commit-ok") {},
    TxRollback = (90, 30, "tx.rollback") {},
    TxRollbackOk = (90, 31, "tx.rollback-ok") {},
}

impl Method {
    /// Whether the method is followed by content (header + body frames).
    pub fn has_content(&self) -> bool {
        matches!(
            self,
            Method::BasicPublish(_)
                | Method::BasicReturn(_)
                | Method::BasicDeliver(_)
                | Method::BasicGetOk(_)
        )
    }
}

// ---- content header ----

/// The basic class's content properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BasicProperties {
    #[allow(missing_docs)]
    pub content_type: Option<String>,
    #[allow(missing_docs)]
    pub content_encoding: Option<String>,
    #[allow(missing_docs)]
    pub headers: Option<Table>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    #[allow(missing_docs)]
    pub priority: Option<u8>,
    #[allow(missing_docs)]
    pub correlation_id: Option<String>,
    #[allow(missing_docs)]
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<String>,
    #[allow(missing_docs)]
    pub message_id: Option<String>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    #[allow(missing_docs)]
    pub kind: Option<String>,
    #[allow(missing_docs)]
    pub user_id: Option<String>,
    #[allow(missing_docs)]
    pub app_id: Option<String>,
    #[allow(missing_docs)]
    pub cluster_id: Option<String>,
}

impl BasicProperties {
    /// Decodes the property list (after class, weight and body size).
    ///
    /// # Errors
    /// [`DecodeError::Syntax`].
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut flags = r.u16()?;
        let first = flags;
        while flags & 1 == 1 {
            flags = r.u16()?;
        }
        let f = first;
        let mut p = BasicProperties::default();
        let has = |bit: u16| f & (1 << bit) != 0;
        if has(15) {
            p.content_type = Some(r.shortstr()?);
        }
        if has(14) {
            p.content_encoding = Some(r.shortstr()?);
        }
        if has(13) {
            p.headers = Some(r.table()?);
        }
        if has(12) {
            p.delivery_mode = Some(r.u8()?);
        }
        if has(11) {
            p.priority = Some(r.u8()?);
        }
        if has(10) {
            p.correlation_id = Some(r.shortstr()?);
        }
        if has(9) {
            p.reply_to = Some(r.shortstr()?);
        }
        if has(8) {
            p.expiration = Some(r.shortstr()?);
        }
        if has(7) {
            p.message_id = Some(r.shortstr()?);
        }
        if has(6) {
            p.timestamp = Some(r.u64()?);
        }
        if has(5) {
            p.kind = Some(r.shortstr()?);
        }
        if has(4) {
            p.user_id = Some(r.shortstr()?);
        }
        if has(3) {
            p.app_id = Some(r.shortstr()?);
        }
        if has(2) {
            p.cluster_id = Some(r.shortstr()?);
        }
        Ok(p)
    }

    /// Appends the flags and the present properties.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut flags = 0u16;
        let set = |b: bool, bit: u16, f: &mut u16| {
            if b {
                *f |= 1 << bit;
            }
        };
        set(self.content_type.is_some(), 15, &mut flags);
        set(self.content_encoding.is_some(), 14, &mut flags);
        set(self.headers.is_some(), 13, &mut flags);
        set(self.delivery_mode.is_some(), 12, &mut flags);
        set(self.priority.is_some(), 11, &mut flags);
        set(self.correlation_id.is_some(), 10, &mut flags);
        set(self.reply_to.is_some(), 9, &mut flags);
        set(self.expiration.is_some(), 8, &mut flags);
        set(self.message_id.is_some(), 7, &mut flags);
        set(self.timestamp.is_some(), 6, &mut flags);
        set(self.kind.is_some(), 5, &mut flags);
        set(self.user_id.is_some(), 4, &mut flags);
        set(self.app_id.is_some(), 3, &mut flags);
        set(self.cluster_id.is_some(), 2, &mut flags);
        out.put_u16(flags);
        let mut w = Writer::new(out);
        let s = |w: &mut Writer<'_>, v: &Option<String>| {
            if let Some(v) = v {
                w.shortstr(v);
            }
        };
        s(&mut w, &self.content_type);
        s(&mut w, &self.content_encoding);
        if let Some(h) = &self.headers {
            w.table(h);
        }
        if let Some(v) = &self.delivery_mode {
            w.u8(v);
        }
        if let Some(v) = &self.priority {
            w.u8(v);
        }
        s(&mut w, &self.correlation_id);
        s(&mut w, &self.reply_to);
        s(&mut w, &self.expiration);
        s(&mut w, &self.message_id);
        if let Some(v) = &self.timestamp {
            w.u64(v);
        }
        s(&mut w, &self.kind);
        s(&mut w, &self.user_id);
        s(&mut w, &self.app_id);
        s(&mut w, &self.cluster_id);
    }
}

/// A decoded content header frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    /// Class id (60 for basic).
    pub class_id: u16,
    /// Total body size announced.
    pub body_size: u64,
    /// The properties.
    pub properties: BasicProperties,
}

impl ContentHeader {
    /// Decodes a content header frame payload.
    ///
    /// # Errors
    /// [`DecodeError::Syntax`].
    pub fn decode(payload: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let class_id = r.u16()?;
        let _weight = r.u16()?;
        let body_size = r.u64()?;
        let properties = BasicProperties::decode(&mut r)?;
        Ok(ContentHeader {
            class_id,
            body_size,
            properties,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i8>().prop_map(Value::I8),
            any::<u8>().prop_map(Value::U8),
            any::<i16>().prop_map(Value::I16),
            any::<u16>().prop_map(Value::U16),
            any::<i32>().prop_map(Value::I32),
            any::<u32>().prop_map(Value::U32),
            any::<i64>().prop_map(Value::I64),
            any::<u64>().prop_map(Value::Timestamp),
            (any::<u8>(), any::<u32>()).prop_map(|(a, b)| Value::Decimal(a, b)),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| Value::LongStr(v.into())),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| Value::ByteArray(v.into())),
            Just(Value::Void),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,8}", inner), 0..4).prop_map(Value::Table),
            ]
        })
    }

    proptest! {
        #[test]
        fn tables_round_trip(t in proptest::collection::vec(("[a-zA-Z0-9-]{0,12}", value()), 0..6)) {
            let mut out = BytesMut::new();
            encode_table(&mut out, &t);
            prop_assert_eq!(decode_table(out.freeze()).unwrap(), t);
        }

        #[test]
        fn frames_need_more_bytes_never_error(data in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..64) {
            let mut out = BytesMut::new();
            encode_frame(&mut out, FRAME_BODY, 7, &data);
            let full = out.clone();
            let cut = cut.min(full.len() - 1);
            let mut part = BytesMut::from(&full[..cut]);
            prop_assert_eq!(decode_frame(&mut part, 4096).unwrap(), None);
            let mut all = full.clone();
            let f = decode_frame(&mut all, 4096).unwrap().unwrap();
            prop_assert_eq!(f.channel, 7);
            prop_assert_eq!(&f.payload[..], &data[..]);
            prop_assert!(all.is_empty());
        }

        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let b = Bytes::from(data);
            let _ = Method::decode(b.clone());
            let _ = ContentHeader::decode(b.clone());
            let mut buf = BytesMut::from(&b[..]);
            let _ = decode_frame(&mut buf, 4096);
        }
    }

    #[test]
    fn methods_round_trip_with_bits() {
        let m = Method::QueueDeclare(QueueDeclare {
            ticket: 0,
            queue: "q".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: true,
            nowait: true,
            arguments: vec![("x-message-ttl".into(), Value::I32(5))],
        });
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(Method::decode(out.freeze()).unwrap(), m);
        let m = Method::BasicNack(BasicNack {
            delivery_tag: 9,
            multiple: true,
            requeue: false,
        });
        let mut out = BytesMut::new();
        m.encode(&mut out);
        assert_eq!(Method::decode(out.freeze()).unwrap(), m);
    }

    #[test]
    fn unknown_method_and_oversized_frame() {
        let mut out = BytesMut::new();
        out.put_u16(99);
        out.put_u16(1);
        assert_eq!(
            Method::decode(out.freeze()),
            Err(DecodeError::UnknownMethod {
                class: 99,
                method: 1
            })
        );
        let mut buf = BytesMut::new();
        encode_frame(&mut buf, FRAME_BODY, 1, &[0u8; 5000]);
        assert!(matches!(
            decode_frame(&mut buf, 4096),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn properties_round_trip() {
        let p = BasicProperties {
            content_type: Some("text/plain".into()),
            headers: Some(vec![("a".into(), Value::str("b"))]),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            expiration: Some("100".into()),
            message_id: Some("m".into()),
            timestamp: Some(12),
            kind: Some("t".into()),
            user_id: Some("guest".into()),
            app_id: Some("app".into()),
            cluster_id: Some("cl".into()),
            content_encoding: Some("gzip".into()),
        };
        let mut out = BytesMut::new();
        p.encode(&mut out);
        let mut r = Reader::new(out.freeze());
        assert_eq!(BasicProperties::decode(&mut r).unwrap(), p);
    }
}

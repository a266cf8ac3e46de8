//! One AMQP connection: handshake (protocol header, SASL, tune, open),
//! channels and their methods, content assembly, deliveries, confirms,
//! heartbeats and the close handshakes.
//!
//! The connection task owns all channel state. Queue dispatchers and
//! publish pipelines talk to it through an unbounded event channel (their
//! volume is bounded by prefetch credit and pipeline depth); a separate
//! writer task owns the socket's write half and sends heartbeats when the
//! connection is otherwise idle, so a slow reader never stalls this task.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use handler_api::{Connection, HandlerError};
use mapping::amqp::ReplyCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::codec::*;
use crate::message::Msg;
use crate::publish::{self, PubItem};
use crate::queue::{ConnEvent, ConnShared, Consumer, Flow, Queue, QueueArgs, QueueDecl, Ready};
use crate::vhost::{Binding, Dest, ExKind, Exchange, VHost};
use crate::Shared;

type Stream = Box<dyn handler_api::AsyncStream>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A protocol exception raised by a method.
#[derive(Debug)]
enum Exc {
    Channel(ReplyCode, String),
    Conn(ReplyCode, String),
}

fn chan(code: ReplyCode, text: impl std::fmt::Display) -> Exc {
    Exc::Channel(code, format!("{} - {}", code.text(), text))
}

fn conn_exc(code: ReplyCode, text: impl std::fmt::Display) -> Exc {
    Exc::Conn(code, format!("{} - {}", code.text(), text))
}

fn broker_exc(e: &broker::BrokerError) -> Exc {
    let code = mapping::amqp::reply_for_broker_error(e);
    if code.is_connection_error() {
        conn_exc(code, e)
    } else {
        chan(code, e)
    }
}

enum WriteCmd {
    Data(Bytes, usize),
    Heartbeat(u16),
}

#[derive(Debug, Default, Clone, Copy)]
struct Caps {
    consumer_cancel_notify: bool,
    connection_blocked: bool,
}

struct Pending {
    method: BasicPublish,
    header: Option<ContentHeader>,
    body: BytesMut,
}

struct Unacked {
    queue: Arc<Queue>,
    ready: Ready,
    consumer: Option<Arc<Consumer>>,
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    Reject,
}

struct TxPublish {
    exchange: String,
    mandatory: bool,
    msg: Msg,
}

#[derive(Default)]
struct Channel {
    closing: bool,
    pending: Option<Pending>,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<String, (Arc<Consumer>, Arc<Queue>)>,
    flow: Arc<Mutex<Flow>>,
    consumer_prefetch: u16,
    confirm: bool,
    next_seq: u64,
    tx: bool,
    tx_publishes: Vec<TxPublish>,
    /// Settlements of the open transaction. Their deliveries have left
    /// `unacked` (a tag cannot be settled twice, basic.recover does not
    /// requeue them); rollback puts them back, commit applies them.
    tx_settles: Vec<(Settle, Vec<(u64, Unacked)>)>,
    pipeline: Option<mpsc::Sender<PubItem>>,
    last_queue: String,
}

impl Channel {
    /// Puts the deliveries settled in the open transaction back among the
    /// unacknowledged ones (tx.rollback, or the channel going away).
    fn restore_tx_settles(&mut self) {
        for (_, items) in std::mem::take(&mut self.tx_settles) {
            self.unacked.extend(items);
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    id: u64,
    wtx: mpsc::UnboundedSender<WriteCmd>,
    events_tx: mpsc::UnboundedSender<ConnEvent>,
    cs: Arc<ConnShared>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    vhost: Arc<VHost>,
    user: String,
    caps: Caps,
    channels: HashMap<u16, Channel>,
    out: BytesMut,
    out_deliveries: usize,
    closing: bool,
    done: bool,
    exclusive: Vec<String>,
}

/// Serves one connection until it ends.
pub(crate) async fn serve(shared: Arc<Shared>, conn: Connection) -> Result<(), HandlerError> {
    let (mut rd, mut wr) = tokio::io::split(conn.stream);
    let mut inbuf = BytesMut::with_capacity(8 * 1024);
    // Protocol header.
    let hdr = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        while inbuf.len() < 8 {
            if rd.read_buf(&mut inbuf).await? == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
        }
        Ok(true)
    })
    .await;
    match hdr {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e.into()),
    }
    if &inbuf[..8] != PROTOCOL_HEADER {
        wr.write_all(PROTOCOL_HEADER).await?;
        let _ = wr.shutdown().await;
        return Ok(());
    }
    let _ = inbuf.split_to(8);
    let hs = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&shared, &mut rd, &mut wr, &mut inbuf),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let Some(hs) = hs else { return Ok(()) };
    tracing::Span::current().record("client_id", tracing::field::display(&hs.user));

    let (wtx, wrx) = mpsc::unbounded_channel();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let cs = Arc::new(ConnShared::default());
    let writer = tokio::spawn(writer(wr, wrx, cs.clone(), events_tx.clone()));
    let _ = wtx.send(WriteCmd::Heartbeat(hs.heartbeat));
    let id = shared.conn_ids.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("manifold_amqp_connections_open").increment(1.0);
    let mut c = Conn {
        shared,
        id,
        wtx,
        events_tx,
        cs,
        frame_max: hs.frame_max,
        channel_max: hs.channel_max,
        heartbeat: hs.heartbeat,
        vhost: hs.vhost,
        user: hs.user,
        caps: hs.caps,
        channels: HashMap::new(),
        out: hs.out,
        out_deliveries: 0,
        closing: false,
        done: false,
        exclusive: Vec::new(),
    };
    let res = c
        .run(&mut rd, &mut inbuf, &mut events_rx, &conn.shutdown)
        .await;
    c.cleanup().await;
    c.flush();
    drop(c);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    metrics::gauge!("manifold_amqp_connections_open").decrement(1.0);
    res
}

struct Handshake {
    vhost: Arc<VHost>,
    user: String,
    caps: Caps,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    out: BytesMut,
}

async fn read_method(
    rd: &mut ReadHalf<Stream>,
    inbuf: &mut BytesMut,
    frame_max: u32,
) -> Result<Option<Method>, Exc> {
    loop {
        match decode_frame(inbuf, frame_max) {
            Ok(Some(f)) => {
                if f.kind == FRAME_HEARTBEAT {
                    continue;
                }
                if f.kind != FRAME_METHOD || f.channel != 0 {
                    return Err(conn_exc(
                        ReplyCode::UnexpectedFrame,
                        "expected a connection method",
                    ));
                }
                return match Method::decode(f.payload) {
                    Ok(m) => Ok(Some(m)),
                    Err(DecodeError::UnknownMethod { class, method }) => Err(conn_exc(
                        ReplyCode::NotImplemented,
                        format!("unknown method {class}.{method}"),
                    )),
                    Err(e) => Err(conn_exc(ReplyCode::SyntaxError, e)),
                };
            }
            Ok(None) => {}
            Err(e) => return Err(conn_exc(ReplyCode::FrameError, e)),
        }
        match rd.read_buf(inbuf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

fn server_properties() -> Table {
    let t = |b: bool| Value::Bool(b);
    vec![
        ("product".into(), Value::str("Manifold")),
        ("version".into(), Value::str(env!("CARGO_PKG_VERSION"))),
        ("platform".into(), Value::str("Rust")),
        (
            "capabilities".into(),
            Value::Table(vec![
                ("publisher_confirms".into(), t(true)),
                ("exchange_exchange_bindings".into(), t(true)),
                ("basic.nack".into(), t(true)),
                ("consumer_cancel_notify".into(), t(true)),
                ("connection.blocked".into(), t(true)),
                ("authentication_failure_close".into(), t(true)),
                ("per_consumer_qos".into(), t(true)),
            ]),
        ),
        ("cluster_name".into(), Value::str("manifold")),
    ]
}

fn parse_credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|&b| b == 0);
            let _authz = parts.next()?;
            let user = parts.next()?;
            let pass = parts.next()?;
            Some((
                String::from_utf8(user.to_vec()).ok()?,
                String::from_utf8(pass.to_vec()).ok()?,
            ))
        }
        "AMQPLAIN" => {
            let mut b = BytesMut::with_capacity(response.len() + 4);
            b.extend_from_slice(&(response.len() as u32).to_be_bytes());
            b.extend_from_slice(response);
            let t = decode_table(b.freeze()).ok()?;
            let user = table_get(&t, "LOGIN")?.as_str()?.to_owned();
            let pass = table_get(&t, "PASSWORD")?.as_str()?.to_owned();
            Some((user, pass))
        }
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn send_now(wr: &mut WriteHalf<Stream>, out: &mut BytesMut) -> std::io::Result<()> {
    if !out.is_empty() {
        wr.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

async fn close_handshake(wr: &mut WriteHalf<Stream>, code: ReplyCode, text: String) {
    let mut out = BytesMut::new();
    encode_method_frame(
        &mut out,
        0,
        &Method::ConnectionClose(ConnectionClose {
            reply_code: code.code(),
            reply_text: text,
            class_id: 0,
            method_id: 0,
        }),
    );
    let _ = wr.write_all(&out).await;
    let _ = wr.shutdown().await;
}

async fn handshake(
    shared: &Arc<Shared>,
    rd: &mut ReadHalf<Stream>,
    wr: &mut WriteHalf<Stream>,
    inbuf: &mut BytesMut,
) -> Result<Option<Handshake>, HandlerError> {
    let cfg = &shared.config;
    let mut out = BytesMut::new();
    encode_method_frame(
        &mut out,
        0,
        &Method::ConnectionStart(ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: Bytes::from_static(b"PLAIN AMQPLAIN"),
            locales: Bytes::from_static(b"en_US"),
        }),
    );
    send_now(wr, &mut out).await?;
    let fail = |e: Exc| match e {
        Exc::Conn(c, t) | Exc::Channel(c, t) => (c, t),
    };
    let start_ok = match read_method(rd, inbuf, FRAME_MIN_SIZE).await {
        Ok(Some(Method::ConnectionStartOk(m))) => m,
        Ok(None) => return Ok(None),
        Ok(Some(other)) => {
            let (c, t) = fail(conn_exc(
                ReplyCode::CommandInvalid,
                format!("expected connection.start-ok, got {}", other.name()),
            ));
            close_handshake(wr, c, t).await;
            return Ok(None);
        }
        Err(e) => {
            let (c, t) = fail(e);
            close_handshake(wr, c, t).await;
            return Ok(None);
        }
    };
    let mut caps = Caps::default();
    if let Some(Value::Table(c)) = table_get(&start_ok.client_properties, "capabilities") {
        let on = |k: &str| matches!(table_get(c, k), Some(Value::Bool(true)));
        caps.consumer_cancel_notify = on("consumer_cancel_notify");
        caps.connection_blocked = on("connection.blocked");
    }
    let creds = parse_credentials(&start_ok.mechanism, &start_ok.response);
    let user = match creds {
        Some((u, p))
            if cfg
                .users
                .iter()
                .any(|x| x.name == u && constant_time_eq(x.password.as_bytes(), p.as_bytes())) =>
        {
            u
        }
        Some((u, _)) => {
            tracing::info!(user = %u, "login refused");
            let text = format!(
                "ACCESS_REFUSED - Login was refused using authentication mechanism {}. For details see the broker logfile.",
                start_ok.mechanism
            );
            close_handshake(wr, ReplyCode::AccessRefused, text).await;
            return Ok(None);
        }
        None => {
            let text = if start_ok.mechanism == "PLAIN" || start_ok.mechanism == "AMQPLAIN" {
                "ACCESS_REFUSED - malformed credentials".to_owned()
            } else {
                format!(
                    "ACCESS_REFUSED - unsupported authentication mechanism {}",
                    start_ok.mechanism
                )
            };
            close_handshake(wr, ReplyCode::AccessRefused, text).await;
            return Ok(None);
        }
    };
    encode_method_frame(
        &mut out,
        0,
        &Method::ConnectionTune(ConnectionTune {
            channel_max: cfg.channel_max,
            frame_max: cfg.frame_max,
            heartbeat: cfg.heartbeat,
        }),
    );
    send_now(wr, &mut out).await?;
    let tune = match read_method(rd, inbuf, FRAME_MIN_SIZE).await {
        Ok(Some(Method::ConnectionTuneOk(m))) => m,
        Ok(None) => return Ok(None),
        Ok(Some(other)) => {
            close_handshake(
                wr,
                ReplyCode::CommandInvalid,
                format!(
                    "COMMAND_INVALID - expected connection.tune-ok, got {}",
                    other.name()
                ),
            )
            .await;
            return Ok(None);
        }
        Err(e) => {
            let (c, t) = fail(e);
            close_handshake(wr, c, t).await;
            return Ok(None);
        }
    };
    let frame_max = if tune.frame_max == 0 {
        cfg.frame_max
    } else {
        tune.frame_max
    };
    if frame_max < FRAME_MIN_SIZE || frame_max > cfg.frame_max {
        close_handshake(
            wr,
            ReplyCode::NotAllowed,
            format!(
                "NOT_ALLOWED - frame_max={frame_max} outside [{FRAME_MIN_SIZE}, {}]",
                cfg.frame_max
            ),
        )
        .await;
        return Ok(None);
    }
    let channel_max = if tune.channel_max == 0 {
        cfg.channel_max
    } else {
        tune.channel_max
    };
    if cfg.channel_max != 0 && channel_max > cfg.channel_max {
        close_handshake(
            wr,
            ReplyCode::NotAllowed,
            format!(
                "NOT_ALLOWED - channel_max={channel_max} higher than the maximum allowed value {}",
                cfg.channel_max
            ),
        )
        .await;
        return Ok(None);
    }
    let open = match read_method(rd, inbuf, frame_max).await {
        Ok(Some(Method::ConnectionOpen(m))) => m,
        Ok(None) => return Ok(None),
        Ok(Some(other)) => {
            close_handshake(
                wr,
                ReplyCode::CommandInvalid,
                format!(
                    "COMMAND_INVALID - expected connection.open, got {}",
                    other.name()
                ),
            )
            .await;
            return Ok(None);
        }
        Err(e) => {
            let (c, t) = fail(e);
            close_handshake(wr, c, t).await;
            return Ok(None);
        }
    };
    let vhost = match shared.vhost(&open.virtual_host, cfg.create_vhosts).await {
        Ok(Some(v)) => v,
        Ok(None) | Err(_) => {
            close_handshake(
                wr,
                ReplyCode::NotAllowed,
                format!("NOT_ALLOWED - vhost {} not found", open.virtual_host),
            )
            .await;
            return Ok(None);
        }
    };
    encode_method_frame(
        &mut out,
        0,
        &Method::ConnectionOpenOk(ConnectionOpenOk::default()),
    );
    Ok(Some(Handshake {
        vhost,
        user,
        caps,
        frame_max,
        // 0 is "no limit" in the spec.
        channel_max: if channel_max == 0 {
            u16::MAX
        } else {
            channel_max
        },
        heartbeat: tune.heartbeat,
        out,
    }))
}

async fn writer(
    mut wr: WriteHalf<Stream>,
    mut rx: mpsc::UnboundedReceiver<WriteCmd>,
    cs: Arc<ConnShared>,
    events: mpsc::UnboundedSender<ConnEvent>,
) {
    let mut idle: Option<Duration> = None;
    let mut heartbeat = BytesMut::new();
    encode_frame(&mut heartbeat, FRAME_HEARTBEAT, 0, &[]);
    loop {
        let cmd = match idle {
            Some(d) => tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep(d) => {
                    if wr.write_all(&heartbeat).await.is_err() { break; }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match cmd {
            None => break,
            Some(WriteCmd::Heartbeat(s)) => {
                idle = (s > 0).then(|| Duration::from_millis(u64::from(s) * 500));
            }
            Some(WriteCmd::Data(b, n)) => {
                let ok = wr.write_all(&b).await.is_ok();
                if n > 0 {
                    cs.pending.fetch_sub(n, Ordering::AcqRel);
                    if cs.stalled.swap(false, Ordering::AcqRel) {
                        let _ = events.send(ConnEvent::Drained);
                    }
                }
                if !ok {
                    // Keep draining so pending counts stay right; the
                    // reader side notices the dead socket.
                    while let Some(c) = rx.recv().await {
                        if let WriteCmd::Data(_, n) = c {
                            cs.pending.fetch_sub(n, Ordering::AcqRel);
                        }
                    }
                    return;
                }
            }
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

impl Conn {
    fn flush(&mut self) {
        if !self.out.is_empty() {
            let b = self.out.split().freeze();
            let n = std::mem::take(&mut self.out_deliveries);
            if self.wtx.send(WriteCmd::Data(b, n)).is_err() && n > 0 {
                self.cs.pending.fetch_sub(n, Ordering::AcqRel);
            }
        }
    }

    fn send(&mut self, channel: u16, m: impl Into<Method>) {
        encode_method_frame(&mut self.out, channel, &m.into());
    }

    fn send_close(&mut self, code: ReplyCode, text: String, class_id: u16, method_id: u16) {
        self.send(
            0,
            ConnectionClose {
                reply_code: code.code(),
                reply_text: text,
                class_id,
                method_id,
            },
        );
        self.closing = true;
    }

    async fn run(
        &mut self,
        rd: &mut ReadHalf<Stream>,
        inbuf: &mut BytesMut,
        events: &mut mpsc::UnboundedReceiver<ConnEvent>,
        shutdown: &handler_api::CancellationToken,
    ) -> Result<(), HandlerError> {
        let mut last_read = Instant::now();
        let hb = Duration::from_secs(u64::from(self.heartbeat));
        let mut hb_check = tokio::time::interval(if self.heartbeat > 0 {
            hb / 2
        } else {
            Duration::from_secs(3600)
        });
        let mut close_deadline: Option<tokio::time::Instant> = None;
        // Frames already buffered after the handshake.
        if let Err(e) = self.process_input(inbuf).await {
            self.fail(e);
        }
        loop {
            self.flush();
            if self.done {
                return Ok(());
            }
            if self.closing && close_deadline.is_none() {
                close_deadline = Some(tokio::time::Instant::now() + CLOSE_TIMEOUT);
            }
            let deadline = close_deadline;
            tokio::select! {
                _ = shutdown.cancelled(), if !self.closing => {
                    self.send_close(ReplyCode::ConnectionForced, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'".into(), 0, 0);
                }
                ev = events.recv() => {
                    if let Some(ev) = ev {
                        self.handle_event(ev).await;
                    }
                }
                r = rd.read_buf(inbuf) => {
                    match r {
                        Ok(0) => return Ok(()),
                        Err(e) => return match e.kind() {
                            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionAborted => Ok(()),
                            _ => Err(e.into()),
                        },
                        Ok(_) => {
                            last_read = Instant::now();
                            if let Err(e) = self.process_input(inbuf).await {
                                self.fail(e);
                            }
                        }
                    }
                }
                _ = hb_check.tick() => {
                    if self.heartbeat > 0 && last_read.elapsed() > hb * 2 {
                        tracing::info!(timeout_s = self.heartbeat, "missed heartbeats from client; closing");
                        return Ok(());
                    }
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return Ok(());
                }
            }
        }
    }

    fn fail(&mut self, e: Exc) {
        let (code, text) = match e {
            Exc::Conn(c, t) | Exc::Channel(c, t) => (c, t),
        };
        if !self.closing {
            tracing::debug!(code = code.code(), text = %text, "closing connection");
            self.send_close(code, text, 0, 0);
        }
    }

    async fn process_input(&mut self, inbuf: &mut BytesMut) -> Result<(), Exc> {
        loop {
            if self.done {
                return Ok(());
            }
            let f = match decode_frame(inbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    inbuf.clear();
                    return Err(conn_exc(ReplyCode::FrameError, e));
                }
            };
            if let Err(e) = self.handle_frame(f).await {
                // Discard what follows a connection error.
                inbuf.clear();
                return Err(e);
            }
        }
    }

    async fn handle_frame(&mut self, f: Frame) -> Result<(), Exc> {
        if f.kind == FRAME_HEARTBEAT {
            if f.channel != 0 {
                return Err(conn_exc(
                    ReplyCode::FrameError,
                    "heartbeat frame on a non-zero channel",
                ));
            }
            return Ok(());
        }
        if self.closing {
            // Only close / close-ok matter once we sent connection.close.
            if f.kind == FRAME_METHOD && f.channel == 0 {
                match Method::decode(f.payload) {
                    Ok(Method::ConnectionCloseOk(_)) => self.done = true,
                    Ok(Method::ConnectionClose(_)) => {
                        self.send(0, ConnectionCloseOk {});
                        self.done = true;
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        if f.channel == 0 {
            if f.kind != FRAME_METHOD {
                return Err(conn_exc(
                    ReplyCode::UnexpectedFrame,
                    "content frame on channel 0",
                ));
            }
            let m = decode_method(f.payload)?;
            return self.connection_method(m).await;
        }
        let ch_id = f.channel;
        match f.kind {
            FRAME_METHOD => {
                let m = decode_method(f.payload)?;
                let ids = m.ids();
                let Some(ch) = self.channels.get(&ch_id) else {
                    if let Method::ChannelOpen(_) = m {
                        // As RabbitMQ: channel_max bounds how many channels
                        // are open, whatever their numbers.
                        let open = self.channels.len();
                        if open >= usize::from(self.channel_max) {
                            return Err(conn_exc(
                                ReplyCode::NotAllowed,
                                format!("number of channels opened ({open}) has reached the negotiated channel_max ({})", self.channel_max),
                            ));
                        }
                        self.open_channel(ch_id);
                        return Ok(());
                    }
                    return Err(conn_exc(
                        ReplyCode::ChannelError,
                        format!(
                            "expected 'channel.open' on channel {ch_id}, got '{}'",
                            m.name()
                        ),
                    ));
                };
                if ch.closing {
                    match m {
                        Method::ChannelCloseOk(_) => {
                            self.channels.remove(&ch_id);
                        }
                        Method::ChannelClose(_) => {
                            self.send(ch_id, ChannelCloseOk {});
                        }
                        _ => {}
                    }
                    return Ok(());
                }
                if ch.pending.is_some() {
                    return Err(conn_exc(
                        ReplyCode::UnexpectedFrame,
                        format!("expected content header for class 60, got non content header frame instead ({})", m.name()),
                    ));
                }
                match self.channel_method(ch_id, m).await {
                    Ok(()) => Ok(()),
                    Err(Exc::Channel(code, text)) => {
                        self.channel_exception(ch_id, code, text, ids).await;
                        Ok(())
                    }
                    Err(Exc::Conn(code, text)) => {
                        self.send_close(code, text, ids.0, ids.1);
                        Ok(())
                    }
                }
            }
            FRAME_HEADER | FRAME_BODY => match self.content_frame(ch_id, f).await {
                Err(Exc::Channel(code, text)) => {
                    self.channel_exception(ch_id, code, text, (60, 40)).await;
                    Ok(())
                }
                other => other,
            },
            _ => Err(conn_exc(ReplyCode::FrameError, "unknown frame type")),
        }
    }

    async fn content_frame(&mut self, ch_id: u16, f: Frame) -> Result<(), Exc> {
        let max = self.shared.max_message_bytes;
        let Some(ch) = self.channels.get_mut(&ch_id) else {
            return Err(conn_exc(
                ReplyCode::ChannelError,
                format!("content frame on closed channel {ch_id}"),
            ));
        };
        if ch.closing {
            return Ok(());
        }
        let Some(p) = ch.pending.as_mut() else {
            return Err(conn_exc(
                ReplyCode::UnexpectedFrame,
                "content frame without basic.publish",
            ));
        };
        if f.kind == FRAME_HEADER {
            if p.header.is_some() {
                return Err(conn_exc(
                    ReplyCode::UnexpectedFrame,
                    "expected content body, got content header",
                ));
            }
            let h = ContentHeader::decode(f.payload)
                .map_err(|e| conn_exc(ReplyCode::SyntaxError, e))?;
            if h.class_id != 60 {
                return Err(conn_exc(
                    ReplyCode::FrameError,
                    format!("content header for class {} (expected 60)", h.class_id),
                ));
            }
            if h.body_size > max {
                let size = h.body_size;
                ch.pending = None;
                // Swallow the body frames that follow by closing the
                // channel (RabbitMQ does the same).
                return self
                    .channel_exception_async(
                        ch_id,
                        ReplyCode::PreconditionFailed,
                        format!("PRECONDITION_FAILED - message size {size} is larger than configured max size {max}"),
                        (60, 40),
                    )
                    .await;
            }
            let done = h.body_size == 0;
            p.body.reserve(h.body_size.min(1 << 20) as usize);
            p.header = Some(h);
            if done {
                let p = ch.pending.take();
                if let Some(p) = p {
                    return self.complete_publish(ch_id, p).await;
                }
            }
            return Ok(());
        }
        let Some(h) = &p.header else {
            return Err(conn_exc(
                ReplyCode::UnexpectedFrame,
                "expected content header, got content body",
            ));
        };
        let total = p.body.len() as u64 + f.payload.len() as u64;
        if total > h.body_size {
            return Err(conn_exc(
                ReplyCode::FrameError,
                format!("content body exceeds the announced size {}", h.body_size),
            ));
        }
        p.body.extend_from_slice(&f.payload);
        if total == h.body_size {
            if let Some(p) = ch.pending.take() {
                return self.complete_publish(ch_id, p).await;
            }
        }
        Ok(())
    }

    async fn channel_exception_async(
        &mut self,
        ch: u16,
        code: ReplyCode,
        text: String,
        ids: (u16, u16),
    ) -> Result<(), Exc> {
        self.channel_exception(ch, code, text, ids).await;
        Ok(())
    }

    async fn channel_exception(
        &mut self,
        ch_id: u16,
        code: ReplyCode,
        text: String,
        ids: (u16, u16),
    ) {
        tracing::debug!(channel = ch_id, code = code.code(), text = %text, "channel exception");
        self.send(
            ch_id,
            ChannelClose {
                reply_code: code.code(),
                reply_text: text,
                class_id: ids.0,
                method_id: ids.1,
            },
        );
        if let Some(mut ch) = self.channels.remove(&ch_id) {
            self.release_channel(ch_id, &mut ch).await;
            let closed = Channel {
                closing: true,
                ..Channel::default()
            };
            self.channels.insert(ch_id, closed);
        }
    }

    fn open_channel(&mut self, id: u16) {
        self.channels.insert(
            id,
            Channel {
                next_tag: 1,
                next_seq: 1,
                ..Channel::default()
            },
        );
        self.send(
            id,
            ChannelOpenOk {
                channel_id: Bytes::new(),
            },
        );
    }

    /// Releases what a channel holds: consumers (auto-delete may follow)
    /// and unacknowledged messages (requeued).
    async fn release_channel(&mut self, ch_id: u16, ch: &mut Channel) {
        // Settlements of an uncommitted transaction are void.
        ch.restore_tx_settles();
        let mut auto_delete = Vec::new();
        for (tag, (_, q)) in ch.consumers.drain() {
            if q.remove_consumer(self.id, ch_id, &tag) {
                auto_delete.push(q.name.clone());
            }
        }
        let mut by_queue: Vec<(Arc<Queue>, Vec<Ready>)> = Vec::new();
        for (_, u) in std::mem::take(&mut ch.unacked) {
            if let Some(c) = &u.consumer {
                c.release(u.ready.msg.size());
            }
            match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
                Some((_, v)) => v.push(u.ready),
                None => by_queue.push((u.queue, vec![u.ready])),
            }
        }
        for (q, items) in by_queue {
            q.requeue(items);
        }
        ch.pipeline = None;
        for name in auto_delete {
            let vh = self.vhost.clone();
            self.shared.delete_queue(&vh, &name).await;
        }
    }

    async fn cleanup(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            if let Some(mut ch) = self.channels.remove(&id) {
                self.release_channel(id, &mut ch).await;
            }
        }
        for name in std::mem::take(&mut self.exclusive) {
            let vh = self.vhost.clone();
            if vh
                .queue(&name)
                .is_some_and(|q| q.exclusive_owner == Some(self.id))
            {
                self.shared.delete_queue(&vh, &name).await;
            }
        }
    }

    async fn connection_method(&mut self, m: Method) -> Result<(), Exc> {
        match m {
            Method::ConnectionClose(_) => {
                self.send(0, ConnectionCloseOk {});
                self.done = true;
                Ok(())
            }
            Method::ConnectionCloseOk(_) => {
                self.done = true;
                Ok(())
            }
            Method::ConnectionUpdateSecret(_) => {
                self.send(0, ConnectionUpdateSecretOk {});
                Ok(())
            }
            Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_) => Ok(()),
            other => Err(conn_exc(
                ReplyCode::CommandInvalid,
                format!("unexpected method {} on channel 0", other.name()),
            )),
        }
    }

    fn ch(&mut self, id: u16) -> &mut Channel {
        self.channels.entry(id).or_default()
    }

    fn vname(&self) -> String {
        self.vhost.name.clone()
    }

    fn resolve_queue_name(&mut self, ch: u16, name: &str) -> Result<String, Exc> {
        if name.is_empty() {
            let last = self.ch(ch).last_queue.clone();
            if last.is_empty() {
                return Err(chan(ReplyCode::NotFound, "no previously declared queue"));
            }
            return Ok(last);
        }
        Ok(name.to_owned())
    }

    /// The queue `name`, checking exclusive ownership.
    fn find_queue(&mut self, ch: u16, name: &str) -> Result<Arc<Queue>, Exc> {
        let name = self.resolve_queue_name(ch, name)?;
        let q = self.vhost.queue(&name).ok_or_else(|| {
            chan(
                ReplyCode::NotFound,
                format!("no queue '{}' in vhost '{}'", name, self.vname()),
            )
        })?;
        self.check_owner(&q)?;
        Ok(q)
    }

    fn check_owner(&self, q: &Queue) -> Result<(), Exc> {
        match q.exclusive_owner {
            Some(o) if o != self.id => Err(chan(
                ReplyCode::ResourceLocked,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    q.name, self.vhost.name
                ),
            )),
            _ => Ok(()),
        }
    }

    async fn channel_method(&mut self, ch: u16, m: Method) -> Result<(), Exc> {
        match m {
            Method::ChannelOpen(_) => Err(conn_exc(
                ReplyCode::ChannelError,
                format!("second 'channel.open' seen on channel {ch}"),
            )),
            Method::ChannelClose(_) => {
                if let Some(mut c) = self.channels.remove(&ch) {
                    self.release_channel(ch, &mut c).await;
                }
                self.send(ch, ChannelCloseOk {});
                Ok(())
            }
            Method::ChannelCloseOk(_) => Ok(()),
            Method::ChannelFlow(f) => {
                {
                    let c = self.ch(ch);
                    c.flow.lock().unwrap_or_else(|e| e.into_inner()).active = f.active;
                }
                self.wake_channel(ch);
                self.send(ch, ChannelFlowOk { active: f.active });
                Ok(())
            }
            Method::ChannelFlowOk(_) => Ok(()),
            Method::ExchangeDeclare(m) => self.exchange_declare(ch, m).await,
            Method::ExchangeDelete(m) => self.exchange_delete(ch, m).await,
            Method::ExchangeBind(m) => {
                self.bind_exchange(
                    true,
                    &m.source,
                    &m.destination,
                    &m.routing_key,
                    &m.arguments,
                )
                .await?;
                if !m.nowait {
                    self.send(ch, ExchangeBindOk {});
                }
                Ok(())
            }
            Method::ExchangeUnbind(m) => {
                self.bind_exchange(
                    false,
                    &m.source,
                    &m.destination,
                    &m.routing_key,
                    &m.arguments,
                )
                .await?;
                if !m.nowait {
                    self.send(ch, ExchangeUnbindOk {});
                }
                Ok(())
            }
            Method::QueueDeclare(m) => self.queue_declare(ch, m).await,
            Method::QueueBind(m) => {
                let q = self.find_queue(ch, &m.queue)?;
                self.bind_queue(true, &q, &m.exchange, &m.routing_key, &m.arguments)
                    .await?;
                if !m.nowait {
                    self.send(ch, QueueBindOk {});
                }
                Ok(())
            }
            Method::QueueUnbind(m) => {
                let q = self.find_queue(ch, &m.queue)?;
                self.bind_queue(false, &q, &m.exchange, &m.routing_key, &m.arguments)
                    .await?;
                self.send(ch, QueueUnbindOk {});
                Ok(())
            }
            Method::QueuePurge(m) => {
                let q = self.find_queue(ch, &m.queue)?;
                let n = q.purge().await;
                if !m.nowait {
                    self.send(
                        ch,
                        QueuePurgeOk {
                            message_count: n.min(u32::MAX as u64) as u32,
                        },
                    );
                }
                Ok(())
            }
            Method::QueueDelete(m) => {
                let name = self.resolve_queue_name(ch, &m.queue)?;
                let n = match self.vhost.queue(&name) {
                    None => 0,
                    Some(q) => {
                        self.check_owner(&q)?;
                        if m.if_unused && q.consumer_count() > 0 {
                            return Err(chan(
                                ReplyCode::PreconditionFailed,
                                format!("queue '{}' in vhost '{}' in use", name, self.vname()),
                            ));
                        }
                        if m.if_empty && q.message_count() > 0 {
                            return Err(chan(
                                ReplyCode::PreconditionFailed,
                                format!(
                                    "queue '{}' in vhost '{}' is not empty",
                                    name,
                                    self.vname()
                                ),
                            ));
                        }
                        let vh = self.vhost.clone();
                        self.shared.delete_queue(&vh, &name).await
                    }
                };
                if !m.nowait {
                    self.send(
                        ch,
                        QueueDeleteOk {
                            message_count: n.min(u32::MAX as u64) as u32,
                        },
                    );
                }
                Ok(())
            }
            Method::BasicQos(m) => {
                {
                    let c = self.ch(ch);
                    let mut f = c.flow.lock().unwrap_or_else(|e| e.into_inner());
                    f.size_limit = m.prefetch_size;
                    if m.global {
                        f.global_limit = u32::from(m.prefetch_count);
                    } else {
                        drop(f);
                        c.consumer_prefetch = m.prefetch_count;
                    }
                }
                self.wake_channel(ch);
                self.send(ch, BasicQosOk {});
                Ok(())
            }
            Method::BasicConsume(m) => self.basic_consume(ch, m).await,
            Method::BasicCancel(m) => {
                let entry = self.ch(ch).consumers.remove(&m.consumer_tag);
                if let Some((_, q)) = entry {
                    if q.remove_consumer(self.id, ch, &m.consumer_tag) {
                        let vh = self.vhost.clone();
                        self.shared.delete_queue(&vh, &q.name).await;
                    }
                }
                if !m.nowait {
                    self.send(
                        ch,
                        BasicCancelOk {
                            consumer_tag: m.consumer_tag,
                        },
                    );
                }
                Ok(())
            }
            Method::BasicPublish(m) => {
                if m.immediate {
                    return Err(conn_exc(ReplyCode::NotImplemented, "immediate=true"));
                }
                self.ch(ch).pending = Some(Pending {
                    method: m,
                    header: None,
                    body: BytesMut::new(),
                });
                Ok(())
            }
            Method::BasicGet(m) => self.basic_get(ch, m).await,
            Method::BasicAck(m) => {
                self.settle(ch, m.delivery_tag, m.multiple, Settle::Ack)
                    .await
            }
            Method::BasicNack(m) => {
                let s = if m.requeue {
                    Settle::Requeue
                } else {
                    Settle::Reject
                };
                self.settle(ch, m.delivery_tag, m.multiple, s).await
            }
            Method::BasicReject(m) => {
                let s = if m.requeue {
                    Settle::Requeue
                } else {
                    Settle::Reject
                };
                self.settle(ch, m.delivery_tag, false, s).await
            }
            Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                // Not transactional (as in RabbitMQ): requeues at once
                // every delivery that is still unacknowledged, which
                // excludes those settled in an open transaction.
                let is_sync = matches!(m, Method::BasicRecover(_));
                let items = std::mem::take(&mut self.ch(ch).unacked);
                self.apply_settle(ch, items.into_values().collect(), Settle::Requeue)
                    .await;
                if is_sync {
                    self.send(ch, BasicRecoverOk {});
                }
                Ok(())
            }
            Method::ConfirmSelect(m) => {
                let c = self.ch(ch);
                if c.tx {
                    return Err(chan(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                c.confirm = true;
                if !m.nowait {
                    self.send(ch, ConfirmSelectOk {});
                }
                Ok(())
            }
            Method::TxSelect(_) => {
                let c = self.ch(ch);
                if c.confirm {
                    return Err(chan(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                c.tx = true;
                self.send(ch, TxSelectOk {});
                Ok(())
            }
            Method::TxCommit(_) => self.tx_commit(ch).await,
            Method::TxRollback(_) => {
                let c = self.ch(ch);
                if !c.tx {
                    return Err(chan(
                        ReplyCode::PreconditionFailed,
                        "channel is not transactional",
                    ));
                }
                c.tx_publishes.clear();
                c.restore_tx_settles();
                self.send(ch, TxRollbackOk {});
                Ok(())
            }
            other => Err(conn_exc(
                ReplyCode::CommandInvalid,
                format!("method {} is not valid from a client", other.name()),
            )),
        }
    }

    fn wake_channel(&mut self, ch: u16) {
        if let Some(c) = self.channels.get(&ch) {
            for (_, q) in c.consumers.values() {
                q.wake();
            }
        }
    }

    // ---- exchanges ----

    async fn exchange_declare(&mut self, ch: u16, m: ExchangeDeclare) -> Result<(), Exc> {
        let v = self.vname();
        if m.passive {
            if !self.vhost.lock().exchanges.contains_key(&m.exchange) {
                return Err(chan(
                    ReplyCode::NotFound,
                    format!("no exchange '{}' in vhost '{}'", m.exchange, v),
                ));
            }
            if !m.nowait {
                self.send(ch, ExchangeDeclareOk {});
            }
            return Ok(());
        }
        let Some(kind) = ExKind::parse(&m.kind) else {
            return Err(conn_exc(
                ReplyCode::CommandInvalid,
                format!("unknown exchange type '{}'", m.kind),
            ));
        };
        if m.exchange.is_empty() {
            return Err(chan(
                ReplyCode::AccessRefused,
                "operation not permitted on the default exchange",
            ));
        }
        if m.exchange.starts_with("amq.") {
            return Err(chan(
                ReplyCode::AccessRefused,
                format!(
                    "exchange name '{}' contains reserved prefix 'amq.*'",
                    m.exchange
                ),
            ));
        }
        let created = {
            let mut st = self.vhost.lock();
            if let Some(ex) = st.exchanges.get(&m.exchange) {
                let ineq = |arg: &str, got: String, cur: String| {
                    chan(
                        ReplyCode::PreconditionFailed,
                        format!("inequivalent arg '{arg}' for exchange '{}' in vhost '{}': received '{got}' but current is '{cur}'", m.exchange, v),
                    )
                };
                if ex.kind != kind {
                    return Err(ineq("type", m.kind.clone(), ex.kind.name().into()));
                }
                if ex.durable != m.durable {
                    return Err(ineq(
                        "durable",
                        m.durable.to_string(),
                        ex.durable.to_string(),
                    ));
                }
                if ex.auto_delete != m.auto_delete {
                    return Err(ineq(
                        "auto_delete",
                        m.auto_delete.to_string(),
                        ex.auto_delete.to_string(),
                    ));
                }
                if ex.internal != m.internal {
                    return Err(ineq(
                        "internal",
                        m.internal.to_string(),
                        ex.internal.to_string(),
                    ));
                }
                let ae_new = table_get(&m.arguments, "alternate-exchange")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if ex.alternate().map(str::to_owned) != ae_new {
                    return Err(ineq(
                        "alternate-exchange",
                        ae_new.unwrap_or_default(),
                        ex.alternate().unwrap_or_default().to_owned(),
                    ));
                }
                false
            } else {
                st.exchanges.insert(
                    m.exchange.clone(),
                    Exchange {
                        name: m.exchange.clone(),
                        kind,
                        durable: m.durable,
                        auto_delete: m.auto_delete,
                        internal: m.internal,
                        arguments: m.arguments.clone(),
                        bindings: Vec::new(),
                    },
                );
                true
            }
        };
        if created && m.durable {
            self.shared.persist().await;
        }
        if !m.nowait {
            self.send(ch, ExchangeDeclareOk {});
        }
        Ok(())
    }

    async fn exchange_delete(&mut self, ch: u16, m: ExchangeDelete) -> Result<(), Exc> {
        let v = self.vname();
        if m.exchange.is_empty() || m.exchange.starts_with("amq.") {
            return Err(chan(
                ReplyCode::AccessRefused,
                format!("operation not permitted on exchange '{}'", m.exchange),
            ));
        }
        let removed = {
            let mut st = self.vhost.lock();
            match st.exchanges.get(&m.exchange) {
                None => false,
                Some(ex) => {
                    if m.if_unused && !ex.bindings.is_empty() {
                        return Err(chan(
                            ReplyCode::PreconditionFailed,
                            format!("exchange '{}' in vhost '{}' in use", m.exchange, v),
                        ));
                    }
                    crate::remove_exchange(&mut st, &m.exchange);
                    true
                }
            }
        };
        if removed {
            self.shared.persist().await;
        }
        if !m.nowait {
            self.send(ch, ExchangeDeleteOk {});
        }
        Ok(())
    }

    fn check_binding_ends(&self, source: &str, dest: &Dest) -> Result<(), Exc> {
        let v = self.vname();
        let st = self.vhost.lock();
        if source.is_empty() || matches!(dest, Dest::Exchange(d) if d.is_empty()) {
            return Err(chan(
                ReplyCode::AccessRefused,
                "operation not permitted on the default exchange",
            ));
        }
        if !st.exchanges.contains_key(source) {
            return Err(chan(
                ReplyCode::NotFound,
                format!("no exchange '{source}' in vhost '{v}'"),
            ));
        }
        match dest {
            Dest::Exchange(d) if !st.exchanges.contains_key(d) => Err(chan(
                ReplyCode::NotFound,
                format!("no exchange '{d}' in vhost '{v}'"),
            )),
            Dest::Queue(q) if !st.queues.contains_key(q) => Err(chan(
                ReplyCode::NotFound,
                format!("no queue '{q}' in vhost '{v}'"),
            )),
            _ => Ok(()),
        }
    }

    async fn change_binding(
        &mut self,
        add: bool,
        source: &str,
        dest: Dest,
        rk: &str,
        args: &Table,
    ) -> Result<(), Exc> {
        self.check_binding_ends(source, &dest)?;
        {
            let mut st = self.vhost.lock();
            let mut delete_source = false;
            if let Some(ex) = st.exchanges.get_mut(source) {
                let b = Binding {
                    dest,
                    routing_key: rk.to_owned(),
                    arguments: args.clone(),
                };
                let exists = ex.bindings.iter().position(|x| {
                    x.dest == b.dest && x.routing_key == b.routing_key && x.arguments == b.arguments
                });
                match (add, exists) {
                    (true, None) => ex.bindings.push(b),
                    (false, Some(i)) => {
                        ex.bindings.remove(i);
                        delete_source = ex.auto_delete && ex.bindings.is_empty();
                    }
                    _ => {}
                }
            }
            if delete_source {
                crate::remove_exchange(&mut st, source);
            }
        }
        self.shared.persist().await;
        Ok(())
    }

    async fn bind_exchange(
        &mut self,
        add: bool,
        source: &str,
        dest: &str,
        rk: &str,
        args: &Table,
    ) -> Result<(), Exc> {
        self.change_binding(add, source, Dest::Exchange(dest.to_owned()), rk, args)
            .await
    }

    async fn bind_queue(
        &mut self,
        add: bool,
        q: &Arc<Queue>,
        exchange: &str,
        rk: &str,
        args: &Table,
    ) -> Result<(), Exc> {
        self.change_binding(add, exchange, Dest::Queue(q.name.clone()), rk, args)
            .await
    }

    // ---- queues ----

    async fn queue_declare(&mut self, ch: u16, m: QueueDeclare) -> Result<(), Exc> {
        let v = self.vname();
        let name = if m.queue.is_empty() {
            if m.passive {
                self.resolve_queue_name(ch, "")?
            } else {
                format!("amq.gen-{}", crate::queue::random_suffix())
            }
        } else {
            if !m.passive && m.queue.starts_with("amq.") {
                return Err(chan(
                    ReplyCode::AccessRefused,
                    format!("queue name '{}' contains reserved prefix 'amq.*'", m.queue),
                ));
            }
            m.queue.clone()
        };
        let existing = self.vhost.queue(&name);
        let q = match existing {
            Some(q) => {
                self.check_owner(&q)?;
                if !m.passive {
                    let ineq = |arg: &str, got: String, cur: String| {
                        chan(
                            ReplyCode::PreconditionFailed,
                            format!("inequivalent arg '{arg}' for queue '{name}' in vhost '{v}': received '{got}' but current is '{cur}'"),
                        )
                    };
                    if q.durable != m.durable {
                        return Err(ineq(
                            "durable",
                            m.durable.to_string(),
                            q.durable.to_string(),
                        ));
                    }
                    if q.auto_delete != m.auto_delete {
                        return Err(ineq(
                            "auto_delete",
                            m.auto_delete.to_string(),
                            q.auto_delete.to_string(),
                        ));
                    }
                    if q.exclusive_owner.is_some() != m.exclusive {
                        return Err(ineq(
                            "exclusive",
                            m.exclusive.to_string(),
                            q.exclusive_owner.is_some().to_string(),
                        ));
                    }
                    for key in [
                        "x-message-ttl",
                        "x-expires",
                        "x-max-length",
                        "x-overflow",
                        "x-dead-letter-exchange",
                        "x-dead-letter-routing-key",
                    ] {
                        let a = table_get(&m.arguments, key);
                        let b = table_get(&q.arguments, key);
                        let same = match (a, b) {
                            (None, None) => true,
                            (Some(a), Some(b)) => match (a.as_i64(), b.as_i64()) {
                                (Some(x), Some(y)) => x == y,
                                _ => a.as_str() == b.as_str() && a.as_str().is_some(),
                            },
                            _ => false,
                        };
                        if !same {
                            return Err(ineq(key, fmt_arg(a), fmt_arg(b)));
                        }
                    }
                }
                q.touch();
                q
            }
            None if m.passive => {
                return Err(chan(
                    ReplyCode::NotFound,
                    format!("no queue '{name}' in vhost '{v}'"),
                ));
            }
            None => {
                let args = QueueArgs::parse(&m.arguments).map_err(|e| {
                    chan(
                        ReplyCode::PreconditionFailed,
                        format!("{e} for queue '{name}' in vhost '{v}'"),
                    )
                })?;
                let vh = self.vhost.clone();
                let shared = self.shared.clone();
                let _g = shared.decl_lock.lock().await;
                if let Some(q) = vh.queue(&name) {
                    // Declared concurrently by another connection.
                    self.check_owner(&q)?;
                    q
                } else {
                    let q = Queue::open(
                        &shared,
                        &vh,
                        QueueDecl {
                            name: name.clone(),
                            durable: m.durable,
                            exclusive_owner: m.exclusive.then_some(self.id),
                            auto_delete: m.auto_delete,
                            arguments: m.arguments.clone(),
                            args,
                        },
                    )
                    .await
                    .map_err(|e| broker_exc(&e))?;
                    vh.lock().queues.insert(name.clone(), q.clone());
                    drop(_g);
                    shared.persist().await;
                    if m.exclusive {
                        self.exclusive.push(name.clone());
                    }
                    metrics::counter!("manifold_amqp_queues_declared_total").increment(1);
                    q
                }
            }
        };
        self.ch(ch).last_queue = name.clone();
        if !m.nowait {
            self.send(
                ch,
                QueueDeclareOk {
                    queue: name,
                    message_count: q.message_count().min(u32::MAX as u64) as u32,
                    consumer_count: q.consumer_count() as u32,
                },
            );
        }
        Ok(())
    }

    // ---- basic ----

    async fn basic_consume(&mut self, ch: u16, m: BasicConsume) -> Result<(), Exc> {
        let q = self.find_queue(ch, &m.queue)?;
        let tag = if m.consumer_tag.is_empty() {
            format!("amq.ctag-{}", crate::queue::random_suffix())
        } else {
            m.consumer_tag.clone()
        };
        let vname = self.vname();
        let (conn_id, events_tx, cs) = (self.id, self.events_tx.clone(), self.cs.clone());
        let c = self.ch(ch);
        if c.consumers.contains_key(&tag) {
            return Err(conn_exc(
                ReplyCode::NotAllowed,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let consumer = Arc::new(Consumer {
            tag: tag.clone(),
            channel: ch,
            conn_id,
            no_ack: m.no_ack,
            exclusive: m.exclusive,
            limit: u32::from(c.consumer_prefetch),
            in_flight: AtomicU32::new(0),
            flow: c.flow.clone(),
            tx: events_tx,
            conn: cs,
        });
        if !m.nowait {
            self.send(
                ch,
                BasicConsumeOk {
                    consumer_tag: tag.clone(),
                },
            );
        }
        if let Err(e) = q.add_consumer(consumer.clone(), &vname) {
            // Undo the consume-ok we have not flushed yet.
            if !m.nowait {
                self.out.clear();
            }
            return Err(chan(ReplyCode::AccessRefused, e));
        }
        self.ch(ch).consumers.insert(tag, (consumer, q));
        Ok(())
    }

    async fn basic_get(&mut self, ch: u16, m: BasicGet) -> Result<(), Exc> {
        let q = self.find_queue(ch, &m.queue)?;
        let got = q.get().await.map_err(|e| broker_exc(&e))?;
        let Some((ready, left)) = got else {
            self.send(ch, BasicGetEmpty::default());
            return Ok(());
        };
        let c = self.ch(ch);
        let tag = c.next_tag;
        c.next_tag += 1;
        let msg = ready.msg.clone();
        if m.no_ack {
            q.ack(ready.offset);
        } else {
            c.unacked.insert(
                tag,
                Unacked {
                    queue: q.clone(),
                    ready: ready.clone(),
                    consumer: None,
                },
            );
        }
        self.send(
            ch,
            BasicGetOk {
                delivery_tag: tag,
                redelivered: ready.redelivered,
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
                message_count: left.min(u32::MAX as u64) as u32,
            },
        );
        encode_content(&mut self.out, ch, &msg.props, &msg.body, self.frame_max);
        metrics::counter!("manifold_amqp_messages_delivered_total").increment(1);
        Ok(())
    }

    async fn settle(&mut self, ch: u16, tag: u64, multiple: bool, how: Settle) -> Result<(), Exc> {
        let c = self.ch(ch);
        let tags: Vec<u64> = if multiple {
            if tag != 0 && !c.unacked.contains_key(&tag) && tag >= c.next_tag {
                return Err(chan(
                    ReplyCode::PreconditionFailed,
                    format!("unknown delivery tag {tag}"),
                ));
            }
            let upto = if tag == 0 { u64::MAX } else { tag };
            c.unacked.range(..=upto).map(|(&t, _)| t).collect()
        } else {
            if !c.unacked.contains_key(&tag) {
                return Err(chan(
                    ReplyCode::PreconditionFailed,
                    format!("unknown delivery tag {tag}"),
                ));
            }
            vec![tag]
        };
        let items: Vec<(u64, Unacked)> = tags
            .into_iter()
            .filter_map(|t| c.unacked.remove(&t).map(|u| (t, u)))
            .collect();
        if c.tx {
            c.tx_settles.push((how, items));
            return Ok(());
        }
        self.apply_settle(ch, items.into_iter().map(|(_, u)| u).collect(), how)
            .await;
        Ok(())
    }

    /// Settles deliveries that have already left the channel's `unacked`.
    async fn apply_settle(&mut self, ch: u16, items: Vec<Unacked>, how: Settle) {
        let mut by_queue: Vec<(Arc<Queue>, Vec<Ready>)> = Vec::new();
        for u in items {
            if let Some(cons) = &u.consumer {
                cons.release(u.ready.msg.size());
            }
            match how {
                Settle::Ack => u.queue.ack(u.ready.offset),
                _ => match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
                    Some((_, v)) => v.push(u.ready),
                    None => by_queue.push((u.queue, vec![u.ready])),
                },
            }
        }
        for (q, items) in by_queue {
            match how {
                Settle::Requeue => q.requeue(items),
                _ => q.dead_letter(items, "rejected").await,
            }
        }
        self.wake_channel(ch);
    }

    async fn complete_publish(&mut self, ch: u16, p: Pending) -> Result<(), Exc> {
        let v = self.vname();
        let Pending {
            method,
            header,
            body,
        } = p;
        let props = header.map(|h| h.properties).unwrap_or_default();
        if let Some(e) = &props.expiration {
            if e.parse::<u64>().is_err() {
                return Err(chan(
                    ReplyCode::PreconditionFailed,
                    format!("invalid expiration '{e}' for message"),
                ));
            }
        }
        if let Some(u) = &props.user_id {
            if *u != self.user {
                return Err(chan(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "user_id property set to '{u}' but authenticated user was '{}'",
                        self.user
                    ),
                ));
            }
        }
        {
            let st = self.vhost.lock();
            match st.exchanges.get(&method.exchange) {
                None => {
                    return Err(chan(
                        ReplyCode::NotFound,
                        format!("no exchange '{}' in vhost '{v}'", method.exchange),
                    ));
                }
                Some(ex) if ex.internal => {
                    return Err(chan(
                        ReplyCode::AccessRefused,
                        format!(
                            "cannot publish to internal exchange '{}' in vhost '{v}'",
                            method.exchange
                        ),
                    ));
                }
                _ => {}
            }
        }
        let msg = Msg {
            exchange: method.exchange.clone(),
            routing_key: method.routing_key.clone(),
            props,
            body: body.freeze(),
            publish_time: 0,
        };
        let c = self.ch(ch);
        if c.tx {
            c.tx_publishes.push(TxPublish {
                exchange: method.exchange,
                mandatory: method.mandatory,
                msg,
            });
            return Ok(());
        }
        let seq = if c.confirm {
            let s = c.next_seq;
            c.next_seq += 1;
            Some(s)
        } else {
            None
        };
        self.route_and_send(ch, &method.exchange, method.mandatory, msg, seq)
            .await;
        Ok(())
    }

    async fn route_and_send(
        &mut self,
        ch: u16,
        exchange: &str,
        mandatory: bool,
        msg: Msg,
        seq: Option<u64>,
    ) {
        let routed = self
            .vhost
            .route(exchange, &msg.routing_key, msg.props.headers.as_ref());
        if routed.queues.is_empty() {
            metrics::counter!("manifold_amqp_messages_unroutable_total").increment(1);
            if mandatory {
                self.send(
                    ch,
                    BasicReturn {
                        reply_code: ReplyCode::NoRoute.code(),
                        reply_text: "NO_ROUTE".into(),
                        exchange: exchange.to_owned(),
                        routing_key: msg.routing_key.clone(),
                    },
                );
                encode_content(&mut self.out, ch, &msg.props, &msg.body, self.frame_max);
            }
        }
        let depth = self.shared.config.publish_queue_depth;
        let events = self.events_tx.clone();
        let c = self.ch(ch);
        let tx = c
            .pipeline
            .get_or_insert_with(|| publish::spawn(ch, depth, events))
            .clone();
        let item = PubItem::Publish {
            seq,
            queues: routed.queues,
            msg,
        };
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                let blocked = self.caps.connection_blocked;
                if blocked {
                    self.send(
                        0,
                        ConnectionBlocked {
                            reason: "publish backlog: waiting for storage".into(),
                        },
                    );
                }
                self.flush();
                let _ = tx.send(item).await;
                if blocked {
                    self.send(0, ConnectionUnblocked {});
                }
                metrics::counter!("manifold_amqp_publish_backpressure_total").increment(1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    async fn tx_commit(&mut self, ch: u16) -> Result<(), Exc> {
        let c = self.ch(ch);
        if !c.tx {
            return Err(chan(
                ReplyCode::PreconditionFailed,
                "channel is not transactional",
            ));
        }
        let pubs = std::mem::take(&mut c.tx_publishes);
        let settles = std::mem::take(&mut c.tx_settles);
        for p in pubs {
            self.route_and_send(ch, &p.exchange, p.mandatory, p.msg, None)
                .await;
        }
        // Wait until every publish of the transaction is durable; the
        // barrier says whether all of them were stored.
        let mut stored = true;
        if let Some(tx) = self.ch(ch).pipeline.clone() {
            let (done, wait) = oneshot::channel();
            stored = match tx.send(PubItem::Barrier(done)).await {
                Ok(()) => {
                    self.flush();
                    wait.await.unwrap_or(false)
                }
                Err(_) => false,
            };
        }
        if !stored {
            // As RabbitMQ: a channel exception instead of commit-ok. The
            // transaction's settlements are not applied; closing the
            // channel requeues their deliveries.
            self.ch(ch).tx_settles = settles;
            return Err(chan(ReplyCode::PreconditionFailed, "partial tx completion"));
        }
        for (how, items) in settles {
            self.apply_settle(ch, items.into_iter().map(|(_, u)| u).collect(), how)
                .await;
        }
        self.send(ch, TxCommitOk {});
        Ok(())
    }

    // ---- events ----

    async fn handle_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Deliver {
                consumer,
                queue,
                ready,
            } => {
                let ch_id = consumer.channel;
                let valid = !self.closing
                    && self.channels.get(&ch_id).is_some_and(|c| {
                        !c.closing
                            && c.consumers
                                .get(&consumer.tag)
                                .is_some_and(|(x, _)| Arc::ptr_eq(x, &consumer))
                    });
                if !valid {
                    self.cs.pending.fetch_sub(1, Ordering::AcqRel);
                    if !consumer.no_ack {
                        consumer.release(ready.msg.size());
                        queue.requeue(vec![ready]);
                    }
                    return;
                }
                let c = self.ch(ch_id);
                let tag = c.next_tag;
                c.next_tag += 1;
                let msg = ready.msg.clone();
                let redelivered = ready.redelivered;
                if !consumer.no_ack {
                    c.unacked.insert(
                        tag,
                        Unacked {
                            queue,
                            ready,
                            consumer: Some(consumer.clone()),
                        },
                    );
                }
                self.send(
                    ch_id,
                    BasicDeliver {
                        consumer_tag: consumer.tag.clone(),
                        delivery_tag: tag,
                        redelivered,
                        exchange: msg.exchange.clone(),
                        routing_key: msg.routing_key.clone(),
                    },
                );
                encode_content(&mut self.out, ch_id, &msg.props, &msg.body, self.frame_max);
                self.out_deliveries += 1;
                metrics::counter!("manifold_amqp_messages_delivered_total").increment(1);
            }
            ConnEvent::Confirms { channel, results } => {
                let Some(c) = self.channels.get(&channel) else {
                    return;
                };
                if c.closing || !c.confirm || results.is_empty() {
                    return;
                }
                if results.iter().all(|(_, ok)| *ok) {
                    let last = results[results.len() - 1].0;
                    self.send(
                        channel,
                        BasicAck {
                            delivery_tag: last,
                            multiple: results.len() > 1,
                        },
                    );
                } else {
                    for (seq, ok) in results {
                        if ok {
                            self.send(
                                channel,
                                BasicAck {
                                    delivery_tag: seq,
                                    multiple: false,
                                },
                            );
                        } else {
                            self.send(
                                channel,
                                BasicNack {
                                    delivery_tag: seq,
                                    multiple: false,
                                    requeue: false,
                                },
                            );
                        }
                    }
                }
            }
            ConnEvent::Cancelled { channel, tag } => {
                let notify = self.caps.consumer_cancel_notify;
                if let Some(c) = self.channels.get_mut(&channel) {
                    if c.consumers.remove(&tag).is_some() && notify && !c.closing {
                        self.send(
                            channel,
                            BasicCancel {
                                consumer_tag: tag,
                                nowait: true,
                            },
                        );
                    }
                }
            }
            ConnEvent::Drained => {
                for c in self.channels.values() {
                    for (_, q) in c.consumers.values() {
                        q.wake();
                    }
                }
            }
        }
    }
}

fn fmt_arg(v: Option<&Value>) -> String {
    match v {
        None => "none".into(),
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(i), _) => i.to_string(),
            (_, Some(s)) => s.to_owned(),
            _ => format!("{v:?}"),
        },
    }
}

fn decode_method(payload: Bytes) -> Result<Method, Exc> {
    Method::decode(payload).map_err(|e| match e {
        DecodeError::UnknownMethod { class, method } => conn_exc(
            ReplyCode::NotImplemented,
            format!("unknown method {class}.{method}"),
        ),
        DecodeError::Syntax(s) => conn_exc(ReplyCode::SyntaxError, s),
    })
}

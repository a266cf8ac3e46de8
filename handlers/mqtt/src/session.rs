//! One MQTT connection: CONNECT, session takeover, the publish flows in
//! both directions, subscriptions and their feeds, wills and keep-alive.
//!
//! A connection task owns its session while connected. It reads the
//! partitions its subscriptions match itself (see [`crate::feeds`]: from a
//! durable cursor for a persistent session, from an in-memory position
//! otherwise), and only while its in-flight window (the client's Receive
//! Maximum) has room, so a slow client holds back its own reads, not the
//! broker. Shared subscriptions are read by their group (`share`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use broker::message::now_ms;
use broker::{BrokerError, Cursor, InitialPosition, Ledger, Message};
use bytes::BytesMut;
use handler_api::{AsyncStream, CancellationToken, HandlerError};
use mapping::mqtt::{self as map, MqttPublish, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::codec::{
    self, Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Publish, SubAck,
    UnsubAck, Version,
};
use crate::feeds::{Feed, Feeds, Step};
use crate::share::{pull_any, Delivery, Group};
use crate::state::{
    expiry_deadline, of_qos, FeedKey, KnownTopic, LastLedger, Online, Session, Shared, StoredWill,
    SubRecord,
};

type Io = Box<dyn AsyncStream>;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT without will.
    Normal,
    /// v5 DISCONNECT 0x04, network failure, keep-alive, protocol error.
    WithWill,
    /// Another connection took the session over.
    TakenOver,
    /// The gateway is shutting down.
    Shutdown,
}

struct Inflight {
    origin: Option<(FeedKey, u64)>,
    cursor: Option<Arc<Cursor>>,
    qos: u8,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    released: bool,
    /// A shared subscription's message: given back to the group if this
    /// connection ends before it is acknowledged.
    share: Option<(Arc<Group>, Box<Delivery>)>,
}

/// Where an outgoing publish came from, for its acknowledgement: the feed
/// and offset (redelivery), the cursor to acknowledge on, and the shared
/// subscription group it is owed back to if it is not acknowledged.
#[derive(Default)]
struct Source {
    origin: Option<(FeedKey, u64)>,
    cursor: Option<Arc<Cursor>>,
    share: Option<(Arc<Group>, Box<Delivery>)>,
}

/// A publish waiting for room in the window (retained messages).
struct Pending {
    publish: MqttPublish,
    qos: u8,
    sub_ids: Vec<u32>,
}

struct Conn {
    shared: Arc<Shared>,
    v: Version,
    client_id: Arc<str>,
    conn_id: u64,
    /// Session expiry interval, seconds (0: ends with the connection).
    expiry: u32,
    session: Session,
    wbuf: BytesMut,
    max_out_packet: usize,
    window: usize,
    aliases: HashMap<u16, String>,
    /// Topic aliases this connection's PUBLISHes use, when the client
    /// accepts them (MQTT 5 Topic Alias Maximum in its CONNECT).
    out_aliases: Option<Box<OutAliases>>,
    inflight: BTreeMap<u16, Inflight>,
    pending: VecDeque<Pending>,
    next_pkid: u16,
    /// The partitions this connection reads (boxed, and made when the
    /// first one starts: an idle connection carries none of it).
    feeds: Option<Box<Feeds>>,
    /// Shared subscription groups this connection is a member of.
    groups: Vec<Arc<Group>>,
    /// The will and its delay (boxed: most connections have none).
    will: Option<Box<(MqttPublish, u32)>>,
    /// Publishes queued on their ledgers and not yet durable, oldest
    /// first: each is answered (PUBACK / PUBREC) when it is durable, in the
    /// order the PUBLISH packets came (MQTT 4.6).
    acks: VecDeque<PendingPublish>,
    /// QoS 2 deliveries PUBREC'd by a persistent session: acknowledged on
    /// their cursors only once the owed PUBREL is stored, so that after a
    /// crash the PUBREL is sent again rather than the message lost.
    rel_acks: Vec<(Arc<Cursor>, u64)>,
    /// PUBREC and PUBCOMP packets of a persistent session, held until the
    /// session record is stored (`true`: the packet changed the stored
    /// QoS 2 state), so that they go out only once that state survives a
    /// crash, and in order.
    held: Vec<(bool, Packet)>,
    /// The ledger of the topic this connection published to last.
    last_ledger: LastLedger,
}

/// A PUBLISH that passed [`Conn::accept_publish`]: the message to store,
/// its QoS and packet id (boxed where it is handed on: the message is
/// large).
type Accepted = (MqttPublish, u8, u16);

/// A client's PUBLISH whose append is in flight.
#[derive(Debug)]
struct PendingPublish {
    qos: u8,
    pkid: u16,
    append: broker::PendingAppend,
}

/// Most messages one feed delivers before the next ready feed's turn.
const FEED_TURN: usize = 64;

/// Most publishes of one connection in flight at once (QoS 1 and 2 are
/// bounded by our Receive Maximum already; this bounds QoS 0).
const MAX_PENDING_PUBLISHES: usize = 256;

/// Waits for the oldest pending publish; it stays queued until then, so
/// this is cancel-safe.
async fn next_ack(
    acks: &mut VecDeque<PendingPublish>,
) -> (PendingPublish, Result<broker::Appended, BrokerError>) {
    let r = match acks.front_mut() {
        Some(p) => (&mut p.append).await,
        None => std::future::pending().await,
    };
    let p = acks.pop_front().expect("the front was there");
    (p, r)
}

fn io_benign(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

async fn write_packet(w: &mut WriteHalf<Io>, p: &Packet, v: Version) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    codec::encode(p, v, &mut b);
    w.write_all(&b).await?;
    w.flush().await
}

fn connack(code: ReasonCode, v: Version) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code: if v == Version::V5 {
            code.code()
        } else {
            code.connack_v3()
        },
        properties: Properties::default(),
    })
}

/// What the CONNECT exchange leaves for the rest of the connection.
struct Started {
    conn: Box<Conn>,
    rbuf: BytesMut,
    new_topics: broadcast::Receiver<Arc<KnownTopic>>,
    keep_alive: u16,
    kick: CancellationToken,
    /// Cancelled when this connection has released its session.
    gone: CancellationToken,
}

/// Moves `b`'s value out and frees its allocation now (a `*b` move frees
/// it only at the end of the enclosing scope).
#[allow(clippy::boxed_local)] // taking the box is the point
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// Serves one MQTT connection over `io` until it ends.
pub(crate) async fn run(
    shared: Arc<Shared>,
    io: Io,
    shutdown: CancellationToken,
) -> Result<(), HandlerError> {
    let (mut rd, mut wr) = tokio::io::split(io);
    // The CONNECT exchange is a boxed function of its own so that its
    // state (the decoded CONNECT, the will, the properties) is freed before
    // the connection settles: an idle connection holds only `serve`'s state.
    let Some(started) = Box::pin(handshake(shared, &mut rd, &mut wr, &shutdown)).await? else {
        return Ok(());
    };
    let Started {
        mut conn,
        rbuf,
        new_topics,
        keep_alive,
        kick,
        gone,
    } = unbox(started);
    let end = conn
        .serve(
            &mut rd, &mut wr, rbuf, new_topics, keep_alive, &shutdown, &kick,
        )
        .await;
    let end = match end {
        Ok(e) => e,
        Err(e) => {
            Box::pin(unbox(conn).release(End::WithWill, gone)).await;
            return if io_benign(&e) { Ok(()) } else { Err(e.into()) };
        }
    };
    let _ = wr.shutdown().await;
    Box::pin(unbox(conn).release(end, gone)).await;
    Ok(())
}

/// Reads and answers CONNECT and takes the client's session over; `None`
/// when the connection ended (or was refused) on the way.
async fn handshake(
    shared: Arc<Shared>,
    rd: &mut ReadHalf<Io>,
    wr: &mut WriteHalf<Io>,
    shutdown: &CancellationToken,
) -> Result<Option<Box<Started>>, HandlerError> {
    let mut rbuf = BytesMut::with_capacity(256);
    let max = shared.config.max_packet_size as usize;
    let deadline = Instant::now() + Duration::from_millis(shared.config.connect_timeout_ms);
    // ---- CONNECT ----
    let connect = loop {
        match codec::decode(&mut rbuf, Version::V311, max) {
            Ok(Some(Packet::Connect(c))) => break c,
            Ok(Some(_)) => {
                tracing::debug!("first packet is not CONNECT; closing");
                return Ok(None);
            }
            Ok(None) => {}
            Err(DecodeError::UnsupportedLevel(l)) => {
                tracing::debug!(level = l, "unsupported protocol level");
                // Return code 1 in the 3.1.1 format, understood by all.
                let _ = wr.write_all(&[0x20, 2, 0, 1]).await;
                return Ok(None);
            }
            Err(e) => {
                tracing::debug!(error = %e, "bad CONNECT; closing");
                return Ok(None);
            }
        }
        let n = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
            r = rd.read_buf(&mut rbuf) => match r {
                Ok(n) => n,
                Err(e) if io_benign(&e) => return Ok(None),
                Err(e) => return Err(e.into()),
            },
        };
        if n == 0 {
            return Ok(None);
        }
    };
    let v = connect.version;
    metrics::counter!("manifold_mqtt_connects_total", "version" => match v {
        Version::V31 => "3.1", Version::V311 => "3.1.1", Version::V5 => "5" })
    .increment(1);
    let Connect {
        client_id,
        clean_start,
        keep_alive,
        will,
        properties,
        ..
    } = *connect;
    // ---- validate ----
    if properties.auth_method.is_some() {
        let _ = write_packet(wr, &connack(ReasonCode::BadAuthenticationMethod, v), v).await;
        return Ok(None);
    }
    let mut assigned = None;
    let client_id: Arc<str> = if client_id.is_empty() {
        if v != Version::V5 && !clean_start {
            let _ = write_packet(wr, &connack(ReasonCode::ClientIdentifierNotValid, v), v).await;
            return Ok(None);
        }
        let id = format!(
            "auto-{:016x}{:08x}",
            now_ms(),
            shared
                .conn_ids
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        assigned = Some(id.clone());
        id.into()
    } else {
        client_id.into()
    };
    if client_id.len() > shared.config.max_client_id_len {
        let _ = write_packet(wr, &connack(ReasonCode::ClientIdentifierNotValid, v), v).await;
        return Ok(None);
    }
    let will = match will {
        Some(w) => {
            if map::validate_topic_name(&w.topic).is_err() {
                let _ = write_packet(wr, &connack(ReasonCode::TopicNameInvalid, v), v).await;
                return Ok(None);
            }
            let delay = w.properties.will_delay.unwrap_or(0);
            let p = MqttPublish {
                topic: w.topic,
                payload: w.payload,
                qos: w.qos,
                retain: w.retain,
                client_id: Some(client_id.to_string()),
                payload_format: w.properties.payload_format,
                message_expiry: w.properties.message_expiry,
                content_type: w.properties.content_type,
                response_topic: w.properties.response_topic,
                correlation_data: w.properties.correlation_data,
                user_properties: w.properties.user,
            };
            Some(Box::new((p, delay)))
        }
        None => None,
    };
    tracing::Span::current().record("client_id", &*client_id);
    let expiry = if v == Version::V5 {
        properties
            .session_expiry
            .unwrap_or(0)
            .min(shared.config.max_session_expiry_secs)
    } else if clean_start {
        0
    } else {
        shared.config.persistent_session_expiry_secs
    };
    // ---- take the session over ----
    let conn_id = shared
        .conn_ids
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A child of `shutdown`, so that the idle loop waits on one token for
    // both a takeover and a shutdown.
    let kick = shutdown.child_token();
    let gone = CancellationToken::new();
    let mut prev: Option<Session> = None;
    let mut ended_will = None;
    for attempt in 0..3 {
        let wait = {
            let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let slot = s.entry(client_id.clone()).or_default();
            match &slot.online {
                Some(on) if attempt < 2 => {
                    on.kick.cancel();
                    Some(on.gone.clone())
                }
                _ => {
                    if let Some(w) = slot.will.take() {
                        w.task.abort();
                        // A clean start ends the session, and a will still
                        // waiting for its delay is sent now (MQTT 5
                        // 3.1.2.5); resuming the session cancels it.
                        if clean_start {
                            ended_will = Some(w.will);
                        }
                    }
                    prev = slot.stored.take().map(|b| *b);
                    slot.online = Some(Online {
                        conn_id,
                        kick: kick.clone(),
                        gone: gone.clone(),
                        clean_start,
                    });
                    slot.expires_at_ms = None;
                    None
                }
            }
        };
        match wait {
            None => break,
            Some(g) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), g.cancelled()).await;
            }
        }
    }
    if let Some(w) = ended_will {
        shared.publish_will_now(w);
    }
    let session_present = !clean_start && prev.is_some();
    let session = if clean_start {
        if prev.is_some() {
            Box::pin(shared.delete_session_state(&client_id)).await;
        }
        Session::default()
    } else {
        prev.unwrap_or_default()
    };
    let mut conn = Box::new(Conn {
        v,
        client_id: client_id.clone(),
        conn_id,
        expiry,
        session,
        wbuf: BytesMut::new(),
        max_out_packet: properties
            .maximum_packet_size
            .map_or(usize::MAX, |m| m as usize),
        window: usize::from(
            properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(shared.config.max_inflight),
        ),
        aliases: HashMap::new(),
        out_aliases: properties
            .topic_alias_maximum
            .filter(|&m| m > 0 && v == Version::V5)
            .map(|max| {
                Box::new(OutAliases {
                    max,
                    by_topic: HashMap::new(),
                })
            }),
        inflight: BTreeMap::new(),
        pending: VecDeque::new(),
        next_pkid: 1,
        feeds: None,
        groups: Vec::new(),
        will,
        acks: VecDeque::new(),
        rel_acks: Vec::new(),
        held: Vec::new(),
        last_ledger: None,
        shared: shared.clone(),
    });
    // Resuming the session cancels a will waiting for its delay.
    let had_will = conn.session.record.will.take().is_some();
    conn.session.record.expiry = expiry;
    // Online now: if the gateway crashes before this connection ends, the
    // session's expiry counts from the restart (`load_sessions`), not from
    // an earlier disconnect.
    conn.session.record.disconnected_ms = 0;
    // The will is stored while the connection is online, too: a crash of
    // the gateway ends the connection without a DISCONNECT, so the restart
    // publishes it.
    let has_will = conn.will.is_some();
    conn.session.record.will = conn
        .will
        .as_deref()
        .map(|(w, delay)| Box::new(StoredWill::online(w, *delay)));
    if expiry > 0 || had_will || has_will {
        if let Err(e) = Box::pin(shared.store_session(&client_id, &conn.session.record)).await {
            tracing::warn!(error = %e, "could not store session");
            let _ = write_packet(wr, &connack(ReasonCode::ServerUnavailable, v), v).await;
            Box::pin(unbox(conn).release(End::Normal, gone)).await;
            return Ok(None);
        }
    }
    // ---- CONNACK ----
    let mut props = Properties::default();
    if v == Version::V5 {
        props.assigned_client_id = assigned;
        props.receive_maximum = Some(shared.config.receive_maximum);
        props.topic_alias_maximum = Some(shared.config.topic_alias_maximum);
        props.maximum_packet_size = Some(shared.config.max_packet_size);
        props.retain_available = Some(1);
        props.wildcard_sub_available = Some(1);
        props.sub_id_available = Some(1);
        props.shared_sub_available = Some(1);
        if properties.session_expiry.unwrap_or(0) != expiry {
            props.session_expiry = Some(expiry);
        }
    }
    conn.wbuf_packet(&Packet::ConnAck(ConnAck {
        session_present,
        code: 0,
        properties: props,
    }));
    let new_topics = shared.new_topics.subscribe();
    // Resume: PUBRELs owed, then feeds for every matching topic.
    for id in conn.session.record.pubrel.clone() {
        conn.inflight.insert(
            id,
            Inflight {
                origin: None,
                cursor: None,
                qos: 2,
                released: true,
                share: None,
            },
        );
        conn.wbuf_packet(&Packet::PubRel(Ack::ok(id)));
    }
    if session_present {
        for k in shared.known_topics() {
            Box::pin(conn.start_feeds(&k, None)).await;
        }
        let subs = conn.session.record.subs.clone();
        for r in subs {
            if let Ok(Some((name, filter))) = map::parse_shared(&r.filter) {
                let g = Box::pin(shared.join_group(name, filter, r.since_ms, false)).await;
                conn.groups.push(g);
            }
        }
    }
    Ok(Some(Box::new(Started {
        conn,
        rbuf,
        new_topics,
        keep_alive,
        kick,
        gone,
    })))
}

impl Conn {
    /// Handles every whole packet in `rbuf`; `Some` when the connection
    /// ends (a bad packet is answered with its reason code first).
    async fn handle_buffered(&mut self, rbuf: &mut BytesMut, max: usize) -> Option<End> {
        loop {
            match codec::decode(rbuf, self.v, max) {
                Ok(Some(p)) => {
                    // What must wait is boxed: the connection's idle state
                    // does not hold the largest handler's. The common
                    // packets make no future at all.
                    let end = match p {
                        Packet::Publish(p) => match self.publish_now(p) {
                            Ok(end) => end,
                            Err(a) => Box::pin(self.publish_later(a)).await,
                        },
                        Packet::Subscribe(s) => {
                            Box::pin(self.on_subscribe(s)).await;
                            None
                        }
                        Packet::Unsubscribe(u) => {
                            Box::pin(self.on_unsubscribe(u)).await;
                            None
                        }
                        p => self.handle_now(p),
                    };
                    if let Some(e) = end {
                        return Some(e);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "bad packet; closing");
                    let rc = match e {
                        DecodeError::TooLarge { .. } => ReasonCode::PacketTooLarge,
                        DecodeError::Protocol(_) => ReasonCode::ProtocolError,
                        _ => ReasonCode::MalformedPacket,
                    };
                    self.disconnect(rc);
                    return Some(End::WithWill);
                }
            }
        }
    }

    fn wbuf_packet(&mut self, p: &Packet) {
        codec::encode(p, self.v, &mut self.wbuf);
    }

    fn disconnect(&mut self, reason: ReasonCode) {
        if self.v == Version::V5 {
            self.wbuf_packet(&Packet::Disconnect(Disconnect {
                reason: reason.code(),
                properties: Properties::default(),
            }));
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        rd: &mut ReadHalf<Io>,
        wr: &mut WriteHalf<Io>,
        mut rbuf: BytesMut,
        mut new_topics: broadcast::Receiver<Arc<KnownTopic>>,
        keep_alive: u16,
        shutdown: &CancellationToken,
        kick: &CancellationToken,
    ) -> std::io::Result<End> {
        let ka = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut last_rx = Instant::now();
        // One timer and one cancellation wait for the whole connection, not
        // one registered per wake-up: the timer is set for the deadline as
        // of the last packet, and when it fires it checks whether packets
        // came since (then it is set again).
        let ka_timer =
            tokio::time::sleep_until(last_rx + ka.unwrap_or(Duration::from_secs(86_400)));
        tokio::pin!(ka_timer);
        let kicked = kick.cancelled();
        tokio::pin!(kicked);
        let max = self.shared.config.max_packet_size as usize;
        // Reads land in the worker thread's scratch buffer first (see
        // `read_some`): an idle connection holds no read buffer; `rbuf`
        // holds what one read brought until it is handled.
        if rbuf.is_empty() {
            rbuf = BytesMut::new();
        }
        // Packets that came in the same read as CONNECT are handled before
        // the first wait for more input.
        let mut buffered = !rbuf.is_empty();
        let end = 'outer: loop {
            if std::mem::take(&mut buffered) {
                if let Some(e) = Box::pin(self.handle_buffered(&mut rbuf, max)).await {
                    break 'outer e;
                }
            }
            // Retained messages queued for the window go first.
            while self.inflight.len() < self.window {
                let Some(p) = self.pending.pop_front() else {
                    break;
                };
                self.send_publish(p.publish, p.qos, true, p.sub_ids, Source::default());
            }
            let more = Box::pin(self.pump_feeds()).await;
            if !self.rel_acks.is_empty() || !self.held.is_empty() {
                Box::pin(self.store_held()).await;
            }
            self.flush(wr).await?;
            // (The write buffer was just flushed.)
            let room = self.has_room();
            let groups = self.groups.clone();
            let pull = (room && !groups.is_empty()).then(|| Box::pin(pull_any(&groups)));
            let pulling = pull.is_some();
            // The feeds' set is waited on through a clone (the branches
            // below need `self`).
            let ready = self.feeds.as_ref().map(|f| f.set().clone());
            let listening = !self.session.record.subs.is_empty();
            tokio::select! {
                biased;
                // `kick` is a child of `shutdown`: cancelled by either.
                () = &mut kicked => {
                    if shutdown.is_cancelled() {
                        self.disconnect(ReasonCode::ServerShuttingDown);
                        break End::Shutdown;
                    }
                    self.disconnect(ReasonCode::SessionTakenOver);
                    break End::TakenOver;
                }
                () = &mut ka_timer, if ka.is_some() => {
                    let due = last_rx + ka.expect("enabled with keep-alive");
                    if Instant::now() < due {
                        // Packets came meanwhile.
                        ka_timer.as_mut().reset(due);
                        continue;
                    }
                    tracing::debug!("keep-alive timeout");
                    self.disconnect(ReasonCode::KeepAliveTimeout);
                    break End::WithWill;
                }
                r = read_some(rd, &mut rbuf) => {
                    if r? == 0 {
                        break End::WithWill;
                    }
                    last_rx = Instant::now();
                    if let Some(e) = Box::pin(self.handle_buffered(&mut rbuf, max)).await {
                        break 'outer e;
                    }
                    // An idle connection keeps no read buffer.
                    if rbuf.is_empty() {
                        rbuf = BytesMut::new();
                    }
                }
                // A feed's ledger moved: read at the top of the loop.
                () = async { ready.as_ref().expect("enabled with feeds").wait().await },
                    if room && ready.is_some() && !more => {}
                // Boxed, and only made for a member of a shared
                // subscription: the others do not carry its state.
                (g, d) = async { pull.expect("enabled only with groups").await },
                    if pulling => {
                    self.deliver_shared(&g, d);
                    while self.inflight.len() < self.window && self.wbuf.len() < 64 * 1024 {
                        match g.try_pull() {
                            Some(d) => self.deliver_shared(&g, d),
                            None => break,
                        }
                    }
                }
                (p, r) = next_ack(&mut self.acks), if !self.acks.is_empty() => {
                    if let Some(e) = self.finish_publish(p.qos, p.pkid, r.map(drop)) {
                        break 'outer e;
                    }
                    // Appends complete a group commit at a time: answer
                    // every one that is done in the same write.
                    while let Some(r) = self.acks.front_mut().and_then(|p| p.append.try_result()) {
                        let p = self.acks.pop_front().expect("the front was there");
                        if let Some(e) = self.finish_publish(p.qos, p.pkid, r.map(drop)) {
                            break 'outer e;
                        }
                    }
                }
                t = new_topics.recv(), if listening => {
                    let topics = match t {
                        Ok(k) => vec![k],
                        Err(broadcast::error::RecvError::Lagged(_)) => self.shared.known_topics(),
                        Err(broadcast::error::RecvError::Closed) => Vec::new(),
                    };
                    for k in topics {
                        Box::pin(self.start_feeds(&k, None)).await;
                        for g in &groups {
                            Box::pin(g.start_feeds(&self.shared, &k, false)).await;
                        }
                    }
                }
                // Feeds with more to read take their turns after whatever
                // else is ready.
                () = std::future::ready(()), if room && more => {}
            };
        };
        if !self.rel_acks.is_empty() || !self.held.is_empty() {
            Box::pin(self.store_held()).await;
        }
        self.flush(wr).await?;
        Ok(end)
    }

    async fn flush(&mut self, wr: &mut WriteHalf<Io>) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            wr.write_all(&self.wbuf).await?;
            wr.flush().await?;
            self.wbuf.clear();
            if self.wbuf.capacity() > 64 * 1024 {
                self.wbuf = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Handles a packet that needs no waiting (acknowledgements, pings,
    /// DISCONNECT, protocol errors) without making a future for it; `Some`
    /// ends the connection.
    /// PUBLISH, SUBSCRIBE and UNSUBSCRIBE are handled by the caller
    /// (`handle_buffered`).
    fn handle_now(&mut self, p: Packet) -> Option<End> {
        match p {
            // Never passed here.
            Packet::Publish(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => {}
            Packet::PubAck(a) => {
                if let Some(f) = self.inflight.get(&a.pkid) {
                    if f.qos == 1 {
                        if let Some(f) = self.inflight.remove(&a.pkid) {
                            ack(&f);
                        }
                    }
                }
            }
            Packet::PubRec(a) => match self.inflight.get_mut(&a.pkid) {
                Some(f) if f.qos == 2 && !f.released => {
                    // Delivered: the client owns it now.
                    if self.v == Version::V5 && a.reason >= 0x80 {
                        ack(f);
                        self.inflight.remove(&a.pkid);
                    } else {
                        f.released = true;
                        match (&f.cursor, &f.origin) {
                            // Acknowledged once the owed PUBREL is stored
                            // (`store_held`).
                            (Some(c), Some((_, off))) if self.expiry > 0 => {
                                self.rel_acks.push((c.clone(), *off));
                            }
                            _ => ack(f),
                        }
                        self.session.record.pubrel.push(a.pkid);
                        self.wbuf_packet(&Packet::PubRel(Ack::ok(a.pkid)));
                    }
                }
                Some(f) if f.released => self.wbuf_packet(&Packet::PubRel(Ack::ok(a.pkid))),
                _ => {
                    let mut r = Ack::ok(a.pkid);
                    r.reason = ReasonCode::PacketIdentifierNotFound.code();
                    self.wbuf_packet(&Packet::PubRel(r));
                }
            },
            Packet::PubComp(a) => {
                if self.inflight.get(&a.pkid).is_some_and(|f| f.released) {
                    self.inflight.remove(&a.pkid);
                    self.session.record.pubrel.retain(|&x| x != a.pkid);
                }
            }
            Packet::PubRel(a) => {
                let found = self.session.qos2_in.remove(&a.pkid);
                let stored = &mut self.session.record.qos2_in;
                let was_stored = stored
                    .iter()
                    .position(|&x| x == a.pkid)
                    .map(|i| stored.swap_remove(i));
                let mut r = Ack::ok(a.pkid);
                if !found {
                    r.reason = ReasonCode::PacketIdentifierNotFound.code();
                }
                self.send_rec_comp(was_stored.is_some(), Packet::PubComp(r));
            }
            Packet::PingReq => self.wbuf_packet(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry {
                    if self.expiry == 0 && e > 0 {
                        self.disconnect(ReasonCode::ProtocolError);
                        return Some(End::WithWill);
                    }
                    self.expiry = e.min(self.shared.config.max_session_expiry_secs);
                }
                return Some(if d.reason == ReasonCode::DisconnectWithWill.code() {
                    End::WithWill
                } else {
                    End::Normal
                });
            }
            Packet::Connect(_) => {
                self.disconnect(ReasonCode::ProtocolError);
                return Some(End::WithWill);
            }
            Packet::Auth(_) => {
                self.disconnect(ReasonCode::BadAuthenticationMethod);
                return Some(End::WithWill);
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.disconnect(ReasonCode::ProtocolError);
                return Some(End::WithWill);
            }
        }
        None
    }

    /// A PUBLISH queued on its ledger at once when that needs no waiting
    /// (the common case: not retained, the topic's ledger is the one this
    /// connection published to last, and it has room), so the hot path
    /// makes no future; `Err` hands it to [`Conn::publish_later`].
    fn publish_now(&mut self, p: Publish) -> Result<Option<End>, Box<Accepted>> {
        let a = match self.accept_publish(p) {
            Ok(a) => a,
            Err(end) => return Ok(end),
        };
        let m = &a.0;
        if m.retain
            || self.acks.len() >= MAX_PENDING_PUBLISHES
            || (m.payload_format == Some(1) && std::str::from_utf8(&m.payload).is_err())
        {
            return Err(a);
        }
        match self.shared.try_submit_publish(m, &self.last_ledger) {
            Some(Ok(append)) => {
                let (_, qos, pkid) = *a;
                if qos == 2 {
                    self.session.qos2_in.insert(pkid);
                }
                self.acks.push_back(PendingPublish { qos, pkid, append });
                Ok(None)
            }
            // Errors are answered in order by the other path.
            _ => Err(a),
        }
    }

    /// The checks of a PUBLISH that need no waiting (topic alias, topic
    /// name, a resent QoS 2 packet id, the receive maximum): `Ok` the
    /// message to store, its QoS and packet id; `Err` it was answered or
    /// ends the connection.
    fn accept_publish(&mut self, mut p: Publish) -> Result<Box<Accepted>, Option<End>> {
        if self.v == Version::V5 {
            if let Some(alias) = p.properties.topic_alias {
                if alias == 0 || alias > self.shared.config.topic_alias_maximum {
                    self.disconnect(ReasonCode::TopicAliasInvalid);
                    return Err(Some(End::WithWill));
                }
                if p.topic.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => p.topic = t.clone(),
                        None => {
                            self.disconnect(ReasonCode::ProtocolError);
                            return Err(Some(End::WithWill));
                        }
                    }
                } else {
                    self.aliases.insert(alias, p.topic.clone());
                }
            }
        }
        if map::validate_topic_name(&p.topic).is_err() {
            tracing::debug!(topic = %p.topic, "invalid topic name in PUBLISH");
            self.disconnect(ReasonCode::TopicNameInvalid);
            return Err(Some(End::WithWill));
        }
        if p.qos == 2 {
            if self.session.qos2_in.contains(&p.pkid) {
                // A resent PUBLISH: answered once its first copy is
                // durable (if that is still pending), else at once.
                let held =
                    |h: &(bool, Packet)| matches!(&h.1, Packet::PubRec(a) if a.pkid == p.pkid);
                if !self.acks.iter().any(|a| a.qos == 2 && a.pkid == p.pkid)
                    && !self.held.iter().any(held)
                {
                    self.send_rec_comp(false, Packet::PubRec(Ack::ok(p.pkid)));
                }
                return Err(None);
            }
            if self.session.qos2_in.len() >= usize::from(self.shared.config.receive_maximum) {
                self.disconnect(ReasonCode::ReceiveMaximumExceeded);
                return Err(Some(End::WithWill));
            }
        }
        let m = MqttPublish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            client_id: Some(self.client_id.to_string()),
            payload_format: p.properties.payload_format,
            message_expiry: p.properties.message_expiry,
            content_type: p.properties.content_type,
            response_topic: p.properties.response_topic,
            correlation_data: p.properties.correlation_data,
            user_properties: p.properties.user,
        };
        Ok(Box::new((m, p.qos, p.pkid)))
    }

    /// Stores an accepted PUBLISH, waiting where needed: answers every
    /// earlier one first when this one is retained or invalid, waits for
    /// room on the ledger, looks its topic up (creating it).
    async fn publish_later(&mut self, a: Box<Accepted>) -> Option<End> {
        let (m, qos, pkid) = *a;
        if m.payload_format == Some(1) && std::str::from_utf8(&m.payload).is_err() {
            if let Some(e) = self.drain_acks().await {
                return Some(e);
            }
            return self.publish_failed(qos, pkid, ReasonCode::PayloadFormatInvalid);
        }
        if m.retain {
            // A retained publish also replaces the topic's retained
            // message once stored: it is answered after everything before
            // it, synchronously (retained publishes are not the hot path).
            if let Some(e) = self.drain_acks().await {
                return Some(e);
            }
            let r = self.shared.publish(&m).await;
            if qos == 2 && r.is_ok() {
                self.session.qos2_in.insert(pkid);
            }
            return self.finish_publish(qos, pkid, r);
        }
        // Pipelined: queue the append (in order on its ledger), read the
        // next packet, answer when it is durable.
        while self.acks.len() >= MAX_PENDING_PUBLISHES {
            let (done, r) = next_ack(&mut self.acks).await;
            if let Some(e) = self.finish_publish(done.qos, done.pkid, r.map(drop)) {
                return Some(e);
            }
        }
        match self.shared.submit_publish(&m, &mut self.last_ledger).await {
            Ok(append) => {
                if qos == 2 {
                    self.session.qos2_in.insert(pkid);
                }
                self.acks.push_back(PendingPublish { qos, pkid, append });
                None
            }
            Err(e) => {
                if let Some(end) = self.drain_acks().await {
                    return Some(end);
                }
                tracing::warn!(error = %e, topic = %m.topic, "publish failed");
                self.publish_failed(qos, pkid, map::publish_error_reason(&e))
            }
        }
    }

    /// Answers every pending publish, oldest first.
    async fn drain_acks(&mut self) -> Option<End> {
        while !self.acks.is_empty() {
            let (done, r) = next_ack(&mut self.acks).await;
            if let Some(e) = self.finish_publish(done.qos, done.pkid, r.map(drop)) {
                return Some(e);
            }
        }
        None
    }

    /// Answers a client's publish once its append finished.
    fn finish_publish(&mut self, qos: u8, pkid: u16, r: Result<(), BrokerError>) -> Option<End> {
        match r {
            Ok(()) => {
                match qos {
                    1 => self.wbuf_packet(&Packet::PubAck(Ack::ok(pkid))),
                    2 => {
                        let persistent = self.expiry > 0;
                        if persistent {
                            self.session.record.qos2_in.push(pkid);
                        }
                        self.send_rec_comp(persistent, Packet::PubRec(Ack::ok(pkid)));
                    }
                    _ => {}
                }
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "publish failed");
                if qos == 2 {
                    self.session.qos2_in.remove(&pkid);
                }
                self.publish_failed(qos, pkid, map::publish_error_reason(&e))
            }
        }
    }

    fn publish_failed(&mut self, qos: u8, pkid: u16, rc: ReasonCode) -> Option<End> {
        if self.v == Version::V5 && qos > 0 {
            let mut a = Ack::ok(pkid);
            a.reason = rc.code();
            if qos == 1 {
                self.wbuf_packet(&Packet::PubAck(a));
            } else {
                self.send_rec_comp(false, Packet::PubRec(a));
            }
            return None;
        }
        // 3.x cannot report a failed publish: close, as the spec asks.
        self.disconnect(rc);
        Some(End::WithWill)
    }

    async fn on_subscribe(&mut self, s: codec::Subscribe) {
        let now = now_ms();
        let sub_id = s.properties.subscription_ids.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut fresh: Vec<(SubRecord, bool)> = Vec::new();
        let mut joins: Vec<(String, String, i64)> = Vec::new();
        for (filter, o) in s.filters {
            let failure = if self.v == Version::V5 {
                None
            } else {
                Some(0x80)
            };
            let share = match map::parse_shared(&filter) {
                Ok(Some((g, f))) => Some((g.to_owned(), f.to_owned())),
                Err(_) => {
                    codes.push(failure.unwrap_or(ReasonCode::TopicFilterInvalid.code()));
                    continue;
                }
                Ok(None) => None,
            };
            if share.is_none() && map::validate_topic_filter(&filter).is_err() {
                codes.push(failure.unwrap_or(ReasonCode::TopicFilterInvalid.code()));
                continue;
            }
            let subs = &mut self.session.record.subs;
            let existing = subs.iter().position(|x| x.filter == filter);
            if existing.is_none() && subs.len() >= self.shared.config.max_subscriptions {
                codes.push(failure.unwrap_or(ReasonCode::QuotaExceeded.code()));
                continue;
            }
            let rec = SubRecord {
                filter,
                qos: o.qos,
                // No-local is meaningless for a shared subscription.
                nl: o.no_local && share.is_none(),
                rap: o.retain_as_published,
                rh: o.retain_handling,
                id: sub_id,
                since_ms: existing.map_or(now, |i| subs[i].since_ms),
            };
            match existing {
                Some(i) => subs[i] = rec.clone(),
                None => subs.push(rec.clone()),
            }
            codes.push(o.qos);
            match share {
                Some((g, f)) => {
                    if existing.is_none() {
                        joins.push((g, f, rec.since_ms));
                    }
                }
                // Retained messages are not sent for shared subscriptions.
                None => fresh.push((rec, existing.is_none())),
            }
        }
        if self.expiry > 0 {
            if let Err(e) = self
                .shared
                .store_session(&self.client_id, &self.session.record)
                .await
            {
                tracing::warn!(error = %e, "could not store session");
                for c in &mut codes {
                    if *c < 0x80 {
                        *c = if self.v == Version::V5 {
                            ReasonCode::UnspecifiedError.code()
                        } else {
                            0x80
                        };
                    }
                }
            }
        }
        for (g, f, since) in joins {
            let g = self.shared.join_group(&g, &f, since, true).await;
            self.groups.push(g);
        }
        // Feeds start at the current end of existing topics, so every
        // message accepted after the SUBACK is delivered.
        for k in self.shared.known_topics() {
            if fresh
                .iter()
                .any(|(r, _)| map::topic_matches(&r.filter, &k.mqtt))
            {
                self.start_feeds(&k, Some(())).await;
            }
        }
        self.wbuf_packet(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            properties: Properties::default(),
            codes,
        }));
        for (rec, is_new) in fresh {
            let send = match rec.rh {
                0 => true,
                1 => is_new,
                _ => false,
            };
            if !send {
                continue;
            }
            for m in self.shared.retained_matching(&rec.filter) {
                let p = map::message_to_publish(&m, "", now_ms());
                if map::is_expired(&m, now_ms()) {
                    continue;
                }
                if rec.nl && p.client_id.as_deref() == Some(&*self.client_id) {
                    continue;
                }
                let qos = p.qos.min(rec.qos);
                self.pending.push_back(Pending {
                    publish: p,
                    qos,
                    sub_ids: rec.id.into_iter().collect(),
                });
            }
        }
    }

    async fn on_unsubscribe(&mut self, u: codec::Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let subs = &mut self.session.record.subs;
            let before = subs.len();
            subs.retain(|s| &s.filter != f);
            if subs.len() < before {
                if let Some(key) = f.strip_prefix("$share/") {
                    if let Some(i) = self.groups.iter().position(|g| g.key == key) {
                        let g = self.groups.swap_remove(i);
                        self.shared.leave_group(&g, false).await;
                    }
                }
            }
            let subs = &self.session.record.subs;
            codes.push(if subs.len() < before {
                0
            } else {
                ReasonCode::NoSubscriptionExisted.code()
            });
        }
        // Stop feeds (and drop cursors) of topics nothing matches any more.
        let subs = self.session.record.subs.clone();
        let topics = self.shared.known_topics();
        let cname = map::session_cursor_name(&self.client_id);
        let mut stop = Vec::new();
        for key in self.feeds.iter().flat_map(|f| f.keys()) {
            let mqtt = topics
                .iter()
                .find(|k| k.name == key.0)
                .map(|k| k.mqtt.clone());
            let matched = mqtt.is_some_and(|t| {
                subs.iter()
                    .any(|s| !is_shared(&s.filter) && map::topic_matches(&s.filter, &t))
            });
            if !matched {
                stop.push(key.clone());
            }
        }
        for key in stop {
            if let Some(f) = self.feeds.as_deref_mut() {
                f.remove(&key);
            }
            if self.expiry > 0 {
                if let Ok(l) = self.shared.broker.ledger(&key.0, key.1) {
                    let _ = l.delete_cursor(&cname).await;
                }
            }
        }
        if self.expiry > 0 {
            if let Err(e) = self
                .shared
                .store_session(&self.client_id, &self.session.record)
                .await
            {
                tracing::warn!(error = %e, "could not store session");
            }
        }
        self.wbuf_packet(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            properties: Properties::default(),
            codes,
        }));
    }

    /// Starts feeds for every partition of `k` if a subscription matches it.
    /// `at_end`: a new subscription on an existing topic starts at the end;
    /// otherwise a feed starts where the session's cursor is, or at the
    /// first message not older than the earliest matching subscription.
    async fn start_feeds(&mut self, k: &KnownTopic, at_end: Option<()>) {
        let since = self
            .session
            .record
            .subs
            .iter()
            .filter(|s| !is_shared(&s.filter) && map::topic_matches(&s.filter, &k.mqtt))
            .map(|s| s.since_ms)
            .min();
        let Some(since) = since else { return };
        let cname = map::session_cursor_name(&self.client_id);
        for p in 0..k.partitions {
            let key: FeedKey = Arc::new((k.name.clone(), p));
            // A feed whose ledger closed (the topic was deleted and is
            // now created again) is replaced.
            let feeds = self.feeds.get_or_insert_with(|| Box::new(Feeds::new()));
            if feeds.get(&key).is_some_and(|f| !f.ledger.is_closed()) {
                continue;
            }
            let Ok(ledger) = self.shared.broker.ledger(&k.name, p) else {
                continue;
            };
            let durable = self.expiry > 0;
            let existing = durable.then(|| ledger.cursor(&cname)).flatten();
            let pos = if existing.is_some() {
                0
            } else if at_end.is_some() {
                ledger.end_offset()
            } else {
                // The end is read first: an entry appended while searching
                // is either found or at/after this end.
                let end = ledger.end_offset();
                match ledger.find_offset_by_timestamp(since).await {
                    Ok(Some(o)) => o,
                    _ => end,
                }
            };
            let (cursor, next) = if durable {
                let c = match existing {
                    Some(c) => c,
                    None => match ledger
                        .open_cursor(&cname, InitialPosition::Offset(pos))
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not open cursor");
                            continue;
                        }
                    },
                };
                let md = c.mark_delete();
                (Some(c), md)
            } else {
                (None, pos)
            };
            if let Some(f) = self.feeds.as_deref_mut() {
                f.insert(key, ledger, cursor, next, k.mqtt.clone());
            }
        }
    }

    /// Reads the ready feeds and delivers their messages while the window
    /// and the write buffer have room, each feed in turn (up to
    /// [`FEED_TURN`] messages a turn). `true`: a feed has more to read.
    async fn pump_feeds(&mut self) -> bool {
        let Some(feeds) = self.feeds.as_deref_mut() else {
            return false;
        };
        if !feeds.collect() {
            return false;
        }
        let mut turns = feeds.ready_len();
        while turns > 0 && self.has_room() {
            turns -= 1;
            let Some((token, mut f)) = self.feeds.as_deref_mut().and_then(Feeds::take_next) else {
                break;
            };
            let mut n = 0;
            let again = loop {
                if n == FEED_TURN || !self.has_room() {
                    break Some(true);
                }
                match f.next().await {
                    Step::Message(off, msg) => {
                        self.deliver(&f, off, &msg);
                        n += 1;
                    }
                    Step::CaughtUp => break Some(false),
                    Step::Closed => break None,
                }
            };
            let Some(feeds) = self.feeds.as_deref_mut() else {
                break;
            };
            match again {
                Some(again) => feeds.put_back(token, f, again),
                None => feeds.drop_taken(token, &f),
            }
        }
        self.feeds.as_deref().is_some_and(Feeds::any_ready)
    }

    /// Whether another delivery can go out now.
    fn has_room(&self) -> bool {
        self.inflight.len() < self.window && self.pending.is_empty() && self.wbuf.len() < 64 * 1024
    }

    fn deliver(&mut self, f: &Feed, off: u64, msg: &Message) {
        let now = now_ms();
        let ack_now = || {
            if let Some(c) = &f.cursor {
                c.ack(off);
            }
        };
        let Some(p) = map::deliverable(msg, &f.fallback, now) else {
            ack_now();
            return;
        };
        let mut qos: Option<u8> = None;
        let mut ids = Vec::new();
        let mut rap = false;
        for s in &self.session.record.subs {
            if is_shared(&s.filter) || !map::topic_matches(&s.filter, &p.topic) {
                continue;
            }
            if s.nl && p.client_id.as_deref() == Some(&*self.client_id) {
                continue;
            }
            qos = Some(qos.map_or(s.qos, |q| q.max(s.qos)));
            if let Some(id) = s.id {
                ids.push(id);
            }
            rap |= s.rap;
        }
        let Some(sq) = qos else {
            ack_now();
            return;
        };
        let q = sq.min(p.qos);
        let retain = rap && p.retain;
        self.send_publish(
            p,
            q,
            retain,
            ids,
            Source {
                origin: Some((f.key.clone(), off)),
                cursor: f.cursor.clone(),
                share: None,
            },
        );
    }

    /// Delivers a message of shared subscription group `g` with this
    /// member's subscription options.
    fn deliver_shared(&mut self, g: &Arc<Group>, d: Box<Delivery>) {
        let now = now_ms();
        if map::is_expired(&d.msg, now) {
            if let Some(c) = &d.cursor {
                c.ack(d.offset);
            }
            return;
        }
        let Some(sub) = self
            .session
            .record
            .subs
            .iter()
            .find(|s| s.filter.strip_prefix("$share/") == Some(g.key.as_str()))
        else {
            // Unsubscribed meanwhile: another member takes it.
            g.give_back(d);
            return;
        };
        let p = map::message_to_publish(&d.msg, &d.fallback, now);
        let q = sub.qos.min(p.qos);
        let retain = sub.rap && p.retain;
        let ids = sub.id.into_iter().collect();
        let origin = Some((d.key.clone(), d.offset));
        let cursor = d.cursor.clone();
        self.send_publish(
            p,
            q,
            retain,
            ids,
            Source {
                origin,
                cursor,
                share: Some((g.clone(), d)),
            },
        );
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    fn send_publish(
        &mut self,
        p: MqttPublish,
        qos: u8,
        retain: bool,
        sub_ids: Vec<u32>,
        source: Source,
    ) {
        let Source {
            origin,
            cursor,
            share,
        } = source;
        let mut dup = false;
        let pkid = if qos > 0 {
            match origin
                .as_ref()
                .filter(|_| share.is_none())
                .and_then(|o| self.session.redeliver.remove(o))
            {
                Some(id) if !self.inflight.contains_key(&id) => {
                    dup = true;
                    id
                }
                _ => self.alloc_pkid(),
            }
        } else {
            0
        };
        let properties = if self.v == Version::V5 {
            Properties {
                payload_format: p.payload_format,
                message_expiry: p.message_expiry,
                content_type: p.content_type,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                subscription_ids: sub_ids,
                user: p.user_properties,
                ..Properties::default()
            }
        } else {
            Properties::default()
        };
        let publish = Publish {
            dup,
            qos,
            retain,
            topic: p.topic,
            pkid,
            properties,
            payload: p.payload,
        };
        if self.v == Version::V5 && codec::publish_size(&publish, self.v) > self.max_out_packet {
            // The spec: discard as if it had been sent.
            if let Some(c) = &cursor {
                if let Some((_, off)) = &origin {
                    c.ack(*off);
                }
            }
            return;
        }
        let mut publish = publish;
        if let Some(a) = self.out_aliases.as_deref_mut() {
            a.apply(&mut publish);
        }
        codec::encode(&Packet::Publish(publish), self.v, &mut self.wbuf);
        of_qos(&self.shared.delivered, qos).increment(1);
        let f = Inflight {
            origin,
            cursor,
            qos,
            released: false,
            share,
        };
        if qos == 0 {
            ack(&f);
        } else {
            self.inflight.insert(pkid, f);
        }
    }

    /// A PUBREC or PUBCOMP: written at once, or for a persistent session
    /// held until [`Conn::store_held`] has stored the session (`changed`:
    /// the packet's QoS 2 state is in the record and must be stored first;
    /// packets that changed nothing are held too, to keep the order).
    fn send_rec_comp(&mut self, changed: bool, p: Packet) {
        if self.expiry > 0 {
            self.held.push((changed, p));
        } else {
            self.wbuf_packet(&p);
        }
    }

    /// Stores the session record once for everything held since the last
    /// store, then lets it go: QoS 2 deliveries PUBREC'd by the client are
    /// acknowledged on their cursors (their owed PUBREL is in the record),
    /// and held PUBREC / PUBCOMP packets are written (the incoming QoS 2
    /// state they announce is in the record). If the store fails the
    /// deliveries stay unacknowledged (a crash redelivers them, at least
    /// once) and the packets are written anyway: the state in memory is
    /// right, only a crash could lose it.
    async fn store_held(&mut self) {
        let acks = std::mem::take(&mut self.rel_acks);
        let held = std::mem::take(&mut self.held);
        if !acks.is_empty() || held.iter().any(|h| h.0) {
            match self
                .shared
                .store_session(&self.client_id, &self.session.record)
                .await
            {
                Ok(()) => {
                    for (c, off) in acks {
                        c.ack(off);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not store the session's QoS 2 state"),
            }
        }
        for (_, p) in held {
            self.wbuf_packet(&p);
        }
    }

    /// Gives the session back (or ends it), publishes the will when due.
    async fn release(mut self, end: End, gone: CancellationToken) {
        let shared = self.shared.clone();
        let persistent = self.expiry > 0;
        let now = now_ms();
        // Unacknowledged deliveries are redelivered with DUP and their id;
        // those of shared subscriptions go back to their group.
        for (id, f) in std::mem::take(&mut self.inflight) {
            if f.released {
                continue;
            }
            match (f.share, f.origin) {
                (Some((g, d)), _) => g.give_back(d),
                (None, Some(o)) => {
                    self.session.redeliver.insert(o, id);
                }
                (None, None) => {}
            }
        }
        for g in std::mem::take(&mut self.groups) {
            shared.leave_group(&g, persistent).await;
        }
        // A delayed will is stored with the session, so that a restart
        // before its delay ends still publishes it.
        let will = self
            .will
            .take()
            .filter(|_| matches!(end, End::WithWill | End::TakenOver))
            .map(|b| {
                let (w, delay) = *b;
                (
                    w,
                    if persistent {
                        delay.min(self.expiry)
                    } else {
                        0
                    },
                )
            });
        if persistent {
            self.session.record.expiry = self.expiry;
            self.session.record.disconnected_ms = now;
            self.session.record.will = will
                .as_ref()
                .filter(|(_, delay)| *delay > 0)
                .map(|(w, delay)| Box::new(StoredWill::new(w, now + i64::from(*delay) * 1000)));
            match shared
                .store_session(&self.client_id, &self.session.record)
                .await
            {
                Ok(()) => {
                    for (c, off) in std::mem::take(&mut self.rel_acks) {
                        c.ack(off);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not store session"),
            }
            let ledgers: Vec<Arc<Ledger>> = self
                .feeds
                .iter()
                .flat_map(|f| f.ledgers())
                .filter(|l| !l.is_closed())
                .cloned()
                .collect();
            for l in ledgers {
                let _ = l.persist_cursors().await;
            }
        } else if self.session.record.expiry > 0 {
            // Expiry lowered to 0 at DISCONNECT: the session ends now.
            shared.delete_session_state(&self.client_id).await;
        } else {
            // A session that ends with its connection may still have a
            // record: the will it held while online.
            shared.delete_session_record(&self.client_id).await;
        }
        let session = std::mem::take(&mut self.session);
        {
            let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let mine = s
                .get(&self.client_id)
                .and_then(|slot| slot.online.as_ref())
                .is_some_and(|o| o.conn_id == self.conn_id);
            if mine {
                if persistent {
                    if let Some(slot) = s.get_mut(&self.client_id) {
                        slot.online = None;
                        slot.stored = Some(Box::new(session));
                        slot.expires_at_ms = expiry_deadline(self.expiry, now);
                    }
                } else {
                    s.remove(&self.client_id);
                }
            }
        }
        gone.cancel();
        if let Some((w, delay)) = will {
            shared.schedule_will(&self.client_id, w, Duration::from_secs(u64::from(delay)));
        }
    }
}

/// The topic aliases of one connection's outgoing PUBLISHes (MQTT 5
/// 3.3.2.3.4): the first `max` distinct topics get aliases 1..=max, in the
/// order they are sent; the first PUBLISH of a topic carries the topic and
/// sets its alias, later ones carry only the alias. Aliases are never
/// reassigned, so a client that misses none cannot map one wrongly.
struct OutAliases {
    max: u16,
    by_topic: HashMap<String, u16>,
}

impl OutAliases {
    fn apply(&mut self, p: &mut Publish) {
        match self.by_topic.get(&p.topic) {
            Some(&alias) => {
                p.properties.topic_alias = Some(alias);
                p.topic.clear();
            }
            None if self.by_topic.len() < usize::from(self.max) => {
                let alias = self.by_topic.len() as u16 + 1;
                self.by_topic.insert(p.topic.clone(), alias);
                p.properties.topic_alias = Some(alias);
            }
            None => {}
        }
    }
}

thread_local! {
    /// Each worker thread's read buffer: a read takes everything the
    /// socket has (up to its size) with one call, and only those bytes are
    /// copied to the connection's buffer, so a busy connection neither
    /// reads twice per packet nor allocates a large buffer per read.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice());
}

/// Waits until the connection has input and appends it to `buf` (one read
/// of up to 64 KiB); `Ok(0)` at the end of the stream. Cancel-safe: bytes
/// are taken only in the poll that returns them.
async fn read_some(rd: &mut ReadHalf<Io>, buf: &mut BytesMut) -> std::io::Result<usize> {
    use std::task::Poll;
    use tokio::io::{AsyncRead, ReadBuf};
    std::future::poll_fn(|cx| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            match std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(rb.filled());
                    Poll::Ready(Ok(rb.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/")
}

fn ack(f: &Inflight) {
    if let (Some(c), Some((_, off))) = (&f.cursor, &f.origin) {
        c.ack(*off);
    }
}

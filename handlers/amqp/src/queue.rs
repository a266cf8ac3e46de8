//! A queue: a single-partition ledger topic plus the durable cursor
//! `amqp` (see `mapping::amqp`), with in-memory dispatch state.
//!
//! Offsets below the cursor's read position (`next_read`) have been taken
//! from the ledger: they are either buffered (read ahead, not yet
//! delivered), unacknowledged at some channel, requeued, or acknowledged.
//! A per-queue task ([`Queue::run`]) owns everything that happens at the
//! head: expiry (TTL), max-length drop-head, and delivery to consumers
//! round-robin within their prefetch credit. `basic.get` takes the head
//! directly.
//!
//! Redelivery after a restart: before a message is delivered the cursor
//! property `amqp.delivered` (an offset bound above every delivered
//! message) is persisted; on recovery every message below it is
//! delivered with `redelivered = true`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use broker::{AppendEntry, BrokerError, Cursor, EntryFormat, Ledger, TopicName};
use tokio::sync::{mpsc, Notify};

use crate::codec::{table_get, Table};
use crate::message::Msg;
use crate::vhost::VHost;
use crate::Shared;

const READ_BYTES: usize = 256 * 1024;
const BUFFER_LOW: usize = 128;
/// Deliveries queued to one connection's writer before dispatch waits.
pub(crate) const MAX_PENDING_DELIVERIES: usize = 1024;
const DELIVERED_PROP: &str = "amqp.delivered";

/// What to do when a queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// The queue arguments Manifold acts on.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueArgs {
    pub(crate) message_ttl: Option<u64>,
    pub(crate) expires: Option<u64>,
    pub(crate) max_length: Option<u64>,
    pub(crate) overflow: Option<Overflow>,
    pub(crate) dlx: Option<String>,
    pub(crate) dlrk: Option<String>,
}

impl QueueArgs {
    /// Parses and validates `x-*` arguments.
    ///
    /// # Errors
    /// A PRECONDITION_FAILED text naming the argument.
    pub(crate) fn parse(t: &Table) -> Result<QueueArgs, String> {
        let int = |name: &str, min: i64| -> Result<Option<u64>, String> {
            match table_get(t, name) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(i) if i >= min => Ok(Some(i as u64)),
                    _ => Err(format!("invalid arg '{name}': {v:?}")),
                },
            }
        };
        let text = |name: &str| -> Result<Option<String>, String> {
            match table_get(t, name) {
                None => Ok(None),
                Some(v) => v
                    .as_str()
                    .map(|s| Some(s.to_owned()))
                    .ok_or_else(|| format!("invalid arg '{name}': {v:?}")),
            }
        };
        if table_get(t, "x-max-length-bytes").is_some() {
            return Err("invalid arg 'x-max-length-bytes': not supported by Manifold".into());
        }
        let overflow = match text("x-overflow")?.as_deref() {
            None => None,
            Some("drop-head") => Some(Overflow::DropHead),
            Some("reject-publish") => Some(Overflow::RejectPublish),
            Some("reject-publish-dlx") => Some(Overflow::RejectPublishDlx),
            Some(o) => return Err(format!("invalid arg 'x-overflow': {o}")),
        };
        Ok(QueueArgs {
            message_ttl: int("x-message-ttl", 0)?,
            expires: int("x-expires", 1)?,
            max_length: int("x-max-length", 0)?,
            overflow,
            dlx: text("x-dead-letter-exchange")?,
            dlrk: text("x-dead-letter-routing-key")?,
        })
    }
}

/// A message taken from the queue.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    pub(crate) offset: u64,
    pub(crate) msg: Arc<Msg>,
    pub(crate) redelivered: bool,
}

/// Prefetch state of one channel, shared by its consumers.
#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) global_limit: u32,
    pub(crate) global_in_flight: u32,
    pub(crate) size_limit: u32,
    pub(crate) bytes_in_flight: u64,
    pub(crate) active: bool,
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            global_limit: 0,
            global_in_flight: 0,
            size_limit: 0,
            bytes_in_flight: 0,
            active: true,
        }
    }
}

/// What a queue's dispatcher sends to a connection.
#[derive(Debug)]
pub(crate) enum ConnEvent {
    Deliver {
        consumer: Arc<Consumer>,
        queue: Arc<Queue>,
        ready: Ready,
    },
    /// Publisher confirms of a channel: (sequence number, stored?).
    Confirms {
        channel: u16,
        results: Vec<(u64, bool)>,
    },
    /// The queue of a consumer was deleted.
    Cancelled { channel: u16, tag: String },
    /// Deliveries were written after dispatch had to wait.
    Drained,
}

/// The per-connection counters dispatch respects.
#[derive(Debug, Default)]
pub(crate) struct ConnShared {
    /// Deliveries sent to the connection and not yet written.
    pub(crate) pending: AtomicUsize,
    /// A dispatcher held back because of `pending`.
    pub(crate) stalled: std::sync::atomic::AtomicBool,
}

/// A consumer on a queue.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub(crate) tag: String,
    pub(crate) channel: u16,
    pub(crate) conn_id: u64,
    pub(crate) no_ack: bool,
    pub(crate) exclusive: bool,
    pub(crate) limit: u32,
    pub(crate) in_flight: AtomicU32,
    pub(crate) flow: Arc<Mutex<Flow>>,
    pub(crate) tx: mpsc::UnboundedSender<ConnEvent>,
    pub(crate) conn: Arc<ConnShared>,
}

impl Consumer {
    fn flow(&self) -> MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes credit for one delivery of `size` bytes, if the prefetch
    /// limits allow it.
    fn try_reserve(&self, size: usize) -> bool {
        if self.conn.pending.load(Ordering::Acquire) >= MAX_PENDING_DELIVERIES {
            self.conn.stalled.store(true, Ordering::Release);
            return false;
        }
        let mut f = self.flow();
        if !f.active {
            return false;
        }
        if self.no_ack {
            return true;
        }
        let mine = self.in_flight.load(Ordering::Acquire);
        if self.limit != 0 && mine >= self.limit {
            return false;
        }
        if f.global_limit != 0 && f.global_in_flight >= f.global_limit {
            return false;
        }
        if f.size_limit != 0
            && f.bytes_in_flight > 0
            && f.bytes_in_flight + size as u64 > u64::from(f.size_limit)
        {
            return false;
        }
        f.global_in_flight += 1;
        f.bytes_in_flight += size as u64;
        self.in_flight.store(mine + 1, Ordering::Release);
        true
    }

    /// Returns the credit of one settled delivery.
    pub(crate) fn release(&self, size: usize) {
        if self.no_ack {
            return;
        }
        let mut f = self.flow();
        f.global_in_flight = f.global_in_flight.saturating_sub(1);
        f.bytes_in_flight = f.bytes_in_flight.saturating_sub(size as u64);
        let v = self.in_flight.load(Ordering::Acquire);
        self.in_flight.store(v.saturating_sub(1), Ordering::Release);
    }
}

#[derive(Debug)]
struct QState {
    deleted: bool,
    next_read: u64,
    buffer: VecDeque<Ready>,
    requeued: BTreeMap<u64, Ready>,
    holes_ahead: u64,
    restart_watermark: u64,
    delivered_mark: u64,
    consumers: Vec<Arc<Consumer>>,
    rr: usize,
    pending_appends: u64,
    last_used: Instant,
}

/// A queue.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) name: String,
    pub(crate) vhost: Weak<VHost>,
    pub(crate) shared: Weak<Shared>,
    pub(crate) topic: TopicName,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) cursor: Arc<Cursor>,
    pub(crate) durable: bool,
    pub(crate) exclusive_owner: Option<u64>,
    pub(crate) auto_delete: bool,
    pub(crate) arguments: Table,
    pub(crate) args: QueueArgs,
    state: Mutex<QState>,
    notify: Notify,
    fill_lock: tokio::sync::Mutex<()>,
}

/// How a queue is declared.
#[derive(Debug, Clone)]
pub(crate) struct QueueDecl {
    pub(crate) name: String,
    pub(crate) durable: bool,
    pub(crate) exclusive_owner: Option<u64>,
    pub(crate) auto_delete: bool,
    pub(crate) arguments: Table,
    pub(crate) args: QueueArgs,
}

struct Step {
    deliveries: Vec<(Arc<Consumer>, Ready)>,
    expired: Vec<Ready>,
    dropped: Vec<Ready>,
    deadline: Option<i64>,
    expire_queue: bool,
    deleted: bool,
}

fn now_ms() -> i64 {
    broker::message::now_ms()
}

impl Queue {
    /// Opens the queue's topic and cursor (creating them if needed).
    ///
    /// # Errors
    /// Broker errors creating the topic or the cursor.
    pub(crate) async fn open(
        shared: &Arc<Shared>,
        vhost: &Arc<VHost>,
        decl: QueueDecl,
    ) -> Result<Arc<Queue>, BrokerError> {
        let broker = &shared.broker;
        let topic = mapping::amqp::queue_topic(&vhost.ns, &decl.name)?;
        if broker.topic(&topic).is_none() {
            match broker
                .create_topic(&topic, 1, broker::TopicConfig::default())
                .await
            {
                Ok(_) | Err(BrokerError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let ledger = broker.ledger(&topic, 0)?;
        let cursor = ledger
            .open_cursor(mapping::amqp::QUEUE_CURSOR, broker::InitialPosition::Latest)
            .await?;
        let start = ledger.start_offset();
        if cursor.mark_delete() < start {
            ledger.seek(&cursor, start);
        }
        let md = cursor.mark_delete();
        let delivered = cursor
            .property(DELIVERED_PROP)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(md);
        let holes = cursor.acked_above_mark_delete();
        let q = Arc::new(Queue {
            name: decl.name,
            vhost: Arc::downgrade(vhost),
            shared: Arc::downgrade(shared),
            topic,
            ledger,
            cursor,
            durable: decl.durable,
            exclusive_owner: decl.exclusive_owner,
            auto_delete: decl.auto_delete,
            arguments: decl.arguments,
            args: decl.args,
            state: Mutex::new(QState {
                deleted: false,
                next_read: md,
                buffer: VecDeque::new(),
                requeued: BTreeMap::new(),
                holes_ahead: holes,
                restart_watermark: delivered,
                delivered_mark: delivered,
                consumers: Vec::new(),
                rr: 0,
                pending_appends: 0,
                last_used: Instant::now(),
            }),
            notify: Notify::new(),
            fill_lock: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(q.clone().run());
        Ok(q)
    }

    fn lock(&self) -> MutexGuard<'_, QState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the queue is recreated after a restart.
    pub(crate) fn survives_restart(&self) -> bool {
        self.durable && self.exclusive_owner.is_none()
    }

    pub(crate) fn meta(&self) -> crate::meta::QueueMeta {
        crate::meta::QueueMeta {
            name: self.name.clone(),
            topic: self.topic.topic.clone(),
            durable: self.durable,
            exclusive: self.exclusive_owner.is_some(),
            auto_delete: self.auto_delete,
            arguments: crate::vhost::table_bytes(&self.arguments),
        }
    }

    fn ready_in(&self, st: &QState) -> u64 {
        let end = self.ledger.end_offset();
        (st.buffer.len() + st.requeued.len()) as u64
            + end
                .saturating_sub(st.next_read)
                .saturating_sub(st.holes_ahead)
    }

    /// Messages ready for delivery.
    pub(crate) fn message_count(&self) -> u64 {
        let st = self.lock();
        self.ready_in(&st)
    }

    /// Consumers attached.
    pub(crate) fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    /// Marks the queue used (for `x-expires`).
    pub(crate) fn touch(&self) {
        self.lock().last_used = Instant::now();
        self.notify.notify_one();
    }

    /// Adds a consumer.
    ///
    /// # Errors
    /// The ACCESS_REFUSED text when exclusivity forbids it.
    pub(crate) fn add_consumer(&self, c: Arc<Consumer>, vhost: &str) -> Result<(), String> {
        let mut st = self.lock();
        if st.consumers.iter().any(|o| o.exclusive) {
            return Err(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, vhost
            ));
        }
        if c.exclusive && !st.consumers.is_empty() {
            return Err(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, vhost
            ));
        }
        st.consumers.push(c);
        st.last_used = Instant::now();
        drop(st);
        self.notify.notify_one();
        Ok(())
    }

    /// Removes a consumer; returns whether the queue should now be
    /// auto-deleted.
    pub(crate) fn remove_consumer(&self, conn_id: u64, channel: u16, tag: &str) -> bool {
        let mut st = self.lock();
        let before = st.consumers.len();
        st.consumers
            .retain(|c| !(c.conn_id == conn_id && c.channel == channel && c.tag == tag));
        st.last_used = Instant::now();
        let removed = st.consumers.len() != before;
        removed && self.auto_delete && st.consumers.is_empty() && !st.deleted
    }

    /// Wakes the dispatcher (credit returned, flow changed...).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Marks the queue deleted and tells its consumers' connections.
    pub(crate) fn mark_deleted(&self) -> u64 {
        let (consumers, count) = {
            let mut st = self.lock();
            let count = self.ready_in(&st);
            st.deleted = true;
            st.buffer.clear();
            st.requeued.clear();
            (std::mem::take(&mut st.consumers), count)
        };
        for c in consumers {
            let _ = c.tx.send(ConnEvent::Cancelled {
                channel: c.channel,
                tag: c.tag.clone(),
            });
        }
        self.notify.notify_one();
        count
    }

    /// Acknowledges a delivered message.
    pub(crate) fn ack(&self, offset: u64) {
        if !self.is_deleted() {
            self.cursor.ack(offset);
        }
    }

    /// Puts delivered messages back at the head, flagged redelivered.
    pub(crate) fn requeue(&self, items: Vec<Ready>) {
        {
            let mut st = self.lock();
            if st.deleted {
                return;
            }
            for mut r in items {
                r.redelivered = true;
                st.requeued.insert(r.offset, r);
            }
        }
        self.notify.notify_one();
    }

    /// Removes every ready message; returns how many.
    pub(crate) async fn purge(&self) -> u64 {
        let _g = self.fill_lock.lock().await;
        let (n, range) = {
            let mut st = self.lock();
            let n = self.ready_in(&st);
            let end = self.ledger.end_offset();
            let mut offsets: Vec<u64> = st.buffer.drain(..).map(|r| r.offset).collect();
            offsets.extend(std::mem::take(&mut st.requeued).into_keys());
            let range = st.next_read..end.max(st.next_read);
            st.next_read = range.end;
            st.holes_ahead = 0;
            (n, (offsets, range))
        };
        for o in range.0 {
            self.cursor.ack(o);
        }
        if !range.1.is_empty() {
            self.cursor.ack_range(range.1);
        }
        n
    }

    /// Whether one more message may be appended (reject-publish
    /// overflow); reserves the room if so.
    pub(crate) fn admit(&self) -> bool {
        let mut st = self.lock();
        if let (Some(max), Some(Overflow::RejectPublish | Overflow::RejectPublishDlx)) =
            (self.args.max_length, self.args.overflow)
        {
            if self.ready_in(&st) + st.pending_appends >= max {
                return false;
            }
        }
        st.pending_appends += 1;
        true
    }

    /// Ends reservations made by [`Queue::admit`].
    pub(crate) fn appended(&self, n: u64) {
        let mut st = self.lock();
        st.pending_appends = st.pending_appends.saturating_sub(n);
        drop(st);
        self.notify.notify_one();
    }

    /// Reads ahead from the ledger into the buffer when it runs low.
    async fn fill(&self) -> Result<(), BrokerError> {
        let _g = self.fill_lock.lock().await;
        let from = {
            let st = self.lock();
            if st.deleted || st.buffer.len() >= BUFFER_LOW {
                return Ok(());
            }
            st.next_read
        };
        let end = self.ledger.end_offset();
        if from >= end {
            return Ok(());
        }
        let entries = match self.ledger.read(from, READ_BYTES).await {
            Ok(e) => e,
            Err(BrokerError::OffsetOutOfRange { start, .. }) if from < start => {
                // Trimmed below us (retention): continue at the start.
                let mut st = self.lock();
                st.next_read = start;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut got = Vec::new();
        let mut next = from;
        let mut holes = 0u64;
        for e in &entries {
            let end_off = e.base_offset + u64::from(e.count);
            match mapping::entry_messages(e) {
                Ok(msgs) => {
                    for (i, m) in msgs.iter().enumerate() {
                        let off = e.base_offset + i as u64;
                        if off < from {
                            continue;
                        }
                        if self.cursor.is_acked(off) {
                            holes += 1;
                            continue;
                        }
                        got.push((off, Arc::new(Msg::from_core(m, &self.name))));
                    }
                }
                Err(err) => {
                    tracing::warn!(queue = %self.name, offset = e.base_offset, error = %err,
                        "skipping an entry that cannot be decoded");
                    self.cursor.ack_range(e.base_offset.max(from)..end_off);
                }
            }
            next = next.max(end_off);
        }
        let mut st = self.lock();
        if st.next_read != from || st.deleted {
            return Ok(());
        }
        st.holes_ahead = st.holes_ahead.saturating_sub(holes);
        let wm = st.restart_watermark;
        for (offset, msg) in got {
            st.buffer.push_back(Ready {
                offset,
                msg,
                redelivered: offset < wm,
            });
        }
        st.next_read = next;
        Ok(())
    }

    fn pop_head(st: &mut QState) -> Option<Ready> {
        if let Some((&o, _)) = st.requeued.first_key_value() {
            return st.requeued.remove(&o);
        }
        st.buffer.pop_front()
    }

    fn peek_head(st: &QState) -> Option<&Ready> {
        st.requeued.values().next().or_else(|| st.buffer.front())
    }

    fn expire_head(&self, st: &mut QState, now: i64, out: &mut Vec<Ready>) -> Option<i64> {
        loop {
            let at = Self::peek_head(st)?.msg.expires_at(self.args.message_ttl);
            match at {
                Some(t) if t <= now => {
                    if let Some(r) = Self::pop_head(st) {
                        out.push(r);
                    }
                }
                other => return other,
            }
        }
    }

    fn step(&self) -> Step {
        let now = now_ms();
        let mut st = self.lock();
        let mut s = Step {
            deliveries: Vec::new(),
            expired: Vec::new(),
            dropped: Vec::new(),
            deadline: None,
            expire_queue: false,
            deleted: st.deleted,
        };
        if st.deleted {
            return s;
        }
        if let (Some(max), None | Some(Overflow::DropHead)) =
            (self.args.max_length, self.args.overflow)
        {
            while self.ready_in(&st) > max {
                match Self::pop_head(&mut st) {
                    Some(r) => s.dropped.push(r),
                    None => break,
                }
            }
        }
        s.deadline = self.expire_head(&mut st, now, &mut s.expired);
        while let Some(head) = Self::peek_head(&st) {
            if head
                .msg
                .expires_at(self.args.message_ttl)
                .is_some_and(|t| t <= now)
            {
                break;
            }
            let size = head.msg.size();
            let n = st.consumers.len();
            let mut picked = None;
            for i in 0..n {
                let idx = (st.rr + i) % n;
                if st.consumers[idx].try_reserve(size) {
                    st.rr = idx + 1;
                    picked = Some(st.consumers[idx].clone());
                    break;
                }
            }
            let Some(c) = picked else { break };
            if let Some(r) = Self::pop_head(&mut st) {
                s.deliveries.push((c, r));
            }
        }
        if let Some(exp) = self.args.expires {
            if st.consumers.is_empty() {
                let idle = st.last_used.elapsed();
                if idle >= Duration::from_millis(exp) {
                    s.expire_queue = true;
                } else {
                    let left = Duration::from_millis(exp) - idle;
                    let t = now + left.as_millis() as i64;
                    s.deadline = Some(s.deadline.map_or(t, |d| d.min(t)));
                }
            }
        }
        s
    }

    /// Makes sure a restart will flag everything up to `upto` redelivered.
    async fn mark_delivered(&self, upto: u64) {
        if !self.durable {
            return;
        }
        let target = {
            let st = self.lock();
            if upto <= st.delivered_mark {
                return;
            }
            st.next_read.max(upto)
        };
        self.cursor
            .set_property(DELIVERED_PROP, &target.to_string());
        if let Err(e) = self.ledger.persist_cursors().await {
            tracing::warn!(queue = %self.name, error = %e, "could not persist the delivery mark");
        }
        let mut st = self.lock();
        st.delivered_mark = st.delivered_mark.max(target);
    }

    /// The dispatcher task.
    async fn run(self: Arc<Self>) {
        let mut end_rx = self.ledger.watch_end();
        let mut rounds = 0u32;
        loop {
            if let Err(e) = self.fill().await {
                // A closed ledger (the queue deleted, the gateway stopping)
                // has nothing more to read.
                if self.is_deleted() || self.ledger.is_closed() {
                    return;
                }
                tracing::warn!(queue = %self.name, error = %e, "queue read failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let s = self.step();
            if s.deleted {
                return;
            }
            let progress =
                !s.deliveries.is_empty() || !s.expired.is_empty() || !s.dropped.is_empty();
            if !s.deliveries.is_empty() {
                let max = s
                    .deliveries
                    .iter()
                    .map(|(_, r)| r.offset)
                    .max()
                    .unwrap_or(0);
                self.mark_delivered(max + 1).await;
                for (c, r) in s.deliveries {
                    if c.no_ack {
                        self.cursor.ack(r.offset);
                    }
                    c.conn.pending.fetch_add(1, Ordering::AcqRel);
                    let ev = ConnEvent::Deliver {
                        consumer: c.clone(),
                        queue: self.clone(),
                        ready: r,
                    };
                    if let Err(mpsc::error::SendError(ev)) = c.tx.send(ev) {
                        c.conn.pending.fetch_sub(1, Ordering::AcqRel);
                        if let ConnEvent::Deliver { ready, .. } = ev {
                            if !c.no_ack {
                                c.release(ready.msg.size());
                                self.requeue(vec![ready]);
                            }
                        }
                    }
                }
            }
            if !s.expired.is_empty() {
                self.dead_letter(s.expired, "expired").await;
            }
            if !s.dropped.is_empty() {
                self.dead_letter(s.dropped, "maxlen").await;
            }
            if s.expire_queue {
                if let (Some(shared), Some(vh)) = (self.shared.upgrade(), self.vhost.upgrade()) {
                    let name = self.name.clone();
                    tokio::spawn(async move {
                        shared.delete_queue(&vh, &name).await;
                    });
                }
                return;
            }
            if progress {
                rounds += 1;
                if rounds & 15 == 0 {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            let sleep = async {
                match s.deadline {
                    Some(t) => {
                        let wait = (t - now_ms()).max(0) as u64;
                        tokio::time::sleep(Duration::from_millis(wait + 1)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = self.notify.notified() => {}
                r = end_rx.changed() => if r.is_err() { return },
                _ = sleep => {}
            }
        }
    }

    /// `basic.get`: takes the head. Returns it and the ready count left.
    ///
    /// # Errors
    /// Broker read errors.
    pub(crate) async fn get(self: &Arc<Self>) -> Result<Option<(Ready, u64)>, BrokerError> {
        loop {
            self.fill().await?;
            let (r, expired, left) = {
                let mut st = self.lock();
                if st.deleted {
                    return Ok(None);
                }
                st.last_used = Instant::now();
                let mut expired = Vec::new();
                self.expire_head(&mut st, now_ms(), &mut expired);
                let r = Self::pop_head(&mut st);
                (r, expired, self.ready_in(&st))
            };
            let had_expired = !expired.is_empty();
            if had_expired {
                self.dead_letter(expired, "expired").await;
            }
            match r {
                Some(r) => {
                    self.mark_delivered(r.offset + 1).await;
                    return Ok(Some((r, left)));
                }
                None if had_expired => continue,
                None => {
                    let st = self.lock();
                    if st.next_read < self.ledger.end_offset() && st.buffer.is_empty() {
                        drop(st);
                        continue;
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Dead-letters (or, without a dead-letter exchange, drops) messages
    /// taken from this queue, then acknowledges them.
    pub(crate) async fn dead_letter(self: &Arc<Self>, items: Vec<Ready>, reason: &str) {
        if let (Some(dlx), Some(vhost)) = (self.args.dlx.as_deref(), self.vhost.upgrade()) {
            let now = (now_ms() / 1000).max(0) as u64;
            let mut kept = Vec::new();
            for r in &items {
                let Some(m) =
                    r.msg
                        .dead_lettered(&self.name, reason, dlx, self.args.dlrk.as_deref(), now)
                else {
                    continue;
                };
                let exists = vhost.lock().exchanges.contains_key(dlx);
                if !exists {
                    continue;
                }
                let routed = vhost.route(dlx, &m.routing_key, m.props.headers.as_ref());
                if let Err(e) = append_to_queues(&routed.queues, &m).await {
                    // Not stored in its dead-letter queues: it is not
                    // removed from this one either (it stays unacknowledged
                    // and comes back after a restart).
                    tracing::error!(queue = %self.name, error = %e, "dead-lettering failed; message kept");
                    kept.push(r.offset);
                }
            }
            if !kept.is_empty() {
                for r in items {
                    if !kept.contains(&r.offset) {
                        self.cursor.ack(r.offset);
                    }
                }
                metrics::counter!("manifold_amqp_dead_lettered_total").increment(1);
                return;
            }
        }
        for r in items {
            self.cursor.ack(r.offset);
        }
        metrics::counter!("manifold_amqp_dead_lettered_total").increment(1);
    }
}

/// Appends one message to each queue (those that admit it); completes
/// when every append is durable. Returns whether every admitting queue
/// stored it and whether any queue refused it (reject-publish).
///
/// # Errors
/// The first broker error of an append.
pub(crate) async fn append_to_queues(queues: &[Arc<Queue>], m: &Msg) -> Result<bool, BrokerError> {
    let now = now_ms();
    let payload = broker::message::encode_batch(&[m.to_core(now)]);
    let mut set = tokio::task::JoinSet::new();
    let mut rejected = false;
    for q in queues {
        if !q.admit() {
            rejected = true;
            continue;
        }
        let q = q.clone();
        let entry = AppendEntry {
            format: EntryFormat::Messages,
            count: 1,
            first_timestamp: now,
            max_timestamp: now,
            payload: payload.clone(),
        };
        set.spawn(async move {
            let r = q.ledger.append(entry).await;
            q.appended(1);
            match r {
                Err(BrokerError::Closed) if q.is_deleted() => Ok(()),
                Err(e) => Err(e),
                Ok(_) => Ok(()),
            }
        });
    }
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(BrokerError::Closed);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(!rejected),
    }
}

/// Value helper for server-named things.
pub(crate) fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut out = String::new();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_i64(now_ms());
        let mut v = h.finish();
        for _ in 0..11 {
            out.push(ALPHABET[(v & 63) as usize] as char);
            v >>= 6;
        }
    }
    out
}

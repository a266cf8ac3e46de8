//! The partitions one connection reads for its subscriptions.
//!
//! The connection task reads them itself: each partition is a [`Feed`]
//! (a position, and a durable cursor for a persistent session) registered
//! with its ledger under a token of one [`ReadySet`]. When a ledger's end
//! moves the connection wakes, takes the ready tokens, and reads those
//! feeds while its in-flight window has room, so a slow client holds back
//! only its own reads. There is no task, channel or allocation per
//! partition or message between the ledger and the socket. A shared
//! subscription's group reads each partition with a [`Feed`] too, one task
//! per partition (`share`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use broker::{BrokerError, Cursor, Follow, Ledger, Message, ReadySet};
use mapping::mqtt as map;

use crate::state::FeedKey;

/// Most bytes one read of a feed takes from its ledger.
const READ_BYTES: usize = 256 * 1024;

/// One partition a connection reads.
pub(crate) struct Feed {
    pub(crate) key: FeedKey,
    pub(crate) ledger: Arc<Ledger>,
    /// The session's cursor (persistent sessions): deliveries are
    /// acknowledged on it.
    pub(crate) cursor: Option<Arc<Cursor>>,
    /// The MQTT topic, for messages that do not carry theirs.
    pub(crate) fallback: Arc<str>,
    /// The next offset to read.
    next: u64,
    /// Messages read and not yet delivered (the window filled), with their
    /// offsets.
    held: VecDeque<(u64, Message)>,
    /// Its token is in [`Feeds::ready`].
    in_ready: bool,
    _follow: Follow,
}

/// What [`Feed::next`] found.
pub(crate) enum Step {
    Message(u64, Message),
    /// Nothing more until the ledger's end moves.
    CaughtUp,
    /// The ledger closed (its topic was deleted, or the gateway stops).
    Closed,
}

impl Feed {
    /// A feed reading `ledger` from `next`, registered with `set` under
    /// `token` (ready at once).
    pub(crate) fn new(
        key: FeedKey,
        ledger: Arc<Ledger>,
        cursor: Option<Arc<Cursor>>,
        next: u64,
        fallback: Arc<str>,
        set: &Arc<ReadySet>,
        token: u32,
    ) -> Feed {
        let follow = ledger.follow(set, token);
        Feed {
            key,
            ledger,
            cursor,
            fallback,
            next,
            held: VecDeque::new(),
            in_ready: false,
            _follow: follow,
        }
    }

    /// The next message to deliver, reading the ledger when none is held.
    /// Messages the cursor already acknowledged are skipped; a message
    /// published with QoS 2 is handed out only once it is durable.
    pub(crate) async fn next(&mut self) -> Step {
        loop {
            if let Some((off, msg)) = self.held.pop_front() {
                return Step::Message(off, msg);
            }
            if self.ledger.is_closed() {
                return Step::Closed;
            }
            if self.next >= self.ledger.end_offset() {
                return Step::CaughtUp;
            }
            match self.ledger.read(self.next, READ_BYTES).await {
                Ok(entries) if entries.is_empty() => return Step::CaughtUp,
                Ok(entries) => {
                    if !self.hold(entries).await {
                        return Step::Closed;
                    }
                }
                Err(BrokerError::OffsetOutOfRange { start, end, .. })
                    if self.next < start || self.next > end =>
                {
                    self.next = if self.next < start { start } else { end };
                }
                Err(BrokerError::Closed) => return Step::Closed,
                Err(e) => {
                    // Tried again when the ledger's end next moves.
                    tracing::warn!(ledger = self.ledger.name(), error = %e, "feed read failed");
                    return Step::CaughtUp;
                }
            }
        }
    }

    /// Decodes what was read into `held`; `false` if the ledger stopped
    /// before a QoS 2 message in it became durable.
    async fn hold(&mut self, entries: Vec<broker::Entry>) -> bool {
        for e in entries {
            let end = e.base_offset + u64::from(e.count);
            let msgs = match mapping::entry_messages(&e) {
                Ok(m) => m,
                Err(err) => {
                    tracing::warn!(ledger = self.ledger.name(), offset = e.base_offset, error = %err, "skipping unreadable entry");
                    self.next = self.next.max(end);
                    continue;
                }
            };
            if end > self.ledger.durable_end() && msgs.iter().any(map::published_exactly_once) {
                // Entries are readable before they are durable; QoS 2 is
                // forwarded only once it would survive a crash.
                if self.ledger.wait_durable(end).await.is_err() {
                    return false;
                }
            }
            for (i, msg) in msgs.into_iter().enumerate() {
                let off = e.base_offset + i as u64;
                if off < self.next {
                    continue;
                }
                self.next = off + 1;
                if self.cursor.as_ref().is_some_and(|c| c.is_acked(off)) {
                    continue;
                }
                self.held.push_back((off, msg));
            }
            self.next = self.next.max(end);
        }
        true
    }
}

/// A connection's feeds, by token (the index of their slot).
pub(crate) struct Feeds {
    set: Arc<ReadySet>,
    slots: Vec<Option<Box<Feed>>>,
    free: Vec<u32>,
    by_key: HashMap<FeedKey, u32>,
    /// Feeds that may have messages, in turn.
    ready: VecDeque<u32>,
}

impl Feeds {
    pub(crate) fn new() -> Feeds {
        Feeds {
            set: ReadySet::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// The set to wait on for ready feeds.
    pub(crate) fn set(&self) -> &Arc<ReadySet> {
        &self.set
    }

    pub(crate) fn get(&self, key: &FeedKey) -> Option<&Feed> {
        let &t = self.by_key.get(key)?;
        self.slots[t as usize].as_deref()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &FeedKey> {
        self.by_key.keys()
    }

    pub(crate) fn ledgers(&self) -> impl Iterator<Item = &Arc<Ledger>> {
        self.slots.iter().flatten().map(|f| &f.ledger)
    }

    /// Adds a feed reading `ledger` from `next` (replacing one of the same
    /// key); it is ready at once.
    pub(crate) fn insert(
        &mut self,
        key: FeedKey,
        ledger: Arc<Ledger>,
        cursor: Option<Arc<Cursor>>,
        next: u64,
        fallback: Arc<str>,
    ) {
        self.remove(&key);
        let token = match self.free.pop() {
            Some(t) => t,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.by_key.insert(key.clone(), token);
        let feed = Feed::new(key, ledger, cursor, next, fallback, &self.set, token);
        self.slots[token as usize] = Some(Box::new(feed));
    }

    /// Removes a feed (its ledger stops waking this connection for it).
    pub(crate) fn remove(&mut self, key: &FeedKey) {
        if let Some(t) = self.by_key.remove(key) {
            self.slots[t as usize] = None;
            self.free.push(t);
        }
    }

    /// Takes the ready tokens from the set: `true` if some feed may have
    /// messages.
    pub(crate) fn collect(&mut self) -> bool {
        let from = self.ready.len();
        self.set.take_into(&mut self.ready);
        // A token already waiting for its turn keeps its place.
        let mut i = from;
        while i < self.ready.len() {
            let t = self.ready[i] as usize;
            match self.slots.get_mut(t).and_then(|s| s.as_deref_mut()) {
                Some(f) if !f.in_ready => {
                    f.in_ready = true;
                    i += 1;
                }
                _ => {
                    self.ready.remove(i);
                }
            }
        }
        !self.ready.is_empty()
    }

    pub(crate) fn any_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Takes the feed whose turn it is out of its slot; give it back with
    /// [`Feeds::put_back`].
    pub(crate) fn take_next(&mut self) -> Option<(u32, Box<Feed>)> {
        while let Some(t) = self.ready.pop_front() {
            if let Some(mut f) = self.slots.get_mut(t as usize).and_then(Option::take) {
                f.in_ready = false;
                return Some((t, f));
            }
        }
        None
    }

    /// Puts a feed taken with [`Feeds::take_next`] back; `again`: it may
    /// have more, and takes another turn after the others.
    pub(crate) fn put_back(&mut self, token: u32, mut f: Box<Feed>, again: bool) {
        if again {
            f.in_ready = true;
            self.ready.push_back(token);
        }
        self.slots[token as usize] = Some(f);
    }

    /// Forgets a feed taken with [`Feeds::take_next`] (its ledger closed).
    pub(crate) fn drop_taken(&mut self, token: u32, f: &Feed) {
        if self.by_key.get(&f.key) == Some(&token) {
            self.by_key.remove(&f.key);
        }
        self.free.push(token);
    }
}

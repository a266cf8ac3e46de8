//! Shared subscriptions `$share/<group>/<filter>`.
//!
//! A group (one per group name and filter) reads every partition its filter
//! matches through one durable cursor per partition
//! (`mapping::mqtt::shared_cursor_name`), so its position survives members
//! leaving and gateway restarts. Its feeds put messages into one bounded
//! queue; members *pull* from it only while their in-flight window has
//! room, so a message goes to exactly one member and a slow member gets
//! fewer messages (least-loaded, FIFO among waiting members). Members
//! acknowledge on the group cursor (PUBACK, PUBREC). A member that leaves
//! with unacknowledged messages gives them back to the group, which hands
//! them to another member first. The group runs while it has connected
//! members; with none left its feeds stop and the cursor keeps the
//! position (or is deleted when no session holds the subscription any
//! more).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use broker::{Cursor, InitialPosition, Ledger, Message, ReadySet};
use mapping::mqtt as map;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::feeds::{Feed, Step};
use crate::state::{FeedKey, KnownTopic, Shared};

struct GroupRx {
    rx: mpsc::Receiver<Box<Delivery>>,
    /// Messages given back by members that left: served first.
    re_rx: mpsc::UnboundedReceiver<Box<Delivery>>,
}

/// One shared subscription group (`$share/<name>/<filter>`).
pub(crate) struct Group {
    /// `<name>/<filter>`: the subscription filter without `$share/`.
    pub(crate) key: String,
    pub(crate) filter: String,
    cursor_name: String,
    /// Topics that appear later are read from this time on.
    since_ms: i64,
    tx: mpsc::Sender<Box<Delivery>>,
    re_tx: mpsc::UnboundedSender<Box<Delivery>>,
    rx: tokio::sync::Mutex<GroupRx>,
    /// The feed tasks, with the ledger each reads.
    feeds: tokio::sync::Mutex<HashMap<FeedKey, (AbortHandle, Arc<Ledger>)>>,
    /// Connected members (changed under `Shared::groups`' lock).
    members: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("key", &self.key).finish()
    }
}

impl Group {
    fn new(name: &str, filter: &str, since_ms: i64) -> Group {
        let (tx, rx) = mpsc::channel(64);
        let (re_tx, re_rx) = mpsc::unbounded_channel();
        Group {
            key: format!("{name}/{filter}"),
            filter: filter.to_owned(),
            cursor_name: map::shared_cursor_name(name, filter),
            since_ms,
            tx,
            re_tx,
            rx: tokio::sync::Mutex::new(GroupRx { rx, re_rx }),
            feeds: tokio::sync::Mutex::new(HashMap::new()),
            members: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The next message for a member with room (waits its turn).
    pub(crate) async fn pull(&self) -> Box<Delivery> {
        let mut g = self.rx.lock().await;
        let GroupRx { rx, re_rx } = &mut *g;
        tokio::select! {
            biased;
            Some(d) = re_rx.recv() => d,
            Some(d) = rx.recv() => d,
            else => std::future::pending().await,
        }
    }

    /// A message if one is ready and no other member is waiting.
    pub(crate) fn try_pull(&self) -> Option<Box<Delivery>> {
        let mut g = self.rx.try_lock().ok()?;
        if let Ok(d) = g.re_rx.try_recv() {
            return Some(d);
        }
        g.rx.try_recv().ok()
    }

    /// Gives an unacknowledged message back for another member.
    pub(crate) fn give_back(&self, d: Box<Delivery>) {
        let _ = self.re_tx.send(d);
    }

    /// Starts feeds for every partition of `k` if the filter matches it.
    /// `at_end`: an existing topic without a group cursor is read from its
    /// end (a new subscription); otherwise from the group's creation time.
    pub(crate) async fn start_feeds(&self, shared: &Shared, k: &KnownTopic, at_end: bool) {
        if !map::topic_matches(&self.filter, &k.mqtt) {
            return;
        }
        let mut feeds = self.feeds.lock().await;
        for p in 0..k.partitions {
            let key: FeedKey = Arc::new((k.name.clone(), p));
            // A feed whose ledger closed (the topic was deleted and is
            // now created again) is replaced.
            if feeds.get(&key).is_some_and(|(_, l)| !l.is_closed()) {
                continue;
            }
            let Ok(ledger) = shared.broker.ledger(&k.name, p) else {
                continue;
            };
            let cursor = match ledger.cursor(&self.cursor_name) {
                Some(c) => c,
                None => {
                    let end = ledger.end_offset();
                    let pos = if at_end {
                        end
                    } else {
                        match ledger.find_offset_by_timestamp(self.since_ms).await {
                            Ok(Some(o)) => o,
                            _ => end,
                        }
                    };
                    match ledger
                        .open_cursor(&self.cursor_name, InitialPosition::Offset(pos))
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not open shared cursor");
                            continue;
                        }
                    }
                }
            };
            let next = cursor.mark_delete();
            let ready = ReadySet::new();
            let f = Feed::new(
                key.clone(),
                ledger.clone(),
                Some(cursor),
                next,
                k.mqtt.clone(),
                &ready,
                0,
            );
            let task = tokio::spawn(feed(f, ready, self.tx.clone()));
            if let Some((old, _)) = feeds.insert(key, (task.abort_handle(), ledger)) {
                old.abort();
            }
        }
    }
}

impl Shared {
    /// Joins (creating if needed) the group `$share/<name>/<filter>` and
    /// starts its feeds on the known topics.
    pub(crate) async fn join_group(
        &self,
        name: &str,
        filter: &str,
        since_ms: i64,
        at_end: bool,
    ) -> Arc<Group> {
        let g = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let g = groups
                .entry(format!("{name}/{filter}"))
                .or_insert_with(|| Arc::new(Group::new(name, filter, since_ms)))
                .clone();
            g.members.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            g
        };
        for k in self.known_topics() {
            g.start_feeds(self, &k, at_end).await;
        }
        g
    }

    /// Leaves a group. The last member stops its feeds and persists the
    /// group's cursors; `keep` false deletes them unless an offline
    /// session still holds the subscription.
    pub(crate) async fn leave_group(&self, g: &Arc<Group>, keep: bool) {
        let last = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let n = g.members.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if n == 1 {
                if groups.get(&g.key).is_some_and(|x| Arc::ptr_eq(x, g)) {
                    groups.remove(&g.key);
                }
                true
            } else {
                false
            }
        };
        if !last {
            return;
        }
        let keys: Vec<FeedKey> = {
            let mut feeds = g.feeds.lock().await;
            for (h, _) in feeds.values() {
                h.abort();
            }
            feeds.drain().map(|(k, _)| k).collect()
        };
        let filter = format!("$share/{}", g.key);
        let held = keep || self.held_offline(&filter);
        for k in keys {
            let Ok(l) = self.broker.ledger(&k.0, k.1) else {
                continue;
            };
            if held {
                let _ = l.persist_cursors().await;
            } else {
                let _ = l.delete_cursor(&g.cursor_name).await;
            }
        }
    }

    /// Deletes the cursors of the shared subscription `filter`
    /// (`$share/<group>/<f>`) when no connected member and no offline
    /// session holds it any more (the last session holding it expired).
    pub(crate) async fn forget_shared_if_unheld(&self, filter: &str) {
        let Ok(Some((name, f))) = map::parse_shared(filter) else {
            return;
        };
        let live = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&format!("{name}/{f}"));
        if live || self.held_offline(filter) {
            return;
        }
        self.delete_cursor_on_topics(&map::shared_cursor_name(name, f), |k| {
            map::topic_matches(f, &k.mqtt)
        })
        .await;
    }

    /// Whether a stored (offline) session subscribes to `filter`.
    fn held_offline(&self, filter: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|s| s.stored.as_ref())
            .any(|s| s.record.subs.iter().any(|r| r.filter == filter))
    }
}

/// Waits for a message from any of `groups`.
pub(crate) async fn pull_any(groups: &[Arc<Group>]) -> (Arc<Group>, Box<Delivery>) {
    if let [g] = groups {
        return (g.clone(), g.pull().await);
    }
    let mut futs: Vec<Pin<Box<dyn Future<Output = Box<Delivery>> + Send + '_>>> =
        groups.iter().map(|g| Box::pin(g.pull()) as _).collect();
    std::future::poll_fn(|cx| {
        for (i, f) in futs.iter_mut().enumerate() {
            if let Poll::Ready(d) = f.as_mut().poll(cx) {
                return Poll::Ready((groups[i].clone(), d));
            }
        }
        Poll::Pending
    })
    .await
}

/// A message of the group's feeds, on its way to a member.
pub(crate) struct Delivery {
    pub(crate) key: FeedKey,
    pub(crate) cursor: Option<Arc<Cursor>>,
    pub(crate) offset: u64,
    pub(crate) msg: Message,
    pub(crate) fallback: Arc<str>,
}

/// Reads one partition and hands its messages to the group (the reading,
/// the skipping of acknowledged messages and the durability of QoS 2 are
/// [`Feed::next`]'s); ends when the ledger closes (its topic deleted) or
/// the group's queue is gone.
async fn feed(mut f: Feed, ready: Arc<ReadySet>, tx: mpsc::Sender<Box<Delivery>>) {
    // The token is cleared before the feed looks at the end again, and the
    // task waits only if it is still caught up then: an append from then
    // on queues the token again and wakes the wait.
    let mut cleared = false;
    loop {
        match f.next().await {
            Step::Message(offset, msg) => {
                cleared = false;
                let d = Box::new(Delivery {
                    key: f.key.clone(),
                    cursor: f.cursor.clone(),
                    offset,
                    msg,
                    fallback: f.fallback.clone(),
                });
                if tx.send(d).await.is_err() {
                    return;
                }
            }
            Step::CaughtUp if cleared => {
                ready.wait().await;
                cleared = false;
            }
            Step::CaughtUp => {
                ready.clear();
                cleared = true;
            }
            Step::Closed => return,
        }
    }
}

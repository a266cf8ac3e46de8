//! The per-channel publish pipeline: routed messages are appended to their
//! queues' ledgers in channel order, grouped into one entry per queue for
//! everything that queued up while the previous group was being made
//! durable (handler-level group commit), and publisher confirms are sent
//! once the appends are durable.

use std::sync::Arc;

use broker::{AppendEntry, BrokerError, EntryFormat, Message};
use tokio::sync::{mpsc, oneshot};

use crate::message::Msg;
use crate::queue::{ConnEvent, Queue};

const MAX_BATCH: usize = 1024;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One item of a channel's pipeline.
// Barriers are rare (one per tx.commit); boxing every publish would cost
// an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum PubItem {
    /// Store `msg` in `queues`; confirm `seq` if set.
    Publish {
        seq: Option<u64>,
        queues: Vec<Arc<Queue>>,
        msg: Msg,
    },
    /// Completes once everything before it is stored.
    Barrier(oneshot::Sender<()>),
}

/// Starts a channel's pipeline; it ends when the sender is dropped and
/// everything queued is stored.
pub(crate) fn spawn(
    channel: u16,
    depth: usize,
    events: mpsc::UnboundedSender<ConnEvent>,
) -> mpsc::Sender<PubItem> {
    let (tx, rx) = mpsc::channel(depth);
    tokio::spawn(run(channel, rx, events));
    tx
}

async fn run(
    channel: u16,
    mut rx: mpsc::Receiver<PubItem>,
    events: mpsc::UnboundedSender<ConnEvent>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut bytes = 0usize;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(item) => {
                    if let PubItem::Publish { msg, .. } = &item {
                        bytes += msg.body.len();
                    }
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        process(channel, batch, &events).await;
    }
}

async fn process(channel: u16, batch: Vec<PubItem>, events: &mpsc::UnboundedSender<ConnEvent>) {
    let now = broker::message::now_ms();
    let mut failed = vec![false; batch.len()];
    // (queue, item indexes, messages)
    let mut groups: Vec<(Arc<Queue>, Vec<usize>, Vec<Message>)> = Vec::new();
    let mut barriers = Vec::new();
    for (i, item) in batch.iter().enumerate() {
        let PubItem::Publish { queues, msg, .. } = item else {
            continue;
        };
        if queues.is_empty() {
            continue;
        }
        let core = msg.to_core(now);
        for q in queues {
            if !q.admit() {
                failed[i] = true;
                continue;
            }
            match groups.iter_mut().find(|g| Arc::ptr_eq(&g.0, q)) {
                Some(g) => {
                    g.1.push(i);
                    g.2.push(core.clone());
                }
                None => groups.push((q.clone(), vec![i], vec![core.clone()])),
            }
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for (gi, (q, idx, msgs)) in groups.iter().enumerate() {
        let q = q.clone();
        let n = idx.len() as u64;
        let entry = AppendEntry {
            format: EntryFormat::Messages,
            count: msgs.len() as u32,
            first_timestamp: now,
            max_timestamp: now,
            payload: broker::message::encode_batch(msgs),
        };
        set.spawn(async move {
            let r = q.ledger.append(entry).await;
            q.appended(n);
            let ok = match r {
                Ok(_) => true,
                Err(BrokerError::Closed) if q.is_deleted() => true,
                Err(e) => {
                    tracing::warn!(queue = %q.name, error = %e, "append failed; publishes are nacked");
                    false
                }
            };
            (gi, ok)
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok((gi, ok)) => {
                if !ok {
                    for &i in &groups[gi].1 {
                        failed[i] = true;
                    }
                }
            }
            Err(_) => {
                // A panicked append task: nack everything of the batch.
                failed.iter_mut().for_each(|f| *f = true);
            }
        }
    }
    let mut results = Vec::new();
    let mut stored = 0u64;
    for (i, item) in batch.into_iter().enumerate() {
        match item {
            PubItem::Publish { seq, .. } => {
                if !failed[i] {
                    stored += 1;
                }
                if let Some(s) = seq {
                    results.push((s, !failed[i]));
                }
            }
            PubItem::Barrier(tx) => barriers.push(tx),
        }
    }
    metrics::counter!("manifold_amqp_messages_published_total").increment(stored);
    if !results.is_empty() {
        let _ = events.send(ConnEvent::Confirms { channel, results });
    }
    for b in barriers {
        let _ = b.send(());
    }
}

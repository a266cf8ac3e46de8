//! The per-channel publish pipeline: routed messages are appended to their
//! queues' ledgers in channel order, grouped into one entry per queue for
//! everything that queued up while the previous group was being made
//! durable (handler-level group commit), and publisher confirms are sent
//! once the appends are durable.
//!
//! A [`PubItem::Barrier`] (tx.commit) completes once everything queued
//! before it is durable, with whether all of it was stored: a publish that
//! could not be stored (a refused append, or a queue that rejects
//! publishes when full) makes the next barrier report `false`.

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
    /// Completes once everything queued before it is durable; `true` when
    /// every publish since the previous barrier was stored.
    Barrier(oneshot::Sender<bool>),
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
    // A publish since the last barrier could not be stored.
    let mut failed_since_barrier = false;
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
        process(channel, batch, &events, &mut failed_since_barrier).await;
    }
}

async fn process(
    channel: u16,
    batch: Vec<PubItem>,
    events: &mpsc::UnboundedSender<ConnEvent>,
    failed_since_barrier: &mut bool,
) {
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
                if failed[i] {
                    *failed_since_barrier = true;
                } else {
                    stored += 1;
                }
                if let Some(s) = seq {
                    results.push((s, !failed[i]));
                }
            }
            PubItem::Barrier(tx) => {
                barriers.push((tx, !*failed_since_barrier));
                *failed_since_barrier = false;
            }
        }
    }
    metrics::counter!("manifold_amqp_messages_published_total").increment(stored);
    if !results.is_empty() {
        let _ = events.send(ConnEvent::Confirms { channel, results });
    }
    for (b, ok) in barriers {
        let _ = b.send(ok);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use bytes::Bytes;
    use handler_api::testkit::TestBroker;

    use super::*;
    use crate::codec::BasicProperties;
    use crate::queue::{Overflow, QueueArgs, QueueDecl};
    use crate::vhost::VHost;
    use crate::{AmqpConfig, Shared};

    async fn setup(tb: &TestBroker) -> (Arc<Shared>, Arc<VHost>) {
        let shared = Arc::new(Shared {
            broker: tb.broker.clone(),
            config: AmqpConfig::default(),
            vhosts: Mutex::new(HashMap::new()),
            decl_lock: tokio::sync::Mutex::new(()),
            persist_lock: tokio::sync::Mutex::new(()),
            conn_ids: AtomicU64::new(1),
            max_message_bytes: 1 << 20,
        });
        let vhost = shared.vhost("/", true).await.unwrap().unwrap();
        (shared, vhost)
    }

    async fn queue(
        shared: &Arc<Shared>,
        vhost: &Arc<VHost>,
        name: &str,
        args: QueueArgs,
    ) -> Arc<Queue> {
        Queue::open(
            shared,
            vhost,
            QueueDecl {
                name: name.into(),
                durable: true,
                exclusive_owner: None,
                auto_delete: false,
                arguments: Vec::new(),
                args,
            },
        )
        .await
        .unwrap()
    }

    fn publish(q: &Arc<Queue>) -> PubItem {
        PubItem::Publish {
            seq: None,
            queues: vec![q.clone()],
            msg: Msg {
                exchange: String::new(),
                routing_key: q.name.clone(),
                props: BasicProperties::default(),
                body: Bytes::from_static(b"x"),
                publish_time: 0,
            },
        }
    }

    async fn barrier(tx: &mpsc::Sender<PubItem>) -> bool {
        let (done, wait) = oneshot::channel();
        tx.send(PubItem::Barrier(done)).await.unwrap();
        wait.await.unwrap()
    }

    #[tokio::test]
    async fn a_barrier_reports_a_refused_publish_then_starts_over() {
        let tb = TestBroker::start().await;
        let (shared, vhost) = setup(&tb).await;
        let ok = queue(&shared, &vhost, "ok", QueueArgs::default()).await;
        let full = queue(
            &shared,
            &vhost,
            "full",
            QueueArgs {
                max_length: Some(0),
                overflow: Some(Overflow::RejectPublish),
                ..QueueArgs::default()
            },
        )
        .await;
        let (events, _rx) = mpsc::unbounded_channel();
        let tx = spawn(1, 16, events);
        tx.send(publish(&ok)).await.unwrap();
        assert!(barrier(&tx).await, "a stored publish commits");
        assert_eq!(ok.ledger.durable_end(), 1, "durable before the barrier");
        tx.send(publish(&ok)).await.unwrap();
        tx.send(publish(&full)).await.unwrap();
        tx.send(publish(&ok)).await.unwrap();
        assert!(!barrier(&tx).await, "a refused publish fails the commit");
        assert!(barrier(&tx).await, "the next transaction starts clean");
        tx.send(publish(&ok)).await.unwrap();
        assert!(barrier(&tx).await);
    }

    #[tokio::test]
    async fn a_barrier_reports_a_failed_append() {
        let tb = TestBroker::start().await;
        let (shared, vhost) = setup(&tb).await;
        let q = queue(&shared, &vhost, "gone", QueueArgs::default()).await;
        // The ledger goes away under a queue that was not deleted (as if
        // storage failed): the append errors.
        tb.broker.delete_topic(&q.topic).await.unwrap();
        let (events, mut rx) = mpsc::unbounded_channel();
        let tx = spawn(1, 16, events);
        let PubItem::Publish { queues, msg, .. } = publish(&q) else {
            unreachable!()
        };
        tx.send(PubItem::Publish {
            seq: Some(1),
            queues,
            msg,
        })
        .await
        .unwrap();
        assert!(!barrier(&tx).await);
        match rx.recv().await {
            Some(ConnEvent::Confirms { results, .. }) => assert_eq!(results, vec![(1, false)]),
            other => panic!("expected a nack, got {other:?}"),
        }
    }
}

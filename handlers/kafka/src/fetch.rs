//! Fetch: reads whole stored entries as record batches, long-polling on
//! the ledgers' end offsets until `min_bytes` are available or `max_wait_ms`
//! passes.
//!
//! A stored Kafka batch is served with its `baseOffset` rewritten to the
//! ledger offset and its `partitionLeaderEpoch` set to the partition's one
//! leader epoch (both lie outside the CRC); a request's
//! `current_leader_epoch` is checked against that epoch, as Kafka does.
//! Entries written by other protocols are served as batches built by
//! `mapping::kafka::messages_to_batch`. As in Kafka, the first
//! batch of a response is returned even when it exceeds the limits, so a
//! consumer always makes progress; after that `partition_max_bytes` and the
//! response's `max_bytes` bound what is returned. There are no
//! transactions, so read_committed and read_uncommitted read the same.

use std::sync::Arc;
use std::time::Duration;

use broker::{Entry, EntryFormat, Ledger};
use bytes::{BufMut, BytesMut};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse};
use kafka_protocol::protocol::StrBytes;
use mapping::kafka::ErrorCode;
use tokio::task::JoinSet;

use crate::state::{check_current_leader_epoch, State, LEADER_EPOCH};

/// Longest a Fetch may wait (a cap on the client's max_wait_ms).
const MAX_WAIT: Duration = Duration::from_secs(30);

struct Want {
    topic: String,
    partition: i32,
    offset: i64,
    max_bytes: usize,
    /// -1: not given (below v9).
    current_leader_epoch: i32,
}

struct Got {
    topic: String,
    data: PartitionData,
    bytes: usize,
    /// The ledger to wait on when nothing was available.
    waiter: Option<(Arc<Ledger>, u64)>,
}

pub(crate) async fn fetch(state: &Arc<State>, req: FetchRequest, _version: i16) -> FetchResponse {
    if req.session_id != 0 || req.session_epoch > 0 {
        // Fetch sessions are not kept: every response has session id 0,
        // so clients send full requests.
        return FetchResponse::default()
            .with_error_code(ErrorCode::FetchSessionIdNotFound.code())
            .with_session_id(0);
    }
    let response_max = if req.max_bytes > 0 {
        (req.max_bytes as usize).min(state.config.fetch_max_bytes)
    } else {
        state.config.fetch_max_bytes
    };
    let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_WAIT);
    let min_bytes = req.min_bytes.max(0) as usize;
    let wants: Vec<Want> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(move |p| Want {
                topic: t.topic.0.to_string(),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes.max(0) as usize,
                current_leader_epoch: p.current_leader_epoch,
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let got = read_all(state, &wants, response_max).await;
        let total: usize = got.iter().map(|g| g.bytes).sum();
        let errors = got.iter().any(|g| g.data.error_code != 0);
        let now = tokio::time::Instant::now();
        if total >= min_bytes.max(1) || errors || now >= deadline || wants.is_empty() {
            return respond(got);
        }
        // Wait until any partition has data beyond what was asked for.
        let mut set = JoinSet::new();
        for g in &got {
            if let Some((l, off)) = &g.waiter {
                let mut rx = l.watch_end();
                let off = *off;
                let l = l.clone();
                // A closed ledger (its topic deleted) ends the wait too:
                // the next read answers with the topic's error.
                set.spawn(async move {
                    let _ = rx.wait_for(|&end| end > off || l.is_closed()).await;
                });
            }
        }
        if set.is_empty() {
            return respond(got);
        }
        tokio::select! {
            _ = set.join_next() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = state.shutdown.cancelled() => return respond(got),
        }
        set.abort_all();
    }
}

fn respond(got: Vec<Got>) -> FetchResponse {
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    for g in got {
        let name = g.topic;
        match topics.iter_mut().find(|t| t.topic.0.as_str() == name) {
            Some(t) => t.partitions.push(g.data),
            None => topics.push(
                FetchableTopicResponse::default()
                    .with_topic(StrBytes::from_string(name).into())
                    .with_partitions(vec![g.data]),
            ),
        }
    }
    FetchResponse::default().with_responses(topics)
}

async fn read_all(state: &State, wants: &[Want], response_max: usize) -> Vec<Got> {
    let mut out = Vec::with_capacity(wants.len());
    let mut remaining = response_max;
    let mut any = false;
    for w in wants {
        let g = read_one(state, w, remaining, !any).await;
        remaining = remaining.saturating_sub(g.bytes);
        any |= g.bytes > 0;
        out.push(g);
    }
    out
}

async fn read_one(state: &State, w: &Want, remaining: usize, first: bool) -> Got {
    let base = PartitionData::default()
        .with_partition_index(w.partition)
        .with_high_watermark(-1)
        .with_last_stable_offset(-1)
        .with_log_start_offset(-1)
        .with_preferred_read_replica((-1).into())
        .with_aborted_transactions(None);
    let fail = |code: ErrorCode, base: PartitionData| Got {
        topic: w.topic.clone(),
        data: base.with_error_code(code.code()),
        bytes: 0,
        waiter: None,
    };
    let ledger = match state.ledger(&w.topic, w.partition) {
        Ok(l) => l,
        Err(e) => return fail(e, base),
    };
    if let Err(e) = check_current_leader_epoch(w.current_leader_epoch) {
        return fail(e, base);
    }
    let (start, end) = (ledger.start_offset(), ledger.end_offset());
    let base = base
        .with_high_watermark(end as i64)
        .with_last_stable_offset(end as i64)
        .with_log_start_offset(start as i64);
    if w.offset < start as i64 || w.offset > end as i64 {
        return fail(ErrorCode::OffsetOutOfRange, base);
    }
    let offset = w.offset as u64;
    let limit = w.max_bytes.min(remaining);
    if offset == end || (limit == 0 && !first) {
        return Got {
            topic: w.topic.clone(),
            data: base.with_records(Some(Default::default())),
            bytes: 0,
            // A closed ledger (topic deleted, gateway stopping) gets no
            // more data: nothing to wait for.
            waiter: (offset == end && !ledger.is_closed()).then(|| (ledger.clone(), offset)),
        };
    }
    let entries = match ledger.read(offset, limit.max(1)).await {
        Ok(e) => e,
        Err(e) => return fail(ErrorCode::from_broker(&e), base),
    };
    let mut records = BytesMut::new();
    for e in &entries {
        let before = records.len();
        if let Err(reason) = append_entry(&mut records, e) {
            tracing::error!(topic = %w.topic, partition = w.partition, offset = e.base_offset, %reason, "stored entry does not decode; skipping it");
            continue;
        }
        if records.len() > limit && before > 0 {
            records.truncate(before);
            break;
        }
        if records.len() > limit && !first {
            // Over this partition's share and not the response's first
            // batch: leave it for the next fetch.
            records.truncate(before);
            break;
        }
    }
    let n = records.len();
    Got {
        topic: w.topic.clone(),
        data: base.with_records(Some(records.freeze())),
        bytes: n,
        // Below min_bytes, the Fetch waits for anything appended after
        // what this read saw, on every partition (data that arrives on a
        // partition that already returned some counts too).
        waiter: (!ledger.is_closed()).then(|| (ledger.clone(), end)),
    }
}

fn append_entry(out: &mut BytesMut, e: &Entry) -> Result<(), String> {
    let start = out.len();
    match e.format {
        EntryFormat::KafkaRecordBatch => {
            out.put_slice(&e.payload);
            let batch = &mut out[start..];
            if batch.len() < mapping::kafka::BATCH_HEADER_LEN {
                out.truncate(start);
                return Err("stored batch shorter than its header".into());
            }
            mapping::kafka::set_base_offset(batch, e.base_offset);
        }
        EntryFormat::Messages => {
            let msgs = broker::message::decode_batch(&e.payload).map_err(|e| e.to_string())?;
            out.put_slice(&mapping::kafka::messages_to_batch(e.base_offset, &msgs));
        }
    }
    // The epoch the batch was "appended in" is the partition's one epoch,
    // whatever the producer wrote there (outside the CRC, as baseOffset).
    out[start + 12..start + 16].copy_from_slice(&LEADER_EPOCH.to_be_bytes());
    Ok(())
}

//! Produce and InitProducerId: validation, idempotent de-duplication and
//! appends.
//!
//! Every record batch is validated (framing, CRC-32C, record count,
//! records that decode) and appended verbatim as one ledger entry.
//!
//! Idempotence (on by default in modern clients): for each partition and
//! producer id the last five batches' sequence ranges and offsets are kept.
//! A retried batch whose sequence range matches one of them is answered
//! with the original offset and not stored again; a gap is
//! OUT_OF_ORDER_SEQUENCE_NUMBER; an older epoch is INVALID_PRODUCER_EPOCH.
//! After a restart the state of a partition is rebuilt from the tail of its
//! ledger on first use, so a retry across a gateway restart is still
//! de-duplicated.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use broker::{AppendEntry, EntryFormat, Ledger, TopicName};
use bytes::Bytes;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse, ProducerId,
};
use kafka_protocol::protocol::StrBytes;
use mapping::kafka::{ErrorCode, ValidatedBatch};

use crate::state::State;

/// Batches remembered per producer (Kafka's in-flight limit for idempotence).
const REMEMBERED_BATCHES: usize = 5;
/// Producers remembered per partition; the least recently used beyond it
/// are forgotten (Kafka expires idle producer state too).
const MAX_PRODUCERS_PER_PARTITION: usize = 10_000;
/// How many recent messages of a ledger are scanned to rebuild producer state.
const RECOVERY_MESSAGES: u64 = 10_000;
const RECOVERY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
struct BatchSeq {
    first: i32,
    last: i32,
    /// `None` while the append is in flight.
    offset: Option<u64>,
}

#[derive(Debug, Default)]
struct Producer {
    epoch: i16,
    batches: VecDeque<BatchSeq>,
    /// A counter value of the partition at last use (for eviction).
    last_used: u64,
}

#[derive(Debug, Default)]
struct PartitionProducers {
    producers: HashMap<i64, Producer>,
    clock: u64,
}

/// Idempotence state of every partition.
#[derive(Debug, Default)]
pub(crate) struct ProducerStates {
    partitions: Mutex<HashMap<(TopicName, u32), PartitionProducers>>,
}

enum Decision {
    Append,
    Duplicate(u64),
    Reject(ErrorCode),
}

impl ProducerStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TopicName, u32), PartitionProducers>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_loaded(&self, key: &(TopicName, u32)) -> bool {
        self.lock().contains_key(key)
    }

    /// Rebuilds a partition's producer state from its ledger's tail.
    async fn load(&self, key: &(TopicName, u32), ledger: &Arc<Ledger>) {
        if self.is_loaded(key) {
            return;
        }
        let mut found: HashMap<i64, Producer> = HashMap::new();
        let end = ledger.end_offset();
        let mut from = end
            .saturating_sub(RECOVERY_MESSAGES)
            .max(ledger.start_offset());
        let mut budget = RECOVERY_BYTES;
        while from < end && budget > 0 {
            let entries = match ledger.read(from, budget.min(1024 * 1024)).await {
                Ok(e) if !e.is_empty() => e,
                _ => break,
            };
            for e in &entries {
                budget = budget.saturating_sub(e.payload.len());
                from = from.max(e.end_offset());
                if e.format != EntryFormat::KafkaRecordBatch {
                    continue;
                }
                let Ok(h) = mapping::kafka::parse_batch_header(&e.payload) else {
                    continue;
                };
                if !h.is_idempotent() {
                    continue;
                }
                let p = found.entry(h.producer_id).or_default();
                if h.producer_epoch != p.epoch {
                    p.epoch = h.producer_epoch;
                    p.batches.clear();
                }
                p.batches.push_back(BatchSeq {
                    first: h.base_sequence,
                    last: h.last_sequence(),
                    offset: Some(e.base_offset),
                });
                if p.batches.len() > REMEMBERED_BATCHES {
                    p.batches.pop_front();
                }
            }
        }
        self.lock()
            .entry(key.clone())
            .or_insert(PartitionProducers {
                producers: found,
                clock: 0,
            });
    }

    fn check(&self, key: &(TopicName, u32), b: &ValidatedBatch) -> Decision {
        let h = &b.header;
        let mut map = self.lock();
        let part = map.entry(key.clone()).or_default();
        part.clock += 1;
        let now = part.clock;
        if !part.producers.contains_key(&h.producer_id)
            && part.producers.len() >= MAX_PRODUCERS_PER_PARTITION
        {
            if let Some(oldest) = part
                .producers
                .iter()
                .filter(|(_, p)| p.batches.iter().all(|b| b.offset.is_some()))
                .min_by_key(|(_, p)| p.last_used)
                .map(|(id, _)| *id)
            {
                part.producers.remove(&oldest);
            }
        }
        let seq = BatchSeq {
            first: h.base_sequence,
            last: h.last_sequence(),
            offset: None,
        };
        let p = part.producers.entry(h.producer_id).or_default();
        p.last_used = now;
        if p.batches.is_empty() && p.epoch == 0 {
            p.epoch = h.producer_epoch;
        }
        if h.producer_epoch < p.epoch {
            return Decision::Reject(ErrorCode::InvalidProducerEpoch);
        }
        if h.producer_epoch > p.epoch {
            p.epoch = h.producer_epoch;
            p.batches.clear();
        }
        if let Some(d) = p
            .batches
            .iter()
            .find(|s| s.first == seq.first && s.last == seq.last)
        {
            return match d.offset {
                Some(o) => Decision::Duplicate(o),
                // The original is still being appended: retriable.
                None => Decision::Reject(ErrorCode::RequestTimedOut),
            };
        }
        if let Some(last) = p.batches.back() {
            let expected = if last.last == i32::MAX {
                0
            } else {
                last.last + 1
            };
            if seq.first != expected {
                return Decision::Reject(ErrorCode::OutOfOrderSequenceNumber);
            }
        }
        // With no history (a new producer, or state older than what was
        // scanned at recovery) any sequence starts the stream.
        p.batches.push_back(seq);
        if p.batches.len() > REMEMBERED_BATCHES {
            p.batches.pop_front();
        }
        Decision::Append
    }

    fn finish(&self, key: &(TopicName, u32), b: &ValidatedBatch, offset: Option<u64>) {
        let h = &b.header;
        let mut map = self.lock();
        let Some(p) = map
            .get_mut(key)
            .and_then(|part| part.producers.get_mut(&h.producer_id))
        else {
            return;
        };
        if p.epoch != h.producer_epoch {
            return;
        }
        match offset {
            Some(o) => {
                if let Some(s) = p
                    .batches
                    .iter_mut()
                    .find(|s| s.first == h.base_sequence && s.offset.is_none())
                {
                    s.offset = Some(o);
                }
            }
            None => p
                .batches
                .retain(|s| !(s.first == h.base_sequence && s.offset.is_none())),
        }
    }

    /// Forgets a topic's state (deleted topics).
    pub(crate) fn forget_topic(&self, t: &TopicName) {
        self.lock().retain(|(n, _), _| n != t);
    }
}

struct PartitionResult {
    error: ErrorCode,
    base_offset: i64,
    log_start_offset: i64,
    message: Option<String>,
}

impl PartitionResult {
    fn err(error: ErrorCode, message: Option<String>) -> Self {
        PartitionResult {
            error,
            base_offset: -1,
            log_start_offset: -1,
            message,
        }
    }
}

async fn produce_partition(
    state: &State,
    topic: &str,
    partition: i32,
    records: Option<Bytes>,
) -> PartitionResult {
    let ledger = match state.ledger(topic, partition) {
        Ok(l) => l,
        Err(e) => return PartitionResult::err(e, None),
    };
    let Some(records) = records else {
        return PartitionResult::err(ErrorCode::CorruptMessage, Some("null records".into()));
    };
    if let Err(reason) = one_batch(&records) {
        tracing::debug!(topic, partition, %reason, "rejected produce");
        metrics::counter!("manifold_kafka_produce_rejected_batches_total").increment(1);
        return PartitionResult::err(ErrorCode::InvalidRecord, Some(reason));
    }
    let batches = match mapping::kafka::split_and_validate(&records) {
        Ok(b) => b,
        Err((code, reason)) => {
            tracing::debug!(topic, partition, %reason, "rejected produce");
            metrics::counter!("manifold_kafka_produce_rejected_batches_total").increment(1);
            return PartitionResult::err(code, Some(reason));
        }
    };
    if batches
        .iter()
        .any(|b| b.header.is_transactional() || b.header.is_control())
    {
        return PartitionResult::err(
            ErrorCode::InvalidRecord,
            Some("transactions are not supported".into()),
        );
    }
    let key = match state.topic_name(topic) {
        Ok(t) => (t, partition as u32),
        Err(e) => return PartitionResult::err(e, None),
    };
    let mut first_offset = None;
    for b in batches {
        let idempotent = b.header.is_idempotent();
        if idempotent {
            state.producers.load(&key, &ledger).await;
            match state.producers.check(&key, &b) {
                Decision::Append => {}
                Decision::Duplicate(o) => {
                    metrics::counter!("manifold_kafka_produce_duplicates_total").increment(1);
                    first_offset.get_or_insert(o);
                    continue;
                }
                Decision::Reject(code) => return PartitionResult::err(code, None),
            }
        }
        let h = b.header;
        let res = ledger
            .append(AppendEntry {
                format: EntryFormat::KafkaRecordBatch,
                count: h.records_count as u32,
                first_timestamp: h.base_timestamp,
                max_timestamp: h.max_timestamp,
                payload: b.bytes.clone(),
            })
            .await;
        match res {
            Ok(a) => {
                if idempotent {
                    state.producers.finish(&key, &b, Some(a.base_offset));
                }
                metrics::counter!("manifold_kafka_produced_records_total")
                    .increment(u64::from(a.count));
                first_offset.get_or_insert(a.base_offset);
            }
            Err(e) => {
                if idempotent {
                    state.producers.finish(&key, &b, None);
                }
                tracing::warn!(topic, partition, error = %e, "append failed");
                return PartitionResult::err(ErrorCode::from_broker(&e), Some(e.to_string()));
            }
        }
    }
    PartitionResult {
        error: ErrorCode::None,
        base_offset: first_offset.map_or(-1, |o| o as i64),
        log_start_offset: ledger.start_offset() as i64,
        message: None,
    }
}

/// Kafka's rule for Produce v3+: a partition's records are exactly one
/// record batch (`INVALID_RECORD` otherwise, whatever the batches hold:
/// the check is on framing, before any CRC). One batch is one ledger entry
/// and one idempotent sequence range, so a second batch has nowhere to go.
fn one_batch(records: &[u8]) -> Result<(), String> {
    if records.is_empty() {
        return Err("produce requests must carry one record batch per partition; got none".into());
    }
    // A header that does not parse, or a length beyond the bytes sent, is
    // a corrupt batch: split_and_validate says so.
    let Ok(h) = mapping::kafka::parse_batch_header(records) else {
        return Ok(());
    };
    let len = h.total_len();
    if len < records.len() {
        return Err(format!(
            "produce requests must carry exactly one record batch per partition; \
             {} bytes follow the first batch of {len} bytes",
            records.len() - len
        ));
    }
    Ok(())
}

/// Loads the idempotence state of every partition of `req` that carries
/// idempotent batches and has none loaded yet, so that [`produce`] decides
/// on its batches without waiting (pipelined requests are then checked and
/// appended strictly in request order).
pub(crate) async fn prepare(state: &State, req: &ProduceRequest) {
    for t in &req.topic_data {
        for p in &t.partition_data {
            let Some(records) = &p.records else { continue };
            let idempotent = mapping::kafka::parse_batch_header(records)
                .map(|h| h.is_idempotent())
                .unwrap_or(false);
            if !idempotent {
                continue;
            }
            let (Ok(ledger), Ok(topic)) = (
                state.ledger(t.name.0.as_str(), p.index),
                state.topic_name(t.name.0.as_str()),
            ) else {
                continue;
            };
            let key = (topic, p.index as u32);
            if !state.producers.is_loaded(&key) {
                state.producers.load(&key, &ledger).await;
            }
        }
    }
}

/// Handles Produce: `Ok(Some)` is the response; with acks=0 no response
/// is sent, `Ok(None)` when every partition succeeded and `Err` (naming
/// the failures) when one failed, in which case the connection is closed,
/// as Kafka does, so that a client expecting no answer notices.
pub(crate) async fn produce(
    state: &Arc<State>,
    req: ProduceRequest,
    _version: i16,
) -> Result<Option<ProduceResponse>, String> {
    let acks = req.acks;
    let valid_acks = matches!(acks, -1..=1);
    let mut jobs = Vec::new();
    for t in &req.topic_data {
        for p in &t.partition_data {
            let topic = t.name.0.to_string();
            let partition = p.index;
            let records = p.records.clone();
            let state = state.clone();
            jobs.push(async move {
                let r = if valid_acks {
                    produce_partition(&state, &topic, partition, records).await
                } else {
                    PartitionResult::err(ErrorCode::InvalidRequiredAcks, None)
                };
                (topic, partition, r)
            });
        }
    }
    // Partitions of one request are appended concurrently so that they
    // share fsyncs.
    let results = futures_util::future::join_all(jobs).await;
    if acks == 0 {
        let failed: Vec<String> = results
            .iter()
            .filter(|(_, _, r)| r.error != ErrorCode::None)
            .map(|(t, p, r)| format!("{t}-{p}: {:?}", r.error))
            .collect();
        return if failed.is_empty() {
            Ok(None)
        } else {
            Err(failed.join(", "))
        };
    }
    let mut topics: Vec<TopicProduceResponse> = Vec::new();
    for (topic, partition, r) in results {
        let pr = PartitionProduceResponse::default()
            .with_index(partition)
            .with_error_code(r.error.code())
            .with_base_offset(r.base_offset)
            .with_log_append_time_ms(-1)
            .with_log_start_offset(r.log_start_offset)
            .with_error_message(r.message.map(StrBytes::from_string));
        match topics.iter_mut().find(|t| t.name.0.as_str() == topic) {
            Some(t) => t.partition_responses.push(pr),
            None => topics.push(
                TopicProduceResponse::default()
                    .with_name(StrBytes::from_string(topic).into())
                    .with_partition_responses(vec![pr]),
            ),
        }
    }
    Ok(Some(ProduceResponse::default().with_responses(topics)))
}

/// InitProducerId: a new producer id (epoch 0), or the next epoch of the
/// producer id the client already holds. Transactions are not supported.
pub(crate) fn init_producer_id(
    state: &State,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let resp = InitProducerIdResponse::default();
    if req.transactional_id.is_some() {
        return resp
            .with_error_code(ErrorCode::TransactionalIdAuthorizationFailed.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
    }
    let (pid, epoch) = if req.producer_id.0 >= 0 && req.producer_epoch >= 0 {
        if req.producer_epoch < i16::MAX - 1 {
            (req.producer_id.0, req.producer_epoch + 1)
        } else {
            (state.next_producer_id(), 0)
        }
    } else {
        (state.next_producer_id(), 0)
    };
    resp.with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch)
}

//! Offsets: ListOffsets, OffsetForLeaderEpoch, DeleteRecords, and consumer
//! group commits (OffsetCommit / OffsetFetch).
//!
//! A group's committed offset on a partition is the mark-delete position of
//! the partition's durable cursor `kafka.<group>` (see
//! `mapping::kafka::group_cursor_name`): it survives restarts and is the
//! backlog the admin API shows, but does not hold back retention (as in
//! Kafka, data expires by the topic's policy whether a group read it or
//! not). A commit is persisted to disk before it is acknowledged.
//!
//! Kafka stores a committed offset as given, even outside the log; the
//! cursor cannot point there, so the offset as sent is kept beside it, with
//! the commit's leader epoch (`mapping::kafka::reported_commit`), and
//! OffsetFetch answers both. The epoch matters to clients: librdkafka
//! validates a committed position that carries one with
//! OffsetForLeaderEpoch before fetching from it (KIP-320).

use std::collections::HashSet;
use std::sync::Arc;

use broker::{CursorOptions, InitialPosition};
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{
    DeleteRecordsRequest, DeleteRecordsResponse, ListOffsetsRequest, ListOffsetsResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse,
};
use kafka_protocol::protocol::StrBytes;
use mapping::kafka::{
    commit_offset_property, group_cursor_name, reported_commit, ErrorCode,
    COMMIT_METADATA_PROPERTY, COMMIT_OFFSET_PROPERTY,
};

use crate::state::{check_current_leader_epoch, State, LEADER_EPOCH};

const EARLIEST: i64 = -2;
const LATEST: i64 = -1;

pub(crate) async fn list_offsets(
    state: &State,
    req: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let mut topics = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut parts = Vec::new();
        for p in t.partitions {
            let r = ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_timestamp(-1)
                .with_offset(-1)
                .with_leader_epoch(-1);
            // current_leader_epoch is -1 (not given) below v4.
            let found = match check_current_leader_epoch(p.current_leader_epoch) {
                Ok(()) => list_one(state, &name, p.partition_index, p.timestamp).await,
                Err(e) => Err(e),
            };
            let r = match found {
                // leader_epoch exists from v4; below it must stay at its
                // default. No offset for the timestamp: no epoch either.
                Ok((offset, ts)) if offset >= 0 && version >= 4 => r
                    .with_offset(offset)
                    .with_timestamp(ts)
                    .with_leader_epoch(LEADER_EPOCH),
                Ok((offset, ts)) => r.with_offset(offset).with_timestamp(ts),
                Err(e) => r.with_error_code(e.code()),
            };
            parts.push(r);
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

async fn list_one(
    state: &State,
    topic: &str,
    partition: i32,
    ts: i64,
) -> Result<(i64, i64), ErrorCode> {
    let l = state.ledger(topic, partition)?;
    match ts {
        EARLIEST => Ok((l.start_offset() as i64, -1)),
        LATEST => Ok((l.end_offset() as i64, -1)),
        ts if ts >= 0 => {
            let Some(o) = l
                .find_offset_by_timestamp(ts)
                .await
                .map_err(|e| ErrorCode::from_broker(&e))?
            else {
                return Ok((-1, -1));
            };
            // The ledger answers at entry granularity: find the record.
            let entries = l.read(o, 1).await.map_err(|e| ErrorCode::from_broker(&e))?;
            if let Some(e) = entries.first() {
                if let Ok(msgs) = mapping::entry_messages(e) {
                    for (i, m) in msgs.iter().enumerate() {
                        let off = e.base_offset + i as u64;
                        let t = m.event_time.unwrap_or(m.publish_time);
                        if off >= o && t >= ts {
                            return Ok((off as i64, t));
                        }
                    }
                }
                return Ok((e.end_offset() as i64, -1));
            }
            Ok((o as i64, -1))
        }
        _ => Err(ErrorCode::InvalidRequest),
    }
}

/// OffsetForLeaderEpoch, as a Kafka partition leader answers it.
///
/// The request's `replica_id` (v3+) does not change the answer: Kafka
/// answers followers and consumers alike from the leader's epoch cache.
pub(crate) fn offset_for_leader_epoch(
    state: &State,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.topic.0.to_string();
            let parts = t
                .partitions
                .into_iter()
                .map(|p| {
                    let r = EpochEndOffset::default()
                        .with_partition(p.partition)
                        .with_leader_epoch(-1)
                        .with_end_offset(-1);
                    let answer = state
                        .ledger(&name, p.partition)
                        // A name Kafka could not hold is a partition it
                        // does not host.
                        .map_err(|e| match e {
                            ErrorCode::InvalidTopicException => ErrorCode::UnknownTopicOrPartition,
                            e => e,
                        })
                        .and_then(|l| {
                            end_offset_for_epoch(
                                p.current_leader_epoch,
                                p.leader_epoch,
                                l.start_offset(),
                                l.end_offset(),
                            )
                        });
                    match answer {
                        Ok((epoch, end)) => r.with_leader_epoch(epoch).with_end_offset(end),
                        Err(e) => r.with_error_code(e.code()),
                    }
                })
                .collect();
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(parts)
        })
        .collect();
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}

/// `(leader_epoch, end_offset)` for `requested` on a partition whose only
/// epoch is [`LEADER_EPOCH`], covering `[start, end)`: Kafka's
/// `LeaderEpochFileCache::endOffsetFor` over a one-entry cache.
///
/// - the current epoch: the log end offset (what a consumer validating
///   its position after a rebalance needs);
/// - -1 (undefined) or an epoch newer than any: `(-1, -1)`, no error
///   (the client treats it as "no epoch at or below mine": truncation);
/// - an epoch older than any known: itself, with the start offset of the
///   first epoch after it (the log start).
///
/// # Errors
/// The [`check_current_leader_epoch`] errors for `current`.
fn end_offset_for_epoch(
    current: i32,
    requested: i32,
    start: u64,
    end: u64,
) -> Result<(i32, i64), ErrorCode> {
    check_current_leader_epoch(current)?;
    Ok(match requested {
        LEADER_EPOCH => (LEADER_EPOCH, end as i64),
        e if e == -1 || e > LEADER_EPOCH => (-1, -1),
        e => (e, start as i64),
    })
}

pub(crate) async fn delete_records(
    state: &State,
    req: DeleteRecordsRequest,
) -> DeleteRecordsResponse {
    let mut topics = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut parts = Vec::new();
        for p in t.partitions {
            let r = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1);
            let res: Result<i64, ErrorCode> = async {
                let l = state.ledger(&name, p.partition_index)?;
                let end = l.end_offset() as i64;
                let upto = if p.offset == -1 { end } else { p.offset };
                if upto < 0 || upto > end {
                    return Err(ErrorCode::OffsetOutOfRange);
                }
                let start = l
                    .trim(upto as u64)
                    .await
                    .map_err(|e| ErrorCode::from_broker(&e))?;
                Ok(start as i64)
            }
            .await;
            parts.push(match res {
                Ok(lw) => r.with_low_watermark(lw),
                Err(e) => r.with_error_code(e.code()),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
}

pub(crate) async fn offset_commit(
    state: &Arc<State>,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let check = if group.is_empty() {
        Err(ErrorCode::InvalidGroupId)
    } else {
        state.groups.check_commit(
            &group,
            req.member_id.as_str(),
            req.generation_id_or_member_epoch,
            req.group_instance_id.as_ref().map(|s| s.as_str()),
        )
    };
    let cursor_name = group_cursor_name(&group);
    let mut topics = Vec::new();
    let mut touched = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut parts = Vec::new();
        for p in t.partitions {
            let res: Result<(), ErrorCode> = async {
                check?;
                let l = state.ledger(&name, p.partition_index)?;
                if p.committed_offset < 0 {
                    return Err(ErrorCode::InvalidCommitOffsetSize);
                }
                let c = l
                    .open_cursor_with(
                        &cursor_name,
                        InitialPosition::Offset(p.committed_offset as u64),
                        // Committed offsets do not pin data: the topic's
                        // retention applies, as in Kafka.
                        CursorOptions {
                            holds_retention: false,
                        },
                    )
                    .await
                    .map_err(|e| ErrorCode::from_broker(&e))?;
                let committed = p.committed_offset as u64;
                l.seek(&c, committed);
                c.set_property(
                    COMMIT_OFFSET_PROPERTY,
                    // committed_leader_epoch is -1 (none) below v6.
                    &commit_offset_property(committed, c.mark_delete(), p.committed_leader_epoch),
                );
                c.set_property(
                    COMMIT_METADATA_PROPERTY,
                    p.committed_metadata.as_ref().map_or("", |m| m.as_str()),
                );
                touched.push(l);
                Ok(())
            }
            .await;
            parts.push(
                OffsetCommitResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(res.err().unwrap_or(ErrorCode::None).code()),
            );
        }
        topics.push(
            OffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    // Durable before acknowledged.
    let mut failed = false;
    for l in touched {
        if let Err(e) = l.persist_cursors().await {
            tracing::warn!(ledger = l.name(), error = %e, "could not persist offset commit");
            failed = true;
        }
    }
    if failed {
        for t in &mut topics {
            for p in &mut t.partitions {
                if p.error_code == 0 {
                    p.error_code = ErrorCode::KafkaStorageError.code();
                }
            }
        }
    }
    OffsetCommitResponse::default().with_topics(topics)
}

/// A partition's committed offset, its leader epoch and metadata, or why
/// there is none.
type Committed = Result<(i64, i32, String), ErrorCode>;

/// `(topic, [(partition, commit)])` of a group's commits.
fn committed(
    state: &State,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Vec<(String, Vec<(i32, Committed)>)> {
    let cursor_name = group_cursor_name(group);
    let wanted: Vec<(String, Vec<i32>)> = match topics {
        Some(t) => t,
        None => state
            .topics()
            .into_iter()
            .filter_map(|m| {
                let parts: Vec<i32> = (0..m.partitions)
                    .filter(|&p| {
                        state
                            .broker
                            .ledger(&m.name, p)
                            .is_ok_and(|l| l.cursor(&cursor_name).is_some())
                    })
                    .map(|p| p as i32)
                    .collect();
                (!parts.is_empty()).then(|| (m.name.topic.clone(), parts))
            })
            .collect(),
    };
    wanted
        .into_iter()
        .map(|(t, parts)| {
            let rows = parts
                .into_iter()
                .map(|p| {
                    let r = match state.ledger(&t, p) {
                        Err(ErrorCode::UnknownTopicOrPartition) => Ok((-1, -1, String::new())),
                        Err(e) => Err(e),
                        Ok(l) => Ok(match l.cursor(&cursor_name) {
                            Some(c) => {
                                let r = reported_commit(
                                    c.property(COMMIT_OFFSET_PROPERTY).as_deref(),
                                    c.mark_delete(),
                                    l.start_offset(),
                                );
                                (
                                    r.offset as i64,
                                    r.leader_epoch,
                                    c.property(COMMIT_METADATA_PROPERTY).unwrap_or_default(),
                                )
                            }
                            None => (-1, -1, String::new()),
                        }),
                    };
                    (p, r)
                })
                .collect();
            (t, rows)
        })
        .collect()
}

pub(crate) fn offset_fetch(
    state: &State,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    if version >= 8 {
        let groups = req
            .groups
            .into_iter()
            .map(|g| {
                let topics = g.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes))
                        .collect()
                });
                let rows = committed(state, g.group_id.0.as_str(), topics);
                OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id)
                    .with_topics(
                        rows.into_iter()
                            .map(|(t, ps)| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(StrBytes::from_string(t).into())
                                    .with_partitions(
                                        ps.into_iter()
                                            .map(|(p, r)| {
                                                let x = OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(p)
                                                    .with_committed_leader_epoch(-1);
                                                match r {
                                                    Ok((o, e, m)) => x
                                                        .with_committed_offset(o)
                                                        .with_committed_leader_epoch(e)
                                                        .with_metadata(Some(
                                                            StrBytes::from_string(m),
                                                        )),
                                                    Err(e) => x
                                                        .with_committed_offset(-1)
                                                        .with_error_code(e.code()),
                                                }
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    )
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let topics = req.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    let rows = committed(state, req.group_id.0.as_str(), topics);
    OffsetFetchResponse::default().with_topics(
        rows.into_iter()
            .map(|(t, ps)| {
                OffsetFetchResponseTopic::default()
                    .with_name(StrBytes::from_string(t).into())
                    .with_partitions(
                        ps.into_iter()
                            .map(|(p, r)| {
                                let x = OffsetFetchResponsePartition::default()
                                    .with_partition_index(p)
                                    .with_committed_leader_epoch(-1);
                                match r {
                                    // committed_leader_epoch exists from
                                    // v5; the encoder skips it below.
                                    Ok((o, e, m)) => x
                                        .with_committed_offset(o)
                                        .with_committed_leader_epoch(e)
                                        .with_metadata(Some(StrBytes::from_string(m))),
                                    Err(e) => x.with_committed_offset(-1).with_error_code(e.code()),
                                }
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

/// Names of groups that have committed offsets in the Kafka namespace.
pub(crate) fn groups_with_commits(state: &State) -> HashSet<String> {
    let mut out = HashSet::new();
    for t in state.topics() {
        for p in 0..t.partitions {
            if let Ok(l) = state.broker.ledger(&t.name, p) {
                for n in l.cursor_names() {
                    if let Some(g) = n.strip_prefix(mapping::kafka::GROUP_CURSOR_PREFIX) {
                        out.insert(g.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// Deletes a group's cursors; returns whether any existed.
pub(crate) async fn delete_group_cursors(state: &State, group: &str) -> bool {
    let name = group_cursor_name(group);
    let mut any = false;
    for t in state.topics() {
        for p in 0..t.partitions {
            if let Ok(l) = state.broker.ledger(&t.name, p) {
                if let Ok(true) = l.delete_cursor(&name).await {
                    any = true;
                }
            }
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_offsets_follow_kafkas_epoch_cache() {
        // A partition holding [4, 10) in its one epoch.
        let at = |current, requested| end_offset_for_epoch(current, requested, 4, 10);
        // The current epoch ends at the log end offset, whether or not the
        // client says which epoch it believes current.
        assert_eq!(at(-1, LEADER_EPOCH), Ok((LEADER_EPOCH, 10)));
        assert_eq!(at(LEADER_EPOCH, LEADER_EPOCH), Ok((LEADER_EPOCH, 10)));
        // Undefined, or newer than any epoch: undefined, without an error.
        assert_eq!(at(-1, -1), Ok((-1, -1)));
        assert_eq!(at(-1, LEADER_EPOCH + 1), Ok((-1, -1)));
        // Older than any known epoch: itself, ending where the first epoch
        // after it starts (the log start).
        assert_eq!(at(-1, -5), Ok((-5, 4)));
        // The client's current epoch is checked first.
        assert_eq!(
            at(LEADER_EPOCH + 1, LEADER_EPOCH),
            Err(ErrorCode::UnknownLeaderEpoch)
        );
        assert_eq!(at(-3, LEADER_EPOCH), Err(ErrorCode::FencedLeaderEpoch));
    }
}

//! One Kafka connection: read frames, answer each request in order.
//!
//! Clients pipeline requests (librdkafka keeps up to five Produce requests
//! in flight per connection) and rely on responses coming back in request
//! order. Consecutive Produce requests are therefore pipelined: each is
//! started as soon as it is read (its idempotence check and its appends
//! are queued to the ledgers in request order, so a partition's batches
//! land in the order they were sent), up to [`MAX_IN_FLIGHT`] of them wait
//! for durability together (sharing group commits), and their responses
//! are written in request order. Any other request first waits for the
//! Produce requests before it, then runs alone, as in Kafka: a Fetch that
//! long-polls holds the connection's next requests back.
//!
//! Ordering argument: every in-flight Produce future lives in this
//! connection's task, in a `FuturesOrdered`, which first polls futures in
//! the order they were pushed; an append takes the ledger's memory budget
//! and queue slot on its first poll unless it must wait, and those waits
//! are FIFO (tokio's semaphores are fair) and wake in order.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures_util::stream::{FuturesOrdered, StreamExt};
use handler_api::{Connection, HandlerError};
use kafka_protocol::messages::{ApiKey, ProduceResponse, RequestHeader, RequestKind, ResponseKind};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, Parsed};
use crate::state::State;

/// Most Produce requests of one connection in flight at once.
const MAX_IN_FLIGHT: usize = 16;

/// Largest response buffer a connection keeps between responses.
const MAX_KEPT_BUFFER: usize = 1024 * 1024;

/// What the connection knows about its client.
#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) client_id: String,
    pub(crate) client_host: String,
}

/// What answering a request asks of the connection.
// Boxing the response would cost an allocation per request; a Reply
// lives only until its response is written.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Reply {
    /// Write this response.
    Send(ResponseKind),
    /// Write nothing (a Produce with acks=0 that succeeded).
    Nothing,
    /// Write nothing and close the connection: a Produce with acks=0
    /// failed. The client expects no response, so closing is how Kafka
    /// tells it something went wrong (it then refreshes its metadata).
    Close(String),
}

/// A pipelined request's answer: correlation id, API, version, when it was
/// read, and what to do.
type Answer = (i32, ApiKey, i16, Instant, Reply);
type InFlight = FuturesOrdered<Pin<Box<dyn Future<Output = Answer> + Send>>>;

pub(crate) async fn serve(state: Arc<State>, conn: Connection) -> Result<(), HandlerError> {
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut session = Session {
        client_host: format!("/{}", conn.peer.ip()),
        ..Session::default()
    };
    let max = state.config.max_frame_bytes;
    let mut in_flight: InFlight = FuturesOrdered::new();
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        while in_flight.len() < MAX_IN_FLIGHT {
            let frame = match codec::decode_frame(&mut buf, max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "closing connection: bad frame");
                    metrics::counter!("manifold_kafka_protocol_errors_total", "kind" => "frame")
                        .increment(1);
                    return Err(HandlerError::Protocol(e.to_string()));
                }
            };
            let (header, api, body) = match codec::parse_request(frame) {
                Parsed::Request { header, api, body } => (header, api, body),
                Parsed::ApiVersionsUnsupported { correlation_id } => {
                    if drain(&mut in_flight, &mut w, &mut out, &conn.shutdown)
                        .await?
                        .is_break()
                    {
                        return Ok(());
                    }
                    w.write_all(&codec::encode_api_versions_fallback(correlation_id))
                        .await?;
                    continue;
                }
                Parsed::Unsupported {
                    api_key,
                    api_version,
                    ..
                } => {
                    tracing::warn!(
                        api_key,
                        api_version,
                        "closing connection: API or version not supported (not advertised by ApiVersions)"
                    );
                    metrics::counter!("manifold_kafka_protocol_errors_total", "kind" => "unsupported")
                        .increment(1);
                    // Closing either way: earlier answers go out first.
                    let _ = drain(&mut in_flight, &mut w, &mut out, &conn.shutdown).await?;
                    return Ok(());
                }
                Parsed::Malformed {
                    api_key,
                    api_version,
                    reason,
                    ..
                } => {
                    tracing::warn!(api_key, api_version, %reason, "closing connection: malformed request");
                    metrics::counter!("manifold_kafka_protocol_errors_total", "kind" => "malformed")
                        .increment(1);
                    // Closing either way: earlier answers go out first.
                    let _ = drain(&mut in_flight, &mut w, &mut out, &conn.shutdown).await?;
                    return Err(HandlerError::Protocol(reason));
                }
            };
            if session.client_id.is_empty() {
                if let Some(c) = &header.client_id {
                    session.client_id = c.to_string();
                    tracing::Span::current().record("client_id", session.client_id.as_str());
                }
            }
            metrics::counter!("manifold_kafka_requests_total", "api" => codec::api_name(api))
                .increment(1);
            let version = header.request_api_version;
            let correlation_id = header.correlation_id;
            let started = Instant::now();
            if let RequestKind::Produce(req) = *body {
                // Idempotence state is rebuilt from the ledgers before the
                // first batch of a partition; that must not reorder batches.
                tokio::select! {
                    () = crate::produce::prepare(&state, &req) => {}
                    _ = conn.shutdown.cancelled() => return Ok(()),
                }
                let state = state.clone();
                in_flight.push_back(Box::pin(async move {
                    let reply = produce_reply(crate::produce::produce(&state, req, version).await);
                    (correlation_id, api, version, started, reply)
                }));
                continue;
            }
            if drain(&mut in_flight, &mut w, &mut out, &conn.shutdown)
                .await?
                .is_break()
            {
                return Ok(());
            }
            let reply = tokio::select! {
                r = handle(&state, &mut session, &header, *body) => r,
                _ = conn.shutdown.cancelled() => return Ok(()),
            };
            if respond(
                &mut w,
                &mut out,
                (correlation_id, api, version, started, reply),
            )
            .await?
            .is_break()
            {
                return Ok(());
            }
        }
        if in_flight.len() >= MAX_IN_FLIGHT {
            // Full: read nothing more until the oldest answer is out.
            let answer = tokio::select! {
                a = in_flight.next() => a,
                _ = conn.shutdown.cancelled() => return Ok(()),
            };
            if let Some(a) = answer {
                if respond(&mut w, &mut out, a).await?.is_break() {
                    return Ok(());
                }
            }
            continue;
        }
        tokio::select! {
            _ = conn.shutdown.cancelled() => return Ok(()),
            Some(a) = in_flight.next(), if !in_flight.is_empty() => {
                if respond(&mut w, &mut out, a).await?.is_break() {
                    return Ok(());
                }
            }
            n = r.read_buf(&mut buf) => {
                if n? == 0 {
                    // Closing either way: earlier answers go out first.
                    let _ = drain(&mut in_flight, &mut w, &mut out, &conn.shutdown).await?;
                    return Ok(());
                }
            }
        }
    }
}

/// Writes the answers of every in-flight request, in order.
/// `Break`: the connection must close (an answer said so, or shutdown).
async fn drain<W: AsyncWrite + Unpin>(
    in_flight: &mut InFlight,
    w: &mut W,
    out: &mut BytesMut,
    shutdown: &handler_api::CancellationToken,
) -> Result<ControlFlow<()>, HandlerError> {
    while !in_flight.is_empty() {
        let answer = tokio::select! {
            a = in_flight.next() => a,
            _ = shutdown.cancelled() => return Ok(ControlFlow::Break(())),
        };
        match answer {
            Some(a) => {
                if respond(w, out, a).await?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            None => break,
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// A Produce outcome as a [`Reply`].
fn produce_reply(r: Result<Option<ProduceResponse>, String>) -> Reply {
    match r {
        Ok(Some(resp)) => Reply::Send(ResponseKind::Produce(resp)),
        Ok(None) => Reply::Nothing,
        Err(why) => Reply::Close(why),
    }
}

/// Records the request's duration and writes its response, if any.
/// `Break`: the connection must close now (later answers are dropped, as
/// when Kafka closes a connection).
async fn respond<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut BytesMut,
    (correlation_id, api, version, started, reply): Answer,
) -> Result<ControlFlow<()>, HandlerError> {
    metrics::histogram!("manifold_kafka_request_duration_seconds", "api" => codec::api_name(api))
        .record(started.elapsed().as_secs_f64());
    let response = match reply {
        Reply::Send(r) => r,
        Reply::Nothing => return Ok(ControlFlow::Continue(())),
        Reply::Close(why) => {
            tracing::info!(correlation_id, errors = %why, "closing connection: a Produce with acks=0 failed");
            metrics::counter!("manifold_kafka_protocol_errors_total", "kind" => "acks0_failed")
                .increment(1);
            w.flush().await?;
            return Ok(ControlFlow::Break(()));
        }
    };
    if let Err(e) = codec::encode_response_into(out, correlation_id, api, version, &response) {
        tracing::error!(error = %e, "could not encode a response; closing");
        return Err(HandlerError::Protocol(e));
    }
    w.write_all(out).await?;
    if out.capacity() > MAX_KEPT_BUFFER {
        // A large Fetch response: do not keep its buffer while idle.
        *out = BytesMut::new();
    }
    Ok(ControlFlow::Continue(()))
}

/// Answers one request.
async fn handle(
    state: &Arc<State>,
    session: &mut Session,
    header: &RequestHeader,
    body: RequestKind,
) -> Reply {
    let v = header.request_api_version;
    Reply::Send(match body {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(codec::api_versions_body(0)),
        RequestKind::Metadata(r) => {
            ResponseKind::Metadata(crate::admin::metadata(state, r, v).await)
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(crate::admin::describe_cluster(state, r))
        }
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(crate::admin::find_coordinator(state, r, v))
        }
        RequestKind::Produce(r) => {
            return produce_reply(crate::produce::produce(state, r, v).await)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(crate::produce::init_producer_id(state, r))
        }
        RequestKind::Fetch(r) => ResponseKind::Fetch(crate::fetch::fetch(state, r, v).await),
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(crate::offsets::list_offsets(state, r, v).await)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            ResponseKind::OffsetForLeaderEpoch(crate::offsets::offset_for_leader_epoch(state, r))
        }
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(crate::offsets::offset_commit(state, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(crate::offsets::offset_fetch(state, r, v))
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(crate::group::join_group(state, session, r, v).await)
        }
        RequestKind::SyncGroup(r) => {
            ResponseKind::SyncGroup(crate::group::sync_group(state, r).await)
        }
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(crate::group::heartbeat(state, r)),
        RequestKind::LeaveGroup(r) => {
            ResponseKind::LeaveGroup(crate::group::leave_group(state, r, v))
        }
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(crate::group::describe_groups(state, r))
        }
        RequestKind::ListGroups(r) => ResponseKind::ListGroups(crate::group::list_groups(state, r)),
        RequestKind::DeleteGroups(r) => {
            ResponseKind::DeleteGroups(crate::group::delete_groups(state, r).await)
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(crate::admin::create_topics(state, r).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(crate::admin::delete_topics(state, r).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(crate::admin::create_partitions(state, r).await)
        }
        RequestKind::DeleteRecords(r) => {
            ResponseKind::DeleteRecords(crate::offsets::delete_records(state, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(crate::admin::describe_configs(state, r))
        }
        RequestKind::AlterConfigs(r) => {
            ResponseKind::AlterConfigs(crate::admin::alter_configs(state, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => ResponseKind::IncrementalAlterConfigs(
            crate::admin::incremental_alter_configs(state, r).await,
        ),
        other => {
            // parse_request only lets through the APIs of SUPPORTED_APIS,
            // all of which are matched above.
            tracing::error!(api = ?ApiKey::try_from(header.request_api_key).ok(), "request kind without a handler");
            drop(other);
            return Reply::Close("request kind without a handler".into());
        }
    })
}

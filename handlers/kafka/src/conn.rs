//! One Kafka connection: read frames, answer each request in order.
//!
//! Like a Kafka broker, a connection handles one request at a time and
//! answers in request order (clients pipeline and match responses by
//! correlation id, but rely on the order). A Fetch that long-polls holds
//! the connection's next requests back, exactly as in Kafka.

use std::sync::Arc;

use bytes::BytesMut;
use handler_api::{Connection, HandlerError};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec::{self, Parsed};
use crate::state::State;

/// What the connection knows about its client.
#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) client_id: String,
    pub(crate) client_host: String,
}

pub(crate) async fn serve(state: Arc<State>, conn: Connection) -> Result<(), HandlerError> {
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut session = Session {
        client_host: format!("/{}", conn.peer.ip()),
        ..Session::default()
    };
    let max = state.config.max_frame_bytes;
    loop {
        loop {
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
                Parsed::ApiVersionsTooNew { correlation_id } => {
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
            let started = std::time::Instant::now();
            let response = tokio::select! {
                r = handle(&state, &mut session, &header, *body) => r,
                _ = conn.shutdown.cancelled() => return Ok(()),
            };
            metrics::histogram!("manifold_kafka_request_duration_seconds", "api" => codec::api_name(api))
                .record(started.elapsed().as_secs_f64());
            let Some(response) = response else { continue };
            match codec::encode_response(correlation_id, api, version, &response) {
                Ok(bytes) => w.write_all(&bytes).await?,
                Err(e) => {
                    tracing::error!(error = %e, "could not encode a response; closing");
                    return Err(HandlerError::Protocol(e));
                }
            }
        }
        let n = tokio::select! {
            _ = conn.shutdown.cancelled() => return Ok(()),
            n = r.read_buf(&mut buf) => n?,
        };
        if n == 0 {
            return Ok(());
        }
    }
}

/// Answers one request. `None` means no response is sent (Produce with
/// acks=0).
async fn handle(
    state: &Arc<State>,
    session: &mut Session,
    header: &RequestHeader,
    body: RequestKind,
) -> Option<ResponseKind> {
    let v = header.request_api_version;
    Some(match body {
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
            return crate::produce::produce(state, r, v)
                .await
                .map(ResponseKind::Produce)
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
            return None;
        }
    })
}

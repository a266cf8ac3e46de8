//! State shared by every connection of the handler.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use broker::{Broker, Ledger, TopicMeta, TopicName};
use handler_api::{CancellationToken, HandlerContext, HandlerError};
use mapping::kafka::ErrorCode;
use mapping::names::NamespaceMapping;

use crate::group::Coordinator;
use crate::produce::ProducerStates;
use crate::KafkaConfig;

/// Shared handler state.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: KafkaConfig,
    pub(crate) broker: Arc<Broker>,
    pub(crate) names: NamespaceMapping,
    /// Advertised host and port.
    pub(crate) host: String,
    pub(crate) port: i32,
    pub(crate) groups: Coordinator,
    pub(crate) producers: ProducerStates,
    next_producer_id: AtomicI64,
    pub(crate) shutdown: CancellationToken,
}

impl State {
    pub(crate) async fn start(
        config: KafkaConfig,
        ctx: HandlerContext,
    ) -> Result<Arc<State>, HandlerError> {
        let names = NamespaceMapping::new(&config.tenant, &config.namespace)
            .map_err(|e| HandlerError::Config(format!("[kafka] tenant/namespace: {e}")))?;
        ctx.broker.ensure_namespace(&names.namespace).await?;
        let (host, port) = match &config.advertised_listener {
            Some(a) => crate::parse_host_port(a).ok_or_else(|| {
                HandlerError::Config(format!(
                    "[kafka] advertised_listener `{a}` is not host:port"
                ))
            })?,
            None => {
                let addr = ctx.bound_addr("kafka").unwrap_or(config.listen);
                let ip = if addr.ip().is_unspecified() {
                    "127.0.0.1".to_owned()
                } else {
                    addr.ip().to_string()
                };
                (ip, i32::from(addr.port()))
            }
        };
        // Producer ids must not repeat across restarts (idempotence state
        // is keyed by them): start from the clock, in ms, times 1000.
        let first_pid = broker::message::now_ms().max(1) * 1000;
        let state = Arc::new(State {
            groups: Coordinator::new(&config),
            producers: ProducerStates::default(),
            next_producer_id: AtomicI64::new(first_pid),
            broker: ctx.broker.clone(),
            names,
            host,
            port,
            shutdown: ctx.shutdown.clone(),
            config,
        });
        Coordinator::spawn_reaper(&state);
        tracing::info!(host = %state.host, port = state.port, namespace = %state.names.namespace, "kafka handler started");
        Ok(state)
    }

    pub(crate) fn next_producer_id(&self) -> i64 {
        self.next_producer_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The broker topic of Kafka topic `name`.
    pub(crate) fn topic_name(&self, name: &str) -> Result<TopicName, ErrorCode> {
        mapping::kafka::validate_topic_name(name).map_err(|_| ErrorCode::InvalidTopicException)?;
        self.names
            .topic(name)
            .map_err(|_| ErrorCode::InvalidTopicException)
    }

    /// Metadata of an existing Kafka topic.
    pub(crate) fn topic(&self, name: &str) -> Result<(TopicName, TopicMeta), ErrorCode> {
        let t = self.topic_name(name)?;
        match self.broker.topic(&t) {
            Some(m) => Ok((t, m)),
            None => Err(ErrorCode::UnknownTopicOrPartition),
        }
    }

    /// The ledger of a partition of an existing Kafka topic.
    pub(crate) fn ledger(&self, name: &str, partition: i32) -> Result<Arc<Ledger>, ErrorCode> {
        let t = self.topic_name(name)?;
        if partition < 0 {
            return Err(ErrorCode::UnknownTopicOrPartition);
        }
        self.broker
            .ledger(&t, partition as u32)
            .map_err(|e| ErrorCode::from_broker(&e))
    }

    /// Every topic of the Kafka namespace whose name is a legal Kafka name.
    pub(crate) fn topics(&self) -> Vec<TopicMeta> {
        let mut v: Vec<TopicMeta> = self
            .broker
            .topics(&self.names.namespace)
            .into_iter()
            .filter(|t| mapping::kafka::validate_topic_name(&t.name.topic).is_ok())
            .collect();
        v.sort_by(|a, b| a.name.topic.cmp(&b.name.topic));
        v
    }
}

/// The Kafka topic id of a broker topic (its 128-bit id as a UUID).
pub(crate) fn topic_uuid(meta: &TopicMeta) -> uuid::Uuid {
    uuid::Uuid::from_u128(meta.id)
}

/// The leader epoch of every partition. One gateway has led each partition
/// since it was created, so there is one epoch, starting at the log start:
/// Metadata, ListOffsets, the `partitionLeaderEpoch` of fetched batches and
/// OffsetForLeaderEpoch all report this value, so a client's view of the
/// epoch and the epochs in its committed offsets agree.
pub(crate) const LEADER_EPOCH: i32 = 0;

/// A request's `current_leader_epoch` checked against [`LEADER_EPOCH`], as
/// a Kafka partition leader checks it: -1 means "not given" and passes; an
/// older epoch is FENCED_LEADER_EPOCH (the client's metadata is stale), a
/// newer one UNKNOWN_LEADER_EPOCH (this broker is behind the client).
pub(crate) fn check_current_leader_epoch(current: i32) -> Result<(), ErrorCode> {
    match current {
        -1 | LEADER_EPOCH => Ok(()),
        e if e < LEADER_EPOCH => Err(ErrorCode::FencedLeaderEpoch),
        _ => Err(ErrorCode::UnknownLeaderEpoch),
    }
}

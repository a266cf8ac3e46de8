//! Cluster and admin APIs: Metadata, DescribeCluster, FindCoordinator,
//! CreateTopics, DeleteTopics, CreatePartitions, DescribeConfigs,
//! AlterConfigs, IncrementalAlterConfigs.
//!
//! The gateway is a one-node Kafka cluster: it leads every partition (leader
//! epoch 0), is the controller and every group's coordinator. Topic configs
//! are the ones Manifold really has: `retention.ms`, `retention.bytes` and
//! `cleanup.policy` (only `delete`). Any other config name is INVALID_CONFIG.
//! A replication factor other than 1 is accepted and reported as 1 (storage
//! durability is the broker's fsync policy, not replicas).

use std::sync::Arc;

use broker::{BrokerError, TopicConfig, TopicMeta};
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, BrokerId, CreatePartitionsRequest,
    CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, DescribeClusterRequest, DescribeClusterResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, FindCoordinatorRequest, FindCoordinatorResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, MetadataRequest,
    MetadataResponse,
};
use kafka_protocol::protocol::StrBytes;
use mapping::kafka::ErrorCode;

use crate::state::{topic_uuid, State, LEADER_EPOCH};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// DescribeConfigs config sources.
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;
/// DescribeConfigs config types.
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_LIST: i8 = 7;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

fn partitions_of(state: &State, meta: &TopicMeta) -> Vec<MetadataResponsePartition> {
    let node = BrokerId(state.config.node_id);
    (0..meta.partitions as i32)
        .map(|p| {
            MetadataResponsePartition::default()
                .with_partition_index(p)
                .with_leader_id(node)
                .with_leader_epoch(LEADER_EPOCH)
                .with_replica_nodes(vec![node])
                .with_isr_nodes(vec![node])
        })
        .collect()
}

fn topic_entry(state: &State, meta: &TopicMeta) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_name(Some(s(meta.name.topic.clone()).into()))
        .with_topic_id(topic_uuid(meta))
        .with_partitions(partitions_of(state, meta))
        .with_topic_authorized_operations(i32::MIN)
}

pub(crate) async fn metadata(
    state: &Arc<State>,
    req: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let wanted: Option<Vec<Option<String>>> = match req.topics {
        None => None,
        // v0: an empty list means every topic.
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(
            t.into_iter()
                .map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        ),
    };
    let auto_create = version < 4 || req.allow_auto_topic_creation;
    let topics = match wanted {
        None => state
            .topics()
            .iter()
            .map(|m| topic_entry(state, m))
            .collect(),
        Some(names) => {
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                let Some(n) = n else {
                    out.push(
                        MetadataResponseTopic::default()
                            .with_error_code(ErrorCode::UnknownTopicId.code()),
                    );
                    continue;
                };
                let err = |code: ErrorCode| {
                    MetadataResponseTopic::default()
                        .with_name(Some(s(n.clone()).into()))
                        .with_error_code(code.code())
                };
                let name = match state.topic_name(&n) {
                    Ok(t) => t,
                    Err(e) => {
                        out.push(err(e));
                        continue;
                    }
                };
                let meta = match state.broker.topic(&name) {
                    Some(m) => Ok(m),
                    None if auto_create => state.broker.ensure_topic(&name).await,
                    None => Err(BrokerError::TopicNotFound(name.to_string())),
                };
                out.push(match meta {
                    Ok(m) => topic_entry(state, &m),
                    Err(e) => err(ErrorCode::from_broker(&e)),
                });
            }
            out
        }
    };
    MetadataResponse::default()
        .with_brokers(vec![MetadataResponseBroker::default()
            .with_node_id(BrokerId(state.config.node_id))
            .with_host(s(state.host.clone()))
            .with_port(state.port)])
        .with_cluster_id(Some(s(state.config.cluster_id.clone())))
        .with_controller_id(BrokerId(state.config.node_id))
        .with_topics(topics)
        .with_cluster_authorized_operations(i32::MIN)
}

pub(crate) fn describe_cluster(
    state: &State,
    _req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    DescribeClusterResponse::default()
        .with_cluster_id(s(state.config.cluster_id.clone()))
        .with_controller_id(BrokerId(state.config.node_id))
        .with_endpoint_type(1)
        .with_brokers(vec![DescribeClusterBroker::default()
            .with_broker_id(BrokerId(state.config.node_id))
            .with_host(s(state.host.clone()))
            .with_port(state.port)])
        .with_cluster_authorized_operations(i32::MIN)
}

pub(crate) fn find_coordinator(
    state: &State,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    // Key type 0 is a consumer group; 1 (transactions) is not supported.
    let supported = req.key_type == 0;
    let code = if supported {
        ErrorCode::None
    } else {
        ErrorCode::CoordinatorNotAvailable
    };
    if version >= 4 {
        let coordinators = req
            .coordinator_keys
            .into_iter()
            .map(|k| {
                let c = Coordinator::default()
                    .with_key(k)
                    .with_error_code(code.code());
                if supported {
                    c.with_node_id(BrokerId(state.config.node_id))
                        .with_host(s(state.host.clone()))
                        .with_port(state.port)
                } else {
                    c.with_node_id(BrokerId(-1)).with_port(-1)
                }
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    let r = FindCoordinatorResponse::default().with_error_code(code.code());
    if supported {
        r.with_node_id(BrokerId(state.config.node_id))
            .with_host(s(state.host.clone()))
            .with_port(state.port)
    } else {
        r.with_node_id(BrokerId(-1)).with_port(-1)
    }
}

/// Applies one `name = value` config to `cfg`.
fn apply_config(cfg: &mut TopicConfig, name: &str, value: Option<&str>) -> Result<(), String> {
    let parse = |v: Option<&str>| -> Result<Option<i64>, String> {
        match v {
            None => Ok(None),
            Some(v) => {
                let n: i64 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name} must be an integer, got `{v}`"))?;
                if n < -1 {
                    return Err(format!("{name} must be -1 or non-negative"));
                }
                Ok(Some(n))
            }
        }
    };
    match name {
        "retention.ms" => cfg.retention_ms = parse(value)?,
        "retention.bytes" => cfg.retention_bytes = parse(value)?,
        "cleanup.policy" => match value {
            None | Some("delete") => {}
            Some(v) => {
                return Err(format!(
                    "cleanup.policy `{v}` is not supported (only `delete`)"
                ))
            }
        },
        other => {
            return Err(format!(
                "unknown or unsupported topic config `{other}` (supported: retention.ms, retention.bytes, cleanup.policy)"
            ))
        }
    }
    Ok(())
}

pub(crate) async fn create_topics(
    state: &Arc<State>,
    req: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let res: Result<(i32, TopicConfig, Option<TopicMeta>), (ErrorCode, String)> = async {
            let tn = state
                .topic_name(&name)
                .map_err(|e| (e, "invalid topic name".to_string()))?;
            let policy = state
                .broker
                .namespace_policy(&tn.namespace)
                .map_err(|e| (ErrorCode::from_broker(&e), e.to_string()))?;
            let partitions = if !t.assignments.is_empty() {
                t.assignments.len() as i32
            } else if t.num_partitions == -1 {
                policy.default_partitions as i32
            } else {
                t.num_partitions
            };
            if partitions <= 0 || partitions > 10_000 {
                return Err((
                    ErrorCode::InvalidPartitions,
                    format!("number of partitions {partitions} must be in 1..=10000"),
                ));
            }
            if t.replication_factor == 0 || t.replication_factor < -1 {
                return Err((
                    ErrorCode::InvalidReplicationFactor,
                    "replication factor must be positive or -1".into(),
                ));
            }
            let mut cfg = TopicConfig::default();
            for c in &t.configs {
                apply_config(
                    &mut cfg,
                    c.name.as_str(),
                    c.value.as_ref().map(|v| v.as_str()),
                )
                .map_err(|e| (ErrorCode::InvalidConfig, e))?;
            }
            if state.broker.topic(&tn).is_some() {
                return Err((
                    ErrorCode::TopicAlreadyExists,
                    format!("topic `{name}` already exists"),
                ));
            }
            if req.validate_only {
                return Ok((partitions, cfg, None));
            }
            let meta = state
                .broker
                .create_topic(&tn, partitions as u32, cfg.clone())
                .await
                .map_err(|e| (ErrorCode::from_broker(&e), e.to_string()))?;
            Ok((partitions, cfg, Some(meta)))
        }
        .await;
        let r = CreatableTopicResult::default().with_name(t.name.clone());
        results.push(match res {
            Ok((partitions, cfg, meta)) => {
                let r = r
                    .with_num_partitions(partitions)
                    .with_replication_factor(1)
                    .with_configs(Some(
                        topic_configs(state, &cfg)
                            .into_iter()
                            .map(|c| {
                                CreatableTopicConfigs::default()
                                    .with_name(c.name)
                                    .with_value(c.value)
                                    .with_config_source(c.config_source)
                            })
                            .collect(),
                    ));
                match meta {
                    Some(m) => r.with_topic_id(topic_uuid(&m)),
                    None => r,
                }
            }
            Err((code, msg)) => r
                .with_error_code(code.code())
                .with_error_message(Some(s(msg)))
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

pub(crate) async fn delete_topics(
    state: &Arc<State>,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut out = Vec::new();
    for n in req.topic_names {
        let name = n.0.to_string();
        let res: Result<(), ErrorCode> = async {
            let (tn, _) = state.topic(&name)?;
            state
                .broker
                .delete_topic(&tn)
                .await
                .map_err(|e| ErrorCode::from_broker(&e))?;
            state.producers.forget_topic(&tn);
            Ok(())
        }
        .await;
        out.push(
            DeletableTopicResult::default()
                .with_name(Some(n))
                .with_error_code(res.err().unwrap_or(ErrorCode::None).code()),
        );
    }
    DeleteTopicsResponse::default().with_responses(out)
}

pub(crate) async fn create_partitions(
    state: &Arc<State>,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut out = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let res: Result<(), (ErrorCode, String)> = async {
            let (tn, meta) = state
                .topic(&name)
                .map_err(|e| (e, "unknown topic".into()))?;
            if t.count <= meta.partitions as i32 || t.count > 10_000 {
                return Err((
                    ErrorCode::InvalidPartitions,
                    format!(
                        "topic has {} partitions; the new count must be larger (at most 10000)",
                        meta.partitions
                    ),
                ));
            }
            if req.validate_only {
                return Ok(());
            }
            state
                .broker
                .set_partitions(&tn, t.count as u32)
                .await
                .map(|_| ())
                .map_err(|e| (ErrorCode::from_broker(&e), e.to_string()))
        }
        .await;
        let r = CreatePartitionsTopicResult::default().with_name(t.name);
        out.push(match res {
            Ok(()) => r,
            Err((c, m)) => r.with_error_code(c.code()).with_error_message(Some(s(m))),
        });
    }
    CreatePartitionsResponse::default().with_results(out)
}

/// The effective topic configs: `cfg` overrides over the namespace policy.
fn topic_configs(state: &State, cfg: &TopicConfig) -> Vec<DescribeConfigsResourceResult> {
    let policy = state
        .broker
        .namespace_policy(&state.names.namespace)
        .unwrap_or_default();
    let entry = |name: &str, value: String, overridden: bool, ty: i8| {
        DescribeConfigsResourceResult::default()
            .with_name(s(name))
            .with_value(Some(s(value)))
            .with_config_source(if overridden {
                SOURCE_DYNAMIC_TOPIC
            } else {
                SOURCE_DEFAULT
            })
            .with_config_type(ty)
    };
    vec![
        entry(
            "retention.ms",
            cfg.retention_ms.unwrap_or(policy.retention_ms).to_string(),
            cfg.retention_ms.is_some(),
            TYPE_LONG,
        ),
        entry(
            "retention.bytes",
            cfg.retention_bytes
                .unwrap_or(policy.retention_bytes)
                .to_string(),
            cfg.retention_bytes.is_some(),
            TYPE_LONG,
        ),
        entry("cleanup.policy", "delete".into(), false, TYPE_LIST),
    ]
}

pub(crate) fn describe_configs(
    state: &State,
    req: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let results = req
        .resources
        .into_iter()
        .map(|r| {
            let out = DescribeConfigsResult::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            let keys = r.configuration_keys.clone();
            let filter = |v: Vec<DescribeConfigsResourceResult>| -> Vec<_> {
                match &keys {
                    None => v,
                    Some(k) => v.into_iter().filter(|c| k.contains(&c.name)).collect(),
                }
            };
            match r.resource_type {
                RESOURCE_TOPIC => match state.topic(r.resource_name.as_str()) {
                    Ok((_, meta)) => out.with_configs(filter(topic_configs(state, &meta.config))),
                    Err(e) => out
                        .with_error_code(e.code())
                        .with_error_message(Some(s("unknown topic"))),
                },
                RESOURCE_BROKER => {
                    let static_entry = |name: &str, value: String, ty: i8| {
                        DescribeConfigsResourceResult::default()
                            .with_name(s(name))
                            .with_value(Some(s(value)))
                            .with_read_only(true)
                            .with_config_source(SOURCE_STATIC_BROKER)
                            .with_config_type(ty)
                    };
                    out.with_configs(filter(vec![
                        static_entry("broker.id", state.config.node_id.to_string(), TYPE_INT),
                        static_entry(
                            "advertised.listeners",
                            format!("PLAINTEXT://{}:{}", state.host, state.port),
                            TYPE_STRING,
                        ),
                        static_entry(
                            "socket.request.max.bytes",
                            state.config.max_frame_bytes.to_string(),
                            TYPE_INT,
                        ),
                    ]))
                }
                _ => out
                    .with_error_code(ErrorCode::InvalidRequest.code())
                    .with_error_message(Some(s("only topic and broker resources are supported"))),
            }
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

async fn alter_topic(
    state: &State,
    resource_type: i8,
    name: &str,
    validate_only: bool,
    f: impl FnOnce(&mut TopicConfig) -> Result<(), String>,
) -> Result<(), (ErrorCode, String)> {
    if resource_type != RESOURCE_TOPIC {
        return Err((
            ErrorCode::InvalidRequest,
            "only topic configs can be altered".into(),
        ));
    }
    let (tn, meta) = state.topic(name).map_err(|e| (e, "unknown topic".into()))?;
    let mut cfg = meta.config.clone();
    f(&mut cfg).map_err(|e| (ErrorCode::InvalidConfig, e))?;
    if validate_only {
        return Ok(());
    }
    state
        .broker
        .set_topic_config(&tn, cfg)
        .await
        .map(|_| ())
        .map_err(|e| (ErrorCode::from_broker(&e), e.to_string()))
}

pub(crate) async fn alter_configs(
    state: &Arc<State>,
    req: AlterConfigsRequest,
) -> AlterConfigsResponse {
    use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
    let mut out = Vec::new();
    for r in req.resources {
        // Non-incremental: the request's set replaces every override.
        let res = alter_topic(
            state,
            r.resource_type,
            r.resource_name.as_str(),
            req.validate_only,
            |cfg| {
                *cfg = TopicConfig::default();
                for c in &r.configs {
                    apply_config(cfg, c.name.as_str(), c.value.as_ref().map(|v| v.as_str()))?;
                }
                Ok(())
            },
        )
        .await;
        let x = AlterConfigsResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        out.push(match res {
            Ok(()) => x,
            Err((c, m)) => x.with_error_code(c.code()).with_error_message(Some(s(m))),
        });
    }
    AlterConfigsResponse::default().with_responses(out)
}

pub(crate) async fn incremental_alter_configs(
    state: &Arc<State>,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
    let mut out = Vec::new();
    for r in req.resources {
        let res = alter_topic(
            state,
            r.resource_type,
            r.resource_name.as_str(),
            req.validate_only,
            |cfg| {
                for c in &r.configs {
                    let name = c.name.as_str();
                    match c.config_operation {
                        0 => apply_config(cfg, name, c.value.as_ref().map(|v| v.as_str()))?,
                        1 => apply_config(cfg, name, None)?,
                        _ => {
                            return Err(format!(
                                "APPEND and SUBTRACT are not supported for `{name}`"
                            ))
                        }
                    }
                }
                Ok(())
            },
        )
        .await;
        let x = AlterConfigsResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        out.push(match res {
            Ok(()) => x,
            Err((c, m)) => x.with_error_code(c.code()).with_error_message(Some(s(m))),
        });
    }
    IncrementalAlterConfigsResponse::default().with_responses(out)
}

//! Names (`tenant/namespace/topic`), namespace policies and topic metadata.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, Result};

/// The tenant created on first start.
pub const DEFAULT_TENANT: &str = "public";
/// The namespace created on first start, inside [`DEFAULT_TENANT`].
pub const DEFAULT_NAMESPACE: &str = "default";

const MAX_NAME_LEN: usize = 255;

/// Checks one path component of a name: non-empty, at most 255 bytes, no
/// `/`, no control characters, not `.` or `..`.
pub fn validate_component(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(BrokerError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved");
    }
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return bad("contains `/` or a control character");
    }
    Ok(())
}

/// `tenant/namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamespaceName {
    pub tenant: String,
    pub namespace: String,
}

impl NamespaceName {
    /// A validated namespace name.
    ///
    /// # Errors
    /// [`BrokerError::InvalidName`] if either component is invalid.
    pub fn new(tenant: &str, namespace: &str) -> Result<Self> {
        validate_component(tenant)?;
        validate_component(namespace)?;
        Ok(NamespaceName {
            tenant: tenant.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// `public/default`.
    pub fn default_namespace() -> Self {
        NamespaceName {
            tenant: DEFAULT_TENANT.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

impl fmt::Display for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.namespace)
    }
}

/// `tenant/namespace/topic`. The topic part may contain any character but
/// `/` and control characters; protocol handlers map their names to it
/// through the `mapping` crate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicName {
    pub namespace: NamespaceName,
    pub topic: String,
}

impl TopicName {
    /// A validated topic name.
    ///
    /// # Errors
    /// [`BrokerError::InvalidName`] if any component is invalid.
    pub fn new(namespace: NamespaceName, topic: &str) -> Result<Self> {
        validate_component(topic)?;
        Ok(TopicName {
            namespace,
            topic: topic.to_owned(),
        })
    }

    /// Parses `tenant/namespace/topic`, optionally prefixed with
    /// `persistent://`.
    ///
    /// # Errors
    /// [`BrokerError::InvalidName`] if it does not have three valid parts.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.strip_prefix("persistent://").unwrap_or(s);
        let mut parts = s.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(n), Some(topic)) => TopicName::new(NamespaceName::new(t, n)?, topic),
            _ => Err(BrokerError::InvalidName {
                name: s.to_owned(),
                reason: "expected tenant/namespace/topic",
            }),
        }
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.topic)
    }
}

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Each append is fsynced on its own before it completes.
    Always,
    /// Appends that arrive together share one fsync; each completes only
    /// after that fsync.
    #[default]
    Group,
    /// Appends complete once written to the page cache; a timer fsyncs every
    /// `fsync_interval_ms`. Completed appends can be lost on power failure
    /// (not on a process crash).
    Interval,
}

/// Policies of a namespace. Every field has a default, so a partial policy
/// in a config file or REST request is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespacePolicy {
    /// Durability of appends.
    pub fsync: FsyncPolicy,
    /// Period of the background fsync under [`FsyncPolicy::Interval`].
    pub fsync_interval_ms: u64,
    /// Keep data at most this long (by entry timestamp); -1 keeps forever.
    pub retention_ms: i64,
    /// Keep at most this many bytes per partition; -1 for no limit.
    pub retention_bytes: i64,
    /// Create a topic on first use by a producer or consumer.
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic.
    pub default_partitions: u32,
    /// Roll a segment over at this size.
    pub segment_bytes: u64,
    /// Roll a segment over at this age.
    pub segment_ms: u64,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        NamespacePolicy {
            fsync: FsyncPolicy::Group,
            fsync_interval_ms: 100,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            auto_create_topics: true,
            default_partitions: 1,
            segment_bytes: 256 * 1024 * 1024,
            segment_ms: 24 * 3600 * 1000,
        }
    }
}

impl NamespacePolicy {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`BrokerError::InvalidArgument`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.default_partitions == 0 || self.default_partitions > 10_000 {
            return Err(BrokerError::InvalidArgument(
                "default_partitions must be in 1..=10000".into(),
            ));
        }
        if self.segment_bytes < 4096 {
            return Err(BrokerError::InvalidArgument(
                "segment_bytes must be at least 4096".into(),
            ));
        }
        if self.fsync_interval_ms == 0 {
            return Err(BrokerError::InvalidArgument(
                "fsync_interval_ms must be positive".into(),
            ));
        }
        if self.retention_ms < -1 || self.retention_bytes < -1 {
            return Err(BrokerError::InvalidArgument(
                "retention_ms and retention_bytes must be -1 or non-negative".into(),
            ));
        }
        Ok(())
    }
}

/// Per-topic overrides of namespace policies (Kafka topic configs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// Overrides [`NamespacePolicy::retention_ms`].
    pub retention_ms: Option<i64>,
    /// Overrides [`NamespacePolicy::retention_bytes`].
    pub retention_bytes: Option<i64>,
}

/// Persisted description of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: TopicName,
    /// Number of partitions, at least 1. Partition `i` is its own ledger.
    pub partitions: u32,
    /// Overrides of the namespace's policies.
    #[serde(default)]
    pub config: TopicConfig,
    /// Unique id assigned at creation (distinguishes a re-created topic).
    pub id: u128,
}

impl TopicMeta {
    /// Effective policy of this topic within its namespace policy.
    pub fn effective_policy(&self, ns: &NamespacePolicy) -> NamespacePolicy {
        let mut p = ns.clone();
        if let Some(r) = self.config.retention_ms {
            p.retention_ms = r;
        }
        if let Some(r) = self.config.retention_bytes {
            p.retention_bytes = r;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        let t = TopicName::parse("persistent://public/default/orders").unwrap();
        assert_eq!(t.namespace, NamespaceName::default_namespace());
        assert_eq!(t.topic, "orders");
        assert_eq!(t.to_string(), "public/default/orders");
        assert!(TopicName::parse("public/default").is_err());
        assert!(TopicName::parse("public//x").is_err());
        assert!(TopicName::parse("a/b/c/d").is_err());
        assert!(TopicName::parse("a/../c").is_err());
    }
}

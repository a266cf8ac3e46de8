//! Name mapping shared by handlers.

use broker::{BrokerError, NamespaceName, TopicName};

/// Where a protocol's topics land: a tenant and namespace from the
/// handler's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceMapping {
    pub namespace: NamespaceName,
}

impl Default for NamespaceMapping {
    fn default() -> Self {
        NamespaceMapping {
            namespace: NamespaceName::default_namespace(),
        }
    }
}

impl NamespaceMapping {
    /// A mapping into `tenant/namespace`.
    ///
    /// # Errors
    /// [`BrokerError::InvalidName`] for invalid components.
    pub fn new(tenant: &str, namespace: &str) -> Result<Self, BrokerError> {
        Ok(NamespaceMapping {
            namespace: NamespaceName::new(tenant, namespace)?,
        })
    }

    /// A protocol topic name that is a valid single component, mapped as is:
    /// `t` -> `tenant/namespace/t`.
    ///
    /// # Errors
    /// [`BrokerError::InvalidName`] when `name` is empty, too long, or
    /// contains `/` or control characters.
    pub fn topic(&self, name: &str) -> Result<TopicName, BrokerError> {
        TopicName::new(self.namespace.clone(), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_namespace_is_public_default() {
        let m = NamespaceMapping::default();
        assert_eq!(
            m.topic("orders").unwrap().to_string(),
            "public/default/orders"
        );
        assert!(m.topic("a/b").is_err());
    }
}

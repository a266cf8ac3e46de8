//! The gateway's TOML configuration.
//!
//! Top-level keys are the gateway's own (`protocols`, `data_dir`,
//! `shutdown_grace_ms`, `log_level`, `[admin]`, `[broker]`) plus one table
//! per compiled-in handler, named after it (`[kafka]`, `[mqtt]`, ...), which
//! the handler parses itself. Any other key is an error naming the key and
//! the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use broker::BrokerConfig;
use serde::{Deserialize, Serialize};

use crate::registry;

/// The embedded default configuration (`configs/standalone.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/standalone.toml");

/// Errors of loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// Admin HTTP settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API at all.
    pub enabled: bool,
    /// Address of `/metrics`, `/healthz`, `/readyz` and the REST API.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// The gateway's own keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Base {
    protocols: Vec<String>,
    data_dir: PathBuf,
    shutdown_grace_ms: u64,
    log_level: String,
    admin: AdminConfig,
    broker: toml::Value,
}

impl Default for Base {
    fn default() -> Self {
        Base {
            protocols: Vec::new(),
            data_dir: PathBuf::from("./data"),
            shutdown_grace_ms: 5_000,
            log_level: "info".into(),
            admin: AdminConfig::default(),
            broker: toml::Value::Table(toml::Table::new()),
        }
    }
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where the config came from (a path, or `<embedded default>`).
    pub source: String,
    /// Handlers to run, in order.
    pub protocols: Vec<String>,
    /// The broker's settings (its `data_dir` is the top-level `data_dir`).
    pub broker: BrokerConfig,
    /// Admin HTTP.
    pub admin: AdminConfig,
    /// How long connections may take to finish at shutdown.
    pub shutdown_grace_ms: u64,
    /// Default log filter (overridden by `--log-level` / `MANIFOLD_LOG`).
    pub log_level: String,
    /// Each handler's section, by handler name.
    pub sections: Vec<(String, toml::Value)>,
}

impl GatewayConfig {
    /// Parses `text` (from `source`, used in error messages).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the offending key.
    pub fn parse(text: &str, source: &str) -> Result<GatewayConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: source.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        let names: Vec<&str> = registry::compiled_in().iter().map(|f| f.name).collect();
        let mut sections = Vec::new();
        let keys: Vec<String> = table.keys().cloned().collect();
        for key in keys {
            if names.contains(&key.as_str()) {
                if let Some(v) = table.remove(&key) {
                    if !v.is_table() {
                        return Err(invalid(format!("`{key}` must be a table")));
                    }
                    sections.push((key, v));
                }
            } else if !matches!(
                key.as_str(),
                "protocols" | "data_dir" | "shutdown_grace_ms" | "log_level" | "admin" | "broker"
            ) {
                return Err(invalid(format!(
                    "unknown key `{key}` (known: protocols, data_dir, shutdown_grace_ms, log_level, admin, broker, and the handler sections {})",
                    names.join(", ")
                )));
            }
        }
        let base: Base = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        if base
            .broker
            .as_table()
            .is_some_and(|t| t.contains_key("data_dir"))
        {
            return Err(invalid(
                "`broker.data_dir` is not a key: set `data_dir` at the top level".into(),
            ));
        }
        let mut broker: BrokerConfig = base
            .broker
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| invalid(format!("in [broker]: {e}")))?;
        broker.data_dir = base.data_dir.clone();
        broker
            .default_policy
            .validate()
            .map_err(|e| invalid(format!("in [broker.default_policy]: {e}")))?;
        for p in &base.protocols {
            if !names.contains(&p.as_str()) {
                return Err(invalid(format!(
                    "unknown protocol `{p}` in `protocols`; compiled in: {}",
                    names.join(", ")
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &base.protocols {
            if !seen.insert(p) {
                return Err(invalid(format!("protocol `{p}` is listed twice")));
            }
        }
        Ok(GatewayConfig {
            source: source.to_owned(),
            protocols: base.protocols,
            broker,
            admin: base.admin,
            shutdown_grace_ms: base.shutdown_grace_ms,
            log_level: base.log_level,
            sections,
        })
    }

    /// Loads a file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Invalid`].
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.display().to_string(),
            source: e,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The embedded default.
    ///
    /// # Errors
    /// Only if the embedded file is broken (a build defect).
    pub fn default_config() -> Result<GatewayConfig, ConfigError> {
        Self::parse(DEFAULT_CONFIG, "<embedded default>")
    }

    /// The config section of handler `name`, if present.
    pub fn section(&self, name: &str) -> Option<&toml::Value> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses() {
        let c = GatewayConfig::default_config().unwrap();
        assert_eq!(c.broker.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn unknown_keys_name_key_and_file() {
        let e = GatewayConfig::parse("bogus = 1\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("`bogus`"), "{e}");
        let e = GatewayConfig::parse("[admin]\nlisen = \"1.2.3.4:5\"\n", "y.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.toml") && e.contains("lisen"), "{e}");
        let e = GatewayConfig::parse("[broker]\nmemory_budget_bytes = \"lots\"\n", "z.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("z.toml") && e.contains("memory_budget_bytes"),
            "{e}"
        );
        let e = GatewayConfig::parse("[broker.default_policy]\nfsync = \"sometimes\"\n", "w.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("w.toml") && e.contains("sometimes"), "{e}");
    }

    #[test]
    fn unknown_protocol_lists_compiled_in() {
        let e = GatewayConfig::parse("protocols = [\"smtp\"]\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("smtp") && e.contains("echo"), "{e}");
    }
}

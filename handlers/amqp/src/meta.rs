//! Crash-safe persistence of the AMQP metadata that the broker does not
//! hold: exchanges, queues (with their declaration) and bindings, per
//! virtual host, in one JSON file under `<data_dir>/amqp/`, replaced
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! Transient queues are recorded too, so that a restart after a crash
//! deletes their topics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::vhost::Dest;

/// The metadata file's name.
pub(crate) const FILE: &str = "metadata.json";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct MetaFile {
    pub(crate) version: u32,
    pub(crate) vhosts: BTreeMap<String, VhostMeta>,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct VhostMeta {
    #[serde(default)]
    pub(crate) exchanges: Vec<ExchangeMeta>,
    #[serde(default)]
    pub(crate) queues: Vec<QueueMeta>,
    #[serde(default)]
    pub(crate) bindings: Vec<BindingMeta>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct ExchangeMeta {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
    /// The arguments table in its AMQP encoding.
    pub(crate) arguments: Vec<u8>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct QueueMeta {
    pub(crate) name: String,
    pub(crate) topic: String,
    pub(crate) durable: bool,
    pub(crate) exclusive: bool,
    pub(crate) auto_delete: bool,
    pub(crate) arguments: Vec<u8>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct BindingMeta {
    pub(crate) source: String,
    pub(crate) dest: Dest,
    pub(crate) routing_key: String,
    pub(crate) arguments: Vec<u8>,
}

pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("amqp").join(FILE)
}

/// Reads the file; a missing file is empty metadata.
pub(crate) fn load(path: &Path) -> std::io::Result<MetaFile> {
    match std::fs::read(path) {
        Ok(d) => serde_json::from_slice(&d)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MetaFile::default()),
        Err(e) => Err(e),
    }
}

/// Writes `data` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

//! The broker: owns the data directory, the persisted metadata (tenants,
//! namespaces and their policies, topics), every open ledger, and the
//! background tasks (retention, cursor flushing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::error::{BrokerError, Result};
use crate::ledger::{write_atomic, CacheBudget, Journal, JournalOptions, Ledger, LedgerOptions};
use crate::message::now_ms;
use crate::topic::{NamespaceName, NamespacePolicy, TopicConfig, TopicMeta, TopicName};

/// Broker-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Root of all stored data.
    pub data_dir: PathBuf,
    /// Policy given to namespaces created without one (including
    /// `public/default` on first start).
    pub default_policy: NamespacePolicy,
    /// Bytes of appends that may be in flight at once, broker-wide;
    /// producers wait beyond it.
    pub memory_budget_bytes: u64,
    /// Largest entry (one producer batch) accepted.
    pub max_entry_bytes: usize,
    /// Depth of each ledger's append queue.
    pub append_queue_depth: usize,
    /// How often retention runs.
    pub retention_check_interval_ms: u64,
    /// How often changed cursors are persisted in the background.
    pub cursor_flush_interval_ms: u64,
    /// Bytes of the most recent entries each ledger keeps in memory for
    /// tailing readers (0: every read goes to the segment files).
    pub tail_cache_bytes: usize,
    /// Bytes all the partitions' tail caches may hold together; a partition
    /// whose commit does not fit is served from its segment files.
    pub read_cache_bytes: usize,
    /// Bytes of each partition's latest written data left in the OS page
    /// cache; older data is dropped from it once durable, so sustained
    /// appends reuse memory instead of growing the page cache (0: leave
    /// the page cache to the kernel).
    pub drop_behind_bytes: u64,
    /// Make small appends under the `group` policy durable through one
    /// journal shared by all partitions (one fdatasync per round for all
    /// of them) instead of an fdatasync of each partition's segment.
    pub journal: bool,
    /// Least time from the end of one journal round to the start of the
    /// next (what arrives meanwhile shares its fdatasync), and so the
    /// longest a journaled append waits for its round, in microseconds.
    pub journal_group_wait_us: u64,
    /// Size at which a journal file is checkpointed (its partitions'
    /// segments fdatasynced) and deleted.
    pub journal_file_bytes: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("./data"),
            default_policy: NamespacePolicy::default(),
            memory_budget_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 16 * 1024 * 1024,
            append_queue_depth: 1024,
            retention_check_interval_ms: 60_000,
            cursor_flush_interval_ms: 1_000,
            tail_cache_bytes: 1024 * 1024,
            read_cache_bytes: 256 * 1024 * 1024,
            drop_behind_bytes: 64 * 1024 * 1024,
            journal: true,
            journal_group_wait_us: JournalOptions::default().group_wait.as_micros() as u64,
            journal_file_bytes: JournalOptions::default().file_bytes,
        }
    }
}

/// Numbers of one cursor.
#[derive(Debug, Clone, Serialize)]
pub struct CursorStats {
    pub name: String,
    pub mark_delete: u64,
    pub backlog_messages: u64,
    pub backlog_bytes: u64,
}

/// Numbers of one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStats {
    pub partition: u32,
    pub start_offset: u64,
    pub end_offset: u64,
    pub size_bytes: u64,
    pub segments: usize,
    pub cursors: Vec<CursorStats>,
}

/// Numbers of a topic.
#[derive(Debug, Clone, Serialize)]
pub struct TopicStats {
    pub topic: String,
    pub partitions: Vec<PartitionStats>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Metadata {
    /// tenant -> namespace -> policy
    tenants: BTreeMap<String, BTreeMap<String, NamespacePolicy>>,
    /// "tenant/namespace/topic" -> meta
    topics: BTreeMap<String, TopicMeta>,
}

const METADATA_FILE: &str = "metadata.json";

/// Open ledgers: topic -> one ledger per partition. Looked up by reference
/// on every request, so no key is built or cloned on the hot path.
#[derive(Debug, Default)]
struct LedgerMap(dashmap::DashMap<TopicName, Vec<Arc<Ledger>>>);

impl LedgerMap {
    fn get(&self, t: &TopicName, p: u32) -> Option<Arc<Ledger>> {
        self.0.get(t).and_then(|v| v.get(p as usize).cloned())
    }

    /// Records the ledger of partition `p`; partitions are opened in order.
    fn insert(&self, t: TopicName, p: u32, l: Arc<Ledger>) {
        let mut v = self.0.entry(t).or_default();
        let i = p as usize;
        if i < v.len() {
            v[i] = l;
        } else {
            v.push(l);
        }
    }

    fn remove_topic(&self, t: &TopicName) -> Vec<Arc<Ledger>> {
        self.0.remove(t).map(|(_, v)| v).unwrap_or_default()
    }

    fn all(&self) -> Vec<(TopicName, Arc<Ledger>)> {
        self.0
            .iter()
            .flat_map(|e| {
                let t = e.key().clone();
                e.value()
                    .iter()
                    .map(move |l| (t.clone(), l.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The broker handle protocol handlers use. Shared as `Arc<Broker>`.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    /// Guards metadata changes and their persistence (held across the
    /// blocking write: metadata changes are rare and must be ordered).
    meta: tokio::sync::Mutex<Metadata>,
    /// A copy of the metadata for lock-free-ish reads.
    meta_view: std::sync::RwLock<Metadata>,
    ledgers: LedgerMap,
    budget: Arc<Semaphore>,
    cache_budget: Arc<CacheBudget>,
    shutdown: watch::Sender<bool>,
    topic_ids: AtomicU64,
    journal: Option<Arc<Journal>>,
}

impl Broker {
    /// Opens the broker on `config.data_dir`: loads the metadata (creating
    /// `public/default` on first start), replays the journal, opens and
    /// recovers every ledger,
    /// and starts the retention and cursor-flush tasks.
    ///
    /// # Errors
    /// I/O errors on the data directory, unreadable metadata, or a ledger
    /// that cannot be recovered.
    pub async fn open(config: BrokerConfig) -> Result<Arc<Broker>> {
        config.default_policy.validate()?;
        let dir = config.data_dir.clone();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| BrokerError::io(&dir, e))?;
        let path = dir.join(METADATA_FILE);
        let mut meta: Metadata = match tokio::fs::read(&path).await {
            Ok(data) => serde_json::from_slice(&data).map_err(|e| BrokerError::Metadata {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Metadata::default(),
            Err(e) => return Err(BrokerError::io(&path, e)),
        };
        let first_start = meta.tenants.is_empty() && meta.topics.is_empty();
        if first_start {
            let d = NamespaceName::default_namespace();
            meta.tenants
                .entry(d.tenant.clone())
                .or_default()
                .insert(d.namespace.clone(), config.default_policy.clone());
        }
        let units = (config.memory_budget_bytes / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        // Replayed before any ledger opens: its records restore what the
        // segments lost (also when the journal is off now: the last run
        // may have crashed with it on).
        let journal = if config.journal {
            let (root, options) = (
                dir.clone(),
                JournalOptions {
                    group_wait: Duration::from_micros(config.journal_group_wait_us),
                    file_bytes: config.journal_file_bytes.max(4096),
                },
            );
            Some(
                tokio::task::spawn_blocking(move || Journal::open(&root, options))
                    .await
                    .map_err(|_| BrokerError::Closed)??,
            )
        } else {
            let root = dir.clone();
            tokio::task::spawn_blocking(move || Journal::recover(&root))
                .await
                .map_err(|_| BrokerError::Closed)??;
            None
        };
        let (shutdown, _) = watch::channel(false);
        let broker = Arc::new(Broker {
            budget: Arc::new(Semaphore::new(units as usize)),
            cache_budget: CacheBudget::new(config.read_cache_bytes),
            meta_view: std::sync::RwLock::new(meta.clone()),
            meta: tokio::sync::Mutex::new(meta.clone()),
            ledgers: LedgerMap::default(),
            shutdown,
            topic_ids: AtomicU64::new(now_ms() as u64),
            journal,
            config,
        });
        if first_start {
            broker.persist(&meta).await?;
        }
        // Open every ledger now so that recovery happens at start.
        for t in meta.topics.values() {
            for p in 0..t.partitions {
                broker.open_ledger(&meta, t, p).await?;
            }
        }
        broker.clone().spawn_background();
        Ok(broker)
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    fn ledger_options(&self) -> LedgerOptions {
        LedgerOptions {
            max_entry_bytes: self.config.max_entry_bytes,
            queue_depth: self.config.append_queue_depth,
            max_batch_bytes: 8 * 1024 * 1024,
            budget_units: (self.config.memory_budget_bytes / 1024)
                .clamp(1, u64::from(u32::MAX >> 3)) as u32,
            tail_cache_bytes: self.config.tail_cache_bytes,
            cache_budget: self.cache_budget.clone(),
            drop_behind_bytes: self.config.drop_behind_bytes,
            journal: self.journal.clone(),
        }
    }

    fn ledger_dir(&self, t: &TopicName, partition: u32) -> PathBuf {
        ledger_dir(&self.config.data_dir, t, partition)
    }

    async fn open_ledger(&self, meta: &Metadata, t: &TopicMeta, p: u32) -> Result<Arc<Ledger>> {
        let policy = Self::policy_in(meta, t)?;
        let dir = self.ledger_dir(&t.name, p);
        let name = format!("{}-{}", t.name, p);
        let opts = self.ledger_options();
        let budget = self.budget.clone();
        let ledger = tokio::task::spawn_blocking({
            let rt = tokio::runtime::Handle::current();
            move || {
                let _g = rt.enter();
                Ledger::open(&name, &dir, policy, opts, budget)
            }
        })
        .await
        .map_err(|_| BrokerError::Closed)??;
        self.ledgers.insert(t.name.clone(), p, ledger.clone());
        Ok(ledger)
    }

    fn policy_in(meta: &Metadata, t: &TopicMeta) -> Result<NamespacePolicy> {
        let ns = &t.name.namespace;
        let p = meta
            .tenants
            .get(&ns.tenant)
            .and_then(|n| n.get(&ns.namespace))
            .ok_or_else(|| BrokerError::NamespaceNotFound(ns.to_string()))?;
        Ok(t.effective_policy(p))
    }

    async fn persist(&self, meta: &Metadata) -> Result<()> {
        let path = self.config.data_dir.join(METADATA_FILE);
        let data = serde_json::to_vec_pretty(meta).map_err(|e| BrokerError::Metadata {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &data))
            .await
            .map_err(|_| BrokerError::Closed)??;
        *self.meta_view.write().unwrap_or_else(|e| e.into_inner()) = meta.clone();
        Ok(())
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, Metadata> {
        self.meta_view.read().unwrap_or_else(|e| e.into_inner())
    }

    // ---- tenants and namespaces ----

    /// Names of all tenants.
    pub fn tenants(&self) -> Vec<String> {
        self.view().tenants.keys().cloned().collect()
    }

    /// Creates a tenant.
    ///
    /// # Errors
    /// [`BrokerError::AlreadyExists`], [`BrokerError::InvalidName`].
    pub async fn create_tenant(&self, tenant: &str) -> Result<()> {
        crate::topic::validate_component(tenant)?;
        let mut meta = self.meta.lock().await;
        if meta.tenants.contains_key(tenant) {
            return Err(BrokerError::AlreadyExists(tenant.to_owned()));
        }
        let mut next = meta.clone();
        next.tenants.insert(tenant.to_owned(), BTreeMap::new());
        self.persist(&next).await?;
        *meta = next;
        Ok(())
    }

    /// Deletes an empty tenant.
    ///
    /// # Errors
    /// [`BrokerError::TenantNotFound`], [`BrokerError::NotEmpty`].
    pub async fn delete_tenant(&self, tenant: &str) -> Result<()> {
        let mut meta = self.meta.lock().await;
        match meta.tenants.get(tenant) {
            None => return Err(BrokerError::TenantNotFound(tenant.to_owned())),
            Some(ns) if !ns.is_empty() => return Err(BrokerError::NotEmpty(tenant.to_owned())),
            Some(_) => {}
        }
        let mut next = meta.clone();
        next.tenants.remove(tenant);
        self.persist(&next).await?;
        *meta = next;
        Ok(())
    }

    /// Namespaces of a tenant.
    ///
    /// # Errors
    /// [`BrokerError::TenantNotFound`].
    pub fn namespaces(&self, tenant: &str) -> Result<Vec<NamespaceName>> {
        let v = self.view();
        let ns = v
            .tenants
            .get(tenant)
            .ok_or_else(|| BrokerError::TenantNotFound(tenant.to_owned()))?;
        Ok(ns
            .keys()
            .map(|n| NamespaceName {
                tenant: tenant.to_owned(),
                namespace: n.clone(),
            })
            .collect())
    }

    /// Creates a namespace with `policy` (the broker's default policy if
    /// `None`). The tenant must exist.
    ///
    /// # Errors
    /// [`BrokerError::TenantNotFound`], [`BrokerError::AlreadyExists`],
    /// [`BrokerError::InvalidArgument`] for a bad policy.
    pub async fn create_namespace(
        &self,
        ns: &NamespaceName,
        policy: Option<NamespacePolicy>,
    ) -> Result<()> {
        let policy = policy.unwrap_or_else(|| self.config.default_policy.clone());
        policy.validate()?;
        let mut meta = self.meta.lock().await;
        let t = meta
            .tenants
            .get(&ns.tenant)
            .ok_or_else(|| BrokerError::TenantNotFound(ns.tenant.clone()))?;
        if t.contains_key(&ns.namespace) {
            return Err(BrokerError::AlreadyExists(ns.to_string()));
        }
        let mut next = meta.clone();
        next.tenants
            .entry(ns.tenant.clone())
            .or_default()
            .insert(ns.namespace.clone(), policy);
        self.persist(&next).await?;
        *meta = next;
        Ok(())
    }

    /// Creates the tenant and namespace if missing (for handlers whose
    /// protocol creates namespaces on demand, e.g. AMQP virtual hosts).
    ///
    /// # Errors
    /// I/O errors persisting metadata.
    pub async fn ensure_namespace(&self, ns: &NamespaceName) -> Result<()> {
        if self.namespace_policy(ns).is_ok() {
            return Ok(());
        }
        match self.create_tenant(&ns.tenant).await {
            Ok(()) | Err(BrokerError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        match self.create_namespace(ns, None).await {
            Ok(()) | Err(BrokerError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a namespace that has no topics.
    ///
    /// # Errors
    /// [`BrokerError::NamespaceNotFound`], [`BrokerError::NotEmpty`].
    pub async fn delete_namespace(&self, ns: &NamespaceName) -> Result<()> {
        let mut meta = self.meta.lock().await;
        if !meta
            .tenants
            .get(&ns.tenant)
            .is_some_and(|t| t.contains_key(&ns.namespace))
        {
            return Err(BrokerError::NamespaceNotFound(ns.to_string()));
        }
        if meta.topics.values().any(|t| &t.name.namespace == ns) {
            return Err(BrokerError::NotEmpty(ns.to_string()));
        }
        let mut next = meta.clone();
        if let Some(t) = next.tenants.get_mut(&ns.tenant) {
            t.remove(&ns.namespace);
        }
        self.persist(&next).await?;
        *meta = next;
        Ok(())
    }

    /// The policy of a namespace.
    ///
    /// # Errors
    /// [`BrokerError::NamespaceNotFound`].
    pub fn namespace_policy(&self, ns: &NamespaceName) -> Result<NamespacePolicy> {
        self.view()
            .tenants
            .get(&ns.tenant)
            .and_then(|t| t.get(&ns.namespace))
            .cloned()
            .ok_or_else(|| BrokerError::NamespaceNotFound(ns.to_string()))
    }

    /// Replaces the policy of a namespace; open ledgers pick it up.
    ///
    /// # Errors
    /// [`BrokerError::NamespaceNotFound`], [`BrokerError::InvalidArgument`].
    pub async fn set_namespace_policy(
        &self,
        ns: &NamespaceName,
        policy: NamespacePolicy,
    ) -> Result<()> {
        policy.validate()?;
        let mut meta = self.meta.lock().await;
        let mut next = meta.clone();
        let slot = next
            .tenants
            .get_mut(&ns.tenant)
            .and_then(|t| t.get_mut(&ns.namespace))
            .ok_or_else(|| BrokerError::NamespaceNotFound(ns.to_string()))?;
        *slot = policy;
        self.persist(&next).await?;
        *meta = next;
        let topics: Vec<TopicMeta> = meta
            .topics
            .values()
            .filter(|t| &t.name.namespace == ns)
            .cloned()
            .collect();
        for t in topics {
            let p = Self::policy_in(&meta, &t)?;
            for i in 0..t.partitions {
                if let Some(l) = self.ledgers.get(&t.name, i) {
                    l.set_policy(p.clone()).await;
                }
            }
        }
        Ok(())
    }

    // ---- topics ----

    /// Topics of a namespace.
    pub fn topics(&self, ns: &NamespaceName) -> Vec<TopicMeta> {
        self.view()
            .topics
            .values()
            .filter(|t| &t.name.namespace == ns)
            .cloned()
            .collect()
    }

    /// Metadata of a topic, if it exists.
    pub fn topic(&self, name: &TopicName) -> Option<TopicMeta> {
        self.view().topics.get(&name.to_string()).cloned()
    }

    /// Creates a topic with `partitions` partitions.
    ///
    /// # Errors
    /// [`BrokerError::NamespaceNotFound`], [`BrokerError::AlreadyExists`],
    /// [`BrokerError::InvalidArgument`] for 0 or more than 10,000 partitions.
    pub async fn create_topic(
        &self,
        name: &TopicName,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<TopicMeta> {
        if partitions == 0 || partitions > 10_000 {
            return Err(BrokerError::InvalidArgument(
                "partitions must be in 1..=10000".into(),
            ));
        }
        let mut meta = self.meta.lock().await;
        if meta.topics.contains_key(&name.to_string()) {
            return Err(BrokerError::AlreadyExists(name.to_string()));
        }
        let t = TopicMeta {
            name: name.clone(),
            partitions,
            config,
            id: (u128::from(self.topic_ids.fetch_add(1, Ordering::Relaxed)) << 32)
                | u128::from(std::process::id()),
        };
        Self::policy_in(&meta, &t)?;
        // Leftovers of a topic deleted by a crash half-way: start clean.
        for p in 0..partitions {
            let dir = self.ledger_dir(name, p);
            if dir.exists() {
                let _ = tokio::fs::remove_dir_all(&dir).await;
            }
        }
        let mut next = meta.clone();
        next.topics.insert(name.to_string(), t.clone());
        self.persist(&next).await?;
        *meta = next;
        for p in 0..partitions {
            self.open_ledger(&meta, &t, p).await?;
        }
        tracing::info!(topic = %name, partitions, "created topic");
        Ok(t)
    }

    /// The topic if it exists; otherwise creates it with the namespace's
    /// default partition count when the namespace allows auto-creation.
    ///
    /// # Errors
    /// [`BrokerError::TopicNotFound`] when it does not exist and may not be
    /// auto-created; [`BrokerError::NamespaceNotFound`].
    pub async fn ensure_topic(&self, name: &TopicName) -> Result<TopicMeta> {
        if let Some(t) = self.topic(name) {
            return Ok(t);
        }
        let policy = self.namespace_policy(&name.namespace)?;
        if !policy.auto_create_topics {
            return Err(BrokerError::TopicNotFound(name.to_string()));
        }
        match self
            .create_topic(name, policy.default_partitions, TopicConfig::default())
            .await
        {
            Ok(t) => Ok(t),
            Err(BrokerError::AlreadyExists(_)) => self
                .topic(name)
                .ok_or_else(|| BrokerError::TopicNotFound(name.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Deletes a topic and all its data and cursors.
    ///
    /// # Errors
    /// [`BrokerError::TopicNotFound`].
    pub async fn delete_topic(&self, name: &TopicName) -> Result<()> {
        let mut meta = self.meta.lock().await;
        if !meta.topics.contains_key(&name.to_string()) {
            return Err(BrokerError::TopicNotFound(name.to_string()));
        }
        let mut next = meta.clone();
        next.topics.remove(&name.to_string());
        self.persist(&next).await?;
        *meta = next;
        for l in self.ledgers.remove_topic(name) {
            l.delete().await?;
        }
        let dir = self
            .config
            .data_dir
            .join("ledgers")
            .join(&name.namespace.tenant)
            .join(&name.namespace.namespace)
            .join(escape(&name.topic));
        let _ = tokio::fs::remove_dir_all(&dir).await;
        tracing::info!(topic = %name, "deleted topic");
        Ok(())
    }

    /// Raises the partition count of a topic.
    ///
    /// # Errors
    /// [`BrokerError::TopicNotFound`]; [`BrokerError::InvalidArgument`] if
    /// `count` is not above the current count or above 10,000.
    pub async fn set_partitions(&self, name: &TopicName, count: u32) -> Result<TopicMeta> {
        let mut meta = self.meta.lock().await;
        let t = meta
            .topics
            .get(&name.to_string())
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_string()))?;
        if count <= t.partitions || count > 10_000 {
            return Err(BrokerError::InvalidArgument(format!(
                "partition count must grow from {} and be at most 10000",
                t.partitions
            )));
        }
        let mut nt = t.clone();
        nt.partitions = count;
        let mut next = meta.clone();
        next.topics.insert(name.to_string(), nt.clone());
        self.persist(&next).await?;
        *meta = next;
        for p in t.partitions..count {
            self.open_ledger(&meta, &nt, p).await?;
        }
        Ok(nt)
    }

    /// Replaces a topic's config overrides.
    ///
    /// # Errors
    /// [`BrokerError::TopicNotFound`], [`BrokerError::InvalidArgument`].
    pub async fn set_topic_config(
        &self,
        name: &TopicName,
        config: TopicConfig,
    ) -> Result<TopicMeta> {
        if config.retention_ms.is_some_and(|v| v < -1)
            || config.retention_bytes.is_some_and(|v| v < -1)
        {
            return Err(BrokerError::InvalidArgument(
                "retention must be -1 or non-negative".into(),
            ));
        }
        let mut meta = self.meta.lock().await;
        let mut t = meta
            .topics
            .get(&name.to_string())
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_string()))?;
        t.config = config;
        let mut next = meta.clone();
        next.topics.insert(name.to_string(), t.clone());
        self.persist(&next).await?;
        *meta = next;
        Ok(t)
    }

    /// The ledger of one partition of an existing topic.
    ///
    /// # Errors
    /// [`BrokerError::TopicNotFound`], [`BrokerError::PartitionNotFound`].
    pub fn ledger(&self, name: &TopicName, partition: u32) -> Result<Arc<Ledger>> {
        if let Some(l) = self.ledgers.get(name, partition) {
            return Ok(l);
        }
        match self.topic(name) {
            None => Err(BrokerError::TopicNotFound(name.to_string())),
            Some(_) => Err(BrokerError::PartitionNotFound {
                topic: name.to_string(),
                partition,
            }),
        }
    }

    /// Offsets, sizes and cursor backlogs of a topic.
    ///
    /// # Errors
    /// [`BrokerError::TopicNotFound`].
    pub fn topic_stats(&self, name: &TopicName) -> Result<TopicStats> {
        let t = self
            .topic(name)
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_string()))?;
        let mut partitions = Vec::new();
        for p in 0..t.partitions {
            let l = self.ledger(name, p)?;
            let s = l.stats();
            let cursors = l
                .cursor_names()
                .into_iter()
                .filter_map(|n| l.cursor(&n))
                .map(|c| {
                    let b = l.backlog(&c);
                    CursorStats {
                        name: c.name().to_owned(),
                        mark_delete: c.mark_delete(),
                        backlog_messages: b.messages,
                        backlog_bytes: b.bytes,
                    }
                })
                .collect();
            partitions.push(PartitionStats {
                partition: p,
                start_offset: s.start_offset,
                end_offset: s.end_offset,
                size_bytes: s.size_bytes,
                segments: s.segments,
                cursors,
            });
        }
        Ok(TopicStats {
            topic: name.to_string(),
            partitions,
        })
    }

    /// Runs retention on every ledger once. Returns segments deleted.
    pub async fn run_retention(&self) -> usize {
        let now = now_ms();
        let meta = self.view().clone();
        let mut deleted = 0;
        for (name, l) in self.ledgers.all() {
            let Some(t) = meta.topics.get(&name.to_string()) else {
                continue;
            };
            let Ok(policy) = Self::policy_in(&meta, t) else {
                continue;
            };
            match l.apply_retention(&policy, now).await {
                Ok(n) => deleted += n,
                Err(BrokerError::Closed) => {}
                Err(e) => tracing::warn!(ledger = l.name(), error = %e, "retention failed"),
            }
        }
        deleted
    }

    /// Persists every changed cursor of every ledger.
    pub async fn persist_cursors(&self) {
        for (_, l) in self.ledgers.all() {
            if let Err(e) = l.persist_cursors().await {
                tracing::warn!(ledger = l.name(), error = %e, "could not persist cursors");
            }
        }
    }

    fn spawn_background(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let weak = Arc::downgrade(&self);
        let retention = Duration::from_millis(self.config.retention_check_interval_ms.max(10));
        let flush = Duration::from_millis(self.config.cursor_flush_interval_ms.max(10));
        tokio::spawn(async move {
            let mut rt = tokio::time::interval(retention);
            let mut ft = tokio::time::interval(flush);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = rt.tick() => {
                        let Some(b) = weak.upgrade() else { break };
                        b.run_retention().await;
                    }
                    _ = ft.tick() => {
                        let Some(b) = weak.upgrade() else { break };
                        b.persist_cursors().await;
                    }
                }
            }
        });
    }

    /// Stops background tasks, persists every cursor, flushes and closes
    /// every ledger. Idempotent.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        for (_, l) in self.ledgers.all() {
            l.close().await;
        }
        if let Some(j) = self.journal.clone() {
            let _ = tokio::task::spawn_blocking(move || j.shutdown()).await;
        }
    }

    /// The in-flight append memory budget: (bytes available now, total
    /// bytes). Handlers may signal back-pressure to clients (AMQP
    /// `connection.blocked`, ...) when little is available.
    pub fn memory_budget(&self) -> (u64, u64) {
        let total = (self.config.memory_budget_bytes / 1024).clamp(1, u64::from(u32::MAX >> 3));
        (self.budget.available_permits() as u64 * 1024, total * 1024)
    }

    /// Bytes the partitions' tail caches hold now, and their shared limit.
    pub fn read_cache(&self) -> (usize, usize) {
        (self.cache_budget.used(), self.config.read_cache_bytes)
    }

    /// Is the broker still accepting work?
    pub fn is_running(&self) -> bool {
        !*self.shutdown.borrow()
    }
}

/// Escapes a topic name into one directory name: bytes outside
/// `[A-Za-z0-9._-]` become `%XX`.
fn escape(topic: &str) -> String {
    let mut s = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !s.is_empty()) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn ledger_dir(data: &Path, t: &TopicName, partition: u32) -> PathBuf {
    data.join("ledgers")
        .join(&t.namespace.tenant)
        .join(&t.namespace.namespace)
        .join(escape(&t.topic))
        .join(partition.to_string())
}

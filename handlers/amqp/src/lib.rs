//! Manifold's AMQP 0-9-1 handler: RabbitMQ clients declare, publish,
//! consume and confirm against the broker core.
//!
//! Layout: [`codec`] is the sans-IO wire codec; `vhost` holds exchanges,
//! bindings and routing; `queue` maps a queue to a ledger topic with one
//! durable cursor and dispatches to consumers; `publish` is the per-channel
//! pipeline that appends and confirms; `conn` is one connection's state
//! machine. How AMQP concepts map to the core is documented in
//! `mapping::amqp`.
//!
//! This crate must not know other protocols: messages written by them are
//! read through `mapping::entry_messages`.

pub mod codec;
pub mod config;
mod conn;
mod message;
mod meta;
mod publish;
mod queue;
mod vhost;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use broker::Broker;
use handler_api::{
    BoxFuture, Connection, HandlerContext, HandlerError, HandlerFactory, ListenerSpec,
    ProtocolHandler,
};

pub use config::AmqpConfig;

use crate::queue::{Queue, QueueArgs, QueueDecl};
use crate::vhost::{Binding, Dest, ExKind, Exchange, VHost};

/// The handler's factory, registered by the gateway as `amqp`.
pub const FACTORY: HandlerFactory = HandlerFactory {
    name: "amqp",
    build: |section| {
        let config: AmqpConfig = handler_api::parse_section(section)?;
        config.validate().map_err(HandlerError::Config)?;
        Ok(Arc::new(AmqpHandler {
            config,
            shared: OnceLock::new(),
        }))
    },
};

/// The AMQP 0-9-1 protocol handler.
#[derive(Debug)]
pub struct AmqpHandler {
    config: AmqpConfig,
    shared: OnceLock<Arc<Shared>>,
}

impl AmqpHandler {
    /// A handler with `config` (for tests and embedding).
    pub fn new(config: AmqpConfig) -> Arc<AmqpHandler> {
        Arc::new(AmqpHandler {
            config,
            shared: OnceLock::new(),
        })
    }
}

/// State shared by every connection of the handler.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) broker: Arc<Broker>,
    pub(crate) config: AmqpConfig,
    pub(crate) vhosts: Mutex<HashMap<String, Arc<VHost>>>,
    /// Serializes queue creation and deletion (one dispatcher per queue).
    pub(crate) decl_lock: tokio::sync::Mutex<()>,
    persist_lock: tokio::sync::Mutex<()>,
    pub(crate) conn_ids: AtomicU64,
    pub(crate) max_message_bytes: u64,
}

impl Shared {
    fn vhosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<VHost>>> {
        self.vhosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vhost `name`, created (with its namespace) when allowed.
    pub(crate) async fn vhost(
        &self,
        name: &str,
        create: bool,
    ) -> Result<Option<Arc<VHost>>, HandlerError> {
        if let Some(v) = self.vhosts().get(name) {
            return Ok(Some(v.clone()));
        }
        let ns = mapping::amqp::vhost_namespace(&self.config.vhost_tenant, name)?;
        if !create && self.broker.namespace_policy(&ns).is_err() {
            return Ok(None);
        }
        self.broker.ensure_namespace(&ns).await?;
        let mut map = self.vhosts();
        Ok(Some(
            map.entry(name.to_owned())
                .or_insert_with(|| Arc::new(VHost::new(name, ns)))
                .clone(),
        ))
    }

    /// Persists exchanges, queues and bindings of every vhost.
    pub(crate) async fn persist(&self) {
        let _g = self.persist_lock.lock().await;
        let file = meta::MetaFile {
            version: 1,
            vhosts: self
                .vhosts()
                .iter()
                .map(|(n, v)| (n.clone(), v.meta()))
                .collect(),
        };
        let data = match serde_json::to_vec_pretty(&file) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize AMQP metadata");
                return;
            }
        };
        let path = meta::path(&self.broker.config().data_dir);
        let res = tokio::task::spawn_blocking(move || meta::write_atomic(&path, &data)).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot persist AMQP metadata"),
            Err(e) => tracing::error!(error = %e, "cannot persist AMQP metadata"),
        }
    }

    /// Deletes a queue: its bindings, its consumers (cancelled), its topic.
    /// Returns the ready messages it held.
    pub(crate) async fn delete_queue(&self, vhost: &Arc<VHost>, name: &str) -> u64 {
        let _g = self.decl_lock.lock().await;
        let q = {
            let mut st = vhost.lock();
            let Some(q) = st.queues.remove(name) else {
                return 0;
            };
            let dest = Dest::Queue(name.to_owned());
            let mut emptied = Vec::new();
            for ex in st.exchanges.values_mut() {
                let before = ex.bindings.len();
                ex.bindings.retain(|b| b.dest != dest);
                if before != ex.bindings.len() && ex.bindings.is_empty() && ex.auto_delete {
                    emptied.push(ex.name.clone());
                }
            }
            for e in emptied {
                remove_exchange(&mut st, &e);
            }
            q
        };
        let n = q.mark_deleted();
        if let Err(e) = self.broker.delete_topic(&q.topic).await {
            tracing::warn!(queue = name, error = %e, "could not delete the queue's topic");
        }
        self.persist().await;
        n
    }

    async fn recover(self: &Arc<Self>) -> Result<(), HandlerError> {
        let path = meta::path(&self.broker.config().data_dir);
        let file = tokio::task::spawn_blocking(move || meta::load(&path))
            .await
            .map_err(|e| HandlerError::Io(std::io::Error::other(e)))??;
        for (name, vm) in file.vhosts {
            let Some(vh) = self.vhost(&name, true).await? else {
                continue;
            };
            {
                let mut st = vh.lock();
                for e in &vm.exchanges {
                    let Some(kind) = ExKind::parse(&e.kind) else {
                        continue;
                    };
                    st.exchanges.insert(
                        e.name.clone(),
                        Exchange {
                            name: e.name.clone(),
                            kind,
                            durable: e.durable,
                            auto_delete: e.auto_delete,
                            internal: e.internal,
                            arguments: vhost::table_from_bytes(&e.arguments),
                            bindings: Vec::new(),
                        },
                    );
                }
            }
            for q in &vm.queues {
                let topic = broker::TopicName::new(vh.ns.clone(), &q.topic)?;
                if !q.durable || q.exclusive {
                    if self.broker.topic(&topic).is_some() {
                        if let Err(e) = self.broker.delete_topic(&topic).await {
                            tracing::warn!(queue = %q.name, error = %e, "could not delete a transient queue's topic");
                        }
                    }
                    continue;
                }
                let arguments = vhost::table_from_bytes(&q.arguments);
                let args = QueueArgs::parse(&arguments).unwrap_or_default();
                let queue = Queue::open(
                    self,
                    &vh,
                    QueueDecl {
                        name: q.name.clone(),
                        durable: true,
                        exclusive_owner: None,
                        auto_delete: q.auto_delete,
                        arguments,
                        args,
                    },
                )
                .await?;
                vh.lock().queues.insert(q.name.clone(), queue);
            }
            let mut st = vh.lock();
            for b in &vm.bindings {
                let dest_ok = match &b.dest {
                    Dest::Queue(q) => st.queues.contains_key(q),
                    Dest::Exchange(e) => st.exchanges.contains_key(e),
                };
                if !dest_ok {
                    continue;
                }
                if let Some(ex) = st.exchanges.get_mut(&b.source) {
                    ex.bindings.push(Binding {
                        dest: b.dest.clone(),
                        routing_key: b.routing_key.clone(),
                        arguments: vhost::table_from_bytes(&b.arguments),
                    });
                }
            }
        }
        self.persist().await;
        Ok(())
    }
}

/// Removes an exchange and every binding that leads to it.
pub(crate) fn remove_exchange(st: &mut vhost::VState, name: &str) {
    st.exchanges.remove(name);
    let dest = Dest::Exchange(name.to_owned());
    for ex in st.exchanges.values_mut() {
        ex.bindings.retain(|b| b.dest != dest);
    }
}

impl ProtocolHandler for AmqpHandler {
    fn protocol(&self) -> &'static str {
        "amqp"
    }

    fn listeners(&self) -> Vec<ListenerSpec> {
        vec![ListenerSpec {
            name: "amqp".into(),
            addr: self.config.listen,
            max_connections: self.config.max_connections,
        }]
    }

    fn start(&self, ctx: HandlerContext) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            let max_entry = ctx.broker.config().max_entry_bytes as u64;
            let shared = Arc::new(Shared {
                max_message_bytes: self
                    .config
                    .max_message_bytes
                    .min(max_entry.saturating_sub(64 * 1024).max(4096)),
                broker: ctx.broker.clone(),
                config: self.config.clone(),
                vhosts: Mutex::new(HashMap::new()),
                decl_lock: tokio::sync::Mutex::new(()),
                persist_lock: tokio::sync::Mutex::new(()),
                conn_ids: AtomicU64::new(1),
            });
            shared.recover().await?;
            self.shared
                .set(shared)
                .map_err(|_| HandlerError::Config("the amqp handler was started twice".into()))?;
            Ok(())
        })
    }

    fn serve(self: Arc<Self>, conn: Connection) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(async move {
            let Some(shared) = self.shared.get().cloned() else {
                return Err(HandlerError::Protocol("handler not started".into()));
            };
            conn::serve(shared, conn).await
        })
    }
}

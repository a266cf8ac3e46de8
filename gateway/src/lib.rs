//! The Manifold gateway: loads the configuration, opens the broker core,
//! builds the configured protocol handlers, binds their listeners, serves
//! the admin HTTP API, and shuts everything down gracefully.
//!
//! It knows handlers only through `handler-api`; protocol logic lives in
//! the handler crates.

pub mod admin;
pub mod config;
pub mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker::Broker;
use handler_api::host::{serve_listener, ListenerStats};
use handler_api::{CancellationToken, HandlerContext, ProtocolHandler};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use config::{ConfigError, GatewayConfig};

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("handler `{name}`: {source}")]
    Handler {
        name: String,
        #[source]
        source: handler_api::HandlerError,
    },
    #[error("{0}")]
    AddressConflict(String),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(#[from] broker::BrokerError),
}

/// Builds every handler listed in `config.protocols` (starting nothing).
///
/// # Errors
/// [`GatewayError::Handler`] naming the handler whose section is invalid.
pub fn build_handlers(
    config: &GatewayConfig,
) -> Result<Vec<Arc<dyn ProtocolHandler>>, GatewayError> {
    let mut out = Vec::new();
    for name in &config.protocols {
        let factory = registry::find(name).ok_or_else(|| {
            GatewayError::Config(ConfigError::Invalid {
                file: config.source.clone(),
                message: format!("unknown protocol `{name}`"),
            })
        })?;
        let h = (factory.build)(config.section(name)).map_err(|e| GatewayError::Handler {
            name: name.clone(),
            source: e,
        })?;
        out.push(h);
    }
    Ok(out)
}

/// Fails if two listeners would share an address (the same port on the same
/// IP, or on a wildcard IP of the same family).
fn check_conflicts(
    specs: &[(String, String, SocketAddr)],
    admin: Option<SocketAddr>,
) -> Result<(), GatewayError> {
    let mut all: Vec<(String, SocketAddr)> = specs
        .iter()
        .map(|(h, l, a)| (format!("{h} listener `{l}`"), *a))
        .collect();
    if let Some(a) = admin {
        all.push(("admin".into(), a));
    }
    for (i, (wa, a)) in all.iter().enumerate() {
        for (wb, b) in &all[i + 1..] {
            if a.port() == 0 || a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
                continue;
            }
            if a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified() {
                return Err(GatewayError::AddressConflict(format!(
                    "{wa} and {wb} both want {a} / {b}"
                )));
            }
        }
    }
    Ok(())
}

/// A running gateway.
pub struct Running {
    /// Listeners as bound: (protocol, listener name, address).
    pub bound: Vec<(String, String, SocketAddr)>,
    /// The admin address, if enabled.
    pub admin: Option<SocketAddr>,
    /// The broker core.
    pub broker: Arc<Broker>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    handlers: Vec<Arc<dyn ProtocolHandler>>,
    stats: HashMap<String, Arc<ListenerStats>>,
}

/// Starts the gateway: opens the broker, builds and starts the handlers,
/// binds every listener and the admin API.
///
/// `metrics` is the installed Prometheus recorder's handle, if any.
///
/// # Errors
/// Any failure to start; nothing is left running on error.
pub async fn start(
    config: GatewayConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<Running, GatewayError> {
    let handlers = build_handlers(&config)?;
    let mut specs = Vec::new();
    for h in &handlers {
        for l in h.listeners() {
            specs.push((h.protocol().to_owned(), l));
        }
    }
    let flat: Vec<(String, String, SocketAddr)> = specs
        .iter()
        .map(|(p, l)| (p.clone(), l.name.clone(), l.addr))
        .collect();
    check_conflicts(&flat, config.admin.enabled.then_some(config.admin.listen))?;

    // Bind before opening the broker: a port conflict should not cost a
    // recovery pass.
    let mut bound_listeners = Vec::new();
    for (proto, spec) in &specs {
        let l = TcpListener::bind(spec.addr)
            .await
            .map_err(|e| GatewayError::Bind {
                what: format!("{proto} listener `{}`", spec.name),
                addr: spec.addr,
                source: e,
            })?;
        let addr = l.local_addr().map_err(|e| GatewayError::Bind {
            what: proto.clone(),
            addr: spec.addr,
            source: e,
        })?;
        bound_listeners.push((proto.clone(), spec.clone(), l, addr));
    }
    let admin_listener = if config.admin.enabled {
        Some(
            TcpListener::bind(config.admin.listen)
                .await
                .map_err(|e| GatewayError::Bind {
                    what: "admin".into(),
                    addr: config.admin.listen,
                    source: e,
                })?,
        )
    } else {
        None
    };

    let broker = Broker::open(config.broker.clone()).await?;
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    let admin = match admin_listener {
        Some(l) => {
            let addr = l.local_addr().ok();
            let state = admin::AdminState {
                broker: broker.clone(),
                metrics,
                ready: ready.clone(),
            };
            tasks.spawn(admin::serve(l, state, shutdown.clone()));
            addr
        }
        None => None,
    };

    for h in &handlers {
        let bound: Vec<(String, SocketAddr)> = bound_listeners
            .iter()
            .filter(|(p, ..)| p == h.protocol())
            .map(|(_, s, _, a)| (s.name.clone(), *a))
            .collect();
        let ctx = HandlerContext {
            broker: broker.clone(),
            bound,
            shutdown: shutdown.clone(),
        };
        if let Err(e) = h.start(ctx).await {
            shutdown.cancel();
            broker.shutdown().await;
            return Err(GatewayError::Handler {
                name: h.protocol().to_owned(),
                source: e,
            });
        }
    }

    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let mut bound = Vec::new();
    let mut stats = HashMap::new();
    for (proto, spec, l, addr) in bound_listeners {
        let h = handlers
            .iter()
            .find(|h| h.protocol() == proto)
            .cloned()
            .ok_or_else(|| GatewayError::AddressConflict(format!("no handler for {proto}")))?;
        let st = Arc::new(ListenerStats::default());
        stats.insert(format!("{proto}/{}", spec.name), st.clone());
        tracing::info!(protocol = %proto, listener = %spec.name, %addr, "listening");
        bound.push((proto, spec.name.clone(), addr));
        tasks.spawn(serve_listener(
            h,
            l,
            spec.name,
            spec.max_connections,
            shutdown.clone(),
            st,
            grace,
        ));
    }
    ready.store(true, Ordering::Release);
    if let Some(a) = admin {
        tracing::info!(%a, "admin API listening");
    }
    Ok(Running {
        bound,
        admin,
        broker,
        shutdown,
        tasks,
        handlers,
        stats,
    })
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("bound", &self.bound)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The address of `protocol`'s listener `name`.
    pub fn addr(&self, protocol: &str, name: &str) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|(p, n, _)| p == protocol && n == name)
            .map(|(_, _, a)| *a)
    }

    /// Open connections per listener (`protocol/listener`).
    pub fn open_connections(&self) -> Vec<(String, usize)> {
        self.stats
            .iter()
            .map(|(k, v)| (k.clone(), v.open.load(Ordering::Relaxed)))
            .collect()
    }

    /// Graceful shutdown: stop accepting, let connections finish (up to
    /// the grace period), drain handlers, persist cursors and flush every
    /// ledger.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down");
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        for h in &self.handlers {
            h.drain().await;
        }
        self.broker.shutdown().await;
        tracing::info!("shutdown complete");
    }
}

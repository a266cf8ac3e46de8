//! The contract between the gateway and a protocol handler.
//!
//! A handler translates one wire protocol into broker operations. The
//! gateway hosts it through this lifecycle, strictly in this order:
//!
//! 1. **build** — [`HandlerFactory::build`] parses the handler's config
//!    section and allocates; it starts nothing (so `manifold config check`
//!    can build every handler without side effects).
//! 2. **listeners** — [`ProtocolHandler::listeners`] reports the addresses
//!    to bind. The gateway binds them (two handlers on one address is a
//!    start-up error), and owns TLS, connection limits, the per-connection
//!    tracing span and byte counters.
//! 3. **start** — [`ProtocolHandler::start`] receives the
//!    [`HandlerContext`]: the broker handle, the bound addresses (port 0 is
//!    resolved), and the shutdown token. Coordinators and timers start here.
//! 4. **serve** — [`ProtocolHandler::serve`] runs once per accepted
//!    connection, each on its own task, until the peer leaves, the
//!    connection fails, or shutdown is signalled.
//! 5. **drain** — on shutdown the gateway stops accepting, cancels the
//!    token (connections should finish the request at hand and close),
//!    waits for connections up to a grace period, then calls
//!    [`ProtocolHandler::drain`] once before the broker is flushed.
//!
//! Protocol failures are answered in the protocol's own terms by the
//! handler; errors returned from `serve` are logged by the host (EOF and
//! connection reset are not errors and should be returned as `Ok`).
//!
//! This crate knows the broker but no protocol.

pub mod host;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use broker::Broker;
use tokio::io::{AsyncRead, AsyncWrite};
pub use tokio_util::sync::CancellationToken;

/// A boxed, sendable future (object-safe async in traits).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A byte stream a connection runs over (TCP, TLS, WebSocket adapter...).
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {}

/// Errors of building, starting or serving a handler.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The handler's config section is invalid. The message names the key.
    #[error("{0}")]
    Config(String),
    /// Socket I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A broker operation failed.
    #[error("broker: {0}")]
    Broker(#[from] broker::BrokerError),
    /// The peer violated the protocol; the connection is closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// One address a handler wants to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// A name unique within the handler, e.g. `"mqtt"` or `"mqtt-ws"`.
    pub name: String,
    /// Address to bind (port 0 picks a free port).
    pub addr: SocketAddr,
    /// Most connections open at once on this listener; more are refused.
    pub max_connections: usize,
}

/// What a handler gets at start.
#[derive(Clone)]
pub struct HandlerContext {
    /// The broker core.
    pub broker: Arc<Broker>,
    /// The listeners as bound: (listener name, local address).
    pub bound: Vec<(String, SocketAddr)>,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
}

impl fmt::Debug for HandlerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerContext")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl HandlerContext {
    /// The bound address of the listener `name`.
    pub fn bound_addr(&self, name: &str) -> Option<SocketAddr> {
        self.bound.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }
}

/// One accepted connection.
pub struct Connection {
    /// The byte stream.
    pub stream: Box<dyn AsyncStream>,
    /// The remote address.
    pub peer: SocketAddr,
    /// The local address it was accepted on.
    pub local: SocketAddr,
    /// Name of the listener that accepted it.
    pub listener: String,
    /// Cancelled when the gateway shuts down: finish the request at hand,
    /// then close.
    pub shutdown: CancellationToken,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// A protocol handler. See the crate docs for the lifecycle.
pub trait ProtocolHandler: Send + Sync + 'static {
    /// The protocol's name, as used in `protocols = [...]`.
    fn protocol(&self) -> &'static str;

    /// Addresses to bind. Called once, after build and before start.
    fn listeners(&self) -> Vec<ListenerSpec>;

    /// Starts background work. Called once, after the listeners are bound
    /// and before the first `serve`.
    ///
    /// # Errors
    /// A start-up failure stops the gateway's start.
    fn start(&self, ctx: HandlerContext) -> BoxFuture<'_, Result<(), HandlerError>>;

    /// Serves one connection until it ends. Runs on its own task inside the
    /// connection's tracing span.
    ///
    /// # Errors
    /// Returned errors are logged; EOF and resets should be `Ok`.
    fn serve(self: Arc<Self>, conn: Connection) -> BoxFuture<'static, Result<(), HandlerError>>;

    /// Called once at shutdown after connections have closed (or the grace
    /// period ran out), before the broker is flushed. The default does
    /// nothing.
    fn drain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Builds a handler from its config section (`None` when the file has no
/// section for it: use defaults).
pub type BuildFn = fn(Option<&toml::Value>) -> Result<Arc<dyn ProtocolHandler>, HandlerError>;

/// A compiled-in handler: its name and its constructor.
#[derive(Clone, Copy)]
pub struct HandlerFactory {
    /// The protocol's name, as used in `protocols = [...]` and as the name
    /// of its config section.
    pub name: &'static str,
    /// Builds the handler. Must start nothing.
    pub build: BuildFn,
}

impl fmt::Debug for HandlerFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFactory")
            .field("name", &self.name)
            .finish()
    }
}

/// Parses a handler's config section into `T` (which should use
/// `#[serde(default, deny_unknown_fields)]`). Errors name the offending key.
///
/// # Errors
/// [`HandlerError::Config`] describing the key and the problem.
pub fn parse_section<T>(section: Option<&toml::Value>) -> Result<T, HandlerError>
where
    T: serde::de::DeserializeOwned + Default,
{
    match section {
        None => Ok(T::default()),
        Some(v) => T::deserialize(v.clone()).map_err(|e| HandlerError::Config(e.to_string())),
    }
}

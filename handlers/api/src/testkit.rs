//! Test kit for handler crates: a broker core in a temporary directory, a
//! host that runs a handler on loopback port 0, and [`EchoHandler`], a
//! small line-based handler over the ledger that proves the host works.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use broker::{AppendEntry, Broker, BrokerConfig, EntryFormat, Message, NamespaceName, TopicName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::host::{serve_listener, ListenerStats};
use crate::{
    BoxFuture, CancellationToken, Connection, HandlerContext, HandlerError, HandlerFactory,
    ListenerSpec, ProtocolHandler,
};

/// A broker in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct TestBroker {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Its data directory.
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    /// Opens a broker with default settings in a new temporary directory.
    ///
    /// # Panics
    /// If the directory or the broker cannot be created (a test failure).
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestBroker::start`], letting `f` adjust the config first.
    ///
    /// # Panics
    /// If the directory or the broker cannot be created (a test failure).
    pub async fn start_with(f: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = BrokerConfig {
            data_dir: dir.path().to_owned(),
            ..BrokerConfig::default()
        };
        f(&mut config);
        let broker = Broker::open(config).await.expect("broker opens");
        TestBroker { broker, dir }
    }
}

/// A handler running on loopback, stopped on drop.
#[derive(Debug)]
pub struct RunningHandler {
    /// Bound addresses by listener name.
    pub bound: Vec<(String, SocketAddr)>,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
}

impl RunningHandler {
    /// The address of the listener `name`.
    ///
    /// # Panics
    /// If the handler has no such listener.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.bound
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("listener exists")
    }
}

impl Drop for RunningHandler {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds every listener of `handler` on 127.0.0.1 port 0, starts it and
/// serves connections, as the gateway would.
///
/// # Errors
/// Bind or start failures.
pub async fn run_handler(
    handler: Arc<dyn ProtocolHandler>,
    broker: Arc<Broker>,
) -> Result<RunningHandler, HandlerError> {
    let shutdown = CancellationToken::new();
    let mut bound = Vec::new();
    let mut listeners = Vec::new();
    for spec in handler.listeners() {
        let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        bound.push((spec.name.clone(), l.local_addr()?));
        listeners.push((spec, l));
    }
    handler
        .start(HandlerContext {
            broker,
            bound: bound.clone(),
            shutdown: shutdown.clone(),
        })
        .await?;
    for (spec, l) in listeners {
        tokio::spawn(serve_listener(
            handler.clone(),
            l,
            spec.name,
            spec.max_connections,
            shutdown.clone(),
            Arc::new(ListenerStats::default()),
            Duration::from_secs(1),
        ));
    }
    Ok(RunningHandler { bound, shutdown })
}

/// Config of the echo handler.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Connection limit.
    pub max_connections: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7777)),
            max_connections: 1024,
        }
    }
}

/// A line protocol over the ledger, to prove the host:
///
/// - `PUB <topic> <text>` appends `text` to `public/default/<topic>`
///   (auto-created) and answers `OK <offset>` once durable;
/// - `GET <topic> <offset>` answers `MSG <offset> <text>`, waiting up to
///   5 s for the offset to exist, or `NONE`;
/// - anything else answers `ERR <reason>`; a line over 64 KiB closes the
///   connection.
#[derive(Debug, Default)]
pub struct EchoHandler {
    config: EchoConfig,
    ctx: OnceLock<HandlerContext>,
}

/// The echo handler's factory (registered by the gateway as `echo`).
pub const ECHO_FACTORY: HandlerFactory = HandlerFactory {
    name: "echo",
    build: |section| {
        Ok(Arc::new(EchoHandler {
            config: crate::parse_section(section)?,
            ctx: OnceLock::new(),
        }))
    },
};

const MAX_LINE: usize = 64 * 1024;

impl EchoHandler {
    async fn command(&self, line: &str) -> Result<String, HandlerError> {
        let ctx = self
            .ctx
            .get()
            .ok_or_else(|| HandlerError::Protocol("not started".into()))?;
        let mut parts = line.splitn(3, ' ');
        let verb = parts.next().unwrap_or("");
        let topic = parts.next().unwrap_or("");
        let arg = parts.next().unwrap_or("");
        let name = match TopicName::new(NamespaceName::default_namespace(), topic) {
            Ok(n) => n,
            Err(e) => return Ok(format!("ERR {e}")),
        };
        match verb {
            "PUB" => {
                ctx.broker.ensure_topic(&name).await?;
                let ledger = ctx.broker.ledger(&name, 0)?;
                let m = Message::new(arg.as_bytes().to_vec());
                let ts = m.publish_time;
                let a = ledger
                    .append(AppendEntry {
                        format: EntryFormat::Messages,
                        count: 1,
                        first_timestamp: ts,
                        max_timestamp: ts,
                        payload: broker::message::encode_batch(&[m]),
                    })
                    .await?;
                Ok(format!("OK {}", a.base_offset))
            }
            "GET" => {
                let Ok(offset) = arg.trim().parse::<u64>() else {
                    return Ok("ERR offset must be a number".into());
                };
                let Ok(ledger) = ctx.broker.ledger(&name, 0) else {
                    return Ok("NONE".into());
                };
                let entries = match ledger.read_or_wait(offset, 1, Duration::from_secs(5)).await {
                    Ok(e) => e,
                    Err(broker::BrokerError::OffsetOutOfRange { .. }) => return Ok("NONE".into()),
                    Err(e) => return Err(e.into()),
                };
                let Some(e) = entries.first() else {
                    return Ok("NONE".into());
                };
                let msgs = broker::message::decode_batch(&e.payload)?;
                let idx = (offset - e.base_offset) as usize;
                match msgs.get(idx) {
                    Some(m) => Ok(format!(
                        "MSG {offset} {}",
                        String::from_utf8_lossy(&m.payload)
                    )),
                    None => Ok("NONE".into()),
                }
            }
            _ => Ok("ERR unknown command".into()),
        }
    }
}

impl ProtocolHandler for EchoHandler {
    fn protocol(&self) -> &'static str {
        "echo"
    }

    fn listeners(&self) -> Vec<ListenerSpec> {
        vec![ListenerSpec {
            name: "echo".into(),
            addr: self.config.listen,
            max_connections: self.config.max_connections,
        }]
    }

    fn start(&self, ctx: HandlerContext) -> BoxFuture<'_, Result<(), HandlerError>> {
        let _ = self.ctx.set(ctx);
        Box::pin(async { Ok(()) })
    }

    fn serve(self: Arc<Self>, conn: Connection) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(async move {
            let (r, mut w) = tokio::io::split(conn.stream);
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            loop {
                line.clear();
                let mut limited = (&mut r).take(MAX_LINE as u64 + 1);
                let n = tokio::select! {
                    _ = conn.shutdown.cancelled() => return Ok(()),
                    n = limited.read_until(b'\n', &mut line) => n?,
                };
                if n == 0 {
                    return Ok(());
                }
                if line.len() > MAX_LINE {
                    w.write_all(b"ERR line too long\n").await?;
                    return Err(HandlerError::Protocol("line too long".into()));
                }
                let text = String::from_utf8_lossy(&line);
                let reply = self.command(text.trim_end_matches(['\r', '\n'])).await?;
                w.write_all(reply.as_bytes()).await?;
                w.write_all(b"\n").await?;
            }
        })
    }
}

use tokio::io::AsyncReadExt as _;

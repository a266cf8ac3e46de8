//! Hosting: the accept loop that the gateway (and the test kit) run for a
//! handler's listener. One task per connection, a connection limit, a
//! tracing span per connection, and graceful drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::{CancellationToken, Connection, ProtocolHandler};

/// Counts live connections of a listener; shared with the admin API.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicUsize,
    /// Connections refused because of the limit.
    pub refused: AtomicUsize,
}

fn is_benign(e: &crate::HandlerError) -> bool {
    use std::io::ErrorKind::*;
    match e {
        crate::HandlerError::Io(io) => matches!(
            io.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        ),
        _ => false,
    }
}

/// Accepts connections on `listener` until `shutdown` is cancelled, serving
/// each with `handler` on its own task. At shutdown, stops accepting and
/// waits up to `grace` for connections to finish, then aborts the rest.
pub async fn serve_listener(
    handler: Arc<dyn ProtocolHandler>,
    listener: TcpListener,
    name: String,
    max_connections: usize,
    shutdown: CancellationToken,
    stats: Arc<ListenerStats>,
    grace: Duration,
) {
    let protocol = handler.protocol();
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(protocol, listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if stats.open.load(Ordering::Relaxed) >= max_connections {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("manifold_gateway_connections_refused_total", "protocol" => protocol)
                .increment(1);
            tracing::warn!(protocol, %peer, limit = max_connections, "connection limit reached; refusing");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        stats.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("manifold_gateway_connections_open", "protocol" => protocol).increment(1.0);
        metrics::counter!("manifold_gateway_connections_accepted_total", "protocol" => protocol)
            .increment(1);
        let conn = Connection {
            stream: Box::new(stream),
            peer,
            local,
            listener: name.clone(),
            shutdown: shutdown.child_token(),
        };
        let span = tracing::info_span!("conn", protocol, %peer, client_id = tracing::field::Empty);
        let h = handler.clone();
        let st = stats.clone();
        conns.spawn(
            async move {
                tracing::debug!("accepted");
                match h.serve(conn).await {
                    Ok(()) => tracing::debug!("closed"),
                    Err(e) if is_benign(&e) => tracing::debug!(error = %e, "closed"),
                    Err(e) => tracing::info!(error = %e, "connection ended with error"),
                }
                st.open.fetch_sub(1, Ordering::Relaxed);
                metrics::gauge!("manifold_gateway_connections_open", "protocol" => protocol)
                    .decrement(1.0);
            }
            .instrument(span),
        );
    }
    drop(listener);
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(protocol, listener = %name, remaining = conns.len(), "grace period over; closing connections");
        conns.shutdown().await;
    }
}

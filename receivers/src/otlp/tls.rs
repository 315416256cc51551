//! Serving TLS: the accept loop both transports use when their `tls` block is set.
//!
//! Each accepted TCP connection gets its own task for the handshake, so a client that is slow
//! to say hello (or never does) holds only its own task, never the accept loop. A failed
//! handshake closes that connection, is counted ([`TLS_HANDSHAKE_FAILURES`]) and logged at
//! debug level (a port scanner must not flood the log); the listener goes on. Handshakes in
//! flight are bounded ([`MAX_PENDING_HANDSHAKES`]): at the bound the loop stops accepting and
//! the kernel's backlog holds further clients.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tailweave_core::tls::tokio_rustls::server::TlsStream;
use tailweave_core::tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::ingest::Transport;

/// Counter (`receiver`, `transport`, `reason`: `timeout` or `error`): TLS handshakes that
/// failed (plaintext clients, untrusted or missing client certificates, stalled clients).
pub const TLS_HANDSHAKE_FAILURES: &str = "tailweave_receiver_tls_handshake_failures_total";

/// Handshakes in progress per listener, at most.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// An accepted and decrypted connection.
pub struct TlsConn(pub TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Accepts until `shutdown`, handshakes each connection in its own task and gives the
/// decrypted stream to `deliver` (in that task). Returns when shutdown fires; the listener is
/// closed then, handshakes already running finish (each bounded by `handshake_timeout`).
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    receiver: Arc<str>,
    transport: Transport,
    shutdown: CancellationToken,
    deliver: F,
) where
    F: Fn(TlsConn) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = pending.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(receiver = %receiver, "accepting a {} connection failed: {e}",
                    transport.as_str());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (tls, receiver, deliver) = (tls.clone(), receiver.clone(), deliver.clone());
        tokio::spawn(async move {
            let handshake = tls.accept(tcp).await;
            drop(permit);
            match handshake {
                Ok(s) => deliver(TlsConn(s)).await,
                Err(e) => {
                    let reason = if e.kind() == io::ErrorKind::TimedOut {
                        "timeout"
                    } else {
                        "error"
                    };
                    metrics::counter!(TLS_HANDSHAKE_FAILURES, "receiver" => receiver.to_string(),
                        "transport" => transport.as_str(), "reason" => reason)
                    .increment(1);
                    tracing::debug!(receiver = %receiver, transport = transport.as_str(),
                        %peer, error = %e, "TLS handshake failed");
                }
            }
        });
    }
    drop(listener);
}

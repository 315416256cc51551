//! The connections of the OTLP exporters: plain TCP, or TLS over it with the rustls config of
//! `tailweave_core::tls` (one crypto provider for the workspace).
//!
//! One connector serves both exporters: tonic takes it through `connect_with_connector_lazy`,
//! and the hyper client through `Client::build`. tonic is always given an `http://` URI, so it
//! never needs TLS support of its own; whether the bytes are encrypted is decided here, per
//! exporter, from its config.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tailweave_core::tls::rustls::pki_types::ServerName;
use tailweave_core::tls::rustls::ClientConfig;
use tailweave_core::tls::tokio_rustls::{self, client::TlsStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connected stream, encrypted or not.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A [`Stream`] as hyper and tonic take it.
pub struct Conn {
    io: TokioIo<Stream>,
    h2: bool,
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

#[derive(Clone)]
struct Tls {
    connector: tokio_rustls::TlsConnector,
    /// `server_name_override`; else the URI's host.
    name: Option<ServerName<'static>>,
}

/// Connects TCP, then TLS when configured.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<Tls>,
    timeout: Option<Duration>,
}

impl Connector {
    /// `timeout` bounds the TCP connect and the handshake together (`None`: unbounded).
    pub fn new(
        timeout: Option<Duration>,
        tls: Option<(ClientConfig, Option<ServerName<'static>>)>,
    ) -> Connector {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(timeout);
        Connector {
            http,
            tls: tls.map(|(cfg, name)| Tls {
                connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
                name,
            }),
            timeout,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = self.http.call(uri);
        let tls = self.tls.clone();
        let timeout = self.timeout;
        let connect = async move {
            let tcp = tcp.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(Conn {
                    io: TokioIo::new(Stream::Plain(tcp)),
                    h2: false,
                });
            };
            let name = match tls.name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|e| format!("{host:?} cannot be verified as a server name: {e}"))?,
            };
            let s = tls.connector.connect(name, tcp).await?;
            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            Ok::<_, BoxError>(Conn {
                io: TokioIo::new(Stream::Tls(Box::new(s))),
                h2,
            })
        };
        Box::pin(async move {
            match timeout {
                Some(t) => tokio::time::timeout(t, connect)
                    .await
                    .map_err(|_| -> BoxError { "connect and TLS handshake timed out".into() })?,
                None => connect.await,
            }
        })
    }
}

//! The connections of the OTLP exporters: plain TCP, or TLS over it with the rustls config of
//! `tailweave_core::tls` (one crypto provider for the workspace).
//!
//! One connector serves both exporters: tonic takes it through `connect_with_connector_lazy`,
//! and the hyper client through `Client::build`. tonic is always given an `http://` URI, so it
//! never needs TLS support of its own; whether the bytes are encrypted is decided here, per
//! exporter, from its config.
//!
//! # Certificate rotation
//! With [`ReloadingTls`] the `ca_file`, `cert_file` and `key_file` are read again before each new
//! connection, and when their bytes changed the rustls config is rebuilt for that connection and
//! every later one (open connections keep the config they were made with, as on the receivers).
//! No interval is needed: an h2 channel holds one connection and the HTTP client pools its
//! connections, so connections are rare, and reading three small files costs far less than the
//! handshake it precedes. A rotation that does not load (a file caught half-written, a key that
//! does not match its certificate) keeps the previous config, is counted once as
//! [`TLS_RELOAD_FAILURES`], and is tried again as soon as the bytes change again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tailweave_core::tls::rustls::pki_types::ServerName;
use tailweave_core::tls::rustls::ClientConfig;
use tailweave_core::tls::tokio_rustls::{self, client::TlsStream};
use tailweave_core::tls::{ClientTlsSettings, TlsError, TLS_RELOADS, TLS_RELOAD_FAILURES};
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

/// The bytes of `ca_file`, `cert_file` and `key_file`, in that order (`None`: not set, or
/// unreadable when read).
type FileBytes = [Option<Vec<u8>>; 3];

fn read_files(s: &ClientTlsSettings) -> FileBytes {
    [&s.ca_file, &s.cert_file, &s.key_file].map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
}

/// The client TLS config of one exporter, rebuilt from its files when they change (see the
/// module docs).
pub struct ReloadingTls {
    /// The exporter, for the logs.
    id: String,
    settings: ClientTlsSettings,
    alpn: Vec<u8>,
    /// The `path` label of the reload counters: `cert_file`, else `ca_file`.
    path: String,
    state: Mutex<Loaded>,
}

struct Loaded {
    config: Arc<ClientConfig>,
    /// The bytes the files had when `config` was built.
    files: FileBytes,
    /// The bytes of the last rotation that did not load, so that it is counted and logged
    /// once rather than at every connection until the files change again.
    failed: Option<FileBytes>,
}

impl ReloadingTls {
    /// Loads the files now, so that a missing or broken one stops the start-up.
    pub fn new(id: &str, settings: ClientTlsSettings, alpn: &[u8]) -> Result<Self, TlsError> {
        let files = read_files(&settings);
        let config = Arc::new(settings.client_config(&[alpn])?);
        let path = settings
            .cert_file
            .as_ref()
            .or(settings.ca_file.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(ReloadingTls {
            id: id.to_string(),
            settings,
            alpn: alpn.to_vec(),
            path,
            state: Mutex::new(Loaded {
                config,
                files,
                failed: None,
            }),
        })
    }

    /// The config for a new connection: rebuilt first when the files changed since it was.
    ///
    /// Reads the files on the calling (runtime) thread: a few kilobytes, once per connection,
    /// which is less than moving the work to the blocking pool would cost.
    pub fn current(&self) -> Arc<ClientConfig> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let files = read_files(&self.settings);
        if files == st.files || st.failed.as_ref() == Some(&files) {
            return st.config.clone();
        }
        // `client_config` reads the files once more; bytes that change between the two reads
        // only cost one more rebuild at the next connection.
        match self.settings.client_config(&[&self.alpn]) {
            Ok(cfg) => {
                st.config = Arc::new(cfg);
                st.files = files;
                st.failed = None;
                metrics::counter!(TLS_RELOADS, "path" => self.path.clone()).increment(1);
                tracing::info!(exporter = %self.id, file = %self.path, "TLS files changed; new connections use them");
            }
            Err(e) => {
                metrics::counter!(TLS_RELOAD_FAILURES, "path" => self.path.clone()).increment(1);
                tracing::warn!(exporter = %self.id, error = %e, "TLS reload failed; keeping the previous config");
                // Remembered only if the files held still meanwhile: a write that was under
                // way is tried again at the next connection.
                if read_files(&self.settings) == files {
                    st.failed = Some(files);
                }
            }
        }
        st.config.clone()
    }
}

#[derive(Clone)]
enum TlsSource {
    Fixed(tokio_rustls::TlsConnector),
    Reloading(Arc<ReloadingTls>),
}

#[derive(Clone)]
struct Tls {
    source: TlsSource,
    /// `server_name_override`; else the URI's host.
    name: Option<ServerName<'static>>,
}

impl Tls {
    fn connector(&self) -> tokio_rustls::TlsConnector {
        match &self.source {
            TlsSource::Fixed(c) => c.clone(),
            TlsSource::Reloading(r) => tokio_rustls::TlsConnector::from(r.current()),
        }
    }
}

/// Connects TCP, then TLS when configured.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<Tls>,
    timeout: Option<Duration>,
}

impl Connector {
    /// `timeout` bounds the TCP connect and the handshake together (`None`: unbounded). The TLS
    /// config, when given, is used for every connection.
    pub fn new(
        timeout: Option<Duration>,
        tls: Option<(ClientConfig, Option<ServerName<'static>>)>,
    ) -> Connector {
        Self::with_source(
            timeout,
            tls.map(|(cfg, name)| Tls {
                source: TlsSource::Fixed(tokio_rustls::TlsConnector::from(Arc::new(cfg))),
                name,
            }),
        )
    }

    /// TLS whose files are read again before each new connection (see the module docs).
    pub fn reloading(
        timeout: Option<Duration>,
        tls: Arc<ReloadingTls>,
        name: Option<ServerName<'static>>,
    ) -> Connector {
        Self::with_source(
            timeout,
            Some(Tls {
                source: TlsSource::Reloading(tls),
                name,
            }),
        )
    }

    fn with_source(timeout: Option<Duration>, tls: Option<Tls>) -> Connector {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(timeout);
        Connector { http, tls, timeout }
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
        // Chosen now, at the start of the connection, so that a rotation is seen by it.
        let tls = self.tls.as_ref().map(|t| (t.connector(), t.name.clone()));
        let timeout = self.timeout;
        let connect = async move {
            let tcp = tcp.await?.into_inner();
            let Some((connector, name)) = tls else {
                return Ok(Conn {
                    io: TokioIo::new(Stream::Plain(tcp)),
                    h2: false,
                });
            };
            let name = match name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|e| format!("{host:?} cannot be verified as a server name: {e}"))?,
            };
            let s = connector.connect(name, tcp).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tailweave_core::tls::ALPN_H2;

    /// The counters by (name, `path` label). A snapshot hands over what was counted since the
    /// one before, so each test takes one, at its end.
    fn counters(rec: &DebuggingRecorder) -> Vec<(String, String, u64)> {
        rec.snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                DebugValue::Counter(n) => {
                    let path = k.key().labels().find(|l| l.key() == "path")?;
                    Some((k.key().name().to_string(), path.value().to_string(), n))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn files_are_reloaded_only_when_their_bytes_change_and_load() {
        let pki = Pki::new("client ca");
        let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
        let (c1, k1) = pki.leaf_pem(&["client"]);
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let settings = ClientTlsSettings {
            ca_file: Some(pki.path("ca.pem")),
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ..Default::default()
        };
        let rec = DebuggingRecorder::new();
        // Counters accumulate: the snapshot is taken once, at the end.
        metrics::with_local_recorder(&rec, || {
            let tls = ReloadingTls::new("otlp/t", settings, ALPN_H2).unwrap();
            let first = tls.current();
            assert!(Arc::ptr_eq(&first, &tls.current()), "unchanged files");
            assert_eq!(first.alpn_protocols, vec![ALPN_H2.to_vec()]);

            // A new pair: a new config, kept while the files stay as they are.
            let (c2, k2) = pki.leaf_pem(&["client"]);
            std::fs::write(&key, &k2).unwrap();
            std::fs::write(&cert, &c2).unwrap();
            let second = tls.current();
            assert!(!Arc::ptr_eq(&first, &second));
            assert!(Arc::ptr_eq(&second, &tls.current()));

            // A certificate caught half-written, then a key that does not match its
            // certificate, then a CA file gone: each keeps the working config.
            std::fs::write(&cert, &c2[..c2.len() / 2]).unwrap();
            assert!(Arc::ptr_eq(&second, &tls.current()));
            assert!(
                Arc::ptr_eq(&second, &tls.current()),
                "tried once per change"
            );
            std::fs::write(&cert, &c1).unwrap();
            assert!(Arc::ptr_eq(&second, &tls.current()), "c1 with k2");
            std::fs::write(&cert, &c2).unwrap();
            std::fs::rename(pki.path("ca.pem"), pki.path("ca.old")).unwrap();
            assert!(Arc::ptr_eq(&second, &tls.current()), "no CA file");
            // Back to the bytes in use: nothing to rebuild.
            std::fs::rename(pki.path("ca.old"), pki.path("ca.pem")).unwrap();
            assert!(Arc::ptr_eq(&second, &tls.current()));
        });
        let mut got = counters(&rec);
        got.sort();
        let path = cert.display().to_string();
        assert_eq!(
            got,
            [
                (TLS_RELOAD_FAILURES.to_string(), path.clone(), 3),
                (TLS_RELOADS.to_string(), path, 1),
            ]
        );
    }

    #[test]
    fn a_broken_file_fails_the_start_with_its_path() {
        let pki = Pki::new("client ca");
        let key = pki.path("client.key");
        std::fs::write(&key, "not a key").unwrap();
        let (c, _) = pki.leaf_pem(&["client"]);
        std::fs::write(pki.path("client.pem"), c).unwrap();
        let settings = ClientTlsSettings {
            ca_file: Some(pki.path("ca.pem")),
            cert_file: Some(pki.path("client.pem")),
            key_file: Some(key),
            ..Default::default()
        };
        let e = ReloadingTls::new("otlp/t", settings, ALPN_H2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("client.key"), "{e}");
    }
}

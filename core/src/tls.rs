//! TLS for every receiver (server side) and exporter (client side): one rustls stack with one
//! crypto provider, `ring`, for the whole workspace.
//!
//! Why ring: it builds with a C compiler alone (aws-lc-rs needs cmake and, on some targets, nasm,
//! and takes several times longer to compile on our 2-core builders), it is what rustls used by
//! default for years, and a single provider means a single `CryptoProvider` in the binary, with
//! no process-wide default to install or to race on: every config here is built with
//! [`provider`] explicitly.
//!
//! # Server side
//! [`ServerTlsSettings`] is the `tls` block of a receiver protocol (`cert_file`, `key_file`,
//! optional `client_ca_file` for mTLS, `reload_interval`). [`ServerTls::new`] loads it once (so a
//! bad file fails at start-up); [`ServerTls::accept`] runs one handshake with the current config.
//! Every `reload_interval`, at the next handshake, the files are read again; when their bytes
//! changed the new config is used for new connections (old connections keep theirs). A reload
//! that fails keeps the previous config, logs, and counts [`TLS_RELOAD_FAILURES`].
//!
//! # Client side
//! [`ClientTlsSettings`] is the `tls` block of an exporter (`insecure`, `ca_file`, `cert_file`,
//! `key_file`, `server_name_override`); [`ClientTlsSettings::client_config`] builds the rustls
//! config (system roots unless `ca_file` is given).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::ConfigIssue;

pub use rustls;
pub use tokio_rustls;

/// Counter (label `path`): certificate reloads that failed (the previous config stays in use).
pub const TLS_RELOAD_FAILURES: &str = "tailweave_tls_reload_failures_total";
/// Counter (label `path`): certificate reloads that took effect.
pub const TLS_RELOADS: &str = "tailweave_tls_reloads_total";
/// Default `reload_interval`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound of one server-side handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN for gRPC (HTTP/2 only).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The crypto provider every config in the workspace is built with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("no CA certificates found in the system store; set tls.ca_file")]
    NoSystemRoots,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM bundle (in file order).
pub fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what: path.display().to_string(),
            message: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
pub fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::Invalid {
            what: path.display().to_string(),
            message: format!("bad PEM: {e}"),
        },
    })
}

fn roots_from(pem: &[u8], path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(pem, path)? {
        roots.add(c).map_err(|e| TlsError::Invalid {
            what: path.display().to_string(),
            message: format!("unusable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn invalid(what: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Invalid {
        what: what.to_string(),
        message: e.to_string(),
    }
}

fn file_issue(out: &mut Vec<ConfigIssue>, key: &str, path: &Option<PathBuf>) {
    if let Some(p) = path {
        if p.as_os_str().is_empty() {
            out.push(ConfigIssue::new(key, "must not be empty"));
        }
    }
}

/// `tls` of an exporter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsSettings {
    /// Plaintext, no TLS. Default `false` (TLS), as in the Collector.
    pub insecure: bool,
    /// PEM bundle of the CAs that may sign the destination's certificate. Default: the system's
    /// trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) presented to the destination (mTLS). Needs `key_file`.
    /// Default none.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`. Default none.
    pub key_file: Option<PathBuf>,
    /// Name checked against the destination's certificate instead of the endpoint's host.
    /// Default none.
    pub server_name_override: Option<String>,
}

impl ClientTlsSettings {
    /// Any file or name setting given (which makes no sense with `insecure: true`).
    pub fn has_tls_settings(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.server_name_override.is_some()
    }

    /// Problems, with key paths under `prefix` (e.g. `tls`). Does not read files.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let key = |k: &str| format!("{prefix}.{k}");
        if self.insecure && self.has_tls_settings() {
            out.push(ConfigIssue::new(
                key("insecure"),
                "insecure: true turns TLS off, so ca_file, cert_file, key_file and server_name_override would be ignored",
            ));
        }
        file_issue(&mut out, &key("ca_file"), &self.ca_file);
        file_issue(&mut out, &key("cert_file"), &self.cert_file);
        file_issue(&mut out, &key("key_file"), &self.key_file);
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                out.push(ConfigIssue::new(key("key_file"), "required with cert_file"))
            }
            (None, Some(_)) => {
                out.push(ConfigIssue::new(key("cert_file"), "required with key_file"))
            }
            _ => {}
        }
        if let Some(n) = &self.server_name_override {
            if ServerName::try_from(n.as_str()).is_err() {
                out.push(ConfigIssue::new(
                    key("server_name_override"),
                    format!("{n:?} is not a DNS name or an IP address"),
                ));
            }
        }
        out
    }

    /// The name to verify: the override, else `host`.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name_override.as_deref().unwrap_or(host);
        // `[::1]` in a URI authority is `::1` to the verifier.
        let name = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(name.to_string()).map_err(|e| TlsError::Invalid {
            what: "server name".into(),
            message: format!("{name:?}: {e}"),
        })
    }

    /// The rustls client config, offering `alpn` (e.g. [`ALPN_H2`] for gRPC).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
        let roots = match &self.ca_file {
            Some(p) => roots_from(&read(p)?, p)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError::NoSystemRoots);
                }
                roots
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("tls"))?
            .with_root_certificates(roots);
        let mut cfg = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let certs = parse_certs(&read(c)?, c)?;
                let key = parse_key(&read(k)?, k)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(invalid("tls.cert_file"))?
            }
            _ => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }
}

fn default_reload_interval() -> Duration {
    DEFAULT_RELOAD_INTERVAL
}

fn default_handshake_timeout() -> Duration {
    DEFAULT_HANDSHAKE_TIMEOUT
}

/// `tls` of a receiver protocol: serve TLS with this certificate (the Collector's
/// `configtls.ServerConfig` keys).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// PEM certificate chain of this server. Required. (An `Option` only so that a missing key
    /// is reported by `validate` with its path, next to every other problem, instead of
    /// stopping the parse.)
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`. Required.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign client certificates: when set, every client must present
    /// one (mTLS). Default none (no client certificates).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes (at the next handshake); `0s` never reloads.
    /// Default `10s`.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Bound of one handshake; a client that stalls it is dropped. Default `10s`.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl ServerTlsSettings {
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        ServerTlsSettings {
            cert_file: Some(cert_file.into()),
            key_file: Some(key_file.into()),
            client_ca_file: None,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Problems, with key paths under `prefix` (e.g. `protocols.grpc.tls`). Does not read files.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let key = |k: &str| format!("{prefix}.{k}");
        for (k, v, other) in [
            ("cert_file", &self.cert_file, "key_file"),
            ("key_file", &self.key_file, "cert_file"),
        ] {
            match v {
                None => out.push(ConfigIssue::new(
                    key(k),
                    format!("required: a TLS server needs both {k} and {other}"),
                )),
                Some(p) if p.as_os_str().is_empty() => {
                    out.push(ConfigIssue::new(key(k), "must not be empty"))
                }
                Some(_) => {}
            }
        }
        file_issue(&mut out, &key("client_ca_file"), &self.client_ca_file);
        if self.handshake_timeout.is_zero() {
            out.push(ConfigIssue::new(
                key("handshake_timeout"),
                "must be greater than 0",
            ));
        }
        out
    }

    /// Problems with the files themselves (missing, unreadable, a directory), with key paths
    /// under `prefix`. Unlike [`Self::validate`] this looks at the file system: it is meant for
    /// `tailweave validate`, so that a wrong path is found before a deploy rather than at
    /// start-up. It reads no contents (a file may still hold no certificate; start-up says so).
    pub fn check_files(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        for (k, p) in [
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("client_ca_file", &self.client_ca_file),
        ] {
            let Some(p) = p.as_deref().filter(|p| !p.as_os_str().is_empty()) else {
                continue;
            };
            let problem = match fs::metadata(p) {
                Ok(m) if m.is_file() => match fs::File::open(p) {
                    Ok(_) => None,
                    Err(e) => Some(e.to_string()),
                },
                Ok(_) => Some("is not a regular file".to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(m) = problem {
                out.push(ConfigIssue::new(
                    format!("{prefix}.{k}"),
                    format!("{}: {m}", p.display()),
                ));
            }
        }
        out
    }

    fn cert_path(&self) -> Result<&Path, TlsError> {
        required(&self.cert_file, "tls.cert_file")
    }

    fn key_path(&self) -> Result<&Path, TlsError> {
        required(&self.key_file, "tls.key_file")
    }

    fn files(&self) -> Result<Vec<&Path>, TlsError> {
        let mut v = vec![self.cert_path()?, self.key_path()?];
        if let Some(ca) = &self.client_ca_file {
            v.push(ca.as_path());
        }
        Ok(v)
    }

    /// Reads the files once (their bytes, to compare at the next reload).
    fn read_all(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        self.files()?.into_iter().map(read).collect()
    }

    /// Builds the rustls server config from file contents (as [`Self::read_all`] returns them).
    fn build(&self, contents: &[Vec<u8>], alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
        let (cert_path, key_path) = (self.cert_path()?, self.key_path()?);
        let (Some(cert_pem), Some(key_pem)) = (contents.first(), contents.get(1)) else {
            return Err(TlsError::Invalid {
                what: "tls".into(),
                message: "certificate or key contents missing".into(),
            });
        };
        let certs = parse_certs(cert_pem, cert_path)?;
        let key = parse_key(key_pem, key_path)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("tls"))?;
        let builder = match (&self.client_ca_file, contents.get(2)) {
            (Some(path), Some(pem)) => {
                let roots = roots_from(pem, path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::Invalid {
                            what: path.display().to_string(),
                            message: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut cfg = builder
            .with_single_cert(certs, key)
            .map_err(invalid(&cert_path.display().to_string()))?;
        cfg.alpn_protocols = alpn.to_vec();
        Ok(cfg)
    }
}

fn required<'a>(p: &'a Option<PathBuf>, what: &str) -> Result<&'a Path, TlsError> {
    p.as_deref().ok_or_else(|| TlsError::Invalid {
        what: what.to_string(),
        message: "required".into(),
    })
}

struct Loaded {
    config: Arc<ServerConfig>,
    contents: Vec<Vec<u8>>,
    checked: Instant,
}

/// A receiver's TLS: the current server config, reloaded when its files change.
pub struct ServerTls {
    settings: ServerTlsSettings,
    alpn: Vec<Vec<u8>>,
    state: Mutex<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files now; an error here should stop the receiver from starting. `alpn` is
    /// what the server offers (e.g. `[ALPN_H2]` for gRPC, `[ALPN_H2, ALPN_HTTP1]` for HTTP).
    pub fn new(settings: ServerTlsSettings, alpn: &[&[u8]]) -> Result<ServerTls, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let contents = settings.read_all()?;
        let config = Arc::new(settings.build(&contents, &alpn)?);
        Ok(ServerTls {
            settings,
            alpn,
            state: Mutex::new(Loaded {
                config,
                contents,
                checked: Instant::now(),
            }),
        })
    }

    pub fn settings(&self) -> &ServerTlsSettings {
        &self.settings
    }

    /// The config for a new connection, reloading first if `reload_interval` has passed since
    /// the last check and the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current_at(Instant::now())
    }

    /// [`Self::current`] at a given time (tests inject it).
    pub fn current_at(&self, now: Instant) -> Arc<ServerConfig> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let every = self.settings.reload_interval;
        if every.is_zero() || now.saturating_duration_since(st.checked) < every {
            return st.config.clone();
        }
        st.checked = now;
        let path = self
            .settings
            .cert_file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let contents = match self.settings.read_all() {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(TLS_RELOAD_FAILURES, "path" => path.clone()).increment(1);
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate");
                return st.config.clone();
            }
        };
        if contents == st.contents {
            return st.config.clone();
        }
        match self.settings.build(&contents, &self.alpn) {
            Ok(cfg) => {
                st.config = Arc::new(cfg);
                st.contents = contents;
                metrics::counter!(TLS_RELOADS, "path" => path.clone()).increment(1);
                tracing::info!(cert_file = %path, "TLS certificate reloaded");
            }
            Err(e) => {
                // Files caught between two writes land here too; the next check retries.
                metrics::counter!(TLS_RELOAD_FAILURES, "path" => path.clone()).increment(1);
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate");
            }
        }
        st.config.clone()
    }

    /// One server handshake over `io` with the current config, bounded by `handshake_timeout`.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        match tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(io)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake did not finish in time",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A CA and the PEM files of leaf certificates it signs, in a tempdir.
    struct Pki {
        dir: tempfile::TempDir,
        ca: Issuer<'static, KeyPair>,
        ca_pem: String,
    }

    impl Pki {
        fn new(name: &str) -> Pki {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let pki = Pki {
                dir: tempfile::tempdir().unwrap(),
                ca_pem: cert.pem(),
                ca: Issuer::new(params, key),
            };
            fs::write(pki.path("ca.pem"), &pki.ca_pem).unwrap();
            pki
        }

        fn path(&self, f: &str) -> PathBuf {
            self.dir.path().join(f)
        }

        /// Writes `<stem>.pem` and `<stem>.key` for a leaf valid for `names`.
        fn leaf(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let params =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let (c, k) = (
                self.path(&format!("{stem}.pem")),
                self.path(&format!("{stem}.key")),
            );
            fs::write(&c, cert.pem()).unwrap();
            fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        }
    }

    /// An echo server that answers one line per connection over TLS.
    async fn serve(tls: Arc<ServerTls>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = tls.accept(tcp).await {
                        let mut buf = [0u8; 5];
                        if s.read_exact(&mut buf).await.is_ok() {
                            let _ = s.write_all(b"pong!").await;
                            let _ = s.shutdown().await;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn ping(addr: std::net::SocketAddr, client: &ClientTlsSettings) -> Result<(), String> {
        let cfg = client.client_config(&[]).map_err(|e| e.to_string())?;
        let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = client.server_name("localhost").map_err(|e| e.to_string())?;
        let mut s = conn.connect(name, tcp).await.map_err(|e| e.to_string())?;
        s.write_all(b"ping!").await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // TLS 1.3 reports a refused client certificate only at the first read.
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        if buf == b"pong!" {
            Ok(())
        } else {
            Err(format!("answer {buf:?}"))
        }
    }

    fn trusting(pki: &Pki) -> ClientTlsSettings {
        ClientTlsSettings {
            ca_file: Some(pki.path("ca.pem")),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_good_client_is_accepted_and_a_plaintext_one_refused() {
        let pki = Pki::new("test ca");
        let (c, k) = pki.leaf("server", &["localhost"]);
        let tls = Arc::new(ServerTls::new(ServerTlsSettings::new(c, k), &[]).unwrap());
        let addr = serve(tls).await;
        ping(addr, &trusting(&pki)).await.unwrap();

        // Plaintext: the server reads garbage as a ClientHello and closes without answering.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"ping!\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
        assert!(!buf.windows(5).any(|w| w == b"pong!"), "{buf:?}");

        // A client trusting another CA refuses the server.
        let other = Pki::new("other ca");
        let e = ping(addr, &trusting(&other)).await.unwrap_err();
        assert!(e.contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn mtls_refuses_a_client_without_a_certificate() {
        let pki = Pki::new("test ca");
        let (c, k) = pki.leaf("server", &["localhost"]);
        let (cc, ck) = pki.leaf("client", &["client"]);
        let mut settings = ServerTlsSettings::new(c, k);
        settings.client_ca_file = Some(pki.path("ca.pem"));
        let addr = serve(Arc::new(ServerTls::new(settings, &[]).unwrap())).await;

        let e = ping(addr, &trusting(&pki)).await.unwrap_err();
        assert!(
            e.contains("Certificate") || e.contains("certificate"),
            "{e}"
        );

        let with_cert = ClientTlsSettings {
            cert_file: Some(cc),
            key_file: Some(ck),
            ..trusting(&pki)
        };
        ping(addr, &with_cert).await.unwrap();

        // A certificate from another CA is refused too.
        let other = Pki::new("other ca");
        let (oc, ok) = other.leaf("client", &["client"]);
        let foreign = ClientTlsSettings {
            cert_file: Some(oc),
            key_file: Some(ok),
            ..trusting(&pki)
        };
        assert!(ping(addr, &foreign).await.is_err());
    }

    #[tokio::test]
    async fn server_name_override_verifies_another_name() {
        let pki = Pki::new("test ca");
        let (c, k) = pki.leaf("server", &["collector.internal"]);
        let addr = serve(Arc::new(
            ServerTls::new(ServerTlsSettings::new(c, k), &[]).unwrap(),
        ))
        .await;
        // We dial "localhost"; the certificate names collector.internal.
        assert!(ping(addr, &trusting(&pki)).await.is_err());
        let over = ClientTlsSettings {
            server_name_override: Some("collector.internal".into()),
            ..trusting(&pki)
        };
        ping(addr, &over).await.unwrap();
    }

    #[tokio::test]
    async fn certificates_are_reloaded_when_the_files_change() {
        let old = Pki::new("old ca");
        let (c, k) = old.leaf("server", &["localhost"]);
        let tls = Arc::new(ServerTls::new(ServerTlsSettings::new(&c, &k), &[]).unwrap());
        let t0 = Instant::now();
        let first = tls.current_at(t0);

        // Rotate to a certificate from a new CA, at the same paths.
        let new = Pki::new("new ca");
        let (nc, nk) = new.leaf("server", &["localhost"]);
        fs::copy(nc, &c).unwrap();
        fs::copy(nk, &k).unwrap();
        // Before the interval: still the old config.
        assert!(Arc::ptr_eq(&first, &tls.current_at(t0)));
        let later = t0 + DEFAULT_RELOAD_INTERVAL + Duration::from_secs(1);
        let second = tls.current_at(later);
        assert!(!Arc::ptr_eq(&first, &second));
        // Unchanged files: no new config.
        let third = tls.current_at(later + DEFAULT_RELOAD_INTERVAL * 2);
        assert!(Arc::ptr_eq(&second, &third));

        // A broken rotation keeps the working config.
        fs::write(&k, "not a key").unwrap();
        let fourth = tls.current_at(later + DEFAULT_RELOAD_INTERVAL * 4);
        assert!(Arc::ptr_eq(&second, &fourth));

        // Repaired: the files match the config in use again. Over a real connection (the
        // handshake checks at the real "now", before `later`, so it keeps that config) the new
        // CA is trusted and the old one no longer is.
        fs::copy(new.path("server.key"), &k).unwrap();
        let addr = serve(tls.clone()).await;
        ping(addr, &trusting(&new)).await.unwrap();
        assert!(ping(addr, &trusting(&old)).await.is_err());
    }

    #[test]
    fn bad_files_fail_at_load_with_their_path() {
        let pki = Pki::new("ca");
        let (c, _) = pki.leaf("server", &["localhost"]);
        let e = ServerTls::new(ServerTlsSettings::new(&c, pki.path("missing.key")), &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("missing.key"), "{e}");
        let e = ServerTls::new(ServerTlsSettings::new(&c, &c), &[])
            .err()
            .unwrap();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        let empty = pki.path("empty.pem");
        fs::write(&empty, "").unwrap();
        let e = ClientTlsSettings {
            ca_file: Some(empty),
            ..Default::default()
        }
        .client_config(&[])
        .unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    }

    #[test]
    fn settings_are_validated_with_paths() {
        let paths = |s: &ClientTlsSettings| -> Vec<String> {
            s.validate("tls").into_iter().map(|i| i.path).collect()
        };
        assert!(paths(&ClientTlsSettings::default()).is_empty());
        let s = ClientTlsSettings {
            insecure: true,
            cert_file: Some("c.pem".into()),
            server_name_override: Some("not a name!".into()),
            ..Default::default()
        };
        assert_eq!(
            paths(&s),
            ["tls.insecure", "tls.key_file", "tls.server_name_override"]
        );
        let srv: ServerTlsSettings = crate::config::parse(
            serde_yaml::from_str("{cert_file: '', key_file: k, handshake_timeout: 0s}").unwrap(),
        )
        .unwrap();
        assert_eq!(srv.reload_interval, DEFAULT_RELOAD_INTERVAL);
        let p: Vec<String> = srv
            .validate("protocols.grpc.tls")
            .into_iter()
            .map(|i| i.path)
            .collect();
        assert_eq!(
            p,
            [
                "protocols.grpc.tls.cert_file",
                "protocols.grpc.tls.handshake_timeout"
            ]
        );
        assert!(crate::config::parse::<ServerTlsSettings>(
            serde_yaml::from_str("{cert_file: c, key_file: k, ca: x}").unwrap()
        )
        .is_err());
        // A key without a certificate is a validation problem at the missing key's path.
        let key_only: ServerTlsSettings =
            crate::config::parse(serde_yaml::from_str("{key_file: k}").unwrap()).unwrap();
        let p: Vec<String> = key_only
            .validate("protocols.http.tls")
            .into_iter()
            .map(|i| i.path)
            .collect();
        assert_eq!(p, ["protocols.http.tls.cert_file"]);
        assert!(ServerTls::new(key_only, &[]).is_err());
    }

    #[test]
    fn missing_files_are_reported_with_their_key() {
        let pki = Pki::new("ca");
        let (c, _) = pki.leaf("server", &["localhost"]);
        let mut s = ServerTlsSettings::new(&c, pki.path("nope.key"));
        s.client_ca_file = Some(pki.dir.path().to_path_buf());
        let issues = s.check_files("protocols.grpc.tls");
        let p: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            p,
            [
                "protocols.grpc.tls.key_file",
                "protocols.grpc.tls.client_ca_file"
            ]
        );
        assert!(issues[0].message.contains("nope.key"), "{}", issues[0]);
        assert!(ServerTlsSettings::new(&c, &c).check_files("tls").is_empty());
    }
}

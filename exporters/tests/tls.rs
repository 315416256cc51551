//! The `otlp` and `otlp_http` exporters over TLS and mTLS, against servers that use the receivers'
//! loader (`tailweave_core::tls::ServerTls`), with certificates generated at test time; and the
//! rotation of the exporters' certificate files without a restart.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tailweave_core::proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tailweave_core::tls::tokio_rustls::server::TlsStream;
use tailweave_core::tls::{
    ServerTls, ServerTlsSettings, ALPN_H2, ALPN_HTTP1, TLS_RELOADS, TLS_RELOAD_FAILURES,
};
use tailweave_exporters::otlp::OtlpExporterConfig;
use tailweave_exporters::otlp_http::OtlpHttpExporterConfig;
use tailweave_exporters::queue::Destination;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca: Issuer::new(params, key),
        }
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
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
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A TLS stream as tonic's and hyper's servers take it; it reads as closed once `closed` is
/// cancelled, which ends the connection and makes the client connect again.
struct Conn {
    s: TlsStream<TcpStream>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().s).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().s).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().s).poll_shutdown(cx)
    }
}

/// What a test server saw, and its switch to close the open connections.
#[derive(Clone, Default)]
struct Seen {
    /// The first certificate each accepted client presented (`None`: none), in order.
    clients: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    /// Cancelled to close every open connection; later connections get a fresh token.
    close: Arc<Mutex<CancellationToken>>,
}

impl Seen {
    fn close_connections(&self) {
        let mut t = self.close.lock().unwrap();
        t.cancel();
        *t = CancellationToken::new();
    }
    fn clients(&self) -> Vec<Option<Vec<u8>>> {
        self.clients.lock().unwrap().clone()
    }
}

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Accepts TCP, runs the handshake, notes the client's certificate, hands finished TLS streams
/// on.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    seen: Seen,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, tx, seen) = (tls.clone(), tx.clone(), seen.clone());
            tokio::spawn(async move {
                // A failed handshake drops the connection; the client sees the error.
                if let Ok(s) = tls.accept(tcp).await {
                    let cert = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    seen.clients.lock().unwrap().push(cert);
                    let closed = Box::pin(seen.close.lock().unwrap().clone().cancelled_owned());
                    let _ = tx.send(Ok(Conn { s, closed })).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn grpc_server(settings: ServerTlsSettings) -> (SocketAddr, Sink) {
    let (addr, sink, _) = grpc_server_seen(settings).await;
    (addr, sink)
}

async fn grpc_server_seen(settings: ServerTlsSettings) -> (SocketAddr, Sink, Seen) {
    let tls = Arc::new(ServerTls::new(settings, &[ALPN_H2]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Sink::default();
    let seen = Seen::default();
    let svc = TraceServiceServer::new(sink.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tls_incoming(listener, tls, seen.clone())),
    );
    (addr, sink, seen)
}

fn grpc_exporter(yaml: &str) -> OtlpExporterConfig {
    let c: OtlpExporterConfig =
        tailweave_core::config::parse(serde_yaml::from_str(yaml).unwrap()).unwrap();
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    c
}

async fn send_once(dest: &dyn Destination) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(10), dest.send(&common::spans())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

#[tokio::test]
async fn grpc_over_tls_with_a_private_ca() {
    let pki = Pki::new("ca");
    let (c, k) = pki.leaf("server", &["localhost"]);
    let (addr, sink) = grpc_server(ServerTlsSettings::new(c, k)).await;
    let port = addr.port();
    let ca = pki.path("ca.pem").display().to_string();

    let good = grpc_exporter(&format!(
        "endpoint: localhost:{port}\ntls: {{ca_file: {ca}}}"
    ));
    send_once(&good.destination("otlp/tls").unwrap())
        .await
        .unwrap();
    assert_eq!(sink.spans.load(Ordering::Relaxed), 6);

    // A plaintext client is refused by the TLS server.
    let plain = grpc_exporter(&format!("endpoint: http://localhost:{port}"));
    let e = send_once(&plain.destination("otlp/plain").unwrap())
        .await
        .unwrap_err();
    assert!(!e.is_empty());

    // A client that does not trust the server's CA refuses it.
    let other = Pki::new("other");
    let o = other.path("ca.pem").display().to_string();
    let untrusting = grpc_exporter(&format!(
        "endpoint: localhost:{port}\ntls: {{ca_file: {o}}}"
    ));
    let e = send_once(&untrusting.destination("otlp/untrusting").unwrap())
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Dialled by IP, the certificate's name is given with server_name_override.
    let by_ip = grpc_exporter(&format!(
        "endpoint: https://127.0.0.1:{port}\ntls: {{ca_file: {ca}, server_name_override: localhost}}"
    ));
    send_once(&by_ip.destination("otlp/ip").unwrap())
        .await
        .unwrap();
    assert_eq!(sink.spans.load(Ordering::Relaxed), 12);
}

#[tokio::test]
async fn grpc_mtls_needs_a_client_certificate() {
    let pki = Pki::new("ca");
    let (c, k) = pki.leaf("server", &["localhost"]);
    let (cc, ck) = pki.leaf("client", &["client"]);
    let mut settings = ServerTlsSettings::new(c, k);
    settings.client_ca_file = Some(pki.path("ca.pem"));
    let (addr, sink) = grpc_server(settings).await;
    let port = addr.port();
    let ca = pki.path("ca.pem").display().to_string();

    let anonymous = grpc_exporter(&format!(
        "endpoint: localhost:{port}\ntls: {{ca_file: {ca}}}"
    ));
    assert!(send_once(&anonymous.destination("otlp/anon").unwrap())
        .await
        .is_err());
    assert_eq!(sink.spans.load(Ordering::Relaxed), 0);

    let with_cert = grpc_exporter(&format!(
        "endpoint: localhost:{port}\ntls: {{ca_file: {ca}, cert_file: {}, key_file: {}}}",
        cc.display(),
        ck.display()
    ));
    send_once(&with_cert.destination("otlp/mtls").unwrap())
        .await
        .unwrap();
    assert_eq!(sink.spans.load(Ordering::Relaxed), 6);
}

/// An OTLP/HTTP server over TLS that counts spans and answers 200.
async fn http_server(settings: ServerTlsSettings) -> (SocketAddr, Arc<AtomicU64>) {
    let (addr, spans, _) = http_server_seen(settings).await;
    (addr, spans)
}

async fn http_server_seen(settings: ServerTlsSettings) -> (SocketAddr, Arc<AtomicU64>, Seen) {
    let tls = Arc::new(ServerTls::new(settings, &[ALPN_HTTP1]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(AtomicU64::new(0));
    let counter = spans.clone();
    let seen = Seen::default();
    let mut incoming = tls_incoming(listener, tls, seen.clone()).into_inner();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = incoming.recv().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let counter = counter.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let raw = flate2::read::GzDecoder::new(&body[..]);
                            let raw: Vec<u8> = std::io::Read::bytes(raw)
                                .collect::<Result<_, _>>()
                                .unwrap_or_default();
                            let n = ExportTraceServiceRequest::decode(&raw[..])
                                .map(|r| {
                                    r.resource_spans
                                        .iter()
                                        .flat_map(|r| &r.scope_spans)
                                        .map(|s| s.spans.len() as u64)
                                        .sum::<u64>()
                                })
                                .unwrap_or(0);
                            counter.fetch_add(n, Ordering::Relaxed);
                            let resp = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::from(resp)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans, seen)
}

#[tokio::test]
async fn http_over_tls_and_mtls() {
    let pki = Pki::new("ca");
    let (c, k) = pki.leaf("server", &["localhost"]);
    let (cc, ck) = pki.leaf("client", &["client"]);
    let ca = pki.path("ca.pem").display().to_string();
    let cfg = |yaml: String| -> OtlpHttpExporterConfig {
        let c: OtlpHttpExporterConfig =
            tailweave_core::config::parse(serde_yaml::from_str(&yaml).unwrap()).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        c
    };

    let (addr, spans) = http_server(ServerTlsSettings::new(&c, &k)).await;
    let port = addr.port();
    let good = cfg(format!(
        "endpoint: https://localhost:{port}\ntls: {{ca_file: {ca}}}"
    ));
    send_once(&good.destination("otlp_http/tls").unwrap())
        .await
        .unwrap();
    assert_eq!(spans.load(Ordering::Relaxed), 6);
    let plain = cfg(format!("endpoint: http://localhost:{port}"));
    assert!(send_once(&plain.destination("otlp_http/plain").unwrap())
        .await
        .is_err());

    let mut mtls = ServerTlsSettings::new(&c, &k);
    mtls.client_ca_file = Some(pki.path("ca.pem"));
    let (addr, spans) = http_server(mtls).await;
    let port = addr.port();
    let anonymous = cfg(format!(
        "endpoint: https://localhost:{port}\ntls: {{ca_file: {ca}}}"
    ));
    assert!(send_once(&anonymous.destination("otlp_http/anon").unwrap())
        .await
        .is_err());
    let with_cert = cfg(format!(
        "endpoint: https://localhost:{port}\ntls: {{ca_file: {ca}, cert_file: {}, key_file: {}}}",
        cc.display(),
        ck.display()
    ));
    send_once(&with_cert.destination("otlp_http/mtls").unwrap())
        .await
        .unwrap();
    assert_eq!(spans.load(Ordering::Relaxed), 6);
}

#[tokio::test]
async fn a_missing_ca_file_fails_the_build_with_its_path() {
    let c = grpc_exporter("endpoint: localhost:4317\ntls: {ca_file: /nonexistent/ca.pem}");
    let e = c.destination("otlp/x").err().unwrap();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

// ---------- certificate rotation ----------

#[derive(Clone, Copy, Debug)]
enum Kind {
    Grpc,
    Http,
}

/// A TLS server of `kind` with its span count and what it saw.
async fn server(kind: Kind, settings: ServerTlsSettings) -> (SocketAddr, Arc<AtomicU64>, Seen) {
    match kind {
        Kind::Grpc => {
            let (addr, sink, seen) = grpc_server_seen(settings).await;
            (addr, sink.spans, seen)
        }
        Kind::Http => http_server_seen(settings).await,
    }
}

/// The exporter of `kind` towards `localhost:port`, with the `tls` block given as YAML flow.
fn exporter(kind: Kind, port: u16, tls: &str) -> Box<dyn Destination> {
    match kind {
        Kind::Grpc => Box::new(
            grpc_exporter(&format!("endpoint: localhost:{port}\ntls: {tls}"))
                .destination("otlp/rotate")
                .unwrap(),
        ),
        Kind::Http => {
            let c: OtlpHttpExporterConfig = tailweave_core::config::parse(
                serde_yaml::from_str(&format!("endpoint: https://localhost:{port}\ntls: {tls}"))
                    .unwrap(),
            )
            .unwrap();
            assert!(c.validate().is_empty(), "{:?}", c.validate());
            Box::new(c.destination("otlp_http/rotate").unwrap())
        }
    }
}

/// Sends until one export is delivered; panics after 20 s (a bound, not a timing assertion).
/// Returns how many attempts failed first: a connection the server just closed may still be
/// chosen once before the client has noticed.
async fn send_until_ok(dest: &dyn Destination, what: &str) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut failed = 0;
    loop {
        match send_once(dest).await {
            Ok(()) => return failed,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{what}: {e}");
                failed += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Counter totals by (name, `path` label), over every snapshot taken so far (a snapshot hands
/// over what was counted since the one before).
struct Counters {
    snapshotter: metrics_util::debugging::Snapshotter,
    totals: HashMap<(String, String), u64>,
}

impl Counters {
    fn get(&mut self, name: &str, path: &std::path::Path) -> u64 {
        for (k, _, _, v) in self.snapshotter.snapshot().into_vec() {
            if let metrics_util::debugging::DebugValue::Counter(n) = v {
                let key = k.key();
                let label = key
                    .labels()
                    .find(|l| l.key() == "path")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                *self
                    .totals
                    .entry((key.name().to_string(), label))
                    .or_default() += n;
            }
        }
        self.totals
            .get(&(name.to_string(), path.display().to_string()))
            .copied()
            .unwrap_or(0)
    }
}

/// Runs `f` with a recorder of its own. The tests run on a current-thread runtime, so every
/// task of the exporter and the server records on this thread.
async fn with_counters<F: Future<Output = ()>>(f: impl FnOnce(Counters) -> F) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let counters = Counters {
        snapshotter: recorder.snapshotter(),
        totals: HashMap::new(),
    };
    let _guard = metrics::set_default_local_recorder(&recorder);
    f(counters).await;
}

fn der(cert_pem: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read(cert_pem).unwrap();
    tailweave_core::tls::parse_certs(&pem, cert_pem).unwrap()[0]
        .as_ref()
        .to_vec()
}

/// The server trusts client certificates of CA B only; the exporter starts with one from CA A,
/// then its files are overwritten in place with a B-signed pair.
async fn client_certificate_rotation(kind: Kind) {
    with_counters(|mut counters| async move {
        let b = Pki::new("ca b");
        let (sc, sk) = b.leaf("server", &["localhost"]);
        let mut settings = ServerTlsSettings::new(sc, sk);
        settings.client_ca_file = Some(b.path("ca.pem"));
        let (addr, spans, seen) = server(kind, settings).await;

        let a = Pki::new("ca a");
        let (ac, ak) = a.leaf("client", &["client"]);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
        std::fs::copy(&ac, &cert).unwrap();
        std::fs::copy(&ak, &key).unwrap();
        let dest = exporter(
            kind,
            addr.port(),
            &format!(
                "{{ca_file: {}, cert_file: {}, key_file: {}}}",
                b.path("ca.pem").display(),
                cert.display(),
                key.display()
            ),
        );
        let mut refused = 0;
        for _ in 0..3 {
            if send_once(dest.as_ref()).await.is_err() {
                refused += 1;
            }
        }
        assert_eq!(
            refused, 3,
            "{kind:?}: every push with the A certificate fails"
        );
        assert_eq!(spans.load(Ordering::Relaxed), 0);
        assert!(seen.clients().is_empty(), "no handshake was accepted");
        assert_eq!(counters.get(TLS_RELOADS, &cert), 0);

        let (bc, bk) = b.leaf("client", &["client"]);
        std::fs::copy(&bk, &key).unwrap();
        std::fs::copy(&bc, &cert).unwrap();
        // The refused connection is gone, so the next export connects again, with the new pair.
        send_once(dest.as_ref()).await.unwrap();
        assert_eq!(spans.load(Ordering::Relaxed), 6);
        let clients = seen.clients();
        assert!(!clients.is_empty());
        assert!(
            clients
                .iter()
                .all(|c| c.as_deref() == Some(der(&bc).as_slice())),
            "{kind:?}: every accepted handshake presented the B certificate"
        );
        assert_eq!(counters.get(TLS_RELOADS, &cert), 1);
        assert_eq!(counters.get(TLS_RELOAD_FAILURES, &cert), 0);
    })
    .await;
}

#[tokio::test]
async fn grpc_a_rotated_client_certificate_is_used_without_a_restart() {
    client_certificate_rotation(Kind::Grpc).await;
}

#[tokio::test]
async fn http_a_rotated_client_certificate_is_used_without_a_restart() {
    client_certificate_rotation(Kind::Http).await;
}

/// The server's certificate comes from a new CA; the exporter's `ca_file` still holds the old
/// one until it is overwritten with the new.
async fn ca_rotation(kind: Kind) {
    with_counters(|mut counters| async move {
        let new = Pki::new("new ca");
        let (sc, sk) = new.leaf("server", &["localhost"]);
        let (addr, spans, _) = server(kind, ServerTlsSettings::new(sc, sk)).await;
        let old = Pki::new("old ca");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::copy(old.path("ca.pem"), &ca).unwrap();
        let dest = exporter(kind, addr.port(), &format!("{{ca_file: {}}}", ca.display()));

        let e = send_once(dest.as_ref()).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{kind:?}: {e}");
        assert_eq!(spans.load(Ordering::Relaxed), 0);

        std::fs::copy(new.path("ca.pem"), &ca).unwrap();
        send_once(dest.as_ref()).await.unwrap();
        assert_eq!(spans.load(Ordering::Relaxed), 6);
        assert_eq!(counters.get(TLS_RELOADS, &ca), 1);
    })
    .await;
}

#[tokio::test]
async fn grpc_a_ca_file_rotated_to_the_servers_new_ca_is_trusted() {
    ca_rotation(Kind::Grpc).await;
}

#[tokio::test]
async fn http_a_ca_file_rotated_to_the_servers_new_ca_is_trusted() {
    ca_rotation(Kind::Http).await;
}

/// A certificate file caught half-written: new connections keep the working pair, the failure
/// is counted once, and the finished rotation is taken at the next connection.
async fn half_written_rotation(kind: Kind) {
    with_counters(|mut counters| async move {
        let pki = Pki::new("ca");
        let (sc, sk) = pki.leaf("server", &["localhost"]);
        let mut settings = ServerTlsSettings::new(sc, sk);
        settings.client_ca_file = Some(pki.path("ca.pem"));
        let (addr, spans, seen) = server(kind, settings).await;

        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
        let (c1, k1) = pki.leaf("client1", &["client"]);
        std::fs::copy(&c1, &cert).unwrap();
        std::fs::copy(&k1, &key).unwrap();
        let dest = exporter(
            kind,
            addr.port(),
            &format!(
                "{{ca_file: {}, cert_file: {}, key_file: {}}}",
                pki.path("ca.pem").display(),
                cert.display(),
                key.display()
            ),
        );
        send_once(dest.as_ref()).await.unwrap();

        let (c2, k2) = pki.leaf("client2", &["client"]);
        let full = std::fs::read(&c2).unwrap();
        std::fs::write(&cert, &full[..full.len() / 2]).unwrap();
        // Two new connections while the file is broken: both use the first pair.
        for round in 0..2 {
            seen.close_connections();
            send_until_ok(dest.as_ref(), "an export over a new connection").await;
            let clients = seen.clients();
            assert_eq!(
                clients.last().cloned().flatten(),
                Some(der(&c1)),
                "{kind:?}, round {round}: the new connection kept the working certificate"
            );
        }
        assert!(
            seen.clients().len() >= 3,
            "{kind:?}: {:?}",
            seen.clients().len()
        );
        assert_eq!(counters.get(TLS_RELOAD_FAILURES, &cert), 1);
        assert_eq!(counters.get(TLS_RELOADS, &cert), 0);

        std::fs::copy(&k2, &key).unwrap();
        std::fs::write(&cert, &full).unwrap();
        seen.close_connections();
        send_until_ok(dest.as_ref(), "an export with the finished rotation").await;
        assert_eq!(seen.clients().last().cloned().flatten(), Some(der(&c2)));
        assert_eq!(counters.get(TLS_RELOADS, &cert), 1);
        assert_eq!(spans.load(Ordering::Relaxed), 6 * 4);
    })
    .await;
}

#[tokio::test]
async fn grpc_a_half_written_rotation_keeps_the_working_certificate() {
    half_written_rotation(Kind::Grpc).await;
}

#[tokio::test]
async fn http_a_half_written_rotation_keeps_the_working_certificate() {
    half_written_rotation(Kind::Http).await;
}

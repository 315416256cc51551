//! The `otlp` and `otlp_http` exporters over TLS and mTLS, against servers that use the receivers'
//! loader (`tailweave_core::tls::ServerTls`), with certificates generated at test time.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
use tailweave_core::tls::{ServerTls, ServerTlsSettings, ALPN_H2, ALPN_HTTP1};
use tailweave_exporters::otlp::OtlpExporterConfig;
use tailweave_exporters::otlp_http::OtlpHttpExporterConfig;
use tailweave_exporters::queue::Destination;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

/// A TLS stream as tonic's server takes it.
struct Conn(TlsStream<TcpStream>);

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
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
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

/// Accepts TCP, runs the handshake, hands finished TLS streams on.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                // A failed handshake drops the connection; the client sees the error.
                if let Ok(s) = tls.accept(tcp).await {
                    let _ = tx.send(Ok(Conn(s))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn grpc_server(settings: ServerTlsSettings) -> (SocketAddr, Sink) {
    let tls = Arc::new(ServerTls::new(settings, &[ALPN_H2]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Sink::default();
    let svc = TraceServiceServer::new(sink.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tls_incoming(listener, tls)),
    );
    (addr, sink)
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
    let tls = Arc::new(ServerTls::new(settings, &[ALPN_HTTP1]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(AtomicU64::new(0));
    let counter = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, counter) = (tls.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
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
    (addr, spans)
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

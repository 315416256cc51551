//! Security of the real `tailweave` binary (issue 7): receiver bearer tokens over gRPC and HTTP,
//! receiver TLS and mTLS (plaintext and certificate-less clients refused, certificate rotation),
//! per-tenant tokens, and the `otlp` exporter over TLS and mTLS to a destination that uses the
//! receivers' TLS loader (`tailweave_core::tls::ServerTls`). Certificates are made at test time
//! with the `openssl` CLI ([`tailweave_suite::Pki`]; the exporter and core tests use `rcgen`;
//! this crate's dependencies are not ours to change).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tailweave_core::tls::rustls::pki_types::ServerName;
use tailweave_core::tls::tokio_rustls::server::TlsStream;
use tailweave_core::tls::{ClientTlsSettings, ServerTls, ServerTlsSettings, ALPN_H2, ALPN_HTTP1};
use tailweave_suite::{
    http_request, service_yaml, validate_config, wait_for_async, Collector, Pki, Ports, Sink,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

fn request(n: u8) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: vec![ScopeSpans {
                spans: (1..=n)
                    .map(|i| Span {
                        trace_id: vec![7; 16],
                        span_id: vec![i; 8],
                        name: format!("s{i}"),
                        start_time_unix_nano: 1,
                        end_time_unix_nano: 2,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn start(yaml: &str) -> Collector {
    tokio::task::block_in_place(|| Collector::start(yaml, Ports::new()))
}

fn service(exporter: &str) -> String {
    service_yaml(&["otlp"], &[], &[exporter])
}

/// gRPC export of `req` over a new connection, with an optional `authorization` value.
async fn grpc_call(
    endpoint: &str,
    auth: Option<&str>,
    req: ExportTraceServiceRequest,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    let mut c = TraceServiceClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    let mut req = tonic::Request::new(req);
    if let Some(a) = auth {
        req.metadata_mut()
            .insert("authorization", a.parse().expect("ascii"));
    }
    c.export(req).await.map(|r| r.into_inner())
}

/// gRPC export of three spans with an optional `authorization` value; the gRPC code.
async fn grpc_export(endpoint: &str, auth: Option<&str>) -> tonic::Code {
    match grpc_call(endpoint, auth, request(3)).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_refuse_missing_and_wrong_tokens_and_accept_a_good_one() {
    let sink = Sink::start().await;
    let yaml = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
      http:
        endpoint: 127.0.0.1:{{HTTP}}
    auth:
      bearer_tokens: ["s3cret-token"]
exporters:
  otlp:
    endpoint: {}
    tls: {{insecure: true}}
{}"#,
        sink.endpoint(),
        service("otlp")
    );
    let c = start(&yaml);
    let ep = c.grpc_endpoint();

    assert_eq!(grpc_export(&ep, None).await, tonic::Code::Unauthenticated);
    assert_eq!(
        grpc_export(&ep, Some("Bearer wrong")).await,
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        grpc_export(&ep, Some("Bearer s3cret-token")).await,
        tonic::Code::Ok
    );

    let body = request(2).encode_to_vec();
    let post = |auth: Option<&'static str>| {
        let mut h = vec![("content-type", "application/x-protobuf")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        let addr = c.http_addr();
        let body = body.clone();
        tokio::task::block_in_place(move || {
            http_request(&addr, "POST", "/v1/traces", &h, &body)
                .expect("http")
                .0
        })
    };
    assert_eq!(post(None), 401);
    assert_eq!(post(Some("Bearer nope")), 401);
    assert_eq!(post(Some("Bearer s3cret-token")), 200);

    // Only the two accepted requests went through; the four refusals are counted.
    wait_for_async("accepted spans delivered", Duration::from_secs(30), || {
        let n = sink.span_count();
        async move { (n == 5).then_some(()) }
    })
    .await;
    let refused = c.metric(
        "tailweave_receiver_requests_total",
        &[("outcome", "unauthenticated")],
    );
    assert_eq!(refused, 4.0, "{}", c.metrics());
}

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
struct CountingSink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for CountingSink {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = r
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC destination over TLS (mTLS when `client_ca` is given).
async fn tls_sink(pki: &Pki, client_ca: Option<&Path>) -> (u16, Arc<AtomicU64>) {
    let mut settings = ServerTlsSettings::new(pki.path("server.pem"), pki.path("server.key"));
    settings.client_ca_file = client_ca.map(Path::to_path_buf);
    let tls = Arc::new(ServerTls::new(settings, &[ALPN_H2]).expect("server TLS"));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(s) = tls.accept(tcp).await {
                    let _ = tx.send(Ok(Conn(s))).await;
                }
            });
        }
    });
    let sink = CountingSink::default();
    let spans = sink.0.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                TraceServiceServer::new(sink)
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
            )
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    (port, spans)
}

fn tls_relay(port: u16, tls: &str) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
exporters:
  otlp:
    endpoint: localhost:{port}
    tls: {tls}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 200ms, max_elapsed_time: 2s}}
{}"#,
        service("otlp")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_otlp_exporter_speaks_tls_and_mtls_and_plaintext_is_refused() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem").display().to_string();

    // TLS with a private CA: delivered.
    let (port, spans) = tls_sink(&pki, None).await;
    let c = start(&tls_relay(port, &format!("{{ca_file: {ca}}}")));
    assert_eq!(grpc_export(&c.grpc_endpoint(), None).await, tonic::Code::Ok);
    wait_for_async("spans over TLS", Duration::from_secs(30), || {
        let n = spans.load(Ordering::Relaxed);
        async move { (n == 3).then_some(()) }
    })
    .await;
    drop(c);

    // Plaintext to the TLS destination: the handshake fails, nothing arrives, the spans are
    // counted as failed once the retries are spent.
    let c = start(&tls_relay(port, "{insecure: true}"));
    assert_eq!(grpc_export(&c.grpc_endpoint(), None).await, tonic::Code::Ok);
    let c2 = &c;
    wait_for_async(
        "plaintext export counted as failed",
        Duration::from_secs(30),
        || {
            let failed = c2.metric("tailweave_exporter_send_failed_spans_total", &[]);
            async move { (failed == 3.0).then_some(()) }
        },
    )
    .await;
    assert_eq!(spans.load(Ordering::Relaxed), 3);
    drop(c);

    // mTLS: without a client certificate refused, with one delivered.
    let (port, spans) = tls_sink(&pki, Some(&pki.path("ca.pem"))).await;
    let c = start(&tls_relay(port, &format!("{{ca_file: {ca}}}")));
    assert_eq!(grpc_export(&c.grpc_endpoint(), None).await, tonic::Code::Ok);
    let c2 = &c;
    wait_for_async(
        "anonymous mTLS export counted as failed",
        Duration::from_secs(30),
        || {
            let failed = c2.metric("tailweave_exporter_send_failed_spans_total", &[]);
            async move { (failed == 3.0).then_some(()) }
        },
    )
    .await;
    assert_eq!(spans.load(Ordering::Relaxed), 0);
    drop(c);
    let c = start(&tls_relay(
        port,
        &format!(
            "{{ca_file: {ca}, cert_file: {}, key_file: {}}}",
            pki.path("client.pem").display(),
            pki.path("client.key").display()
        ),
    ));
    assert_eq!(grpc_export(&c.grpc_endpoint(), None).await, tonic::Code::Ok);
    wait_for_async("spans over mTLS", Duration::from_secs(30), || {
        let n = spans.load(Ordering::Relaxed);
        async move { (n == 3).then_some(()) }
    })
    .await;
}

// ---- Receiver TLS -------------------------------------------------------------------------

/// A rustls client config trusting `ca`, with a client certificate when given.
fn client_config(
    ca: &Path,
    cert: Option<(PathBuf, PathBuf)>,
    alpn: &[u8],
) -> Arc<tailweave_core::tls::rustls::ClientConfig> {
    let (cert_file, key_file) = match cert {
        Some((c, k)) => (Some(c), Some(k)),
        None => (None, None),
    };
    let s = ClientTlsSettings {
        ca_file: Some(ca.to_path_buf()),
        cert_file,
        key_file,
        ..Default::default()
    };
    Arc::new(s.client_config(&[alpn]).expect("client TLS config"))
}

/// Connects over TLS to `localhost:port`, verifying the name `localhost`.
async fn tls_connect(
    port: u16,
    cfg: Arc<tailweave_core::tls::rustls::ClientConfig>,
) -> io::Result<tailweave_core::tls::tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").expect("name");
    tailweave_core::tls::tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// tonic's connector for a TLS channel (tonic itself is built without TLS here).
#[derive(Clone)]
struct TlsDial {
    port: u16,
    cfg: Arc<tailweave_core::tls::rustls::ClientConfig>,
}

type TlsIo =
    hyper_util::rt::TokioIo<tailweave_core::tls::tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsDial {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let (port, cfg) = (self.port, self.cfg.clone());
        Box::pin(async move { Ok(hyper_util::rt::TokioIo::new(tls_connect(port, cfg).await?)) })
    }
}

/// A gRPC export of `request(n)` over TLS: `Ok` when accepted, else what went wrong.
async fn grpc_tls_export(
    port: u16,
    cfg: Arc<tailweave_core::tls::rustls::ClientConfig>,
    n: u8,
) -> Result<(), String> {
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(TlsDial { port, cfg })
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    TraceServiceClient::new(ch)
        .export(request(n))
        .await
        .map(|_| ())
        .map_err(|s| format!("export: {s:?}"))
}

/// A plaintext gRPC export: `Ok` when accepted.
async fn grpc_plain_export(endpoint: &str) -> Result<(), String> {
    let mut c = TraceServiceClient::connect(endpoint.to_string())
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    c.export(request(3))
        .await
        .map(|_| ())
        .map_err(|s| format!("export: {s:?}"))
}

/// An OTLP/HTTP protobuf POST over TLS (HTTP/1.1); the status code.
async fn https_post(
    port: u16,
    cfg: Arc<tailweave_core::tls::rustls::ClientConfig>,
    body: &[u8],
    auth: Option<&str>,
) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(port, cfg)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut head = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(a) = auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    let io = async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("io: {e}"))?;
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {line:?}"))
}

/// An OTLP/HTTP protobuf POST over HTTP/2 on TLS (ALPN `h2`); the status code.
async fn https_post_h2(
    port: u16,
    cfg: Arc<tailweave_core::tls::rustls::ClientConfig>,
    body: Vec<u8>,
) -> Result<u16, String> {
    let s = tls_connect(port, cfg)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let negotiated = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if negotiated.as_deref() != Some(ALPN_H2) {
        return Err(format!("ALPN {negotiated:?}"));
    }
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::post("https://localhost/v1/traces")
        .header("content-type", "application/x-protobuf")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("h2 request: {e}"))?;
    Ok(resp.status().as_u16())
}

/// A plaintext POST to a TLS port: the status when an HTTP answer came back at all.
fn plain_post(addr: &str, body: &[u8]) -> Option<u16> {
    tokio::task::block_in_place(|| {
        http_request(
            addr,
            "POST",
            "/v1/traces",
            &[("content-type", "application/x-protobuf")],
            body,
        )
        .ok()
        .map(|r| r.0)
    })
}

/// An `otlp` receiver on both protocols with `tls` (a YAML flow map), exporting to `sink`.
fn tls_receiver(tls: &str, sink: &Sink) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
        tls: {tls}
      http:
        endpoint: 127.0.0.1:{{HTTP}}
        tls: {tls}
exporters:
  otlp:
    endpoint: {}
    tls: {{insecure: true}}
{}"#,
        sink.endpoint(),
        service("otlp")
    )
}

fn server_tls_yaml(pki: &Pki, extra: &str) -> String {
    format!(
        "{{cert_file: {}, key_file: {}{extra}}}",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    )
}

async fn wait_spans(sink: &Sink, n: usize) {
    wait_for_async(
        "spans delivered downstream",
        Duration::from_secs(30),
        || {
            let got = sink.span_count();
            async move { (got == n).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_receivers_refuse_plaintext_and_deliver_what_tls_clients_send() {
    let pki = Pki::new();
    let sink = Sink::start().await;
    let c = start(&tls_receiver(
        &server_tls_yaml(&pki, ", handshake_timeout: 1s"),
        &sink,
    ));
    let ca = pki.path("ca.pem");
    let body = request(2).encode_to_vec();

    // A client that connects and never says hello holds only its own handshake: others are
    // served meanwhile, and it is dropped (and counted) at handshake_timeout.
    let silent = TcpStream::connect(("127.0.0.1", c.ports.grpc))
        .await
        .unwrap();
    grpc_tls_export(c.ports.grpc, client_config(&ca, None, ALPN_H2), 1)
        .await
        .expect("served next to a stalled handshake");
    let c2 = &c;
    wait_for_async(
        "the stalled handshake timed out",
        Duration::from_secs(30),
        || {
            let n = c2.metric(
                "tailweave_receiver_tls_handshake_failures_total",
                &[("reason", "timeout")],
            );
            async move { (n == 1.0).then_some(()) }
        },
    )
    .await;
    drop(silent);

    // Plaintext clients get no service, on either protocol.
    let e = grpc_plain_export(&c.grpc_endpoint()).await.unwrap_err();
    assert!(!e.is_empty());
    assert_eq!(plain_post(&c.http_addr(), &body), None);

    // A client that trusts another CA refuses the receiver (it did not prove who it is).
    let other = Pki::new();
    let e = grpc_tls_export(
        c.ports.grpc,
        client_config(&other.path("ca.pem"), None, ALPN_H2),
        1,
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("certificate") || e.contains("Certificate"),
        "{e}"
    );

    // TLS clients with the right CA: accepted (HTTP/1.1 and, for gRPC, h2) and delivered.
    grpc_tls_export(c.ports.grpc, client_config(&ca, None, ALPN_H2), 2)
        .await
        .expect("gRPC over TLS");
    let st = https_post(
        c.ports.http,
        client_config(&ca, None, ALPN_HTTP1),
        &body,
        None,
    )
    .await;
    assert_eq!(st, Ok(200));
    // HTTP/2 on the HTTP port too (ALPN h2 offered next to http/1.1).
    let st = https_post_h2(
        c.ports.http,
        client_config(&ca, None, ALPN_H2),
        body.clone(),
    )
    .await;
    assert_eq!(st, Ok(200));
    wait_spans(&sink, 7).await;

    // Every failed handshake was counted, and the listeners kept serving through them.
    let failed = c.metric("tailweave_receiver_tls_handshake_failures_total", &[]);
    assert!(failed >= 4.0, "{failed}\n{}", c.metrics());
    let grpc_failed = c.metric(
        "tailweave_receiver_tls_handshake_failures_total",
        &[("transport", "grpc")],
    );
    assert!(grpc_failed >= 3.0, "{}", c.metrics());
    grpc_tls_export(c.ports.grpc, client_config(&ca, None, ALPN_H2), 1)
        .await
        .expect("still serving");
    wait_spans(&sink, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_receivers_refuse_clients_without_a_good_certificate() {
    let pki = Pki::new();
    let sink = Sink::start().await;
    let ca = pki.path("ca.pem");
    let extra = format!(", client_ca_file: {}", ca.display());
    let c = start(&tls_receiver(&server_tls_yaml(&pki, &extra), &sink));
    let body = request(2).encode_to_vec();
    let client = Some((pki.path("client.pem"), pki.path("client.key")));
    // A certificate from another CA is no better than none.
    let other = Pki::new();
    let foreign = Some((other.path("client.pem"), other.path("client.key")));

    for cert in [None, foreign] {
        let e = grpc_tls_export(c.ports.grpc, client_config(&ca, cert.clone(), ALPN_H2), 3).await;
        assert!(e.is_err(), "gRPC without a good client certificate: {e:?}");
        let st = https_post(
            c.ports.http,
            client_config(&ca, cert, ALPN_HTTP1),
            &body,
            None,
        )
        .await;
        assert!(
            st.is_err(),
            "HTTP without a good client certificate: {st:?}"
        );
    }
    assert_eq!(sink.span_count(), 0);

    grpc_tls_export(c.ports.grpc, client_config(&ca, client.clone(), ALPN_H2), 3)
        .await
        .expect("gRPC with a client certificate");
    let st = https_post(
        c.ports.http,
        client_config(&ca, client, ALPN_HTTP1),
        &body,
        None,
    )
    .await;
    assert_eq!(st, Ok(200));
    wait_spans(&sink, 5).await;
    let failed = c.metric("tailweave_receiver_tls_handshake_failures_total", &[]);
    assert!(failed >= 4.0, "{}", c.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_receiver_certificate_is_used_for_new_handshakes() {
    let old = Pki::new();
    let sink = Sink::start().await;
    let c = start(&tls_receiver(
        &server_tls_yaml(&old, ", reload_interval: 200ms"),
        &sink,
    ));
    let trusts_old = || client_config(&old.path("ca.pem"), None, ALPN_H2);
    grpc_tls_export(c.ports.grpc, trusts_old(), 1)
        .await
        .expect("the first certificate");

    // Rotate at the same paths to a certificate of a new CA.
    let new = Pki::new();
    for f in ["server.key", "server.pem"] {
        std::fs::copy(new.path(f), old.path(f)).unwrap();
    }
    let trusts_new = || client_config(&new.path("ca.pem"), None, ALPN_H2);
    let port = c.ports.grpc;
    wait_for_async(
        "the new certificate served",
        Duration::from_secs(30),
        || {
            let cfg = trusts_new();
            async move { grpc_tls_export(port, cfg, 1).await.ok() }
        },
    )
    .await;
    assert!(grpc_tls_export(port, trusts_old(), 1).await.is_err());
    // HTTP reloads on its own handshakes.
    let body = request(1).encode_to_vec();
    wait_for_async(
        "HTTPS with the new certificate",
        Duration::from_secs(30),
        || {
            let (cfg, body) = (
                client_config(&new.path("ca.pem"), None, ALPN_HTTP1),
                body.clone(),
            );
            async move { https_post(c.ports.http, cfg, &body, None).await.ok() }
        },
    )
    .await;
    assert!(
        c.metric("tailweave_tls_reloads_total", &[]) >= 2.0,
        "{}",
        c.metrics()
    );
}

#[test]
fn validate_reports_tls_problems_with_their_key_paths() {
    let out = validate_config(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        tls: {key_file: /etc/tailweave/only-a-key.pem}
      http:
        tls: {cert_file: /nonexistent/server.pem, key_file: /nonexistent/server.key}
exporters:
  debug:
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [debug]
"#,
    );
    out.assert_config_error(&[
        "receivers.otlp.protocols.grpc.tls.cert_file",
        "receivers.otlp.protocols.http.tls.cert_file",
        "receivers.otlp.protocols.http.tls.key_file",
        "/nonexistent/server.pem",
    ]);
}

// ---- Per-tenant tokens --------------------------------------------------------------------

/// One resource per entry: its `tenant` claim (none when `None`) and its spans as
/// `(span id, parent id)` (parent 0: a root), all in trace `[0x42; 16]`.
/// A resource's tenant claim and its `(span id, parent id)` pairs.
type ClaimedSpans<'a> = (Option<&'a str>, &'a [(u8, u8)]);

fn tenant_request(resources: &[ClaimedSpans<'_>]) -> ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    ExportTraceServiceRequest {
        resource_spans: resources
            .iter()
            .map(|(claim, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: claim
                        .iter()
                        .map(|t| KeyValue {
                            key: "tenant".into(),
                            value: Some(AnyValue {
                                value: Some(any_value::Value::StringValue(t.to_string())),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: spans
                        .iter()
                        .map(|&(id, parent)| Span {
                            trace_id: vec![0x42; 16],
                            span_id: vec![id; 8],
                            parent_span_id: if parent == 0 {
                                Vec::new()
                            } else {
                                vec![parent; 8]
                            },
                            name: format!("s{id}"),
                            start_time_unix_nano: 1_000,
                            end_time_unix_nano: 2_000,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

async fn grpc_send(
    endpoint: &str,
    token: &str,
    req: ExportTraceServiceRequest,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    grpc_call(endpoint, Some(&format!("Bearer {token}")), req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_cannot_write_another_tenants_spans() {
    let sink = Sink::start().await;
    let yaml = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
      http:
        endpoint: 127.0.0.1:{{HTTP}}
    auth:
      tenants:
        - {{tenant: team-a, token: tok-a}}
        - {{tenant: team-b, token: tok-b}}
      tenant_attribute: tenant
processors:
  join:
    tenant: {{sdk_keys: [tenant], ebpf_keys: [df.universal_tag.pod_ns]}}
    wait: {{min: 100ms, idle: 100ms, max: 1s}}
exporters:
  otlp:
    endpoint: {}
    tls: {{insecure: true}}
{}"#,
        sink.endpoint(),
        service_yaml(&["otlp"], &["join"], &["otlp"])
    );
    let c = start(&yaml);
    let ep = c.grpc_endpoint();

    // Team A's token, spans that claim team B: refused whole, on both transports.
    let b_claim = tenant_request(&[(Some("team-b"), &[(9, 0), (10, 9)])]);
    let st = grpc_send(&ep, "tok-a", b_claim.clone()).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("another tenant"), "{st:?}");
    let (status, _, body) = tokio::task::block_in_place(|| {
        http_request(
            &c.http_addr(),
            "POST",
            "/v1/traces",
            &[
                ("content-type", "application/x-protobuf"),
                ("authorization", "Bearer tok-a"),
            ],
            &b_claim.encode_to_vec(),
        )
        .expect("http")
    });
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));

    // One request with team A's own (unclaimed) resource and a team B one: A's spans pass,
    // B's span is refused and named in the partial success.
    let mixed = tenant_request(&[(None, &[(1, 0), (2, 1)]), (Some("team-b"), &[(3, 1)])]);
    let r = grpc_send(&ep, "tok-a", mixed)
        .await
        .expect("partial success");
    let p = r.partial_success.expect("partial success");
    assert_eq!(p.rejected_spans, 1, "{p:?}");
    assert!(p.error_message.contains("another tenant"), "{p:?}");

    // Team B writes into the same trace id, under span 1 of team A: the join keeps it apart.
    let r = grpc_send(&ep, "tok-b", tenant_request(&[(None, &[(4, 1)])]))
        .await
        .expect("team B's own span");
    assert!(r.partial_success.is_none(), "{r:?}");

    wait_spans(&sink, 3).await;
    let mut got: Vec<(u8, String)> = sink
        .spans()
        .iter()
        .map(|s| {
            let tenant = s
                .resource
                .attributes
                .iter()
                .find(|kv| kv.key == "tenant")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            (s.span.span_id[0], tenant)
        })
        .collect();
    got.sort();
    let t = |n: &str| {
        use opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue;
        format!("{:?}", Some(StringValue(n.to_string())))
    };
    assert_eq!(
        got,
        vec![(1, t("team-a")), (2, t("team-a")), (4, t("team-b"))]
    );
    // One trace id, two tenants: two units out of the join.
    let c2 = &c;
    wait_for_async("two join units", Duration::from_secs(30), || {
        let n = c2.metric("tailweave_join_units_total", &[]);
        async move { (n == 2.0).then_some(()) }
    })
    .await;
    let refused = c.metric(
        "tailweave_receiver_refused_spans_total",
        &[("reason", "tenant_mismatch")],
    );
    assert_eq!(refused, 5.0, "{}", c.metrics());
    let denied = c.metric(
        "tailweave_receiver_requests_total",
        &[("outcome", "permission_denied")],
    );
    assert_eq!(denied, 2.0, "{}", c.metrics());
}

//! Security of the real `tailweave` binary (issue 7): receiver bearer tokens over gRPC and HTTP,
//! and the `otlp` exporter over TLS and mTLS to a destination that uses the receivers' TLS loader
//! (`tailweave_core::tls::ServerTls`). Certificates are made at test time with the `openssl` CLI
//! (the exporter and core tests use `rcgen`; this crate's dependencies are not ours to change).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
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
use tailweave_core::tls::tokio_rustls::server::TlsStream;
use tailweave_core::tls::{ServerTls, ServerTlsSettings, ALPN_H2};
use tailweave_suite::{http_request, wait_for_async, Collector, Ports, Sink};
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
    format!(
        r#"
extensions:
  health_check:
    endpoint: 127.0.0.1:{{HEALTH}}
service:
  extensions: [health_check]
  telemetry:
    metrics:
      address: 127.0.0.1:{{METRICS}}
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [{exporter}]
"#
    )
}

/// gRPC export with an optional `authorization` value; the gRPC code.
async fn grpc_export(endpoint: &str, auth: Option<&str>) -> tonic::Code {
    let mut c = TraceServiceClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    let mut req = tonic::Request::new(request(3));
    if let Some(a) = auth {
        req.metadata_mut()
            .insert("authorization", a.parse().expect("ascii"));
    }
    match c.export(req).await {
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

/// A throwaway CA, a server certificate for `localhost` and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=tailweave test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        for (stem, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
            ),
            (
                "client",
                "subjectAltName=DNS:client\nextendedKeyUsage=clientAuth",
            ),
        ] {
            std::fs::write(d.join(format!("{stem}.ext")), ext).unwrap();
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{stem}.key"),
                "-out",
                &format!("{stem}.csr"),
                "-subj",
                &format!("/CN={stem}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{stem}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{stem}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{stem}.ext"),
            ]);
        }
        Pki { dir }
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
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

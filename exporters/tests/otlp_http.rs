//! The `otlp_http` exporter against a hyper OTLP/HTTP server on 127.0.0.1.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prost::Message;
use tailweave_core::otlp::to_proto_request;
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tailweave_core::SpanBatch;
use tailweave_exporters::otlp_http::OtlpHttpExporterConfig;
use tailweave_exporters::queue::{self, Destination};
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
struct Received {
    path: String,
    content_type: Option<String>,
    encoding: Option<String>,
    authorization: Option<String>,
    req: ExportTraceServiceRequest,
}

/// (status, Retry-After, body)
type Answer = (u16, Option<&'static str>, Vec<u8>);

#[derive(Clone, Default)]
struct Sink {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Sink {
    fn with(script: Vec<Answer>) -> Sink {
        Sink {
            script: Arc::new(Mutex::new(script.into())),
            ..Default::default()
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn handle(
        &self,
        req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
        let (parts, body) = req.into_parts();
        let raw = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let header = |k: &str| {
            parts
                .headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let encoding = header("content-encoding");
        let body = if encoding.as_deref() == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .expect("valid gzip");
            out
        } else {
            raw.to_vec()
        };
        self.received.lock().unwrap().push(Received {
            path: parts.uri.path().to_string(),
            content_type: header("content-type"),
            encoding,
            authorization: header("authorization"),
            req: ExportTraceServiceRequest::decode(&body[..]).expect("protobuf body"),
        });
        let (status, retry_after, body) =
            self.script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or((200, None, Vec::new()));
        let mut resp = hyper::Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf");
        if let Some(r) = retry_after {
            resp = resp.header("retry-after", r);
        }
        Ok(resp.body(Full::new(Bytes::from(body))).unwrap())
    }

    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.serve(listener);
        addr
    }

    /// Serves on `listener`; aborting the returned task closes the listener and every open
    /// connection (they live in its JoinSet), as a crash of the destination would.
    fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let sink = self.clone();
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let sink = sink.clone();
                        async move { sink.handle(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    }
}

fn yaml(addr: SocketAddr, extra: &str) -> String {
    format!(
        "endpoint: http://{addr}\nretry_on_failure: {{initial_interval: 10ms, max_interval: 20ms}}\n{extra}"
    )
}

fn config(addr: SocketAddr, extra: &str) -> OtlpHttpExporterConfig {
    tailweave_core::config::parse(serde_yaml::from_str(&yaml(addr, extra)).unwrap()).unwrap()
}

#[tokio::test]
async fn delivers_gzip_protobuf_with_headers() {
    let sink = Sink::default();
    let addr = sink.start().await;
    let running = common::build(
        "otlphttp",
        &yaml(addr, "headers: {Authorization: Bearer abc}"),
    );
    running
        .input
        .send(SpanBatch::new(common::spans()))
        .await
        .unwrap();
    common::finish(running).await;
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/v1/traces");
    assert_eq!(
        got[0].content_type.as_deref(),
        Some("application/x-protobuf")
    );
    assert_eq!(got[0].encoding.as_deref(), Some("gzip"));
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer abc"));
    assert_eq!(got[0].req, common::request());
}

#[tokio::test]
async fn traces_endpoint_and_no_compression() {
    let sink = Sink::default();
    let addr = sink.start().await;
    let running = common::build(
        "otlp_http",
        &yaml(
            addr,
            &format!("traces_endpoint: http://{addr}/custom/traces\ncompression: none"),
        ),
    );
    running
        .input
        .send(SpanBatch::new(common::spans()))
        .await
        .unwrap();
    common::finish(running).await;
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/custom/traces");
    assert_eq!(got[0].encoding, None);
    assert_eq!(got[0].req, common::request());
}

#[tokio::test]
async fn unavailable_with_retry_after_is_honoured_then_delivered() {
    let sink = Sink::with(vec![(503, Some("1"), b"busy".to_vec())]);
    let addr = sink.start().await;
    let cfg = config(addr, "");
    let dest = cfg.destination("otlp_http/test").unwrap();
    let err = dest.send(&common::spans()).await.unwrap_err();
    assert!(err.retryable, "{err}");
    assert_eq!(err.retry_after, Some(Duration::from_secs(1)));
    assert!(
        err.message.contains("503") && err.message.contains("busy"),
        "{err}"
    );

    sink.script
        .lock()
        .unwrap()
        .push_back((503, Some("1"), Vec::new()));
    let (running, stats) = queue::spawn("otlp_http/test", &cfg.settings(), Arc::new(dest));
    running
        .input
        .send(SpanBatch::new(common::spans()))
        .await
        .unwrap();
    common::finish(running).await;
    assert_eq!(sink.received().len(), 3);
    assert_eq!(stats.retried(), 1);
    assert_eq!(stats.sent(), common::spans().len() as u64);
}

#[tokio::test]
async fn bad_request_is_permanent_and_not_retried() {
    let sink = Sink::with(vec![(400, None, b"malformed".to_vec())]);
    let addr = sink.start().await;
    let cfg = config(addr, "");
    let dest = Arc::new(cfg.destination("otlp_http/test").unwrap());
    let (running, stats) = queue::spawn("otlp_http/test", &cfg.settings(), dest);
    let spans = common::spans();
    running
        .input
        .send(SpanBatch::new(spans.clone()))
        .await
        .unwrap();
    common::finish(running).await;
    assert_eq!(sink.received().len(), 1);
    assert_eq!((stats.failed(), stats.sent()), (spans.len() as u64, 0));
}

#[tokio::test]
async fn partial_success_is_counted() {
    let body = ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans: 3,
            error_message: "3 spans invalid".into(),
        }),
    }
    .encode_to_vec();
    let sink = Sink::with(vec![(200, None, body)]);
    let addr = sink.start().await;
    let cfg = config(addr, "");
    let dest = Arc::new(cfg.destination("otlp_http/test").unwrap());
    let (running, stats) = queue::spawn("otlp_http/test", &cfg.settings(), dest);
    let spans = common::spans();
    running
        .input
        .send(SpanBatch::new(spans.clone()))
        .await
        .unwrap();
    common::finish(running).await;
    assert_eq!((stats.failed(), stats.sent()), (3, spans.len() as u64 - 3));
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let dest = config(addr, "").destination("otlp_http/test").unwrap();
    let err = dest.send(&common::spans()).await.unwrap_err();
    assert!(err.retryable, "{err}");
}

#[tokio::test]
async fn survives_a_destination_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = Sink::default();
    let server = first.serve(listener);
    let cfg = config(addr, "");
    let dest = Arc::new(cfg.destination("otlp_http/test").unwrap());
    let (running, stats) = queue::spawn("otlp_http/test", &cfg.settings(), dest);
    let spans = common::spans();
    running
        .input
        .send(SpanBatch::new(spans[..3].to_vec()))
        .await
        .unwrap();
    common::wait_for("the first delivery", || first.received().len() == 1).await;

    // The pooled keep-alive connection dies with the destination.
    server.abort();
    let _ = server.await;
    running
        .input
        .send(SpanBatch::new(spans[3..].to_vec()))
        .await
        .unwrap();
    common::wait_for("a failed attempt", || stats.retried() >= 2).await;
    let second = Sink::default();
    second.serve(TcpListener::bind(addr).await.unwrap());
    common::finish(running).await;

    assert_eq!(second.received().len(), 1);
    assert_eq!(second.received()[0].req, to_proto_request(&spans[3..]));
    assert_eq!((stats.sent(), stats.failed()), (spans.len() as u64, 0));
}

//! The `otlp` exporter against a real tonic TraceService on 127.0.0.1.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tailweave_core::otlp::to_proto_request;
use tailweave_core::proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tailweave_core::SpanBatch;
use tailweave_exporters::otlp::OtlpExporterConfig;
use tailweave_exporters::queue::{self, Destination};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

#[derive(Clone, Debug)]
struct Received {
    req: ExportTraceServiceRequest,
    encoding: Option<String>,
    authorization: Option<String>,
}

type Answer = Result<ExportTraceServiceResponse, Status>;

#[derive(Clone, Default)]
struct Sink {
    received: Arc<Mutex<Vec<Received>>>,
    /// Answers in order; once empty, every request succeeds.
    script: Arc<Mutex<VecDeque<Answer>>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let md = request.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let rec = Received {
            encoding: get("grpc-encoding"),
            authorization: get("authorization"),
            req: request.into_inner(),
        };
        self.received.lock().unwrap().push(rec);
        let next = self.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| Ok(ExportTraceServiceResponse::default()))
            .map(Response::new)
    }
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
    /// Serves on `listener` until the test ends.
    fn serve(&self, listener: TcpListener) {
        let svc =
            TraceServiceServer::new(self.clone()).accept_compressed(CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
    /// Serves on `listener` until `stop` fires, then closes every connection.
    fn serve_until(
        &self,
        listener: TcpListener,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<()> {
        let svc =
            TraceServiceServer::new(self.clone()).accept_compressed(CompressionEncoding::Gzip);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        })
    }
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.serve(listener);
        addr
    }
}

fn yaml(addr: SocketAddr, extra: &str) -> String {
    format!(
        "endpoint: http://{addr}\nretry_on_failure: {{initial_interval: 20ms, max_interval: 50ms}}\n{extra}"
    )
}

fn config(addr: SocketAddr, extra: &str) -> OtlpExporterConfig {
    tailweave_core::config::parse(serde_yaml::from_str(&yaml(addr, extra)).unwrap()).unwrap()
}

#[tokio::test]
async fn delivers_request_unchanged_gzip_with_headers() {
    let sink = Sink::default();
    let addr = sink.start().await;
    let running = common::build("otlp", &yaml(addr, "headers: {authorization: Bearer t0k}"));
    running
        .input
        .send(SpanBatch::new(common::spans()))
        .await
        .unwrap();
    common::finish(running).await;
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].req, common::request());
    assert_eq!(got[0].encoding.as_deref(), Some("gzip"));
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer t0k"));
}

#[tokio::test]
async fn compression_none_sends_identity() {
    let sink = Sink::default();
    let addr = sink.start().await;
    let running = common::build("otlp", &yaml(addr, "compression: none"));
    let spans = common::spans();
    running
        .input
        .send(SpanBatch::new(spans[..2].to_vec()))
        .await
        .unwrap();
    running
        .input
        .send(SpanBatch::new(spans[2..].to_vec()))
        .await
        .unwrap();
    common::finish(running).await;
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.encoding.is_none()), "{got:?}");
    // Either order (10 consumers); together they are the original spans.
    let mut seen: Vec<_> = got.iter().map(|r| r.req.clone()).collect();
    seen.sort_by_key(|r| r.resource_spans.len());
    assert_eq!(seen[0], to_proto_request(&spans[..2]));
    assert_eq!(seen[1], to_proto_request(&spans[2..]));
}

#[tokio::test]
async fn unavailable_is_retried_then_delivered() {
    let sink = Sink::with(vec![Err(Status::unavailable("warming up"))]);
    let addr = sink.start().await;
    let running = common::build("otlp", &yaml(addr, ""));
    running
        .input
        .send(SpanBatch::new(common::spans()))
        .await
        .unwrap();
    common::finish(running).await;
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.req == common::request()));
}

#[tokio::test]
async fn invalid_argument_is_permanent_and_not_retried() {
    let sink = Sink::with(vec![Err(Status::invalid_argument("bad spans"))]);
    let addr = sink.start().await;
    let cfg = config(addr, "");
    let dest = Arc::new(cfg.destination("otlp/test").unwrap());
    let (running, stats) = queue::spawn("otlp/test", &cfg.settings(), dest);
    let spans = common::spans();
    running
        .input
        .send(SpanBatch::new(spans.clone()))
        .await
        .unwrap();
    common::finish(running).await;
    assert_eq!(sink.received().len(), 1);
    assert_eq!(stats.failed(), spans.len() as u64);
    assert_eq!((stats.sent(), stats.retried()), (0, 0));
}

#[tokio::test]
async fn partial_success_counts_rejected_spans() {
    let sink = Sink::with(vec![Ok(ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans: 2,
            error_message: "2 spans too old".into(),
        }),
    })]);
    let addr = sink.start().await;
    let cfg = config(addr, "");
    let dest = cfg.destination("otlp/test").unwrap();
    let spans = common::spans();
    let acc = dest.send(&spans).await.unwrap();
    assert_eq!(acc.rejected, 2);
    assert_eq!(acc.message.as_deref(), Some("2 spans too old"));

    sink.script
        .lock()
        .unwrap()
        .push_back(Ok(ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 1,
                error_message: String::new(),
            }),
        }));
    let (running, stats) = queue::spawn("otlp/test", &cfg.settings(), Arc::new(dest));
    running
        .input
        .send(SpanBatch::new(spans.clone()))
        .await
        .unwrap();
    common::finish(running).await;
    assert_eq!(stats.failed(), 1);
    assert_eq!(stats.sent(), spans.len() as u64 - 1);
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let dest = config(addr, "").destination("otlp/test").unwrap();
    let err = dest.send(&common::spans()).await.unwrap_err();
    assert!(err.retryable, "{err}");
}

#[tokio::test]
async fn reconnects_when_the_destination_comes_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let cfg = config(addr, "");
    let dest = Arc::new(cfg.destination("otlp/test").unwrap());
    let (running, stats) = queue::spawn("otlp/test", &cfg.settings(), dest);
    running
        .input
        .send(SpanBatch::new(common::spans()))
        .await
        .unwrap();
    common::wait_for("a failed attempt", || stats.retried() >= 2).await;

    let sink = Sink::default();
    sink.serve(TcpListener::bind(addr).await.unwrap());
    common::finish(running).await;
    assert_eq!(stats.sent(), common::spans().len() as u64);
    assert_eq!(sink.received().len(), 1);
    assert_eq!(sink.received()[0].req, common::request());
}

#[tokio::test]
async fn survives_a_destination_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = Sink::default();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let server = first.serve_until(listener, stopped);
    let cfg = config(addr, "");
    let dest = Arc::new(cfg.destination("otlp/test").unwrap());
    let (running, stats) = queue::spawn("otlp/test", &cfg.settings(), dest);
    let spans = common::spans();
    running
        .input
        .send(SpanBatch::new(spans[..3].to_vec()))
        .await
        .unwrap();
    common::wait_for("the first delivery", || first.received().len() == 1).await;

    // The destination goes away with the connection established, then comes back.
    stop.send(()).unwrap();
    server.await.unwrap();
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
    assert_eq!(stats.sent(), spans.len() as u64);
    assert_eq!(stats.failed(), 0);
}

/// The google.rpc messages a server uses to ask for a delay (written here as a receiver would).
mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<Duration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

#[tokio::test]
async fn retry_info_from_the_server_sets_retry_after() {
    use prost::Message;
    let info = rpc::RetryInfo {
        retry_delay: Some(rpc::Duration {
            seconds: 1,
            nanos: 500_000_000,
        }),
    };
    let details = rpc::Status {
        code: tonic::Code::ResourceExhausted as i32,
        message: "pipeline is full".into(),
        details: vec![rpc::Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
            value: info.encode_to_vec(),
        }],
    };
    let status = Status::with_details(
        tonic::Code::ResourceExhausted,
        "pipeline is full",
        details.encode_to_vec().into(),
    );
    let sink = Sink::with(vec![Err(status)]);
    let addr = sink.start().await;
    let dest = config(addr, "").destination("otlp/test").unwrap();
    let err = dest.send(&common::spans()).await.unwrap_err();
    assert!(err.retryable, "{err}");
    assert_eq!(
        err.retry_after,
        Some(std::time::Duration::from_millis(1500))
    );
    assert!(err.message.contains("pipeline is full"), "{err}");
}

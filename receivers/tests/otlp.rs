//! The `otlp` and `deepflow` receivers over loopback: a tonic client (the generated
//! `TraceServiceClient`, plus a raw-bytes client for bad input) and a hyper client.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use prost::Message;
use tailweave_core::config::{parse, BuildContext};
use tailweave_core::limiter::MemoryLimiter;
use tailweave_core::names;
use tailweave_core::proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tailweave_core::proto::tonic::common::v1::{
    any_value, AnyValue, InstrumentationScope, KeyValue,
};
use tailweave_core::proto::tonic::resource::v1::Resource;
use tailweave_core::proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as PS};
use tailweave_core::{Consumer, SpanBatch, SpanSource};
use tailweave_receivers::deepflow::DeepflowReceiverConfig;
use tailweave_receivers::otlp::rpc::{RetryInfo, RpcStatus};
use tailweave_receivers::otlp::{OtlpReceiver, OtlpReceiverConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

// ---------- helpers ----------

fn snapshotter() -> &'static Snapshotter {
    static S: OnceLock<Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let r = DebuggingRecorder::new();
        let s = r.snapshotter();
        r.install()
            .expect("only this test binary installs a recorder");
        s
    })
}

/// Counter values seen so far: a snapshot resets the recorder's counters, and tests run in
/// parallel, so every reader folds what it takes into this one map.
fn seen() -> &'static Mutex<HashMap<metrics_util::CompositeKey, u64>> {
    static M: OnceLock<Mutex<HashMap<metrics_util::CompositeKey, u64>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The sum of counter `name` over series whose labels include all of `labels`. Each test uses
/// its own receiver id, so its series are its own.
fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut seen = seen().lock().unwrap();
    for (k, _, _, v) in snapshotter().snapshot().into_vec() {
        if let DebugValue::Counter(n) = v {
            *seen.entry(k).or_default() += n;
        }
    }
    seen.iter()
        .filter(|(k, _)| {
            let key = k.key();
            key.name() == name
                && labels
                    .iter()
                    .all(|(l, v)| key.labels().any(|x| x.key() == *l && x.value() == *v))
        })
        .map(|(_, n)| *n)
        .sum()
}

struct Running {
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
    rx: Rx,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tailweave_core::ComponentError>>,
}

/// What the receiver handed on, as the test reads it (see [`start_receiver_as`]).
enum Rx {
    Stage(mpsc::UnboundedReceiver<SpanBatch>),
    Raw(mpsc::Receiver<SpanBatch>),
}

impl Rx {
    async fn recv(&mut self) -> Option<SpanBatch> {
        match self {
            Rx::Stage(r) => r.recv().await,
            Rx::Raw(r) => r.recv().await,
        }
    }
    fn try_recv(&mut self) -> Result<SpanBatch, mpsc::error::TryRecvError> {
        match self {
            Rx::Stage(r) => r.try_recv(),
            Rx::Raw(r) => r.try_recv(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Rx::Stage(r) => r.len(),
            Rx::Raw(r) => r.len(),
        }
    }
}

impl Running {
    async fn stop(self) -> Rx {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("receiver stops")
            .expect("task")
            .expect("receiver ran");
        self.rx
    }
}

fn start_receiver(r: OtlpReceiver, cap: usize, limiter: Option<Arc<MemoryLimiter>>) -> Running {
    start_receiver_as(r, cap, limiter, true)
}

/// With `stage`, a task plays the pipeline's first stage: a request is answered once a stage
/// took its batch (end-to-end acknowledgement), and this task takes each batch at once (letting
/// its acks go) and hands it to the test through a channel of `cap`. Without, the test reads the
/// receiver's own channel of `cap` and a request is answered when the test drops its batch.
fn start_receiver_as(
    r: OtlpReceiver,
    cap: usize,
    limiter: Option<Arc<MemoryLimiter>>,
    stage: bool,
) -> Running {
    // The recorder must be in place before the first request is counted.
    snapshotter();
    let (tx, rx) = if stage {
        let (tx, mut taken) = mpsc::channel::<SpanBatch>(cap);
        let (to_test, rx) = mpsc::unbounded_channel::<SpanBatch>();
        tokio::spawn(async move {
            while let Some(mut b) = taken.recv().await {
                b.acks.clear();
                if to_test.send(b).is_err() {
                    break;
                }
            }
        });
        (tx, Rx::Stage(rx))
    } else {
        let (tx, rx) = mpsc::channel(cap);
        (tx, Rx::Raw(rx))
    };
    let shutdown = CancellationToken::new();
    let grpc = r.grpc_addr();
    let http = r.http_addr();
    assert_eq!(
        r.local_addrs().len(),
        grpc.iter().count() + http.iter().count()
    );
    let task = tokio::spawn(r.serve(Consumer::new(vec![tx], limiter), shutdown.clone()));
    Running {
        grpc,
        http,
        rx,
        shutdown,
        task,
    }
}

async fn start_with(
    id: &str,
    yaml: &str,
    cap: usize,
    limiter: Option<Arc<MemoryLimiter>>,
) -> Running {
    let cfg: OtlpReceiverConfig = parse(serde_yaml::from_str(yaml).unwrap()).unwrap();
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let ctx = BuildContext {
        id: id.into(),
        ..Default::default()
    };
    start_receiver(cfg.bind(&ctx).await.unwrap(), cap, limiter)
}

const BOTH: &str = "protocols: {grpc: {endpoint: '127.0.0.1:0'}, http: {endpoint: '127.0.0.1:0'}}";

async fn start(id: &str, cap: usize) -> Running {
    start_with(id, BOTH, cap, None).await
}

/// A receiver whose channel of `cap` the test reads itself (no stage in between).
async fn start_raw(id: &str, cap: usize) -> Running {
    let cfg: OtlpReceiverConfig = parse(serde_yaml::from_str(BOTH).unwrap()).unwrap();
    let ctx = BuildContext {
        id: id.into(),
        ..Default::default()
    };
    start_receiver_as(cfg.bind(&ctx).await.unwrap(), cap, None, false)
}

/// Waits until `n` batches sit in the receiver's channel.
async fn queued(r: &Running, n: usize) {
    for _ in 0..1000 {
        if r.rx.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} batch(es) never reached the receiver's channel");
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn span(t: u8, s: u8) -> PS {
    PS {
        trace_id: vec![t; 16],
        span_id: vec![s; 8],
        parent_span_id: if s > 1 { vec![1; 8] } else { vec![] },
        name: format!("span-{s}"),
        kind: 2,
        start_time_unix_nano: 1_700_000_000_000_000_000 + s as u64,
        end_time_unix_nano: 1_700_000_000_500_000_000,
        attributes: vec![
            kv("http.method", any_value::Value::StringValue("GET".into())),
            kv("http.status_code", any_value::Value::IntValue(200)),
            kv("ok", any_value::Value::BoolValue(true)),
        ],
        ..Default::default()
    }
}

fn request(spans: Vec<PS>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue("login".into()),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "test".into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Checks the batch holds exactly `expected`, each span's bytes as sent.
fn assert_delivered(batch: &SpanBatch, expected: &[PS]) {
    assert_eq!(batch.spans.len(), expected.len());
    for (got, want) in batch.spans.iter().zip(expected) {
        assert_eq!(got.raw, Bytes::from(want.encode_to_vec()));
        assert_eq!(got.decode().unwrap(), *want);
    }
    assert_eq!(batch.spans[0].resource().service_name(), Some("login"));
}

async fn grpc_client(addr: SocketAddr) -> TraceServiceClient<tonic::transport::Channel> {
    TraceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Sends arbitrary bytes as the Export message.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEnc;
struct RespDec;
impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEnc;
    type Decoder = RespDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RespDec {
        RespDec
    }
}
impl Encoder for RawEnc {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for RespDec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        let b = src.copy_to_bytes(src.remaining());
        ExportTraceServiceResponse::decode(b)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

async fn grpc_raw(
    addr: SocketAddr,
    body: Bytes,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    g.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        ),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

struct HttpReply {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn http_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> HttpReply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    HttpReply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

const PB: (&str, &str) = ("content-type", "application/x-protobuf");
const JSON: (&str, &str) = ("content-type", "application/json");

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

// ---------- gRPC ----------

#[tokio::test]
async fn grpc_good_request_delivered_unchanged() {
    let mut r = start("otlp/grpc_good", 8).await;
    let spans = vec![span(7, 1), span(7, 2), span(7, 3)];
    let resp = grpc_client(r.grpc.unwrap())
        .await
        .export(request(spans.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.partial_success, None);
    let batch = r.rx.recv().await.unwrap();
    assert_delivered(&batch, &spans);
    assert!(!batch.whole);
    let l = [("receiver", "otlp/grpc_good"), ("transport", "grpc")];
    assert_eq!(counter(names::RECEIVER_ACCEPTED_SPANS, &l), 3);
    r.stop().await;
}

#[tokio::test]
async fn grpc_gzip_request() {
    let mut r = start("otlp/grpc_gzip", 8).await;
    let spans = vec![span(3, 1), span(3, 2)];
    grpc_client(r.grpc.unwrap())
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip)
        .export(request(spans.clone()))
        .await
        .unwrap();
    assert_delivered(&r.rx.recv().await.unwrap(), &spans);
    r.stop().await;
}

#[tokio::test]
async fn grpc_invalid_ids_partial_success() {
    let mut r = start("otlp/grpc_partial", 8).await;
    let mut zero_trace = span(0, 5);
    zero_trace.trace_id = vec![0; 16];
    let mut short_span = span(4, 6);
    short_span.span_id = vec![1, 2, 3];
    let good = vec![span(4, 1), span(4, 2)];
    let resp = grpc_client(r.grpc.unwrap())
        .await
        .export(request(vec![
            good[0].clone(),
            zero_trace,
            short_span,
            good[1].clone(),
        ]))
        .await
        .unwrap()
        .into_inner();
    let ps = resp.partial_success.expect("partial success");
    assert_eq!(ps.rejected_spans, 2);
    assert!(
        ps.error_message.contains("invalid_trace_id"),
        "{}",
        ps.error_message
    );
    assert!(
        ps.error_message.contains("invalid_span_id"),
        "{}",
        ps.error_message
    );
    assert_delivered(&r.rx.recv().await.unwrap(), &good);
    let l = [
        ("receiver", "otlp/grpc_partial"),
        ("reason", "invalid_trace_id"),
    ];
    assert_eq!(counter(names::RECEIVER_REFUSED_SPANS, &l), 1);
    r.stop().await;
}

#[tokio::test]
async fn grpc_malformed_is_invalid_argument_and_next_is_served() {
    let mut r = start("otlp/grpc_bad", 8).await;
    let addr = r.grpc.unwrap();
    let e = grpc_raw(
        addr,
        Bytes::from_static(b"\x0a\xff\xff\xff\xff\x0fnot protobuf"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("malformed"), "{}", e.message());
    let full = request(vec![span(9, 1)]).encode_to_vec();
    let e = grpc_raw(addr, Bytes::copy_from_slice(&full[..full.len() - 4]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A whole ResourceSpans followed by a cut one: refused whole, both spans counted.
    let mut two = request(vec![span(9, 2)]).encode_to_vec();
    two.extend_from_slice(&full[..full.len() - 4]);
    let e = grpc_raw(addr, Bytes::from(two)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let l = [
        ("receiver", "otlp/grpc_bad"),
        ("reason", "malformed_request"),
    ];
    // The cut span alone, then the whole one and the cut one; garbage shows none.
    assert_eq!(counter(names::RECEIVER_REFUSED_SPANS, &l), 1 + 2);
    assert!(r.rx.try_recv().is_err());
    // The same bytes whole are fine, on a new connection and the same server.
    let resp = grpc_raw(addr, Bytes::from(full)).await.unwrap();
    assert_eq!(resp.partial_success, None);
    assert_delivered(&r.rx.recv().await.unwrap(), &[span(9, 1)]);
    let l = [
        ("receiver", "otlp/grpc_bad"),
        ("outcome", "malformed_request"),
    ];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 3);
    r.stop().await;
}

#[tokio::test]
async fn grpc_over_max_message_size_is_refused() {
    let mut r = start_with(
        "otlp/grpc_big",
        "protocols: {grpc: {endpoint: '127.0.0.1:0', max_recv_msg_size_mib: 1}}",
        8,
        None,
    )
    .await;
    let mut big = span(2, 1);
    big.name = "x".repeat(1024 * 1024 + 10);
    let e = grpc_client(r.grpc.unwrap())
        .await
        .export(request(vec![big]))
        .await
        .unwrap_err();
    // As grpc-go answers: RESOURCE_EXHAUSTED without RetryInfo, which OTLP clients do not retry.
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("too large"), "{}", e.message());
    assert!(e.details().is_empty());
    // Small on the wire, too large once inflated.
    let mut bomb = span(2, 1);
    bomb.name = "x".repeat(2 * 1024 * 1024);
    let e = grpc_client(r.grpc.unwrap())
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .export(request(vec![bomb]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(r.rx.try_recv().is_err());
    let l = [("receiver", "otlp/grpc_big"), ("outcome", "too_large")];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 2);
    grpc_client(r.grpc.unwrap())
        .await
        .export(request(vec![span(2, 1)]))
        .await
        .unwrap();
    assert_eq!(r.rx.recv().await.unwrap().spans.len(), 1);
    r.stop().await;
}

#[tokio::test]
async fn grpc_full_pipeline_is_unavailable_and_counted() {
    let mut r = start_raw("otlp/grpc_full", 1).await;
    let mut c = grpc_client(r.grpc.unwrap()).await;
    // The first request is in the pipeline's channel, its client waiting for a stage to take it.
    let first = tokio::spawn({
        let mut c = c.clone();
        async move { c.export(request(vec![span(1, 1)])).await }
    });
    queued(&r, 1).await;
    let e = c
        .export(request(vec![span(1, 2), span(1, 3)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let details = RpcStatus::decode(e.details()).unwrap();
    let info = RetryInfo::decode(details.details[0].value.as_slice()).unwrap();
    assert_eq!(info.retry_delay.unwrap().seconds, 1);
    let l = [("receiver", "otlp/grpc_full"), ("reason", "pipeline_full")];
    assert_eq!(counter(names::RECEIVER_REFUSED_SPANS, &l), 2);
    // A stage takes the first batch (its client is answered), and the retry now succeeds.
    assert_delivered(&r.rx.recv().await.unwrap(), &[span(1, 1)]);
    first.await.unwrap().unwrap();
    let retry = tokio::spawn(async move { c.export(request(vec![span(1, 2), span(1, 3)])).await });
    assert_eq!(r.rx.recv().await.unwrap().spans.len(), 2);
    retry.await.unwrap().unwrap();
    r.stop().await;
}

#[tokio::test]
async fn grpc_memory_limit_is_resource_exhausted() {
    let limiter = Arc::new(MemoryLimiter::new(1000, 0));
    limiter.observe(2000);
    let r = start_with("otlp/grpc_mem", BOTH, 8, Some(limiter.clone())).await;
    let e = grpc_client(r.grpc.unwrap())
        .await
        .export(request(vec![span(1, 1)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let reply = http_send(
        r.http.unwrap(),
        "POST",
        "/v1/traces",
        &[PB],
        request(vec![span(1, 1)]).encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::TOO_MANY_REQUESTS);
    assert!(reply.headers.contains_key("retry-after"));
    let l = [("receiver", "otlp/grpc_mem"), ("reason", "memory_limit")];
    assert_eq!(counter(names::RECEIVER_REFUSED_SPANS, &l), 2);
    r.stop().await;
}

// ---------- HTTP ----------

#[tokio::test]
async fn http_protobuf_delivered_and_answered_in_protobuf() {
    let mut r = start("otlp/http_pb", 8).await;
    let spans = vec![span(5, 1), span(5, 2)];
    let reply = http_send(
        r.http.unwrap(),
        "POST",
        "/v1/traces",
        &[PB],
        request(spans.clone()).encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/x-protobuf");
    let resp = ExportTraceServiceResponse::decode(reply.body).unwrap();
    assert_eq!(resp.partial_success, None);
    assert_delivered(&r.rx.recv().await.unwrap(), &spans);
    let l = [("receiver", "otlp/http_pb"), ("transport", "http")];
    assert_eq!(counter(names::RECEIVER_ACCEPTED_SPANS, &l), 2);
    r.stop().await;
}

#[tokio::test]
async fn http2_cleartext_is_served_too() {
    let mut r = start("otlp/http2", 8).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{}/v1/traces", r.http.unwrap()))
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(
            request(vec![span(4, 4)]).encode_to_vec(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_delivered(&r.rx.recv().await.unwrap(), &[span(4, 4)]);
    r.stop().await;
}

#[tokio::test]
async fn http_gzip_protobuf() {
    let mut r = start("otlp/http_gzip", 8).await;
    let spans = vec![span(6, 1)];
    let reply = http_send(
        r.http.unwrap(),
        "POST",
        "/v1/traces",
        &[PB, ("content-encoding", "gzip")],
        gzip(&request(spans.clone()).encode_to_vec()),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_delivered(&r.rx.recv().await.unwrap(), &spans);
    r.stop().await;
}

#[tokio::test]
async fn http_json_hex_ids_and_int_enums() {
    let mut r = start("otlp/http_json", 8).await;
    let body = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"login"}}]},
      "scopeSpans":[{"scope":{"name":"test"},"spans":[
        {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","parentSpanId":"eee19b7ec3c1b173",
         "name":"GET /login","kind":2,"startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000",
         "attributes":[{"key":"http.status_code","value":{"intValue":"200"}}],"status":{"code":2,"message":"boom"}},
        {"traceId":"00000000000000000000000000000000","spanId":"eee19b7ec3c1b175","name":"bad"}
      ]}]}]}"#;
    let reply = http_send(
        r.http.unwrap(),
        "POST",
        "/v1/traces",
        &[("content-type", "application/json; charset=utf-8")],
        body,
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let ps = &v["partialSuccess"];
    assert_eq!(ps["rejectedSpans"], "1", "{v}");
    assert!(ps["errorMessage"]
        .as_str()
        .unwrap()
        .contains("invalid_trace_id"));
    let batch = r.rx.recv().await.unwrap();
    assert_eq!(batch.spans.len(), 1);
    let s = &batch.spans[0];
    assert_eq!(s.trace_id.to_hex(), "5b8efff798038103d269b633813fc60c");
    assert_eq!(s.span_id.to_hex(), "eee19b7ec3c1b174");
    assert_eq!(s.parent_span_id.to_hex(), "eee19b7ec3c1b173");
    assert_eq!(s.start_ns, 1_544_712_660_000_000_000);
    assert_eq!(s.kind, tailweave_core::SpanKind::Server);
    assert_eq!(s.status, tailweave_core::StatusCode::Error);
    assert_eq!(s.name(), "GET /login");
    // All good: the empty response, `{}`.
    let good = serde_json::to_vec(&request(vec![span(2, 1)])).unwrap();
    let reply = http_send(r.http.unwrap(), "POST", "/v1/traces", &[JSON], good).await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(&reply.body[..], b"{}");
    assert_delivered(&r.rx.recv().await.unwrap(), &[span(2, 1)]);
    r.stop().await;
}

#[tokio::test]
async fn http_invalid_ids_partial_success_in_protobuf() {
    let mut r = start("otlp/http_partial", 8).await;
    let mut bad = span(8, 3);
    bad.span_id = vec![0; 8];
    let reply = http_send(
        r.http.unwrap(),
        "POST",
        "/v1/traces",
        &[PB],
        request(vec![span(8, 1), bad]).encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    let ps = ExportTraceServiceResponse::decode(reply.body)
        .unwrap()
        .partial_success
        .unwrap();
    assert_eq!(ps.rejected_spans, 1);
    assert_delivered(&r.rx.recv().await.unwrap(), &[span(8, 1)]);
    r.stop().await;
}

#[tokio::test]
async fn http_bad_bodies_are_400_and_next_is_served() {
    let mut r = start("otlp/http_bad", 8).await;
    let addr = r.http.unwrap();
    let reply = http_send(addr, "POST", "/v1/traces", &[PB], "not protobuf at all!").await;
    assert_eq!(reply.status, http::StatusCode::BAD_REQUEST);
    let st = RpcStatus::decode(reply.body).unwrap();
    assert_eq!(st.code, Code::InvalidArgument as i32);
    assert!(st.message.contains("malformed"), "{}", st.message);

    let full = request(vec![span(1, 1)]).encode_to_vec();
    let reply = http_send(
        addr,
        "POST",
        "/v1/traces",
        &[PB],
        full[..full.len() - 5].to_vec(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::BAD_REQUEST);

    let reply = http_send(addr, "POST", "/v1/traces", &[JSON], "{\"resourceSpans\": [").await;
    assert_eq!(reply.status, http::StatusCode::BAD_REQUEST);
    assert_eq!(reply.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["code"], 3);
    assert!(v["message"].as_str().unwrap().contains("JSON"), "{v}");

    let reply = http_send(
        addr,
        "POST",
        "/v1/traces",
        &[PB, ("content-encoding", "gzip")],
        "not gzip",
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::BAD_REQUEST);
    assert!(RpcStatus::decode(reply.body)
        .unwrap()
        .message
        .contains("gzip"));

    assert!(r.rx.try_recv().is_err());
    let reply = http_send(addr, "POST", "/v1/traces", &[PB], full).await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(r.rx.recv().await.unwrap().spans.len(), 1);
    let l = [
        ("receiver", "otlp/http_bad"),
        ("outcome", "malformed_request"),
    ];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 4);
    r.stop().await;
}

#[tokio::test]
async fn http_wrong_type_method_path() {
    let r = start_with(
        "otlp/http_wrong",
        "protocols: {http: {endpoint: '127.0.0.1:0', traces_url_path: /custom/traces}}",
        8,
        None,
    )
    .await;
    let addr = r.http.unwrap();
    let body = request(vec![span(1, 1)]).encode_to_vec();
    let reply = http_send(
        addr,
        "POST",
        "/custom/traces",
        &[("content-type", "text/plain")],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let reply = http_send(addr, "POST", "/custom/traces", &[], body.clone()).await;
    assert_eq!(reply.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let reply = http_send(
        addr,
        "POST",
        "/custom/traces",
        &[PB, ("content-encoding", "br")],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let reply = http_send(addr, "GET", "/custom/traces", &[], "").await;
    assert_eq!(reply.status, http::StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "POST");
    let reply = http_send(addr, "POST", "/v1/traces", &[PB], body.clone()).await;
    assert_eq!(reply.status, http::StatusCode::NOT_FOUND);
    let reply = http_send(addr, "POST", "/custom/traces", &[PB], body).await;
    assert_eq!(reply.status, http::StatusCode::OK);
    let l = [
        ("receiver", "otlp/http_wrong"),
        ("outcome", "unsupported_media_type"),
    ];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 3);
    let mut rx = r.stop().await;
    assert_eq!(rx.recv().await.unwrap().spans.len(), 1);
    assert!(rx.recv().await.is_none(), "nothing else was delivered");
}

#[tokio::test]
async fn http_oversize_is_413() {
    let mut r = start_with(
        "otlp/http_big",
        "protocols: {http: {endpoint: '127.0.0.1:0', max_request_body_size: 2000}}",
        8,
        None,
    )
    .await;
    let addr = r.http.unwrap();
    let mut big = span(1, 1);
    big.name = "n".repeat(3000);
    let raw = request(vec![big]).encode_to_vec();
    let reply = http_send(addr, "POST", "/v1/traces", &[PB], raw.clone()).await;
    assert_eq!(reply.status, http::StatusCode::PAYLOAD_TOO_LARGE);
    // Small when compressed, too big once inflated.
    let z = gzip(&raw);
    assert!(z.len() < 2000);
    let reply = http_send(
        addr,
        "POST",
        "/v1/traces",
        &[PB, ("content-encoding", "gzip")],
        z,
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.rx.try_recv().is_err());
    let reply = http_send(
        addr,
        "POST",
        "/v1/traces",
        &[PB],
        request(vec![span(1, 1)]).encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    let l = [("receiver", "otlp/http_big"), ("outcome", "too_large")];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 2);
    r.stop().await;
}

#[tokio::test]
async fn http_big_oversize_bodies_are_413_declared_or_chunked() {
    let r = start_with(
        "otlp/http_huge",
        "protocols: {http: {endpoint: '127.0.0.1:0', max_request_body_size: 1048576}}",
        8,
        None,
    )
    .await;
    let addr = r.http.unwrap();
    // Declared too large: refused from the head, body read and thrown away.
    let reply = http_send(addr, "POST", "/v1/traces", &[PB], vec![0u8; 8 << 20]).await;
    assert_eq!(reply.status, http::StatusCode::PAYLOAD_TOO_LARGE);
    // Undeclared (chunked) and too large: refused while reading.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'a'; 512 * 1024];
    for _ in 0..6 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut head = vec![0u8; 64];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let l = [("receiver", "otlp/http_huge"), ("outcome", "too_large")];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 2);
    let mut rx = r.stop().await;
    assert!(rx.recv().await.is_none());
}

#[tokio::test]
async fn http_full_pipeline_is_503_with_retry_after() {
    let mut r = start_raw("otlp/http_full", 1).await;
    let addr = r.http.unwrap();
    let body = request(vec![span(1, 1)]).encode_to_vec();
    // The first request waits in the pipeline's channel for a stage to take it.
    let first = tokio::spawn({
        let body = body.clone();
        async move {
            http_send(addr, "POST", "/v1/traces", &[PB], body)
                .await
                .status
        }
    });
    queued(&r, 1).await;
    let reply = http_send(
        addr,
        "POST",
        "/v1/traces",
        &[JSON],
        serde_json::to_vec(&request(vec![span(1, 2)])).unwrap(),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["code"], Code::Unavailable as i32);
    let l = [("receiver", "otlp/http_full"), ("reason", "pipeline_full")];
    assert_eq!(counter(names::RECEIVER_REFUSED_SPANS, &l), 1);
    r.rx.recv().await.unwrap();
    assert_eq!(first.await.unwrap(), 200);
    let retry = tokio::spawn(async move {
        http_send(addr, "POST", "/v1/traces", &[PB], body)
            .await
            .status
    });
    r.rx.recv().await.unwrap();
    assert_eq!(retry.await.unwrap(), 200);
    r.stop().await;
}

// ---------- classification ----------

#[tokio::test]
async fn deepflow_receiver_marks_every_span_ebpf() {
    let cfg: DeepflowReceiverConfig = parse(serde_yaml::from_str(BOTH).unwrap()).unwrap();
    let ctx = BuildContext {
        id: "deepflow".into(),
        ..Default::default()
    };
    let mut r = start_receiver(cfg.bind(&ctx).await.unwrap(), 8, None);
    let mut s = span(1, 1);
    s.attributes.push(kv(
        "df.span.type",
        any_value::Value::StringValue("session".into()),
    ));
    grpc_client(r.grpc.unwrap())
        .await
        .export(request(vec![s.clone()]))
        .await
        .unwrap();
    let b = r.rx.recv().await.unwrap();
    assert_eq!(b.spans[0].source, SpanSource::Ebpf);
    let reply = http_send(
        r.http.unwrap(),
        "POST",
        "/v1/traces",
        &[PB],
        request(vec![s]).encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(r.rx.recv().await.unwrap().spans[0].source, SpanSource::Ebpf);
    r.stop().await;
}

#[tokio::test]
async fn otlp_classifies_by_markers_unless_source_sdk() {
    let mut deepflow_row = span(1, 2);
    deepflow_row.attributes.push(kv(
        "df.span.type",
        any_value::Value::StringValue("session".into()),
    ));
    let body = request(vec![span(1, 1), deepflow_row]).encode_to_vec();

    let mut r = start("otlp/classify", 8).await;
    let reply = http_send(r.http.unwrap(), "POST", "/v1/traces", &[PB], body.clone()).await;
    assert_eq!(reply.status, 200);
    let b = r.rx.recv().await.unwrap();
    assert_eq!(b.spans[0].source, SpanSource::Sdk);
    assert_eq!(b.spans[1].source, SpanSource::Ebpf);
    r.stop().await;

    let sdk = "protocols: {http: {endpoint: '127.0.0.1:0'}}\nsource: sdk";
    let mut r = start_with("otlp/classify_sdk", sdk, 8, None).await;
    let reply = http_send(r.http.unwrap(), "POST", "/v1/traces", &[PB], body).await;
    assert_eq!(reply.status, 200);
    let b = r.rx.recv().await.unwrap();
    assert!(b
        .spans
        .iter()
        .all(|s| s.source == SpanSource::Sdk && s.ebpf.is_none()));
    r.stop().await;
}

// ---------- lifecycle ----------

#[tokio::test]
async fn shutdown_stops_accepting() {
    let r = start("otlp/shutdown", 8).await;
    let (g, h) = (r.grpc.unwrap(), r.http.unwrap());
    // An idle keep-alive HTTP connection and an idle gRPC channel must not hold shutdown up.
    let _idle = tokio::net::TcpStream::connect(h).await.unwrap();
    let mut c = grpc_client(g).await;
    c.export(request(vec![span(1, 1)])).await.unwrap();
    let mut rx = r.stop().await;
    assert!(tokio::net::TcpStream::connect(g).await.is_err());
    assert!(tokio::net::TcpStream::connect(h).await.is_err());
    assert_eq!(rx.recv().await.unwrap().spans.len(), 1);
}

#[tokio::test]
async fn shutdown_lets_in_flight_http_request_finish() {
    let r = start("otlp/inflight", 8).await;
    let body = request(vec![span(1, 1)]).encode_to_vec();
    let mut s = tokio::net::TcpStream::connect(r.http.unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The 100 Continue proves the handler is reading the body: the request is in flight.
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .contains("100 Continue"));
    r.shutdown.cancel();
    assert!(!r.task.is_finished());
    s.write_all(&body).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    tokio::time::timeout(Duration::from_secs(10), r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut rx = r.rx;
    assert_eq!(rx.recv().await.unwrap().spans.len(), 1);
}

#[tokio::test]
async fn dropping_an_unstarted_receiver_frees_its_ports() {
    let cfg: OtlpReceiverConfig = parse(serde_yaml::from_str(BOTH).unwrap()).unwrap();
    let ctx = BuildContext {
        id: "otlp/unstarted".into(),
        ..Default::default()
    };
    let r = cfg.bind(&ctx).await.unwrap();
    let (g, h) = (r.grpc_addr().unwrap(), r.http_addr().unwrap());
    let yaml = format!("protocols: {{grpc: {{endpoint: '{g}'}}, http: {{endpoint: '{h}'}}}}");
    let again: OtlpReceiverConfig = parse(serde_yaml::from_str(&yaml).unwrap()).unwrap();
    assert!(
        again.bind(&ctx).await.is_err(),
        "ports are held while bound"
    );
    drop(r);
    let r = again.bind(&ctx).await.unwrap();
    assert_eq!(r.local_addrs(), vec![g, h]);
}

#[tokio::test]
async fn concurrent_clients_lose_nothing() {
    let r = start("otlp/concurrent", 1024).await;
    let (g, h) = (r.grpc.unwrap(), r.http.unwrap());
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        tasks.push(tokio::spawn(async move {
            let mut c = grpc_client(g).await;
            for i in 0..25u8 {
                c.export(request(vec![span(t + 1, i + 1), span(t + 1, i + 101)]))
                    .await
                    .unwrap();
            }
        }));
        tasks.push(tokio::spawn(async move {
            for i in 0..25u8 {
                let body = request(vec![span(t + 11, i + 1)]).encode_to_vec();
                let reply = http_send(h, "POST", "/v1/traces", &[PB], body).await;
                assert_eq!(reply.status, http::StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut rx = r.stop().await;
    let mut spans = 0;
    while let Some(b) = rx.recv().await {
        spans += b.spans.len();
    }
    assert_eq!(spans, 4 * 25 * 2 + 4 * 25);
    let l = [("receiver", "otlp/concurrent")];
    assert_eq!(counter(names::RECEIVER_ACCEPTED_SPANS, &l), spans as u64);
}

// ---------- auth ----------

#[tokio::test]
async fn bearer_token_required_when_configured() {
    let dir = std::env::temp_dir().join(format!("tailweave-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "# team tokens\n\nfrom-file\n").unwrap();
    let yaml = format!(
        "{BOTH}\nauth: {{bearer_tokens: [inline-token], bearer_tokens_file: '{}'}}",
        file.display()
    );
    let mut r = start_with("otlp/auth", &yaml, 8, None).await;
    let body = request(vec![span(1, 1)]).encode_to_vec();
    let http = r.http.unwrap();

    let reply = http_send(http, "POST", "/v1/traces", &[PB], body.clone()).await;
    assert_eq!(reply.status, http::StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    let wrong = ("authorization", "Bearer nope");
    let reply = http_send(http, "POST", "/v1/traces", &[PB, wrong], body.clone()).await;
    assert_eq!(reply.status, http::StatusCode::UNAUTHORIZED);
    for good in ["Bearer inline-token", "Bearer from-file"] {
        let reply = http_send(
            http,
            "POST",
            "/v1/traces",
            &[PB, ("authorization", good)],
            body.clone(),
        )
        .await;
        assert_eq!(reply.status, http::StatusCode::OK, "{good}");
    }

    let mut c = grpc_client(r.grpc.unwrap()).await;
    let e = c.export(request(vec![span(1, 1)])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(request(vec![span(1, 1)]));
    req.metadata_mut()
        .insert("authorization", "Bearer from-file".parse().unwrap());
    c.export(req).await.unwrap();

    for _ in 0..3 {
        assert_eq!(r.rx.recv().await.unwrap().spans.len(), 1);
    }
    assert!(r.rx.try_recv().is_err());
    let l = [("receiver", "otlp/auth"), ("outcome", "unauthenticated")];
    assert_eq!(counter(names::RECEIVER_REQUESTS, &l), 3);
    r.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn unreadable_token_file_fails_build() {
    let yaml = format!("{BOTH}\nauth: {{bearer_tokens_file: /nonexistent/tailweave/tokens}}");
    let cfg: OtlpReceiverConfig = parse(serde_yaml::from_str(&yaml).unwrap()).unwrap();
    assert!(cfg.validate().is_empty());
    let ctx = BuildContext {
        id: "otlp/auth_file".into(),
        ..Default::default()
    };
    let e = cfg.bind(&ctx).await.unwrap_err().to_string();
    assert!(
        e.contains("otlp/auth_file") && e.contains("bearer_tokens_file"),
        "{e}"
    );
}

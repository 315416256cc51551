//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
//!
//! The service is written by hand instead of using the generated `TraceServiceServer`, because
//! the generated one decodes the request into prost types; ours takes the raw message bytes
//! (after tonic's framing, gzip and size limit) and gives them to the zero-copy decoder, so each
//! span stays a slice of the request buffer.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prost::Message;
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use tailweave_core::tls::ServerTls;
use tailweave_core::Refused;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError};
use tonic::server::{NamedService, UnaryService};
use tonic::{Code, Status};

use super::auth::Grant;
use super::ingest::{role_from_header, Answer, Ingest, Transport, RETRY_AFTER_SECS};
use super::rpc::retryable_status;
use super::tls::{accept_loop, TlsConn};

/// The gRPC service name of OTLP traces.
pub const SERVICE_NAME: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Settings of one gRPC server, resolved from config.
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    pub max_recv_msg_size: usize,
    pub max_concurrent_streams: Option<u32>,
    /// Request metadata naming the sender (lower case).
    pub source_header: String,
    /// Serve TLS with this (loaded at build); `None`: plaintext.
    pub tls: Option<Arc<ServerTls>>,
}

/// A codec whose decoder yields the message bytes as they are.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

#[derive(Debug)]
struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the response failed: {e}")))
    }
}

#[derive(Debug)]
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // Copied into a buffer of exactly the frame's size: the spans are slices of it and may
        // wait in the join and the sampler for seconds, and a slice of tonic's own buffer would
        // keep that buffer's whole (grown) capacity alive with them. One memcpy per request.
        let n = src.remaining();
        let mut frame = Vec::with_capacity(n);
        while src.has_remaining() {
            let chunk = src.chunk();
            frame.extend_from_slice(chunk);
            let len = chunk.len();
            src.advance(len);
        }
        Ok(Some(Bytes::from(frame)))
    }
}

/// The `TraceService` as a tower service for tonic's router.
#[derive(Clone)]
pub(crate) struct TraceService {
    ingest: Arc<Ingest>,
    settings: Arc<GrpcSettings>,
}

impl NamedService for TraceService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for TraceService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT_PATH {
            return Box::pin(async move {
                Ok(Status::unimplemented("only TraceService/Export is served").into_http())
            });
        }
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let Some(grant) = self.ingest.authorize(Transport::Grpc, auth) else {
            return Box::pin(async move {
                Ok(Status::unauthenticated("missing or invalid bearer token").into_http())
            });
        };
        let handled = Arc::new(AtomicBool::new(false));
        let export = Export {
            ingest: self.ingest.clone(),
            settings: self.settings.clone(),
            handled: handled.clone(),
            grant,
        };
        let ingest = self.ingest.clone();
        let mut grpc = tonic::server::Grpc::new(RawCodec)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(self.settings.max_recv_msg_size);
        Box::pin(async move {
            let mut res = grpc.unary(export, req).await;
            if !handled.load(Ordering::Relaxed) {
                // Tonic refused the request before our handler saw it: framing, compression
                // or size. Count it like any other refusal.
                let outcome = match grpc_status(&res) {
                    Some(Code::OutOfRange) => {
                        // Tonic says OUT_OF_RANGE for an oversized message, which OTLP clients
                        // retry; grpc-go (and so the Collector) says RESOURCE_EXHAUSTED, which
                        // without RetryInfo they do not. Resending cannot help, so answer alike.
                        res.headers_mut().insert(
                            "grpc-status",
                            http::HeaderValue::from(Code::ResourceExhausted as i32),
                        );
                        "too_large"
                    }
                    Some(Code::ResourceExhausted) => "too_large",
                    _ => "malformed_request",
                };
                ingest.count_request(Transport::Grpc, outcome);
            }
            Ok(res)
        })
    }
}

fn grpc_status(res: &http::Response<tonic::body::Body>) -> Option<Code> {
    let v = res.headers().get("grpc-status")?;
    let n: i32 = v.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(n))
}

struct Export {
    ingest: Arc<Ingest>,
    settings: Arc<GrpcSettings>,
    handled: Arc<AtomicBool>,
    grant: Grant,
}

impl UnaryService<Bytes> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        self.handled.store(true, Ordering::Relaxed);
        let ingest = self.ingest.clone();
        let hint = role_from_header(
            request
                .metadata()
                .get(self.settings.source_header.as_str())
                .map(|v| v.as_bytes()),
        );
        let body = request.into_inner();
        let grant = self.grant.clone();
        Box::pin(async move {
            let answer = ingest.ingest_protobuf(Transport::Grpc, body, hint, &grant);
            answer_to_grpc(ingest.settle(answer).await)
        })
    }
}

fn answer_to_grpc(a: Answer) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
    match a {
        Answer::Accepted {
            rejected, message, ..
        } => {
            let partial_success = (rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: i64::try_from(rejected).unwrap_or(i64::MAX),
                error_message: message,
            });
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success,
            }))
        }
        Answer::Malformed(m) | Answer::TooManySpans(m) => Err(Status::invalid_argument(m)),
        Answer::PermissionDenied(m) => Err(Status::permission_denied(m)),
        Answer::NotTaken(why) => Err(retryable_status(
            Code::Unavailable,
            format!("the pipeline could not keep the spans: {why}; retry later"),
            Duration::from_secs(RETRY_AFTER_SECS),
        )),
        Answer::Refused { reason, spans } => {
            let m = format!("{spans} span(s) refused: {reason}; retry later");
            let code = match reason {
                Refused::MemoryLimit => Code::ResourceExhausted,
                Refused::Full | Refused::Closed => Code::Unavailable,
            };
            Err(retryable_status(
                code,
                m,
                Duration::from_secs(RETRY_AFTER_SECS),
            ))
        }
    }
}

/// Serves until `shutdown`, then stops accepting and lets in-flight requests finish (bounded by
/// `drain`).
pub(crate) async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    settings: GrpcSettings,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), String> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(n) = settings.max_concurrent_streams {
        builder = builder.max_concurrent_streams(n);
    }
    let tls = settings.tls.clone();
    let receiver = ingest.id.clone();
    let svc = TraceService {
        ingest,
        settings: Arc::new(settings),
    };
    let router = builder.add_service(svc);
    match tls {
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            run(router, incoming, shutdown, drain).await
        }
        Some(tls) => {
            // Connections reach tonic once their handshake is done; the channel only bounds
            // how many finished handshakes wait for tonic to pick them up.
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
            let deliver = move |c: TlsConn| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(Ok(c)).await;
                }
            };
            tokio::spawn(accept_loop(
                listener,
                tls,
                receiver,
                Transport::Grpc,
                shutdown.clone(),
                deliver,
            ));
            let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
            run(router, incoming, shutdown, drain).await
        }
    }
}

async fn run<I, IO, IE>(
    router: tonic::transport::server::Router,
    incoming: I,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), String>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let signal = {
        let shutdown = shutdown.clone();
        async move { shutdown.cancelled().await }
    };
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.map_err(|e| e.to_string()),
        _ = shutdown.cancelled() => {}
    }
    // Accepting has stopped (tonic drops the listener on the signal); wait for the drain.
    match tokio::time::timeout(drain, &mut server).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            tracing::warn!("gRPC connections still open {drain:?} after shutdown; closing them");
            Ok(())
        }
    }
}

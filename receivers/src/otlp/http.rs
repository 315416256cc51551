//! OTLP/HTTP: `POST {traces_url_path}` with a protobuf or JSON body, optionally gzip-compressed.
//!
//! Answers follow the OTLP/HTTP specification: the response is in the encoding of the request;
//! refusals carry a `google.rpc.Status` body (protobuf or JSON), and retryable ones a
//! `Retry-After` header.

use std::convert::Infallible;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prost::Message;
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use tailweave_core::tls::ServerTls;
use tailweave_core::Refused;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::auth::Grant;
use super::ingest::{role_from_header, Answer, Ingest, Transport, RETRY_AFTER_SECS};
use super::rpc::RpcStatus;
use super::tls::{accept_loop, TlsConn};
use crate::deepflow::normalize::Role;

/// A client that sends its headers slower than this is disconnected (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this much of a refused body is read (and thrown away) before the connection closes.
const DISCARD_MAX_BYTES: usize = 64 * 1024 * 1024;
/// ... and for at most this long.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of one HTTP server, resolved from config.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub traces_url_path: String,
    pub max_request_body_size: usize,
    /// Request header naming the sender (lower case).
    pub source_header: String,
    /// Serve TLS with this (loaded at build); `None`: plaintext.
    pub tls: Option<Arc<ServerTls>>,
}

/// The body encodings of OTLP/HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn from_headers(h: &HeaderMap) -> Option<Encoding> {
        let ct = h.get(CONTENT_TYPE)?.to_str().ok()?;
        let mime = ct.split(';').next().unwrap_or("").trim();
        if mime.eq_ignore_ascii_case("application/x-protobuf")
            || mime.eq_ignore_ascii_case("application/protobuf")
        {
            Some(Encoding::Protobuf)
        } else if mime.eq_ignore_ascii_case("application/json") {
            Some(Encoding::Json)
        } else {
            None
        }
    }
    fn content_type(&self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

struct State {
    ingest: Arc<Ingest>,
    settings: HttpSettings,
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, msg: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(msg.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A refusal as `google.rpc.Status` in the request's encoding.
fn status(status: StatusCode, grpc_code: tonic::Code, enc: Encoding, msg: String) -> Resp {
    let s = RpcStatus {
        code: grpc_code as i32,
        message: msg,
        details: Vec::new(),
    };
    let body = match enc {
        Encoding::Protobuf => s.encode_to_vec(),
        Encoding::Json => serde_json::json!({"code": s.code, "message": s.message})
            .to_string()
            .into_bytes(),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(enc.content_type()));
    r
}

fn success(enc: Encoding, rejected: u64, message: String) -> Resp {
    let resp = ExportTraceServiceResponse {
        partial_success: (rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(rejected).unwrap_or(i64::MAX),
            error_message: message,
        }),
    };
    let body = match enc {
        Encoding::Protobuf => resp.encode_to_vec(),
        // Written by hand for the proto3 JSON mapping: an absent message is omitted (not
        // `null`), and int64 is a decimal string.
        Encoding::Json => match &resp.partial_success {
            None => b"{}".to_vec(),
            Some(p) => serde_json::json!({"partialSuccess": {
                "rejectedSpans": p.rejected_spans.to_string(),
                "errorMessage": p.error_message,
            }})
            .to_string()
            .into_bytes(),
        },
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(enc.content_type()));
    r
}

enum BodyError {
    TooLarge,
    Bad(String),
}

/// Inflates a gzip body, refusing output beyond `limit` (so a small bomb cannot exhaust memory).
fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, BodyError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let mut d = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    d.read_to_end(&mut out)
        .map_err(|e| BodyError::Bad(format!("body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(out))
}

/// What the headers say about a request that passed the checks.
struct Accepted {
    enc: Encoding,
    gzip: bool,
    hint: Option<Role>,
    grant: Grant,
}

/// The checks that need only the head: path, auth, method, media type, declared size.
fn check_head(state: &State, parts: &http::request::Parts) -> Result<Accepted, Box<Resp>> {
    let ing = &state.ingest;
    let count = |outcome| ing.count_request(Transport::Http, outcome);
    if parts.uri.path() != state.settings.traces_url_path {
        count("not_found");
        return Err(Box::new(text(StatusCode::NOT_FOUND, "not found")));
    }
    let auth = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
    let Some(grant) = ing.authorize(Transport::Http, auth) else {
        let mut r = text(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(Box::new(r));
    };
    if parts.method != Method::POST {
        count("method_not_allowed");
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} not allowed, use POST", parts.method),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return Err(Box::new(r));
    }
    let Some(enc) = Encoding::from_headers(&parts.headers) else {
        count("unsupported_media_type");
        return Err(Box::new(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type must be application/x-protobuf or application/json",
        )));
    };
    let gzip = match parts
        .headers
        .get(CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" => true,
        Some(e) => {
            count("unsupported_media_type");
            return Err(Box::new(text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content encoding {e:?} is not supported (use gzip or none)"),
            )));
        }
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.settings.max_request_body_size as u64) {
        return Err(Box::new(too_large(state, enc)));
    }
    let hint = role_from_header(
        parts
            .headers
            .get(state.settings.source_header.as_str())
            .map(|v| v.as_bytes()),
    );
    Ok(Accepted {
        enc,
        gzip,
        hint,
        grant,
    })
}

fn too_large(state: &State, enc: Encoding) -> Resp {
    state.ingest.count_request(Transport::Http, "too_large");
    status(
        StatusCode::PAYLOAD_TOO_LARGE,
        tonic::Code::InvalidArgument,
        enc,
        format!(
            "request body exceeds {} bytes (protocols.http.max_request_body_size)",
            state.settings.max_request_body_size
        ),
    )
}

/// Reads the rest of a body we will not use, within bounds. Closing a connection with unread
/// request data makes the kernel reset it, and the client may then lose our answer (a 413 seen
/// as "connection reset"); reading a bounded amount first lets the answer arrive.
async fn discard(mut body: Incoming, already: usize) {
    let read = async {
        let mut n = already;
        while n < DISCARD_MAX_BYTES {
            match body.frame().await {
                Some(Ok(f)) => n += f.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, read).await;
}

enum ReadError {
    TooLarge,
    Io(String),
}

/// Collects the body, refusing it as soon as it passes `limit`.
async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, ReadError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Io(e.to_string()))?;
        if let Some(d) = frame.data_ref() {
            if buf.len() + d.len() > limit {
                let seen = buf.len() + d.len();
                drop(buf);
                discard(body, seen).await;
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(d);
        }
    }
    Ok(buf.freeze())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let Accepted {
        enc,
        gzip,
        hint,
        grant,
    } = match check_head(&state, &parts) {
        Ok(a) => a,
        Err(resp) => {
            // With `Expect: 100-continue` the client waits for us before sending the body, so
            // there is nothing to read (and reading would invite it).
            if !parts.headers.contains_key(EXPECT) {
                discard(body, 0).await;
            }
            return Ok(*resp);
        }
    };
    let ing = &state.ingest;
    let limit = state.settings.max_request_body_size;
    let body = match read_body(body, limit).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => return Ok(too_large(&state, enc)),
        Err(ReadError::Io(e)) => {
            ing.count_request(Transport::Http, "malformed_request");
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("reading the body failed: {e}"),
            ));
        }
    };
    let body = if gzip {
        match gunzip(&body, limit) {
            Ok(b) => b,
            Err(BodyError::TooLarge) => return Ok(too_large(&state, enc)),
            Err(BodyError::Bad(m)) => {
                ing.count_request(Transport::Http, "malformed_request");
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    tonic::Code::InvalidArgument,
                    enc,
                    m,
                ));
            }
        }
    } else {
        body
    };
    let answer = match enc {
        Encoding::Protobuf => ing.ingest_protobuf(Transport::Http, body, hint, &grant),
        Encoding::Json => ing.ingest_json(Transport::Http, &body, hint, &grant),
    };
    Ok(match ing.settle(answer).await {
        Answer::Accepted {
            rejected, message, ..
        } => success(enc, rejected, message),
        Answer::NotTaken(why) => {
            let m = format!("the pipeline could not keep the spans: {why}; retry later");
            let mut r = status(
                StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::Unavailable,
                enc,
                m,
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            r
        }
        Answer::Malformed(m) => status(
            StatusCode::BAD_REQUEST,
            tonic::Code::InvalidArgument,
            enc,
            m,
        ),
        Answer::PermissionDenied(m) => {
            status(StatusCode::FORBIDDEN, tonic::Code::PermissionDenied, enc, m)
        }
        Answer::TooManySpans(m) => status(
            StatusCode::PAYLOAD_TOO_LARGE,
            tonic::Code::InvalidArgument,
            enc,
            m,
        ),
        Answer::Refused { reason, spans } => {
            let m = format!("{spans} span(s) refused: {reason}; retry later");
            let (code, grpc) = match reason {
                Refused::MemoryLimit => (
                    StatusCode::TOO_MANY_REQUESTS,
                    tonic::Code::ResourceExhausted,
                ),
                Refused::Full | Refused::Closed => {
                    (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable)
                }
            };
            let mut r = status(code, grpc, enc, m);
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            r
        }
    })
}

/// Serves until `shutdown`, then closes the listener and lets in-flight requests finish
/// (bounded by `drain`); idle keep-alive connections are closed at once.
pub(crate) async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    settings: HttpSettings,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), String> {
    let tls = settings.tls.clone();
    let state = Arc::new(State { ingest, settings });
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Some(tls) = tls {
        // Handshakes run in their own tasks; the finished connections come back here to be
        // served under `graceful` (which only this loop holds).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<TlsConn>(64);
        let deliver = move |c: TlsConn| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(c).await;
            }
        };
        tokio::spawn(accept_loop(
            listener,
            tls,
            state.ingest.id.clone(),
            Transport::Http,
            shutdown.clone(),
            deliver,
        ));
        loop {
            let c = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
            };
            let state = state.clone();
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let conn = builder.serve_connection(TokioIo::new(c), svc).into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("HTTPS connection ended with an error: {e}");
                }
            });
        }
        return drain_connections(graceful, drain).await;
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("accepting an HTTP connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("HTTP connection ended with an error: {e}");
            }
        });
    }
    drop(listener);
    drain_connections(graceful, drain).await
}

async fn drain_connections(graceful: GracefulShutdown, drain: Duration) -> Result<(), String> {
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open {drain:?} after shutdown; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert_eq!(Encoding::from_headers(&h), None);
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert_eq!(Encoding::from_headers(&h), Some(Encoding::Json));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/X-Protobuf"),
        );
        assert_eq!(Encoding::from_headers(&h), Some(Encoding::Protobuf));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(Encoding::from_headers(&h), None);
    }

    #[test]
    fn gunzip_limits_output() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&[0u8; 10_000]).unwrap();
        let z = e.finish().unwrap();
        assert_eq!(gunzip(&z, 10_000).ok().map(|b| b.len()), Some(10_000));
        assert!(matches!(gunzip(&z, 9_999), Err(BodyError::TooLarge)));
        assert!(matches!(gunzip(b"not gzip", 100), Err(BodyError::Bad(_))));
    }
}

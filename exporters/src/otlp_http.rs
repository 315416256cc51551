//! The `otlp_http` exporter (alias `otlphttp`): OTLP/HTTP with protobuf bodies.
//!
//! The body is the re-framed request from `encode_request` (no re-encoding), gzipped unless
//! `compression: none`. hyper-util's pooled client is used rather than reqwest: HTTP/1.1 is all
//! that is needed, hyper is already in the tree through tonic, and the TLS is the shared
//! connector's (`otlp::connect`), which reads rotated certificate files before each new
//! connection.
//!
//! Answers follow the OTLP/HTTP spec: 2xx is delivered (with `partial_success` read from the
//! body), 429/502/503/504 are retryable and honour `Retry-After` (seconds or an HTTP date), every
//! other status is permanent.

use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::otlp::encode_request;
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tailweave_core::tls::ALPN_HTTP1;
use tailweave_core::{ComponentError, ExportError, Span};

use crate::otlp::{Compression, Connector, TlsConfig};
use crate::queue::{self, Accepted, Destination, ExportSettings, RetryConfig, SendingQueueConfig};
use crate::RunningExporter;

/// The OTLP/HTTP path appended to `endpoint`.
pub const TRACES_PATH: &str = "/v1/traces";
/// The most of a response body read: enough for any status message, bounded against a
/// misbehaving destination.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpHttpExporterConfig {
    /// Base URL, `http://host:port[/prefix]`; traces go to `{endpoint}/v1/traces`.
    /// Required unless `traces_endpoint` is set.
    pub endpoint: String,
    /// Full URL for traces; overrides `endpoint`. Default none.
    pub traces_endpoint: Option<String>,
    /// TLS settings for an `https://` URL (`ca_file`, `cert_file`, `key_file`,
    /// `server_name_override`); the URL's scheme decides whether TLS is used. The files are read
    /// again before each new connection, so rotated certificates are used without a restart.
    /// Default: system roots, no client certificate.
    pub tls: TlsConfig,
    /// HTTP headers sent with every request (e.g. `authorization`). Default none.
    pub headers: BTreeMap<String, String>,
    /// `gzip` or `none`. Default `gzip`.
    pub compression: Compression,
    /// Bound of one delivery attempt; `0s` means none. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Retry with backoff on retryable answers; see [`RetryConfig`].
    pub retry_on_failure: RetryConfig,
    /// The bounded queue in front of the senders, in memory or on disk; see
    /// [`SendingQueueConfig`].
    pub sending_queue: SendingQueueConfig,
}

impl Default for OtlpHttpExporterConfig {
    fn default() -> Self {
        OtlpHttpExporterConfig {
            endpoint: String::new(),
            traces_endpoint: None,
            tls: TlsConfig::default(),
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            timeout: queue::DEFAULT_TIMEOUT,
            retry_on_failure: RetryConfig::default(),
            sending_queue: SendingQueueConfig::default(),
        }
    }
}

impl OtlpHttpExporterConfig {
    pub fn settings(&self) -> ExportSettings {
        ExportSettings {
            timeout: self.timeout,
            retry: self.retry_on_failure.clone(),
            queue: self.sending_queue.memory(),
        }
    }

    /// The URL traces are posted to, with the key it came from.
    fn url(&self) -> Result<Uri, ConfigIssue> {
        let (key, raw) = match &self.traces_endpoint {
            Some(t) => ("traces_endpoint", t.trim().to_string()),
            None => {
                let base = self.endpoint.trim();
                if base.is_empty() {
                    return Err(ConfigIssue::new(
                        "endpoint",
                        "required (or traces_endpoint): a base URL such as http://host:4318",
                    ));
                }
                (
                    "endpoint",
                    format!("{}{TRACES_PATH}", base.trim_end_matches('/')),
                )
            }
        };
        let uri = Uri::from_str(&raw)
            .map_err(|e| ConfigIssue::new(key, format!("{raw:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(ConfigIssue::new(
                    key,
                    format!("{raw:?}: the URL must start with http:// or https://"),
                ))
            }
        }
        match uri.host() {
            Some(h) if !h.is_empty() => Ok(uri),
            _ => Err(ConfigIssue::new(
                key,
                format!("{raw:?}: a host is required"),
            )),
        }
    }

    fn header_map(&self) -> Result<HeaderMap, Vec<ConfigIssue>> {
        let mut map = HeaderMap::new();
        let mut issues = Vec::new();
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_bytes());
            let value = HeaderValue::from_str(v);
            match (name, value) {
                (Ok(n), Ok(v)) => {
                    map.insert(n, v);
                }
                (Err(_), _) => issues.push(ConfigIssue::new(
                    format!("headers.{k}"),
                    "not a valid HTTP header name",
                )),
                (_, Err(_)) => issues.push(ConfigIssue::new(
                    format!("headers.{k}"),
                    "the value must not hold control characters",
                )),
            }
        }
        if issues.is_empty() {
            Ok(map)
        } else {
            Err(issues)
        }
    }

    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        match self.url() {
            Err(i) => out.push(i),
            Ok(u) => {
                out.extend(self.tls.validate("tls"));
                let key = if self.traces_endpoint.is_some() {
                    "traces_endpoint"
                } else {
                    "endpoint"
                };
                match u.scheme_str() {
                    Some("http") if self.tls.has_tls_settings() => out.push(ConfigIssue::new(
                        key,
                        "http:// means plaintext, so the tls settings would be ignored; use https://",
                    )),
                    Some("https") if self.tls.insecure => out.push(ConfigIssue::new(
                        "tls.insecure",
                        "https:// needs TLS; remove insecure: true or use http://",
                    )),
                    _ => {}
                }
            }
        }
        if let Err(i) = self.header_map() {
            out.extend(i);
        }
        out.extend(self.settings().validate());
        out.extend(self.sending_queue.validate());
        out
    }

    pub fn endpoints(&self) -> Vec<String> {
        let Ok(uri) = self.url() else {
            return Vec::new();
        };
        let Some(host) = uri.host() else {
            return Vec::new();
        };
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        vec![format!("{host}:{}", uri.port_u16().unwrap_or(default_port))]
    }

    /// The destination without its queue (for tests and for callers that bring their own queue).
    pub fn destination(&self, id: &str) -> Result<HttpExporter, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(id, all.join("; ")));
        }
        let url = self
            .url()
            .map_err(|i| ComponentError::build(id, i.to_string()))?;
        let headers = self
            .header_map()
            .map_err(|_| ComponentError::build(id, "headers: invalid HTTP header"))?;
        let encrypt = url.scheme_str() == Some("https");
        let connector =
            crate::otlp::reloading_connector(id, &self.tls, encrypt, ALPN_HTTP1, self.timeout)
                .map_err(|m| ComponentError::build(id, m))?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(HttpExporter {
            url,
            headers,
            compression: self.compression,
            client,
        })
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        let dest = self.destination(&ctx.id)?;
        tracing::info!(exporter = %ctx.id, url = %dest.url, "otlp_http exporter ready");
        let dest = Arc::new(dest);
        match self.sending_queue.disk(&ctx.id) {
            Some(disk) => Ok(queue::spawn_persistent(&ctx.id, &self.settings(), &disk, dest)?.0),
            None => Ok(queue::spawn(&ctx.id, &self.settings(), dest).0),
        }
    }
}

/// One OTLP/HTTP destination.
pub struct HttpExporter {
    url: Uri,
    headers: HeaderMap,
    compression: Compression,
    client: Client<Connector, Full<Bytes>>,
}

#[async_trait]
impl Destination for HttpExporter {
    async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError> {
        let body = encode_request(spans);
        let mut req = http::Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(match self.compression {
                Compression::Gzip => gzip(&body)
                    .map_err(|e| ExportError::permanent(format!("compressing the request: {e}")))?,
                Compression::None => body,
            }))
            .map_err(|e| ExportError::permanent(format!("building the request: {e}")))?;
        if self.compression == Compression::Gzip {
            req.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        for (k, v) in &self.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ExportError::retryable(format!("{}: {}", self.url, causes(&e))))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // A body we cannot read only costs the details of the answer, never its meaning.
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        answer(&self.url, status, retry_after, &body)
    }
}

/// An error and its sources: hyper's own text ("client error (Connect)") hides why, e.g. the
/// TLS handshake failed on an unknown issuer, which is what an operator needs to read.
pub(crate) fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        out.push_str(": ");
        out.push_str(&c.to_string());
        next = c.source();
    }
    out
}

/// What an OTLP/HTTP answer means for the batch.
fn answer(
    url: &Uri,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Accepted, ExportError> {
    if status.is_success() {
        let resp = ExportTraceServiceResponse::decode(body).unwrap_or_default();
        return Ok(match resp.partial_success {
            Some(p) => Accepted {
                rejected: u64::try_from(p.rejected_spans).unwrap_or(0),
                message: (!p.error_message.is_empty()).then_some(p.error_message),
            },
            None => Accepted::default(),
        });
    }
    let message = format!("{url}: HTTP {status}: {}", error_text(body));
    if retryable_status(status) {
        Err(ExportError::retryable(message).with_retry_after(retry_after))
    } else {
        Err(ExportError::permanent(message))
    }
}

/// 429, 502, 503 and 504 may succeed later; every other failure is final (OTLP/HTTP spec).
pub fn retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// The text of an error body: a `google.rpc.Status` message when it is one, else the start of
/// the body as text.
fn error_text(body: &[u8]) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
    }
    if let Ok(s) = RpcStatus::decode(body) {
        if !s.message.is_empty() {
            return s.message;
        }
    }
    match std::str::from_utf8(body) {
        Ok(s)
            if !s.trim().is_empty() && !s.chars().any(|c| c.is_control() && !c.is_whitespace()) =>
        {
            s.trim().chars().take(256).collect()
        }
        _ => format!("({} byte body)", body.len()),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (relative to `now`; a past date means now).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn gzip(body: &[u8]) -> std::io::Result<Bytes> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::default(),
    );
    enc.write_all(body)?;
    Ok(Bytes::from(enc.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::proto::tonic::collector::trace::v1::ExportTracePartialSuccess;

    fn cfg(yaml: &str) -> OtlpHttpExporterConfig {
        tailweave_core::config::parse(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn url_from_endpoint_or_traces_endpoint() {
        assert_eq!(
            cfg("endpoint: http://h:4318").url().unwrap().to_string(),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            cfg("endpoint: http://h:4318/otlp/")
                .url()
                .unwrap()
                .to_string(),
            "http://h:4318/otlp/v1/traces"
        );
        let c = cfg("endpoint: http://h:4318\ntraces_endpoint: http://t:9/x");
        assert_eq!(c.url().unwrap().to_string(), "http://t:9/x");
        assert_eq!(c.endpoints(), ["t:9"]);
        assert_eq!(cfg("endpoint: http://h").endpoints(), ["h:80"]);
    }

    #[test]
    fn validate_reports_every_problem() {
        let paths =
            |y: &str| -> Vec<String> { cfg(y).validate().into_iter().map(|i| i.path).collect() };
        assert_eq!(paths("{}"), ["endpoint"]);
        assert!(paths("endpoint: https://h:4318").is_empty());
        assert_eq!(
            paths("endpoint: http://h:4318\ntls: {ca_file: /ca.pem}"),
            ["endpoint"]
        );
        assert_eq!(
            paths("endpoint: https://h:4318\ntls: {insecure: true}"),
            ["tls.insecure"]
        );
        assert_eq!(cfg("endpoint: https://h").endpoints(), ["h:443"]);
        assert_eq!(
            paths("traces_endpoint: h:4318/v1/traces"),
            ["traces_endpoint"]
        );
        assert_eq!(
            paths("endpoint: http://h\nheaders: {\"a b\": x}\nretry_on_failure: {multiplier: 0}"),
            ["headers.a b", "retry_on_failure.multiplier"]
        );
        assert!(paths("endpoint: http://h:4318\ntls: {insecure: true}").is_empty());
    }

    #[test]
    fn statuses_map_to_retryable_or_permanent() {
        let url = Uri::from_static("http://h/v1/traces");
        for s in [429, 502, 503, 504] {
            let e = answer(
                &url,
                StatusCode::from_u16(s).unwrap(),
                Some(Duration::from_secs(3)),
                b"",
            )
            .unwrap_err();
            assert!(e.retryable, "{s}");
            assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        }
        for s in [400, 401, 403, 404, 413, 500, 501] {
            let e = answer(&url, StatusCode::from_u16(s).unwrap(), None, b"nope").unwrap_err();
            assert!(!e.retryable, "{s}");
            assert!(e.message.contains("nope"), "{}", e.message);
        }
    }

    #[test]
    fn success_reads_partial_success() {
        let url = Uri::from_static("http://h/v1/traces");
        let body = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 4,
                error_message: "too old".into(),
            }),
        }
        .encode_to_vec();
        let acc = answer(&url, StatusCode::OK, None, &body).unwrap();
        assert_eq!((acc.rejected, acc.message.as_deref()), (4, Some("too old")));
        assert_eq!(
            answer(&url, StatusCode::OK, None, b"").unwrap(),
            Accepted::default()
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn error_text_reads_rpc_status() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct St {
            #[prost(int32, tag = "1")]
            code: i32,
            #[prost(string, tag = "2")]
            message: String,
        }
        let b = St {
            code: 3,
            message: "bad trace id".into(),
        }
        .encode_to_vec();
        assert_eq!(error_text(&b), "bad trace id");
        assert_eq!(error_text(b"  plain text \n"), "plain text");
        assert_eq!(error_text(&[0xff, 0x00]), "(2 byte body)");
    }
}

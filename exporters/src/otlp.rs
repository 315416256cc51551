//! The `otlp` exporter: OTLP/gRPC to `TraceService/Export`.
//!
//! Spans leave as they arrived: `encode_request` re-frames their encoded bytes under their resource
//! and scope, and a raw-bytes codec hands that buffer to tonic, so nothing is decoded or re-encoded
//! on the way out. The tonic `Channel` connects on first use and reconnects after a failure, so an
//! outage of the destination shows up as retryable `UNAVAILABLE` answers until it is back.
//! Each new connection first reads the TLS files again (see [`ReloadingTls`]): a reconnect after
//! a certificate rotation uses the new CA or client certificate.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes};
use prost::Message;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::otlp::encode_request;
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tailweave_core::tls::rustls::pki_types::ServerName;
use tailweave_core::tls::{ClientTlsSettings, ALPN_H2};
use tailweave_core::{ComponentError, ExportError, Span};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::queue::{self, Accepted, Destination, ExportSettings, RetryConfig, SendingQueueConfig};
use crate::RunningExporter;

/// The gRPC method every OTLP trace receiver serves.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Body compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The Collector's default.
    #[default]
    Gzip,
    None,
}

/// `tls`: transport security of the connection (`insecure`, `ca_file`, `cert_file`, `key_file`,
/// `server_name_override`); see [`ClientTlsSettings`]. The `otlp` and `otlp_http` exporters read
/// the files again before each new connection, so rotated certificates are used without a
/// restart.
pub type TlsConfig = ClientTlsSettings;

mod connect;
pub use connect::{Connector, ReloadingTls};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpExporterConfig {
    /// Destination: `host:port` or `http://host:port`. Required.
    pub endpoint: String,
    /// Transport security; see [`TlsConfig`].
    pub tls: TlsConfig,
    /// gRPC metadata sent with every request (e.g. `authorization`). Default none.
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

impl Default for OtlpExporterConfig {
    fn default() -> Self {
        OtlpExporterConfig {
            endpoint: String::new(),
            tls: TlsConfig::default(),
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            timeout: queue::DEFAULT_TIMEOUT,
            retry_on_failure: RetryConfig::default(),
            sending_queue: SendingQueueConfig::default(),
        }
    }
}

/// Where a gRPC endpoint points, once read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    authority: String,
    /// `Some(true)` for `http://`, `Some(false)` for `https://`, `None` without a scheme.
    plaintext_scheme: Option<bool>,
}

fn parse_grpc_endpoint(endpoint: &str) -> Result<Target, String> {
    let e = endpoint.trim();
    if e.is_empty() {
        return Err("required: the destination as host:port or http://host:port".into());
    }
    let (rest, plaintext_scheme) = if let Some(r) = e.strip_prefix("http://") {
        (r, Some(true))
    } else if let Some(r) = e.strip_prefix("https://") {
        (r, Some(false))
    } else if e.contains("://") {
        return Err(format!("{e:?}: the scheme must be http:// (or none)"));
    } else {
        (e, None)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(format!(
            "{e:?}: a gRPC endpoint is host:port, without a path"
        ));
    }
    let auth = http::uri::Authority::from_str(rest)
        .map_err(|err| format!("{e:?} is not host:port: {err}"))?;
    if auth.port_u16().is_none() {
        return Err(format!("{e:?}: a port is required (OTLP/gRPC uses 4317)"));
    }
    if auth.host().is_empty() {
        return Err(format!("{e:?}: a host is required"));
    }
    Ok(Target {
        authority: auth.as_str().to_string(),
        plaintext_scheme,
    })
}

/// Checks the TLS choice of the gRPC exporter. `plaintext_scheme` as in [`Target`]: `http://`
/// means plaintext (as in the Collector), `https://` TLS, no scheme TLS unless `tls.insecure`.
pub(crate) fn tls_issue(tls: &TlsConfig, plaintext_scheme: Option<bool>) -> Vec<ConfigIssue> {
    let mut out = tls.validate("tls");
    match plaintext_scheme {
        Some(true) if tls.has_tls_settings() => out.push(ConfigIssue::new(
            "endpoint",
            "http:// means plaintext, so the tls settings would be ignored; use https:// or no scheme",
        )),
        Some(false) if tls.insecure => out.push(ConfigIssue::new(
            "tls.insecure",
            "https:// needs TLS; remove insecure: true or use http://",
        )),
        _ => {}
    }
    out
}

/// Whether this exporter encrypts: the endpoint's scheme, else `tls.insecure`.
fn uses_tls(tls: &TlsConfig, plaintext_scheme: Option<bool>) -> bool {
    match plaintext_scheme {
        Some(plain) => !plain,
        None => !tls.insecure,
    }
}

/// `server_name_override` as the name to verify, if given.
fn override_name(tls: &TlsConfig) -> Result<Option<ServerName<'static>>, String> {
    match &tls.server_name_override {
        Some(n) => tls
            .server_name(n)
            .map(Some)
            .map_err(|e| format!("tls.server_name_override: {e}")),
        None => Ok(None),
    }
}

/// The connector of an exporter: TLS with the rustls config built from `tls` once, offering
/// `alpn`.
pub(crate) fn connector(
    tls: &TlsConfig,
    encrypt: bool,
    alpn: &[u8],
    timeout: Duration,
) -> Result<Connector, String> {
    let timeout = (!timeout.is_zero()).then_some(timeout);
    if !encrypt {
        return Ok(Connector::new(timeout, None));
    }
    let cfg = tls
        .client_config(&[alpn])
        .map_err(|e| format!("tls: {e}"))?;
    Ok(Connector::new(timeout, Some((cfg, override_name(tls)?))))
}

/// As [`connector`], but `ca_file`, `cert_file` and `key_file`, when set, are read again before
/// each new connection, so that rotated files are used without a restart (see
/// [`ReloadingTls`]). `id` names the exporter in the logs.
pub(crate) fn reloading_connector(
    id: &str,
    tls: &TlsConfig,
    encrypt: bool,
    alpn: &[u8],
    timeout: Duration,
) -> Result<Connector, String> {
    if !encrypt || (tls.ca_file.is_none() && tls.cert_file.is_none()) {
        // Nothing read from files (or no TLS): nothing to reload.
        return connector(tls, encrypt, alpn, timeout);
    }
    let timeout = (!timeout.is_zero()).then_some(timeout);
    let reloading = ReloadingTls::new(id, tls.clone(), alpn).map_err(|e| format!("tls: {e}"))?;
    Ok(Connector::reloading(
        timeout,
        Arc::new(reloading),
        override_name(tls)?,
    ))
}

fn grpc_metadata(headers: &BTreeMap<String, String>) -> Result<MetadataMap, Vec<ConfigIssue>> {
    let mut map = MetadataMap::new();
    let mut issues = Vec::new();
    for (k, v) in headers {
        let key = match AsciiMetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()) {
            Ok(key) => key,
            Err(_) => {
                issues.push(ConfigIssue::new(
                    format!("headers.{k}"),
                    "not a valid gRPC metadata key (ASCII token, not ending in -bin)",
                ));
                continue;
            }
        };
        match AsciiMetadataValue::try_from(v.as_str()) {
            Ok(val) => {
                map.insert(key, val);
            }
            Err(_) => issues.push(ConfigIssue::new(
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

impl OtlpExporterConfig {
    pub fn settings(&self) -> ExportSettings {
        ExportSettings {
            timeout: self.timeout,
            retry: self.retry_on_failure.clone(),
            queue: self.sending_queue.memory(),
        }
    }

    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        match parse_grpc_endpoint(&self.endpoint) {
            Ok(t) => out.extend(tls_issue(&self.tls, t.plaintext_scheme)),
            Err(m) => out.push(ConfigIssue::new("endpoint", m)),
        }
        if let Err(issues) = grpc_metadata(&self.headers) {
            out.extend(issues);
        }
        out.extend(self.settings().validate());
        out.extend(self.sending_queue.validate());
        out
    }

    pub fn endpoints(&self) -> Vec<String> {
        parse_grpc_endpoint(&self.endpoint)
            .map(|t| vec![t.authority])
            .unwrap_or_default()
    }

    /// The destination without its queue (for tests and for callers that bring their own queue).
    /// Must run inside a tokio runtime.
    pub fn destination(&self, id: &str) -> Result<GrpcExporter, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(id, all.join("; ")));
        }
        let target =
            parse_grpc_endpoint(&self.endpoint).map_err(|m| ComponentError::build(id, m))?;
        let headers = grpc_metadata(&self.headers)
            .map_err(|_| ComponentError::build(id, "headers: invalid gRPC metadata".to_string()))?;
        // Always http:// to tonic: the connector does the TLS (see `connect`).
        let endpoint = Channel::from_shared(format!("http://{}", target.authority))
            .map_err(|e| ComponentError::build(id, format!("endpoint: {e}")))?;
        let encrypt = uses_tls(&self.tls, target.plaintext_scheme);
        let connector = reloading_connector(id, &self.tls, encrypt, ALPN_H2, self.timeout)
            .map_err(|m| ComponentError::build(id, m))?;
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(GrpcExporter {
            target: target.authority,
            channel,
            headers,
            compression: self.compression,
            timeout: self.timeout,
        })
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        let dest = self.destination(&ctx.id)?;
        tracing::info!(exporter = %ctx.id, endpoint = %dest.target, "otlp exporter ready");
        let dest = Arc::new(dest);
        match self.sending_queue.disk(&ctx.id) {
            Some(disk) => Ok(queue::spawn_persistent(&ctx.id, &self.settings(), &disk, dest)?.0),
            None => Ok(queue::spawn(&ctx.id, &self.settings(), dest).0),
        }
    }
}

/// One OTLP/gRPC destination.
pub struct GrpcExporter {
    target: String,
    channel: Channel,
    headers: MetadataMap,
    compression: Compression,
    timeout: Duration,
}

#[async_trait]
impl Destination for GrpcExporter {
    async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.compression == Compression::Gzip {
            grpc = grpc
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip);
        }
        grpc.ready().await.map_err(|e| {
            ExportError::retryable(format!("{}: connection not ready: {e}", self.target))
        })?;
        let mut req = tonic::Request::new(encode_request(spans));
        *req.metadata_mut() = self.headers.clone();
        if !self.timeout.is_zero() {
            // Tells the destination our deadline (grpc-timeout); the queue enforces it here.
            req.set_timeout(self.timeout);
        }
        let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
        match grpc.unary(req, path, RawCodec).await {
            Ok(resp) => Ok(accepted(resp.into_inner())),
            Err(status) => Err(map_status(&self.target, &status)),
        }
    }
}

fn accepted(resp: ExportTraceServiceResponse) -> Accepted {
    match resp.partial_success {
        Some(p) => Accepted {
            rejected: u64::try_from(p.rejected_spans).unwrap_or(0),
            message: (!p.error_message.is_empty()).then_some(p.error_message),
        },
        None => Accepted::default(),
    }
}

/// Whether a gRPC code means "the same request may succeed later". `RESOURCE_EXHAUSTED` is
/// retryable only with RetryInfo in the Collector; here always, since a tailweave receiver sends it
/// when its pipeline is full.
pub fn retryable_code(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::OutOfRange
            | Code::DataLoss
    )
}

/// A request over the destination's size limit fails again however often it is sent. gRPC has
/// no code of its own for it, so the servers' wording (grpc-go, tonic) is matched.
fn message_too_large(status: &Status) -> bool {
    if status.code() != Code::ResourceExhausted {
        return false;
    }
    let m = status.message().to_ascii_lowercase();
    m.contains("larger than max") || m.contains("message length too large")
}

fn map_status(target: &str, status: &Status) -> ExportError {
    let message = format!("{target}: gRPC {:?}: {}", status.code(), status.message());
    let err = if retryable_code(status.code()) && !message_too_large(status) {
        ExportError::retryable(message)
    } else {
        ExportError::permanent(message)
    };
    err.with_retry_after(retry_info(status.details()))
}

// The few google.rpc messages needed to read RetryInfo from a status' details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<RpcAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<RpcDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The delay a `google.rpc.RetryInfo` in the status details asks for.
fn retry_info(details: &[u8]) -> Option<Duration> {
    if details.is_empty() {
        return None;
    }
    let status = RpcStatus::decode(details).ok()?;
    status
        .details
        .iter()
        .filter(|a| a.type_url.ends_with("google.rpc.RetryInfo"))
        .find_map(|a| RetryInfo::decode(a.value.as_slice()).ok()?.retry_delay)
        .and_then(|d| {
            let secs = u64::try_from(d.seconds).ok()?;
            let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
            Some(Duration::new(secs, nanos))
        })
}

/// Sends an already-encoded request and reads the response as `ExportTraceServiceResponse`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;
    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, Status> {
        // The status was OK, so the data was taken; a body we cannot read only loses the
        // partial-success details, which must not turn a delivery into a failure.
        Ok(Some(
            ExportTraceServiceResponse::decode(src).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "unreadable ExportTraceServiceResponse");
                ExportTraceServiceResponse::default()
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> OtlpExporterConfig {
        tailweave_core::config::parse(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn paths(c: &OtlpExporterConfig) -> Vec<String> {
        c.validate().into_iter().map(|i| i.path).collect()
    }

    #[test]
    fn endpoint_forms() {
        let t = parse_grpc_endpoint("http://127.0.0.1:4317").unwrap();
        assert_eq!(t.authority, "127.0.0.1:4317");
        assert_eq!(t.plaintext_scheme, Some(true));
        assert_eq!(
            parse_grpc_endpoint("collector:4317")
                .unwrap()
                .plaintext_scheme,
            None
        );
        assert!(parse_grpc_endpoint("collector").is_err());
        assert!(parse_grpc_endpoint("grpc://x:1").is_err());
        assert!(parse_grpc_endpoint("http://x:1/v1/traces").is_err());
        assert!(parse_grpc_endpoint("").is_err());
        assert_eq!(
            parse_grpc_endpoint("[::1]:4317").unwrap().authority,
            "[::1]:4317"
        );
    }

    #[test]
    fn defaults_follow_the_collector() {
        let c = cfg("endpoint: http://localhost:4317");
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.settings(), ExportSettings::default());
        assert!(c.validate().is_empty());
        assert_eq!(c.endpoints(), vec!["localhost:4317".to_string()]);
    }

    #[test]
    fn tls_follows_the_scheme_then_insecure() {
        let tls = |y: &str| {
            let c = cfg(y);
            let t = parse_grpc_endpoint(&c.endpoint).unwrap();
            (paths(&c), uses_tls(&c.tls, t.plaintext_scheme))
        };
        // As in the Collector: no scheme means TLS unless insecure; http:// is plaintext.
        assert_eq!(tls("endpoint: localhost:4317"), (vec![], true));
        assert_eq!(
            tls("endpoint: localhost:4317\ntls: {insecure: true}"),
            (vec![], false)
        );
        assert_eq!(tls("endpoint: http://localhost:4317"), (vec![], false));
        assert_eq!(tls("endpoint: https://localhost:4317"), (vec![], true));
        assert_eq!(
            tls("endpoint: https://localhost:4317\ntls: {insecure: true}").0,
            ["tls.insecure"]
        );
        assert_eq!(
            tls("endpoint: http://localhost:4317\ntls: {ca_file: /ca.pem}").0,
            ["endpoint"]
        );
        assert_eq!(
            tls("endpoint: localhost:4317\ntls: {cert_file: /c.pem}").0,
            ["tls.key_file"]
        );
    }

    #[test]
    fn validate_reports_all_problems() {
        let c = cfg(
            "endpoint: nowhere\nheaders: {\"bad key\": v, x-ok: \"a\\nb\"}\nsending_queue: {queue_size: 0}",
        );
        assert_eq!(
            paths(&c),
            [
                "endpoint",
                "headers.bad key",
                "headers.x-ok",
                "sending_queue.queue_size"
            ]
        );
        assert!(c.endpoints().is_empty());
    }

    #[test]
    fn unknown_keys_and_compression_are_refused() {
        let bad = serde_yaml::from_str("endpoint: x:1\ncompression: zstd").unwrap();
        assert!(tailweave_core::config::parse::<OtlpExporterConfig>(bad).is_err());
        let bad = serde_yaml::from_str("endpoint: x:1\ntls: {ca: /x}").unwrap();
        let e = tailweave_core::config::parse::<OtlpExporterConfig>(bad)
            .err()
            .unwrap();
        assert!(e.path.starts_with("tls"), "{e:?}");
    }

    #[test]
    fn codes_map_to_retryable_or_permanent() {
        for c in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
        ] {
            assert!(map_status("t", &Status::new(c, "x")).retryable, "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(!map_status("t", &Status::new(c, "x")).retryable, "{c:?}");
        }
    }

    #[test]
    fn oversized_requests_are_not_retried() {
        for m in [
            "grpc: received message larger than max (5000000 vs. 4194304)",
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        ] {
            let e = map_status("t", &Status::resource_exhausted(m));
            assert!(!e.retryable, "{m}");
        }
        assert!(map_status("t", &Status::resource_exhausted("memory limit reached")).retryable);
    }

    #[test]
    fn retry_info_in_details_sets_retry_after() {
        let info = RetryInfo {
            retry_delay: Some(RpcDuration {
                seconds: 3,
                nanos: 500_000_000,
            }),
        };
        let details = RpcStatus {
            code: Code::ResourceExhausted as i32,
            message: "slow down".into(),
            details: vec![RpcAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: info.encode_to_vec(),
            }],
        }
        .encode_to_vec();
        let st = Status::with_details(Code::ResourceExhausted, "slow down", details.into());
        let e = map_status("t", &st);
        assert!(e.retryable);
        assert_eq!(e.retry_after, Some(Duration::from_millis(3500)));
        assert_eq!(retry_info(b"\xff\xff"), None);
    }
}

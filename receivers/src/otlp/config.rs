//! The configuration shared by the `otlp` and `deepflow` receivers, in the OpenTelemetry
//! Collector's layout (`protocols: {grpc: {...}, http: {...}}`).
//!
//! A protocol is enabled by the presence of its key; `grpc:` with no value (YAML null) enables it
//! with its defaults. Endpoints left unset take the receiver's own default (loopback only, so a
//! fresh install is not reachable from the network until the user opens it).

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};
use tailweave_core::config::ConfigIssue;
use tailweave_core::otlp::DecodeLimits;
use tailweave_core::tls::ServerTlsSettings;

/// The default OTLP/HTTP path for traces.
pub const DEFAULT_TRACES_URL_PATH: &str = "/v1/traces";
/// The default largest HTTP body, in bytes, before and after decompression (20 MiB).
pub const DEFAULT_MAX_REQUEST_BODY_SIZE: u64 = 20 * 1024 * 1024;
/// The default largest gRPC message, in MiB (the OpenTelemetry Collector's default).
pub const DEFAULT_MAX_RECV_MSG_SIZE_MIB: u64 = 4;
/// The default request header that names the sender (DeepFlow's `extra-headers`).
pub const DEFAULT_SOURCE_HEADER: &str = "x-tailweave-source";

/// Upper bound for message and body size settings: a bigger value is almost certainly a unit
/// mistake, and every request is held whole in memory while it is read.
const MAX_SIZE_BYTES: u64 = 1024 * 1024 * 1024;

/// Which protocols to serve.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protocols {
    /// OTLP/gRPC (`TraceService/Export`). Enabled when the key is present.
    #[serde(default, deserialize_with = "present_means_enabled")]
    pub grpc: Option<GrpcConfig>,
    /// OTLP/HTTP (`POST` protobuf or JSON). Enabled when the key is present.
    #[serde(default, deserialize_with = "present_means_enabled")]
    pub http: Option<HttpConfig>,
}

/// OTLP/gRPC settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// `host:port` to listen on. Default `127.0.0.1:4317` (`otlp`) or `127.0.0.1:14317`
    /// (`deepflow`). Port 0 picks a free port.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The largest accepted message, in MiB, after decompression. Default 4.
    #[serde(default = "default_max_recv_msg_size_mib")]
    pub max_recv_msg_size_mib: u64,
    /// Concurrent streams (requests) per HTTP/2 connection. Default: no limit of our own
    /// (the HTTP/2 stack's).
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
    /// Serve TLS (ALPN `h2`): `cert_file`, `key_file`, optional `client_ca_file` (mTLS: every
    /// client must present a certificate signed by it), `reload_interval` (default `10s`),
    /// `handshake_timeout` (default `10s`). Default none: plaintext.
    #[serde(default)]
    pub tls: Option<ServerTlsSettings>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            endpoint: None,
            max_recv_msg_size_mib: DEFAULT_MAX_RECV_MSG_SIZE_MIB,
            max_concurrent_streams: None,
            tls: None,
        }
    }
}

/// OTLP/HTTP settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to listen on. Default `127.0.0.1:4318` (`otlp`) or `127.0.0.1:14318`
    /// (`deepflow`). Port 0 picks a free port.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The path that takes trace requests. Default `/v1/traces`.
    #[serde(default = "default_traces_url_path")]
    pub traces_url_path: String,
    /// The largest accepted body in bytes, both as sent and after gzip decompression.
    /// Default 20971520 (20 MiB).
    #[serde(default = "default_max_request_body_size")]
    pub max_request_body_size: u64,
    /// Serve TLS (ALPN `h2` and `http/1.1`); the keys of `protocols.grpc.tls`. Default none:
    /// plaintext.
    #[serde(default)]
    pub tls: Option<ServerTlsSettings>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            endpoint: None,
            traces_url_path: default_traces_url_path(),
            max_request_body_size: DEFAULT_MAX_REQUEST_BODY_SIZE,
            tls: None,
        }
    }
}

/// How spans taken by an `otlp` receiver are classified (`ebpf-spans.md` §7.1).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// eBPF-derived when the span carries DeepFlow markers (or the request carries the source
    /// header with `deepflow`/`ebpf`), SDK otherwise.
    #[default]
    Auto,
    /// Every span is an SDK span; DeepFlow markers are not looked at.
    Sdk,
    /// Every span is eBPF-derived (a receiver dedicated to DeepFlow).
    Ebpf,
}

/// Limits applied while reading one request (each refusal is counted with its reason).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Spans per request; a request over it is refused whole. Default 1000000.
    #[serde(default = "default_max_spans_per_request")]
    pub max_spans_per_request: usize,
    /// Attributes per span; a span over it is refused alone. Default 10000.
    #[serde(default = "default_max_attributes_per_span")]
    pub max_attributes_per_span: usize,
    /// Nesting depth of array and map attribute values; a deeper span is refused alone.
    /// Default 32.
    #[serde(default = "default_max_value_depth")]
    pub max_value_depth: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = DecodeLimits::default();
        LimitsConfig {
            max_spans_per_request: d.max_spans_per_request,
            max_attributes_per_span: d.max_attributes_per_span,
            max_value_depth: d.max_value_depth,
        }
    }
}

impl LimitsConfig {
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_spans_per_request: self.max_spans_per_request,
            max_attributes_per_span: self.max_attributes_per_span,
            max_value_depth: self.max_value_depth,
        }
    }

    pub(crate) fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.max_spans_per_request == 0 {
            issues.push(ConfigIssue::new(
                "limits.max_spans_per_request",
                "must be at least 1",
            ));
        }
        if self.max_attributes_per_span == 0 {
            issues.push(ConfigIssue::new(
                "limits.max_attributes_per_span",
                "must be at least 1",
            ));
        }
        if self.max_value_depth == 0 {
            issues.push(ConfigIssue::new(
                "limits.max_value_depth",
                "must be at least 1",
            ));
        }
    }
}

/// Who may send. Absent: anyone who can reach the endpoint (the default endpoints are loopback).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted bearer tokens (`Authorization: Bearer <token>` header or gRPC metadata). Write
    /// `${env:NAME}` to keep a token out of the file. These tokens may write any tenant's data.
    #[serde(default)]
    pub bearer_tokens: Vec<String>,
    /// A file of accepted tokens, one a line (blank lines and lines starting with `#` are
    /// skipped), read at start-up. May be combined with `bearer_tokens`.
    #[serde(default)]
    pub bearer_tokens_file: Option<PathBuf>,
    /// Tokens that pin the tenant of the data: each resource of a request sent with one gets
    /// `tenant_attribute: <tenant>` when it has none, and its spans are refused when it names
    /// another tenant. Default none.
    #[serde(default)]
    pub tenants: Vec<TenantToken>,
    /// The resource attribute that names the tenant (the `join` processor's
    /// `tenant.sdk_keys` should list it). Default `tenant`.
    #[serde(default = "default_tenant_attribute")]
    pub tenant_attribute: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            bearer_tokens: Vec::new(),
            bearer_tokens_file: None,
            tenants: Vec::new(),
            tenant_attribute: default_tenant_attribute(),
        }
    }
}

/// One tenant's token: `token` or `token_file`, not both.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantToken {
    /// The tenant this token writes as. Required.
    pub tenant: String,
    /// The token (`${env:NAME}` keeps it out of the file).
    #[serde(default)]
    pub token: Option<String>,
    /// A file whose first non-blank line not starting with `#` is the token, read at start-up.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// The default resource attribute naming the tenant.
pub const DEFAULT_TENANT_ATTRIBUTE: &str = "tenant";

fn default_tenant_attribute() -> String {
    DEFAULT_TENANT_ATTRIBUTE.to_string()
}

/// One accepted token and, for a tenant token, its tenant.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credential {
    pub token: String,
    pub tenant: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        write!(f, "Credential(tenant: {:?})", self.tenant)
    }
}

impl AuthConfig {
    pub(crate) fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.bearer_tokens.is_empty()
            && self.bearer_tokens_file.is_none()
            && self.tenants.is_empty()
        {
            issues.push(ConfigIssue::new(
                "auth",
                "set bearer_tokens, bearer_tokens_file or tenants (or remove auth)",
            ));
        }
        for (i, t) in self.bearer_tokens.iter().enumerate() {
            if let Err(m) = check_token(t) {
                issues.push(ConfigIssue::new(format!("auth.bearer_tokens[{i}]"), m));
            }
        }
        let mut seen: Vec<&str> = self.bearer_tokens.iter().map(String::as_str).collect();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = |k: &str| format!("auth.tenants[{i}].{k}");
            if t.tenant.is_empty() {
                issues.push(ConfigIssue::new(
                    key("tenant"),
                    "must not be empty (an unset ${env:...}?)",
                ));
            }
            match (&t.token, &t.token_file) {
                (None, None) => {
                    issues.push(ConfigIssue::new(key("token"), "set token or token_file"))
                }
                (Some(_), Some(_)) => issues.push(ConfigIssue::new(
                    key("token_file"),
                    "set token or token_file, not both",
                )),
                (Some(tok), None) => {
                    if let Err(m) = check_token(tok) {
                        issues.push(ConfigIssue::new(key("token"), m));
                    } else if seen.contains(&tok.as_str()) {
                        // One token, two meanings: which tenant would it write as?
                        issues.push(ConfigIssue::new(
                            key("token"),
                            "is already used by another entry of bearer_tokens or tenants",
                        ));
                    }
                    seen.push(tok);
                }
                (None, Some(p)) => {
                    if p.as_os_str().is_empty() {
                        issues.push(ConfigIssue::new(key("token_file"), "must not be empty"));
                    }
                }
            }
        }
        if !self.tenants.is_empty() && self.tenant_attribute.is_empty() {
            issues.push(ConfigIssue::new(
                "auth.tenant_attribute",
                "must not be empty",
            ));
        }
    }

    /// Every accepted token: the inline ones and those of the files, with their tenants.
    pub(crate) fn credentials(&self) -> Result<Vec<Credential>, String> {
        let mut out: Vec<Credential> = self
            .bearer_tokens
            .iter()
            .map(|t| Credential {
                token: t.clone(),
                tenant: None,
            })
            .collect();
        if let Some(p) = &self.bearer_tokens_file {
            for t in token_lines(p, "auth.bearer_tokens_file")? {
                out.push(Credential {
                    token: t,
                    tenant: None,
                });
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            let token = match (&t.token, &t.token_file) {
                (Some(tok), _) => tok.clone(),
                (None, Some(p)) => {
                    let key = format!("auth.tenants[{i}].token_file");
                    token_lines(p, &key)?
                        .into_iter()
                        .next()
                        .ok_or_else(|| format!("{key} {}: no token in the file", p.display()))?
                }
                (None, None) => return Err(format!("auth.tenants[{i}]: no token")),
            };
            if out.iter().any(|c| c.token == token) {
                return Err(format!(
                    "auth.tenants[{i}]: its token is also given to another entry"
                ));
            }
            out.push(Credential {
                token,
                tenant: Some(t.tenant.clone()),
            });
        }
        if out.is_empty() {
            return Err("auth: no bearer token configured".into());
        }
        Ok(out)
    }
}

/// The tokens of a file, one a line (blank lines and `#` comments skipped), each checked.
fn token_lines(p: &std::path::Path, key: &str) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{key} {}: {e}", p.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        check_token(t).map_err(|m| format!("{key} {} line {}: {m}", p.display(), n + 1))?;
        out.push(t.to_string());
    }
    Ok(out)
}

/// A token must fit in a header value after `Bearer `: visible ASCII, no spaces.
fn check_token(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("is empty (an unset ${env:...}?)".into());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII without spaces".into());
    }
    Ok(())
}

fn default_max_recv_msg_size_mib() -> u64 {
    DEFAULT_MAX_RECV_MSG_SIZE_MIB
}
fn default_traces_url_path() -> String {
    DEFAULT_TRACES_URL_PATH.to_string()
}
fn default_max_request_body_size() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_SIZE
}
fn default_max_spans_per_request() -> usize {
    DecodeLimits::default().max_spans_per_request
}
fn default_max_attributes_per_span() -> usize {
    DecodeLimits::default().max_attributes_per_span
}
fn default_max_value_depth() -> usize {
    DecodeLimits::default().max_value_depth
}

/// `grpc:` (null) enables the protocol with defaults; an absent key (serde `default`) disables it.
fn present_means_enabled<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(Option::<T>::deserialize(d)?.unwrap_or_default()))
}

/// The default ports of a receiver type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DefaultPorts {
    pub grpc: u16,
    pub http: u16,
}

impl Protocols {
    pub(crate) fn grpc_endpoint(&self, ports: DefaultPorts) -> Option<String> {
        self.grpc.as_ref().map(|g| {
            g.endpoint
                .clone()
                .unwrap_or_else(|| format!("127.0.0.1:{}", ports.grpc))
        })
    }

    pub(crate) fn http_endpoint(&self, ports: DefaultPorts) -> Option<String> {
        self.http.as_ref().map(|h| {
            h.endpoint
                .clone()
                .unwrap_or_else(|| format!("127.0.0.1:{}", ports.http))
        })
    }

    pub(crate) fn listen_addrs(&self, ports: DefaultPorts) -> Vec<String> {
        self.grpc_endpoint(ports)
            .into_iter()
            .chain(self.http_endpoint(ports))
            .collect()
    }

    pub(crate) fn validate(&self, ports: DefaultPorts, issues: &mut Vec<ConfigIssue>) {
        if self.grpc.is_none() && self.http.is_none() {
            issues.push(ConfigIssue::new(
                "protocols",
                "at least one protocol (grpc or http) must be configured",
            ));
        }
        if let Some(g) = &self.grpc {
            if let Some(e) = &g.endpoint {
                if let Err(m) = check_endpoint(e) {
                    issues.push(ConfigIssue::new("protocols.grpc.endpoint", m));
                }
            }
            if g.max_recv_msg_size_mib == 0
                || g.max_recv_msg_size_mib.saturating_mul(1024 * 1024) > MAX_SIZE_BYTES
            {
                issues.push(ConfigIssue::new(
                    "protocols.grpc.max_recv_msg_size_mib",
                    format!(
                        "must be between 1 and {} (MiB), got {}",
                        MAX_SIZE_BYTES / 1024 / 1024,
                        g.max_recv_msg_size_mib
                    ),
                ));
            }
            if g.max_concurrent_streams == Some(0) {
                issues.push(ConfigIssue::new(
                    "protocols.grpc.max_concurrent_streams",
                    "must be at least 1",
                ));
            }
            if let Some(t) = &g.tls {
                validate_tls(t, "protocols.grpc.tls", issues);
            }
        }
        if let Some(h) = &self.http {
            if let Some(e) = &h.endpoint {
                if let Err(m) = check_endpoint(e) {
                    issues.push(ConfigIssue::new("protocols.http.endpoint", m));
                }
            }
            if !h.traces_url_path.starts_with('/') {
                issues.push(ConfigIssue::new(
                    "protocols.http.traces_url_path",
                    format!("must start with '/', got {:?}", h.traces_url_path),
                ));
            }
            if h.max_request_body_size == 0 || h.max_request_body_size > MAX_SIZE_BYTES {
                issues.push(ConfigIssue::new(
                    "protocols.http.max_request_body_size",
                    format!(
                        "must be between 1 and {MAX_SIZE_BYTES} (bytes), got {}",
                        h.max_request_body_size
                    ),
                ));
            }
            if let Some(t) = &h.tls {
                validate_tls(t, "protocols.http.tls", issues);
            }
        }
        if let (Some(g), Some(h)) = (self.grpc_endpoint(ports), self.http_endpoint(ports)) {
            if g == h && !g.ends_with(":0") {
                issues.push(ConfigIssue::new(
                    "protocols.http.endpoint",
                    format!("{h} is also the grpc endpoint; each protocol needs its own port"),
                ));
            }
        }
    }
}

/// The settings, then (only when they are complete) whether the files are there: a missing
/// certificate is the most likely mistake and `tailweave validate` should catch it.
fn validate_tls(t: &ServerTlsSettings, prefix: &str, issues: &mut Vec<ConfigIssue>) {
    let found = t.validate(prefix);
    if found.is_empty() {
        issues.extend(t.check_files(prefix));
    }
    issues.extend(found);
}

/// `host:port`, with a non-empty host (a name, an IPv4 address or a bracketed IPv6 address).
pub(crate) fn check_endpoint(e: &str) -> Result<(), String> {
    let bad = || format!("must be host:port (e.g. 127.0.0.1:4317), got {e:?}");
    let (host, port) = e.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?;
        inner.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
    } else if host.contains(':') {
        // An unbracketed IPv6 address is ambiguous with the port separator.
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [
            "127.0.0.1:4317",
            "0.0.0.0:0",
            "localhost:1",
            "[::1]:4317",
            "[::]:9",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "4317",
            ":4317",
            "127.0.0.1:",
            "127.0.0.1:70000",
            "::1:4317",
            "[::1:4317",
            "[nothex]:1",
            "a b:1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}

//! The `otlp` receiver: OTLP/gRPC and OTLP/HTTP (protobuf and JSON) for traces.
//!
//! # Layout
//! - [`auth`]: bearer tokens.
//! - [`config`]: the `protocols` layout shared with the `deepflow` receiver.
//! - [`ingest`]: decode, classify, hand on, count, answer: the part both transports share.
//! - [`grpc`]: `TraceService/Export` on tonic with a raw-bytes codec.
//! - [`http`]: `POST /v1/traces` on hyper.
//! - [`rpc`]: the `google.rpc` status and retry messages both write.
//! - [`tls`]: the TLS accept loop both use when `tls` is set.
//!
//! # Configuration
//!
//! ```yaml
//! receivers:
//!   otlp:
//!     protocols:
//!       grpc:                        # null: defaults (127.0.0.1:4317, 4 MiB messages)
//!       http:
//!         endpoint: 0.0.0.0:4318     # open to the network: consider `tls` and `auth`
//!         traces_url_path: /v1/traces
//!         max_request_body_size: 20971520
//!         tls:                       # also on grpc; client_ca_file turns on mTLS
//!           cert_file: /etc/tailweave/server.pem
//!           key_file: /etc/tailweave/server.key
//!     source: auto                   # auto | sdk | ebpf
//!     auth:
//!       bearer_tokens: ["${env:OTLP_TOKEN}"]     # may write any tenant
//!       tenants:                                 # pin the tenant of what they write
//!         - {tenant: team-a, token: "${env:TEAM_A_TOKEN}"}
//!       tenant_attribute: tenant
//! ```
//!
//! Answers: success or `partial_success` (spans with invalid ids are refused one by one);
//! `INVALID_ARGUMENT` / 400 for an unreadable body; `UNAVAILABLE` / 503 when the pipeline is
//! full or shutting down and `RESOURCE_EXHAUSTED` / 429 above the memory limit, both with a
//! retry delay (gRPC `RetryInfo`, HTTP `Retry-After`); `UNAUTHENTICATED` / 401 without a valid
//! token; `PERMISSION_DENIED` / 403 when a tenant token sent only another tenant's resources
//! (some of them: partial success). Every refusal is counted ([`ingest::REFUSED_SPANS`], [`ingest::REQUESTS`]).
//!
//! `build` binds every socket first (a port in use fails start-up, before anything serves);
//! `run` serves until shutdown, then closes the listeners and lets in-flight requests finish.
//! A request is answered only after its batch is in the pipelines' channels or refused, so a
//! client never sees success for a span that was dropped.

pub mod auth;
pub mod config;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod rpc;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::otlp::DecodeLimits;
use tailweave_core::tls::{ServerTls, ServerTlsSettings, ALPN_H2, ALPN_HTTP1};
use tailweave_core::{ComponentError, Consumer, Receiver};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{AuthConfig, GrpcConfig, HttpConfig, LimitsConfig, Protocols, SourceMode};
use config::{DefaultPorts, DEFAULT_SOURCE_HEADER};

use crate::deepflow::normalize::Role;

/// How long in-flight requests may take to finish after shutdown before their connections are
/// closed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const OTLP_PORTS: DefaultPorts = DefaultPorts {
    grpc: 4317,
    http: 4318,
};

/// Configuration of the `otlp` receiver.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpReceiverConfig {
    /// The protocols to serve; at least one. Present keys enable a protocol (`grpc:` alone
    /// means its defaults).
    #[serde(default)]
    pub protocols: Protocols,
    /// How spans are classified: `auto` (default: DeepFlow markers make a span eBPF-derived),
    /// `sdk`, or `ebpf`.
    #[serde(default)]
    pub source: SourceMode,
    /// Request limits (spans per request, attributes per span, value depth).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Bearer-token authentication; absent means none.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

impl OtlpReceiverConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        self.protocols.validate(OTLP_PORTS, &mut issues);
        self.limits.validate(&mut issues);
        if let Some(a) = &self.auth {
            a.validate(&mut issues);
        }
        issues
    }

    pub fn listen_addrs(&self) -> Vec<String> {
        self.protocols.listen_addrs(OTLP_PORTS)
    }

    pub async fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(self.bind(ctx).await?))
    }

    /// Binds the sockets and returns the concrete receiver (whose bound addresses tests read).
    pub async fn bind(&self, ctx: &BuildContext) -> Result<OtlpReceiver, ComponentError> {
        let role = match self.source {
            SourceMode::Auto => Some(Role::Shared),
            SourceMode::Sdk => None,
            SourceMode::Ebpf => Some(Role::Ebpf),
        };
        OtlpReceiver::bind(
            ctx,
            ServerSpec {
                protocols: &self.protocols,
                ports: OTLP_PORTS,
                role,
                limits: self.limits.decode_limits(),
                source_header: DEFAULT_SOURCE_HEADER,
                auth: self.auth.as_ref(),
            },
        )
        .await
    }
}

/// What distinguishes the receiver types that share [`OtlpReceiver`].
pub(crate) struct ServerSpec<'a> {
    pub protocols: &'a Protocols,
    pub ports: DefaultPorts,
    pub role: Option<Role>,
    pub limits: DecodeLimits,
    pub source_header: &'a str,
    pub auth: Option<&'a AuthConfig>,
}

/// An OTLP receiver with its sockets bound (`otlp`, and `deepflow` with the eBPF role).
pub struct OtlpReceiver {
    id: String,
    role: Option<Role>,
    limits: DecodeLimits,
    auth: Option<auth::BearerAuth>,
    tenant_attribute: Option<String>,
    grpc: Option<(TcpListener, grpc::GrpcSettings)>,
    http: Option<(TcpListener, http::HttpSettings)>,
    drain: Duration,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("id", &self.id)
            .field("grpc", &self.grpc_addr())
            .field("http", &self.http_addr())
            .finish()
    }
}

async fn bind_one(id: &str, addr: &str) -> Result<TcpListener, ComponentError> {
    let bind_err = |source| ComponentError::Bind {
        component: id.to_string(),
        addr: addr.to_string(),
        source,
    };
    let l = TcpListener::bind(addr).await.map_err(bind_err)?;
    Ok(l)
}

/// Loads a protocol's certificates; the error names the key of the `tls` block.
fn server_tls(
    id: &str,
    settings: Option<&ServerTlsSettings>,
    key: &str,
    alpn: &[&[u8]],
) -> Result<Option<Arc<ServerTls>>, ComponentError> {
    settings
        .map(|s| {
            ServerTls::new(s.clone(), alpn)
                .map(Arc::new)
                .map_err(|e| ComponentError::build(id, format!("{key}: {e}")))
        })
        .transpose()
}

impl OtlpReceiver {
    pub(crate) async fn bind(
        ctx: &BuildContext,
        spec: ServerSpec<'_>,
    ) -> Result<OtlpReceiver, ComponentError> {
        let ServerSpec {
            protocols,
            ports,
            role,
            limits,
            source_header,
            auth,
        } = spec;
        let id = ctx.id.clone();
        // Read token files before binding: a bad file must not leave a port half-open.
        let tenant_attribute = auth.map(|a| a.tenant_attribute.clone());
        let auth = match auth {
            Some(a) => {
                let creds = a.credentials().map_err(|m| ComponentError::build(&id, m))?;
                Some(auth::BearerAuth::with_grants(
                    creds
                        .into_iter()
                        .map(|c| {
                            let g = match c.tenant {
                                Some(t) => auth::Grant::Tenant(t.into()),
                                None => auth::Grant::Any,
                            };
                            (c.token, g)
                        })
                        .collect(),
                ))
            }
            None => None,
        };
        // Certificates too: a bad file fails start-up before any port is bound.
        let grpc_tls = server_tls(
            &id,
            protocols.grpc.as_ref().and_then(|g| g.tls.as_ref()),
            "protocols.grpc.tls",
            &[ALPN_H2],
        )?;
        let http_tls = server_tls(
            &id,
            protocols.http.as_ref().and_then(|h| h.tls.as_ref()),
            "protocols.http.tls",
            &[ALPN_H2, ALPN_HTTP1],
        )?;
        let source_header = source_header.to_ascii_lowercase();
        let grpc = match (&protocols.grpc, protocols.grpc_endpoint(ports)) {
            (Some(g), Some(addr)) => {
                let l = bind_one(&id, &addr).await?;
                let settings = grpc::GrpcSettings {
                    max_recv_msg_size: usize::try_from(
                        g.max_recv_msg_size_mib.saturating_mul(1024 * 1024),
                    )
                    .unwrap_or(usize::MAX),
                    max_concurrent_streams: g.max_concurrent_streams,
                    source_header: source_header.clone(),
                    tls: grpc_tls,
                };
                Some((l, settings))
            }
            _ => None,
        };
        let http = match (&protocols.http, protocols.http_endpoint(ports)) {
            (Some(h), Some(addr)) => {
                let l = bind_one(&id, &addr).await?;
                let settings = http::HttpSettings {
                    traces_url_path: h.traces_url_path.clone(),
                    max_request_body_size: usize::try_from(h.max_request_body_size)
                        .unwrap_or(usize::MAX),
                    source_header,
                    tls: http_tls,
                };
                Some((l, settings))
            }
            _ => None,
        };
        if grpc.is_none() && http.is_none() {
            return Err(ComponentError::build(&id, "no protocol configured"));
        }
        let r = OtlpReceiver {
            id,
            role,
            limits,
            auth,
            tenant_attribute,
            grpc,
            http,
            drain: DRAIN_TIMEOUT,
        };
        tracing::info!(
            receiver = %r.id,
            grpc = ?r.grpc_addr(),
            grpc_tls = r.grpc.as_ref().is_some_and(|(_, s)| s.tls.is_some()),
            http = ?r.http_addr(),
            http_tls = r.http.as_ref().is_some_and(|(_, s)| s.tls.is_some()),
            "receiver bound"
        );
        Ok(r)
    }

    /// The bound gRPC address (the real port when the config asked for port 0).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Every bound address, gRPC first.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.grpc_addr()
            .into_iter()
            .chain(self.http_addr())
            .collect()
    }

    /// Sets how long in-flight requests may take after shutdown (default [`DRAIN_TIMEOUT`]).
    pub fn with_drain_timeout(mut self, d: Duration) -> Self {
        self.drain = d;
        self
    }

    /// Serves until `shutdown` (the body of [`Receiver::run`], callable on the concrete type).
    pub async fn serve(
        self,
        out: Consumer,
        shutdown: CancellationToken,
    ) -> Result<(), ComponentError> {
        let mut ingest =
            ingest::Ingest::new(&self.id, self.role, self.limits, out).with_auth(self.auth);
        if let Some(k) = &self.tenant_attribute {
            ingest = ingest.with_tenant_attribute(k);
        }
        let ingest = Arc::new(ingest);
        let id = self.id;
        let drain = self.drain;
        let grpc = async {
            match self.grpc {
                Some((l, s)) => grpc::serve(l, ingest.clone(), s, shutdown.clone(), drain)
                    .await
                    .map_err(|e| ComponentError::runtime(&id, format!("gRPC server: {e}"))),
                None => Ok(()),
            }
        };
        let http = async {
            match self.http {
                Some((l, s)) => http::serve(l, ingest.clone(), s, shutdown.clone(), drain)
                    .await
                    .map_err(|e| ComponentError::runtime(&id, format!("HTTP server: {e}"))),
                None => Ok(()),
            }
        };
        tokio::try_join!(grpc, http)?;
        tracing::info!(receiver = %id, "receiver stopped");
        Ok(())
    }
}

#[async_trait]
impl Receiver for OtlpReceiver {
    async fn run(
        self: Box<Self>,
        out: Consumer,
        shutdown: CancellationToken,
    ) -> Result<(), ComponentError> {
        (*self).serve(out, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::config::parse;

    fn cfg(yaml: &str) -> Result<OtlpReceiverConfig, ConfigIssue> {
        parse(serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn null_protocol_means_defaults() {
        let c = cfg("protocols: {grpc: , http: }").unwrap();
        assert_eq!(c.protocols.grpc, Some(GrpcConfig::default()));
        assert_eq!(c.protocols.http, Some(HttpConfig::default()));
        assert_eq!(c.listen_addrs(), vec!["127.0.0.1:4317", "127.0.0.1:4318"]);
        assert!(c.validate().is_empty());
        let c = cfg("protocols: {http: {traces_url_path: /t}}").unwrap();
        assert_eq!(c.protocols.grpc, None);
        assert_eq!(c.listen_addrs(), vec!["127.0.0.1:4318"]);
    }

    #[test]
    fn no_protocol_is_an_error() {
        for y in ["~", "protocols: {}", "source: sdk"] {
            let issues = cfg(y).unwrap().validate();
            assert_eq!(issues.len(), 1, "{y}: {issues:?}");
            assert_eq!(issues[0].path, "protocols");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e = cfg("protocols: {grpc: {endpont: x}}").unwrap_err();
        assert!(e.path.starts_with("protocols.grpc"), "{e}");
        assert!(e.message.contains("endpont"), "{e}");
        assert!(cfg("protocols: {thrift: {}}").is_err());
        assert!(cfg("protocols: {grpc: }\nsource: magic").is_err());
    }

    #[test]
    fn huge_sizes_are_reported_not_overflowed() {
        let c = cfg("protocols: {grpc: {max_recv_msg_size_mib: 18446744073709551615}, http: {max_request_body_size: 18446744073709551615}}").unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec![
                "protocols.grpc.max_recv_msg_size_mib",
                "protocols.http.max_request_body_size"
            ]
        );
    }

    #[test]
    fn every_problem_reported_with_path() {
        let c = cfg(
            "protocols:\n  grpc: {endpoint: '4317', max_recv_msg_size_mib: 0}\n  http: {endpoint: 'h:1:2', traces_url_path: v1, max_request_body_size: 0}\nlimits: {max_spans_per_request: 0}",
        )
        .unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec![
                "protocols.grpc.endpoint",
                "protocols.grpc.max_recv_msg_size_mib",
                "protocols.http.endpoint",
                "protocols.http.traces_url_path",
                "protocols.http.max_request_body_size",
                "limits.max_spans_per_request",
            ]
        );
    }

    #[test]
    fn same_port_twice_is_an_error() {
        let c =
            cfg("protocols: {grpc: {endpoint: '127.0.0.1:9'}, http: {endpoint: '127.0.0.1:9'}}")
                .unwrap();
        let issues = c.validate();
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].path, "protocols.http.endpoint");
    }

    #[test]
    fn auth_needs_usable_tokens() {
        let c = cfg("protocols: {grpc: }\nauth: {bearer_tokens: ['', 'a b', ok]}").unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec!["auth.bearer_tokens[0]", "auth.bearer_tokens[1]"]
        );
        let c = cfg("protocols: {grpc: }\nauth: {}").unwrap();
        assert_eq!(c.validate()[0].path, "auth");
    }

    #[test]
    fn tenant_tokens_are_validated_with_paths() {
        let c = cfg("protocols: {grpc: }\nauth: {bearer_tokens: [shared], tenants: [{tenant: a, token: ta}, {tenant: '', token: tb}, {tenant: c}, {tenant: d, token: x, token_file: f}, {tenant: e, token: shared}, {tenant: f, token: 'a b'}], tenant_attribute: ''}").unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec![
                "auth.tenants[1].tenant",
                "auth.tenants[2].token",
                "auth.tenants[3].token_file",
                "auth.tenants[4].token",
                "auth.tenants[5].token",
                "auth.tenant_attribute",
            ]
        );
        let c = cfg("protocols: {grpc: }\nauth: {tenants: [{tenant: a, token: ta}]}").unwrap();
        assert!(c.validate().is_empty());
        let a = c.auth.unwrap();
        assert_eq!(a.tenant_attribute, "tenant");
        let creds = a.credentials().unwrap();
        assert_eq!(creds.len(), 1);
        assert_eq!(creds[0].tenant.as_deref(), Some("a"));
        assert!(cfg("protocols: {grpc: }\nauth: {tenants: [{tenant: a, secret: x}]}").is_err());
    }

    #[test]
    fn tenant_token_files_are_read_and_must_not_repeat_a_token() {
        let dir = std::env::temp_dir().join(format!("tailweave-tenant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.token");
        std::fs::write(&f, "# team a\n\n  tok-a  \n").unwrap();
        let c = cfg(&format!(
            "protocols: {{grpc: }}\nauth: {{tenants: [{{tenant: a, token_file: {}}}]}}",
            f.display()
        ))
        .unwrap();
        let creds = c.auth.as_ref().unwrap().credentials().unwrap();
        assert_eq!(creds[0].token, "tok-a");
        let c = cfg(&format!(
            "protocols: {{grpc: }}\nauth: {{bearer_tokens: [tok-a], tenants: [{{tenant: a, token_file: {}}}]}}",
            f.display()
        ))
        .unwrap();
        let e = c.auth.as_ref().unwrap().credentials().unwrap_err();
        assert!(e.contains("auth.tenants[0]"), "{e}");
        let missing = dir.join("missing.token");
        let c = cfg(&format!(
            "protocols: {{grpc: }}\nauth: {{tenants: [{{tenant: a, token_file: {}}}]}}",
            missing.display()
        ))
        .unwrap();
        let e = c.auth.as_ref().unwrap().credentials().unwrap_err();
        assert!(e.contains("auth.tenants[0].token_file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_problems_are_reported_with_their_paths() {
        let c = cfg("protocols: {grpc: {tls: {key_file: k.pem}}, http: {tls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem, client_ca_file: /nonexistent/ca.pem}}}").unwrap();
        let issues = c.validate();
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "protocols.grpc.tls.cert_file",
                "protocols.http.tls.cert_file",
                "protocols.http.tls.key_file",
                "protocols.http.tls.client_ca_file",
            ]
        );
        assert!(
            issues[1].message.contains("/nonexistent/c.pem"),
            "{}",
            issues[1]
        );
        assert!(cfg("protocols: {grpc: {tls: {cert_file: c, key_file: k, ca_file: x}}}").is_err());
    }

    #[test]
    fn the_deepflow_receiver_takes_the_same_tls_and_tenant_keys() {
        let c: crate::deepflow::DeepflowReceiverConfig = parse(
            serde_yaml::from_str(
                "protocols: {grpc: {tls: {cert_file: /nonexistent/c.pem}}}\nauth: {tenants: [{tenant: a}]}",
            )
            .unwrap(),
        )
        .unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec!["protocols.grpc.tls.key_file", "auth.tenants[0].token"]
        );
    }

    #[tokio::test]
    async fn a_certificate_that_does_not_load_fails_the_build_before_binding() {
        let dir = std::env::temp_dir().join(format!("tailweave-tls-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("c.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = cfg(&format!(
            "protocols: {{http: {{endpoint: '127.0.0.1:{port}', tls: {{cert_file: {p}, key_file: {p}}}}}}}",
            p = not_pem.display()
        ))
        .unwrap();
        assert!(c.validate().is_empty(), "the files exist");
        let ctx = BuildContext {
            id: "otlp/tls".into(),
            ..Default::default()
        };
        let m = c
            .build(&ctx)
            .await
            .err()
            .expect("no certificate")
            .to_string();
        assert!(
            m.contains("otlp/tls") && m.contains("protocols.http.tls"),
            "{m}"
        );
        // Nothing was left listening.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bind_error_names_component_and_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let c = cfg(&format!("protocols: {{http: {{endpoint: '{addr}'}}}}")).unwrap();
        let ctx = BuildContext {
            id: "otlp/in".into(),
            ..Default::default()
        };
        let e = c.build(&ctx).await.err().expect("port in use");
        let m = e.to_string();
        assert!(m.contains("otlp/in") && m.contains(&addr), "{m}");
    }
}

//! The `deepflow` receiver: an OTLP endpoint dedicated to DeepFlow's server exporter
//! (`ebpf-spans.md` §8). It is the `otlp` server with the eBPF role: every span it takes is
//! read into the eBPF model by [`normalize`], whatever markers it carries. Its own default
//! ports (14317 gRPC, 14318 HTTP) keep it apart from the SDK endpoint, which keeps the
//! self-filter's port lists narrow.

pub mod normalize;

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Receiver};

use crate::otlp::config::{DefaultPorts, DEFAULT_SOURCE_HEADER};
use crate::otlp::{AuthConfig, LimitsConfig, OtlpReceiver, Protocols, ServerSpec};
use normalize::Role;

const DEEPFLOW_PORTS: DefaultPorts = DefaultPorts {
    grpc: 14317,
    http: 14318,
};

/// Configuration of the `deepflow` receiver.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeepflowReceiverConfig {
    /// The protocols to serve; at least one. Default endpoints `127.0.0.1:14317` (grpc) and
    /// `127.0.0.1:14318` (http).
    #[serde(default)]
    pub protocols: Protocols,
    /// The request header DeepFlow's `extra-headers` sets (default `x-tailweave-source`). Only
    /// informational here: every span on this receiver is eBPF-derived anyway.
    #[serde(default = "default_source_header")]
    pub source_header: String,
    /// Request limits (spans per request, attributes per span, value depth).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Bearer-token authentication; absent means none.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

impl Default for DeepflowReceiverConfig {
    fn default() -> Self {
        DeepflowReceiverConfig {
            protocols: Protocols::default(),
            source_header: default_source_header(),
            limits: LimitsConfig::default(),
            auth: None,
        }
    }
}

fn default_source_header() -> String {
    DEFAULT_SOURCE_HEADER.to_string()
}

impl DeepflowReceiverConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        self.protocols.validate(DEEPFLOW_PORTS, &mut issues);
        self.limits.validate(&mut issues);
        if let Some(a) = &self.auth {
            a.validate(&mut issues);
        }
        if http::HeaderName::from_bytes(self.source_header.as_bytes()).is_err() {
            issues.push(ConfigIssue::new(
                "source_header",
                format!("{:?} is not a valid header name", self.source_header),
            ));
        }
        issues
    }

    pub fn listen_addrs(&self) -> Vec<String> {
        self.protocols.listen_addrs(DEEPFLOW_PORTS)
    }

    pub async fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(self.bind(ctx).await?))
    }

    /// Binds the sockets and returns the concrete receiver (whose bound addresses tests read).
    pub async fn bind(&self, ctx: &BuildContext) -> Result<OtlpReceiver, ComponentError> {
        OtlpReceiver::bind(
            ctx,
            ServerSpec {
                protocols: &self.protocols,
                ports: DEEPFLOW_PORTS,
                role: Some(Role::Ebpf),
                limits: self.limits.decode_limits(),
                source_header: &self.source_header,
                auth: self.auth.as_ref(),
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::config::parse;

    #[test]
    fn own_default_ports() {
        let c: DeepflowReceiverConfig =
            parse(serde_yaml::from_str("protocols: {grpc: , http: }").unwrap()).unwrap();
        assert_eq!(c.listen_addrs(), vec!["127.0.0.1:14317", "127.0.0.1:14318"]);
        assert!(c.validate().is_empty());
        assert_eq!(c.source_header, "x-tailweave-source");
    }

    #[test]
    fn bad_header_and_no_protocol() {
        let c: DeepflowReceiverConfig =
            parse(serde_yaml::from_str("source_header: 'a b'").unwrap()).unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, vec!["protocols", "source_header"]);
        let e = parse::<DeepflowReceiverConfig>(serde_yaml::from_str("source: ebpf").unwrap());
        assert!(e.is_err(), "source is not a deepflow key");
    }
}

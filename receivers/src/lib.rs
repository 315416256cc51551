//! tailweave receivers: where spans enter.
//!
//! # Layout
//! - [`otlp`]: OTLP/gRPC and OTLP/HTTP (protobuf and JSON) for SDK spans; recognises DeepFlow spans.
//! - [`deepflow`]: an OTLP endpoint dedicated to DeepFlow's exporter, plus the normalizer that reads
//!   DeepFlow rows into the eBPF model (`deepflow::normalize`).
//! - [`ebpf`]: tailweave's own kernel capture (Linux): syscall tracepoints into eBPF spans.
//!
//! A receiver config is parsed and validated without side effects; `build` binds its sockets
//! (so a port in use fails start-up, before anything serves) and returns a [`Receiver`].

use tailweave_core::config::{parse, BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Receiver};

pub mod deepflow;
pub mod ebpf;
pub mod otlp;

/// Every receiver type this build knows.
pub const KINDS: &[&str] = &["otlp", "deepflow", "ebpf"];

#[derive(Debug, Clone)]
pub enum ReceiverConfig {
    Otlp(otlp::OtlpReceiverConfig),
    Deepflow(deepflow::DeepflowReceiverConfig),
    Ebpf(Box<ebpf::EbpfReceiverConfig>),
}

impl ReceiverConfig {
    /// Parses the YAML subtree of a receiver of type `kind`. `Ok(None)`: unknown type.
    pub fn parse(kind: &str, value: serde_yaml::Value) -> Result<Option<Self>, ConfigIssue> {
        Ok(Some(match kind {
            "otlp" => ReceiverConfig::Otlp(parse(value)?),
            "deepflow" => ReceiverConfig::Deepflow(parse(value)?),
            "ebpf" => ReceiverConfig::Ebpf(Box::new(parse(value)?)),
            _ => return Ok(None),
        }))
    }

    pub fn validate(&self) -> Vec<ConfigIssue> {
        match self {
            ReceiverConfig::Otlp(c) => c.validate(),
            ReceiverConfig::Deepflow(c) => c.validate(),
            ReceiverConfig::Ebpf(c) => c.validate(),
        }
    }

    /// The `host:port` addresses this receiver will listen on.
    pub fn listen_addrs(&self) -> Vec<String> {
        match self {
            ReceiverConfig::Otlp(c) => c.listen_addrs(),
            ReceiverConfig::Deepflow(c) => c.listen_addrs(),
            ReceiverConfig::Ebpf(c) => c.listen_addrs(),
        }
    }

    /// Binds the sockets. Must run inside a tokio runtime.
    pub async fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Receiver>, ComponentError> {
        match self {
            ReceiverConfig::Otlp(c) => c.build(ctx).await,
            ReceiverConfig::Deepflow(c) => c.build(ctx).await,
            ReceiverConfig::Ebpf(c) => c.build(ctx).await,
        }
    }
}

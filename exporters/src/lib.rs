//! tailweave exporters: where spans leave.
//!
//! # Layout
//! - [`queue`]: the sending queue (bounded, N consumers), retry with backoff and timeout, wrapped
//!   around every exporter, like the Collector's exporterhelper.
//! - [`otlp`]: OTLP/gRPC; [`otlp_http`]: OTLP/HTTP protobuf; [`debug`]: logs what passes;
//!   [`file`]: OTLP/JSON lines; [`load_balancing`]: routes traces to several tailweave instances by
//!   trace id; [`prometheus`] and [`prometheus_remote_write`]: the span metrics (RED).
//!
//! `build` returns a [`RunningExporter`]: the input of its queue and the task that drains it.

use tailweave_core::config::{parse, BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, SpanBatch};
use tokio::sync::mpsc;

pub mod debug;
pub mod file;
pub mod load_balancing;
pub mod otlp;
pub mod otlp_http;
pub mod prometheus;
pub mod prometheus_remote_write;
pub mod queue;
#[cfg(test)]
mod test_pki;

/// Every exporter type this build knows.
pub const KINDS: &[&str] = &[
    "otlp",
    "otlp_http",
    "debug",
    "file",
    "load_balancing",
    "prometheus",
    "prometheus_remote_write",
];

#[derive(Debug, Clone)]
pub enum ExporterConfig {
    Otlp(otlp::OtlpExporterConfig),
    OtlpHttp(otlp_http::OtlpHttpExporterConfig),
    Debug(debug::DebugExporterConfig),
    File(file::FileExporterConfig),
    LoadBalancing(Box<load_balancing::LoadBalancingExporterConfig>),
    Prometheus(prometheus::PrometheusExporterConfig),
    PrometheusRemoteWrite(Box<prometheus_remote_write::PrometheusRemoteWriteExporterConfig>),
}

/// A started exporter. Dropping every clone of `input` starts its shutdown: it drains what it holds
/// (bounded by its deadline) and `done` completes.
pub struct RunningExporter {
    pub input: mpsc::Sender<SpanBatch>,
    pub done: tokio::task::JoinHandle<()>,
}

impl ExporterConfig {
    /// Parses the YAML subtree of an exporter of type `kind`. `Ok(None)`: unknown type.
    pub fn parse(kind: &str, value: serde_yaml::Value) -> Result<Option<Self>, ConfigIssue> {
        Ok(Some(match kind {
            "otlp" => ExporterConfig::Otlp(parse(value)?),
            "otlp_http" | "otlphttp" => ExporterConfig::OtlpHttp(parse(value)?),
            "debug" => ExporterConfig::Debug(parse(value)?),
            "file" => ExporterConfig::File(parse(value)?),
            "load_balancing" | "loadbalancing" => {
                ExporterConfig::LoadBalancing(Box::new(parse(value)?))
            }
            "prometheus" => ExporterConfig::Prometheus(parse(value)?),
            "prometheus_remote_write" | "prometheusremotewrite" => {
                ExporterConfig::PrometheusRemoteWrite(Box::new(parse(value)?))
            }
            _ => return Ok(None),
        }))
    }

    pub fn validate(&self) -> Vec<ConfigIssue> {
        match self {
            ExporterConfig::Otlp(c) => c.validate(),
            ExporterConfig::OtlpHttp(c) => c.validate(),
            ExporterConfig::Debug(c) => c.validate(),
            ExporterConfig::File(c) => c.validate(),
            ExporterConfig::LoadBalancing(c) => c.validate(),
            ExporterConfig::Prometheus(c) => c.validate(),
            ExporterConfig::PrometheusRemoteWrite(c) => c.validate(),
        }
    }

    /// The `host:port` of every destination (for the self-filter).
    pub fn endpoints(&self) -> Vec<String> {
        match self {
            ExporterConfig::Otlp(c) => c.endpoints(),
            ExporterConfig::OtlpHttp(c) => c.endpoints(),
            ExporterConfig::LoadBalancing(c) => c.endpoints(),
            ExporterConfig::Prometheus(c) => c.endpoints(),
            ExporterConfig::PrometheusRemoteWrite(c) => c.endpoints(),
            ExporterConfig::Debug(_) | ExporterConfig::File(_) => Vec::new(),
        }
    }

    /// `true` when the exporter keeps the acks of a batch until the batch is on disk (a sending
    /// queue with `storage: file`), so a receiver's answer means "written". Every other exporter
    /// takes a batch when its queue's channel does.
    pub fn holds_durably(&self) -> bool {
        match self {
            ExporterConfig::Otlp(c) => c.sending_queue.disk("").is_some(),
            ExporterConfig::OtlpHttp(c) => c.sending_queue.disk("").is_some(),
            ExporterConfig::LoadBalancing(c) => c.protocol.otlp.sending_queue.disk("").is_some(),
            _ => false,
        }
    }

    /// Starts the exporter. Must run inside a tokio runtime.
    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        match self {
            ExporterConfig::Otlp(c) => c.build(ctx),
            ExporterConfig::OtlpHttp(c) => c.build(ctx),
            ExporterConfig::Debug(c) => c.build(ctx),
            ExporterConfig::File(c) => c.build(ctx),
            ExporterConfig::LoadBalancing(c) => c.build(ctx),
            ExporterConfig::Prometheus(c) => c.build(ctx),
            ExporterConfig::PrometheusRemoteWrite(c) => c.build(ctx),
        }
    }
}

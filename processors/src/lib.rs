//! tailweave processors: the stages between receivers and exporters.
//!
//! # Layout
//! - [`batch`]: groups spans into larger batches (size and timeout).
//! - [`self_filter`]: drops spans describing tailweave's own traffic.
//! - [`join`]: merges SDK spans and eBPF-derived spans into whole traces.
//! - [`tail_sampling`]: whole-trace sampling decisions.
//! - [`span_metrics`]: RED metrics over every span, before sampling.
//! - [`propagate`]: copies trace-level attributes (user id, tenant) onto every span of a trace.
//! - [`extract`]: lifts fields out of attributes (JSON pointer, regex, key=value), may mark errors.
//!
//! Every processor is a config (`serde`, `deny_unknown_fields`), a pure `validate`, and a `build`
//! returning a synchronous [`Processor`] state machine that `collector` drives.

use tailweave_core::config::{parse, BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Processor};

pub mod batch;
pub mod extract;
pub mod join;
pub mod propagate;
mod record_log;
pub mod self_filter;
pub mod span_metrics;
pub mod tail_sampling;

/// Every processor type this build knows.
pub const KINDS: &[&str] = &[
    "batch",
    "self_filter",
    "join",
    "tail_sampling",
    "span_metrics",
    "propagate",
    "extract",
];

/// A parsed processor config.
#[derive(Debug, Clone)]
pub enum ProcessorConfig {
    Batch(batch::BatchConfig),
    SelfFilter(self_filter::SelfFilterConfig),
    Join(Box<join::JoinConfig>),
    TailSampling(Box<tail_sampling::TailSamplingConfig>),
    SpanMetrics(Box<span_metrics::SpanMetricsConfig>),
    Propagate(propagate::PropagateConfig),
    Extract(extract::ExtractConfig),
}

impl ProcessorConfig {
    /// Parses the YAML subtree of a processor of type `kind`. `Ok(None)`: unknown type.
    pub fn parse(kind: &str, value: serde_yaml::Value) -> Result<Option<Self>, ConfigIssue> {
        Ok(Some(match kind {
            "batch" => ProcessorConfig::Batch(parse(value)?),
            "self_filter" => ProcessorConfig::SelfFilter(parse(value)?),
            "join" => ProcessorConfig::Join(Box::new(parse(value)?)),
            "tail_sampling" => ProcessorConfig::TailSampling(Box::new(parse(value)?)),
            "span_metrics" => ProcessorConfig::SpanMetrics(Box::new(parse(value)?)),
            "propagate" => ProcessorConfig::Propagate(parse(value)?),
            "extract" => ProcessorConfig::Extract(parse(value)?),
            _ => return Ok(None),
        }))
    }

    /// Every problem the config has, with paths relative to the component.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        match self {
            ProcessorConfig::Batch(c) => c.validate(),
            ProcessorConfig::SelfFilter(c) => c.validate(),
            ProcessorConfig::Join(c) => c.validate(),
            ProcessorConfig::TailSampling(c) => c.validate(),
            ProcessorConfig::SpanMetrics(c) => c.validate(),
            ProcessorConfig::Propagate(c) => c.validate(),
            ProcessorConfig::Extract(c) => c.validate(),
        }
    }

    /// Lines describing derived settings, printed by `tailweave validate` (e.g. self-filter rules).
    pub fn describe(&self, ctx: &BuildContext) -> Vec<String> {
        match self {
            ProcessorConfig::SelfFilter(c) => c.describe(ctx),
            _ => Vec::new(),
        }
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Processor>, ComponentError> {
        Ok(match self {
            ProcessorConfig::Batch(c) => Box::new(c.build(ctx)?),
            ProcessorConfig::SelfFilter(c) => Box::new(c.build(ctx)?),
            ProcessorConfig::Join(c) => Box::new(c.build(ctx)?),
            ProcessorConfig::TailSampling(c) => Box::new(c.build(ctx)?),
            ProcessorConfig::SpanMetrics(c) => Box::new(c.build(ctx)?),
            ProcessorConfig::Propagate(c) => Box::new(c.build(ctx)?),
            ProcessorConfig::Extract(c) => Box::new(c.build(ctx)?),
        })
    }
}

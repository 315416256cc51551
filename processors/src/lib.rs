//! tailweave processors: the stages between receivers and exporters.
//!
//! # Layout
//! - [`batch`]: groups spans into larger batches (size and timeout).
//! - [`self_filter`]: drops spans describing tailweave's own traffic.
//! - [`join`]: merges SDK spans and eBPF-derived spans into whole traces.
//! - [`tail_sampling`]: whole-trace sampling decisions.
//!
//! Every processor is a config (`serde`, `deny_unknown_fields`), a pure `validate`, and a `build`
//! returning a synchronous [`Processor`] state machine that `collector` drives.

use tailweave_core::config::{parse, BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Processor};

pub mod batch;
pub mod join;
pub mod self_filter;
pub mod tail_sampling;

/// Every processor type this build knows.
pub const KINDS: &[&str] = &["batch", "self_filter", "join", "tail_sampling"];

/// A parsed processor config.
#[derive(Debug, Clone)]
pub enum ProcessorConfig {
    Batch(batch::BatchConfig),
    SelfFilter(self_filter::SelfFilterConfig),
    Join(Box<join::JoinConfig>),
    TailSampling(Box<tail_sampling::TailSamplingConfig>),
}

impl ProcessorConfig {
    /// Parses the YAML subtree of a processor of type `kind`. `Ok(None)`: unknown type.
    pub fn parse(kind: &str, value: serde_yaml::Value) -> Result<Option<Self>, ConfigIssue> {
        Ok(Some(match kind {
            "batch" => ProcessorConfig::Batch(parse(value)?),
            "self_filter" => ProcessorConfig::SelfFilter(parse(value)?),
            "join" => ProcessorConfig::Join(Box::new(parse(value)?)),
            "tail_sampling" => ProcessorConfig::TailSampling(Box::new(parse(value)?)),
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
        })
    }
}

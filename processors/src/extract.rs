//! Skeleton: replaced by the real implementation.

use std::time::Instant;

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Processor, SpanBatch};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractConfig {}

impl ExtractConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        Vec::new()
    }
    pub fn build(&self, ctx: &BuildContext) -> Result<Extract, ComponentError> {
        Err(ComponentError::build(&ctx.id, "not implemented yet"))
    }
}

pub struct Extract;

impl Processor for Extract {
    fn process(&mut self, _now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        out.push(batch);
    }
}

//! The `batch` processor. (Skeleton.)
use std::time::Instant;

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Processor, SpanBatch};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {}

impl BatchConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        Vec::new()
    }
    pub fn build(&self, _ctx: &BuildContext) -> Result<Batch, ComponentError> {
        Ok(Batch)
    }
}

pub struct Batch;

impl Processor for Batch {
    fn process(&mut self, _now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        out.push(batch);
    }
}

//! Skeleton: replaced by the real implementation.

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::ComponentError;

use crate::RunningExporter;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusRemoteWriteExporterConfig {}

impl PrometheusRemoteWriteExporterConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        Vec::new()
    }
    pub fn endpoints(&self) -> Vec<String> {
        Vec::new()
    }
    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        Err(ComponentError::build(&ctx.id, "not implemented yet"))
    }
}

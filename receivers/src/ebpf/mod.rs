//! The `ebpf` receiver. (Skeleton: replaced by the real implementation.)

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Receiver};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EbpfReceiverConfig {}

impl EbpfReceiverConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        Vec::new()
    }
    pub fn listen_addrs(&self) -> Vec<String> {
        Vec::new()
    }
    pub async fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Receiver>, ComponentError> {
        Err(ComponentError::build(&ctx.id, "not implemented yet"))
    }
}

//! `tailweave loadgen`: a realistic mixed workload generator. (Work in progress.)
//!
//! # Layout
//! - [`scenario`]: the pure, seeded generator (SDK spans, DeepFlow rows, ground truth).
//! - [`truth`]: the ground truth and the comparison of a join's output with it.
//! - `rng`: the fixed PRNG behind the determinism.

mod rng;
pub mod scenario;
pub mod truth;

/// Command-line options of `tailweave loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {}

/// Runs the generator with the given options.
pub async fn run(_args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::bail!("loadgen is not implemented yet")
}

//! `tailweave loadgen`: a realistic mixed workload generator. (Skeleton.)

/// Command-line options of `tailweave loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {}

/// Runs the generator with the given options.
pub async fn run(_args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::bail!("loadgen is not implemented yet")
}

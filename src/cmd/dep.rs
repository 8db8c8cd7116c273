//! `balsam dep PARENT CHILD`: add a dependency.

use anyhow::Result;

use super::Ctx;

/// Arguments of `balsam dep`.
#[derive(clap::Args)]
pub struct DepArgs {
    /// Parent job id (any unique prefix)
    pub parent: String,
    /// Child job id (any unique prefix)
    pub child: String,
}

/// Adds the edge; the store refuses cycles, duplicates and children already past their parents.
pub fn run(ctx: &mut Ctx, a: &DepArgs) -> Result<()> {
    let (p, c) = ctx.store.add_dependency(&a.parent, &a.child)?;
    tracing::info!(parent = %p.job_id, child = %c.job_id, "dependency added");
    println!("Created link {} --> {}", p.cute_id(), c.cute_id());
    Ok(())
}

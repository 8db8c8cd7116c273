//! `balsam mkchild`: from inside a running job, add a child of it. The child starts as a copy of
//! the current job (same workflow, application and resources), with the given flags on top.

use anyhow::{Context, Result};
use balsam_store::NewJob;

use super::job::{describe, JobFlags};
use super::Ctx;

/// Arguments of `balsam mkchild`.
#[derive(clap::Args)]
pub struct MkchildArgs {
    #[command(flatten)]
    pub flags: JobFlags,
    /// The parent job (default: $BALSAM_JOB_ID, set for every job a launcher runs)
    #[arg(long)]
    pub parent: Option<String>,
    /// Accepted for symmetry with `balsam job`; mkchild never asks
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Adds the child and prints its block.
pub fn run(ctx: &mut Ctx, a: &MkchildArgs) -> Result<()> {
    let parent_id = match &a.parent {
        Some(p) => p.clone(),
        None => std::env::var("BALSAM_JOB_ID").context(
            "mkchild makes a child of the current job, but BALSAM_JOB_ID is not set: run it inside a job, or pass --parent ID",
        )?,
    };
    let parent = ctx.store.job(&parent_id)?;
    let mut spec = parent.spec.clone();
    spec.name = format!("{}_child", parent.spec.name);
    spec.data = serde_json::json!({});
    a.flags.apply(&mut spec)?;
    let id = balsam_store::new_job_id();
    let child = ctx.store.add_job(&NewJob {
        job_id: Some(id),
        spec,
        parents: vec![parent.job_id],
    })?;
    tracing::info!(job = %child.job_id, parent = %parent.job_id, "child job added");
    print!(
        "{}",
        describe(&mut ctx.store, &child, &[parent.job_id.to_string()])
    );
    println!("Added child of {} to database", parent.cute_id());
    Ok(())
}

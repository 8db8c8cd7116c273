//! `balsam killjob --id ID [--recursive]`: USER_KILLED, without removing the job.

use anyhow::Result;

use super::{find_job, Ctx};

/// Arguments of `balsam killjob`.
#[derive(clap::Args)]
pub struct KilljobArgs {
    /// Job id (any unique prefix)
    #[arg(long)]
    pub id: String,
    /// Kill the job's descendants too
    #[arg(long)]
    pub recursive: bool,
}

/// Marks the job (and descendants) USER_KILLED; a launcher running it stops the process.
pub fn run(ctx: &mut Ctx, a: &KilljobArgs) -> Result<()> {
    let job = find_job(&mut ctx.store, &a.id)?;
    let killed = ctx.store.kill(job.pk, a.recursive)?;
    if killed.is_empty() {
        println!(
            "{} is already {}; nothing to kill",
            job.cute_id(),
            job.state
        );
    }
    for k in &killed {
        tracing::info!(job = %k.job_id, "killed by user");
        println!("Killed {}", k.cute_id());
    }
    Ok(())
}

//! `balsam rm jobs|apps (--name N | --id ID | --all) [--wf-filter W] [--force]`.

use anyhow::{bail, Result};
use balsam_store::JobFilter;

use super::Ctx;

/// What to remove.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum RmWhat {
    /// Jobs
    Jobs,
    /// Applications
    Apps,
}

/// Arguments of `balsam rm`.
#[derive(clap::Args)]
pub struct RmArgs {
    /// jobs or apps
    pub what: RmWhat,
    /// Remove those with exactly this name
    #[arg(long, group = "sel")]
    pub name: Option<String>,
    /// Remove the job with this id (any unique prefix)
    #[arg(long, group = "sel")]
    pub id: Option<String>,
    /// Remove all (of the workflow, with --wf-filter)
    #[arg(long, group = "sel")]
    pub all: bool,
    /// Only jobs of this workflow
    #[arg(long)]
    pub wf_filter: Option<String>,
    /// Do not ask; for apps, also remove applications that jobs still use
    #[arg(long)]
    pub force: bool,
}

/// Removes what was selected after confirmation.
pub fn run(ctx: &mut Ctx, a: &RmArgs) -> Result<()> {
    if a.name.is_none() && a.id.is_none() && !a.all {
        bail!("say what to remove: --name NAME, --id ID or --all");
    }
    match a.what {
        RmWhat::Apps => {
            if a.id.is_some() {
                bail!("applications are removed by --name or --all");
            }
            let names = a.name.clone().map(|n| vec![n]);
            if !a.force
                && !super::confirm(&format!(
                    "Remove {}?",
                    names
                        .as_ref()
                        .map(|n| n[0].clone())
                        .unwrap_or_else(|| "all applications".into())
                ))?
            {
                bail!("nothing removed: not confirmed (pass --force to remove without asking)");
            }
            let removed = ctx.store.remove_apps(names.as_deref(), a.force)?;
            for n in &removed {
                tracing::info!(app = %n, "application removed");
            }
            println!("Removed {} application(s)", removed.len());
        }
        RmWhat::Jobs => {
            let mut pks = Vec::new();
            if let Some(id) = &a.id {
                let j = ctx.store.job(id)?;
                if a.wf_filter.as_ref().is_some_and(|w| *w != j.spec.workflow) {
                    bail!(
                        "job {} is not in workflow {:?}",
                        j.cute_id(),
                        a.wf_filter.as_deref().unwrap_or("")
                    );
                }
                pks.push(j.pk);
            } else {
                let filter = JobFilter {
                    name: a.name.clone(),
                    workflow: a.wf_filter.clone(),
                    ..JobFilter::default()
                };
                let (jobs, _) = ctx.store.list_jobs(&filter, usize::MAX >> 1)?;
                pks.extend(
                    jobs.iter()
                        .filter(|j| a.name.as_ref().is_none_or(|n| &j.spec.name == n))
                        .map(|j| j.pk),
                );
            }
            if pks.is_empty() {
                println!("No jobs matched; nothing removed");
                return Ok(());
            }
            if !a.force
                && !super::confirm(&format!("Remove {} job(s) and their history?", pks.len()))?
            {
                bail!("nothing removed: not confirmed (pass --force to remove without asking)");
            }
            let n = ctx.store.remove_jobs(&pks)?;
            tracing::info!(count = n, "jobs removed");
            println!("Removed {n} job(s)");
        }
    }
    Ok(())
}

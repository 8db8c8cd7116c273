//! `balsam rm jobs|apps (--name N | --id ID | --all) [--wf-filter W] [--yes | --force]`.
//!
//! Names and workflows match as in legacy Balsam and `balsam ls`: any part of the name, ignoring
//! case. So that a short name never removes more than meant, the jobs are listed and the user is
//! asked, unless `--yes` (or `--force`, its older spelling) says not to ask.

use std::io::Write;

use anyhow::{bail, Result};
use balsam_store::{Job, JobFilter};

use super::Ctx;
use crate::output::table;

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
    /// Remove those whose name contains this, ignoring case (as `ls --name`; they are listed
    /// and you are asked first)
    #[arg(long, group = "sel")]
    pub name: Option<String>,
    /// Remove the job with this id (any unique prefix)
    #[arg(long, group = "sel")]
    pub id: Option<String>,
    /// Remove all (of the workflow, with --wf-filter)
    #[arg(long, group = "sel")]
    pub all: bool,
    /// Only jobs whose workflow contains this, ignoring case
    #[arg(long)]
    pub wf_filter: Option<String>,
    /// Do not ask
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Do not ask; for apps, also remove applications that jobs still use
    #[arg(long)]
    pub force: bool,
}

/// Jobs listed before the question; the rest are counted.
const SHOWN: usize = 20;

/// Removes what was selected, after listing it and asking (unless --yes or --force).
pub fn run(ctx: &mut Ctx, a: &RmArgs) -> Result<()> {
    if a.name.is_none() && a.id.is_none() && !a.all {
        bail!("say what to remove: --name NAME, --id ID or --all");
    }
    let ask = !(a.yes || a.force);
    match a.what {
        RmWhat::Apps => {
            if a.id.is_some() {
                bail!("applications are removed by --name or --all");
            }
            let names = a.name.clone().map(|n| vec![n]);
            if ask
                && !super::confirm(&format!(
                    "Remove {}?",
                    names
                        .as_ref()
                        .map(|n| format!("application {:?}", n[0]))
                        .unwrap_or_else(|| "all applications".into())
                ))?
            {
                bail!("nothing removed: not confirmed (pass --yes to remove without asking)");
            }
            let removed = ctx.store.remove_apps(names.as_deref(), a.force)?;
            for n in &removed {
                tracing::info!(app = %n, "application removed");
            }
            println!("Removed {} application(s)", removed.len());
        }
        RmWhat::Jobs => {
            let jobs: Vec<Job> = if let Some(id) = &a.id {
                let j = ctx.store.job(id)?;
                let filter = JobFilter {
                    workflow: a.wf_filter.clone(),
                    id: Some(j.job_id.to_string()),
                    ..JobFilter::default()
                };
                if a.wf_filter.is_some() && ctx.store.list_jobs(&filter, 1)?.0.is_empty() {
                    bail!(
                        "job {} is in workflow {:?}, which does not match --wf-filter {:?}",
                        j.cute_id(),
                        j.spec.workflow,
                        a.wf_filter.as_deref().unwrap_or("")
                    );
                }
                vec![j]
            } else {
                let filter = JobFilter {
                    name: a.name.clone(),
                    workflow: a.wf_filter.clone(),
                    ..JobFilter::default()
                };
                ctx.store.list_jobs(&filter, usize::MAX >> 1)?.0
            };
            if jobs.is_empty() {
                println!("No jobs matched; nothing removed");
                return Ok(());
            }
            if ask {
                // What would go, before the question: a name matches as a substring, so
                // `--name dummy1` also matches dummy10..dummy19.
                let header: Vec<String> = ["job_id", "name", "workflow", "state"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .take(SHOWN)
                    .map(|j| {
                        vec![
                            j.job_id.to_string(),
                            j.spec.name.clone(),
                            j.spec.workflow.clone(),
                            j.state.to_string(),
                        ]
                    })
                    .collect();
                let mut err = std::io::stderr().lock();
                table(&mut err, &header, &rows)?;
                if jobs.len() > SHOWN {
                    writeln!(err, "... and {} more", jobs.len() - SHOWN)?;
                }
                drop(err);
                if !super::confirm(&format!(
                    "Remove these {} job(s) and their history?",
                    jobs.len()
                ))? {
                    bail!("nothing removed: not confirmed (pass --yes to remove without asking)");
                }
            }
            let pks: Vec<i64> = jobs.iter().map(|j| j.pk).collect();
            let n = ctx.store.remove_jobs(&pks)?;
            tracing::info!(count = n, "jobs removed");
            println!("Removed {n} job(s)");
        }
    }
    Ok(())
}

//! `balsam submit-launch`: put one launcher job in the batch queue, as the talk shows it.

use anyhow::{Context, Result};
use balsam::batch::{self, LaunchRequest, Site};
use balsam_launcher::JobMode;

use super::Ctx;

/// More nodes than any machine has: a typo, not a request.
const MAX_NODES: i64 = 100_000;
/// Thirty days: longer than any batch queue allows.
const MAX_MINUTES: i64 = 43_200;

/// Arguments of `balsam submit-launch`.
#[derive(clap::Args, Debug)]
pub struct SubmitLaunchArgs {
    /// Nodes to ask for (1 to 100000)
    #[arg(short = 'n', long = "nodes", value_name = "NODES",
          value_parser = clap::value_parser!(u32).range(1..=MAX_NODES))]
    pub nodes: u32,
    /// Wall time, minutes (1 to 43200, 30 days)
    #[arg(short = 't', long = "time-minutes", value_name = "MINUTES",
          value_parser = clap::value_parser!(u32).range(1..=MAX_MINUTES))]
    pub time_minutes: u32,
    /// Queue (Slurm partition); required on Cobalt
    #[arg(short = 'q', long, value_name = "QUEUE", default_value = "")]
    pub queue: String,
    /// Project (account) to charge (default: DEFAULT_PROJECT in settings.json)
    #[arg(short = 'A', long, value_name = "PROJECT", default_value = "")]
    pub project: String,
    /// Launcher job mode
    #[arg(long, value_enum, default_value_t = JobMode::Mixed)]
    pub job_mode: JobMode,
    /// Run only jobs whose workflow contains this text (default: all jobs)
    #[arg(long, value_name = "W", default_value = "")]
    pub wf_filter: String,
    /// Extra scheduler flags, as one quoted string (e.g. "--attrs ssds=required")
    #[arg(
        long,
        value_name = "FLAGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub sched_flags: String,
}

/// Submits the launch and prints it.
pub fn run(ctx: &mut Ctx, a: &SubmitLaunchArgs) -> Result<()> {
    let site = Site::open(&ctx.store.dir).context("cannot read the site's settings")?;
    let req = LaunchRequest {
        nodes: a.nodes,
        wall_minutes: a.time_minutes,
        queue: a.queue.clone(),
        project: a.project.clone(),
        job_mode: a.job_mode.as_str().to_string(),
        wf_filter: a.wf_filter.clone(),
        sched_flags: a.sched_flags.clone(),
        reason: String::new(),
    };
    match batch::submit_launch(&mut ctx.store, &site, &req) {
        Ok(launch) => {
            println!("Submit OK: {}", batch::qlaunch_text(&launch));
            Ok(())
        }
        // The scheduler's own words come through unchanged; say that nothing was recorded.
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "the launcher job was not submitted ({}); nothing was recorded",
            site.kind
        ))),
    }
}

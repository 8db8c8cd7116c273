//! `balsam service`: the login-node daemon that submits launcher jobs as work comes and goes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use balsam::service::{self, ServiceOptions};
use balsam_launcher::JobMode;

use super::Ctx;

/// Arguments of `balsam service`.
#[derive(clap::Args, Debug)]
pub struct ServiceArgs {
    /// One pass, then exit (for cron and tests)
    #[arg(long)]
    pub once: bool,
    /// Seconds between passes, more than 0 and at most 86400 (default: SERVICE_PERIOD in
    /// settings.json)
    #[arg(long, value_name = "SECONDS", value_parser = period_seconds)]
    pub period: Option<f64>,
    /// Job mode of the launcher jobs it submits
    #[arg(long, value_enum, default_value_t = JobMode::Mixed)]
    pub job_mode: JobMode,
    /// Only count and run jobs whose workflow contains this text (default: all)
    #[arg(long, value_name = "W", default_value = "")]
    pub wf_filter: String,
    /// Project (account) to charge (default: DEFAULT_PROJECT in settings.json)
    #[arg(short = 'A', long, value_name = "PROJECT", default_value = "")]
    pub project: String,
}

/// Checks `--period`: a positive number of seconds, at most a day.
fn period_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 && p <= 86_400.0 => Ok(p),
        _ => Err("expected a number of seconds more than 0 and at most 86400 (a day)".into()),
    }
}

/// Runs the service until --once is done or SIGTERM/SIGINT.
pub fn run(db: Option<&Path>, a: &ServiceArgs) -> Result<()> {
    // The service logs its decisions to log/service.log and to its terminal.
    let ctx = Ctx::open_logging(db, "service.log", tracing::level_filters::LevelFilter::INFO)?;
    let settings = ctx.store.dir.settings()?;
    let period = match a.period {
        Some(p) => Duration::from_secs_f64(p),
        None => Duration::from_secs(settings.service_period.max(1)),
    };
    let opts = ServiceOptions {
        once: a.once,
        period,
        job_mode: a.job_mode.as_str().to_string(),
        wf_filter: a.wf_filter.clone(),
        project: a.project.clone(),
    };
    let db = ctx.store.dir.clone();
    service::run(&db, opts).with_context(|| format!("balsam service on {}", db.root.display()))
}

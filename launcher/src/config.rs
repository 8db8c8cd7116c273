//! The launcher's options: one definition shared by `balsam-mpi-launcher` and `balsam launcher`
//! (which passes them on), turned once into a checked [`Config`].

use std::time::Duration;

use balsam_store::{DbDir, Settings};
use clap::builder::RangedU64ValueParser;

use crate::error::{Error, Result};

/// Which jobs a launcher runs, and how.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobMode {
    /// Serial jobs only (one node, one rank), packed onto the worker ranks.
    Serial,
    /// Every job through the MPI launcher (aprun, mpiexec, srun) on reserved nodes.
    Mpi,
    /// Serial jobs on the workers, multi-rank jobs through the MPI launcher.
    #[default]
    Mixed,
}

impl JobMode {
    /// `serial`, `mpi` or `mixed`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobMode::Serial => "serial",
            JobMode::Mpi => "mpi",
            JobMode::Mixed => "mixed",
        }
    }
}

/// The launcher's command-line options.
#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
pub struct LaunchOptions {
    /// serial: pack one-rank jobs on the worker ranks; mpi: start every job with the MPI
    /// launcher on reserved nodes; mixed: both
    #[arg(long, value_enum, default_value_t = JobMode::Mixed)]
    pub job_mode: JobMode,
    /// Only run jobs whose workflow contains this text
    #[arg(long, value_name = "W", conflicts_with = "consume_all")]
    pub wf_filter: Option<String>,
    /// Run jobs of every workflow (the default)
    #[arg(long)]
    pub consume_all: bool,
    /// Stop after T minutes: running jobs become RUN_TIMEOUT, then RESTART_READY [default: the
    /// batch allocation's remaining time minus 2 minutes, else none]
    #[arg(long, value_name = "T", value_parser = parse_time_limit_minutes)]
    pub time_limit_minutes: Option<f64>,
    /// Keep running when there is no work, waiting for new jobs
    #[arg(long)]
    pub persistent: bool,
    /// Threads running job transitions, 1 to 256 [default: NUM_TRANSITION_THREADS in
    /// settings.json]
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_TRANSITION_THREADS))]
    pub num_transition_threads: Option<usize>,
    /// GPUs per node, 0 to 1024: each packed job gets CUDA_VISIBLE_DEVICES = its slot mod N
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = RangedU64ValueParser::<u32>::new().range(0..=MAX_GPUS_PER_NODE))]
    pub gpus_per_node: u32,
    /// Kill a job running longer than its wall_time_minutes (it becomes RUN_TIMEOUT)
    #[arg(long)]
    pub enforce_wall_time: bool,
    /// Seconds an idle launcher without --persistent waits while a service could still bring
    /// work (it exits at once when nothing can arrive)
    #[arg(long, hide = true, value_name = "S", value_parser = parse_idle_exit_seconds)]
    pub idle_exit_seconds: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when the launcher kills a job
    #[arg(long, hide = true, value_name = "S", value_parser = parse_kill_grace_seconds)]
    pub kill_grace_seconds: Option<f64>,
}

/// Most transition threads.
pub const MAX_TRANSITION_THREADS: u64 = 256;
/// Most GPUs per node.
pub const MAX_GPUS_PER_NODE: u64 = 1024;
/// Longest time limit, minutes (one year).
pub const MAX_TIME_LIMIT_MINUTES: f64 = 525_600.0;
/// Longest idle wait, seconds (one week).
pub const MAX_IDLE_EXIT_SECONDS: f64 = 604_800.0;
/// Longest kill grace, seconds (one hour).
pub const MAX_KILL_GRACE_SECONDS: f64 = 3_600.0;

/// Checks that a numeric option lies in its range; the message names the option and the range.
fn check_range(flag: &str, v: f64, min: f64, max: f64, unit: &str) -> Result<f64> {
    if v.is_finite() && v >= min && v <= max {
        Ok(v)
    } else {
        Err(Error::Config(format!(
            "--{flag} must be a number of {unit} from {min} to {max}, not {v}"
        )))
    }
}

fn parse_number(flag: &str, text: &str, min: f64, max: f64, unit: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("not a number; give {unit} from {min} to {max}"))?;
    check_range(flag, v, min, max, unit).map_err(|_| format!("must be {unit} from {min} to {max}"))
}

fn parse_time_limit_minutes(text: &str) -> Result<f64, String> {
    parse_number(
        "time-limit-minutes",
        text,
        0.0,
        MAX_TIME_LIMIT_MINUTES,
        "minutes",
    )
}

fn parse_idle_exit_seconds(text: &str) -> Result<f64, String> {
    parse_number(
        "idle-exit-seconds",
        text,
        0.0,
        MAX_IDLE_EXIT_SECONDS,
        "seconds",
    )
}

fn parse_kill_grace_seconds(text: &str) -> Result<f64, String> {
    parse_number(
        "kill-grace-seconds",
        text,
        0.0,
        MAX_KILL_GRACE_SECONDS,
        "seconds",
    )
}

impl LaunchOptions {
    /// The options as command-line words, to pass them on to `balsam-mpi-launcher`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--job-mode".to_string(), self.job_mode.as_str().to_string()];
        if let Some(w) = &self.wf_filter {
            a.extend(["--wf-filter".into(), w.clone()]);
        }
        if self.consume_all {
            a.push("--consume-all".into());
        }
        if let Some(t) = self.time_limit_minutes {
            a.extend(["--time-limit-minutes".into(), t.to_string()]);
        }
        if self.persistent {
            a.push("--persistent".into());
        }
        if let Some(n) = self.num_transition_threads {
            a.extend(["--num-transition-threads".into(), n.to_string()]);
        }
        if self.gpus_per_node > 0 {
            a.extend(["--gpus-per-node".into(), self.gpus_per_node.to_string()]);
        }
        if self.enforce_wall_time {
            a.push("--enforce-wall-time".into());
        }
        if let Some(s) = self.idle_exit_seconds {
            a.extend(["--idle-exit-seconds".into(), s.to_string()]);
        }
        if let Some(s) = self.kill_grace_seconds {
            a.extend(["--kill-grace-seconds".into(), s.to_string()]);
        }
        a
    }
}

/// Default seconds without work before exiting (legacy: 10 idle checks a second apart).
pub const IDLE_EXIT_SECONDS: f64 = 10.0;
/// Default grace between SIGTERM and SIGKILL (legacy: 10 s). One second, so that a killed job
/// is gone within the 2 s the README promises (the kill is seen within 0.4 s).
pub const KILL_GRACE_SECONDS: f64 = 1.0;
/// Minutes kept free at the end of a batch allocation when the time limit comes from it.
pub const ALLOCATION_MARGIN_MINUTES: u64 = 2;

/// The checked configuration rank 0 runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The database directory.
    pub db: DbDir,
    /// Its settings.json.
    pub settings: Settings,
    /// The options as given.
    pub opts: LaunchOptions,
    /// Workflow filter ('' = all).
    pub wf_filter: String,
    /// Stop after this long, if set.
    pub time_limit: Option<Duration>,
    /// Exit after this long without work (unless persistent).
    pub idle_exit: Duration,
    /// SIGTERM → SIGKILL grace.
    pub kill_grace: Duration,
    /// Transition worker threads.
    pub transition_threads: usize,
    /// Seconds of silence after which leases expire (LEASE_EXPIRY_SECONDS).
    pub lease_expiry: Duration,
}

impl Config {
    /// Checks the options against the database's settings. `allocation_minutes`: the time limit
    /// the batch allocation implies, used when `--time-limit-minutes` is not given.
    pub fn resolve(
        db: DbDir,
        opts: LaunchOptions,
        allocation_minutes: Option<u64>,
    ) -> Result<Config> {
        let settings = db.settings()?;
        let time_limit = match (opts.time_limit_minutes, allocation_minutes) {
            (Some(t), _) => {
                let t = check_range(
                    "time-limit-minutes",
                    t,
                    0.0,
                    MAX_TIME_LIMIT_MINUTES,
                    "minutes",
                )?;
                Some(Duration::from_secs_f64(t * 60.0))
            }
            (None, Some(m)) => Some(Duration::from_secs(
                m.min(MAX_TIME_LIMIT_MINUTES as u64) * 60,
            )),
            (None, None) => None,
        };
        let idle_exit = Duration::from_secs_f64(check_range(
            "idle-exit-seconds",
            opts.idle_exit_seconds.unwrap_or(IDLE_EXIT_SECONDS),
            0.0,
            MAX_IDLE_EXIT_SECONDS,
            "seconds",
        )?);
        let kill_grace = Duration::from_secs_f64(check_range(
            "kill-grace-seconds",
            opts.kill_grace_seconds.unwrap_or(KILL_GRACE_SECONDS),
            0.0,
            MAX_KILL_GRACE_SECONDS,
            "seconds",
        )?);
        let transition_threads = opts
            .num_transition_threads
            .unwrap_or(settings.num_transition_threads)
            .clamp(1, MAX_TRANSITION_THREADS as usize);
        let lease_expiry = Duration::from_secs(settings.lease_expiry_seconds);
        Ok(Config {
            db,
            wf_filter: opts.wf_filter.clone().unwrap_or_default(),
            settings,
            opts,
            time_limit,
            idle_exit,
            kill_grace,
            transition_threads,
            lease_expiry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: LaunchOptions,
    }

    #[test]
    fn options_survive_being_passed_on() {
        let o = LaunchOptions {
            job_mode: JobMode::Serial,
            wf_filter: Some("my wf".into()),
            consume_all: false,
            time_limit_minutes: Some(0.5),
            persistent: true,
            num_transition_threads: Some(3),
            gpus_per_node: 4,
            enforce_wall_time: true,
            idle_exit_seconds: Some(2.0),
            kill_grace_seconds: Some(1.0),
        };
        let mut argv = vec!["x".to_string()];
        argv.extend(o.to_args());
        assert_eq!(Cli::parse_from(argv).opts, o);
        let d = Cli::parse_from(["x"]).opts;
        assert_eq!(d.job_mode, JobMode::Mixed);
        assert!(Cli::try_parse_from(["x", "--wf-filter", "a", "--consume-all"]).is_err());
    }

    #[test]
    fn numeric_options_have_ranges_and_say_so() {
        for (flag, bad) in [
            ("--time-limit-minutes", "1e300"),
            ("--time-limit-minutes", "-1"),
            ("--time-limit-minutes", "NaN"),
            ("--time-limit-minutes", "inf"),
            ("--kill-grace-seconds", "1e300"),
            ("--idle-exit-seconds", "1e300"),
            ("--idle-exit-seconds", "ten"),
            ("--num-transition-threads", "0"),
            ("--num-transition-threads", "4294967295"),
            ("--gpus-per-node", "4294967295"),
        ] {
            let arg = format!("{flag}={bad}");
            let e = Cli::try_parse_from(["x", &arg])
                .err()
                .unwrap_or_else(|| panic!("{arg} accepted"));
            let msg = e.to_string();
            assert!(msg.contains(flag), "{msg}");
            assert!(
                msg.contains(" to ") || msg.contains("..="),
                "the range is named: {msg}"
            );
        }
        let ok = Cli::parse_from([
            "x",
            "--time-limit-minutes",
            "1",
            "--kill-grace-seconds",
            "0",
        ]);
        assert_eq!(ok.opts.time_limit_minutes, Some(1.0));
    }
}

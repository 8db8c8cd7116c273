//! What every batch scheduler adapter offers: submit a script, list the user's batch jobs, cancel
//! one.
//!
//! The service and `balsam submit-launch` talk to Cobalt, Slurm, PBS or the local workstation
//! through the object-safe [`Scheduler`] trait, chosen at run time from `SCHEDULER_CLASS` by
//! [`from_config`]. Each scheduler lives in its own file (`cobalt.rs`, `slurm.rs`, `pbs.rs`,
//! `local.rs`). The programs they run come from settings (`SCHEDULER_SUBMIT_EXE`,
//! `SCHEDULER_STATUS_EXE`, `SCHEDULER_CANCEL_EXE`) and default to bare names looked up on PATH:
//! legacy Balsam hard-coded `/usr/bin/qsub`, which was wrong on most machines.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Settings key for the submit program (qsub, sbatch).
pub const SUBMIT_EXE_SETTING: &str = "SCHEDULER_SUBMIT_EXE";
/// Settings key for the status program (qstat, squeue).
pub const STATUS_EXE_SETTING: &str = "SCHEDULER_STATUS_EXE";
/// Settings key for the cancel program (qdel, scancel).
pub const CANCEL_EXE_SETTING: &str = "SCHEDULER_CANCEL_EXE";

/// How long a scheduler command may take before it is killed, unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Which batch scheduler a site runs (settings key `SCHEDULER_CLASS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// Cobalt (ALCF Theta, Cooley).
    Cobalt,
    /// Slurm.
    Slurm,
    /// PBS Professional / OpenPBS (ALCF Polaris).
    Pbs,
    /// No scheduler: a workstation; batch jobs are background processes.
    Local,
}

impl SchedulerKind {
    /// All kinds, in the order they are listed to users.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Cobalt,
        SchedulerKind::Slurm,
        SchedulerKind::Pbs,
        SchedulerKind::Local,
    ];

    /// The short name: `cobalt`, `slurm`, `pbs`, `local`.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Cobalt => "cobalt",
            SchedulerKind::Slurm => "slurm",
            SchedulerKind::Pbs => "pbs",
            SchedulerKind::Local => "local",
        }
    }

    /// The legacy class name used in settings.json: `CobaltScheduler`, ...
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Cobalt => "CobaltScheduler",
            SchedulerKind::Slurm => "SlurmScheduler",
            SchedulerKind::Pbs => "PBSScheduler",
            SchedulerKind::Local => "LocalScheduler",
        }
    }

    /// Default (submit, status, cancel) program names, looked up on PATH when the settings give
    /// none. The local scheduler runs non-executable scripts with bash and needs no status or
    /// cancel program.
    pub fn default_programs(self) -> (&'static str, Option<&'static str>, Option<&'static str>) {
        match self {
            SchedulerKind::Cobalt | SchedulerKind::Pbs => ("qsub", Some("qstat"), Some("qdel")),
            SchedulerKind::Slurm => ("sbatch", Some("squeue"), Some("scancel")),
            SchedulerKind::Local => ("bash", None, None),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Accepts the legacy class names (`CobaltScheduler`, `SlurmScheduler`, `PBSScheduler`,
    /// `LocalScheduler`) and the short names (`cobalt`, `slurm`, `pbs`, `local`), any case.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let short = t.strip_suffix("scheduler").unwrap_or(&t);
        Ok(match short {
            "cobalt" => SchedulerKind::Cobalt,
            "slurm" => SchedulerKind::Slurm,
            "pbs" => SchedulerKind::Pbs,
            "local" => SchedulerKind::Local,
            _ => return Err(Error::UnknownScheduler(s.to_string())),
        })
    }
}

/// A batch job's state, normalised across schedulers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BatchJobState {
    /// Waiting in the queue, including held jobs: they keep their place and count against the
    /// queue's job limit.
    Queued,
    /// Starting or running.
    Running,
    /// Ending (Cobalt `exiting`, Slurm `COMPLETING`, PBS `E`).
    Exiting,
    /// Gone from the queue: completed, cancelled, failed, timed out.
    Finished,
    /// Anything else (suspended, failed dependency, ...): the raw state says what.
    Other(String),
}

impl BatchJobState {
    /// True when the job still occupies a place in its queue (queued, running or exiting).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            BatchJobState::Queued | BatchJobState::Running | BatchJobState::Exiting
        )
    }
}

impl fmt::Display for BatchJobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchJobState::Queued => f.write_str("queued"),
            BatchJobState::Running => f.write_str("running"),
            BatchJobState::Exiting => f.write_str("exiting"),
            BatchJobState::Finished => f.write_str("finished"),
            BatchJobState::Other(s) => write!(f, "other ({s})"),
        }
    }
}

/// One of the user's batch jobs as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchJobStatus {
    /// The scheduler's id for the job (`278079`, `1234.server`, a pid for local jobs).
    pub scheduler_id: String,
    /// The state, normalised.
    pub state: BatchJobState,
    /// The state exactly as the scheduler printed it.
    pub raw_state: String,
    /// Nodes requested or allocated, when reported.
    pub nodes: Option<usize>,
    /// Wall-time limit in minutes, when reported.
    pub wall_minutes: Option<u64>,
    /// Minutes left before the wall-time limit; only for running jobs.
    pub time_remaining_minutes: Option<u64>,
    /// Queue (Slurm partition); empty when not reported.
    pub queue: String,
    /// Project (account) charged; empty when not reported.
    pub project: String,
    /// Job name or command as the scheduler reports it.
    pub name: String,
}

/// What to submit: a rendered job script and the resources it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitRequest {
    /// The job script (rendered from a template).
    pub script: PathBuf,
    /// Directory the batch job starts in; its output files go there.
    pub cwd: PathBuf,
    /// Job name; also the stem of the output file names (`NAME.out`, Cobalt `NAME.output`).
    pub job_name: String,
    /// Project/account to charge; None to let the scheduler use the user's default.
    pub project: Option<String>,
    /// Queue (Slurm partition); empty for the scheduler's default (Slurm, PBS, local only).
    pub queue: String,
    /// Number of nodes.
    pub nodes: usize,
    /// Wall-time limit in minutes.
    pub wall_minutes: u64,
    /// Extra scheduler flags, already split into words (see [`SubmitRequest::split_flags`]).
    pub sched_flags: Vec<String>,
}

impl SubmitRequest {
    /// Splits a `--sched-flags` string the way a shell would (`--attrs "a=b:c=d"` → two words).
    pub fn split_flags(flags: &str) -> Result<Vec<String>> {
        shell_words::split(flags).map_err(|e| {
            Error::BadRequest(format!(
                "cannot split scheduler flags {flags:?}: {e}; quote them as in a shell"
            ))
        })
    }

    /// Checks what every scheduler needs; `needs_queue` for schedulers without a default queue.
    pub(crate) fn validate(&self, needs_queue: bool) -> Result<()> {
        if self.nodes == 0 {
            return Err(Error::BadRequest(
                "a batch job needs at least 1 node; pass -n/--nodes 1 or more".into(),
            ));
        }
        if self.wall_minutes == 0 {
            return Err(Error::BadRequest(
                "a batch job needs a wall time of at least 1 minute; pass -t/--wall-minutes 1 or more"
                    .into(),
            ));
        }
        if needs_queue && self.queue.trim().is_empty() {
            return Err(Error::BadRequest(
                "no queue given; pass -q/--queue with one of the site's queues".into(),
            ));
        }
        if self.job_name.is_empty()
            || self
                .job_name
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c.is_control())
        {
            return Err(Error::BadRequest(format!(
                "job name {:?} must be non-empty, without spaces or '/'; it names the output files",
                self.job_name
            )));
        }
        if !self.script.is_file() {
            return Err(Error::BadRequest(format!(
                "job script {} does not exist",
                self.script.display()
            )));
        }
        if !self.cwd.is_dir() {
            return Err(Error::BadRequest(format!(
                "working directory {} does not exist",
                self.cwd.display()
            )));
        }
        Ok(())
    }

    /// The project if one is given and not blank.
    pub(crate) fn project(&self) -> Option<&str> {
        self.project
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }
}

/// How to reach the site's scheduler; built once from settings.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Which scheduler (`SCHEDULER_CLASS`).
    pub kind: SchedulerKind,
    /// Submit program (`SCHEDULER_SUBMIT_EXE`); None for the default name on PATH.
    pub submit_exe: Option<PathBuf>,
    /// Status program (`SCHEDULER_STATUS_EXE`); None for the default name on PATH.
    pub status_exe: Option<PathBuf>,
    /// Cancel program (`SCHEDULER_CANCEL_EXE`); None for the default name on PATH.
    pub cancel_exe: Option<PathBuf>,
    /// The user whose jobs `status` lists.
    pub user: String,
    /// Time limit for each scheduler command.
    pub timeout: Duration,
    /// Directory for the local scheduler's record of its jobs (the database's `qsubmit/`); the
    /// other schedulers do not use it.
    pub state_dir: PathBuf,
}

impl SchedulerConfig {
    /// A configuration with default programs, the current user and a 60 s timeout.
    pub fn new(kind: SchedulerKind, state_dir: impl Into<PathBuf>) -> Self {
        SchedulerConfig {
            kind,
            submit_exe: None,
            status_exe: None,
            cancel_exe: None,
            user: current_user(),
            timeout: DEFAULT_TIMEOUT,
            state_dir: state_dir.into(),
        }
    }
}

/// A batch scheduler. Object-safe: the service holds a `Box<dyn Scheduler>`.
pub trait Scheduler: Send + Sync {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;

    /// Submits a job script; returns the scheduler's id for the new batch job. When the scheduler
    /// refuses, the error is [`Error::ProgramFailed`] with its stderr verbatim.
    fn submit(&self, req: &SubmitRequest) -> Result<String>;

    /// Lists the configured user's batch jobs.
    fn status(&self) -> Result<Vec<BatchJobStatus>>;

    /// Asks the scheduler to remove (or kill) a batch job.
    fn cancel(&self, scheduler_id: &str) -> Result<()>;
}

/// The scheduler adapter for a configuration.
pub fn from_config(config: &SchedulerConfig) -> Box<dyn Scheduler> {
    match config.kind {
        SchedulerKind::Cobalt => Box::new(crate::cobalt::CobaltScheduler::new(config.clone())),
        SchedulerKind::Slurm => Box::new(crate::slurm::SlurmScheduler::new(config.clone())),
        SchedulerKind::Pbs => Box::new(crate::pbs::PbsScheduler::new(config.clone())),
        SchedulerKind::Local => Box::new(crate::local::LocalScheduler::new(config.clone())),
    }
}

/// The current user's login name: `$USER`, `$LOGNAME`, else the password database, else the uid.
pub fn current_user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy the name at once
    // and this crate calls it from no other place.
    unsafe {
        let uid = libc::geteuid();
        let pw = libc::getpwuid(uid);
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            if let Ok(name) = std::ffi::CStr::from_ptr((*pw).pw_name).to_str() {
                return name.to_string();
            }
        }
        uid.to_string()
    }
}

/// Parses a scheduler's duration: `HH:MM:SS` (hours may exceed 24), `MM:SS`, `D:HH:MM:SS`,
/// `D-HH:MM:SS` or `D-HH` (Slurm), or a bare number of minutes. None for `N/A`, `-`,
/// `UNLIMITED`, `INVALID`, `NOT_SET` and empty text. Seconds are returned.
pub(crate) fn parse_duration_secs(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return None;
    }
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, t),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.trim().parse::<u64>().ok())
        .collect::<Option<Vec<_>>>()?;
    let has_days = t.contains('-');
    let secs = match (has_days, parts.as_slice()) {
        // Slurm: D-HH, D-HH:MM, D-HH:MM:SS
        (true, [h]) => h * 3600,
        (true, [h, m]) => h * 3600 + m * 60,
        (true, [h, m, s]) => h * 3600 + m * 60 + s,
        (false, [m]) => m * 60,
        (false, [m, s]) => m * 60 + s,
        (false, [h, m, s]) => h * 3600 + m * 60 + s,
        (false, [d, h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(days * 86400 + secs)
}

/// Whole minutes, rounded up: a wall time of 4:30 needs 5 minutes of allocation.
pub(crate) fn ceil_minutes(secs: u64) -> u64 {
    secs.div_ceil(60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_str() {
        for (s, k) in [
            ("CobaltScheduler", SchedulerKind::Cobalt),
            ("SlurmScheduler", SchedulerKind::Slurm),
            ("PBSScheduler", SchedulerKind::Pbs),
            ("LocalScheduler", SchedulerKind::Local),
            ("cobalt", SchedulerKind::Cobalt),
            ("SLURM", SchedulerKind::Slurm),
            (" pbs ", SchedulerKind::Pbs),
            ("Local", SchedulerKind::Local),
            ("pbsscheduler", SchedulerKind::Pbs),
        ] {
            assert_eq!(s.parse::<SchedulerKind>().unwrap(), k, "{s}");
        }
        for k in SchedulerKind::ALL {
            assert_eq!(k.class_name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.to_string().parse::<SchedulerKind>().unwrap(), k);
        }
    }

    #[test]
    fn kind_error_lists_valid_names() {
        let msg = "LSFScheduler"
            .parse::<SchedulerKind>()
            .unwrap_err()
            .to_string();
        for name in [
            "LSFScheduler",
            "CobaltScheduler",
            "SlurmScheduler",
            "PBSScheduler",
            "LocalScheduler",
            "cobalt",
            "local",
        ] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("00:05:00"), Some(300));
        assert_eq!(parse_duration_secs("01:00:00"), Some(3600));
        assert_eq!(parse_duration_secs("30:00:00"), Some(30 * 3600));
        assert_eq!(parse_duration_secs("4:58"), Some(298));
        assert_eq!(parse_duration_secs("1-00:00:00"), Some(86400));
        assert_eq!(parse_duration_secs("2-03"), Some(2 * 86400 + 3 * 3600));
        assert_eq!(parse_duration_secs("1:02:03:04"), Some(93784));
        assert_eq!(parse_duration_secs("45"), Some(2700));
        for none in [
            "N/A",
            "-",
            "",
            "UNLIMITED",
            "INVALID",
            "NOT_SET",
            "1:x:3",
            "1:2:3:4:5",
        ] {
            assert_eq!(parse_duration_secs(none), None, "{none}");
        }
        assert_eq!(ceil_minutes(270), 5);
        assert_eq!(ceil_minutes(300), 5);
        assert_eq!(ceil_minutes(0), 0);
    }

    #[test]
    fn split_flags() {
        assert_eq!(
            SubmitRequest::split_flags("--attrs 'ssds=required:ssd_size=128' -x").unwrap(),
            vec!["--attrs", "ssds=required:ssd_size=128", "-x"]
        );
        assert!(SubmitRequest::split_flags("--attrs 'unclosed").is_err());
    }

    #[test]
    fn validate_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let ok = SubmitRequest {
            script: script.clone(),
            cwd: dir.path().to_path_buf(),
            job_name: "qlaunch1".into(),
            project: None,
            queue: "debug".into(),
            nodes: 2,
            wall_minutes: 5,
            sched_flags: vec![],
        };
        ok.validate(true).unwrap();
        let mut r = ok.clone();
        r.nodes = 0;
        assert!(r.validate(true).unwrap_err().to_string().contains("1 node"));
        let mut r = ok.clone();
        r.queue = " ".into();
        assert!(r.validate(true).unwrap_err().to_string().contains("queue"));
        r.validate(false).unwrap();
        let mut r = ok.clone();
        r.job_name = "a b".into();
        assert!(r.validate(true).is_err());
        let mut r = ok.clone();
        r.script = dir.path().join("missing.sh");
        assert!(r
            .validate(true)
            .unwrap_err()
            .to_string()
            .contains("missing.sh"));
    }

    #[test]
    fn current_user_is_not_empty() {
        assert!(!current_user().is_empty());
    }
}

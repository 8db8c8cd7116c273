//! Launcher jobs in the batch queue, as `balsam submit-launch`, `balsam ls queues` and the
//! service see them: the site's scheduler, template and queue policy from `settings.json`; a
//! launch recorded, rendered to `qsubmit/qlaunch<N>.sh` and submitted; the recorded launches
//! refreshed from the scheduler.
//!
//! A launch is recorded (state `creating`) before it is submitted, so that its number names the
//! script, and forgotten again when the scheduler refuses it: no row is left behind that looks
//! submitted. A launch whose submitting process died between the two steps stays `creating`
//! without a scheduler id; a refresh marks it `failed` after [`CREATING_GRACE`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use balsam_cobalt::{
    self as cobalt, BatchJobState, BatchJobStatus, QueuePolicy, Scheduler, SchedulerConfig,
    SchedulerKind, SubmitRequest, TemplateVars,
};
use balsam_store::{DbDir, QueuedLaunch, Settings, Store};

/// A launch recorded but not yet accepted by the scheduler is taken as abandoned after this long.
pub const CREATING_GRACE: Duration = Duration::from_secs(600);

/// A launch the scheduler accepted but does not list yet (some schedulers list a job a moment
/// after accepting it) is not taken as finished before this long.
pub const LISTING_GRACE: Duration = Duration::from_secs(30);

/// The job modes a launcher accepts.
pub const JOB_MODES: [&str; 3] = ["serial", "mpi", "mixed"];

/// What can go wrong between the database, the settings and the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] balsam_store::Error),
    /// The scheduler refused (its own words are inside) or could not be run.
    #[error(transparent)]
    Scheduler(#[from] cobalt::Error),
    /// A setting has a value that cannot be used.
    #[error("settings.json: {key}: {problem}")]
    Setting {
        /// The key.
        key: &'static str,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// The request itself is wrong; the message says how to fix it.
    #[error("{0}")]
    Refused(String),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The site a database submits to: its scheduler, job template and queue policy, from the
/// database's `settings.json`.
pub struct Site {
    /// The database directory.
    pub db: DbDir,
    /// Its settings.
    pub settings: Settings,
    /// Which scheduler.
    pub kind: SchedulerKind,
    /// The scheduler's adapter.
    pub scheduler: Box<dyn Scheduler>,
}

impl Site {
    /// Reads the settings and sets up the scheduler they name.
    pub fn open(db: &DbDir) -> Result<Site> {
        let settings = db.settings()?;
        let kind: SchedulerKind =
            settings
                .scheduler_class
                .parse()
                .map_err(|e: cobalt::Error| Error::Setting {
                    key: "SCHEDULER_CLASS",
                    problem: e.to_string(),
                })?;
        let mut config = SchedulerConfig::new(kind, db.qsubmit_dir());
        config.submit_exe = program_setting(&db.root, &settings.scheduler_submit_exe);
        config.status_exe = program_setting(&db.root, &settings.scheduler_status_exe);
        config.cancel_exe = program_setting(&db.root, &settings.scheduler_cancel_exe);
        let scheduler = cobalt::from_config(&config);
        Ok(Site {
            db: db.clone(),
            settings,
            kind,
            scheduler,
        })
    }

    /// The queue policy: the file QUEUE_POLICY names, else the built-in one for Cobalt (Theta's
    /// queues) and the local scheduler. Slurm and PBS queues differ from site to site, so the
    /// service needs a policy file for them.
    pub fn policy(&self) -> Result<QueuePolicy> {
        match Settings::resolve(&self.db.root, &self.settings.queue_policy) {
            Some(path) => QueuePolicy::load(&path).map_err(|e| Error::Setting {
                key: "QUEUE_POLICY",
                problem: e.to_string(),
            }),
            None => {
                let (name, text) = match self.kind {
                    SchedulerKind::Cobalt => ("theta_policy.ini (built in)", cobalt::THETA_POLICY),
                    SchedulerKind::Local => ("local_policy.ini (built in)", cobalt::LOCAL_POLICY),
                    SchedulerKind::Slurm | SchedulerKind::Pbs => {
                        return Err(Error::Setting {
                            key: "QUEUE_POLICY",
                            problem: format!(
                                "not set, and {} queues differ from site to site: write a policy \
                                 file with a [queue] section per queue you may use (see \
                                 cobalt/templates/theta_policy.ini for the form) and set \
                                 QUEUE_POLICY to its path",
                                self.kind
                            ),
                        })
                    }
                };
                Ok(QueuePolicy::parse(name, text)?)
            }
        }
    }

    /// The job template's name for messages: JOB_TEMPLATE's path, else the built-in one's name.
    pub fn template_name(&self) -> String {
        match Settings::resolve(&self.db.root, &self.settings.job_template) {
            Some(path) => path.display().to_string(),
            None => format!("{} (built in)", cobalt::default_template_name(self.kind)),
        }
    }

    /// Renders the job template (JOB_TEMPLATE, else the scheduler's built-in one).
    pub fn render(&self, vars: &TemplateVars) -> Result<String> {
        match Settings::resolve(&self.db.root, &self.settings.job_template) {
            Some(path) => {
                if !path.is_file() {
                    return Err(Error::Setting {
                        key: "JOB_TEMPLATE",
                        problem: format!(
                            "{} does not exist; point JOB_TEMPLATE at a template file, or set it \
                             to \"\" for the built-in {}",
                            path.display(),
                            cobalt::default_template_name(self.kind)
                        ),
                    });
                }
                Ok(cobalt::render_job_template_file(&path, vars)?)
            }
            None => Ok(cobalt::render_job_template(
                cobalt::default_template_name(self.kind),
                cobalt::default_template(self.kind),
                vars,
            )?),
        }
    }
}

/// A program setting: empty for the default name on PATH; a bare name is looked up on PATH; a
/// relative path is taken from the database directory.
fn program_setting(root: &Path, value: &str) -> Option<PathBuf> {
    if value.is_empty() {
        None
    } else if value.contains('/') {
        Settings::resolve(root, value)
    } else {
        Some(PathBuf::from(value))
    }
}

/// A launcher job to submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    /// Nodes.
    pub nodes: u32,
    /// Wall time, minutes.
    pub wall_minutes: u32,
    /// Queue (partition); may be empty where the scheduler has a default.
    pub queue: String,
    /// Project (account); empty for DEFAULT_PROJECT, then the scheduler's default.
    pub project: String,
    /// serial, mpi or mixed.
    pub job_mode: String,
    /// Workflow filter; empty for all jobs.
    pub wf_filter: String,
    /// Extra scheduler flags, as one shell-quoted string.
    pub sched_flags: String,
    /// Why it is submitted (the service's decision; empty from the command line).
    pub reason: String,
}

/// The directory of the running `balsam` binary (the launcher binary sits beside it).
fn balsam_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// `balsam-mpi-launcher` beside this binary, else the bare name for PATH.
fn launcher_bin() -> String {
    let beside = balsam_bin_dir().join(balsam_launcher::LAUNCHER_BIN);
    if beside.is_file() {
        beside.display().to_string()
    } else {
        balsam_launcher::LAUNCHER_BIN.to_string()
    }
}

/// Checks a request, records the launch, renders `qsubmit/qlaunch<N>.sh` and submits it.
/// When anything fails after the launch was recorded, the record and the script are removed
/// again, so the database is as it was.
pub fn submit_launch(store: &mut Store, site: &Site, req: &LaunchRequest) -> Result<QueuedLaunch> {
    if !JOB_MODES.contains(&req.job_mode.as_str()) {
        return Err(Error::Refused(format!(
            "job mode {:?} is not one of serial, mpi, mixed",
            req.job_mode
        )));
    }
    if req.nodes == 0 || req.wall_minutes == 0 {
        return Err(Error::Refused(format!(
            "a launcher job needs at least 1 node and 1 minute (got -n {} -t {})",
            req.nodes, req.wall_minutes
        )));
    }
    if !req.wf_filter.is_empty() && store.count_wf_filter(&req.wf_filter)? == 0 {
        let known: Vec<String> = store
            .workflows()?
            .into_iter()
            .take(10)
            .map(|w| w.workflow)
            .collect();
        return Err(Error::Refused(format!(
            "workflow filter {:?} matches no job, so the launcher would have nothing to do; \
             workflows in this database: {}",
            req.wf_filter,
            if known.is_empty() {
                "none (add jobs with `balsam job`)".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let flags = SubmitRequest::split_flags(&req.sched_flags)?;
    let project = if req.project.is_empty() {
        site.settings.default_project.clone()
    } else {
        req.project.clone()
    };
    let vars = TemplateVars {
        project: project.clone(),
        queue: req.queue.clone(),
        nodes: req.nodes as usize,
        time_minutes: u64::from(req.wall_minutes),
        job_mode: req.job_mode.clone(),
        wf_filter: cobalt::wf_filter_option(&req.wf_filter),
        balsam_bin: balsam_bin_dir().display().to_string(),
        balsam_db_path: site.db.root.display().to_string(),
        sched_flags: req.sched_flags.clone(),
        launcher_bin: launcher_bin(),
    };
    // Rendered and checked before anything is recorded: a template error leaves no trace, and
    // a script that starts no launcher would hold an allocation and run nothing.
    let script_text = site.render(&vars)?;
    if let Err(why) = crate::launcher_line::check_script(&script_text) {
        return Err(Error::Refused(format!(
            "the job template {} does not start a launcher: {why}. A template starts one with \
             `balsam launcher --{{{{ wf_filter }}}} --job-mode={{{{ job_mode }}}} ...` or \
             `{{{{ launcher_bin }}}} ...` (see the shipped templates in {}); nothing was submitted",
            site.template_name(),
            site.db.root.join("job-templates").display()
        )));
    }
    let mut launch = store.create_launch(&QueuedLaunch {
        id: 0,
        scheduler_id: String::new(),
        scheduler: site.kind.name().to_string(),
        project: project.clone(),
        queue: req.queue.clone(),
        nodes: req.nodes,
        wall_minutes: req.wall_minutes,
        job_mode: req.job_mode.clone(),
        wf_filter: req.wf_filter.clone(),
        command: String::new(),
        state: "creating".into(),
        sched_flags: req.sched_flags.clone(),
        from_balsam: true,
        prescheduled_only: false,
        reason: req.reason.clone(),
        created_us: 0,
        updated_us: 0,
    })?;
    let qsubmit = site.db.qsubmit_dir();
    let script = qsubmit.join(format!("qlaunch{}.sh", launch.id));
    let undo = |store: &mut Store| {
        let _ = std::fs::remove_file(&script);
        if let Err(e) = store.delete_launch(launch.id) {
            tracing::error!(
                "cannot forget launch {} after a failed submission: {e}",
                launch.id
            );
        }
    };
    if let Err(e) = write_script(&script, &script_text) {
        undo(store);
        return Err(e);
    }
    let request = SubmitRequest {
        script: script.clone(),
        cwd: qsubmit,
        job_name: format!("qlaunch{}", launch.id),
        project: (!project.is_empty()).then(|| project.clone()),
        queue: req.queue.clone(),
        nodes: req.nodes as usize,
        wall_minutes: u64::from(req.wall_minutes),
        sched_flags: flags,
    };
    match site.scheduler.submit(&request) {
        Ok(id) => {
            launch.scheduler_id = id;
            launch.state = "submitted".into();
            launch.command = script.display().to_string();
            store.update_launch(&launch)?;
            tracing::info!(
                "submitted launch {} as {} job {}: {} nodes x {} min in {:?}{}",
                launch.id,
                site.kind,
                launch.scheduler_id,
                launch.nodes,
                launch.wall_minutes,
                launch.queue,
                if launch.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", launch.reason)
                }
            );
            Ok(launch)
        }
        Err(e) => {
            undo(store);
            Err(e.into())
        }
    }
}

fn write_script(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let w = |e| Error::Write {
        path: path.to_path_buf(),
        source: e,
    };
    std::fs::write(path, text).map_err(w)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(w)?;
    Ok(())
}

/// The launch as the talk prints it: `Qlaunch { 'command': ..., 'wf_filter': ''}`.
pub fn qlaunch_text(l: &QueuedLaunch) -> String {
    let s = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let b = |v: bool| if v { "True" } else { "False" }.to_string();
    // A numeric scheduler id prints as a number, as in the talk (`'scheduler_id': 278079`).
    let sched_id =
        if !l.scheduler_id.is_empty() && l.scheduler_id.bytes().all(|c| c.is_ascii_digit()) {
            l.scheduler_id.clone()
        } else {
            s(&l.scheduler_id)
        };
    let fields = [
        ("command", s(&l.command)),
        ("from_balsam", b(l.from_balsam)),
        ("id", l.id.to_string()),
        ("job_mode", s(&l.job_mode)),
        ("nodes", l.nodes.to_string()),
        ("prescheduled_only", b(l.prescheduled_only)),
        ("project", s(&l.project)),
        ("queue", s(&l.queue)),
        ("scheduler_id", sched_id),
        ("state", s(&l.state)),
        ("wall_minutes", l.wall_minutes.to_string()),
        ("wf_filter", s(&l.wf_filter)),
    ];
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("'{k}': {v}")).collect();
    format!("Qlaunch {{ {}}}", body.join(",\n  "))
}

/// The launch state for a scheduler state. Held, suspended and other states still hold a place
/// in the queue, so they count as queued.
fn launch_state(s: &BatchJobState) -> &'static str {
    match s {
        BatchJobState::Queued | BatchJobState::Other(_) => "queued",
        BatchJobState::Running => "running",
        BatchJobState::Exiting => "exiting",
        BatchJobState::Finished => "finished",
    }
}

/// Brings the recorded launches up to date with the scheduler: states follow the scheduler's,
/// launches it no longer lists are finished. With `adopt`, the user's batch jobs that this
/// database did not submit are recorded too (from_balsam false): they take places in the
/// queues, which max-queued must count.
/// Returns the user's batch jobs as the scheduler listed them.
pub fn refresh_launches(
    store: &mut Store,
    site: &Site,
    adopt: bool,
) -> Result<Vec<BatchJobStatus>> {
    let statuses = site.scheduler.status()?;
    let by_id: HashMap<&str, &BatchJobStatus> = statuses
        .iter()
        .map(|s| (s.scheduler_id.as_str(), s))
        .collect();
    let now = balsam_store::now_us();
    let age = |us: i64| Duration::from_micros(now.saturating_sub(us).max(0) as u64);
    for mut l in store.launches(true)? {
        let old = l.state.clone();
        if l.scheduler_id.is_empty() {
            if age(l.updated_us) > CREATING_GRACE {
                l.state = "failed".into();
                l.reason = "the process submitting it stopped before the scheduler answered".into();
            }
        } else {
            match by_id.get(l.scheduler_id.as_str()) {
                Some(s) => {
                    l.state = launch_state(&s.state).into();
                    if let BatchJobState::Other(raw) = &s.state {
                        l.reason = format!("scheduler state {raw}");
                    }
                }
                None if old == "submitted" && age(l.updated_us) < LISTING_GRACE => {}
                None => l.state = "finished".into(),
            }
        }
        if l.state != old {
            store.update_launch(&l)?;
        }
    }
    if adopt {
        for s in statuses.iter().filter(|s| s.state.is_active()) {
            if store.launch_by_scheduler_id(&s.scheduler_id)?.is_some() {
                continue;
            }
            let l = store.create_launch(&QueuedLaunch {
                id: 0,
                scheduler_id: s.scheduler_id.clone(),
                scheduler: site.kind.name().to_string(),
                project: s.project.clone(),
                queue: s.queue.clone(),
                nodes: s.nodes.unwrap_or(0) as u32,
                wall_minutes: s.wall_minutes.unwrap_or(0) as u32,
                job_mode: String::new(),
                wf_filter: String::new(),
                command: s.name.clone(),
                state: launch_state(&s.state).into(),
                sched_flags: String::new(),
                from_balsam: false,
                prescheduled_only: false,
                reason: "found in the queue; not submitted by this database".into(),
                created_us: 0,
                updated_us: 0,
            })?;
            tracing::info!(
                "adopted {} job {} ({:?}, {} nodes, queue {:?})",
                site.kind,
                l.scheduler_id,
                l.command,
                l.nodes,
                l.queue
            );
        }
    }
    Ok(statuses)
}

/// Whether an adopted batch job runs a Balsam launcher (a `qlaunch` script, or a name or
/// command that says balsam): only those are counted as covering the database's work. Other
/// batch jobs of the user only take places in the queue.
pub fn runs_launcher(l: &QueuedLaunch) -> bool {
    l.from_balsam || {
        let c = l.command.to_ascii_lowercase();
        c.contains("qlaunch") || c.contains("balsam")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> QueuedLaunch {
        QueuedLaunch {
            id: 1,
            scheduler_id: "278079".into(),
            scheduler: "cobalt".into(),
            project: "SDL_Workshop".into(),
            queue: "training".into(),
            nodes: 2,
            wall_minutes: 5,
            job_mode: "serial".into(),
            wf_filter: String::new(),
            command: "/gpfs/mira-home/msalim/test-db/qsubmit/qlaunch1.sh".into(),
            state: "submitted".into(),
            sched_flags: String::new(),
            from_balsam: true,
            prescheduled_only: false,
            reason: String::new(),
            created_us: 0,
            updated_us: 0,
        }
    }

    #[test]
    fn qlaunch_prints_as_the_talk_shows() {
        assert_eq!(
            qlaunch_text(&launch()),
            "Qlaunch { 'command': '/gpfs/mira-home/msalim/test-db/qsubmit/qlaunch1.sh',\n  \
             'from_balsam': True,\n  'id': 1,\n  'job_mode': 'serial',\n  'nodes': 2,\n  \
             'prescheduled_only': False,\n  'project': 'SDL_Workshop',\n  'queue': 'training',\n  \
             'scheduler_id': 278079,\n  'state': 'submitted',\n  'wall_minutes': 5,\n  \
             'wf_filter': ''}"
        );
        let mut l = launch();
        l.scheduler_id = "12.pbs'x".into();
        assert!(qlaunch_text(&l).contains("'scheduler_id': '12.pbs\\'x'"));
    }

    #[test]
    fn adopted_jobs_cover_work_only_when_they_run_a_launcher() {
        let mut l = launch();
        l.from_balsam = false;
        l.command = "qlaunch7.sh".into();
        assert!(runs_launcher(&l));
        l.command = "my-balsam-run".into();
        assert!(runs_launcher(&l));
        l.command = "vasp.sh".into();
        assert!(!runs_launcher(&l));
    }

    #[test]
    fn program_settings() {
        let root = Path::new("/db");
        assert_eq!(program_setting(root, ""), None);
        assert_eq!(program_setting(root, "qsub"), Some(PathBuf::from("qsub")));
        assert_eq!(
            program_setting(root, "/usr/bin/qsub"),
            Some(PathBuf::from("/usr/bin/qsub"))
        );
        assert_eq!(
            program_setting(root, "bin/qsub"),
            Some(PathBuf::from("/db/bin/qsub"))
        );
    }
}

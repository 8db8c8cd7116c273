//! Job transitions (legacy §2): everything that happens to a job before and after its run,
//! away from MPI, so the launcher's transition threads and the service (`balsam service`) run
//! the same code.
//!
//! - CREATED → READY / AWAITING_PARENTS / FAILED: the store checks the parents.
//! - READY → STAGED_IN: the working directory; `stage_in_url` copied in (a local file or
//!   directory, `file://` allowed); parents' files matching `input_files` linked in, a name
//!   clash getting `_{parent id8}`, and nothing existing ever overwritten (legacy restarts broke
//!   on that).
//! - STAGED_IN → PREPROCESSED: the application's preprocess script, once (restarts never come
//!   back here), 300 s at most, output in `preprocess.log`; failure → FAILED.
//! - RUN_DONE → POSTPROCESSED: the postprocess script (`postprocess.log`); a state the script set
//!   itself (`balsam modify $BALSAM_JOB_ID state ...`) stands: the compare-and-set that follows
//!   meets it as a conflict and leaves it.
//! - RUN_ERROR: with post_error_handler the postprocess script runs with BALSAM_JOB_ERROR=TRUE
//!   and must set the state, else FAILED; without, FAILED.
//! - RUN_TIMEOUT: with post_timeout_handler likewise with BALSAM_JOB_TIMEOUT=TRUE; else
//!   RESTART_READY with auto_timeout_retry (the store enforces the restart bound), else FAILED.
//! - POSTPROCESSED → JOB_FINISHED, after copying `stage_out_files` to `stage_out_url`.
//! - Any error on the way → FAILED, with the error in the state history.
//!
//! Scripts run without a shell, in the working directory, with the job's environment (see
//! [`crate::jobenv`]) including `BALSAM_DB_PATH`, so the `balsam` CLI works from inside them.
//!
//! Throughput: most jobs of a large campaign have no parents, no stage-in and no preprocess
//! script. [`Transitions::fast_forward`] takes such jobs from CREATED to PREPROCESSED in one
//! batched transaction for the whole batch, and [`after_run`] plans the states after a run so
//! the launcher writes them in the same batch as the run's outcome.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use balsam_store::{
    Application, DbDir, Job, LeaseFilter, LeaseGroup, Outcome, State, Store, Transition, Uuid,
};
use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};
use crate::health::{is_database_trouble, Health, Resource};
use crate::jobenv::{job_environment, LauncherContext};
use crate::messages::{ExitStatus, KillReason};
use crate::nursery::{ScriptNursery, ScriptRunner};
use crate::process;

/// Time limit of a pre- or postprocess script (legacy: 300 s).
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// How transitions behave; the defaults are legacy's.
#[derive(Debug, Clone)]
pub struct TransitionOptions {
    /// Time limit of one pre- or postprocess script run.
    pub script_timeout: Duration,
    /// Between SIGTERM and SIGKILL for a script past its limit.
    pub kill_grace: Duration,
    /// The launcher's facts for the scripts' environment (None in the service).
    pub launcher: Option<LauncherContext>,
    /// The launcher's nursery for scripts, so that their processes end with them and with the
    /// launcher (None: they run from this process, as in the service).
    pub scripts: Option<ScriptNursery>,
}

impl Default for TransitionOptions {
    fn default() -> Self {
        TransitionOptions {
            script_timeout: SCRIPT_TIMEOUT,
            kill_grace: Duration::from_secs(5),
            launcher: None,
            scripts: None,
        }
    }
}

/// Applications by name, kept for a short while: they rarely change during a run, and every job
/// needs its application.
#[derive(Debug, Default)]
pub struct AppCache {
    apps: HashMap<String, (Instant, Arc<Application>)>,
}

/// How long an application stays cached.
const APP_TTL: Duration = Duration::from_secs(10);

impl AppCache {
    /// The application `name`, from the cache or the store.
    pub fn get(&mut self, store: &mut Store, name: &str) -> Result<Arc<Application>> {
        if let Some((t, app)) = self.apps.get(name) {
            if t.elapsed() < APP_TTL {
                return Ok(app.clone());
            }
        }
        let app = match store.app(name) {
            Ok(a) => Arc::new(a),
            // The database cannot be reached: the application as last read beats waiting out
            // the store's patience once per finished job.
            Err(e) if e.is_unavailable() => match self.apps.get(name) {
                Some((_, app)) => return Ok(app.clone()),
                None => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        self.apps
            .insert(name.to_string(), (Instant::now(), app.clone()));
        Ok(app)
    }
}

/// Runs transitions for one session (a launcher's or the service's). Not shared between
/// threads: each thread makes its own (each has its own database connection).
pub struct Transitions {
    store: Store,
    db: DbDir,
    session: i64,
    opts: TransitionOptions,
    apps: AppCache,
    scripts: ScriptRunner,
}

impl Transitions {
    /// Opens the database for transitions on behalf of `session`.
    pub fn new(db: &DbDir, session: i64, opts: TransitionOptions) -> Result<Transitions> {
        let store = Store::open(db.clone())?;
        let base_env = process::base_environment(process::balsam_cli_dir().as_deref());
        let scripts = ScriptRunner::new(&base_env, opts.scripts.clone());
        Ok(Transitions {
            store,
            db: db.clone(),
            session,
            opts,
            apps: AppCache::default(),
            scripts,
        })
    }

    /// The store this instance writes through.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Processes one job leased by this session, as far as it goes (CREATED may go all the way
    /// to PREPROCESSED; RUN_DONE to JOB_FINISHED), then gives its lease back. Returns the state
    /// it ends in. Errors of the transition itself end the job FAILED (with the error in its
    /// history); only database errors are returned.
    /// A failure of the file system under the database directory (full, read-only...) is not the
    /// job's: the job is left as it was, its lease given back, and [`Error::FileSystem`] returned.
    pub fn process(&mut self, job: Job) -> Result<State> {
        let pk = job.pk;
        let cute = job.cute_id();
        let mut job = job;
        let state = match self.advance(&mut job) {
            Ok(()) => job.state,
            Err(Error::Store(e)) if is_fatal_store_error(&e) => return Err(Error::Store(e)),
            Err(e) if self.file_system_trouble(&job, &e) => {
                tracing::debug!(
                    "{cute}: {} failed: {e}; left as it is",
                    step_name(job.state)
                );
                self.store.release(self.session, &[pk])?;
                return Err(Error::FileSystem(format!(
                    "{cute}: {} failed: {e}",
                    step_name(job.state)
                )));
            }
            Err(e) => {
                tracing::warn!("{cute}: {} failed: {e}", step_name(job.state));
                let msg = format!("{} failed: {e}", step_name(job.state));
                let t = Transition::new(pk, job.state, State::Failed, msg);
                match self.store.transition(t, Some(self.session))? {
                    Outcome::Applied(s) | Outcome::Conflict(s) => s,
                    Outcome::Gone => {
                        tracing::info!("{cute}: removed by a user meanwhile; dropped");
                        return Ok(job.state);
                    }
                }
            }
        };
        self.store.release(self.session, &[pk])?;
        Ok(state)
    }

    /// Whether `e`, met while processing `job`, is the file system under the database directory
    /// failing rather than the job: no space, over quota, read-only, or (permission denied) the
    /// job's working directory cannot be written, or the database directory is gone. Stage-out
    /// writes elsewhere, to the job's own destination: its failures are the job's.
    fn file_system_trouble(&self, job: &Job, e: &Error) -> bool {
        let Error::Io { source, .. } = e else {
            return false;
        };
        if job.state == State::Postprocessed {
            return false;
        }
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EIO) => true,
            Some(libc::EACCES | libc::EPERM) => !writable(&job.workdir(&self.db.root)),
            Some(libc::ENOENT) => !self.db.root.join("data").is_dir(),
            _ => false,
        }
    }

    /// Takes the simple jobs of a batch leased by this session from CREATED to PREPROCESSED in
    /// one transaction (no parents, no stage-in, no preprocess script: nothing to do but the
    /// working directory) and gives their leases back. Returns the jobs that need
    /// [`Transitions::process`] one by one.
    pub fn fast_forward(&mut self, jobs: Vec<Job>) -> Result<Vec<Job>> {
        let (slow, runnable) = self.fast_forward_keep(jobs)?;
        let pks: Vec<i64> = runnable.iter().map(|h| h.job.pk).collect();
        if !pks.is_empty() {
            self.store.release(self.session, &pks)?;
        }
        Ok(slow)
    }

    /// Like [`Transitions::fast_forward`], but the jobs that became PREPROCESSED stay leased and
    /// are returned (with their parents' ids, known to be none), for a launcher to run them
    /// without leasing them again. Returns (jobs needing `process`, runnable jobs).
    pub fn fast_forward_keep(&mut self, jobs: Vec<Job>) -> Result<(Vec<Job>, Vec<Handover>)> {
        let mut slow = Vec::new();
        let mut ts = Vec::new();
        let mut fast = Vec::new();
        let mut release = Vec::new();
        // One query for the parents of every job that needs them checked, not one per job.
        let mut candidates = Vec::with_capacity(jobs.len());
        let mut ask = Vec::new();
        for job in jobs {
            let simple = match job.state {
                State::Created | State::Ready => self.is_simple(&job)?,
                _ => Simple::No,
            };
            if simple == Simple::IfParentless {
                ask.push(job.pk);
            }
            candidates.push((job, simple));
        }
        let with_parents = if ask.is_empty() {
            Default::default()
        } else {
            self.store.parent_ids_of(&ask)?
        };
        for (job, how) in candidates {
            let parentless = match how {
                Simple::No => None,
                Simple::Yes => Some(false),
                Simple::IfParentless => (!with_parents.contains_key(&job.pk)).then_some(true),
            };
            let Some(parentless) = parentless else {
                slow.push(job);
                continue;
            };
            let wd = job.workdir(&self.db.root);
            if std::fs::create_dir_all(&wd).is_err() {
                // process() reports the error properly.
                slow.push(job);
                continue;
            }
            let first = ts.len();
            if job.state == State::Created {
                ts.push(Transition::new(job.pk, State::Created, State::Ready, ""));
            }
            ts.push(Transition::new(job.pk, State::Ready, State::StagedIn, ""));
            ts.push(Transition::new(
                job.pk,
                State::StagedIn,
                State::Preprocessed,
                "",
            ));
            fast.push((job, first, ts.len(), parentless));
        }
        let outcomes = if ts.is_empty() {
            Vec::new()
        } else {
            self.store.apply(&ts, Some(self.session))?
        };
        let mut runnable = Vec::new();
        for (mut job, from, to, parentless) in fast {
            match outcomes[from..to].last() {
                Some(Outcome::Applied(State::Preprocessed)) => {
                    job.state = State::Preprocessed;
                    runnable.push(Handover {
                        job,
                        parent_ids: parentless.then(Vec::new),
                    });
                }
                _ => release.push(job.pk),
            }
        }
        if !release.is_empty() {
            self.store.release(self.session, &release)?;
        }
        Ok((slow, runnable))
    }

    /// Whether the job takes the fast path: no parents (or, READY, none it needs files from), no
    /// stage-in, no preprocess.
    fn is_simple(&mut self, job: &Job) -> Result<Simple> {
        if !job.spec.stage_in_url.trim().is_empty() {
            return Ok(Simple::No);
        }
        let app = match self.apps.get(&mut self.store, &job.spec.application) {
            Ok(a) => a,
            Err(_) => return Ok(Simple::No),
        };
        if !app.preprocess.trim().is_empty() {
            return Ok(Simple::No);
        }
        // A CREATED job needs the parents check; a READY one only needs its parents for files.
        let needs_parents = job.state == State::Created || !job.spec.input_files.trim().is_empty();
        Ok(if needs_parents {
            Simple::IfParentless
        } else {
            Simple::Yes
        })
    }

    fn advance(&mut self, job: &mut Job) -> Result<()> {
        loop {
            match job.state {
                State::Created | State::AwaitingParents => {
                    match self.store.check_parents(job.pk)? {
                        Some(s) => job.state = s,
                        None => job.state = self.store.job_by_pk(job.pk)?.state,
                    }
                    if matches!(job.state, State::Created | State::AwaitingParents) {
                        return Ok(());
                    }
                }
                State::Ready => {
                    let msg = self.stage_in(job)?;
                    if !self.step(job, State::StagedIn, msg)? {
                        return Ok(());
                    }
                }
                State::StagedIn => {
                    let app = self.apps.get(&mut self.store, &job.spec.application)?;
                    if !app.preprocess.trim().is_empty() {
                        self.run_script("preprocess", &app.preprocess, job, &[])?;
                    }
                    if !self.step(job, State::Preprocessed, "")? {
                        return Ok(());
                    }
                }
                State::RunDone => {
                    let app = self.apps.get(&mut self.store, &job.spec.application)?;
                    if !app.postprocess.trim().is_empty() {
                        self.run_script("postprocess", &app.postprocess, job, &[])?;
                    }
                    if !self.step(job, State::Postprocessed, "")? {
                        return Ok(());
                    }
                }
                State::Postprocessed => {
                    let msg = self.stage_out(job)?;
                    if !self.step(job, State::JobFinished, msg)? {
                        return Ok(());
                    }
                }
                State::RunError => {
                    if job.spec.post_error_handler {
                        return self.handler(job, "post_error_handler", "BALSAM_JOB_ERROR");
                    }
                    self.step(job, State::Failed, "")?;
                    return Ok(());
                }
                State::RunTimeout => {
                    if job.spec.post_timeout_handler {
                        return self.handler(job, "post_timeout_handler", "BALSAM_JOB_TIMEOUT");
                    }
                    if job.spec.auto_timeout_retry {
                        self.step(job, State::RestartReady, "automatic retry after timeout")?;
                    } else {
                        self.step(job, State::Failed, "timed out; auto_timeout_retry is off")?;
                    }
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
    }

    /// Runs the postprocess script as an error or timeout handler: it must set the job's state.
    fn handler(&mut self, job: &mut Job, flag: &str, var: &str) -> Result<()> {
        let app = self.apps.get(&mut self.store, &job.spec.application)?;
        if app.postprocess.trim().is_empty() {
            self.step(
                job,
                State::Failed,
                format!(
                    "{flag} is set but application {:?} has no postprocess script",
                    app.name
                ),
            )?;
            return Ok(());
        }
        let before = job.state;
        self.run_script("postprocess", &app.postprocess, job, &[(var, "TRUE")])?;
        let now = self.store.job_by_pk(job.pk)?.state;
        if now != before {
            job.state = now;
            return Ok(());
        }
        self.step(
            job,
            State::Failed,
            format!("the {flag} (postprocess with {var}=TRUE) did not set the job's state"),
        )?;
        Ok(())
    }

    /// Applies `job.state → to`; false when the job was changed by someone else meanwhile
    /// (its new state then stands and processing stops).
    fn step(&mut self, job: &mut Job, to: State, msg: impl Into<String>) -> Result<bool> {
        let t = Transition::new(job.pk, job.state, to, msg);
        match self.store.transition(t, Some(self.session))? {
            Outcome::Applied(s) => {
                job.state = s;
                Ok(s == to)
            }
            Outcome::Conflict(s) => {
                tracing::info!(
                    "{}: now {s}, set by someone else; left as it is",
                    job.cute_id()
                );
                job.state = s;
                Ok(false)
            }
            Outcome::Gone => {
                tracing::info!("{}: removed by a user meanwhile; dropped", job.cute_id());
                Ok(false)
            }
        }
    }

    fn stage_in(&mut self, job: &Job) -> Result<String> {
        let wd = job.workdir(&self.db.root);
        std::fs::create_dir_all(&wd).map_err(|e| {
            Error::io(
                format!("cannot create working directory {}", wd.display()),
                e,
            )
        })?;
        let mut notes = Vec::new();
        let url = job.spec.stage_in_url.trim();
        if !url.is_empty() {
            let n = copy_in(url, &wd)?;
            notes.push(format!("staged in {n} files from {url}"));
        }
        let patterns: Vec<&str> = job.spec.input_files.split_whitespace().collect();
        if !patterns.is_empty() {
            let parents = self.store.parents(job.pk)?;
            let mut all = Brought::default();
            for p in &parents {
                let b = bring_parent_files(&p.workdir(&self.db.root), &p.id8(), &patterns, &wd)?;
                all.copied += b.copied;
                all.linked += b.linked;
            }
            let what = match (all.copied, all.linked) {
                (0, 0) => None,
                (c, 0) => Some(format!("copied {c} files")),
                (0, l) => Some(format!("linked {l} files")),
                (c, l) => Some(format!("copied {c} files and linked {l}")),
            };
            if let Some(what) = what {
                notes.push(format!("{what} from {} parents", parents.len()));
            }
        }
        Ok(notes.join("; "))
    }

    fn stage_out(&mut self, job: &Job) -> Result<String> {
        let url = job.spec.stage_out_url.trim();
        let patterns: Vec<&str> = job.spec.stage_out_files.split_whitespace().collect();
        if url.is_empty() || patterns.is_empty() {
            return Ok(String::new());
        }
        let n = copy_out(&job.workdir(&self.db.root), &patterns, url)?;
        Ok(format!("staged out {n} files to {url}"))
    }

    /// Runs a pre/postprocess script to completion within the time limit.
    fn run_script(
        &mut self,
        what: &'static str,
        script: &str,
        job: &Job,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let wd = job.workdir(&self.db.root);
        std::fs::create_dir_all(&wd).map_err(|e| {
            Error::io(
                format!("cannot create working directory {}", wd.display()),
                e,
            )
        })?;
        let log = wd.join(format!("{what}.log"));
        let argv = process::command_argv(script, "")?;
        let parents = self.store.parent_ids(job.pk)?;
        let mut env = job_environment(job, &parents, &self.db.root, self.opts.launcher.as_ref());
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let script_err = |problem: String| Error::Script {
            what,
            script: script.to_string(),
            problem,
            log: log.clone(),
        };
        let run = self
            .scripts
            .run(
                &argv,
                &wd,
                &log,
                &env,
                self.opts.script_timeout,
                self.opts.kill_grace,
            )
            .map_err(|e| script_err(e.why))?;
        let pid = run.pid;
        match run.status {
            Some(st) => {
                if st.success() {
                    Ok(())
                } else {
                    let tail = process::tail_lines(&log, 8);
                    Err(script_err(format!("ended with {}:\n{tail}", st.describe())))
                }
            }
            None => Err(script_err(format!(
                "ran longer than its {} s limit and was killed (pid {pid})",
                self.opts.script_timeout.as_secs()
            ))),
        }
    }
}

/// Database errors after which processing other jobs makes no sense either; none of them is the
/// job's fault, so the job is never failed for one (an unreachable server among them).
fn is_fatal_store_error(e: &balsam_store::Error) -> bool {
    matches!(
        e,
        balsam_store::Error::Sql(_)
            | balsam_store::Error::Pg(_)
            | balsam_store::Error::SessionEnded(_)
            | balsam_store::Error::Corrupt(_)
    ) || e.is_unavailable()
}

fn step_name(state: State) -> &'static str {
    match state {
        State::Created | State::AwaitingParents => "checking parents",
        State::Ready => "stage-in",
        State::StagedIn => "preprocess",
        State::RunDone => "postprocess",
        State::Postprocessed => "stage-out",
        State::RunError => "error handling",
        State::RunTimeout => "timeout handling",
        _ => "transition",
    }
}

/// Whether this process may write `path`, or, when it does not exist yet, its nearest existing
/// parent directory.
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path;
    while p.symlink_metadata().is_err() {
        match p.parent() {
            Some(parent) => p = parent,
            None => return false,
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// A local path from a stage-in/out location: a path or `file://path`.
fn local_path(field: &'static str, url: &str) -> Result<PathBuf> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.contains("://") {
        return Err(Error::BadUrl {
            field,
            url: url.to_string(),
            problem: "only local paths and file:// locations are supported".into(),
        });
    }
    Ok(PathBuf::from(path))
}

/// Copies a file, or a directory's contents, into `wd`; existing files are kept.
fn copy_in(url: &str, wd: &Path) -> Result<usize> {
    let src = local_path("stage_in_url", url)?;
    let meta = std::fs::metadata(&src).map_err(|e| Error::BadUrl {
        field: "stage_in_url",
        url: url.to_string(),
        problem: format!("cannot read {}: {e}", src.display()),
    })?;
    if meta.is_dir() {
        copy_tree(&src, wd, false)
    } else {
        let name = src.file_name().ok_or_else(|| Error::BadUrl {
            field: "stage_in_url",
            url: url.to_string(),
            problem: "names no file".into(),
        })?;
        copy_file(&src, &wd.join(name), false)
    }
}

/// Copies `from`'s contents into `to` recursively; returns files copied.
fn copy_tree(from: &Path, to: &Path, overwrite: bool) -> Result<usize> {
    std::fs::create_dir_all(to)
        .map_err(|e| Error::io(format!("cannot create {}", to.display()), e))?;
    let mut n = 0;
    let entries = std::fs::read_dir(from)
        .map_err(|e| Error::io(format!("cannot list {}", from.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", from.display()), e))?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            n += copy_tree(&path, &dest, overwrite)?;
        } else {
            n += copy_file(&path, &dest, overwrite)?;
        }
    }
    Ok(n)
}

fn copy_file(from: &Path, to: &Path, overwrite: bool) -> Result<usize> {
    if !overwrite && to.symlink_metadata().is_ok() {
        return Ok(0);
    }
    if reflink(from, to) {
        return Ok(1);
    }
    std::fs::copy(from, to).map_err(|e| {
        Error::io(
            format!("cannot copy {} to {}", from.display(), to.display()),
            e,
        )
    })?;
    Ok(1)
}

/// Makes `to` a reflink of `from` (FICLONE: the two share their blocks until one is written),
/// keeping `from`'s permissions. False when the file system cannot, and nothing is left behind.
fn reflink(from: &Path, to: &Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(src) = std::fs::File::open(from) else {
        return false;
    };
    let Ok(meta) = src.metadata() else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    use std::os::unix::fs::PermissionsExt;
    let Ok(dst) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.permissions().mode() & 0o7777)
        .open(to)
    else {
        return false;
    };
    // SAFETY: FICLONE between two open descriptors this function owns.
    let ok = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
    if !ok {
        drop(dst);
        let _ = std::fs::remove_file(to);
    }
    ok
}

/// The file in a job's working directory that records which parents' files were brought in
/// (`DEST<TAB>SOURCE` per line), so that a restart brings nothing twice and overwrites nothing.
pub const PARENT_FILES_RECORD: &str = ".balsam-parent-files";

/// An `input_files` pattern that links instead of copying: `ln:*.h5`.
const LINK_PREFIX: &str = "ln:";

/// What [`bring_parent_files`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Brought {
    /// Files (directories count their files) copied, as reflinks where the file system can.
    pub copied: usize,
    /// Symbolic links made (`ln:` patterns).
    pub linked: usize,
}

/// Brings a parent's files matching `patterns` into `wd`.
///
/// A child must never change its parents' files, so a match is copied: a reflink where the file
/// system has them (XFS, btrfs: instant, no space used until written), else a full copy through
/// a temporary name, so a full disk leaves no half file. A pattern written `ln:PATTERN` makes
/// symbolic links instead, for inputs too large to copy; the child must then only read them.
///
/// A name already taken in `wd` (a stage-in file, another parent's file) gets `_{parent id8}`
/// appended; when that is taken too the file is left out. What was brought is recorded in
/// [`PARENT_FILES_RECORD`], so a restart brings nothing again and never overwrites what the
/// job's first run did to its copies. Names starting with a dot are matched only by patterns
/// that start with one, as in a shell.
pub fn bring_parent_files(
    parent_wd: &Path,
    parent_id8: &str,
    patterns: &[&str],
    wd: &Path,
) -> Result<Brought> {
    let mut done = Brought::default();
    if !parent_wd.is_dir() {
        return Ok(done);
    }
    let record_path = wd.join(PARENT_FILES_RECORD);
    let record = std::fs::read_to_string(&record_path).unwrap_or_default();
    let mut brought: HashSet<PathBuf> = record
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(_, src)| PathBuf::from(src))
        .collect();
    let base = glob::Pattern::escape(&parent_wd.to_string_lossy());
    let opts = glob::MatchOptions {
        require_literal_leading_dot: true,
        ..glob::MatchOptions::new()
    };
    for raw in patterns {
        let (link, pat) = match raw.strip_prefix(LINK_PREFIX) {
            Some(p) => (true, p),
            None => (false, *raw),
        };
        if pat.split('/').any(|c| c == "..") {
            return Err(Error::BadPattern {
                field: "input_files",
                pattern: raw.to_string(),
                problem: "must not leave the parent's working directory".into(),
            });
        }
        let full = format!("{base}/{pat}");
        let matches = glob::glob_with(&full, opts).map_err(|e| Error::BadPattern {
            field: "input_files",
            pattern: raw.to_string(),
            problem: e.to_string(),
        })?;
        for m in matches.flatten() {
            let Some(name) = m.file_name() else { continue };
            if name == PARENT_FILES_RECORD || brought.contains(&m) {
                continue;
            }
            // Links made by versions that linked everything count as brought.
            let target = wd.join(name);
            let alt = wd.join(format!("{}_{parent_id8}", name.to_string_lossy()));
            let link_to = |p: &Path| std::fs::read_link(p).map(|t| t == m).unwrap_or(false);
            if link_to(&target) || link_to(&alt) {
                continue;
            }
            let dest = if target.symlink_metadata().is_err() {
                target
            } else if alt.symlink_metadata().is_err() {
                alt
            } else {
                continue;
            };
            if link {
                std::os::unix::fs::symlink(&m, &dest).map_err(|e| {
                    Error::io(
                        format!("cannot link {} to {}", dest.display(), m.display()),
                        e,
                    )
                })?;
                done.linked += 1;
            } else {
                done.copied += copy_whole(&m, &dest)?;
            }
            append_record(&record_path, &dest, &m)?;
            brought.insert(m);
        }
    }
    Ok(done)
}

/// Copies a file or a directory tree to `dest` through a temporary name beside it, so that
/// `dest` appears whole or not at all. Returns the files copied.
fn copy_whole(from: &Path, dest: &Path) -> Result<usize> {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dest.with_file_name(format!(".{name}.balsam-copy"));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_file(&tmp);
    let copied = if from.is_dir() {
        copy_tree(from, &tmp, true)
    } else {
        copy_file(from, &tmp, true)
    };
    let n = copied
        .and_then(|n| {
            std::fs::rename(&tmp, dest)
                .map_err(|e| {
                    Error::io(
                        format!("cannot rename {} to {}", tmp.display(), dest.display()),
                        e,
                    )
                })
                .map(|_| n)
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::remove_file(&tmp);
        })?;
    Ok(n)
}

fn append_record(record: &Path, dest: &Path, source: &Path) -> Result<()> {
    use std::io::Write;
    let line = format!(
        "{}\t{}\n",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        source.display()
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(record)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| Error::io(format!("cannot write {}", record.display()), e))
}

/// Copies files of `wd` matching `patterns` to the directory `url`; returns files copied.
fn copy_out(wd: &Path, patterns: &[&str], url: &str) -> Result<usize> {
    let dest = local_path("stage_out_url", url)?;
    std::fs::create_dir_all(&dest).map_err(|e| Error::BadUrl {
        field: "stage_out_url",
        url: url.to_string(),
        problem: format!("cannot create {}: {e}", dest.display()),
    })?;
    let base = glob::Pattern::escape(&wd.to_string_lossy());
    let mut n = 0;
    for pat in patterns {
        let matches = glob::glob(&format!("{base}/{pat}")).map_err(|e| Error::BadPattern {
            field: "stage_out_files",
            pattern: pat.to_string(),
            problem: e.to_string(),
        })?;
        for m in matches.flatten() {
            let Some(name) = m.file_name() else { continue };
            if m.is_dir() {
                n += copy_tree(&m, &dest.join(name), true)?;
            } else {
                n += copy_file(&m, &dest.join(name), true)?;
            }
        }
    }
    Ok(n)
}

/// A job the fast path made runnable, still leased, handed to the launcher.
#[derive(Debug, Clone)]
pub struct Handover {
    /// The job, now PREPROCESSED.
    pub job: Job,
    /// Its parents' ids when known (empty: it has none).
    pub parent_ids: Option<Vec<Uuid>>,
}

/// Whether a job can take the fast path (see [`Transitions::is_simple`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simple {
    No,
    /// Yes; whether it has parents is not known.
    Yes,
    /// Yes if it has no parents.
    IfParentless,
}

/// Where the pool's fast path delivers jobs it made runnable (their leases pass with them), and
/// how many the launcher can take now.
///
/// The feeder leases new jobs for the fast path only as far as the launcher has room for them:
/// a job made runnable that the launcher does not want must be given back and leased again
/// later, two writes of its row for nothing (on PostgreSQL, half the server's work per job when
/// the feeder ran ahead of short jobs).
pub struct Handoff {
    /// Takes jobs made runnable.
    pub deliver: Box<dyn Fn(Vec<Handover>) + Send>,
    /// How many more runnable jobs the launcher would take now.
    pub room: Box<dyn Fn() -> Room + Send>,
}

/// Room for runnable jobs in a launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// How many more it would take now.
    pub free: usize,
    /// How many it holds when full.
    pub wanted: usize,
}

/// How a run ended, as the launcher saw it.
#[derive(Debug, Clone)]
pub struct RunResult<'a> {
    /// Exit code, signal, or why it never started.
    pub status: &'a ExitStatus,
    /// Set when the launcher stopped it.
    pub killed: Option<KillReason>,
    /// The last lines of its output.
    pub tail: &'a str,
    /// How long it ran.
    pub elapsed: Duration,
}

/// What to write after a run.
#[derive(Debug, Clone, PartialEq)]
pub struct AfterRun {
    /// The transitions, in order, starting from RUNNING (apply them in one batch).
    pub transitions: Vec<Transition>,
    /// The job needs [`Transitions::process`] afterwards (a postprocess script, stage-out, a
    /// handler); keep its lease and hand it over.
    pub needs_processing: bool,
}

/// Plans the state changes after a run ends (legacy §2 and §3). Nothing is written for a job
/// killed by its user or by a lost session. When the outcome needs no script and no stage-out,
/// the plan goes on to the end (RUN_DONE → POSTPROCESSED → JOB_FINISHED; RUN_ERROR → FAILED;
/// RUN_TIMEOUT → RESTART_READY), so it is one batched write. `shutting_down`: a timeout handler
/// is left for the next launcher or the service (the job stays RUN_TIMEOUT).
pub fn after_run(
    job: &Job,
    app: Option<&Application>,
    run: &RunResult,
    shutting_down: bool,
) -> AfterRun {
    let pk = job.pk;
    let secs = run.elapsed.as_secs_f64();
    let mut ts = Vec::new();
    let mut needs = false;
    if let ExitStatus::Infrastructure(_) = run.status {
        // The launcher could not write the job's files: not the job's doing; it stays as it was.
        return AfterRun {
            transitions: ts,
            needs_processing: false,
        };
    }
    match run.killed {
        Some(KillReason::User) | Some(KillReason::SessionLost) | Some(KillReason::Reclaimed) => {}
        Some(
            reason @ (KillReason::TimeLimit
            | KillReason::Signal
            | KillReason::WallTime
            | KillReason::Exit),
        ) => {
            let why = match reason {
                KillReason::WallTime => format!(
                    "ran past its wall_time_minutes ({}) and was killed after {secs:.1} s",
                    job.spec.wall_time_minutes
                ),
                KillReason::Signal => format!("still running when the launcher was stopped by a signal; killed after {secs:.1} s"),
                _ => format!("still running at the launcher's time limit; killed after {secs:.1} s"),
            };
            let mut t = Transition::new(pk, State::Running, State::RunTimeout, why);
            if !matches!(run.status, ExitStatus::NotStarted(_)) {
                t.return_code = Some(run.status.return_code());
            }
            ts.push(t);
            if job.spec.post_timeout_handler {
                needs = !shutting_down;
            } else if job.spec.auto_timeout_retry {
                ts.push(Transition::new(
                    pk,
                    State::RunTimeout,
                    State::RestartReady,
                    "automatic retry after timeout",
                ));
            } else {
                ts.push(Transition::new(
                    pk,
                    State::RunTimeout,
                    State::Failed,
                    "timed out; auto_timeout_retry is off",
                ));
            }
        }
        None if run.status.success() => {
            ts.push(
                Transition::new(
                    pk,
                    State::Running,
                    State::RunDone,
                    format!("exit code 0 after {secs:.3} s"),
                )
                .with_code(0),
            );
            let has_post = app
                .map(|a| !a.postprocess.trim().is_empty())
                .unwrap_or(true);
            let has_stage_out = !job.spec.stage_out_url.trim().is_empty()
                && !job.spec.stage_out_files.trim().is_empty();
            if has_post || has_stage_out {
                needs = true;
            } else {
                ts.push(Transition::new(
                    pk,
                    State::RunDone,
                    State::Postprocessed,
                    "",
                ));
                ts.push(Transition::new(
                    pk,
                    State::Postprocessed,
                    State::JobFinished,
                    "",
                ));
            }
        }
        None => {
            let mut msg = format!("{} after {secs:.3} s", run.status.describe());
            if !run.tail.trim().is_empty() {
                msg.push_str(":\n");
                msg.push_str(run.tail.trim_end());
            }
            ts.push(
                Transition::new(pk, State::Running, State::RunError, msg)
                    .with_code(run.status.return_code()),
            );
            if job.spec.post_error_handler {
                needs = true;
            } else {
                ts.push(Transition::new(pk, State::RunError, State::Failed, ""));
            }
        }
    }
    AfterRun {
        transitions: ts,
        needs_processing: needs,
    }
}

/// Processes every processable job of `filter` that `session` can lease, with `threads`
/// threads, until none is left: what `balsam service` does each period. Returns how many jobs
/// were processed.
pub fn process_pending(
    db: &DbDir,
    session: i64,
    filter: &LeaseFilter,
    threads: usize,
    opts: &TransitionOptions,
) -> Result<usize> {
    let mut main = Transitions::new(db, session, opts.clone())?;
    let mut done = 0;
    let mut seen = HashSet::new();
    loop {
        let jobs = main
            .store
            .lease(session, LeaseGroup::Processable, filter, 500)?;
        if jobs.is_empty() {
            return Ok(done);
        }
        let (fresh, again): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| seen.insert(j.pk));
        if !again.is_empty() {
            let pks: Vec<i64> = again.iter().map(|j| j.pk).collect();
            main.store.release(session, &pks)?;
        }
        if fresh.is_empty() {
            return Ok(done);
        }
        done += fresh.len();
        let slow = main.fast_forward(fresh)?;
        if slow.is_empty() {
            continue;
        }
        let nthreads = threads.clamp(1, slow.len());
        let queue = std::sync::Mutex::new(slow);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..nthreads)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        let mut t = Transitions::new(db, session, opts.clone())?;
                        loop {
                            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                            let Some(job) = next else { return Ok(()) };
                            t.process(job)?;
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Ok(())))
                .collect()
        });
        for r in results {
            r?;
        }
    }
}

/// The launcher's transition threads: a feeder that leases processable jobs in batches and runs
/// the fast path, and workers that process the rest one by one. Jobs the launcher finished
/// running and that need scripts are handed over directly with [`TransitionPool::handoff`]
/// (their lease kept).
pub struct TransitionPool {
    work_tx: Sender<Job>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    wake_tx: Sender<()>,
    threads: Vec<JoinHandle<()>>,
}

/// Jobs one lease of the feeder takes.
const FEED_BATCH: usize = 500;
/// Jobs the feeder leases each [`STARVED_FEED_EVERY`] while the launcher has no room: jobs the
/// fast path does not make runnable (a postprocess left by a dead launcher, a stage-in) are
/// processed meanwhile, at a pace that costs little when they are given back.
const STARVED_FEED: usize = 16;
/// See [`STARVED_FEED`].
const STARVED_FEED_EVERY: Duration = Duration::from_secs(1);

impl TransitionPool {
    /// Starts `threads` workers and the feeder for `session`, leasing jobs of `filter`.
    pub fn start(
        db: &DbDir,
        session: i64,
        filter: LeaseFilter,
        threads: usize,
        opts: TransitionOptions,
        handoff: Option<Handoff>,
        health: Arc<Health>,
    ) -> Result<TransitionPool> {
        let threads = threads.max(1);
        let (work_tx, work_rx) = crossbeam_channel::bounded::<Job>(threads * 4 + FEED_BATCH);
        let (wake_tx, wake_rx) = crossbeam_channel::bounded::<()>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for i in 0..threads {
            let mut t = Transitions::new(db, session, opts.clone())?;
            let rx = work_rx.clone();
            let stop = stop.clone();
            let in_flight = in_flight.clone();
            let health = health.clone();
            let h = std::thread::Builder::new()
                .name(format!("transitions-{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        if !stop.load(Ordering::Relaxed) {
                            let (cute, pk) = (job.cute_id(), job.pk);
                            match t.process(job) {
                                Ok(s) => {
                                    health.ok(Resource::JobFiles);
                                    tracing::debug!("{cute}: {s}")
                                }
                                Err(Error::FileSystem(why)) => {
                                    health.failed(Resource::JobFiles, &why, Instant::now())
                                }
                                Err(Error::Store(e)) if is_database_trouble(&e) => {
                                    health.failed(
                                        Resource::Database,
                                        &e.to_string(),
                                        Instant::now(),
                                    );
                                    release_when_back(&mut t, &[pk], &stop)
                                }
                                Err(e) => tracing::error!("{cute}: transition failed: {e}"),
                            }
                        }
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                    }
                })
                .map_err(|e| Error::io("cannot start a transition thread", e))?;
            handles.push(h);
        }
        let mut feeder = Transitions::new(db, session, opts)?;
        let feed_tx = work_tx.clone();
        let (stop2, in_flight2, health2) = (stop.clone(), in_flight.clone(), health.clone());
        let h = std::thread::Builder::new()
            .name("transitions-feeder".into())
            .spawn(move || {
                process::lower_thread_priority(crate::store_thread::BOOKKEEPING_NICE);
                feed(
                    &mut feeder,
                    session,
                    &filter,
                    &feed_tx,
                    &wake_rx,
                    &stop2,
                    &in_flight2,
                    handoff,
                    &health2,
                )
            })
            .map_err(|e| Error::io("cannot start the transition feeder", e))?;
        handles.push(h);
        Ok(TransitionPool {
            work_tx,
            stop,
            in_flight,
            wake_tx,
            threads: handles,
        })
    }

    /// Hands over a job this session leases (e.g. RUN_DONE with a postprocess script).
    pub fn handoff(&self, job: Job) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.work_tx.send(job).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Asks the feeder to look for work now (e.g. after jobs ended and may have woken children).
    pub fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    /// Jobs leased by the pool and not processed yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Stops taking work, lets each thread finish the job in hand, and waits for the threads up
    /// to `wait`. Jobs still queued stay leased (ending the session releases them).
    pub fn stop(self, wait: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake_tx.try_send(());
        drop(self.work_tx);
        drop(self.wake_tx);
        let deadline = Instant::now() + wait;
        for h in self.threads {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// Gives back the leases of jobs whose processing an unreachable database cut short, once it
/// is back: they are leased again in whatever state was written, instead of staying held by
/// this session with nobody working on them. Gives up when the pool stops (ending the session
/// releases them then).
fn release_when_back(t: &mut Transitions, pks: &[i64], stop: &AtomicBool) {
    let mut pause = Duration::from_millis(500);
    while !stop.load(Ordering::Relaxed) {
        match t.store.release(t.session, pks) {
            Ok(_) => return,
            Err(e) if is_database_trouble(&e) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!("giving back {} jobs failed: {e}", pks.len());
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn feed(
    t: &mut Transitions,
    session: i64,
    filter: &LeaseFilter,
    work_tx: &Sender<Job>,
    wake_rx: &Receiver<()>,
    stop: &AtomicBool,
    in_flight: &AtomicUsize,
    handoff: Option<Handoff>,
    health: &Health,
) {
    let mut pause = Duration::from_millis(20);
    let mut last_starved = Instant::now()
        .checked_sub(STARVED_FEED_EVERY)
        .unwrap_or_else(Instant::now);
    while !stop.load(Ordering::Relaxed) {
        if !health.may_start_jobs(Instant::now()) {
            // The database or the job files cannot be written: wait for the retry.
            let _ = wake_rx.recv_timeout(Duration::from_millis(200));
            continue;
        }
        let batch = match &handoff {
            None => FEED_BATCH,
            Some(h) => match feed_batch((h.room)(), last_starved.elapsed()) {
                Feed::Room(n) => n,
                Feed::Starved(n) => {
                    last_starved = Instant::now();
                    n
                }
                Feed::Wait => {
                    // Full: the store thread wakes the feeder when a quarter is free again.
                    let _ = wake_rx.recv_timeout(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        // The lease counts as in flight from before it is taken: once committed, its jobs are
        // this launcher's and no longer free, and the store thread must not see "nothing in
        // flight, nothing free" meanwhile and let an idle launcher leave with them.
        in_flight.fetch_add(1, Ordering::AcqRel);
        let leased = t
            .store
            .lease(session, LeaseGroup::Processable, filter, batch);
        if let Ok(j) = &leased {
            in_flight.fetch_add(j.len(), Ordering::AcqRel);
        }
        in_flight.fetch_sub(1, Ordering::AcqRel);
        let leased = match leased {
            Ok(j) => j,
            Err(balsam_store::Error::SessionEnded(_)) => return,
            Err(e) if is_database_trouble(&e) => {
                health.failed(Resource::Database, &e.to_string(), Instant::now());
                Vec::new()
            }
            Err(e) => {
                // An unreachable database is announced once by the store itself.
                if !e.is_unavailable() {
                    tracing::error!("leasing processable jobs: {e}");
                }
                Vec::new()
            }
        };
        if leased.is_empty() {
            let _ = wake_rx.recv_timeout(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
            continue;
        }
        pause = Duration::from_millis(20);
        let n = leased.len();
        let pks: Vec<i64> = leased.iter().map(|j| j.pk).collect();
        let slow = match &handoff {
            None => t.fast_forward(leased),
            Some(h) => t.fast_forward_keep(leased).map(|(slow, runnable)| {
                if !runnable.is_empty() {
                    (h.deliver)(runnable);
                }
                slow
            }),
        };
        let slow = match slow {
            Ok(s) => s,
            Err(Error::Store(e)) if is_database_trouble(&e) => {
                health.failed(Resource::Database, &e.to_string(), Instant::now());
                release_when_back(t, &pks, stop);
                Vec::new()
            }
            Err(e) => {
                tracing::error!("fast path for {n} jobs: {e}");
                Vec::new()
            }
        };
        in_flight.fetch_sub(n - slow.len(), Ordering::AcqRel);
        for job in slow {
            if stop.load(Ordering::Relaxed) {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            if work_tx.send(job).is_err() {
                in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// What the feeder does next (see [`feed_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Lease this many: the launcher has room for them.
    Room(usize),
    /// Lease this many although the launcher has too little room (the once-a-second lease).
    Starved(usize),
    /// Wait for room.
    Wait,
}

/// What the feeder does when the launcher has `room` and the last lease without enough room
/// was `since_starved` ago.
///
/// It waits for a quarter of the launcher's room (at most a quarter batch) to be free, so that
/// a launcher of short jobs is not filled one job per lease, except that it still takes a few
/// jobs each second for the work the fast path does not cover.
fn feed_batch(room: Room, since_starved: Duration) -> Feed {
    let enough = (room.wanted / 4).clamp(1, FEED_BATCH / 4);
    if room.free >= enough {
        Feed::Room(room.free.min(FEED_BATCH))
    } else if since_starved >= STARVED_FEED_EVERY {
        Feed::Starved(STARVED_FEED.max(room.free))
    } else {
        Feed::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feeder_leases_as_far_as_the_launcher_has_room() {
        let soon = Duration::from_millis(10);
        let room = |free, wanted| Room { free, wanted };
        assert_eq!(feed_batch(room(4096, 4096), soon), Feed::Room(FEED_BATCH));
        assert_eq!(feed_batch(room(300, 2048), soon), Feed::Room(300));
        assert_eq!(feed_batch(room(125, 2048), soon), Feed::Room(125));
        // A launcher of two slots for long jobs is fed job by job.
        assert_eq!(feed_batch(room(4, 4), soon), Feed::Room(4));
        assert_eq!(feed_batch(room(1, 4), soon), Feed::Room(1));
        // Room for exactly the starved batch is still room, not a starved lease.
        assert_eq!(feed_batch(room(16, 64), soon), Feed::Room(16));
        // A little room, or none: wait, but not forever.
        assert_eq!(feed_batch(room(124, 2048), soon), Feed::Wait);
        assert_eq!(feed_batch(room(0, 4), soon), Feed::Wait);
        assert_eq!(feed_batch(room(0, 0), soon), Feed::Wait);
        assert_eq!(
            feed_batch(room(0, 2048), STARVED_FEED_EVERY),
            Feed::Starved(STARVED_FEED)
        );
        // Too little room but more than the starved batch: still a starved lease, so the
        // next one waits its second.
        assert_eq!(
            feed_batch(room(100, 2048), STARVED_FEED_EVERY),
            Feed::Starved(100)
        );
    }

    #[test]
    fn parent_files_are_copied_without_clobbering_and_ln_links() {
        let tmp = tempfile::tempdir().unwrap();
        let (pa, pb, wd) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        for d in [&pa, &pb, &wd] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(pa.join("x.out"), "a").unwrap();
        std::fs::write(pa.join(".hidden.out"), "a").unwrap();
        std::fs::create_dir_all(pa.join("tree.out/sub")).unwrap();
        std::fs::write(pa.join("tree.out/sub/f"), "a").unwrap();
        std::fs::write(pb.join("x.out"), "b").unwrap();
        std::fs::write(pb.join("y.dat"), "b").unwrap();
        std::fs::write(pb.join("big.h5"), "b").unwrap();
        std::fs::write(wd.join("y.dat"), "mine").unwrap();
        let copied = |n| Brought {
            copied: n,
            linked: 0,
        };
        assert_eq!(
            bring_parent_files(&pa, "aaaaaaaa", &["*.out"], &wd).unwrap(),
            copied(2)
        );
        assert_eq!(
            bring_parent_files(&pb, "bbbbbbbb", &["*.out", "*.dat", "ln:*.h5"], &wd).unwrap(),
            Brought {
                copied: 2,
                linked: 1
            }
        );
        let kind = |n: &str| wd.join(n).symlink_metadata().unwrap().file_type();
        assert!(kind("x.out").is_file() && kind("tree.out").is_dir());
        assert!(kind("big.h5").is_symlink());
        assert!(
            !wd.join(".hidden.out").exists(),
            "dot files need a dot pattern"
        );
        assert_eq!(std::fs::read_to_string(wd.join("x.out")).unwrap(), "a");
        assert_eq!(
            std::fs::read_to_string(wd.join("tree.out/sub/f")).unwrap(),
            "a"
        );
        assert_eq!(
            std::fs::read_to_string(wd.join("x.out_bbbbbbbb")).unwrap(),
            "b"
        );
        assert_eq!(std::fs::read_to_string(wd.join("y.dat")).unwrap(), "mine");
        assert_eq!(
            std::fs::read_to_string(wd.join("y.dat_bbbbbbbb")).unwrap(),
            "b"
        );
        // The child writes its copy: the parent's file is untouched.
        std::fs::write(wd.join("x.out"), "written by the child").unwrap();
        assert_eq!(std::fs::read_to_string(pa.join("x.out")).unwrap(), "a");
        // A restart brings nothing again and keeps what the first run did to its copies.
        assert_eq!(
            bring_parent_files(&pa, "aaaaaaaa", &["*.out"], &wd).unwrap(),
            copied(0)
        );
        assert_eq!(
            bring_parent_files(&pb, "bbbbbbbb", &["*.out", "*.dat", "ln:*.h5"], &wd).unwrap(),
            copied(0)
        );
        assert_eq!(
            std::fs::read_to_string(wd.join("x.out")).unwrap(),
            "written by the child"
        );
        // A grandchild with "*" never takes the record as a file.
        let wd2 = tmp.path().join("d");
        std::fs::create_dir_all(&wd2).unwrap();
        bring_parent_files(&wd, "cccccccc", &["*", ".*"], &wd2).unwrap();
        let rec = std::fs::read_to_string(wd2.join(PARENT_FILES_RECORD)).unwrap();
        assert!(!rec.contains(PARENT_FILES_RECORD), "{rec}");
        assert!(bring_parent_files(&pa, "aaaaaaaa", &["../*"], &wd).is_err());
        assert!(bring_parent_files(&pa, "aaaaaaaa", &["ln:../*"], &wd).is_err());
        // No temporary copies are left behind.
        let left: Vec<_> = std::fs::read_dir(&wd)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".balsam-copy"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn local_urls() {
        assert_eq!(
            local_path("stage_in_url", "file:///a/b").unwrap(),
            PathBuf::from("/a/b")
        );
        assert_eq!(
            local_path("stage_in_url", "/a/b").unwrap(),
            PathBuf::from("/a/b")
        );
        let e = local_path("stage_in_url", "globus://ep/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("stage_in_url") && e.contains("file://"), "{e}");
    }
}

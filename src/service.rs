//! `balsam service`: keeps launcher jobs flowing into the batch queue as the work changes.
//!
//! Every SERVICE_PERIOD seconds one pass:
//! 1. refreshes the recorded launches from the scheduler (finished ones are closed, batch jobs
//!    submitted by hand are adopted);
//! 2. runs the transitions of pending jobs (parents, stage-in, preprocess, postprocess,
//!    stage-out), so that jobs become runnable, and finished runs JOB_FINISHED, with no launcher;
//! 3. expires the leases of launchers that fell silent, so their jobs go RESTART_READY;
//! 4. measures the waiting work in node-minutes and asks the packing decision
//!    ([`balsam_cobalt::decide`]) what to submit under the queue policy, then submits it.
//!
//! Every decision and its reason goes to the log (`log/service.log`) when it changes, and into
//! the `reason` of each launch it submits, which `balsam ls queues` shows.
//!
//! One service per database: an exclusive `flock` on `service.lock` in the database directory,
//! held for the life of the process and released by the kernel however it ends. Between passes
//! the service sleeps on a channel that SIGTERM and SIGINT wake, so it uses no CPU while idle
//! and stops within moments.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use balsam_cobalt::{decide, ActiveLaunch, BatchJobState, Decision, PackingInput, RunnableWork};
use balsam_launcher::{process_pending, TransitionOptions};
use balsam_store::{DbDir, Error as StoreError, LeaseFilter, QueuedLaunch, SessionInfo, Store};

use crate::batch::{self, refresh_launches, runs_launcher, LaunchRequest, Site};

/// The lock file in the database directory.
pub const LOCK_FILE: &str = "service.lock";

/// The service's last decision, in the database directory, for `balsam ls queues`.
pub const STATUS_FILE: &str = "service-status.json";

/// The service's last decision as `balsam ls queues` shows it, if a service ever decided.
pub fn last_decision(db: &Path) -> Option<String> {
    let text = std::fs::read_to_string(db.join(STATUS_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(format!(
        "Last service decision ({}, pid {}): {}",
        v["time"].as_str()?,
        v["pid"].as_u64()?,
        v["decision"].as_str()?
    ))
}

/// Minutes at the end of a launch its launcher does not use: the shipped templates stop the
/// launcher 2 minutes before the wall time.
pub const MARGIN_MINUTES: u64 = 2;

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// One pass, then exit.
    pub once: bool,
    /// Between passes (SERVICE_PERIOD unless overridden).
    pub period: Duration,
    /// Job mode of the launches it submits.
    pub job_mode: String,
    /// Workflow filter of the launches it submits, and of the work it counts; empty for all.
    pub wf_filter: String,
    /// Project charged (DEFAULT_PROJECT when empty).
    pub project: String,
}

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another service holds the lock.
    #[error("another balsam service is already running on {db}{holder}; stop it first (one service per database)")]
    AlreadyRunning {
        /// The database directory.
        db: PathBuf,
        /// ` (pid N)` when known.
        holder: String,
    },
    /// The lock file could not be used.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Settings, scheduler or store.
    #[error(transparent)]
    Batch(#[from] batch::Error),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transitions.
    #[error(transparent)]
    Launcher(#[from] balsam_launcher::Error),
    /// Signal handling could not be set up.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Results of the service.
pub type Result<T> = std::result::Result<T, Error>;

/// The exclusive lock that makes a service the only one on its database.
pub struct ServiceLock {
    _file: File,
}

impl ServiceLock {
    /// Takes the lock or says who holds it. The lock is the kernel's (`flock`): it goes with
    /// the process, so a killed service never leaves a stale lock behind.
    pub fn acquire(db: &DbDir) -> Result<ServiceLock> {
        let path = db.root.join(LOCK_FILE);
        let lock_err = |source| Error::Lock {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text.trim();
                return Err(Error::AlreadyRunning {
                    db: db.root.clone(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            return Err(lock_err(e));
        }
        file.set_len(0).map_err(lock_err)?;
        file.rewind().map_err(lock_err)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_err)?;
        file.flush().map_err(lock_err)?;
        Ok(ServiceLock { _file: file })
    }
}

/// The service of one database.
pub struct Service {
    db: DbDir,
    store: Store,
    session: i64,
    opts: ServiceOptions,
    last_decision: String,
    last_warning: String,
    /// The state each launch had when this service last looked, so that its log tells every
    /// change, also those another command (`balsam ls queues`) recorded first.
    seen: std::collections::HashMap<i64, String>,
    /// Whether `seen` has been filled once (the first look logs only the active launches).
    primed: bool,
    /// The last measure of the waiting work.
    measured: Option<Measured>,
}

/// A measure of the waiting work, and what it cost.
struct Measured {
    at: Instant,
    cost: Duration,
    /// The launches it was measured against.
    launches: String,
    work: Vec<RunnableWork>,
}

/// A measure of the waiting work is reused for this many times what it cost (at most 5% of a
/// core goes to measuring), unless launches or jobs moved meanwhile.
const MEASURE_SPACING: u32 = 20;

impl Service {
    /// Opens the database for the service (the lock must be held already).
    pub fn new(db: &DbDir, opts: ServiceOptions) -> Result<Service> {
        let mut store = Store::open(db.clone())?;
        let session = store.start_session(&service_session())?;
        Ok(Service {
            db: db.clone(),
            store,
            session,
            opts,
            last_decision: String::new(),
            last_warning: String::new(),
            seen: std::collections::HashMap::new(),
            primed: false,
            measured: None,
        })
    }

    /// Runs passes until `--once` is done or a stop signal arrives.
    pub fn run(&mut self) -> Result<()> {
        let (tx, rx) = mpsc::channel::<i32>();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .map_err(Error::Signals)?;
        let handle = signals.handle();
        let waker = std::thread::spawn(move || {
            for sig in signals.forever() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
        tracing::info!(
            "service started on {} (pid {}, every {} s)",
            self.db.root.display(),
            std::process::id(),
            self.opts.period.as_secs_f64()
        );
        if let Ok(site) = Site::open(&self.db) {
            if site.kind == balsam_cobalt::SchedulerKind::Cobalt
                && self.opts.project.is_empty()
                && site.settings.default_project.is_empty()
            {
                tracing::warn!(
                    "no project: Cobalt refuses jobs without one; set DEFAULT_PROJECT in settings.json or pass -A"
                );
            }
        }
        let result = loop {
            let started = Instant::now();
            if let Err(e) = self.pass() {
                // A pass that fails (scheduler down, settings being edited) is logged and tried
                // again next period: the service must outlive passing trouble.
                if self.opts.once {
                    break Err(e);
                }
                self.warn_once(format!("pass failed: {e}"));
            }
            if self.opts.once {
                break Ok(());
            }
            let wait = self.opts.period.saturating_sub(started.elapsed());
            match rx.recv_timeout(wait) {
                Ok(sig) => {
                    tracing::info!("signal {sig}: stopping");
                    break Ok(());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            }
        };
        handle.close();
        let _ = waker.join();
        if let Err(e) = self.store.end_session(self.session) {
            tracing::warn!("cannot end the service session: {e}");
        }
        tracing::info!("service stopped");
        result
    }

    /// Logs the launches whose state changed since the last pass (recorded by this refresh or by
    /// another command in between).
    fn log_launch_changes(&mut self) -> Result<()> {
        let launches = self.store.launches(false)?;
        let first = !std::mem::replace(&mut self.primed, true);
        for l in &launches {
            let old = self.seen.insert(l.id, l.state.clone());
            match old {
                Some(old) if old != l.state => {
                    tracing::info!("launch {}: {old} -> {}", l.id, l.state)
                }
                None if !first
                    || balsam_store::launches::ACTIVE_LAUNCH_STATES.contains(&l.state.as_str()) =>
                {
                    tracing::info!(
                        "launch {} ({} job {}): {}",
                        l.id,
                        l.scheduler,
                        l.scheduler_id,
                        l.state
                    )
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The waiting work, measured again when launches or jobs moved, or when the last measure
    /// is older than [`MEASURE_SPACING`] times what it cost: on a million waiting jobs one measure
    /// takes about half a second, and a service that repeated it every second would keep a core
    /// half busy while the queue holds its launches.
    fn waiting_work(
        &mut self,
        active: &[ActiveLaunch],
        processed: usize,
    ) -> Result<Vec<RunnableWork>> {
        let key = format!("{active:?}");
        if let Some(m) = &self.measured {
            let fresh = m.at.elapsed() < m.cost * MEASURE_SPACING;
            if fresh && m.launches == key && processed == 0 {
                return Ok(m.work.clone());
            }
        }
        let t0 = Instant::now();
        let work: Vec<RunnableWork> = self
            .store
            .waiting_work(&self.opts.wf_filter)?
            .iter()
            .map(|w| RunnableWork {
                num_nodes: w.num_nodes.max(1) as usize,
                wall_time_minutes: u64::from(w.wall_time_minutes),
                node_packing_count: w.node_packing_count.max(1) as usize,
                count: w.count as usize,
            })
            .collect();
        self.measured = Some(Measured {
            at: Instant::now(),
            cost: t0.elapsed(),
            launches: key,
            work: work.clone(),
        });
        Ok(work)
    }

    /// Records a decision: in the log when it differs from the last one (a submission always),
    /// and in `service-status.json`, which `balsam ls queues` shows.
    fn decided(&mut self, reason: String, submitting: bool) {
        if !submitting && reason == self.last_decision {
            return;
        }
        tracing::info!("decision: {reason}");
        let status = serde_json::json!({
            "pid": std::process::id(),
            "time": chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            "decision": reason,
        });
        let path = self.db.root.join(STATUS_FILE);
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, status.to_string() + "\n")
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        self.last_decision = reason;
    }

    fn warn_once(&mut self, msg: String) {
        if msg != self.last_warning {
            tracing::warn!("{msg}");
            self.last_warning = msg;
        }
    }

    /// One pass: refresh, transitions, expiry, decision.
    pub fn pass(&mut self) -> Result<()> {
        // Settings are read each pass, so edits to settings.json or the policy take effect
        // without a restart.
        let site = Site::open(&self.db)?;
        let policy = site.policy()?;

        // 1. The queue as the scheduler sees it. Without it no decision is safe; the
        // transitions still run.
        let refreshed = refresh_launches(&mut self.store, &site, true);
        if refreshed.is_ok() {
            self.log_launch_changes()?;
        }

        // 2. Transitions, under the service's own session.
        let filter = LeaseFilter {
            wf_filter: self.opts.wf_filter.clone(),
            ..Default::default()
        };
        let threads = site.settings.num_transition_threads.max(1);
        let processed = match process_pending(
            &self.db,
            self.session,
            &filter,
            threads,
            &TransitionOptions::default(),
        ) {
            Err(balsam_launcher::Error::Store(StoreError::SessionEnded(_))) => {
                // Our session was expired (the machine slept, the disk stalled): start anew.
                self.session = self.store.start_session(&service_session())?;
                0
            }
            other => other?,
        };
        if processed > 0 {
            tracing::info!("processed {processed} jobs");
        }
        self.store.heartbeat(self.session).or_else(|e| match e {
            StoreError::SessionEnded(_) => {
                self.session = self.store.start_session(&service_session())?;
                Ok(())
            }
            e => Err(e),
        })?;

        // 3. Silent launchers.
        let expiry = Duration::from_secs(site.settings.lease_expiry_seconds);
        for x in self.store.expire_sessions(expiry)? {
            tracing::warn!(
                "launcher session {} on {} (pid {}) fell silent: {} running jobs to RESTART_READY, {} leases released",
                x.session.id,
                x.session.host,
                x.session.pid,
                x.restarted,
                x.released
            );
        }

        // 4. The decision.
        let refreshed = match refreshed {
            Ok(r) => r,
            Err(e) => {
                self.warn_once(format!(
                    "cannot list the {} queue, so nothing is submitted this pass: {e}",
                    site.kind
                ));
                return Ok(());
            }
        };
        let launches = self.store.launches(true)?;
        let active = active_launches(&launches, &refreshed);
        // When no queue can take a launch, the work need not be measured: on a database of a
        // million waiting jobs that measure is most of a pass, and this is the steady state of
        // a large campaign (every queue at max-queued).
        let closed: Vec<String> = policy
            .queues
            .iter()
            .filter_map(|q| {
                let mine = active.iter().filter(|l| l.queue == q.name).count();
                if !q.submit_jobs {
                    Some(format!("{}: submit-jobs is off", q.name))
                } else if mine >= q.max_queued {
                    Some(format!(
                        "{}: max-queued {} reached ({mine} launches queued or running)",
                        q.name, q.max_queued
                    ))
                } else {
                    None
                }
            })
            .collect();
        if closed.len() == policy.queues.len() {
            let reason = format!("no queue can take a launch now: {}", closed.join("; "));
            self.decided(reason, false);
            return Ok(());
        }
        let work = self.waiting_work(&active, processed)?;
        let decisions = decide(&PackingInput {
            work: &work,
            launches: &active,
            policy: &policy,
            covered_node_minutes: 0.0,
            margin_minutes: MARGIN_MINUTES,
        });
        for d in decisions {
            match d {
                Decision::Nothing { reason } => self.decided(reason, false),
                Decision::Submit {
                    queue,
                    nodes,
                    minutes,
                    reason,
                } => {
                    self.decided(reason.clone(), true);
                    let req = LaunchRequest {
                        nodes: nodes as u32,
                        wall_minutes: minutes as u32,
                        queue: queue.clone(),
                        project: self.opts.project.clone(),
                        job_mode: self.opts.job_mode.clone(),
                        wf_filter: self.opts.wf_filter.clone(),
                        sched_flags: String::new(),
                        reason,
                    };
                    match batch::submit_launch(&mut self.store, &site, &req) {
                        Ok(l) => {
                            self.seen.insert(l.id, l.state);
                        }
                        // A refusal (bad queue in the policy, over quota) is the scheduler's
                        // word, logged; the next pass tries again.
                        Err(e) => self.warn_once(format!(
                            "submitting {nodes} nodes x {minutes} min to {queue} failed: {e}"
                        )),
                    }
                }
            }
        }
        Ok(())
    }
}

fn service_session() -> SessionInfo {
    SessionInfo {
        kind: "service".into(),
        host: hostname(),
        pid: std::process::id() as i64,
        ..Default::default()
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The recorded launches still in a queue, as the packing decision sees them: running ones with
/// the minutes they have left (from the scheduler when it says), queued ones with their wall
/// time. Batch jobs that do not run a launcher take a place in their queue but cover no work.
fn active_launches(
    launches: &[QueuedLaunch],
    statuses: &[balsam_cobalt::BatchJobStatus],
) -> Vec<ActiveLaunch> {
    launches
        .iter()
        .filter_map(|l| {
            let state = match l.state.as_str() {
                "running" => BatchJobState::Running,
                "exiting" => BatchJobState::Exiting,
                "creating" | "submitted" | "queued" => BatchJobState::Queued,
                _ => return None,
            };
            let status = statuses.iter().find(|s| s.scheduler_id == l.scheduler_id);
            let minutes = match (&state, status) {
                (BatchJobState::Running, Some(s)) => s
                    .time_remaining_minutes
                    .unwrap_or(u64::from(l.wall_minutes)),
                _ => u64::from(l.wall_minutes),
            };
            let covers = runs_launcher(l);
            Some(ActiveLaunch {
                queue: l.queue.clone(),
                nodes: if covers { l.nodes as usize } else { 0 },
                minutes: if covers { minutes } else { 0 },
                state,
            })
        })
        .collect()
}

/// Runs the service: takes the lock, then passes until stopped.
pub fn run(db: &DbDir, opts: ServiceOptions) -> Result<()> {
    let _lock = ServiceLock::acquire(db)?;
    let mut service = Service::new(db, opts)?;
    service.run()
}

//! Rank 0's store thread: the only place the MPI side touches the database.
//!
//! - Leases runnable jobs ahead of demand, in batches, and prepares what running them needs
//!   (argv, environment, working directory) so the MPI loop stays cheap.
//! - Writes state changes in batched transactions: every RUNNING, and every run outcome with the
//!   states that follow it without a script (see [`crate::transitions::after_run`]), go into one
//!   `apply` per flush. This, more than anything, sets the launcher's throughput.
//! - Hands jobs that need scripts after their run to the transition pool, lease kept.
//! - Heartbeats the session; if the session was expired meanwhile, it stops writing at once and
//!   tells the master, which kills everything: the jobs belong to other launchers now.
//! - Polls for jobs users killed, removed or changed while this launcher holds them, at least
//!   once a second, and has the master stop them (one log line each; nothing is written for them
//!   but, for a job its user killed, a note in its history of when its process died).
//! - Expires other launchers' dead sessions, so their jobs are run again: at once those of
//!   launchers on this host whose process is gone, the others when silent for
//!   LEASE_EXPIRY_SECONDS.
//! - When the database cannot be written, keeps every result and retries with backoff (see
//!   [`crate::health`]); a write that fails for one job alone drops that job, not the others.
//! - When it holds nothing, tells the master what could still arrive (see [`crate::idle`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balsam_store::{DbDir, Job, LeaseFilter, LeaseGroup, Outcome, State, Store, Transition};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::health::{self, Health, Resource};
use crate::idle::{explain_not_here, Capabilities, IdleFacts, OtherSession};
use crate::jobenv::{job_environment, LauncherContext};
use crate::messages::{ExitStatus, JobFinished, KillReason};
use crate::process;
pub use crate::scheduler::Class;
use crate::scheduler::{fits_time, max_wall_minutes};
use crate::transitions::{
    after_run, AppCache, Handover, RunResult, TransitionOptions, TransitionPool,
};

/// A leased runnable job, ready to start.
#[derive(Debug, Clone)]
pub struct Runnable {
    /// The job as leased.
    pub job: Job,
    /// Serial or MPI.
    pub class: Class,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The application's envscript, if any.
    pub envscript: Option<String>,
    /// The job's environment on top of the launcher's.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: PathBuf,
    /// `<name>.out` in it.
    pub output: PathBuf,
}

/// Master → store thread.
#[derive(Debug)]
pub enum ToStore {
    /// These jobs' processes started (pk, where).
    Started(Vec<(i64, String)>),
    /// These jobs ended (or were dropped, or could not start).
    Finished(Vec<JobFinished>),
    /// The launcher will not run these; give them back.
    Release(Vec<i64>),
    /// Jobs the transitions' fast path just made runnable, still leased (from the pool).
    Handover(Vec<Handover>),
    /// The launcher is stopping: lease nothing more, leave timeout handlers to others.
    Draining,
    /// Write everything, stop the transitions, end the session, and exit.
    Finish,
}

/// Store thread → master.
#[derive(Debug)]
pub enum FromStore {
    /// Jobs to run.
    Runnable(Vec<Runnable>),
    /// Jobs a user killed, removed or changed while this launcher held them: stop them where
    /// they run, write nothing for them (the store thread logged why).
    Drop(Vec<i64>),
    /// Whether the store thread or the transitions have work in hand, and, when the store thread
    /// holds nothing, what could still arrive for this launcher.
    Status {
        /// Writes pending or transitions in flight.
        busy: bool,
        /// What could still arrive (only when nothing is held).
        idle: Option<IdleFacts>,
    },
    /// The session expired: stop everything, write nothing.
    SessionLost,
    /// The database file was removed or replaced: nothing can be recorded any more.
    DatabaseGone(String),
    /// The session has ended (or could not be, or results could not be written: `problem`
    /// says what); the thread exits.
    Ended {
        /// What went wrong, in words for the user; None when all was written.
        problem: Option<String>,
    },
}

/// How many runnable jobs the launcher holds and wants, per class. The store thread counts the
/// jobs it delivers; the master counts those it lets go of (ended, given back, dropped) and sets
/// the targets from its scheduler ([`crate::scheduler::Scheduler::lease_target`]).
#[derive(Debug, Default)]
pub struct Demand {
    held: [AtomicUsize; 2],
    target: [AtomicUsize; 2],
    /// Jobs the transitions' fast path made runnable and sent, not yet taken by the store thread.
    handing: AtomicUsize,
}

impl Demand {
    /// Room for more runnable jobs of either class, counting those on their way.
    pub fn room(&self) -> crate::transitions::Room {
        let (mut free, mut wanted) = (0, 0);
        for c in [Class::Serial, Class::Mpi] {
            free += self.target(c).saturating_sub(self.held(c));
            wanted += self.target(c);
        }
        crate::transitions::Room {
            free: free.saturating_sub(self.handing.load(Ordering::Acquire)),
            wanted,
        }
    }
    /// Jobs of class `c` delivered and not let go of.
    pub fn held(&self, c: Class) -> usize {
        self.held[c as usize].load(Ordering::Acquire)
    }
    /// Jobs of class `c` the launcher wants to hold in all.
    pub fn target(&self, c: Class) -> usize {
        self.target[c as usize].load(Ordering::Relaxed)
    }
    /// Sets the target for class `c`.
    pub fn set_target(&self, c: Class, n: usize) {
        self.target[c as usize].store(n, Ordering::Relaxed);
    }
    fn delivered(&self, c: Class, n: usize) {
        self.held[c as usize].fetch_add(n, Ordering::AcqRel);
    }
    /// The master let go of `n` jobs of class `c` (ended, given back or dropped).
    pub fn let_go(&self, c: Class, n: usize) {
        let _ = self.held[c as usize].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_sub(n))
        });
    }
}

/// How long the store thread keeps trying to write its results when the launcher stops.
pub const FINISH_PATIENCE: Duration = Duration::from_secs(30);

/// Ends the sessions of launchers that are gone: on this host those whose process died, anywhere
/// those silent for longer than `expiry`. Their running jobs become RESTART_READY, their other
/// leases are released.
pub fn expire_sessions(store: &mut Store, host: &str, expiry: Duration) {
    expire_dead_sessions(store, host);
    match store.expire_sessions(expiry) {
        Ok(expired) => {
            for e in expired {
                tracing::warn!(
                    "expired silent launcher session {} ({}:{}): {} running jobs to RESTART_READY, {} released",
                    e.session.id,
                    e.session.host,
                    e.session.pid,
                    e.restarted,
                    e.released
                );
            }
        }
        // An unreachable database is told once by the store itself, and once when it is back.
        Err(e) if e.is_unavailable() => {}
        Err(e) => tracing::warn!("expiring sessions failed: {e}"),
    }
}

/// Ends the sessions of launchers on this host whose process is gone (kill -9, a crash): their
/// jobs come back at once instead of after the lease expiry.
pub fn expire_dead_sessions(store: &mut Store, host: &str) {
    match store.expire_dead_sessions(host) {
        Ok(expired) => {
            for e in expired {
                tracing::warn!(
                    "launcher session {} ({}:{}) is gone (its process died): {} running jobs to RESTART_READY, {} released",
                    e.session.id,
                    e.session.host,
                    e.session.pid,
                    e.restarted,
                    e.released
                );
            }
        }
        Err(e) if e.is_unavailable() => {}
        Err(e) => tracing::warn!("looking for dead launcher sessions failed: {e}"),
    }
}

/// What the store thread needs.
#[derive(Debug, Clone)]
pub struct StoreThreadConfig {
    /// The database.
    pub db: DbDir,
    /// This launcher's session.
    pub session: i64,
    /// This host, as the session records it.
    pub host: String,
    /// The job mode.
    pub job_mode: crate::config::JobMode,
    /// The launcher's nodes.
    pub nodes: u32,
    /// Workflow filter ('' = all).
    pub wf_filter: String,
    /// Lease filters per class (None: the class is not run by this launcher).
    pub serial_filter: Option<LeaseFilter>,
    /// See `serial_filter`.
    pub mpi_filter: Option<LeaseFilter>,
    /// The launcher's time limit, for the wall-time filter.
    pub deadline: Option<Instant>,
    /// Lease expiry (LEASE_EXPIRY_SECONDS): heartbeats come well within it.
    pub lease_expiry: Duration,
    /// Facts for the jobs' environment.
    pub launcher: LauncherContext,
    /// Transition threads.
    pub transition_threads: usize,
    /// Transition options.
    pub transition_opts: TransitionOptions,
}

enum Kind {
    Start,
    After { needs_processing: bool },
    Fail,
}

struct Pending {
    pk: i64,
    ts: Vec<Transition>,
    kind: Kind,
    /// The job, for a run outcome (taken out of `leased`).
    job: Option<Job>,
}

/// Starts the store thread.
/// `own_tx` is the sending side of `rx`: the transition pool hands runnable jobs over through it.
pub fn spawn(
    cfg: StoreThreadConfig,
    demand: Arc<Demand>,
    health: Arc<Health>,
    rx: Receiver<ToStore>,
    own_tx: Sender<ToStore>,
    tx: Sender<FromStore>,
) -> crate::Result<std::thread::JoinHandle<()>> {
    // The session was registered just now.
    health.lease_held(Instant::now());
    let store = Store::open(cfg.db.clone())?;
    let (d1, d2) = (demand.clone(), demand.clone());
    let handoff = crate::transitions::Handoff {
        deliver: Box::new(move |jobs| {
            d1.handing.fetch_add(jobs.len(), Ordering::AcqRel);
            if let Err(e) = own_tx.send(ToStore::Handover(jobs)) {
                // The store thread has gone: nothing is on its way any more.
                let n = match e.into_inner() {
                    ToStore::Handover(j) => j.len(),
                    _ => 0,
                };
                d1.handing.fetch_sub(n, Ordering::AcqRel);
            }
        }),
        room: Box::new(move || d2.room()),
    };
    let pool = TransitionPool::start(
        &cfg.db,
        cfg.session,
        LeaseFilter {
            wf_filter: cfg.wf_filter.clone(),
            ..LeaseFilter::default()
        },
        cfg.transition_threads,
        cfg.transition_opts.clone(),
        Some(handoff),
        health.clone(),
    )?;
    let mut st = StoreThread {
        store,
        cfg,
        demand,
        health,
        tx,
        pool: Some(pool),
        leased: HashMap::new(),
        dropping: HashSet::new(),
        apps: AppCache::default(),
        pending: Vec::new(),
        pending_since: None,
        release: Vec::new(),
        draining: false,
        lost: false,
        gone: false,
        was_empty: false,
        next_lease: [Instant::now(), Instant::now()],
        room_open: [false, false],
        lease_pause: [Duration::from_millis(50), Duration::from_millis(50)],
        last_heartbeat: Instant::now(),
        last_kill_poll: Instant::now(),
        last_expire: Instant::now(),
        last_dead_check: Instant::now(),
        last_status: Instant::now() - Duration::from_secs(10),
        user_kills: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("store".into())
        .spawn(move || st.run(rx))
        .map_err(|e| crate::Error::io("cannot start the store thread", e))
}

struct StoreThread {
    store: Store,
    cfg: StoreThreadConfig,
    demand: Arc<Demand>,
    health: Arc<Health>,
    tx: Sender<FromStore>,
    pool: Option<TransitionPool>,
    /// Jobs delivered to the master and not ended, as this thread last wrote them.
    leased: HashMap<i64, Job>,
    /// Jobs a user killed, removed or changed: nothing more is written for them, and their
    /// lease goes back once their process ended.
    dropping: HashSet<i64>,
    apps: AppCache,
    pending: Vec<Pending>,
    pending_since: Option<Instant>,
    release: Vec<i64>,
    draining: bool,
    lost: bool,
    /// The database file is gone: nothing is written any more.
    gone: bool,
    /// Nothing was held at the last status (so a change to empty is told at once).
    was_empty: bool,
    next_lease: [Instant; 2],
    /// Per class: a quarter of the target was free when last looked at (the feeder was woken
    /// when it became so, once, not at every look).
    room_open: [bool; 2],
    lease_pause: [Duration; 2],
    last_heartbeat: Instant,
    last_kill_poll: Instant,
    last_expire: Instant,
    last_dead_check: Instant,
    last_status: Instant,
    /// Jobs users killed, with when the kill was seen: the end of their process is noted.
    user_kills: HashMap<i64, Instant>,
}

/// How often the thread checks the database file and looks for launchers of this host whose
/// process died.
const DEAD_SESSION_CHECK: Duration = Duration::from_secs(2);

/// How much lower than the job-running threads the store thread runs.
pub const BOOKKEEPING_NICE: i32 = 10;

/// Flush pending writes when this many transitions wait...
const FLUSH_COUNT: usize = 2000;
/// ... or the oldest waited this long.
const FLUSH_AGE: Duration = Duration::from_millis(25);

impl StoreThread {
    fn run(&mut self, rx: Receiver<ToStore>) {
        process::lower_thread_priority(BOOKKEEPING_NICE);
        let mut finish = false;
        loop {
            let tick = if self.pending.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(5)
            };
            match rx.recv_timeout(tick) {
                Ok(m) => finish |= self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => finish = true,
            }
            while let Ok(m) = rx.try_recv() {
                finish |= self.handle(m);
            }
            if finish {
                self.finish();
                return;
            }
            let count: usize = self.pending.iter().map(|p| p.ts.len()).sum();
            let old = self.pending_since.is_some_and(|t| t.elapsed() >= FLUSH_AGE);
            if (count >= FLUSH_COUNT
                || old
                || (!self.release.is_empty() && self.pending.is_empty()))
                && self.health.attempt_due(Resource::Database, Instant::now())
            {
                self.flush();
            }
            if self.lost || self.gone {
                continue;
            }
            self.periodic();
            if !self.draining && self.health.may_start_jobs(Instant::now()) {
                self.lease(Class::Serial);
                self.lease(Class::Mpi);
            }
        }
    }

    /// Returns true on Finish.
    fn handle(&mut self, m: ToStore) -> bool {
        match m {
            ToStore::Started(v) => {
                for (pk, place) in v {
                    if self.dropping.contains(&pk) {
                        continue;
                    }
                    let Some(job) = self.leased.get(&pk) else {
                        continue;
                    };
                    let t = Transition::new(pk, job.state, State::Running, place);
                    self.push(Pending {
                        pk,
                        ts: vec![t],
                        kind: Kind::Start,
                        job: None,
                    });
                }
            }
            ToStore::Finished(v) => {
                for f in v {
                    self.finished(f);
                }
            }
            ToStore::Release(pks) => {
                for pk in pks {
                    self.leased.remove(&pk);
                    self.dropping.remove(&pk);
                    self.release.push(pk);
                }
            }
            ToStore::Handover(jobs) => {
                // Jobs are becoming runnable: lease again without waiting out the pause.
                self.next_lease = [Instant::now(), Instant::now()];
                self.lease_pause = [Duration::from_millis(20), Duration::from_millis(20)];
                self.handover(jobs)
            }
            ToStore::Draining => self.draining = true,
            ToStore::Finish => return true,
        }
        false
    }

    /// Takes over jobs the fast path made runnable, as far as the launcher wants more; the rest
    /// goes back for other launchers.
    fn handover(&mut self, jobs: Vec<Handover>) {
        let _ = self
            .demand
            .handing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(jobs.len()))
            });
        let mut ready: [Vec<Runnable>; 2] = [Vec::new(), Vec::new()];
        for h in jobs {
            let class = self.classify(&h.job).filter(|c| {
                let held = self.demand.held(*c) + ready[*c as usize].len();
                !self.draining && !self.lost && held < self.demand.target(*c)
            });
            let Some(class) = class else {
                self.release.push(h.job.pk);
                continue;
            };
            match self.prepare(&h.job, class, h.parent_ids) {
                Ok(r) => {
                    self.leased.insert(h.job.pk, h.job);
                    ready[class as usize].push(r);
                }
                Err(e) => self.cannot_start(&h.job, e),
            }
        }
        for (c, jobs) in [
            (Class::Serial, std::mem::take(&mut ready[0])),
            (Class::Mpi, std::mem::take(&mut ready[1])),
        ] {
            if !jobs.is_empty() {
                self.demand.delivered(c, jobs.len());
                let _ = self.tx.send(FromStore::Runnable(jobs));
            }
        }
    }

    fn time_left(&self) -> Option<Duration> {
        self.cfg
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The class a job would be leased as, if this launcher runs it at all.
    fn classify(&self, job: &Job) -> Option<Class> {
        if !fits_time(job.spec.wall_time_minutes, self.time_left()) {
            return None;
        }
        let fits = |f: &LeaseFilter| {
            (!f.serial_only || job.is_serial())
                && (!f.mpi_only || !job.is_serial())
                && f.max_nodes
                    .is_none_or(|n| job.spec.num_nodes + job.spec.coschedule_num_nodes <= n)
        };
        if self.cfg.serial_filter.as_ref().is_some_and(fits) {
            return Some(Class::Serial);
        }
        if self.cfg.mpi_filter.as_ref().is_some_and(fits) {
            return Some(Class::Mpi);
        }
        None
    }

    fn cannot_start(&mut self, job: &Job, e: crate::Error) {
        if let crate::Error::Store(se) = &e {
            if health::is_database_trouble(se) {
                // Not the job's fault: it goes back as it is.
                self.health
                    .failed(Resource::Database, &se.to_string(), Instant::now());
                self.release.push(job.pk);
                return;
            }
        }
        tracing::warn!("{}: cannot be started: {e}", job.cute_id());
        let t = Transition::new(
            job.pk,
            job.state,
            State::Failed,
            format!("cannot be started: {e}"),
        );
        self.push(Pending {
            pk: job.pk,
            ts: vec![t],
            kind: Kind::Fail,
            job: None,
        });
    }

    fn push(&mut self, p: Pending) {
        if self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        self.pending.push(p);
    }

    fn finished(&mut self, f: JobFinished) {
        let pk = f.pk;
        if self.dropping.remove(&pk) {
            // A user killed, removed or changed it: its process ended; nothing is written but,
            // for a kill, when the process died.
            if let Some(seen) = self.user_kills.remove(&pk) {
                if f.started {
                    self.note_death(&f, seen);
                }
            }
            self.leased.remove(&pk);
            self.release.push(pk);
            return;
        }
        if !f.started && f.killed.is_some() {
            // Dropped from a worker's queue before it started: nothing happened to it.
            self.leased.remove(&pk);
            self.release.push(pk);
            return;
        }
        let Some(job) = self.leased.remove(&pk) else {
            return;
        };
        let app = self.apps.get(&mut self.store, &job.spec.application).ok();
        let run = RunResult {
            status: &f.status,
            killed: f.killed,
            tail: &f.tail,
            elapsed: Duration::from_millis(f.elapsed_ms),
        };
        if f.killed == Some(KillReason::SessionLost) {
            // Stopped because the session is lost, or may be (the launcher fenced itself): the
            // job stays leased as it was written, RUNNING, until the session ends (RESTART_READY
            // then) or expires. Given back now, a RUNNING job would belong to nobody.
            return;
        }
        let mut plan = after_run(&job, app.as_deref(), &run, self.draining);
        if plan.transitions.is_empty() {
            // Killed by its user or a lost session, or its files could not be written: no
            // writes, only the lease goes back.
            self.release.push(pk);
            return;
        }
        if !f.started {
            // It never ran (missing executable...): RUNNING first, as the state machine wants.
            let why = match &f.status {
                ExitStatus::NotStarted(w) => format!("starting: {w}"),
                _ => String::new(),
            };
            plan.transitions
                .insert(0, Transition::new(pk, job.state, State::Running, why));
        }
        let kind = Kind::After {
            needs_processing: plan.needs_processing,
        };
        self.push(Pending {
            pk,
            ts: plan.transitions,
            kind,
            job: Some(job),
        });
    }

    fn flush(&mut self) {
        if self.lost || self.gone {
            self.pending.clear();
            self.release.clear();
            self.pending_since = None;
            return;
        }
        if !self.pending.is_empty() {
            let ts: Vec<Transition> = self
                .pending
                .iter()
                .flat_map(|p| p.ts.iter().cloned())
                .collect();
            match self.store.apply(&ts, Some(self.cfg.session)) {
                Ok(outcomes) => {
                    self.health.ok(Resource::Database);
                    let pending = std::mem::take(&mut self.pending);
                    self.settle(pending, outcomes);
                }
                Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
                Err(e @ balsam_store::Error::DatabaseGone { .. }) => return self.database_gone(e),
                Err(e) if health::is_database_trouble(&e) => {
                    // Kept, and tried again after the backoff.
                    self.health.failed(
                        Resource::Database,
                        &format!("{e} ({} jobs' changes kept)", self.pending.len()),
                        Instant::now(),
                    );
                    return;
                }
                Err(e) => {
                    // Something about one job (removed meanwhile...): write each on its own, so
                    // one job's failed write never holds back the others.
                    tracing::debug!("writing {} state changes at once failed: {e}", ts.len());
                    self.flush_one_by_one();
                }
            }
        }
        if !self.release.is_empty() {
            let pks = std::mem::take(&mut self.release);
            match self.store.release(self.cfg.session, &pks) {
                Ok(_) => self.database_ok_if_nothing_kept(),
                Err(balsam_store::Error::SessionEnded(_)) => {}
                Err(e) if health::is_database_trouble(&e) => {
                    self.health
                        .failed(Resource::Database, &e.to_string(), Instant::now());
                    self.release = pks;
                }
                Err(e) => tracing::warn!("releasing {} jobs failed: {e}", pks.len()),
            }
        }
    }

    /// Writes each pending job's changes in a transaction of its own; a job whose write fails
    /// for a reason of its own is dropped with one log line.
    fn flush_one_by_one(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_since = None;
        let mut kept = Vec::new();
        for p in pending {
            if !kept.is_empty() {
                kept.push(p);
                continue;
            }
            match self.store.apply(&p.ts, Some(self.cfg.session)) {
                Ok(outcomes) => self.settle(vec![p], outcomes),
                Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
                Err(e) if health::is_database_trouble(&e) => {
                    self.health
                        .failed(Resource::Database, &e.to_string(), Instant::now());
                    kept.push(p);
                }
                Err(e) => {
                    tracing::warn!(
                        "job #{}: its state cannot be written ({e}); dropping it",
                        p.pk
                    );
                    if matches!(p.kind, Kind::Start) {
                        // Its process runs: stop it; the lease goes back when it ended.
                        self.dropping.insert(p.pk);
                        let _ = self.tx.send(FromStore::Drop(vec![p.pk]));
                    } else {
                        self.leased.remove(&p.pk);
                        self.release.push(p.pk);
                    }
                }
            }
        }
        if !kept.is_empty() {
            self.pending_since = Some(Instant::now());
            self.pending = kept;
        }
    }

    fn settle(&mut self, pending: Vec<Pending>, outcomes: Vec<Outcome>) {
        if self.pending.is_empty() {
            self.pending_since = None;
        }
        let mut i = 0;
        let mut conflicts = Vec::new();
        let mut ended = false;
        for p in pending {
            let outs = &outcomes[i..i + p.ts.len()];
            i += p.ts.len();
            if outs.iter().any(|o| matches!(o, Outcome::Gone)) {
                // Removed by a user meanwhile: nothing to write, nothing to release.
                if self.dropping.insert(p.pk) || !matches!(p.kind, Kind::Start) {
                    tracing::info!(
                        "job #{}: removed from the database while this launcher held it; stopping it and writing nothing more for it",
                        p.pk
                    );
                }
                match p.kind {
                    // Its process runs: stop it; the lease is gone with the job.
                    Kind::Start => conflicts.push(p.pk),
                    _ => {
                        self.leased.remove(&p.pk);
                        self.dropping.remove(&p.pk);
                    }
                }
                continue;
            }
            let conflict = outs.iter().find_map(|o| match o {
                Outcome::Conflict(s) => Some(*s),
                _ => None,
            });
            let last = match outs.last() {
                Some(Outcome::Applied(s)) => Some(*s),
                _ => None,
            };
            match p.kind {
                Kind::Start => {
                    if let Some(actual) = conflict {
                        if self.dropping.insert(p.pk) {
                            tracing::info!(
                                "job #{}: is {actual}, not runnable any more (changed by a user); stopping it and leaving it as it is",
                                p.pk
                            );
                            conflicts.push(p.pk);
                        }
                    } else if let Some(j) = self.leased.get_mut(&p.pk) {
                        j.state = State::Running;
                    }
                }
                Kind::After { needs_processing } => {
                    let final_state = conflict.or(last);
                    ended |= final_state.is_some_and(|s| s.is_end());
                    match (p.job, conflict, last) {
                        (Some(mut job), None, Some(s)) if needs_processing && !s.is_end() => {
                            job.state = s;
                            if let Some(pool) = &self.pool {
                                pool.handoff(job);
                            }
                        }
                        // An end state reached by this write released the lease already.
                        (_, None, Some(s)) if s.is_end() => {}
                        _ => self.release.push(p.pk),
                    }
                }
                Kind::Fail => {
                    self.leased.remove(&p.pk);
                    self.release.push(p.pk);
                }
            }
        }
        if !conflicts.is_empty() {
            let _ = self.tx.send(FromStore::Drop(conflicts));
        }
        if ended {
            // Finished parents may have made children ready.
            if let Some(pool) = &self.pool {
                pool.wake();
            }
        }
    }

    fn periodic(&mut self) {
        let hb = heartbeat_period(self.cfg.lease_expiry);
        // While the database cannot be written, the heartbeat is also the probe that finds it
        // writable again (at the backoff's pace), so jobs start again even with nothing to write.
        let probe = self.health.trouble(Resource::Database).is_some()
            && self.health.attempt_due(Resource::Database, Instant::now());
        if self.last_heartbeat.elapsed() >= hb || probe {
            let began = Instant::now();
            self.last_heartbeat = began;
            match self.store.heartbeat(self.cfg.session) {
                Ok(()) => {
                    self.health.lease_held(began);
                    self.database_ok_if_nothing_kept()
                }
                Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
                Err(e @ balsam_store::Error::DatabaseGone { .. }) => return self.database_gone(e),
                Err(e) if health::is_database_trouble(&e) => {
                    if e.blocks_every_writer() {
                        // The file itself cannot be written (full, read-only): no launcher can
                        // expire this session either, so the jobs stay this launcher's.
                        self.health.lease_held(began);
                    }
                    self.health
                        .failed(Resource::Database, &e.to_string(), Instant::now())
                }
                Err(e) => tracing::warn!("heartbeat failed: {e}"),
            }
        }
        if self.last_dead_check.elapsed() >= DEAD_SESSION_CHECK {
            self.last_dead_check = Instant::now();
            // A stat of the database file: was it removed or replaced under us?
            if let Err(e) = self.store.check_file() {
                return self.database_gone(e);
            }
            expire_dead_sessions(&mut self.store, &self.cfg.host);
        }
        if self.last_kill_poll.elapsed() >= Duration::from_millis(400) {
            self.last_kill_poll = Instant::now();
            self.poll_user_changes();
        }
        let every = self
            .cfg
            .lease_expiry
            .clamp(Duration::from_secs(2), Duration::from_secs(30));
        if self.last_expire.elapsed() >= every {
            self.last_expire = Instant::now();
            expire_sessions(&mut self.store, &self.cfg.host, self.cfg.lease_expiry);
        }
        let mut empty = self.is_empty();
        // Told every half second, and at once when the thread just ran out of work.
        if self.last_status.elapsed() >= Duration::from_millis(500) || (empty && !self.was_empty) {
            self.last_status = Instant::now();
            let idle = if empty {
                match self.idle_facts() {
                    // Jobs the feeder leased while the facts were read are neither free nor
                    // held here yet: the facts would say nothing can arrive.
                    Ok(_) if !self.is_empty() => {
                        empty = false;
                        None
                    }
                    Ok(f) => Some(f),
                    Err(e) => {
                        if !e.is_unavailable() {
                            tracing::warn!("looking for work left failed: {e}");
                        }
                        None
                    }
                }
            } else {
                None
            };
            self.was_empty = empty;
            let _ = self.tx.send(FromStore::Status { busy: !empty, idle });
        }
    }

    /// Finds jobs a user killed, removed or set to another state while this launcher holds
    /// them, and has the master stop them: one log line each, nothing written for them, the
    /// lease given back once their process ended.
    fn poll_user_changes(&mut self) {
        if self.leased.is_empty() {
            return;
        }
        let now: HashMap<i64, State> = match self.store.lease_states(self.cfg.session) {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                if health::is_database_trouble(&e) {
                    self.health
                        .failed(Resource::Database, &e.to_string(), Instant::now());
                } else {
                    tracing::warn!("polling the states of held jobs failed: {e}");
                }
                return;
            }
        };
        let mut drop = Vec::new();
        for (pk, job) in &self.leased {
            if self.dropping.contains(pk) {
                continue;
            }
            let why = match now.get(pk) {
                None => "removed from the database while this launcher held it".to_string(),
                Some(State::UserKilled) => {
                    self.user_kills.insert(*pk, Instant::now());
                    "killed by its user".to_string()
                }
                Some(s) if *s != job.state => {
                    format!("set to {s} by a user while {} here", job.state)
                }
                Some(_) => continue,
            };
            tracing::info!(
                "{}: {why}; stopping it and writing nothing more for it",
                job.cute_id()
            );
            drop.push(*pk);
        }
        if !drop.is_empty() {
            self.dropping.extend(drop.iter().copied());
            let _ = self.tx.send(FromStore::Drop(drop));
        }
    }

    /// Whether this launcher holds no job anywhere: none here, none in the transitions (from
    /// their lease on), none on its way from them to here.
    fn is_empty(&self) -> bool {
        self.leased.is_empty()
            && self.pending.is_empty()
            && self.release.is_empty()
            && self.demand.handing.load(Ordering::Acquire) == 0
            && self.pool.as_ref().is_none_or(|p| p.in_flight() == 0)
    }

    /// What could still arrive for this launcher.
    fn idle_facts(&mut self) -> balsam_store::Result<IdleFacts> {
        let caps = Capabilities {
            job_mode: self.cfg.job_mode,
            nodes: self.cfg.nodes,
            time_left: self.time_left(),
        };
        let outlook = self
            .store
            .work_outlook(self.cfg.session, &self.cfg.wf_filter)?;
        let groups = if outlook.runnable_free > 0 {
            self.store.runnable_overview(&self.cfg.wf_filter)?
        } else {
            Vec::new()
        };
        let now = balsam_store::now_us();
        Ok(IdleFacts {
            runnable_here: groups
                .iter()
                .filter(|g| caps.why_not(g).is_none())
                .map(|g| g.count)
                .sum(),
            not_here: explain_not_here(&groups, &caps),
            on_their_way: outlook.processable_free,
            awaiting_parents: outlook.awaiting_parents,
            held_by_others: outlook.held_by_others,
            others: outlook
                .others
                .iter()
                .map(|s| OtherSession {
                    id: s.id,
                    host: s.host.clone(),
                    silent_for: Duration::from_micros((now - s.heartbeat_us).max(0) as u64),
                })
                .collect(),
            service: outlook.service_live,
        })
    }

    fn lease(&mut self, class: Class) {
        let filter = match class {
            Class::Serial => self.cfg.serial_filter.clone(),
            Class::Mpi => self.cfg.mpi_filter.clone(),
        };
        let Some(mut filter) = filter else { return };
        let i = class as usize;
        let target = self.demand.target(class);
        let held = self.demand.held(class);
        // Lease when a quarter of the target is missing (at least one job): batches stay large
        // for short jobs, and a slot of a long-job launcher is refilled as soon as it frees.
        let missing = target.saturating_sub(held);
        if missing == 0 || missing < target / 4 {
            self.room_open[i] = false;
            return;
        }
        if !std::mem::replace(&mut self.room_open[i], true) {
            // The transitions' fast path fills the same room with new jobs (it waits for it).
            if let Some(pool) = &self.pool {
                pool.wake();
            }
        }
        if Instant::now() < self.next_lease[i] {
            return;
        }
        filter.max_wall_minutes = max_wall_minutes(self.time_left());
        let jobs = match self
            .store
            .lease(self.cfg.session, LeaseGroup::Runnable, &filter, missing)
        {
            Ok(j) => {
                self.database_ok_if_nothing_kept();
                j
            }
            Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
            Err(e @ balsam_store::Error::DatabaseGone { .. }) => return self.database_gone(e),
            Err(e) => {
                if health::is_database_trouble(&e) {
                    self.health
                        .failed(Resource::Database, &e.to_string(), Instant::now());
                } else {
                    tracing::warn!("leasing runnable jobs failed: {e}");
                }
                Vec::new()
            }
        };
        if jobs.is_empty() {
            self.next_lease[i] = Instant::now() + self.lease_pause[i];
            self.lease_pause[i] = (self.lease_pause[i] * 2).min(Duration::from_millis(250));
            return;
        }
        self.lease_pause[i] = Duration::from_millis(50);
        let mut ready = Vec::with_capacity(jobs.len());
        // The parents of the whole lease in one query (one round trip to a database server);
        // should it fail, each job asks for its own and fails or goes back on its own.
        let pks: Vec<i64> = jobs.iter().map(|j| j.pk).collect();
        let mut parents = self.store.parent_ids_of(&pks).ok();
        for job in jobs {
            let mine = parents
                .as_mut()
                .map(|p| p.remove(&job.pk).unwrap_or_default());
            match self.prepare(&job, class, mine) {
                Ok(r) => {
                    self.leased.insert(job.pk, job);
                    ready.push(r);
                }
                Err(e) => self.cannot_start(&job, e),
            }
        }
        if !ready.is_empty() {
            self.demand.delivered(class, ready.len());
            let _ = self.tx.send(FromStore::Runnable(ready));
        }
    }

    fn prepare(
        &mut self,
        job: &Job,
        class: Class,
        parents: Option<Vec<balsam_store::Uuid>>,
    ) -> crate::Result<Runnable> {
        let app = self.apps.get(&mut self.store, &job.spec.application)?;
        let argv = process::command_argv(&app.executable, &job.spec.args)?;
        let parents = match parents {
            Some(p) => p,
            None => self.store.parent_ids(job.pk)?,
        };
        let env = job_environment(job, &parents, &self.cfg.db.root, Some(&self.cfg.launcher));
        let workdir = job.workdir(&self.cfg.db.root);
        let out_name: String = job
            .spec
            .name
            .chars()
            .map(|c| if c == '/' || c == '\0' { '_' } else { c })
            .collect();
        let output = workdir.join(format!("{out_name}.out"));
        let envscript = Some(app.envscript.trim().to_string()).filter(|s| !s.is_empty());
        Ok(Runnable {
            job: job.clone(),
            class,
            argv,
            envscript,
            env,
            workdir,
            output,
        })
    }

    /// Notes in a killed job's history when, and how, its process ended (the event's time is
    /// the time of death, to the few milliseconds a report takes).
    fn note_death(&mut self, f: &JobFinished, seen: Instant) {
        // The pid is in the job's RUNNING event ("..., pid 1234, ...").
        let pid = self.store.history(f.pk).ok().and_then(|h| {
            h.iter()
                .rev()
                .find(|e| e.to_state == State::Running)
                .and_then(|e| pid_in(&e.message))
        });
        let what = pid.map_or_else(|| "its process".to_string(), |p| format!("process {p}"));
        let msg = format!(
            "{what} ended ({}) {:.2} s after the kill was seen",
            f.status.describe(),
            seen.elapsed().as_secs_f64()
        );
        if let Err(e) = self.store.note(f.pk, Some(self.cfg.session), &msg) {
            tracing::warn!("job #{}: cannot note the end of its process: {e}", f.pk);
        }
    }

    fn session_lost(&mut self) {
        if !self.lost {
            tracing::error!(
                "launcher session {} expired (no heartbeat for {} s?); its jobs belong to other launchers now",
                self.cfg.session,
                self.cfg.lease_expiry.as_secs()
            );
            self.lost = true;
            self.pending.clear();
            self.release.clear();
            let _ = self.tx.send(FromStore::SessionLost);
        }
    }

    /// A small write worked: the database takes writes again, unless results are still kept
    /// (a small write can fit where a batch does not; only writing them proves it).
    fn database_ok_if_nothing_kept(&self) {
        if self.pending.is_empty() {
            self.health.ok(Resource::Database);
        }
    }

    /// The database file was removed or replaced: nothing can be recorded any more.
    fn database_gone(&mut self, e: balsam_store::Error) {
        if !self.gone {
            self.gone = true;
            self.pending.clear();
            self.release.clear();
            let _ = self.tx.send(FromStore::DatabaseGone(e.to_string()));
        }
    }

    /// Writes what is left (retrying with backoff for up to [`FINISH_PATIENCE`] while the
    /// database cannot be written), stops the transitions and ends the session.
    fn finish(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.stop(Duration::from_secs(10));
        }
        let t = Instant::now();
        loop {
            if self.health.attempt_due(Resource::Database, Instant::now()) {
                self.flush();
            }
            if self.lost || self.gone || (self.pending.is_empty() && self.release.is_empty()) {
                break;
            }
            if t.elapsed() >= FINISH_PATIENCE {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut problem = None;
        if !self.lost && !self.gone {
            let unwritten = self.pending.len();
            match self.store.end_session(self.cfg.session) {
                Ok((restarted, released)) => tracing::info!(
                    "session {} ended ({restarted} running jobs to RESTART_READY, {released} leases released)",
                    self.cfg.session
                ),
                Err(e) => {
                    tracing::error!("ending session {}: {e}", self.cfg.session);
                    problem = Some(format!(
                        "the session could not be ended in the database {}: {e}",
                        self.cfg.db.db_file().display()
                    ));
                }
            }
            if unwritten > 0 {
                let why = self
                    .health
                    .trouble(Resource::Database)
                    .unwrap_or_else(|| "the database cannot be written".into());
                problem = Some(format!(
                    "the runs of {unwritten} jobs (starts or results) could not be written to the database {} ({why}); those jobs run again once this session ends or expires{}",
                    self.cfg.db.db_file().display(),
                    problem.map(|p| format!("; {p}")).unwrap_or_default()
                ));
            }
        }
        let _ = self.tx.send(FromStore::Ended { problem });
    }
}

/// How often a session heartbeats: a quarter of the lease expiry, between 0.5 s and 10 s (with
/// the default LEASE_EXPIRY_SECONDS of 180, every 10 s).
pub fn heartbeat_period(lease_expiry: Duration) -> Duration {
    (lease_expiry / 4).clamp(Duration::from_millis(500), Duration::from_secs(10))
}

/// The number after "pid " in a RUNNING event's message.
fn pid_in(message: &str) -> Option<u32> {
    let rest = &message[message.find("pid ")? + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_is_read_from_the_running_event() {
        assert_eq!(pid_in("on nid0001 (rank 1, pid 4242, slot 0)"), Some(4242));
        assert_eq!(pid_in("MPI launch, pid 17"), Some(17));
        assert_eq!(pid_in("starting: nothing"), None);
    }
}
